"""Back-projection: an enlarged image made consistent with the image it enlarges.

An enlargement is consistent when averaging it back down over each source pixel's area gives the
source again. A sampled enlargement is not quite: its low frequencies drift (colour shift, a slightly
moved edge), and a diffusion upscaler invents what the source cannot say. Back-projection (Irani and
Peleg, 1991) measures the error at the source's resolution, ``source - area_down(output)``, enlarges
that error bicubically and adds it to the output; a second round takes most of what is left. What the
output drew above the source's resolution stays; below it, the source rules.

Everything works a band of rows at a time on :class:`anysize.io.stream.Rows` (an array, or a raster on
disk for outputs past memory): one sweep per round reads each output row twice (once to measure the
error, once to correct it), with the error kept only for the source rows the next band's bicubic taps
reach. Written here rather than with PIL or torch because both need the whole image (and PIL's float
mode one channel at a time); the area reduction is exact for any ratio, through prefix sums.
"""

from __future__ import annotations

import numpy as np
import PIL.Image

from . import stream

ROUNDS = 2  # a third round moved PSNR by 0.01 dB on the scene benchmark (docs/benchmarks.md)
_KEYS_A = -0.5  # the cubic convolution kernel's parameter, as PIL's and torch's bicubic use


def area_reduce(band: np.ndarray, axis: int, edges: np.ndarray) -> np.ndarray:
    """The mean of ``band`` over each interval ``[edges[j], edges[j + 1])`` along ``axis``, where pixel
    ``k`` covers ``[k, k + 1)``: an exact area-weighted resize for any ratio (float64). ``edges`` must
    rise from >= 0 to <= the axis length."""
    x = np.moveaxis(band, axis, 0).astype(np.float64)
    n = x.shape[0]
    prefix = np.concatenate([np.zeros((1, *x.shape[1:])), np.cumsum(x, 0)], 0)  # prefix[k]: pixels < k
    k = np.minimum(np.floor(edges).astype(np.int64), n - 1)
    frac = (edges - k).reshape(-1, *([1] * (x.ndim - 1)))
    integral = prefix[k] + frac * x[k]
    width = np.diff(edges).reshape(-1, *([1] * (x.ndim - 1)))
    return np.moveaxis((integral[1:] - integral[:-1]) / width, 0, axis)


def cubic_taps(big: int, small: int) -> tuple[np.ndarray, np.ndarray]:
    """For each of ``big`` positions of a bicubic enlargement from ``small`` samples (pixel centres
    aligned: position ``X`` reads ``(X + 0.5) * small / big - 0.5``), its 4 source indices (clamped to
    the edge) and cubic-convolution weights (Keys, a = -0.5; they sum to 1). Shapes (big, 4)."""
    x = (np.arange(big) + 0.5) * (small / big) - 0.5
    i = np.floor(x).astype(np.int64)
    d = np.abs((x - i)[:, None] - np.arange(-1, 3))
    a = _KEYS_A
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    weights = np.where(d <= 1, near, np.where(d < 2, far, 0.0))
    return np.clip(i[:, None] + np.arange(-1, 3), 0, small - 1), weights


def backproject(target, source: PIL.Image.Image, rounds: int = ROUNDS, rows: int = 256):
    """Make ``target`` (an (H, W, 3) uint8 array or a :class:`~anysize.io.stream.Rows`, in place)
    consistent with ``source``, the image it enlarges: ``rounds`` rounds of back-projection, ``rows``
    output rows at a time (the pipeline passes :func:`anysize.memory.color_fix_rows`). Returns ``target``."""
    out = stream.as_rows(target)
    source = source if source.mode == "RGB" else source.convert("RGB")
    w, h = source.size
    H, W = out.height, out.width
    if H < h or W < w:
        raise ValueError(f"backproject: the output ({W}x{H}) must not be smaller than its source ({w}x{h})")
    scale = H / h
    step = max(1, int(rows / scale))  # source rows measured per read
    col_edges = np.arange(w + 1) * (W / w)
    col_idx, col_w = cubic_taps(W, w)
    row_idx, row_w = cubic_taps(H, h)
    col_w, row_w = col_w.astype(np.float32), row_w.astype(np.float32)  # once, not per band
    for _ in range(rounds):
        err, err_top = np.zeros((0, w, 3), np.float32), 0  # the error of source rows err_top.. measured so far
        measured = corrected = 0  # source rows measured, output rows corrected
        while corrected < H:
            if measured < h:
                end = min(h, measured + step)
                top, bottom = int(np.floor(measured * scale)), min(H, int(np.ceil(end * scale)))
                rows_in = out.read(top, bottom)
                down = area_reduce(area_reduce(rows_in, 1, col_edges), 0, np.arange(measured, end + 1) * scale - top)
                src = np.asarray(source.crop((0, measured, w, end)))  # a band: the source is never copied whole
                err = np.concatenate([err, (src - down).astype(np.float32)], 0)
                measured = end
            # correct the rows whose taps are all measured; the rows the next read needs stay as they were
            limit = H if measured == h else min(int(np.searchsorted(row_idx[:, 3], measured)),
                                                int(np.floor(measured * scale)))
            for start in range(corrected, limit, rows):
                stop = min(limit, start + rows)
                taps, tw = row_idx[start:stop] - err_top, row_w[start:stop, :, None, None]
                coarse = sum(tw[:, k] * err[taps[:, k]] for k in range(4))  # (n, w, 3)
                fixed = out.read(start, stop).astype(np.float32)
                for k in range(4):
                    fixed += col_w[None, :, k, None] * coarse[:, col_idx[:, k]]
                out.write_rows(start, np.clip(fixed.round(), 0, 255).astype(np.uint8))
            corrected = max(corrected, limit)
            if corrected < H:  # forget the error rows no later tap reads
                keep = int(row_idx[corrected, 0])
                err, err_top = err[keep - err_top:], keep
    return target
