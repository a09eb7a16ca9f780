"""Super-resolution quality on procedural scenes: FSTD vs explicit overlap vs naive tiling vs bicubic.

Each of N fixed scenes (``anysize.train.scenes.sample_scene(seed, aspect)``) is rendered at a base size
(the low-res input) and at 4x and 16x that size (the ground truth: the scene renderer is
resolution independent, so a larger render is the exact image an upscaler should produce). The
input is enlarged by ``AnySizePipeline(upscaler=...).upscale`` with each tiling method, the same
seed for every method, and by a PIL bicubic resize (the no-model reference). Scores against the
ground truth: PSNR and SSIM (torchmetrics, images as float in [0, 1], data_range 1.0), the seam
ratio of the output and of the ground truth on the naive grid's tile edges (:func:`seam_ratio`: a
ratio clearly above the ground truth's is a visible seam), and wall time per upscale.

    .venv/bin/python benchmarks/upscale_quality.py --upscaler runs/upscaler/model --scenes 4 --steps 20 \
        --json benchmarks/results/upscale_quality.json --crops docs/upscale_crops.png

Smoke run with a tiny random-weight upscaler (scores meaningless, exercises every code path):

    nice -n 19 .venv/bin/python benchmarks/upscale_quality.py --tiny --scenes 1 --steps 2 --base-size 32x32

``--x16-references`` adds two rows at x16 that say where its error comes from: "x4 pass, then bicubic"
(the first pass alone, its output resized x4 bicubically), "x4 pass on the x4 truth" (one pass from
the scene rendered at 4x, an oracle input no user has) and "bicubic from the x4 truth" beside it.

x16 runs two x4 passes; it is the expensive row (ground truth and output are 16w x 16h). The seam
grid is the last pass's: tile_size latent px x the VAE factor, in output pixels.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MKL_CBWR", "AVX2,STRICT")

import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import PIL.ImageDraw  # noqa: E402
import torch  # noqa: E402

from anysize.cli import parse_size  # noqa: E402
from anysize.train.scenes import render, sample_scene  # noqa: E402
from anysize.core.tiling import naive_tiles  # noqa: E402

TILINGS = ("fstd", "naive", "overlap")
X16_REFERENCES = ("x4 pass, then bicubic", "x4 pass on the x4 truth", "bicubic from the x4 truth")
CROP_ORDER = ("ground truth", "bicubic", "naive", "overlap", "fstd")


# ---------------------------------------------------------------------------------------------- metrics
def grid_lines(length: int, tile: int, vae_factor: int) -> np.ndarray:
    """Output-pixel positions of the naive grid's interior tile edges along one axis of ``length`` px.

    The last pass samples a latent of ``ceil(length / vae_factor)`` px on :func:`anysize.core.tiling.naive_tiles`
    (``tile`` latent px, the last tile clamped inward so it overlaps its neighbour); every tile edge
    strictly inside the latent, times ``vae_factor``, is a line where the set of tiles covering a
    pixel changes. A position ``p`` means the edge between pixel ``p - 1`` and pixel ``p``.
    """
    latent = math.ceil(length / vae_factor)
    edges = set()
    for top, _, bottom, _ in naive_tiles(latent, 1, tile):
        edges.update(e for e in (top, bottom) if 0 < e < latent)
    return np.array(sorted(e * vae_factor for e in edges if e * vae_factor < length), dtype=np.int64)


def seam_ratio(image: np.ndarray, rows: np.ndarray, cols: np.ndarray, halfwidth: int = 1) -> float:
    """Mean gradient magnitude across the grid lines divided by the mean on every other line.

    ``image``: (H, W) or (H, W, C), any numeric dtype (compare images on the same scale).
    ``rows`` / ``cols``: positions ``p`` of horizontal / vertical lines, each the edge between pixel
    ``p - 1`` and ``p`` (see :func:`grid_lines`). The gradient across a vertical line is the
    horizontal finite difference ``|I[:, p] - I[:, p - 1]|`` (mean over channels), across a
    horizontal line the vertical one. ``halfwidth`` also counts the differences up to that many
    pixels on either side of each line (a decoder smears a latent edge over a few pixels), so each line
    contributes ``2 * halfwidth + 1`` difference columns (rows). The numerator pools the differences
    on all those lines, the denominator all remaining horizontal differences and vertical differences.
    About 1: the grid lines look like any other line; clearly above the ground truth's ratio: a seam.
    NaN when there is no line (a single tile); inf when the image is flat off the lines only.
    """
    img = np.asarray(image, dtype=np.float64)
    if img.ndim == 2:
        img = img[..., None]
    dx = np.abs(np.diff(img, axis=1)).mean(axis=2)  # (H, W-1): dx[:, j] is across the edge j | j+1
    dy = np.abs(np.diff(img, axis=0)).mean(axis=2)  # (H-1, W)

    def mask(lines, n):  # which of the n differences (edge j | j+1 is index j) lie on a line's band
        m = np.zeros(n, dtype=bool)
        for p in np.asarray(lines, dtype=np.int64):
            m[max(0, p - 1 - halfwidth) : max(0, min(n, p + halfwidth))] = True
        return m

    mx, my = mask(cols, dx.shape[1]), mask(rows, dy.shape[0])
    on = dx[:, mx].sum() + dy[my, :].sum()
    n_on = dx.shape[0] * mx.sum() + dy.shape[1] * my.sum()
    off = dx[:, ~mx].sum() + dy[~my, :].sum()
    n_off = dx.shape[0] * (~mx).sum() + dy.shape[1] * (~my).sum()
    if n_on == 0 or n_off == 0:
        return float("nan")
    seam, rest = on / n_on, off / n_off
    if rest == 0:
        return 1.0 if seam == 0 else float("inf")
    return float(seam / rest)


def _torchmetrics():
    try:
        from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
    except ImportError:
        sys.exit("upscale_quality: needs torchmetrics for PSNR / SSIM: .venv/bin/pip install torchmetrics")
    return peak_signal_noise_ratio, structural_similarity_index_measure


def psnr_ssim(output: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """PSNR (dB) and SSIM of two (H, W, 3) uint8 images, as float in [0, 1] with data_range 1.0."""
    psnr, ssim = _torchmetrics()
    a, b = (torch.tensor(np.asarray(x)).permute(2, 0, 1)[None].float() / 255.0 for x in (output, truth))
    return float(psnr(a, b, data_range=1.0)), float(ssim(a, b, data_range=1.0))


# ---------------------------------------------------------------------------------------------- crops
def crop_box(shape: tuple[int, ...], rows: np.ndarray, cols: np.ndarray, side: int) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of a ``side`` px square centred on the grid corner nearest the image
    centre (the image centre when an axis has no line), clamped inside the image."""
    h, w = shape[:2]
    cy = int(rows[np.argmin(np.abs(rows - h / 2))]) if len(rows) else h // 2
    cx = int(cols[np.argmin(np.abs(cols - w / 2))]) if len(cols) else w // 2
    sh, sw = min(side, h), min(side, w)
    top, left = min(max(0, cy - sh // 2), h - sh), min(max(0, cx - sw // 2), w - sw)
    return top, left, top + sh, left + sw


def crop_sheet(rows: list[tuple[str, list[tuple[str, np.ndarray]]]], zoom: int, pad: int = 4,
               label_h: int = 14) -> PIL.Image.Image:
    """A white sheet: per row a title, then the crops side by side, each enlarged ``zoom`` x (NEAREST)
    under its label."""
    cells = [[(lab, PIL.Image.fromarray(c).resize((c.shape[1] * zoom, c.shape[0] * zoom), PIL.Image.Resampling.NEAREST))
              for lab, c in crops] for _, crops in rows]
    width = max(sum(im.width + pad for _, im in r) + pad for r in cells)
    height = sum(label_h * 2 + max(im.height for _, im in r) + pad for r in cells) + pad
    sheet = PIL.Image.new("RGB", (width, height), "white")
    draw = PIL.ImageDraw.Draw(sheet)
    y = pad
    for (title, _), r in zip(rows, cells):
        draw.text((pad, y), title, fill="black")
        y += label_h
        x = pad
        for lab, im in r:
            draw.text((x, y), lab, fill="black")
            sheet.paste(im, (x, y + label_h))
            x += im.width + pad
        y += label_h + max(im.height for _, im in r) + pad
    return sheet


# ---------------------------------------------------------------------------------------------- run
def load_pipeline(args):
    from anysize import AnySizePipeline

    if args.tiny:  # built offline into a temporary directory, removed once loaded
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        import tiny_models

        with tempfile.TemporaryDirectory(prefix="anysize-tiny-") as tmp:
            path = tiny_models.make_upscaler(Path(tmp) / "upscaler")
            pipe = AnySizePipeline.from_pretrained(upscaler=path, device=args.device, dtype=args.dtype)
        model = "tiny random-weight upscaler (tests/tiny_models.py)"
    else:
        pipe = AnySizePipeline.from_pretrained(upscaler=args.upscaler, device=args.device, dtype=args.dtype)
        model = args.upscaler
    pipe.set_progress_bar_config(disable=True)
    return pipe, model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(args) -> dict:
    from anysize.core.vae import vae_scale_factor

    pipe, model = load_pipeline(args)
    vae_factor = vae_scale_factor(pipe.upscaler.vae)
    tile = args.tile_size or int(pipe.upscaler.unet.config.sample_size)
    w, h = args.base_size
    args.steps = args.steps or pipe.default_upscale_steps  # the upscaler's own choice (its anysize.json)
    kw = dict(num_inference_steps=args.steps, noise_level=args.noise_level, guidance_scale=args.guidance,
              tile_size=args.tile_size, tile_batch_size=args.tile_batch, color_fix=args.color_fix)
    # warm-up: lazy initialisation (kernels, allocator) must not land in the first method's time
    pipe.upscale(np.zeros((16, 16, 3), np.uint8), 64, 64, "", generator=torch.Generator().manual_seed(0),
                 **{**kw, "num_inference_steps": 1})

    per_scene, crops = [], {}
    for i in range(args.scenes):
        seed = args.scene_seed + i
        scene = sample_scene(seed, h / w)
        low = PIL.Image.fromarray(render(scene, w, h))
        for factor in args.factors:
            W, H = w * factor, h * factor
            truth = render(scene, W, H)
            rows, cols = grid_lines(H, tile, vae_factor), grid_lines(W, tile, vae_factor)
            truth_seam = seam_ratio(truth, rows, cols, args.seam_halfwidth)
            outputs = {}
            start = time.perf_counter()
            outputs["bicubic"] = np.asarray(low.resize((W, H), PIL.Image.Resampling.BICUBIC))
            seconds = {"bicubic": time.perf_counter() - start}
            for method in args.methods:
                sync(pipe.device)
                start = time.perf_counter()
                out = pipe.upscale(low, W, H, scene.caption, tiling=method,
                                   generator=torch.Generator().manual_seed(args.seed + i), **kw).images[0]
                sync(pipe.device)
                seconds[method] = time.perf_counter() - start
                outputs[method] = np.asarray(out)
            if factor == 16 and args.x16_references:
                generator = torch.Generator().manual_seed(args.seed + i)
                first = pipe.upscale(low, 4 * w, 4 * h, scene.caption, generator=generator, **kw).images[0]
                outputs["x4 pass, then bicubic"] = np.asarray(first.resize((W, H), PIL.Image.Resampling.BICUBIC))
                oracle = PIL.Image.fromarray(render(scene, 4 * w, 4 * h))
                outputs["x4 pass on the x4 truth"] = np.asarray(pipe.upscale(
                    oracle, W, H, scene.caption, generator=torch.Generator().manual_seed(args.seed + i), **kw).images[0])
                outputs["bicubic from the x4 truth"] = np.asarray(oracle.resize((W, H), PIL.Image.Resampling.BICUBIC))
                seconds |= dict.fromkeys(X16_REFERENCES, math.nan)
            for method, out in outputs.items():
                p, s = psnr_ssim(out, truth)
                per_scene.append({"scene": seed, "caption": scene.caption, "factor": factor, "method": method,
                                  "psnr": p, "ssim": s, "seam": seam_ratio(out, rows, cols, args.seam_halfwidth),
                                  "seam_truth": truth_seam, "seconds": seconds[method]})
                print(f"  scene {seed} x{factor} {method}: PSNR {p:.2f}  SSIM {s:.4f}  {seconds[method]:.1f} s",
                      file=sys.stderr)
            if i == 0:
                box = crop_box(truth.shape, rows, cols, args.crop_size)
                t, l, b, r = box
                images = {"ground truth": truth, **outputs}
                crops[factor] = {"box": box, "crops": [(k, images[k][t:b, l:r]) for k in CROP_ORDER if k in images]}

    summary = []
    for factor in args.factors:
        references = X16_REFERENCES if factor == 16 and args.x16_references else ()
        for method in ("bicubic", *args.methods, *references):
            sel = [r for r in per_scene if r["factor"] == factor and r["method"] == method]
            row = {"factor": factor, "method": method}
            for key in ("psnr", "ssim", "seam", "seam_truth", "seconds"):
                vals = [r[key] for r in sel if not math.isnan(r[key])]
                row[key] = float(np.mean(vals)) if vals else float("nan")
            summary.append(row)
    config = {"upscaler": model, "device": str(pipe.device), "dtype": str(pipe.dtype).replace("torch.", ""),
              "base_size": [w, h], "factors": args.factors, "scenes": args.scenes, "scene_seed": args.scene_seed,
              "seed": args.seed, "steps": args.steps, "noise_level": args.noise_level, "guidance": args.guidance,
              "tile_size": tile, "vae_factor": vae_factor, "tile_batch": args.tile_batch,
              "color_fix": args.color_fix, "seam_halfwidth": args.seam_halfwidth}
    return {"benchmark": "upscale_quality", "config": config, "rows": summary, "per_scene": per_scene,
            "_crops": crops}


def table(results: dict) -> str:
    c = results["config"]
    w, h = c["base_size"]
    lines = [f"upscaler {c['upscaler']}, {c['dtype']} on {c['device']}, {c['scenes']} scenes from {w}x{h}, "
             f"{c['steps']} steps, noise level {c['noise_level']}, guidance {c['guidance']}, "
             f"tile {c['tile_size']} latent px = {c['tile_size'] * c['vae_factor']} px, color fix {c['color_fix']}",
             "",
             "| method | factor | PSNR (dB) | SSIM | seam ratio (output) | seam ratio (ground truth) | seconds |",
             "|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['method']} | x{r['factor']} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['seam']:.3f} | "
                     f"{r['seam_truth']:.3f} | {r['seconds']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--upscaler", help="diffusers dir of an x4 upscaler (e.g. runs/upscaler/model)")
    src.add_argument("--tiny", action="store_true", help="a tiny random-weight upscaler (smoke test only)")
    p.add_argument("--base-size", type=parse_size, default=(128, 96), help="low-res input WxH (default 128x96)")
    p.add_argument("--factors", type=int, nargs="+", default=[4, 16], choices=[4, 16])
    p.add_argument("--methods", nargs="+", default=list(TILINGS), choices=TILINGS)
    p.add_argument("--scenes", type=int, default=4)
    p.add_argument("--scene-seed", type=int, default=0, help="scenes use seeds SCENE_SEED .. SCENE_SEED + N - 1")
    p.add_argument("--seed", type=int, default=0, help="upscaler noise seed (scene i: SEED + i, every method)")
    p.add_argument("--steps", type=int, default=None, help="default: the upscaler's own (1 for the default model), else 20")
    p.add_argument("--noise-level", type=int, default=20)
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--tile-size", type=int, default=None, help="latent px (default: the upscaler's sample_size)")
    p.add_argument("--tile-batch", type=int, default=8)
    p.add_argument("--color-fix", choices=("backproject", "adain", "none"), default="backproject")
    p.add_argument("--seam-halfwidth", type=int, default=1, help="differences counted either side of a grid line")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, help="float32, float16, bfloat16 (default: float16 on GPUs)")
    p.add_argument("--x16-references", action="store_true",
                   help="at x16, also the first pass resized bicubically and one pass from the x4 truth")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--crops", help="write a PNG of the same crop at a tile corner from every method here")
    p.add_argument("--crop-size", type=int, default=64, help="crop side in output px")
    p.add_argument("--crop-zoom", type=int, default=4)
    args = p.parse_args(argv)
    if args.scenes < 1 or (args.steps is not None and args.steps < 1):
        p.error("--scenes and --steps must be >= 1")
    args.factors, args.methods = list(dict.fromkeys(args.factors)), list(dict.fromkeys(args.methods))
    results = run(args)
    crops = results.pop("_crops")
    print(table(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.crops:
        rows = [(f"x{f}, scene {args.scene_seed}, crop {c['box']} (top, left, bottom, right) at a naive tile corner",
                 c["crops"]) for f, c in crops.items()]
        Path(args.crops).parent.mkdir(parents=True, exist_ok=True)
        crop_sheet(rows, args.crop_zoom).save(args.crops)
    return 0


if __name__ == "__main__":
    sys.exit(main())
