"""The default model's ControlNet: do the generated objects take the shapes and places of the condition?

Each layout is a scene of ``anysize.train.scenes`` (1-4 objects, a background, its caption) laid out
at the output's ratio; its condition is the objects' silhouettes (``render_mask``, white on black) at
the output size. The same caption, seed and size are generated twice: with the shipped ControlNet
(``--controlnet default``) steering the base model, and without it (the baseline: where the model
puts the objects from the caption alone). Scores, from ``anysize.train.evaluate.detect_objects``:

- *mask IoU*: the generated objects' pixels (saturated, as the detector reads them) against the
  condition's silhouettes;
- *objects in place*: a requested object counts when a detection of its shape and colour has its
  centre inside the object's bounding square (the boxes the condition draws);
- *exact*: the caption's objects, no more and no fewer (shape and colour).

    .venv/bin/python benchmarks/controlnet.py --layouts 40 --jsonl benchmarks/results/controlnet.jsonl \\
        --table benchmarks/results/controlnet.md

Sizes: by default stage 1 alone, at the default model's bucket of each ratio (4:1 and 1:4: the 2:1
bucket's image stretched 2x, a resize; its condition is squeezed into the bucket the same way);
``--full WxH`` runs both stages (with the default x4 upscaler, which keeps stage 1's layout; with
``--img2img``, img2img passes of the base model, each tile steered by its crop of the condition).
Each row is appended to ``--jsonl`` as it comes and a rerun skips the rows there.

``--gligen DIR``: a GLIGEN base (e.g. ``anysize train gligen`` of the default base) grounding each object's
phrase to its bounding square (``anysize.train.trainer.grounding``) instead of the ControlNet, against the
shipped base without grounding; the same scores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("MKL_CBWR", "AVX2,STRICT")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import torch  # noqa: E402

from anysize import AnySizePipeline  # noqa: E402
from anysize.train.evaluate import SAT_MIN, VALUE_MIN, _hsv, detect_objects, score  # noqa: E402
from anysize.train.scenes import object_boxes, render_mask, sample_scene  # noqa: E402
from anysize.train.trainer import grounding  # noqa: E402
from results_log import (STAGE1_SIZES, add_layout_arguments, append, done_keys, ratio_label,  # noqa: E402
                         run_and_tabulate, size_order)

METHODS = ("controlnet", "none")


def foreground(image: np.ndarray) -> np.ndarray:
    """The pixels the detector reads as object (saturated and not dark)."""
    _, sat, val = _hsv(image)
    return (sat >= SAT_MIN) & (val >= VALUE_MIN)


def measure(image: np.ndarray, scene, condition: np.ndarray) -> dict:
    h, w = image.shape[:2]
    found = detect_objects(image)
    fg, cond = foreground(image), condition[..., 0] > 127
    placed = 0
    for obj, (top, left, bottom, right) in zip(scene.objects, object_boxes(scene, w, h)):
        placed += any(d.key == obj.key and left <= d.cx * w <= right and top <= d.cy * h <= bottom for d in found)
    return {"iou": round(float((fg & cond).sum() / max(1, (fg | cond).sum())), 4), "placed": placed,
            "objects": len(scene.objects), "exact": bool(score(found, scene)["exact"])}


def methods(args) -> tuple[str, str]:
    return ("gligen", "none") if args.gligen else METHODS


def run(args) -> None:
    loaded = AnySizePipeline.from_pretrained(controlnet=None if args.gligen else "default")
    upscaler = None if args.img2img else loaded.upscaler
    if args.gligen:
        grounded = AnySizePipeline.from_pretrained(args.gligen, img2img=True)
        pipe = AnySizePipeline(grounded.base, upscaler)
    else:
        pipe = AnySizePipeline(loaded.base, upscaler, controlnet=loaded.controlnets)
    plain = AnySizePipeline(loaded.base, upscaler)
    for p in (pipe, plain):
        p.set_progress_bar_config(disable=True)
    done = done_keys(args.jsonl, ("ratio", "size", "layout", "method"))
    sizes = [tuple(map(int, args.full.split("x")))] if args.full else [STAGE1_SIZES[r] for r in args.ratios]
    for width, height in sizes:
        ratio, size = ratio_label(width, height), f"{width}x{height}"
        for i in range(args.layouts):
            scene = sample_scene(args.seed + i, height / width)
            condition = render_mask(scene, width, height)
            for method in methods(args):
                if (ratio, size, i, method) in done:
                    continue
                start = time.perf_counter()
                extra = {"control_image": PIL.Image.fromarray(condition)} if method == "controlnet" else {}
                if method == "gligen":
                    objects = grounding(scene, width, height)
                    extra = {"gligen_phrases": [p for _, p in objects], "gligen_boxes": [b for b, _ in objects],
                             "gligen_scheduled_sampling_beta": args.gligen_beta}
                image = (plain if method == "none" else pipe)(
                    scene.caption, width=width, height=height, num_inference_steps=args.steps,
                    upscale_inference_steps=args.upscale_steps, guidance_scale=4, upscale_guidance_scale=1,
                    strength=args.strength, generator=torch.Generator().manual_seed(args.seed + i), **extra).images[0]
                row = {"ratio": ratio, "size": size, "layout": i, "method": method,
                       "seconds": round(time.perf_counter() - start, 2),
                       **measure(np.asarray(image), scene, condition)}
                append(args.jsonl, row)
                if args.samples is not None and i < 4:
                    args.samples.mkdir(parents=True, exist_ok=True)
                    image.save(args.samples / f"{ratio.replace(':', 'x')}_{size}_{i}_{method}.png")
                    PIL.Image.fromarray(condition).save(args.samples / f"{ratio.replace(':', 'x')}_{size}_{i}_mask.png")


def table(jsonl: Path) -> str:
    rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    METHODS = ("gligen", "none") if any(r["method"] == "gligen" for r in rows) else ("controlnet", "none")  # noqa: N806
    name = "GLIGEN" if METHODS[0] == "gligen" else "ControlNet"

    keys = sorted({(r["ratio"], r["size"]) for r in rows}, key=size_order)
    lines = [f"| W:H | size | layouts | mask IoU: {name} | none | objects in place: {name} | none | "
             f"exact: {name} | none | s / image: {name} | none |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for ratio, size in keys:
        by = {m: [r for r in rows if (r["ratio"], r["size"], r["method"]) == (ratio, size, m)] for m in METHODS}
        n = min(len(by[m]) for m in METHODS)
        if n == 0:
            continue
        cells = []
        for metric in ("iou", "placed", "exact", "seconds"):
            for m in METHODS:
                rs = by[m][:n]
                if metric == "placed":
                    cells.append(f"{sum(r['placed'] for r in rs) / sum(r['objects'] for r in rs):.0%}")
                elif metric == "exact":
                    cells.append(f"{sum(r['exact'] for r in rs) / n:.0%}")
                elif metric == "iou":
                    cells.append(f"{np.mean([r['iou'] for r in rs]):.2f}")
                else:
                    cells.append(f"{np.mean([r['seconds'] for r in rs]):.1f}")
        lines.append(f"| {ratio} | {size} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def figure(samples: Path, sizes: list[str], out: Path) -> None:
    """For each size, layout 0: the condition, the image without the ControlNet, the image with it."""
    tiles = []
    for size in sizes:
        w, h = (int(v) for v in size.split("x"))
        cw, ch = (256, round(256 * h / w)) if w >= h else (round(256 * w / h), 256)
        stem = f"{ratio_label(w, h).replace(':', 'x')}_{size}_0"
        row = [PIL.Image.open(samples / f"{stem}_{k}.png").convert("RGB").resize((cw, ch), PIL.Image.Resampling.NEAREST)
               for k in ("mask", "none", "controlnet")]
        tiles.append(row)
    width = max(sum(t.width for t in row) + 16 for row in tiles)
    canvas = PIL.Image.new("RGB", (width, sum(row[0].height + 8 for row in tiles) - 8), "white")
    y = 0
    for row in tiles:
        x = 0
        for t in row:
            canvas.paste(t, (x, y))
            x += t.width + 8
        y += row[0].height + 8
    canvas.save(out, quality=90)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_layout_arguments(p, layouts=40, seed=5000)
    p.add_argument("--img2img", action="store_true",
                   help="with --full: stage 2 img2img with the base model, every pass steered tile by tile (default: "
                        "the x4 upscaler, which the ControlNet does not steer: the layout is stage 1's)")
    p.add_argument("--strength", type=float, default=0.3, help="img2img passes")
    p.add_argument("--gligen", type=Path, default=None, metavar="DIR",
                   help="a GLIGEN base: ground each object's phrase to its box instead of the ControlNet")
    p.add_argument("--gligen-beta", type=float, default=0.3, help="GLIGEN's scheduled sampling (default 0.3)")
    p.add_argument("--figure", type=Path, default=None, metavar="JPG",
                   help="with --samples: layout 0 of every size in the samples, condition / none / ControlNet")
    p.add_argument("--figure-sizes", nargs="+", default=None, metavar="WxH")
    args = p.parse_args()
    run_and_tabulate(args, run, table)
    if args.figure is not None and args.samples is not None:
        figure(args.samples, args.figure_sizes or [f"{w}x{h}" for w, h in STAGE1_SIZES.values()], args.figure)


if __name__ == "__main__":
    main()
