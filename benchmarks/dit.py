"""Diffusion transformers in tiles: what global tile positions buy, and what the planner expects at size.

``positions``: random-weight FLUX- and SD3-shaped transformers (the published block structure, reduced
depth and width so a CPU runs them), sampled on a flow-matching schedule from one noise: untiled, and
tiled (a fixed "naive" grid, FSTD, and explicit overlap at half-tile stride) with each tile at its global position or at local positions from
its own corner (what tiled nodes do). Reported per arm: the final latent's difference from the untiled
one (mean |tiled - untiled| over mean |untiled|), and the band ratio of that difference at the tile
pitch (anysize.train.seams: 1.0 is no band; FSTD's grid moves every step, so its pitch is the tile
side's but not its place). Random weights: the numbers say how
far the tiles' arithmetic moves from the whole-image arithmetic, not how an image looks.

``paper``: FLUX.1-dev and SD3 medium at their published sizes, built on the meta device (no memory, no
compute): the pass plan, tiles per step and the memory planner's estimate beyond the weights at
several sizes, for a machine this project has no GPU to measure on.

    .venv/bin/python benchmarks/dit.py positions      # CPU, ~2 min: benchmarks/results/dit_positions.md
    .venv/bin/python benchmarks/dit.py paper          # instant: benchmarks/results/dit_paper.md
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("MKL_CBWR", "AVX2,STRICT")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
RESULTS = ROOT / "benchmarks" / "results"

METHODS = ("naive", "fstd", "overlap")  # a fixed grid; FSTD's moving one; stride-1/2 overlap, Gaussian blend
# The published structure at reduced size: FLUX's double- and single-stream blocks with 3-axis RoPE,
# SD3's joint blocks with its absolute sin-cos table.
REDUCED = {
    "flux": dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=32,
                 num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True,
                 axes_dims_rope=(8, 12, 12)),
    "sd3": dict(sample_size=32, patch_size=2, in_channels=16, num_layers=4, attention_head_dim=32,
                num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=128, pooled_projection_dim=32,
                out_channels=16, pos_embed_max_size=96),
}


def _denoiser(arch: str, net, text, pooled, latent, positions: str):
    from anysize.core.dit import FluxTileDenoiser, SD3TileDenoiser

    if arch == "flux":
        return FluxTileDenoiser(net, text, pooled, guidance_scale=3.5, positions=positions)
    return SD3TileDenoiser(net, text, pooled, latent=latent, guidance_scale=1.0, positions=positions)


def _scheduler(arch: str, steps: int, latent):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    from random_models import FLUX_SCHEDULER

    if arch == "flux":
        s = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
        s.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps),
                        mu=calculate_shift((latent[0] // 2) * (latent[1] // 2)))
    else:
        s = FlowMatchEulerDiscreteScheduler(shift=3.0)
        s.set_timesteps(steps)
    return s


def positions(args) -> None:
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    from anysize.core.sampler import sample_tiled
    from anysize.core.tiling import TilingConfig
    from anysize.train.seams import band_ratio

    rows = []
    latent = (args.latent, args.latent)
    for arch in ("flux", "sd3"):
        torch.manual_seed(0)
        cls = FluxTransformer2DModel if arch == "flux" else SD3Transformer2DModel
        net = cls(**REDUCED[arch]).eval()
        g = torch.Generator().manual_seed(1)
        text = torch.randn(1, 64, 64, generator=g)
        pooled = torch.randn(1, 32, generator=g)
        for seed in range(args.seeds):
            noise = torch.randn(1, 16, *latent, generator=torch.Generator().manual_seed(100 + seed))
            t0 = time.perf_counter()
            with torch.inference_mode():
                ref = sample_tiled(_denoiser(arch, net, text, pooled, latent, "global"), noise.clone(),
                                   _scheduler(arch, args.steps, latent), TilingConfig(method="none"), progress=False)
                for method in METHODS:
                    for where in ("global", "local"):
                        out = sample_tiled(_denoiser(arch, net, text, pooled, latent, where), noise.clone(),
                                           _scheduler(arch, args.steps, latent),
                                           TilingConfig(method=method, tile_size=args.tile),
                                           generator=torch.Generator().manual_seed(seed), progress=False)
                        diff = (out - ref).abs().mean().item() / ref.abs().mean().item()
                        err = (out - ref)[0].mean(0).numpy()  # the error image, channel mean
                        bands = np.nanmean([band_ratio(err, args.tile, axis) for axis in ("columns", "rows")])
                        rows.append({"arch": arch, "seed": seed, "tiling": method, "positions": where,
                                     "difference": diff, "band_ratio": float(bands)})
            print(f"{arch} seed {seed}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    _write_positions(rows, args)


def _cpu() -> str:
    try:
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        return names[0] if names else platform.machine()
    except OSError:
        return platform.machine()


def _write_positions(rows: list[dict], args) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "dit_positions.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    lines = [f"Command: `.venv/bin/python benchmarks/dit.py positions --latent {args.latent} --tile {args.tile} "
             f"--steps {args.steps} --seeds {args.seeds}`; {_cpu()}, "
             f"{os.cpu_count()} cores, float32. Random weights, reduced sizes (benchmarks/dit.py REDUCED).", "",
             "| model | tiling | positions | difference from untiled (mean over seeds) | band ratio at the tile pitch |",
             "|---|---|---|---|---|"]
    for arch in ("flux", "sd3"):
        for method in METHODS:
            for where in ("global", "local"):
                sel = [r for r in rows if (r["arch"], r["tiling"], r["positions"]) == (arch, method, where)]
                diff = np.mean([r["difference"] for r in sel])
                bands = np.nanmean([r["band_ratio"] for r in sel])
                lines.append(f"| {arch.upper()} | {method} | {where} | {diff:.4f} | {bands:.2f} |")
    (RESULTS / "dit_positions.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def paper(args) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline
    from random_models import FLUX_SCHEDULER, transformer, vae16

    from anysize import AnySizePipeline, Request
    from anysize.memory import GIB, tiles_per_step

    lines = ["Command: `.venv/bin/python benchmarks/dit.py paper`: the published sizes built on the meta device "
             "(nothing allocated, nothing run); bfloat16; the memory planner's estimate of the peak beyond the "
             "weights (its transformer term is structural, NOT calibrated by a measured peak).", "",
             "| model | weights (transformer) | size | plan | tiles/step per pass | planned peak beyond weights |",
             "|---|---|---|---|---|---|"]
    for arch in ("flux", "sd3"):
        with torch.device("meta"):
            net, vae = transformer(arch).to(torch.bfloat16), vae16(arch).to(torch.bfloat16)
        if arch == "flux":
            pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), vae=vae, text_encoder=None,
                                tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=net)
        else:
            pipe = StableDiffusion3Pipeline(transformer=net, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                            vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                                            tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
        ours = AnySizePipeline(pipe)
        weights = sum(p.numel() for p in net.parameters()) * 2 / GIB
        for w, h in ((2048, 2048), (3840, 1080), (4096, 4096)):
            plan = ours.plan_run(Request("x", width=w, height=h, max_memory=80 * GIB))
            tiles = [tiles_per_step(p.tiling.method, *p.latent, p.tiling.tile_size) for p in plan.sampling
                     if p.kind != "base"]
            lines.append(f"| {'FLUX.1-dev' if arch == 'flux' else 'SD3 medium'} | {weights:.1f} GiB | {w}x{h} | "
                         f"{plan.describe()} | {', '.join(map(str, tiles))} | {plan.memory.peak / GIB:.2f} GiB |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "dit_paper.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    pos = sub.add_parser("positions")
    pos.add_argument("--latent", type=int, default=128)
    pos.add_argument("--tile", type=int, default=32)
    pos.add_argument("--steps", type=int, default=6)
    pos.add_argument("--seeds", type=int, default=3)
    sub.add_parser("paper")
    args = p.parse_args()
    positions(args) if args.what == "positions" else paper(args)


if __name__ == "__main__":
    main()
