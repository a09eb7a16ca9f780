"""Stage-2 pass plan: where the ratio that is not a power of 4 goes, first pass or last pass.

From a 64x64 render of a scene (standing in for a stage-1 image) to 512^2 (x8) and 2048^2 (x32), the
default x4 upscaler runs two plans, same seed:

- ``first`` (anysize's :func:`anysize.pipeline.upscale_passes`): the first, smallest pass takes the
  odd ratio, its conditioning image being the 64^2 input enlarged 2x; 64 -> 512 is one pass, 64 ->
  2048 is 512 then 2048.
- ``last`` (the plan before 2026-11-23): x4 passes from the input, the last pass conditioned on the
  previous output shrunk; 64 -> 512 is 256 then 512 (256 shrunk to 128), 64 -> 2048 is 256, 1024,
  then 2048 (1024 shrunk to 512): one more large pass.

Scores against the scene rendered at the target size (the exact image, as in upscale_quality.py):
PSNR and SSIM, and wall seconds of ``pipe.upscale``.

    .venv/bin/python benchmarks/pass_plan.py --json benchmarks/results/pass_plan.json --crops docs/pass_plan.png
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("MKL_CBWR", "AVX2,STRICT")

import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from upscale_quality import crop_sheet, psnr_ssim  # noqa: E402

from anysize import AnySizePipeline, Request, pipeline  # noqa: E402
from anysize.train.scenes import render, sample_scene  # noqa: E402

SOURCE = 64


def last_pass_plan(source, target, factor, *, stretch=1.5):
    """The earlier rule: x``factor`` passes from ``source``, the last reaching up to ``factor * stretch``."""
    (sw, sh), (tw, th) = source, target
    scale = math.sqrt(tw * th / (sw * sh))
    n = max(1, math.ceil(math.log(scale / stretch) / math.log(factor) - 1e-9))
    inter = [(round(tw / scale * factor**k), round(th / scale * factor**k)) for k in range(1, n)]
    return (*inter, target)


PLANS = {"first": pipeline.upscale_passes, "last": last_pass_plan}


def upscale_with_plan(pipe: AnySizePipeline, plan, image, width: int, height: int, prompt: str, *,
                      num_inference_steps: int, generator: torch.Generator):
    """``pipe.upscale`` with its pass sizes from ``plan(source, target, factor)`` instead of
    :func:`anysize.plan.stage2_passes` (which also leaves enlargements of 2x or less to a resize):
    the request is planned with those passes (``plan_run(..., passes=)``), then run."""
    source = pipeline.to_pil(image)
    request = Request(prompt, width, height, "upscale", num_inference_steps=None,
                      upscale_inference_steps=num_inference_steps, guidance_scale=1.0, source_size=source.size)
    passes = plan(source.size, (width, height), pipe.stage2_factor)
    return pipe.run(pipe.plan_run(request, passes=passes), image=source, generator=generator)


def sheet_row(target: int, scene: int, images: list[tuple[str, np.ndarray]], side: int = 256):
    """One row of the picture: each image whole, shrunk to ``side`` px (shapes and colours are what
    the plans change)."""
    small = [(lab, np.asarray(PIL.Image.fromarray(im).resize((side, side), PIL.Image.Resampling.LANCZOS)))
             for lab, im in images]
    return f"{target}^2 from {SOURCE}^2, scene {scene} (whole image at {side}^2)", small


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--scenes", type=int, nargs="+", default=[8, 2], help="scenes per target")
    parser.add_argument("--steps", type=int, nargs="+", default=[20, 10], help="upscale steps per target")
    parser.add_argument("--scene-seed", type=int, default=100)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--crops", type=Path, default=None, help="PNG: a crop of each plan and the truth")
    args = parser.parse_args()
    if not len(args.targets) == len(args.scenes) == len(args.steps):
        parser.error("--targets, --scenes and --steps need one value per target")
    pipe = AnySizePipeline.from_pretrained()
    pipe.set_progress_bar_config(disable=True)
    rows, sheet = [], []
    for target, scenes, steps in zip(args.targets, args.scenes, args.steps):
        for i in range(scenes):
            scene = sample_scene(args.scene_seed + i, 1.0)
            low = PIL.Image.fromarray(render(scene, SOURCE, SOURCE))
            truth = render(scene, target, target)
            crops = [("truth", truth)]
            for name, plan in PLANS.items():
                start = time.perf_counter()
                out = upscale_with_plan(pipe, plan, low, target, target, scene.caption, num_inference_steps=steps,
                                        generator=torch.Generator().manual_seed(i)).images[0]
                seconds = time.perf_counter() - start
                psnr, ssim = psnr_ssim(np.asarray(out), truth)
                rows.append({"target": target, "scene": args.scene_seed + i, "plan": name, "steps": steps,
                             "passes": plan((SOURCE, SOURCE), (target, target), 4), "psnr": psnr, "ssim": ssim,
                             "seconds": seconds})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
                n = len(rows[-1]["passes"])
                crops.append((f"{name}: {n} pass{'es' if n > 1 else ''}", np.asarray(out)))
            if i == 0:
                sheet.append(sheet_row(target, args.scene_seed, crops))
    print("| target | plan | passes | PSNR dB | SSIM | s per image |\n|---|---|---|---|---|---|")
    for target in args.targets:
        for name in PLANS:
            sel = [r for r in rows if r["target"] == target and r["plan"] == name]
            print(f"| {target}^2 | {name} | {' -> '.join(str(p[0]) for p in sel[0]['passes'])} | "
                  f"{np.mean([r['psnr'] for r in sel]):.2f} | {np.mean([r['ssim'] for r in sel]):.3f} | "
                  f"{np.mean([r['seconds'] for r in sel]):.1f} |")
    if args.json:
        args.json.write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1) + "\n")
    if args.crops:
        crop_sheet(sheet, zoom=1).save(args.crops)
    return 0


if __name__ == "__main__":
    sys.exit(main())
