"""Bands at the tile pitch through the whole pipeline, per size and tiling method (anysize.train.seams).

Two measurements per scene (``anysize.train.scenes``, fixed seeds; each at the request's aspect ratio):

- ``upscale`` (ground truth): the scene rendered at stage 1's size for the request (the bucket
  ``pipe.plan(W, H)`` picks) is enlarged by ``pipe.upscale`` to W x H with each tiling method, and by a
  bicubic resize (the reference); each output's error against the scene rendered at W x H is scored.
- ``generate`` (no ground truth): ``pipe(caption, W, H)`` with each method, scored on the output itself
  (``against="offsets"``), and the stage-1 image alone.

Pitches, in output px: ``last``, the last pass's tile (the upscaler's native tile x its VAE factor);
``stage1``, stage 1's coarsest UNet grid (16 bucket px for the default base) times the enlargement.
Every result row is appended to ``--jsonl`` as it comes, and a rerun skips the rows there (so a long
run can stop and continue); ``--table`` writes the markdown table of medians over scenes.

    .venv/bin/python benchmarks/seams.py --no-generate --scenes 4 --methods fstd "fstd clamp auto" naive \\
        --jsonl benchmarks/results/seams.jsonl --table benchmarks/results/seams.md \\
        --profiles-dir /tmp/seams_profiles --figure docs/seams.png
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("MKL_CBWR", "AVX2,STRICT")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import torch  # noqa: E402

from anysize import AnySizePipeline, TilingConfig  # noqa: E402
from anysize.core.vae import vae_scale_factor  # noqa: E402
from anysize.train.scenes import render, sample_scene  # noqa: E402
from anysize.train.seams import (band_score, bootstrap_interval, boundary_ratios, paired_interval,  # noqa: E402
                                 pooled_ratio, profile, ratios_at)
from results_log import append, done_keys, read_rows, run_and_tabulate  # noqa: E402

SIZES = ["1024x768", "1280x720", "720x1280", "1600x400", "768x384", "512x1024", "2048x512", "4096x1024"]
METHODS = {
    "fstd": TilingConfig(method="fstd"),  # the default: cut edges, both axes every step, blended last step
    "fstd single": TilingConfig(method="fstd", last_step="single"),  # one grid on the last step too
    "fstd clamp auto": TilingConfig(method="fstd", edges="clamp", shift="auto"),
    "fstd clamp both": TilingConfig(method="fstd", edges="clamp", shift="both"),
    "fstd clamp alternate": TilingConfig(method="fstd", edges="clamp", shift="alternate"),
    "naive": TilingConfig(method="naive"),
    "overlap": TilingConfig(method="overlap"),
}
STAGE1_GRID = 16  # bucket px of the default base's coarsest UNet level (latent 4 px x VAE factor 4)


def last_model(pipe: AnySizePipeline):
    """The model of the last pass: the upscaler, else the base."""
    return pipe.upscaler if pipe.upscaler is not None else pipe.base


def size_order(size: str) -> int:
    """Table order of a "WxH" size: SIZES' order, sizes not in it last."""
    return SIZES.index(size) if size in SIZES else len(SIZES)


def cell(value: float, low: float, high: float) -> str:
    """A table cell: "1.02 (0.91-1.13)"."""
    return f"{value:.2f} ({low:.2f}-{high:.2f})"


def pitches(pipe: AnySizePipeline, width: int, height: int) -> dict[str, tuple[float, float]]:
    """(column pitch, row pitch) in output px of the last pass's tiles and of stage 1's grid."""
    model = last_model(pipe)
    tile = int(model.unet.config.sample_size) * vae_scale_factor(model.vae)
    bw, bh = pipe.plan(width, height).base
    return {"last": (tile, tile), "stage1": (STAGE1_GRID * width / bw, STAGE1_GRID * height / bh)}


def score_row(image: np.ndarray, pitch: dict, reference: np.ndarray | None, against: str) -> dict:
    """Per pitch and axis: the image's band ratio, and (key + " boundaries") each boundary's ratio, which
    the table pools over scenes."""
    out = {}
    for name, (pc, pr) in pitch.items():
        for axis, short, p in (("columns", "cols", pc), ("rows", "rows", pr)):
            out[f"{name} {short}"] = round(band_score(image, p, reference=reference).ratio(axis, against), 3)
            ratios = boundary_ratios(image, p, axis, reference=reference, against=against)
            out[f"{name} {short} boundaries"] = [round(float(v), 4) for v in ratios]
    return out


class LastCuts:
    """Keeps the last tile plan a sampler made (``TilingConfig.plan``, wrapped for this process only):
    a pass makes its plans in step order before sampling, so after a run it is the last pass's last
    step. ``cuts(factor)`` gives that plan's interior box edges in output px (latent px x ``factor``),
    per axis; set ``last = None`` before a run so that a run without a plan fails instead."""

    def __init__(self):
        self.last = None
        original = TilingConfig.plan

        def plan(config, height, width, step, generator, num_steps=None):
            boxes = original(config, height, width, step, generator, num_steps)
            self.last = (height, width, boxes)
            return boxes

        TilingConfig.plan = plan

    def cuts(self, factor: int) -> tuple[list[int], list[int]]:
        height, width, boxes = self.last
        rows = sorted({e * factor for t, _, b, _ in boxes for e in (t, b) if 0 < e < height})
        cols = sorted({e * factor for _, l, _, r in boxes for e in (l, r) if 0 < e < width})
        return cols, rows


def cut_scores(image: np.ndarray, bicubic: np.ndarray, truth: np.ndarray, cols: list[int], rows: list[int]) -> dict:
    """Boundary ratios of the error image at a run's own last cuts, and of bicubic's at the same ones."""
    out = {}
    for name, im in (("cuts", image), ("bicubic cuts", bicubic)):
        for axis, short, positions in (("columns", "cols", cols), ("rows", "rows", rows)):
            ratios = ratios_at(im, positions, axis, reference=truth)
            out[f"{name} {short}"] = [round(float(v), 4) for v in ratios]
    return out


def run(args) -> None:
    recorder = LastCuts() if args.cuts else None
    pipe = AnySizePipeline.from_pretrained()
    pipe.set_progress_bar_config(disable=True)
    done = done_keys(args.jsonl, ("kind", "size", "scene", "method"))
    for size in args.sizes:
        width, height = map(int, size.split("x"))
        pitch = pitches(pipe, width, height)
        base = pipe.plan(width, height).base
        for i in range(args.scenes):
            scene = sample_scene(args.scene_seed + i, height / width)
            truth = render(scene, width, height).astype(np.float64)
            source = PIL.Image.fromarray(render(scene, *base))
            bicubic = np.asarray(source.resize((width, height), PIL.Image.Resampling.BICUBIC), dtype=np.float64)
            jobs = [("upscale", m) for m in ["bicubic", *args.methods]]
            if args.generate:
                jobs += [("generate", m) for m in ["stage 1", *args.methods]]
            for kind, method in jobs:
                if (kind, size, i, method) in done:
                    continue
                start = time.perf_counter()
                if kind == "upscale" and method == "bicubic":
                    image = bicubic
                elif kind == "upscale":
                    if recorder is not None:
                        recorder.last = None
                    image = pipe.upscale(source, width, height, scene.caption, num_inference_steps=args.upscale_steps,
                                         tiling=METHODS[method], generator=torch.Generator().manual_seed(i)).images[0]
                elif method == "stage 1":
                    image = pipe(scene.caption, *base, num_inference_steps=args.steps, guidance_scale=4,
                                 generator=torch.Generator().manual_seed(i)).images[0]
                else:
                    image = pipe(scene.caption, width, height, num_inference_steps=args.steps,
                                 upscale_inference_steps=args.upscale_steps, guidance_scale=4,
                                 upscale_guidance_scale=1, tiling=METHODS[method],
                                 generator=torch.Generator().manual_seed(i)).images[0]
                image = np.asarray(image, dtype=np.float64)
                cuts = {}
                if recorder is not None and kind == "upscale" and method != "bicubic":
                    cuts = cut_scores(image, bicubic, truth, *recorder.cuts(vae_scale_factor(last_model(pipe).vae)))
                if kind == "upscale":
                    scores = {k: v for k, v in score_row(image, pitch, truth, "half").items()
                              if not k.endswith("boundaries")} | {
                        f"{k} (offsets)": v for k, v in score_row(image, pitch, truth, "offsets").items()}
                elif method == "stage 1":
                    scores = score_row(image, {"stage1": (STAGE1_GRID, STAGE1_GRID)}, None, "offsets")
                else:
                    scores = score_row(image, pitch, None, "offsets")
                row = {"kind": kind, "size": size, "scene": i, "method": method,
                       "seconds": round(time.perf_counter() - start, 2), **scores, **cuts}
                append(args.jsonl, row)
                if args.profiles_dir is not None and kind == "upscale" and i == 0:
                    np.save(args.profiles_dir / f"{size}_{method.replace(' ', '_')}.npy",
                            profile(image, "columns", truth))


def pooled_cell(group: list[dict], key: str) -> tuple[float, str]:
    """The pooled ratio of ``key`` over a group's scenes and its cell text, "1.02 (0.91-1.13)" with the
    90% bootstrap interval over scenes; NaN and "" when the rows hold no boundary lists."""
    lists = [np.asarray(r[key]) for r in group if key in r]
    value = pooled_ratio(lists)
    if value != value:
        return value, ""
    low, high = bootstrap_interval(lists)
    return value, cell(value, low, high)


def pooled_table(rows: list[dict], kind: str = "upscale", reference: str = "bicubic") -> str:
    """Per size and method, each axis and pitch pooled over scenes; for ``kind="upscale"`` a second table
    divides each method's by ``reference``'s, scene by scene (:func:`paired_interval`): an interval
    whose top is at most 1.1 shows the method within 10% of the reference, one whose bottom is over
    1.1 shows it more banded, anything else is not decided at this number of scenes."""
    suffix = " boundaries (offsets)" if kind == "upscale" else " boundaries"
    cols = ["last cols", "last rows", "stage1 cols", "stage1 rows"]
    groups: dict[tuple[str, str], dict[int, dict]] = {}
    for r in rows:
        if r["kind"] == kind and any(k.endswith(suffix) for k in r):
            groups.setdefault((r["size"], r["method"]), {})[r["scene"]] = r
    if not groups:
        return ""
    sizes = sorted({s for s, _ in groups}, key=size_order)
    head = "| size | method | scenes | " + " | ".join(cols) + " |"
    lines = [f"\n{kind}: band ratio pooled over scenes' boundaries, 90% bootstrap interval over scenes "
             "(1.0: no band)\n", head, "|" + "---|" * (len(cols) + 3)]
    quotients = [f"\n{kind}: each method's pooled band ratio over {reference}'s, the same scenes resampled "
                 "on both sides (90% interval)\n", head, "|" + "---|" * (len(cols) + 3)]
    for size in sizes:
        ref = groups.get((size, reference), {})
        for m in [m for s, m in groups if s == size]:
            group = groups[size, m]
            cells = [pooled_cell(list(group.values()), c + suffix)[1] for c in cols]
            lines.append(f"| {size} | {m} | {len(group)} | " + " | ".join(cells) + " |")
            shared = sorted(set(group) & set(ref))
            if m == reference or not shared or not all(c + suffix in ref[i] for c in cols for i in shared):
                continue
            cells = [cell(*paired_interval([np.asarray(group[i][c + suffix]) for i in shared],
                                           [np.asarray(ref[i][c + suffix]) for i in shared])) for c in cols]
            quotients.append(f"| {size} | {m} | {len(shared)} | " + " | ".join(cells) + " |")
    return "\n".join(lines + (quotients if len(quotients) > 3 else [])) + "\n"


def cuts_table(rows: list[dict]) -> str:
    """Per size and method: the error's band ratio at the run's own last cuts, pooled over scenes, and
    over bicubic's at the same cuts (paired by scene), each with its 90% bootstrap interval."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if r["kind"] == "upscale" and "cuts cols" in r:
            groups.setdefault((r["size"], r["method"]), []).append(r)
    if not groups:
        return ""
    lines = ["\nupscale: band ratio at each run's own last cuts, pooled over scenes (1.0: no band), and its "
             "quotient by bicubic's at the same cuts (paired by scene); 90% bootstrap intervals\n",
             "| size | method | scenes | cols | rows | cols / bicubic | rows / bicubic |", "|---|---|---|---|---|---|---|"]
    for (size, method), group in sorted(groups.items(), key=lambda kv: (size_order(kv[0][0]), kv[0][1])):
        cells = [pooled_cell(group, f"cuts {axis}")[1] for axis in ("cols", "rows")]
        quotients = [cell(*paired_interval([np.asarray(r[f"cuts {axis}"]) for r in group],
                                           [np.asarray(r[f"bicubic cuts {axis}"]) for r in group]))
                     for axis in ("cols", "rows")]
        lines.append(f"| {size} | {method} | {len(group)} | " + " | ".join(cells + quotients) + " |")
    return "\n".join(lines) + "\n"


def table(jsonl: Path) -> str:
    rows = read_rows(jsonl)
    keys = sorted({(r["kind"], r["size"], r["method"]) for r in rows},
                  key=lambda k: (k[0], size_order(k[1]), k[2]))
    lines = []
    for kind in ("upscale", "generate"):
        cols = ["last cols", "last rows", "stage1 cols", "stage1 rows"]
        if kind == "upscale":
            cols = [f"{c} (offsets)" for c in cols] + cols
        lines += [f"\n{kind}: median band ratio over scenes (1.0: no band)\n",
                  "| size | method | scenes | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 3)]
        for k, size, method in keys:
            if k != kind:
                continue
            group = [r for r in rows if (r["kind"], r["size"], r["method"]) == (k, size, method)]
            vals = []
            for c in cols:
                xs = [r[c] for r in group if c in r and r[c] == r[c]]
                vals.append(f"{statistics.median(xs):.2f}" if xs else "")
            lines.append(f"| {size} | {method} | {len(group)} | " + " | ".join(vals) + " |")
    return (pooled_table(rows) + cuts_table(rows) + pooled_table(rows, "generate", reference="stage 1")
            + "\n".join(lines) + "\n")


def figure(profiles_dir: Path, out: Path, sizes=("1024x768", "1280x720")) -> None:
    """Scene 0's column-mean error profiles (output minus truth, blurred) per method, the last pass's
    tile boundaries marked: a band is a step at the marks. Needs matplotlib (the ``bench`` extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [s for s in sizes if (profiles_dir / f"{s}_bicubic.npy").exists()]
    fig, axes = plt.subplots(len(sizes), 1, figsize=(11, 3.2 * len(sizes)), squeeze=False)
    for ax, size in zip(axes[:, 0], sizes):
        for method in ("bicubic", "naive", "overlap", "fstd single", "fstd"):
            file = profiles_dir / f"{size}_{method.replace(' ', '_')}.npy"
            if file.exists():
                ax.plot(np.load(file), label=method, lw=1)
        width = int(size.split("x")[0])
        for x in range(128, width, 128):
            ax.axvline(x, color="0.8", lw=0.6, zorder=0)
        ax.set_title(f"{size}: column mean of (output - truth), scene 0; grey: the last pass's 128 px tile pitch",
                     fontsize=9)
        ax.set_xlabel("column (px)")
        ax.set_ylabel("error (levels)")
        ax.legend(fontsize=8, ncol=4)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=SIZES)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--scenes", type=int, default=8)
    p.add_argument("--scene-seed", type=int, default=500)
    p.add_argument("--steps", type=int, default=30, help="stage-1 steps (generate)")
    p.add_argument("--upscale-steps", type=int, default=None, help="default: the upscaler's own (1 for the default model)")
    p.add_argument("--no-generate", dest="generate", action="store_false", help="the ground-truth rows only")
    p.add_argument("--cuts", action="store_true",
                   help="also score each upscale at its own last step's cuts, and bicubic at the same ones")
    p.add_argument("--jsonl", type=Path, required=True)
    p.add_argument("--table", type=Path, default=None)
    p.add_argument("--profiles-dir", type=Path, default=None, help="save scene 0's column error profiles here")
    p.add_argument("--table-only", action="store_true", help="write the table from --jsonl and stop")
    p.add_argument("--figure", type=Path, default=None, help="with --profiles-dir: draw the profiles here (PNG)")
    args = p.parse_args()
    if args.profiles_dir is not None:
        args.profiles_dir.mkdir(parents=True, exist_ok=True)
    run_and_tabulate(args, run, table)
    if args.figure is not None and args.profiles_dir is not None:
        figure(args.profiles_dir, args.figure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
