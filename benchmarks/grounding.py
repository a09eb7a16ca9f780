"""Spatial control on the default model: are the requested objects drawn in their boxes?

Each layout is a scene of ``anysize.train.scenes`` (1-4 objects, a background, its caption) laid out
at the output's ratio: the request is every object's phrase ("a big striped red circle") and its box
(the object's bounding square, ``anysize.train.trainer.grounding``). The same caption, seed and size
are generated once per method:

- ``controlnet``: the shipped ControlNet (``--controlnet default``) on the objects' silhouettes
  (``render_mask``, white on black) at the output size;
- ``regions``: one region prompt per object, its box and its phrase with the background's
  ("a big striped red circle on grass");
- ``gligen`` (with ``--gligen DIR``, a GLIGEN base such as ``anysize train gligen`` of the default base):
  every phrase grounded to its box;
- ``none``: the caption alone, the baseline (where the model puts the objects by itself).

Scores, from ``anysize.train.evaluate.detect_objects``:

- *in box*: a requested object counts when a detection of its shape and colour, not already given to
  another object, has a bounding square of IoU >= 0.5 with the requested box;
- *centre in box*: the looser test, a detection of its shape and colour centred inside the box;
- *mask IoU*: the generated objects' pixels (saturated, as the detector reads them) against the
  silhouettes;
- *exact*: the caption's objects, no more and no fewer (shape and colour).

The same scores on the rendered scene itself (``truth``: no model) say what the detector can find.

    .venv/bin/python benchmarks/grounding.py --layouts 100 --jsonl benchmarks/results/grounding.jsonl \\
        --table benchmarks/results/grounding.md
    .venv/bin/python benchmarks/grounding.py --layouts 10 --full 2048x1024 --jsonl benchmarks/results/grounding.jsonl \\
        --table benchmarks/results/grounding.md

Sizes: by default stage 1 alone, at the default model's bucket of each ratio (4:1 and 1:4: the 2:1
bucket's image stretched 2x, a resize; the silhouettes are squeezed into the bucket the same way);
``--full WxH`` runs both stages (the default x4 upscaler, which keeps stage 1's layout; with
``--img2img``, img2img passes of the base model, each tile steered by its crop of the condition and of
the regions). Each row is appended to ``--jsonl`` as it comes and a rerun skips the rows there.
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
import PIL.Image  # noqa: E402
import PIL.ImageDraw  # noqa: E402
import torch  # noqa: E402

from anysize import AnySizePipeline  # noqa: E402
from anysize.train.evaluate import SAT_MIN, VALUE_MIN, _hsv, detect_objects, score  # noqa: E402
from anysize.train.scenes import BACKGROUND_PHRASES, object_boxes, render, render_mask, sample_scene  # noqa: E402
from anysize.train.trainer import grounding  # noqa: E402
from results_log import (STAGE1_SIZES, add_layout_arguments, append, ratio_label,  # noqa: E402
                         read_rows, run_and_tabulate, size_order)

METHODS = ("truth", "controlnet", "regions", "gligen", "none")
IOU_MIN = 0.5


def foreground(image: np.ndarray) -> np.ndarray:
    """The pixels the detector reads as object (saturated and not dark)."""
    _, sat, val = _hsv(image)
    return (sat >= SAT_MIN) & (val >= VALUE_MIN)


def box_iou(a, b) -> float:
    """IoU of two ``(top, left, bottom, right)`` boxes."""
    h = min(a[2], b[2]) - max(a[0], b[0])
    w = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(0.0, h) * max(0.0, w)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def in_box(requested: list[tuple[tuple, tuple]], found, width: int, height: int) -> int:
    """How many ``(key, (top, left, bottom, right))`` requests a detection of the same key answers with
    a bounding square of IoU >= 0.5; each detection answers one request (best IoU first)."""
    s = min(width, height)
    boxes = [(d.cy * height - d.r * s, d.cx * width - d.r * s, d.cy * height + d.r * s, d.cx * width + d.r * s)
             for d in found]
    pairs = sorted(((box_iou(box, boxes[j]), i, j) for i, (key, box) in enumerate(requested)
                    for j, d in enumerate(found) if d.key == key), reverse=True)
    used_r, used_d = set(), set()
    for iou, i, j in pairs:
        if iou >= IOU_MIN and i not in used_r and j not in used_d:
            used_r.add(i)
            used_d.add(j)
    return len(used_r)


def measure(image: np.ndarray, scene, condition: np.ndarray) -> dict:
    h, w = image.shape[:2]
    found = detect_objects(image)
    boxes = object_boxes(scene, w, h)
    fg, cond = foreground(image), condition[..., 0] > 127
    centred = sum(any(d.key == o.key and left <= d.cx * w <= right and top <= d.cy * h <= bottom for d in found)
                  for o, (top, left, bottom, right) in zip(scene.objects, boxes))
    return {"in_box": in_box([(o.key, b) for o, b in zip(scene.objects, boxes)], found, w, h), "centred": centred,
            "objects": len(scene.objects), "iou": round(float((fg & cond).sum() / max(1, (fg | cond).sum())), 4),
            "exact": bool(score(found, scene)["exact"])}


def controls(method: str, scene, width: int, height: int, condition: np.ndarray, args) -> dict:
    """The pipeline arguments of ``method`` for ``scene``."""
    objects = grounding(scene, width, height)
    if method == "controlnet":
        return {"control_image": PIL.Image.fromarray(condition)}
    if method == "regions":
        where = BACKGROUND_PHRASES[scene.background]
        return {"regions": [(box, f"{phrase} {where}") for box, phrase in objects]}
    if method == "gligen":
        return {"gligen_phrases": [p for _, p in objects], "gligen_boxes": [b for b, _ in objects],
                "gligen_scheduled_sampling_beta": args.gligen_beta}
    return {}


def pipelines(args) -> dict:
    loaded = AnySizePipeline.from_pretrained(controlnet="default" if "controlnet" in args.methods else None)
    upscaler = None if args.img2img else loaded.upscaler
    plain = AnySizePipeline(loaded.base, upscaler)
    pipes = {m: plain for m in ("regions", "none")}
    if "controlnet" in args.methods:
        pipes["controlnet"] = AnySizePipeline(loaded.base, upscaler, controlnet=loaded.controlnets)
    if "gligen" in args.methods:
        pipes["gligen"] = AnySizePipeline(AnySizePipeline.from_pretrained(args.gligen, img2img=True).base, upscaler)
    for p in pipes.values():
        p.set_progress_bar_config(disable=True)
    return pipes


def run(args) -> None:
    if "gligen" in args.methods and args.gligen is None:
        raise SystemExit("--methods gligen: needs --gligen DIR (a GLIGEN base)")
    pipes = pipelines(args)
    done = {key(r) for r in read_rows(args.jsonl)}
    sizes = [tuple(map(int, args.full.split("x")))] if args.full else [STAGE1_SIZES[r] for r in args.ratios]
    for width, height in sizes:
        ratio, size = ratio_label(width, height), f"{width}x{height}"
        stem = f"{ratio.replace(':', 'x')}_{size}"
        for i in range(args.layouts):
            scene = sample_scene(args.seed + i, height / width)
            condition = render_mask(scene, width, height)
            for method in ("truth", *args.methods):
                mode = "stretch" if method == "truth" else args.panorama  # the truth: one row whatever the mode
                if (ratio, size, i, method, mode) in done:
                    continue
                start = time.perf_counter()
                if method == "truth":
                    image = PIL.Image.fromarray(render(scene, width, height))
                else:
                    image = pipes[method](
                        scene.caption, width=width, height=height, num_inference_steps=args.steps,
                        upscale_inference_steps=args.upscale_steps, guidance_scale=4, upscale_guidance_scale=1,
                        strength=args.strength, panorama=args.panorama, generator=torch.Generator().manual_seed(args.seed + i),
                        **controls(method, scene, width, height, condition, args)).images[0]
                steps = {} if method == "truth" or not args.full else {
                    "upscale_steps": args.upscale_steps or pipes[method].default_upscale_steps}
                row = {"ratio": ratio, "size": size, "layout": i, "method": method,
                       **({} if mode == "stretch" else {"panorama": mode}), **steps,
                       "seconds": round(time.perf_counter() - start, 2), **measure(np.asarray(image), scene, condition)}
                append(args.jsonl, row)
                if args.samples is not None and i < 4:
                    args.samples.mkdir(parents=True, exist_ok=True)
                    image.save(args.samples / f"{stem}_{i}_{method}{'' if mode == 'stretch' else '_' + mode}.png")


def key(row: dict) -> tuple:
    """A row's identity: ratio, size, layout, method and stage 1's panorama mode (rows without one: stretch)."""
    return row["ratio"], row["size"], row["layout"], row["method"], row.get("panorama", "stretch")


def table(jsonl: Path) -> str:
    """Two tables: objects in their box per method (and centred in it), then mask IoU, exact and time."""
    rows = read_rows(jsonl)
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    keys = sorted({(r["ratio"], r["size"], key(r)[-1]) for r in rows}, key=lambda k: (*size_order(k), k[2] != "stretch"))
    head1 = " | ".join(f"in box: {m}" for m in methods) + " | " + " | ".join(f"centre in box: {m}" for m in methods)
    model = [m for m in methods if m != "truth"]
    head2 = " | ".join(f"{what}: {m}" for what in ("mask IoU", "exact", "s / image") for m in model)
    first = [f"| W:H | size | stage 1 | layouts | objects | {head1} |", "|---|---|---|---|---|" + "---|" * 2 * len(methods)]
    second = [f"| W:H | size | stage 1 | layouts | {head2} |", "|---|---|---|---|" + "---|" * 3 * len(model)]
    for ratio, size, mode in keys:
        by = {m: [r for r in rows if (r["ratio"], r["size"], r["method"]) == (ratio, size, m)
                  and (m == "truth" or key(r)[-1] == mode)] for m in methods}
        by = {m: rs for m, rs in by.items() if rs}  # a method not run at this size: its cells say "-"
        n = min(len(rs) for rs in by.values())
        by = {m: sorted(rs, key=lambda r: r["layout"])[:n] for m, rs in by.items()}
        objects = sum(r["objects"] for r in by["truth"])

        def cell(m, f):
            return f(by[m]) if m in by else "-"

        share = [cell(m, lambda rs, k=k: f"{sum(r[k] for r in rs) / objects:.0%}") for k in ("in_box", "centred")
                 for m in methods]
        first.append(f"| {ratio} | {size} | {mode} | {n} | {objects} | " + " | ".join(share) + " |")
        cells = ([cell(m, lambda rs: f"{np.mean([r['iou'] for r in rs]):.2f}") for m in model]
                 + [cell(m, lambda rs: f"{np.mean([r['exact'] for r in rs]):.0%}") for m in model]
                 + [cell(m, lambda rs: f"{np.mean([r['seconds'] for r in rs]):.1f}") for m in model])
        second.append(f"| {ratio} | {size} | {mode} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(first) + "\n\n" + "\n".join(second) + "\n"


def figure(samples: Path, sizes: list[str], seed: int, out: Path) -> None:
    """For each size, layout 0: the requested boxes on the silhouettes, then each method's image with the
    boxes drawn over it (a method run with another ``--panorama`` mode beside it, the mode after it)."""
    kinds = [(m, x) for m in METHODS for x in ("", "_direct", "_tiled")]
    stems = [f"{ratio_label(*map(int, size.split('x'))).replace(':', 'x')}_{size}_0" for size in sizes]
    columns = [(m, x) for m, x in kinds if (m, x) == ("truth", "")
               or m != "truth" and any((samples / f"{stem}_{m}{x}.png").exists() for stem in stems)]
    tiles = []
    for size in sizes:
        w, h = (int(v) for v in size.split("x"))
        cw, ch = (256, round(256 * h / w)) if w >= h else (round(256 * w / h), 256)
        stem = f"{ratio_label(w, h).replace(':', 'x')}_{size}_0"
        scene = sample_scene(seed, h / w)
        row = []
        for method, suffix in columns:  # a column this size lacks stays blank
            path = samples / f"{stem}_{method}{suffix}.png"
            if method != "truth" and not path.exists():
                row.append(PIL.Image.new("RGB", (cw, ch), "white"))
                continue
            image = PIL.Image.fromarray(render_mask(scene, w, h)) if method == "truth" else PIL.Image.open(path)
            image = image.convert("RGB").resize((cw, ch), PIL.Image.Resampling.BILINEAR)
            draw = PIL.ImageDraw.Draw(image)
            for top, left, bottom, right in object_boxes(scene, cw, ch):
                draw.rectangle([left, top, right - 1, bottom - 1], outline=(255, 255, 0))
            row.append(image)
        tiles.append(row)
    width = max(sum(t.width + 8 for t in row) - 8 for row in tiles)
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
    add_layout_arguments(p, layouts=100, seed=5000)
    p.add_argument("--methods", nargs="+", default=["controlnet", "regions", "none"], choices=METHODS[1:],
                   help="what to generate with (the rendered truth is always scored)")
    p.add_argument("--img2img", action="store_true",
                   help="with --full: stage 2 img2img with the base model, every pass steered tile by tile (default: "
                        "the x4 upscaler, which no control steers: the layout is stage 1's)")
    p.add_argument("--strength", type=float, default=0.3, help="img2img passes")
    p.add_argument("--panorama", choices=("stretch", "direct", "tiled"), default="stretch",
                   help="stage 1 at a ratio outside the buckets (4:1, 1:4): the 2:1 bucket stretched (default here, "
                        "for every method alike; the pipeline's own default, auto, is direct with a ControlNet), "
                        "or sampled at the ratio itself, untiled (direct) or tiled")
    p.add_argument("--gligen", type=Path, default=None, metavar="DIR", help="a GLIGEN base, for --methods gligen")
    p.add_argument("--gligen-beta", type=float, default=0.3, help="GLIGEN's scheduled sampling (default 0.3)")
    p.add_argument("--figure", type=Path, default=None, metavar="JPG",
                   help="with --samples: layout 0 of every size, silhouettes and each method's image, boxes drawn")
    p.add_argument("--figure-sizes", nargs="+", default=None, metavar="WxH")
    args = p.parse_args()
    run_and_tabulate(args, run, table)
    if args.figure is not None and args.samples is not None:
        sizes = args.figure_sizes or [f"{w}x{h}" for w, h in STAGE1_SIZES.values()]
        figure(args.samples, sizes, args.seed, args.figure)


if __name__ == "__main__":
    main()
