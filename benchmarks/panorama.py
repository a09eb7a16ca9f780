"""Stage 1 beyond the buckets: how to generate a 3:1 banner or a 1:4 scroll with a bucketed base model.

The ARAD buckets span H/W 0.5 to 2.0. A request outside them (1536x640 is 2.4:1) needs stage 1 to do
something else; this script measures four answers on the same scenes, from the same seeds, with the
shipped default model, at the size the pipeline picks for stage 1 (the extreme bucket's shorter side,
the request's ratio):

- ``tiled``: the tiled sampler at the request's ratio (FSTD tiles of the model's native size), the
  panorama mode of MultiDiffusion-style tools;
- ``direct``: one untiled UNet call per step at the request's ratio;
- ``stretch``: the nearest bucket, resized to the request's ratio (objects are distorted by the ratio
  of the two ratios);
- ``area``: untiled at the request's ratio but at the buckets' area (``arad_buckets`` for that one
  ratio: a shorter side below the buckets'), resized up to the stage-1 size.

Each image is scored by ``anysize.train.evaluate`` against the scene laid out for the request's ratio. A
``round_trip`` row (the true scene through the VAE) is the reference, as in ``composition.py``. The
figures hold for the default model on the scene domain; a Stable Diffusion base is not measured here.

    .venv/bin/python benchmarks/panorama.py --prompts 100 --ratios 2.4 3 4 --methods tiled direct stretch \
        --json benchmarks/results/panorama.json
    .venv/bin/python benchmarks/panorama.py --prompts 100 --ratios 2.4 3 4 --methods area --merge \
        --json benchmarks/results/panorama.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("MKL_CBWR", "AVX2,STRICT")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from anysize import AnySizePipeline  # noqa: E402
from anysize.buckets import arad_buckets, nearest_bucket  # noqa: E402
from anysize.train.evaluate import aggregate, evaluate_image  # noqa: E402
from anysize.train.scenes import render, sample_scene  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from composition import vae_round_trip, write_json  # noqa: E402

# width / height of the requests: all outside the buckets' 2:1 (0.5 to 2.0 in H/W), wide and tall
WIDE = (2.4, 3.0, 4.0, 6.0)
METHODS = ("tiled", "direct", "stretch", "area")
METRICS = ("exact", "color_exact", "count_exact", "recall", "duplicate_rate", "cut_rate")


def stage1(pipe: AnySizePipeline, caption: str, seed: int, size: tuple[int, int], tiling: str, steps: int,
           guidance: float) -> np.ndarray:
    """The pipeline's stage 1 alone: a request of exactly the stage-1 size has no upscaling pass."""
    # at the request's ratio whatever the pipeline's default for ratios beyond the buckets ("stretch")
    panorama = "tiled" if tiling == "fstd" else "direct"
    out = pipe(caption, width=size[0], height=size[1], generator=torch.Generator().manual_seed(seed),
               num_inference_steps=steps, guidance_scale=guidance, tiling=tiling, output_type="np",
               panorama=panorama)
    return np.clip(np.rint(out.images[0] * 255), 0, 255).astype(np.uint8)


def run(args) -> dict:
    pipe = AnySizePipeline.from_pretrained(args.model) if args.model else AnySizePipeline.from_pretrained()
    pipe.set_progress_bar_config(disable=True)
    results: dict = {"config": dict(vars(args)), "ratios": {}}
    for w_over_h in args.ratios:
        for wide in (True, False):
            request = (round(1024 * w_over_h), 1024) if wide else (1024, round(1024 * w_over_h))
            plan = pipe.plan(*request, "direct")  # the size panorama mode samples at
            if not plan.panorama:
                raise SystemExit(f"{request}: inside the buckets, not a panorama request")
            size = plan.base
            bucket = nearest_bucket(*size, pipe.buckets)
            area = (pipe.base_tile * pipe.base_factor) ** 2  # the area the buckets were made for
            native = arad_buckets(area, pipe.granularity, ratios=(size[1] / size[0],))[0]
            scenes = [sample_scene(10_000 + i, size[1] / size[0]) for i in range(args.prompts)]
            truth = vae_round_trip(pipe.base.vae, np.stack([render(s, *size) for s in scenes]))
            row = {"request": list(request), "size": list(size), "bucket": list(bucket), "native": list(native),
                   "round_trip": aggregate([evaluate_image(img, s) for img, s in zip(truth, scenes)])}
            for method in args.methods:
                t0 = time.perf_counter()
                scores = []
                for i, scene in enumerate(scenes):
                    if method in ("stretch", "area"):
                        at = bucket if method == "stretch" else native
                        img = stage1(pipe, scene.caption, i, at, "none", args.steps, args.guidance)
                        img = np.array(Image.fromarray(img).resize(size, Image.Resampling.LANCZOS))
                    else:
                        img = stage1(pipe, scene.caption, i, size, "fstd" if method == "tiled" else "none",
                                     args.steps, args.guidance)
                    scores.append(evaluate_image(img, scene))
                    if args.samples and i < args.sample_count:
                        Image.fromarray(img).save(os.path.join(args.samples, f"{size[0]}x{size[1]}_{method}_{i}.png"))
                row[method] = aggregate(scores)
                row[method]["seconds"] = time.perf_counter() - t0
            key = f"{size[0]}x{size[1]}"
            results["ratios"][key] = row
            print(f"{key} (request {request[0]}x{request[1]}, bucket {bucket[0]}x{bucket[1]}): exact "
                  + " ".join(f"{m} {row[m]['exact']:.2f}" for m in args.methods)
                  + f" round trip {row['round_trip']['exact']:.2f} | duplicates "
                  + " ".join(f"{m} {row[m]['duplicate_rate']:.2f}" for m in args.methods), file=sys.stderr, flush=True)
    return results


def table(results: dict) -> str:
    methods = [m for m in METHODS if m in next(iter(results["ratios"].values()))]
    head = "| stage-1 size | " + " | ".join(f"{m} {' / '.join(methods)}" for m in METRICS) + " | true scene via VAE |"
    lines = [head, "|" + "---|" * (2 + len(METRICS))]
    for key, row in results["ratios"].items():
        cells = [" / ".join(f"{row[k][m]:.2f}" for k in methods) for m in METRICS]
        lines.append(f"| {key} | " + " | ".join(cells) + f" | {row['round_trip']['exact']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="diffusers dir of a base model (default: the embedded default model)")
    p.add_argument("--prompts", type=int, default=100)
    p.add_argument("--ratios", type=float, nargs="+", default=list(WIDE), help="W/H of the wide requests "
                   "(each also measured tall)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--sample-count", type=int, default=2, help="images per size and method saved to --samples")
    p.add_argument("--samples", help="a folder for the first images of each size and method")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--merge", action="store_true", help="add this run's methods to the rows already in --json")
    args = p.parse_args(argv)
    if args.samples:
        os.makedirs(args.samples, exist_ok=True)
    results = run(args)
    if args.merge and args.json and os.path.exists(args.json):
        with open(args.json) as f:
            old = json.load(f)
        for key, row in results["ratios"].items():
            old["ratios"].setdefault(key, {}).update(row)
        old.setdefault("merged_configs", []).append(results["config"])
        results = old
    print(table(results))
    if args.json:
        write_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
