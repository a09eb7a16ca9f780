"""A seam metric that sees bands: regular steps of brightness at a tile pitch, across a whole image.

A tiled sampler that cuts at the same columns step after step leaves a step in the image's column
means there (a band edge), even where the gradient at the boundary is small: two smooth bands of
slightly different brightness. The statistic, per axis (columns or rows):

1. the profile: the mean of each column (over rows and channels) of the image, or of the error image
   (output minus the true render) when the truth is known; lightly blurred along the axis (Gaussian,
   ``sigma`` px) so a step spread over a pixel or two still counts once;
2. its steps: the derivative ``p[x + 1] - p[x]`` less its own local mean (a Gaussian of ``trend``
   px, default an eighth of the pitch, at least 4), in absolute value, so smooth content (a sky's
   gradient, a vignette, a colour shift) does not drown a step of a level or two;
3. ``S(phase)``: the median step at the positions ``phase + k * pitch`` (k >= 1, inside the image),
   the boundaries of a grid of that pitch: a band steps at every boundary, an object's edge at one,
   so the median keeps the first and drops the second (a mean let one edge error dominate on an image
   of three or four boundaries);
4. with the truth: ``S(0) / S(pitch / 2)`` (boundaries against the half-pitch offsets); without it:
   ``S(0)`` over the median of ``S`` at every offset away from the boundaries, so any image can be
   scored, a user's Stable Diffusion output included.

Pooled over images (:func:`pooled_ratio`): an image holds few boundaries (five rows of 128 px in 720),
so one image's ratio is a median of a handful of steps and ranges from 0.13 to 8.4 on a tile-free
bicubic enlargement (16 scenes at 1024x768, columns: ``benchmarks/results/seams.jsonl``); :func:`boundary_ratios` keeps each boundary's step over its image's baseline, and
the median over every boundary of every image, with a bootstrap interval over images
(:func:`bootstrap_interval`), is what compares methods.

1.0 is no band; a grid that shows scores well above (a synthetic step of 1/255 every 128 px on a
smooth image scores > 3, ``tests/test_seams.py``). The pitch may be fractional: stage 1's grid
enlarged by a non-integer factor lands between pixels, and positions are rounded.

numpy only; used by ``benchmarks/seams.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

AXES = ("columns", "rows")


def profile(image: np.ndarray, axis: str = "columns", reference: np.ndarray | None = None,
            sigma: float = 1.0) -> np.ndarray:
    """The blurred mean of each column (``axis="columns"``) or row of ``image`` (H x W or H x W x C, any
    dtype, taken as float), or of ``image - reference`` when ``reference`` (the same shape) is given."""
    if axis not in AXES:
        raise ValueError(f"axis={axis!r}: must be one of {', '.join(AXES)}")
    x = np.asarray(image, dtype=np.float64)
    if reference is not None:
        ref = np.asarray(reference, dtype=np.float64)
        if ref.shape != x.shape:
            raise ValueError(f"reference: shape {ref.shape} differs from the image's {x.shape}")
        x = x - ref
    if x.ndim == 3:
        x = x.mean(axis=2)
    if x.ndim != 2:
        raise ValueError(f"image: shape {x.shape}; must be H x W or H x W x C")
    line = x.mean(axis=0 if axis == "columns" else 1)
    return _blur(line, sigma)


def _blur(line: np.ndarray, sigma: float) -> np.ndarray:
    """A 1-D Gaussian blur with the ends mirrored (numpy has no filter of its own; scipy is not a dependency)."""
    if sigma <= 0:
        return line
    radius = max(1, math.ceil(3 * sigma))
    t = np.arange(-radius, radius + 1)
    kernel = np.exp(-(t**2) / (2 * sigma**2))
    kernel /= kernel.sum()
    padded = np.pad(line, radius, mode="reflect" if len(line) > radius else "edge")
    return np.convolve(padded, kernel, mode="valid")


def grid_steps(steps: np.ndarray, pitch: float, phase: float = 0.0) -> np.ndarray:
    """``steps`` (``steps[i]``: the step between pixels ``i`` and ``i + 1``) at the boundaries
    ``b = phase + k * pitch``, k >= 1 (the step between pixels ``b - 1`` and ``b``), in order."""
    n = len(steps) + 1  # pixels along the axis
    ks = np.arange(1, int((n - 1 - phase) // pitch) + 1)
    positions = np.rint(phase + ks * pitch).astype(int) - 1
    return steps[positions[(positions >= 0) & (positions < len(steps))]]


def grid_step(steps: np.ndarray, pitch: float, phase: float = 0.0) -> float:
    """The median of :func:`grid_steps`; NaN when no boundary fits."""
    at = grid_steps(steps, pitch, phase)
    return float(np.median(at)) if len(at) else math.nan


@dataclass(frozen=True)
class BandScore:
    """Band ratios of one image at one pitch: per axis, boundaries over half-pitch offsets (``half``)
    and over the median offset (``offsets``)."""

    pitch: float
    columns_half: float
    rows_half: float
    columns_offsets: float
    rows_offsets: float

    def ratio(self, axis: str, against: str = "half") -> float:
        return getattr(self, f"{axis}_{against}")


def _steps(line: np.ndarray, trend: float) -> np.ndarray:
    """``|d - blur(d, trend)|`` with ``d`` the derivative of ``line``: the steps above the local slope."""
    d = np.diff(line)
    return np.abs(d - _blur(d, trend))


def _pitch_steps(image: np.ndarray, pitch: float, axis: str, reference: np.ndarray | None, sigma: float,
                 trend: float | None) -> np.ndarray:
    """:func:`_steps` of the axis profile, the trend defaulting to ``max(4, pitch / 8)`` px."""
    if not pitch > 1:
        raise ValueError(f"pitch={pitch!r}: must be a number > 1 (px)")
    return _steps(profile(image, axis, reference, sigma), trend or max(4.0, pitch / 8))


def boundary_ratios(image: np.ndarray, pitch: float, axis: str = "columns", *,
                    reference: np.ndarray | None = None, against: str = "half", sigma: float = 1.0,
                    trend: float | None = None) -> np.ndarray:
    """Each boundary's step over the image's baseline (see :func:`band_ratio`, whose value is their
    median): what :func:`pooled_ratio` pools over images. Empty when the axis holds no boundary or
    the baseline is NaN; a zero baseline gives inf (0 where the step is 0 too)."""
    steps = _pitch_steps(image, pitch, axis, reference, sigma, trend)
    at = grid_steps(steps, pitch)
    base = _baseline(steps, pitch, against, sigma)
    if not len(at) or math.isnan(base):
        return np.empty(0)
    if base == 0:
        return np.where(at == 0, 0.0, math.inf)
    return at / base


def _baseline(steps: np.ndarray, pitch: float, against: str, sigma: float) -> float:
    if against == "half":
        return grid_step(steps, pitch, pitch / 2)
    if against == "offsets":
        guard = 2 * sigma + 1
        phases = [p for p in range(1, int(pitch)) if min(p, pitch - p) > guard]
        return float(np.median([grid_step(steps, pitch, p) for p in phases])) if phases else math.nan
    raise ValueError(f"against={against!r}: must be 'half' or 'offsets'")


def band_ratio(image: np.ndarray, pitch: float, axis: str = "columns", *, reference: np.ndarray | None = None,
               against: str = "half", sigma: float = 1.0, trend: float | None = None) -> float:
    """How much more the profile steps at multiples of ``pitch`` than elsewhere (1.0: no band).

    ``against="half"``: over the step at the half-pitch offsets (the statistic with ground truth);
    ``"offsets"``: over the median step at every whole-pixel offset farther than ``2 sigma + 1`` px
    from the boundaries (works on any image). ``sigma``: the profile's blur; ``trend``: the scale of
    the local slope taken off the steps (default ``max(4, pitch / 8)`` px). NaN when the axis holds
    no boundary."""
    steps = _pitch_steps(image, pitch, axis, reference, sigma, trend)
    at, base = grid_step(steps, pitch), _baseline(steps, pitch, against, sigma)
    if math.isnan(at) or math.isnan(base):
        return math.nan
    return at / base if base > 0 else (1.0 if at == 0 else math.inf)


def band_score(image: np.ndarray, pitch: float, *, reference: np.ndarray | None = None,
               sigma: float = 1.0, trend: float | None = None) -> BandScore:
    """:func:`band_ratio` on both axes, both ways."""
    values = {f"{axis}_{against}": band_ratio(image, pitch, axis, reference=reference, against=against, sigma=sigma,
                                             trend=trend)
              for axis in AXES for against in ("half", "offsets")}
    return BandScore(pitch, **values)


def ratios_at(image: np.ndarray, positions, axis: str = "columns", *, reference: np.ndarray | None = None,
              sigma: float = 1.0, trend: float = 16.0) -> np.ndarray:
    """Each step at ``positions`` (a boundary ``b``: the step between pixels ``b - 1`` and ``b``) over the
    median step at every pixel farther than ``2 sigma + 1`` px from all of them: the band metric at the
    cuts a sampler actually made (a one-step FSTD pass cuts at its drawn offset, not at multiples of the
    tile), for :func:`pooled_ratio`. ``trend`` as in :func:`band_ratio` (16 px: a 128 px pitch's)."""
    steps = _steps(profile(image, axis, reference, sigma), trend)
    at = np.array(sorted({int(p) - 1 for p in positions if 0 < int(p) <= len(steps)}), dtype=np.int64)
    if not len(at):
        return np.empty(0)
    distance = np.abs(np.arange(len(steps))[:, None] - at[None, :]).min(axis=1)
    far = steps[distance > 2 * sigma + 1]
    base = float(np.median(far)) if len(far) else math.nan
    if math.isnan(base):
        return np.empty(0)
    return np.where(steps[at] == 0, 0.0, math.inf) if base == 0 else steps[at] / base


def pooled_ratio(ratios: list[np.ndarray]) -> float:
    """The median of every image's :func:`boundary_ratios` together (NaN when there are none)."""
    values = np.concatenate([np.asarray(r, dtype=np.float64) for r in ratios]) if ratios else np.empty(0)
    return float(np.median(values)) if len(values) else math.nan


def _interval(statistic, n: int, level: float, draws: int, seed: int) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(indices)`` over ``n`` images resampled with
    replacement (NaN draws dropped; NaN, NaN when all are)."""
    if not 0 < level < 1:
        raise ValueError(f"level={level!r}: must be in (0, 1)")
    rng = np.random.default_rng(seed)
    stats = [statistic(rng.integers(0, n, n)) for _ in range(draws)]
    stats = [v for v in stats if not math.isnan(v)]
    if not stats:
        return math.nan, math.nan
    low, high = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def bootstrap_interval(ratios: list[np.ndarray], level: float = 0.9, draws: int = 2000,
                       seed: int = 0) -> tuple[float, float]:
    """A percentile bootstrap interval of :func:`pooled_ratio`, resampling whole images (the boundaries
    of one image are not independent: one content, one run)."""
    return _interval(lambda index: pooled_ratio([ratios[i] for i in index]), len(ratios), level, draws, seed)


def paired_interval(ratios: list[np.ndarray], reference: list[np.ndarray], level: float = 0.9, draws: int = 2000,
                    seed: int = 0) -> tuple[float, float, float]:
    """``pooled_ratio(ratios) / pooled_ratio(reference)`` and its percentile bootstrap interval, the
    same images resampled on both sides (``ratios[i]`` and ``reference[i]``: one scene by two methods).
    Pairing takes out what the scenes' contents share, which dominates :func:`bootstrap_interval`."""
    if len(ratios) != len(reference):
        raise ValueError(f"ratios: {len(ratios)} images, reference: {len(reference)}; must be the same scenes")

    def quotient(index) -> float:
        den = pooled_ratio([reference[i] for i in index])
        return pooled_ratio([ratios[i] for i in index]) / den if den > 0 else math.nan

    return (quotient(range(len(ratios))), *_interval(quotient, len(ratios), level, draws, seed))
