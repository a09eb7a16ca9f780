"""Composition at many aspect ratios: the ARAD-trained base model vs the square-trained baseline.

For every ratio (height / width: the paper's nine plus 1:4 and 4:1) the same N scenes (fixed seeds,
laid out for that ratio) are drawn; each model generates their captions at the same size (about the
native area, sides on the model's grid) from the same initial noise, and ``anysize.train.evaluate`` scores
the images against the scenes: exact match of the (shape, colour) multiset, recall, precision,
duplicate rate (copies beyond the caption: the square model's failure at wide ratios) and the share
of detected objects cut by the frame. This is the base stage alone, where the paper's claim lives.

Each ratio also gets a ``round_trip`` row: the same scenes rendered exactly at that size, passed
through the models' VAE (encode to the posterior mean, decode) and scored the same way. It is a
reference, not a bound (a model can land on latents that decode crisper than the encoder's mean of the
true image), and it separates what a model fails to compose from what the size and the VAE let the
evaluator read back: at a 48 px shorter side, small objects come back with rounded corners.

    .venv/bin/python benchmarks/composition.py --arad runs/base/model --square runs/base-square/model \
        --prompts 100 --json benchmarks/results/composition.json --plot docs/composition.png \
        --samples docs/composition_samples.png

Needs the ``bench`` extra (`pip install -e ".[bench]"`: matplotlib) for ``--plot``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("MKL_CBWR", "AVX2,STRICT")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from anysize.buckets import ARAD_RATIOS, arad_buckets, model_granularity, native_side  # noqa: E402
from anysize.train.evaluate import aggregate, evaluate_image  # noqa: E402
from anysize.train.scenes import render, sample_scene  # noqa: E402

RATIOS = (0.25, *ARAD_RATIOS, 4.0)
METRICS = ("exact", "color_exact", "count_exact", "recall", "duplicate_rate", "cut_rate")


def load_vae(path: str):
    """A VAE in float32, eval mode, from a diffusers model directory or the VAE's own directory."""
    from diffusers import AutoencoderKL

    from anysize.models import component_dir

    return AutoencoderKL.from_pretrained(component_dir(path, "vae"), use_safetensors=True).float().eval()


def load(path: str, vae=None):
    """The base model at ``path`` as a diffusers pipeline, its VAE replaced by the module ``vae`` if given."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(path, use_safetensors=True, safety_checker=None,
                                                   requires_safety_checker=False, dtype=torch.float32)
    if vae is not None:
        pipe.vae = vae
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def size_for(ratio: float, area: int, granularity: int) -> tuple[int, int]:
    """(width, height) for ``ratio`` = H / W at about ``area`` px, sides multiples of ``granularity``."""
    return arad_buckets(area, granularity, ratios=(ratio,))[0]


def generate(pipe, captions: list[str], seeds: list[int], width: int, height: int, steps: int,
             guidance: float, batch: int) -> np.ndarray:
    out = []
    for i in range(0, len(captions), batch):
        gens = [torch.Generator().manual_seed(s) for s in seeds[i:i + batch]]
        with torch.no_grad():
            images = pipe(prompt=captions[i:i + batch], width=width, height=height, num_inference_steps=steps,
                          guidance_scale=guidance, generator=gens, output_type="np").images
        out.append(np.clip(np.rint(images * 255), 0, 255).astype(np.uint8))
    return np.concatenate(out)


def vae_round_trip(vae, images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) images encoded (posterior mean) and decoded by ``vae``, back to uint8."""
    x = torch.from_numpy(images).to(vae.dtype).permute(0, 3, 1, 2) / 127.5 - 1
    with torch.no_grad():
        y = vae.decode(vae.encode(x).latent_dist.mean).sample
    return ((y.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def run(args) -> dict:
    vae = load_vae(args.vae) if args.vae else None  # one module, shared: loaded once
    models = {"arad": load(args.arad, vae)}
    if args.square:
        models["square"] = load(args.square, vae)
    ref = models["arad"]
    granularity = model_granularity(ref.vae, ref.unet)
    if args.resolution is None:  # the ARAD model's own
        args.resolution = native_side(ref.vae, ref.unet)
    area = args.resolution**2
    results: dict = {"config": dict(vars(args)), "ratios": {}}
    picks: dict = {}
    for ratio in args.ratios:
        width, height = size_for(ratio, area, granularity)
        scenes = [sample_scene(10_000 + i, height / width) for i in range(args.prompts)]
        captions = [s.caption for s in scenes]
        seeds = list(range(args.prompts))
        row = {"width": width, "height": height}
        truth = vae_round_trip(ref.vae, np.stack([render(s, width, height) for s in scenes]))
        row["round_trip"] = aggregate([evaluate_image(img, scene) for img, scene in zip(truth, scenes)])
        for name, pipe in models.items():
            t0 = time.perf_counter()
            images = generate(pipe, captions, seeds, width, height, args.steps, args.guidance, args.batch)
            scores = [evaluate_image(img, scene) for img, scene in zip(images, scenes)]
            row[name] = aggregate(scores)
            row[name]["seconds"] = time.perf_counter() - t0
            picks.setdefault(ratio, {})[name] = images[: args.sample_count]
        results["ratios"][str(ratio)] = row
        exact = " ".join(f"{name} {row[name]['exact']:.2f}" for name in models)
        dup = " ".join(f"{name} {row[name]['duplicate_rate']:.2f}" for name in models)
        print(f"ratio {ratio:.4g} ({width}x{height}): exact {exact} round trip {row['round_trip']['exact']:.2f} | "
              f"duplicates {dup}", file=sys.stderr)
    results["picks"] = picks
    return results


def model_names(results: dict) -> list[str]:
    """The models a results dict scored: "arad", and "square" unless the run had no baseline."""
    first = next(iter(results["ratios"].values()))
    return [name for name in ("arad", "square") if name in first]


def table(results: dict) -> str:
    names = model_names(results)
    label = " / ".join({"arad": "ARAD", "square": "square"}[n] for n in names)
    head = "| ratio H/W | size | " + " | ".join(f"{m} {label}" for m in METRICS) + " | exact, true scene via VAE |"
    lines = [head, "|" + "---|" * (3 + len(METRICS))]
    for ratio, row in results["ratios"].items():
        cells = [" / ".join(f"{row[n][m]:.2f}" for n in names) for m in METRICS]
        via_vae = f"{row['round_trip']['exact']:.2f}" if "round_trip" in row else "-"
        lines.append(f"| {float(ratio):.3g} | {row['width']}x{row['height']} | " + " | ".join(cells)
                     + f" | {via_vae} |")
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = [float(r) for r in results["ratios"]]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    for ax, metric, title in zip(axes, ("exact", "color_exact", "duplicate_rate", "cut_rate"),
                                 ("exact match (shape + colour)", "colour multiset match", "duplicate rate",
                                  "objects cut by the frame")):
        for name, style in (("arad", "o-"), ("square", "s--")):
            if name not in model_names(results):
                continue
            ax.plot(ratios, [results["ratios"][str(r)][name][metric] for r in ratios], style,
                    label="ARAD buckets" if name == "arad" else "square only")
        rows = [results["ratios"][str(r)] for r in ratios]
        if metric == "exact" and all("round_trip" in row for row in rows):
            ax.plot(ratios, [row["round_trip"]["exact"] for row in rows], ":", color="gray",
                    label="true scene through the VAE")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ratios, [f"{r:.2g}" for r in ratios], rotation=60, fontsize=7)
        ax.minorticks_off()
        ax.set_xlabel("aspect ratio H / W")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def samples(results: dict, path: str, zoom: int = 2) -> None:
    """One row per model, one column group per ratio: the first generated images, side by side."""
    from PIL import Image

    tiles = [(p["arad"], p.get("square", [])) for p in results["picks"].values()]
    rows = 2 if len(tiles[0][1]) else 1  # no baseline: the ARAD row alone
    pad = 6
    col_w = [max(img.shape[1] for img in a) * zoom for a, _ in tiles]
    row_h = max(img.shape[0] for a, _ in tiles for img in a) * zoom
    n = len(tiles[0][0])
    width = sum(w * n + pad * n for w in col_w) + pad
    canvas = Image.new("RGB", (width, rows * row_h + (rows + 1) * pad), "white")
    x = pad
    for (a, s), w in zip(tiles, col_w):
        for k in range(n):
            for r, imgs in enumerate((a, s)[:rows]):
                im = Image.fromarray(imgs[k]).resize((imgs[k].shape[1] * zoom, imgs[k].shape[0] * zoom), Image.NEAREST)
                canvas.paste(im, (x, pad + r * (row_h + pad)))
            x += w + pad
    canvas.save(path)


def write_json(path: str, data: dict) -> None:
    """A benchmark's results as indented JSON at ``path`` (its folder made if missing); shared by the
    scene-domain benchmarks that import this module."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arad", required=True, help="diffusers dir of the ARAD-trained base model")
    p.add_argument("--square", help="diffusers dir of the square-trained baseline (left out: the ARAD model alone)")
    p.add_argument("--vae", help="a VAE (its directory, or a model directory with vae/) that decodes both models' "
                                 "latents (and the true scenes') instead of their own; its encoder must be theirs "
                                 "(a decoder-only fine-tune)")
    p.add_argument("--prompts", type=int, default=100)
    p.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS))
    p.add_argument("--resolution", type=int, default=None,
                   help="native side: images hold about PX^2 pixels (default: the ARAD model's, its UNet's "
                        "sample_size times the VAE factor)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--sample-count", type=int, default=3, help="images per ratio and model in --samples")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--plot", help="write the matplotlib figure here (PNG)")
    p.add_argument("--samples", help="write a picture of the first images per ratio here (PNG)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    results = run(args)
    print(table(results))
    if args.plot:
        plot(results, args.plot)
    if args.samples:
        samples(results, args.samples)
    if args.json:
        write_json(args.json, {k: v for k, v in results.items() if k != "picks"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
