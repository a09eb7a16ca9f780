"""Do the base UNet's attention tokens know where they are? A probe for GLIGEN grounding.

GLIGEN's gated self-attention lets each visual token attend to grounding tokens made from a phrase and
its box's Fourier features; for a token to pick the box it lies in, its own position must be readable
from its features by the attention's linear maps. The layers add no position of their own, so what
there is comes from the UNet's convolutions (their zero padding) and the content.

This probe renders scenes at the model's native size, encodes them, noises them at a few timesteps,
runs the UNet and keeps the hidden states entering every transformer block (where GLIGEN's fuser
reads them). A ridge regression from a token's features to its (x, y) centre, fitted on some scenes and
scored on the others, says how much position is linearly there: R^2 per axis, and the mean absolute
error as a fraction of the image side, beside the objects' mean box side (an error near half a box
side cannot tell inside a box from beside it). The noisy latent itself is the content-only baseline.

    .venv/bin/python benchmarks/position_probe.py anysize/default_model/base \\
        --json benchmarks/results/position_probe.json --table benchmarks/results/position_probe.md
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("MKL_CBWR", "AVX2,STRICT")

import numpy as np  # noqa: E402
import torch  # noqa: E402


def token_centres(side: int) -> np.ndarray:
    """(side * side, 2): the (x, y) centres of a square grid's tokens in fractions, row-major as a UNet
    flattens its feature maps."""
    yy, xx = np.meshgrid((np.arange(side) + 0.5) / side, (np.arange(side) + 0.5) / side, indexing="ij")
    return np.stack([xx.ravel(), yy.ravel()], 1)


def position_fit(features: np.ndarray, n_train: int, ridge: float = 1.0) -> tuple[list[float], float]:
    """Ridge regression from tokens' features (images, side * side, channels) to their centres, fitted
    on the first ``n_train`` images and scored on the rest: (R^2 for x and y, mean absolute error as a
    fraction of the side). Standardised features, an intercept, closed form (numpy suffices here)."""
    n, tokens, channels = features.shape
    side = int(round(tokens**0.5))
    if side * side != tokens or not 0 < n_train < n:
        raise ValueError(f"need square token grids and 0 < n_train < {n}, got {tokens} tokens, n_train={n_train}")
    centres = token_centres(side)
    train, test = features[:n_train].reshape(-1, channels), features[n_train:].reshape(-1, channels)
    y_train, y_test = np.tile(centres, (n_train, 1)), np.tile(centres, (n - n_train, 1))
    mean, std = train.mean(0), train.std(0) + 1e-6
    a = np.c_[(train - mean) / std, np.ones(len(train))]
    w = np.linalg.solve(a.T @ a + ridge * np.eye(a.shape[1]), a.T @ y_train)
    pred = np.c_[(test - mean) / std, np.ones(len(test))] @ w
    r2 = 1 - ((pred - y_test) ** 2).sum(0) / ((y_test - y_test.mean(0)) ** 2).sum(0)
    return [float(v) for v in r2], float(np.abs(pred - y_test).mean())


def main() -> None:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from anysize.core.vae import vae_scale_factor
    from anysize.train.scenes import object_boxes, render, sample_scene
    from anysize.train.trainer import to_tensor

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path, help="a diffusers SD-layout directory (the default base)")
    p.add_argument("--scenes", type=int, default=48)
    p.add_argument("--train", type=int, default=36, help="scenes the regression is fitted on (the rest score it)")
    p.add_argument("--timesteps", type=int, nargs="+", default=[650, 800, 950])
    p.add_argument("--seed", type=int, default=1000, help="scene seeds SEED .. SEED + N - 1")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--table", type=Path, default=None)
    args = p.parse_args()

    f32 = {"torch_dtype": torch.float32}
    unet = UNet2DConditionModel.from_pretrained(args.model, subfolder="unet", **f32).eval()
    vae = AutoencoderKL.from_pretrained(args.model, subfolder="vae", **f32).eval()
    tokenizer = CLIPTokenizer.from_pretrained(args.model, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(args.model, subfolder="text_encoder", **f32).eval()
    scheduler = DDPMScheduler.from_pretrained(args.model, subfolder="scheduler")
    side = unet.config.sample_size * vae_scale_factor(vae)  # the native image side

    scenes = [sample_scene(args.seed + i, 1.0) for i in range(args.scenes)]
    images = to_tensor(np.stack([render(s, side, side) for s in scenes]))
    boxes = [b for s in scenes for b in object_boxes(s, side, side)]
    box_side = float(np.mean([((b - t) + (r - l)) / 2 for t, l, b, r in boxes])) / side

    captured: dict[str, torch.Tensor] = {}
    blocks = [(n, m) for n, m in unet.named_modules() if type(m).__name__ == "BasicTransformerBlock"]
    for name, block in blocks:
        def keep(module, a, kw, name=name):
            captured[name] = (a[0] if a else kw["hidden_states"]).detach()
        block.register_forward_pre_hook(keep, with_kwargs=True)

    rows, g = [], torch.Generator().manual_seed(0)
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.mean * vae.config.scaling_factor
        ids = tokenizer([s.caption for s in scenes], padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        text = text_encoder(ids)[0]
        for t in args.timesteps:
            noisy = scheduler.add_noise(latents, torch.randn(latents.shape, generator=g), torch.full((len(scenes),), t))
            captured.clear()
            unet(noisy, t, encoder_hidden_states=text)
            layers = {"noisy latent (content only)": noisy.flatten(2).transpose(1, 2), **captured}
            for name, feats in layers.items():
                r2, err = position_fit(feats.numpy(), args.train)
                rows.append({"layer": name.replace(".transformer_blocks.0", ""), "t": t,
                             "grid": int(round(feats.shape[1] ** 0.5)), "r2_x": round(r2[0], 3),
                             "r2_y": round(r2[1], 3), "error": round(err, 4)})
    text_out = table(rows, box_side, args)
    print(text_out)
    if args.json is not None:
        args.json.write_text(json.dumps({"model": str(args.model), "scenes": args.scenes, "train": args.train,
                                         "mean_box_side": round(box_side, 4), "rows": rows}, indent=1) + "\n")
    if args.table is not None:
        args.table.write_text(text_out)


def table(rows: list[dict], box_side: float, args) -> str:
    ts = sorted({r["t"] for r in rows})
    head = ("| layer | grid | " + " | ".join(f"R^2 x / y, t={t}" for t in ts) + " | "
            + " | ".join(f"error, t={t}" for t in ts) + " |")
    lines = [head, "|" + "---|" * (2 + 2 * len(ts))]
    for layer in dict.fromkeys(r["layer"] for r in rows):
        mine = {r["t"]: r for r in rows if r["layer"] == layer}
        lines.append(f"| {layer} | {mine[ts[0]]['grid']}x{mine[ts[0]]['grid']} | "
                     + " | ".join(f"{mine[t]['r2_x']:.2f} / {mine[t]['r2_y']:.2f}" for t in ts) + " | "
                     + " | ".join(f"{mine[t]['error']:.3f}" for t in ts) + " |")
    return ("\n".join(lines) + f"\n\n{args.scenes} scenes ({args.train} fitted, {args.scenes - args.train} scored); "
            f"error: mean absolute error of the predicted centre, in fractions of the image side; the objects' "
            f"mean box side: {box_side:.3f}.\n")


if __name__ == "__main__":
    main()
