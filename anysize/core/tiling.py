"""Tile geometry for tiled diffusion: pure integers in, boxes out.

A box is ``(top, left, bottom, right)`` in latent pixels, half-open, always inside the canvas.
Nothing here knows about models; randomness comes only from the caller's ``torch.Generator``.

Three plans:

- :func:`fstd_tiles` -- Fast Seamless Tiled Diffusion (Zheng et al. 2023, "Any-Size-Diffusion",
  sec. 3.3): a non-overlapping grid shifted by a random offset at every denoising step, so tile
  borders never stay in one place and one step costs about one full-latent evaluation.
- :func:`overlap_tiles` -- the explicit-overlap grid of MultiDiffusion / Mixture of Diffusers / StableSR.
- :func:`naive_tiles` -- a fixed non-overlapping grid: the seam baseline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import torch

Box = tuple[int, int, int, int]

METHODS = ("fstd", "overlap", "naive", "none")
WEIGHTINGS = ("uniform", "linear", "gaussian")
SHIFTS = ("auto", "both", "alternate")
EDGES = ("cut", "clamp")
LAST_STEPS = ("blend", "single")
DEFAULT_TILE_BATCH = 8  # tiles per denoiser call when neither the caller nor a planner chose
AREA_BUDGET = 1.15  # "auto" shifts both axes only while that costs at most this much evaluated area


def _check_size(name: str, value: int, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}={value!r}: must be an integer >= {minimum}")


def _axis_starts(length: int, tile: int, offset: int) -> list[int]:
    """Starts of the tiles along one axis for a grid whose cuts lie at ``offset + k * tile``.

    Each band between two cuts (and the canvas edges) gets one tile of size ``tile`` placed at the
    band's start, clamped inward so it ends inside the canvas; together they cover ``[0, length)``.
    """
    band_starts = [0] + list(range(offset or tile, length, tile))
    starts = sorted({min(s, length - tile) for s in band_starts})
    return starts


def _cut_bands(length: int, tile: int, offset: int, granularity: int = 1) -> list[tuple[int, int]]:
    """The bands ``[start, end)`` of one axis cut at ``offset + k * tile`` (and the canvas edges), for
    tiles of each band's own size: every pixel in exactly one band, nothing evaluated twice.

    A band at either end thinner than half a tile is joined to its neighbour; where the pair is larger
    than ``tile``, the sliver takes half a tile (on ``granularity``) from its neighbour instead. So no
    tile is thinner than about half a tile (a sliver of a few pixels would be denoised with almost no
    context), none is larger than ``tile``, and that cut still moves with ``offset`` (splitting the
    pair at its midpoint would put it on fewer columns, and more often on the same one).
    """
    if tile >= length:
        return [(0, length)]
    cuts = [0, *range(offset or tile, length, tile), length]
    bands = list(zip(cuts[:-1], cuts[1:]))
    half = max(1, tile // 2 // granularity * granularity)

    def rejoin(start: int, at: int, end: int) -> list[tuple[int, int]]:
        # `at`: where the sliver's band ends after taking half a tile from its neighbour; where that
        # neighbour is itself short of a tile (a canvas under two tiles long), the pair's midpoint
        if end - start <= tile:
            return [(start, end)]
        if min(at - start, end - at) < half:
            at = max(end - tile, start + (end - start) // 2 // granularity * granularity)
        return [(start, at), (at, end)]

    if len(bands) > 1 and bands[0][1] - bands[0][0] < tile / 2:
        bands[:2] = rejoin(bands[0][0], bands[0][1] + half, bands[1][1])
    if len(bands) > 1 and bands[-1][1] - bands[-1][0] < tile / 2:
        bands[-2:] = rejoin(bands[-2][0], bands[-1][0] - half, bands[-1][1])
    return bands


def _mid_bands(bands: list[tuple[int, int]], tile: int, granularity: int = 1) -> list[tuple[int, int]]:
    """The bands of a second cut grid whose cuts lie at the midpoints (on ``granularity``) of ``bands``,
    so each grid's cuts fall mid-band in the other (a grid merely shifted by half a tile would meet the
    first one's sliver-joining cut at a canvas end). A band between two midpoints is at most ``tile``;
    an end band (half of the first grid's end band) joins its neighbour where the pair fits in a tile.
    """
    length = bands[-1][1]
    mids = sorted({s + (e - s) // 2 // granularity * granularity for s, e in bands} - {0})
    cuts = [0, *(m for m in mids if m < length), length]
    out = list(zip(cuts[:-1], cuts[1:]))
    if len(out) > 1 and out[0][1] - out[0][0] < tile / 2 and out[1][1] <= tile:
        out[:2] = [(0, out[1][1])]
    if len(out) > 1 and out[-1][1] - out[-1][0] < tile / 2 and length - out[-2][0] <= tile:
        out[-2:] = [(out[-2][0], length)]
    return out


def _grid(height: int, width: int, tile_h: int, tile_w: int, ys: list[int], xs: list[int]) -> list[Box]:
    return [(y, x, y + tile_h, x + tile_w) for y in ys for x in xs]


def naive_tiles(height: int, width: int, tile: int) -> list[Box]:
    """Fixed non-overlapping grid (the seam baseline); the last row/column is clamped inward.

    Tiles are ``min(tile, height) x min(tile, width)`` latent pixels.
    """
    for name, v in (("height", height), ("width", width), ("tile", tile)):
        _check_size(name, v)
    th, tw = min(tile, height), min(tile, width)
    return _grid(height, width, th, tw, _axis_starts(height, th, 0), _axis_starts(width, tw, 0))


def _overlap_starts(length: int, tile: int, stride: int) -> list[int]:
    if tile >= length:
        return [0]
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)  # snap the last tile to the far edge: full coverage
    return starts


def overlap_tiles(height: int, width: int, tile: int, stride: int) -> list[Box]:
    """Explicit-overlap grid (MultiDiffusion, Mixture of Diffusers, StableSR).

    Windows of ``min(tile, side)`` latent px every ``stride`` px; the last one snaps to the edge.
    """
    for name, v in (("height", height), ("width", width), ("tile", tile), ("stride", stride)):
        _check_size(name, v)
    if stride > tile:
        raise ValueError(f"stride={stride}: must be <= tile={tile}, or the grid leaves gaps")
    th, tw = min(tile, height), min(tile, width)
    return _grid(height, width, th, tw, _overlap_starts(height, th, stride), _overlap_starts(width, tw, stride))


def _draw_offset(bound: int, generator: torch.Generator) -> int:
    """Uniform integer in ``[0, bound]`` from the caller's generator; no draw when ``bound == 0``."""
    if bound <= 0:
        return 0
    return int(torch.randint(0, bound + 1, (1,), generator=generator, device=generator.device).item())


def fstd_tiles(
    height: int,
    width: int,
    tile: int,
    *,
    generator: torch.Generator,
    max_offset: int | None = None,
    axes: Literal["both", "y", "x", "none"] = "both",
    edges: Literal["clamp", "cut"] = "clamp",
    granularity: int = 1,
    blend: bool = False,
) -> list[Box]:
    """FSTD tile plan for one step: a non-overlapping grid shifted by a random offset (ASD sec. 3.3).

    The grid's cuts lie at ``(dy + k * tile, dx + k * tile)`` with ``dy, dx`` drawn uniformly in
    ``[0, max_offset]`` (default ``tile - 1``: every border position is reachable) from ``generator``.
    Unlike the official code, which leaves the strip ``[0, offset)`` unevaluated, every latent pixel is
    covered: the tile of a partial band at a canvas edge is clamped inward and overlaps its neighbour
    (nothing wraps around, nothing is padded). All tiles are ``min(tile, height) x min(tile, width)``
    so they batch, and there are at most ``(ceil(H/t) + 1) * (ceil(W/t) + 1)`` of them.
    ``axes`` limits the shift to one axis ("y" or "x") or none for this step. An axis that holds a
    single tile draws nothing from the generator, so a one-tile canvas is plain untiled sampling.

    ``edges="cut"`` gives each partial band at a canvas edge a tile of its own size instead (a band
    thinner than half a tile shares a split with its neighbour, :func:`_cut_bands`): every latent pixel
    is evaluated exactly once, so shifting both axes costs no extra area, and no tile edge stays put
    from step to step (a clamped edge tile always has one side at ``tile`` or ``length - tile``). The
    offsets are then multiples of ``granularity`` (the UNet's downsampling factor), so inner tiles keep
    sides the UNet divides evenly.

    ``blend=True`` adds a second grid, no extra draw, whose cuts lie mid-band in the first on each axis
    that holds more than one tile (cut: at the first grid's band midpoints, :func:`_mid_bands`; clamp:
    half a tile on). Every pixel is then covered by two boxes (more at clamped edges), listed row-major,
    for a merge with weights that fall towards each tile's edges (``TilingConfig.last_step``): each
    grid's cuts lie inside the other's tiles, so neither leaves a line.
    """
    for name, v in (("height", height), ("width", width), ("tile", tile)):
        _check_size(name, v)
    if axes not in ("both", "y", "x", "none"):
        raise ValueError(f"axes={axes!r}: must be one of 'both', 'y', 'x', 'none'")
    if edges not in EDGES:
        raise ValueError(f"edges={edges!r}: must be one of {', '.join(EDGES)}")
    if max_offset is not None:
        _check_size("max_offset", max_offset, minimum=0)
    _check_size("granularity", granularity)
    th, tw = min(tile, height), min(tile, width)
    step = granularity if edges == "cut" else 1

    def offset(length: int, t: int, shifted: bool) -> int:
        if not shifted or t >= length:
            return 0
        bound = t - 1 if max_offset is None else min(max_offset, t - 1)
        return _draw_offset(bound // step, generator) * step

    dy = offset(height, th, axes in ("both", "y"))
    dx = offset(width, tw, axes in ("both", "x"))

    def bands(length: int, t: int, offset: int) -> list[tuple[int, int]]:
        if edges == "cut":
            return _cut_bands(length, t, offset, granularity)
        return [(start, start + t) for start in _axis_starts(length, t, offset)]

    def second(first: list[tuple[int, int]], length: int, t: int, offset: int) -> list[tuple[int, int]]:
        if edges == "cut":
            return _mid_bands(first, t, granularity)
        return bands(length, t, (offset + t // 2) % t)  # full tiles half a tile on, clamped like the first

    def boxes(ys: list[tuple[int, int]], xs: list[tuple[int, int]]) -> list[Box]:
        return [(top, left, bottom, right) for top, bottom in ys for left, right in xs]

    ys, xs = bands(height, th, dy), bands(width, tw, dx)
    if not blend or (th >= height and tw >= width):
        return boxes(ys, xs)
    return sorted(boxes(ys, xs) + boxes(second(ys, height, th, dy), second(xs, width, tw, dx)))


@dataclass(frozen=True)
class TilingConfig:
    """How the sampler splits the latent at each step.

    method: "fstd" (shifted grid, default), "overlap" (explicit overlap), "naive" (fixed grid),
        "none" (one tile covering the whole latent).
    tile_size: tile side in latent pixels; None (default): the denoiser's native ``sample_size``, filled
        in by :class:`anysize.core.sampler.TiledModel` (or :meth:`resolved`) before any plan is made.
    stride: overlap grid step in latent px (default ``tile_size // 2``, as StableSR / Tiled Diffusion).
    max_offset: FSTD offset bound in latent px (default ``tile_size - 1``; the official code used tile/2).
    reset_every: FSTD: every k-th step (k > 0, counting from step 0) uses the unshifted grid
        (the official code used 4; 0 never resets).
    shift: FSTD: which axes move each step. "both" shifts both every step; "alternate" shifts y on even
        steps and x on odd ones; "auto" (default) shifts both whenever that is cheap: always with
        ``edges="cut"``, and with ``edges="clamp"`` while it costs at most ``AREA_BUDGET`` (1.15) times
        the latent area (grids of about 14 x 14 tiles and up) and on the last step (when ``plan`` is
        told the number of steps). Alternating leaves one axis on the base grid every other step, so
        half the steps cut at the same columns or rows: a band at the tile pitch (``benchmarks/seams.py``,
        docs/benchmarks.md). An axis holding a single tile never shifts.
    edges: FSTD: "cut" (default) gives the partial bands at the canvas edges tiles of their own size
        (:func:`fstd_tiles`): each latent pixel is evaluated once per step, so shifting both axes costs
        exactly the latent's area, and no tile edge stays at one place; "clamp" uses full-size tiles
        pushed inward, overlapping their neighbours (``(n + 1)^2`` tiles on an ``n x n`` grid, one side
        of each edge tile always at the same column or row).
    last_step: FSTD: "blend" (default) evaluates the last step on two grids, the second cut mid-band in
        the first on both axes (:func:`fstd_tiles` ``blend``), and merges them with tent weights
        (``weighting`` when that is not uniform), so the last update, which no later step smooths, has
        no cut line (a single grid's last cuts show as faint lines at their rows: docs/benchmarks.md);
        it costs one extra step's area, ``1 + 1/steps`` times the latent per step on average.
        "single": one grid on every step.
    granularity: FSTD with ``edges="cut"``: offsets are multiples of this (latent px); None: the
        denoiser's ``granularity`` (a UNet's downsampling factor), filled in by ``TiledModel``, else 1.
    weighting: how overlapping tile outputs blend: "uniform", "linear" or "gaussian"
        (None: uniform for fstd/naive/none, gaussian for overlap).
    tile_batch_size: tiles per denoiser call (classifier-free guidance doubles the model batch); None
        (default): :data:`DEFAULT_TILE_BATCH` in the sampler, the memory planner's choice in the pipeline.
    """

    method: str = "fstd"
    tile_size: int | None = None
    stride: int | None = None
    max_offset: int | None = None
    reset_every: int = 0
    shift: str = "auto"
    edges: str = "cut"
    last_step: str = "blend"
    granularity: int | None = None
    weighting: str | None = None
    tile_batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"tiling={self.method!r}: must be one of {', '.join(METHODS)}")
        if self.tile_size is not None:
            _check_size("tile_size", self.tile_size)
        if self.tile_batch_size is not None:
            _check_size("tile_batch_size", self.tile_batch_size)
        _check_size("reset_every", self.reset_every, minimum=0)
        if self.stride is not None:
            _check_size("stride", self.stride)
            if self.tile_size is not None and self.stride > self.tile_size:
                raise ValueError(f"stride={self.stride}: must be <= tile_size={self.tile_size}, or the grid leaves gaps")
        if self.shift not in SHIFTS:
            raise ValueError(f"shift={self.shift!r}: must be one of {', '.join(SHIFTS)}")
        if self.edges not in EDGES:
            raise ValueError(f"edges={self.edges!r}: must be one of {', '.join(EDGES)}")
        if self.last_step not in LAST_STEPS:
            raise ValueError(f"last_step={self.last_step!r}: must be one of {', '.join(LAST_STEPS)}")
        if self.granularity is not None:
            _check_size("granularity", self.granularity)
        if self.weighting is not None and self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting={self.weighting!r}: must be one of {', '.join(WEIGHTINGS)}")

    def resolved(self, tile_size: int, tile_batch_size: int = DEFAULT_TILE_BATCH) -> TilingConfig:
        """This config with an unset ``tile_size`` / ``tile_batch_size`` given these values."""
        return replace(self, tile_size=self.tile_size or tile_size,
                       tile_batch_size=self.tile_batch_size or tile_batch_size)

    @property
    def blend(self) -> str:
        if self.weighting is not None:
            return self.weighting
        return "gaussian" if self.method == "overlap" else "uniform"

    def blends(self, step: int, num_steps: int | None) -> bool:
        """Whether FSTD evaluates ``step`` on two grids (``last_step="blend"``: the last of ``num_steps``)."""
        return (self.method == "fstd" and self.last_step == "blend" and num_steps is not None
                and step == num_steps - 1)

    def blend_at(self, step: int, num_steps: int | None) -> str:
        """The merge weighting of ``step``: :attr:`blend`, or for a two-grid step a weighting that falls
        towards tile edges ("linear" unless ``weighting`` names a non-uniform one)."""
        if self.blends(step, num_steps) and self.blend == "uniform":
            return "linear"
        return self.blend

    def _axes(self, height: int, width: int, step: int, num_steps: int | None = None) -> str:
        """Which axes FSTD shifts at ``step`` of ``num_steps`` (see ``shift``)."""
        t = self.tile_size
        ny, nx = math.ceil(height / t), math.ceil(width / t)
        if self.shift == "both" or ny == 1 or nx == 1:
            return "both"  # with one axis fixed by the canvas, "both" shifts the other every step
        last = num_steps is not None and step == num_steps - 1
        cheap = self.edges == "cut" or (ny + 1) * (nx + 1) <= AREA_BUDGET * ny * nx
        if self.shift == "auto" and (last or cheap):
            return "both"
        return "y" if step % 2 == 0 else "x"

    def plan(self, height: int, width: int, step: int, generator: torch.Generator,
             num_steps: int | None = None) -> list[Box]:
        """The boxes to evaluate at denoising step ``step`` (of ``num_steps``, when known) of a
        ``height x width`` latent."""
        if self.method == "none":
            return [(0, 0, height, width)]
        if self.tile_size is None:
            raise ValueError("tile_size=None: resolve it first (TilingConfig.resolved(tile_size), or let "
                             "TiledModel take the denoiser's native size)")
        if self.method == "naive":
            return naive_tiles(height, width, self.tile_size)
        if self.method == "overlap":
            return overlap_tiles(height, width, self.tile_size, self.stride or max(1, self.tile_size // 2))
        axes = self._axes(height, width, step, num_steps)
        if self.reset_every and step % self.reset_every == 0:
            axes = "none"
        return fstd_tiles(height, width, self.tile_size, generator=generator, max_offset=self.max_offset, axes=axes,
                          edges=self.edges, granularity=self.granularity or 1,
                          blend=self.blends(step, num_steps))


def tile_weights(
    height: int, width: int, kind: str = "uniform", *, dtype=torch.float32, device=None
) -> torch.Tensor:
    """Blend weights of one ``height x width`` tile, strictly positive everywhere.

    uniform: all ones (a pixel covered once keeps its tile's output exactly).
    linear: a tent rising from the tile's edges to its centre.
    gaussian: ``exp(-d^2 / 2 sigma^2)`` with sigma a quarter of the side (Mixture of Diffusers, StableSR).
    """
    if kind not in WEIGHTINGS:
        raise ValueError(f"weighting={kind!r}: must be one of {', '.join(WEIGHTINGS)}")
    if kind == "uniform":
        return torch.ones(height, width, dtype=dtype, device=device)

    def profile(n: int) -> torch.Tensor:
        i = torch.arange(n, dtype=torch.float64)
        if kind == "linear":
            return torch.minimum(i + 1, n - i) / math.ceil(n / 2)
        centre, sigma = (n - 1) / 2, max(n / 4, 0.5)
        return torch.exp(-((i - centre) ** 2) / (2 * sigma**2))

    return torch.outer(profile(height), profile(width)).to(dtype=dtype, device=device)


def coverage(height: int, width: int, boxes: list[Box]) -> torch.Tensor:
    """How many boxes cover each latent pixel (an int32 ``height x width`` map)."""
    count = torch.zeros(height, width, dtype=torch.int32)
    for top, left, bottom, right in boxes:
        count[top:bottom, left:right] += 1
    return count
