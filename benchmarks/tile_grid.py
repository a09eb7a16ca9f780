"""Tile-grid visibility: how strongly the stage-2 tile boundaries show in a generated image.

Generates ``--prompt`` at ``--size`` with the default model for each seed and measures, at the last
stage-2 pass's tile pitch (the upscaler's native tile in latent px times its VAE factor), the mean
absolute vertical gradient across each horizontal tile boundary divided by the median row's, and the
same for vertical boundaries and columns. About 1 means the grid does not show; a seam shows as a
ratio well above 1.

``--last-step alternate`` runs FSTD with ``shift="alternate"`` (a ``TilingConfig`` as ``tiling=``): on
grids below about 14 x 14 tiles, where ``shift="auto"`` alternates the shifted axis, that differs from
the default only in the last step, which alternates too instead of shifting both axes.

    .venv/bin/python benchmarks/tile_grid.py --seeds 3 4 --last-step both alternate \\
        --json benchmarks/results/tile_grid.json
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("MKL_CBWR", "AVX2,STRICT")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from anysize import AnySizePipeline, tiling  # noqa: E402
from anysize.buckets import native_side  # noqa: E402

PROMPT = "two large red circles and a small blue triangle on grass"


def boundary_ratios(image, pitch: int) -> tuple[float, float]:
    """(rows, columns) of a PIL image: mean luma gradient across the boundaries at multiples of
    ``pitch``, over the median row's (column's)."""
    gray = np.asarray(image.convert("L")).astype(float)
    gy = np.abs(np.diff(gray, axis=0)).mean(axis=1)  # gy[k - 1]: between rows k - 1 and k
    gx = np.abs(np.diff(gray, axis=1)).mean(axis=0)
    rows = [gy[k - 1] for k in range(pitch, gray.shape[0], pitch)]
    cols = [gx[k - 1] for k in range(pitch, gray.shape[1], pitch)]
    return float(np.mean(rows) / np.median(gy)), float(np.mean(cols) / np.median(gx))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--size", default="768x384", help="WxH")
    parser.add_argument("--seeds", type=int, nargs="+", default=[3, 4])
    parser.add_argument("--last-step", nargs="+", choices=("both", "alternate"), default=["both"])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    pipe = AnySizePipeline.from_pretrained()
    pipe.set_progress_bar_config(disable=True)
    up = pipe.upscaler if pipe.upscaler is not None else pipe.base
    pitch = native_side(up.vae, up.unet)
    rows = []
    for mode in args.last_step:
        config = tiling.TilingConfig(method="fstd", shift="auto" if mode == "both" else "alternate")
        for seed in args.seeds:
            image = pipe(args.prompt, width=width, height=height, guidance_scale=4, upscale_guidance_scale=1,
                         tiling=config, generator=torch.Generator().manual_seed(seed)).images[0]
            r, c = boundary_ratios(image, pitch)
            rows.append({"last_step": mode, "seed": seed, "rows": round(r, 3), "cols": round(c, 3)})
            print(f"last step {mode:9s} seed {seed}: horizontal boundaries {r:.2f}x, vertical {c:.2f}x "
                  f"the median (pitch {pitch} px)", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"prompt": args.prompt, "size": [width, height], "pitch": pitch,
                                         "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
