"""Back-projection (anysize.io.backproject): the area reduction, the bicubic taps, and the banded sweep."""

import numpy as np
import PIL.Image
import pytest

from anysize.io import stream
from anysize.io.backproject import area_reduce, backproject, cubic_taps


def _exact_area(x: np.ndarray, small: int) -> np.ndarray:
    """Area-weighted resize along axis 0 by brute force: each pixel's overlap with each output interval."""
    n = x.shape[0]
    out = np.zeros((small, *x.shape[1:]))
    for j in range(small):
        a, b = j * n / small, (j + 1) * n / small
        for k in range(n):
            overlap = max(0.0, min(b, k + 1) - max(a, k))
            out[j] += overlap * x[k]
        out[j] /= b - a
    return out


@pytest.mark.parametrize("n,small", [(12, 4), (13, 4), (10, 7), (9, 9), (100, 3)])
def test_area_reduce_is_the_exact_area_average(n, small):
    x = np.random.default_rng(n).random((n, 5, 3))
    got = area_reduce(x, 0, np.arange(small + 1) * (n / small))
    np.testing.assert_allclose(got, _exact_area(x, small), rtol=0, atol=1e-12)
    # along the other axis too, and a sub-range (what a band measures)
    got = area_reduce(x.transpose(1, 0, 2), 1, np.arange(small + 1) * (n / small))
    np.testing.assert_allclose(got, _exact_area(x, small).transpose(1, 0, 2), rtol=0, atol=1e-12)


def test_area_reduce_matches_pil_box_at_integer_factors():
    x = np.random.default_rng(0).random((48, 64)).astype(np.float32) * 255
    ours = area_reduce(area_reduce(x, 0, np.arange(13) * 4.0), 1, np.arange(17) * 4.0)
    pil = np.asarray(PIL.Image.fromarray(x, "F").resize((16, 12), PIL.Image.Resampling.BOX))
    np.testing.assert_allclose(ours, pil, rtol=0, atol=1e-3)


def test_cubic_taps_match_pil_bicubic_away_from_the_edges():
    x = np.random.default_rng(1).random((10, 12)).astype(np.float32) * 255
    H, W = 40, 48
    (ri, rw), (ci, cw) = cubic_taps(H, 10), cubic_taps(W, 12)
    np.testing.assert_allclose(rw.sum(1), 1.0, atol=1e-12)
    rows = np.einsum("yk,ykx->yx", rw, x[ri])
    ours = np.einsum("xk,yxk->yx", cw, rows[:, ci])
    pil = np.asarray(PIL.Image.fromarray(x, "F").resize((W, H), PIL.Image.Resampling.BICUBIC))
    inner = (slice(8, -8), slice(8, -8))  # PIL renormalises its kernel at the border; we clamp the taps
    np.testing.assert_allclose(ours[inner], pil[inner], rtol=0, atol=1e-3)


def _case(seed, size=(37, 23), factor=(4, 3.5)):
    rng = np.random.default_rng(seed)
    source = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    W, H = int(size[0] * factor[0]), int(size[1] * factor[1])
    target = np.asarray(PIL.Image.fromarray(source).resize((W, H), PIL.Image.Resampling.NEAREST)).copy()
    target = np.clip(target.astype(int) + rng.integers(-60, 60, target.shape), 0, 255).astype(np.uint8)
    return PIL.Image.fromarray(source), target


def _down(image: np.ndarray, size) -> np.ndarray:
    w, h = size
    H, W = image.shape[:2]
    return area_reduce(area_reduce(image, 1, np.arange(w + 1) * (W / w)), 0, np.arange(h + 1) * (H / h))


def test_backproject_makes_the_output_consistent_with_its_source():
    source, target = _case(0)
    src = np.asarray(source, np.float64)
    errors = [np.abs(_down(backproject(target.copy(), source, rounds=r), source.size) - src).mean()
              for r in (0, 1, 2, 16)]
    # white noise is the slowest case (area-down after bicubic-up damps its highest frequencies most);
    # every round still takes most of what is left, and many rounds converge to under one level
    assert errors[0] > 10 and errors[1] < 0.5 * errors[0] and errors[2] < 0.35 * errors[0], errors
    assert errors[3] < 1.0, errors
    out = backproject(target.copy(), source)
    # detail above the source's resolution is kept: the output is not a plain enlargement of the source
    smooth = np.asarray(source.resize(out.shape[1::-1], PIL.Image.Resampling.BICUBIC), np.float64)
    assert np.abs(out - smooth).mean() > 10


def test_backproject_band_by_band_and_on_disk_equals_one_band(tmp_path):
    source, target = _case(1)
    whole = backproject(target.copy(), source, rows=target.shape[0])
    for rows in (1, 5, 17):  # a source row spans 3.5 output rows: reads, taps and forgetting cross bands
        np.testing.assert_array_equal(backproject(target.copy(), source, rows=rows)[:, :, :], whole)
    with stream.Raster(tmp_path / "r.raw", *target.shape[:2]) as raster:
        raster.write_rows(0, target)
        backproject(raster, source, rows=7)
        np.testing.assert_array_equal(raster.read(0, target.shape[0]), whole)


def test_backproject_refuses_a_smaller_output():
    source, target = _case(2)
    with pytest.raises(ValueError, match="must not be smaller"):
        backproject(np.zeros((10, 10, 3), np.uint8), source)
