"""Enlargements of 2x or less with an x4 upscaler: one pass from a shrunk input, or not.

An x4 upscaler asked for a target at most 2x its source (a 512^2 stage 1 to 768^2, the default
model's 96x48 bucket to 150x70) ran one pass until 2026-11-23 (:func:`anysize.pipeline.upscale_passes`
planned at least one): its conditioning image was the source shrunk to target / 4, so the model
re-invented detail the source had. Now such enlargements get a resize
(:meth:`anysize.AnySizePipeline.stage2_passes`). Three ways, measured against the scene rendered at
the target (the exact answer, as in ``upscale_quality.py``), at scales up to 4:

- ``pass`` (what the pipeline did for every enlargement until 2026-11-23, and still does above 2x): one
  x4 pass conditioned on the source resized to target / 4;
- ``resize``: no pass, a Lanczos resize of the source (what ``upscale`` does for a target no larger
  than the source);
- ``over``: one x4 pass from the source as it is (to 4x the source), then a Lanczos resize down to
  the target: no detail thrown away, but a pass over (4 / scale)^2 times the target's pixels.

    .venv/bin/python benchmarks/small_enlargement.py --scales 1.25 1.5 2 3 4 --json benchmarks/results/small_enlargement.json
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
import PIL.Image  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pass_plan import upscale_with_plan  # noqa: E402
from upscale_quality import psnr_ssim  # noqa: E402

from anysize import AnySizePipeline  # noqa: E402
from anysize.pipeline import upscale_passes  # noqa: E402
from anysize.train.scenes import render, sample_scene  # noqa: E402

METHODS = ("pass", "resize", "over")


def enlarge(pipe: AnySizePipeline, method: str, low: PIL.Image.Image, target: tuple[int, int], caption: str,
            steps: int, seed: int) -> np.ndarray:
    kw = dict(num_inference_steps=steps, generator=torch.Generator().manual_seed(seed))
    if method == "resize":
        return np.asarray(low.resize(target, PIL.Image.Resampling.LANCZOS))
    if method == "pass":  # one pass whatever the scale, as the pipeline planned before
        return np.asarray(upscale_with_plan(pipe, upscale_passes, low, *target, caption, **kw).images[0])
    big = pipe.upscale(low, 4 * low.width, 4 * low.height, caption, **kw).images[0]
    return np.asarray(big.resize(target, PIL.Image.Resampling.LANCZOS))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", type=int, default=64, help="side of the square source render (px)")
    p.add_argument("--scales", type=float, nargs="+", default=[1.25, 1.5, 2.0])
    p.add_argument("--scenes", type=int, default=8)
    p.add_argument("--scene-seed", type=int, default=100)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    pipe = AnySizePipeline.from_pretrained()
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for scale in args.scales:
        side = round(args.source * scale)
        for i in range(args.scenes):
            scene = sample_scene(args.scene_seed + i, 1.0)
            low = PIL.Image.fromarray(render(scene, args.source, args.source))
            truth = render(scene, side, side)
            for method in METHODS:
                start = time.perf_counter()
                out = enlarge(pipe, method, low, (side, side), scene.caption, args.steps, i)
                seconds = time.perf_counter() - start
                psnr, ssim = psnr_ssim(out, truth)
                rows.append({"scale": scale, "target": side, "scene": args.scene_seed + i, "method": method,
                             "psnr": psnr, "ssim": ssim, "seconds": seconds})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(f"| scale | target | {' | '.join(f'{m} PSNR / SSIM / s' for m in METHODS)} |")
    print("|---|---|" + "---|" * len(METHODS))
    for scale in args.scales:
        sel = [r for r in rows if r["scale"] == scale]
        cells = []
        for m in METHODS:
            mr = [r for r in sel if r["method"] == m]
            cells.append(f"{np.mean([r['psnr'] for r in mr]):.2f} / {np.mean([r['ssim'] for r in mr]):.3f} / "
                         f"{np.mean([r['seconds'] for r in mr]):.2f}")
        print(f"| {scale:g} | {sel[0]['target']}^2 | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
