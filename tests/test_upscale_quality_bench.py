"""The pure parts of benchmarks/upscale_quality.py: grid lines, seam ratio, crop box and sheet."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "upscale_quality.py"
_spec = importlib.util.spec_from_file_location("upscale_quality", _PATH)
uq = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(uq)


def test_grid_lines_follow_naive_tiles():
    assert uq.grid_lines(192, 16, 4).tolist() == [64, 128]  # 48 latent: three tiles
    assert uq.grid_lines(128, 16, 4).tolist() == [64]  # 32 latent: two tiles, one edge
    assert uq.grid_lines(64, 16, 4).tolist() == []  # one tile: no line
    # ceil(150 / 4) = 38 latent: tiles at 0, 16 and 22 (clamped inward): edges 16, 22, 32
    assert uq.grid_lines(150, 16, 4).tolist() == [64, 88, 128]


def test_seam_ratio_sees_a_step_on_the_grid_only():
    rng = np.random.default_rng(0)
    smooth = rng.normal(0.5, 0.01, (64, 64, 3))
    lines = np.array([32])
    base = uq.seam_ratio(smooth, lines, lines, halfwidth=0)
    assert 0.8 < base < 1.2
    seamed = smooth.copy()
    seamed[:, 32:] += 0.1  # a vertical seam between columns 31 and 32
    assert uq.seam_ratio(seamed, lines, lines, halfwidth=0) > 3 * base
    assert uq.seam_ratio(seamed, lines, lines, halfwidth=2) > 1.5 * base  # the band dilutes it
    off = smooth.copy()
    off[:, 20:] += 0.1  # the same step off the grid lowers the ratio
    assert uq.seam_ratio(off, lines, lines, halfwidth=0) < base
    assert np.isnan(uq.seam_ratio(smooth, np.array([]), np.array([])))
    assert uq.seam_ratio(np.zeros((16, 16)), np.array([8]), np.array([8])) == 1.0


def test_crop_box_and_sheet():
    rows, cols = np.array([64, 112]), np.array([64])
    assert uq.crop_box((192, 128, 3), rows, cols, 32) == (96, 48, 128, 80)  # the corner nearest the centre
    assert uq.crop_box((192, 128, 3), rows, np.array([120]), 32) == (96, 96, 128, 128)  # clamped inside
    assert uq.crop_box((40, 40, 3), np.array([]), np.array([]), 64) == (0, 0, 40, 40)
    crop = np.zeros((8, 8, 3), np.uint8)
    sheet = uq.crop_sheet([("x4", [("ground truth", crop), ("fstd", crop)])], zoom=2)
    assert sheet.size == (4 + 2 * (16 + 4), 4 + 28 + 16 + 4)
