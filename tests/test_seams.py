"""The band metric (anysize.train.seams): a synthetic band at a pitch is found, a seam-free image is not."""

import math

import numpy as np
import PIL.Image
import pytest

from anysize.train.scenes import render, sample_scene
from anysize.train.seams import (band_ratio, band_score, bootstrap_interval, boundary_ratios, grid_step,
                                 paired_interval, pooled_ratio, profile, ratios_at)


def smooth_field(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth random image in [0, 255] (low-frequency sinusoids): content without any grid."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    field = np.zeros((height, width))
    for _ in range(8):
        fx, fy = rng.uniform(0.5, 6, 2)
        field += np.sin(2 * np.pi * (fx * x + fy * y) + rng.uniform(0, 2 * np.pi))
    field = (field - field.min()) / (field.max() - field.min()) * 200 + 20
    return np.repeat(field[..., None], 3, axis=2)


def with_bands(image: np.ndarray, pitch: int, step: float, axis: str = "columns") -> np.ndarray:
    """Alternate tiles shifted by ``step`` levels: a brightness step at every multiple of ``pitch``."""
    out = image.copy()
    n = out.shape[1] if axis == "columns" else out.shape[0]
    offsets = np.where((np.arange(n) // pitch) % 2 == 1, step, 0.0)
    return out + (offsets[None, :, None] if axis == "columns" else offsets[:, None, None])


@pytest.mark.parametrize("seed", range(4))
def test_a_band_at_the_pitch_is_found_and_a_smooth_image_scores_about_one(seed):
    clean = smooth_field(384, 1024, seed)
    banded = with_bands(clean, 128, 1.0)
    for against in ("half", "offsets"):
        assert band_ratio(banded, 128, "columns", against=against) > 3
        assert 0.3 < band_ratio(clean, 128, "columns", against=against) < 3
    # the other axis carries no band; the rows axis sees one only when it is there
    assert band_ratio(banded, 128, "rows", against="offsets") < 3
    assert band_ratio(with_bands(clean, 96, 1.0, axis="rows"), 96, "rows", against="offsets") > 3


def test_with_the_truth_content_cancels():
    """The error image of a banded copy has only the bands: a high score however busy the content;
    an unbanded copy with noise scores about 1."""
    scene = sample_scene(np.random.default_rng(3), aspect=0.5)
    truth = render(scene, 1024, 512).astype(np.float64)
    rng = np.random.default_rng(0)
    noisy = truth + rng.normal(0, 2, truth.shape)
    assert band_ratio(with_bands(noisy, 128, 1.0), 128, reference=truth) > 3
    assert 0.3 < band_ratio(noisy, 128, reference=truth) < 3
    # bicubic from a quarter: errors at edges, none periodic at 128 px
    small = PIL.Image.fromarray(truth.astype(np.uint8)).resize((256, 128), PIL.Image.Resampling.BICUBIC)
    bicubic = np.asarray(small.resize((1024, 512), PIL.Image.Resampling.BICUBIC), dtype=np.float64)
    score = band_score(bicubic, 128, reference=truth)
    assert 0.2 < score.columns_half < 5 and 0.2 < score.rows_half < 5


def test_pooled_over_images_a_faint_band_is_found_that_single_images_miss():
    """A band too faint for one image (0.3 levels at 128 px on 720 rows: five boundaries) stands out when
    the boundaries of twelve images are pooled; clean copies pool to about 1, with an interval around it."""
    clean = [smooth_field(720, 256, seed) + np.random.default_rng(seed).normal(0, 0.4, (720, 256, 3))
             for seed in range(12)]
    banded = [with_bands(image, 128, 0.3, axis="rows") for image in clean]
    for image in clean[:2] + banded[:2]:  # band_ratio is the median of one image's boundary ratios
        r = boundary_ratios(image, 128, "rows", against="offsets")
        assert len(r) == 5 and np.median(r) == pytest.approx(band_ratio(image, 128, "rows", against="offsets"))
    pooled = [boundary_ratios(image, 128, "rows", against="offsets") for image in banded]
    free = [boundary_ratios(image, 128, "rows", against="offsets") for image in clean]
    singles = [float(np.median(r)) for r in pooled]
    assert sum(v < max(np.median(r) for r in free) for v in singles) >= 3  # one image at a time: no verdict
    low, high = bootstrap_interval(free)
    assert 0.7 < pooled_ratio(free) < 1.3 and low < pooled_ratio(free) < high
    assert pooled_ratio(pooled) > 1.5 and bootstrap_interval(pooled)[0] > high  # pooled: the intervals part
    assert math.isnan(pooled_ratio([])) and len(boundary_ratios(np.ones((4, 100)), 128)) == 0


def test_steps_at_a_runs_own_cuts_are_found_wherever_they_lie():
    """A grid cut at an offset (as one FSTD step cuts) scores high at its own positions and about 1 at
    multiples of the pitch from 0, where ratios_at of a clean image scores about 1 too."""
    clean = smooth_field(384, 1024, 2)
    shifted = clean.copy()
    cuts = list(range(40, 1024, 128))  # a grid drawn at offset 40
    for k, c in enumerate(cuts):
        shifted[:, c:] += 1.0 if k % 2 == 0 else -1.0
    assert np.median(ratios_at(shifted, cuts)) > 3
    assert np.median(ratios_at(clean, cuts)) < 2
    assert band_ratio(shifted, 128, against="offsets") < 2  # the multiples of 128 miss it
    assert len(ratios_at(clean, [0, 5000])) == 0  # no interior position


def test_paired_interval_divides_the_pooled_ratios_scene_by_scene():
    rng = np.random.default_rng(0)
    reference = [rng.uniform(0.5, 1.5, 6) for _ in range(10)]
    doubled = [2 * r for r in reference]
    value, low, high = paired_interval(doubled, reference)
    assert value == pytest.approx(2.0) and low == pytest.approx(2.0) and high == pytest.approx(2.0)
    value, low, high = paired_interval([rng.uniform(0.5, 1.5, 6) for _ in range(10)], reference)
    assert low < value < high and low < 1 < high
    with pytest.raises(ValueError, match="same scenes"):
        paired_interval(doubled[:3], reference)


def test_a_fractional_pitch_lands_between_pixels():
    clean = smooth_field(200, 1000, 1)
    banded = clean.copy()
    pitch = 83.3  # e.g. a 16 px grid enlarged 5.2x
    for k in range(1, 12):
        banded[:, int(round(k * pitch)):] += 0.5 if k % 2 else -0.5
    assert band_ratio(banded, pitch, against="offsets") > 3
    assert band_ratio(banded, 100, against="offsets") < band_ratio(banded, pitch, against="offsets") / 2


def test_pieces_and_errors():
    steps = np.array([0.0, 5.0, 0.0, 0.0, 7.0, 0.0, 0.0])  # pixels 0..7; steps at boundaries 2 and 5
    assert grid_step(steps, 3, 2 - 3 + 0) == pytest.approx(6.0)  # boundaries -1+3k: 2, 5
    assert math.isnan(grid_step(steps, 100))
    assert profile(np.ones((4, 6)), "rows").shape == (4,)
    with pytest.raises(ValueError, match="axis='diagonal'"):
        profile(np.ones((4, 6)), "diagonal")
    with pytest.raises(ValueError, match="pitch=1"):
        band_ratio(np.ones((4, 6)), 1)
    with pytest.raises(ValueError, match="reference: shape"):
        band_ratio(np.ones((4, 6)), 2, reference=np.ones((4, 5)))
