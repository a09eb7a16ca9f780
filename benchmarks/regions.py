"""Region prompts on the default model: are the requested objects drawn in their boxes?

Each layout puts two objects of different colours and shapes (``anysize.train.scenes``' vocabulary) in
two boxes: the two halves of the canvas along its long axis, in a random order. The global prompt
names both ("a large red circle and a large blue square on grass", in a random order too, so it does
not say where); each region prompt names its own object and the background. The same layout, seed
and global prompt are generated twice: with the regions, and without them (the baseline: where the
model puts each object on its own). ``anysize.train.evaluate.detect_objects`` finds the objects; an
object counts as *placed* when a detection of its shape and colour has its centre inside its box, and
a layout is *exact* when both are placed and nothing else is detected.

    .venv/bin/python benchmarks/regions.py --layouts 100 --jsonl benchmarks/results/regions.jsonl \\
        --table benchmarks/results/regions.md

Sizes: by default stage 1 alone, at the default model's bucket of each ratio (4:1 and 1:4: the 2:1
bucket's image stretched 2x, a resize); ``--full WxH`` runs both stages at that size instead. Each row is appended to ``--jsonl`` as it comes and a
rerun skips the rows there.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("MKL_CBWR", "AVX2,STRICT")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from anysize import AnySizePipeline  # noqa: E402
from anysize.train.evaluate import detect_objects  # noqa: E402
from anysize.train.scenes import BACKGROUND_PHRASES, COLORS  # noqa: E402
from results_log import (STAGE1_SIZES, add_layout_arguments, append, done_keys, ratio_label,  # noqa: E402
                         read_rows, run_and_tabulate, size_order)

SHAPES = ("circle", "square", "triangle")  # the shapes the default model draws most reliably at 64 px


def layout(seed: int, aspect: float) -> dict:
    """Two objects (distinct colour and shape) in the two halves along the long axis, a background."""
    rng = np.random.default_rng(seed)
    colors = rng.choice(list(COLORS), 2, replace=False)
    shapes = rng.choice(SHAPES, 2, replace=False)
    background = str(rng.choice(["grass", "sand", "water"]))
    halves = [(0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)] if aspect <= 1 else [(0.0, 0.0, 1.0, 0.5), (0.0, 0.5, 1.0, 1.0)]
    objects = [{"shape": str(s), "color": str(c), "box": b} for s, c, b in zip(shapes, colors, halves)]
    said = [objects[i] for i in rng.permutation(2)]  # the global prompt's order: not the layout's
    phrase = lambda o: f"a large {o['color']} {o['shape']}"  # noqa: E731
    where = BACKGROUND_PHRASES[background]
    return {"objects": objects, "prompt": f"{phrase(said[0])} and {phrase(said[1])} {where}",
            "regions": [(o["box"], f"{phrase(o)} {where}") for o in objects]}


def score(image: np.ndarray, objects: list[dict]) -> dict:
    found = detect_objects(image)
    placed = []
    for o in objects:
        x0, y0, x1, y1 = o["box"]
        placed.append(any(d.shape == o["shape"] and d.color == o["color"] and x0 <= d.cx <= x1 and y0 <= d.cy <= y1
                          for d in found))
    matched = [any(d.shape == o["shape"] and d.color == o["color"] for d in found) for o in objects]
    return {"placed": sum(placed), "found": sum(matched), "detections": len(found),
            "exact": bool(all(placed) and len(found) == len(objects))}


def run(args) -> None:
    pipe = AnySizePipeline.from_pretrained()
    pipe.set_progress_bar_config(disable=True)
    done = done_keys(args.jsonl, ("ratio", "size", "layout", "method"))
    sizes = [tuple(map(int, args.full.split("x")))] if args.full else [STAGE1_SIZES[r] for r in args.ratios]
    for width, height in sizes:
        aspect, ratio, size = height / width, ratio_label(width, height), f"{width}x{height}"
        for i in range(args.layouts):
            spec = layout(args.seed + i, aspect)
            for method in ("regions", "none"):
                if (ratio, size, i, method) in done:
                    continue
                start = time.perf_counter()
                image = pipe(spec["prompt"], width=width, height=height, num_inference_steps=args.steps,
                             upscale_inference_steps=args.upscale_steps, guidance_scale=4, upscale_guidance_scale=1,
                             regions=spec["regions"] if method == "regions" else None,
                             generator=torch.Generator().manual_seed(args.seed + i)).images[0]
                row = {"ratio": ratio, "size": size, "layout": i, "method": method,
                       "seconds": round(time.perf_counter() - start, 2), **score(np.asarray(image), spec["objects"])}
                append(args.jsonl, row)
                if args.samples is not None and i < 4:
                    args.samples.mkdir(parents=True, exist_ok=True)
                    image.save(args.samples / f"{ratio.replace(':', 'x')}_{size}_{i}_{method}.png")


def table(jsonl: Path) -> str:
    rows = read_rows(jsonl)
    keys = sorted({(r["ratio"], r["size"]) for r in rows}, key=size_order)
    lines = ["| W:H | size | layouts | objects in their box: regions | no regions | exact layout: regions | "
             "no regions |", "|---|---|---|---|---|---|---|"]
    for ratio, size in keys:
        by = {m: [r for r in rows if (r["ratio"], r["size"], r["method"]) == (ratio, size, m)] for m in ("regions", "none")}
        n = min(len(by["regions"]), len(by["none"]))
        if n == 0:
            continue
        cells = []
        for metric in ("placed", "exact"):
            for m in ("regions", "none"):
                values = [r[metric] for r in by[m][:n]]
                cells.append(f"{sum(values) / (n * (2 if metric == 'placed' else 1)):.0%}")
        lines.append(f"| {ratio} | {size} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def figure(samples: Path, size: str, seed: int, out: Path, n: int = 3) -> None:
    """The first ``n`` layouts at ``size`` from ``samples``: without regions (left) and with (right),
    the requested boxes drawn in white with their object's name."""
    import PIL.Image
    import PIL.ImageDraw

    w, h = (int(v) for v in size.split("x"))
    cw, ch = 512, round(512 * h / w)
    canvas = PIL.Image.new("RGB", (2 * cw + 8, n * (ch + 8) - 8), "white")
    for i in range(n):
        spec = layout(seed + i, h / w)
        for k, method in enumerate(("none", "regions")):
            name = samples / f"{ratio_label(w, h).replace(':', 'x')}_{size}_{i}_{method}.png"
            image = PIL.Image.open(name).convert("RGB").resize((cw, ch), PIL.Image.Resampling.LANCZOS)
            draw = PIL.ImageDraw.Draw(image)
            for o in spec["objects"]:
                x0, y0, x1, y1 = o["box"]
                draw.rectangle([x0 * cw + 1, y0 * ch + 1, x1 * cw - 2, y1 * ch - 2], outline="white")
                draw.text((x0 * cw + 6, y0 * ch + 4), f"{o['color']} {o['shape']}", fill="white")
            canvas.paste(image, (k * (cw + 8), i * (ch + 8)))
    canvas.save(out, quality=88)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_layout_arguments(p, layouts=100, seed=1000)
    p.add_argument("--figure", type=Path, default=None,
                   help="with --samples and --full: the first 3 layouts without and with regions (JPEG)")
    args = p.parse_args()
    run_and_tabulate(args, run, table)
    if args.figure is not None and args.samples is not None and args.full:
        figure(args.samples, args.full, args.seed, args.figure)


if __name__ == "__main__":
    main()
