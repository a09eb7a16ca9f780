"""Tiled VAE decode and encode whose GroupNorms use statistics of the whole image.

Decoding a large latent in one piece runs out of memory, and decoding it tile by tile lets every
tile normalise with its own GroupNorm statistics, so tiles differ in colour and tone. Here every
``torch.nn.GroupNorm`` of the VAE's decoder (or encoder) is temporarily routed through
:func:`_patched_group_norms`, which either *records* per-group partial sums over the part of the
tile that the tile owns, or *applies* given whole-image (mean, var). Tiles then agree with the
untiled VAE:

- ``mode="exact"``: for each GroupNorm ``g`` in call order, every tile is run up to ``g`` (earlier
  GroupNorms apply the global statistics found so far, ``g`` records, then the forward stops), the
  partial sums are reduced to the global (mean, var) of ``g``; a last pass applies them all and
  writes the output. About ``G / 2`` full decodes for ``G`` GroupNorms, memory bounded by one tile
  batch. With ``margin >=`` the receptive-field radius (:func:`decoder_margin`,
  :func:`encoder_margin`) the result equals the untiled VAE up to float rounding (~1e-5 in fp32).
- ``mode="fast"`` (approximate): every GroupNorm's (mean, var) is estimated once by running the
  VAE untiled on an area-downsampled copy of the input (longer side at most ``stats_size``), then
  one tiled pass applies them. About one full decode plus one small one. Error against untiled,
  measured on a tiny random-weight VAE with perturbed GroupNorms (tests/test_vae.py; pessimistic
  for a trained VAE), in [-1, 1]: 0.012 mean / 0.15 max with stats 1.0x..1.5x smaller than the
  latent, 0.083 mean / 1.5 max at 2x smaller; exact mode: 6e-6 max.

The exception is the mid-block self-attention (``mid_block_add_attention=True``, the default of
SD's VAE): in tiled mode it attends only within the tile plus margin, so tiled output is close to,
but not equal to, the untiled output (measured on the random tiny VAE: 0.023 mean abs error).
Its GroupNorm still uses whole-image statistics.

Precision: statistics are accumulated in float64; normalisation runs in at least float32. With a
float16 VAE, a tile whose statistics or output come out non-finite (the fp16 "black spots") is redone
in a lazily made float32 copy, with a ``RuntimeWarning`` counting such tiles; with
``config.force_upcast`` a float16 VAE runs in float32 from the start, as diffusers' pipelines do.
The patch replaces GroupNorm ``forward`` methods, so hooks that offloading libraries put on the
GroupNorm modules themselves are bypassed while a call runs.

Boxes are ``(top, left, bottom, right)``, half-open, in latent pixels, as in :mod:`anysize.core.tiling`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import itertools
import math
import warnings
from typing import Any, Callable, Iterator, Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .progress import Progress, progress_bar

Box = tuple[int, int, int, int]
Mode = Literal["exact", "fast"]
Emit = Callable[["_Tile", Tensor], None]
MODES = ("exact", "fast")
OUTPUTS = ("uint8", "float32")

__all__ = [
    "TileWriter",
    "decoder_margin",
    "encoder_margin",
    "tiled_decode",
    "tiled_encode",
    "vae_scale_factor",
]


class TileWriter(Protocol):
    """Receives decoded pixels tile by tile: ``tile`` is an ``(h, w, C)`` array placed at ``(top, left)``."""

    def write(self, top: int, left: int, tile: np.ndarray) -> None: ...


# ----------------------------------------------------------------------------------------------
# Geometry from the VAE config


def vae_scale_factor(vae: nn.Module) -> int:
    """Pixels per latent pixel: ``2 ** (len(block_out_channels) - 1)`` (one x2 resample per extra block)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def decoder_margin(config: Any) -> int:
    """Receptive-field radius in latent px of the decoder's 3x3 convs: the margin that makes tiles exact.

    Counts how far wrong values from a tile's edge creep inward, in px of the current resolution:
    +1 per 3x3 conv (conv_in, 2 mid-block resnets, ``layers_per_block + 1`` resnets per up block,
    each upsample's conv, conv_out), x2 per nearest upsample; rounded up to latent px.
    """
    n = len(config.block_out_channels)
    width = 1 + 2 * 2  # conv_in, then the mid-block's two resnets (two 3x3 convs each)
    for i in range(n):
        width += 2 * (config.layers_per_block + 1)
        if i < n - 1:
            width = 2 * width + 1  # nearest x2, then the upsample's conv
    return math.ceil((width + 1) / 2 ** (n - 1))  # + conv_out


def encoder_margin(config: Any) -> int:
    """Receptive-field radius in latent px of the encoder's convs: the exact-tile margin (x factor in image px).

    Same count as :func:`decoder_margin`, read forward: +1 per 3x3 conv, and a stride-2 downsample
    maps a wrong width ``w`` to ``w // 2 + 1`` (its kernel reaches 2 px past the tile's right edge).
    """
    n = len(config.block_out_channels)
    width = 1  # conv_in
    for i in range(n):
        width += 2 * config.layers_per_block
        if i < n - 1:
            width = width // 2 + 1
    return width + 2 * 2 + 1  # mid-block resnets, conv_out (already at latent resolution)


@dataclasses.dataclass(frozen=True)
class _Tile:
    core: Box  # the latent px this tile writes
    crop: Box  # core plus margin, clamped to the canvas: what the tile reads

    @property
    def shape(self) -> tuple[int, int]:
        return self.crop[2] - self.crop[0], self.crop[3] - self.crop[1]

    def region(self) -> Box:
        """The core box relative to the crop."""
        t, l = self.crop[:2]
        return self.core[0] - t, self.core[1] - l, self.core[2] - t, self.core[3] - l


def _plan_tiles(height: int, width: int, tile: int, margin: int) -> list[_Tile]:
    """Core tiles of ``tile`` latent px partitioning the canvas, each read with ``margin`` px around it."""
    tiles = []
    for top, left in itertools.product(range(0, height, tile), range(0, width, tile)):
        core = (top, left, min(top + tile, height), min(left + tile, width))
        crop = (max(core[0] - margin, 0), max(core[1] - margin, 0),
                min(core[2] + margin, height), min(core[3] + margin, width))
        tiles.append(_Tile(core, crop))
    return tiles


def _batches(tiles: list[_Tile], size: int) -> Iterator[list[int]]:
    """Indices of tiles in groups of equal crop shape (so they stack), at most ``size`` per group."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, t in enumerate(tiles):
        groups.setdefault(t.shape, []).append(i)
    for idx in groups.values():
        for k in range(0, len(idx), size):
            yield idx[k:k + size]


def _stats_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """Latent size of the downsampled copy used by fast mode: longer side at most ``size``."""
    scale = min(1.0, size / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def _area_downsample(crop: Callable[[Box], Tensor], height: int, width: int, size: tuple[int, int]) -> Tensor:
    """Area resize (as ``F.interpolate(mode="area")``) reading one output row's strip at a time."""
    rows = []
    for i in range(size[0]):
        top, bottom = i * height // size[0], -(-(i + 1) * height // size[0])
        strip = crop((top, 0, bottom, width)).float().mean(dim=2, keepdim=True)
        rows.append(F.adaptive_avg_pool2d(strip, (1, size[1])))
    return torch.cat(rows, dim=2)


# ----------------------------------------------------------------------------------------------
# GroupNorm patch: record partial sums over a tile's core, or apply given global statistics


class _StopForward(Exception):
    """Raised by the recording GroupNorm: the rest of the forward is not needed for this pass."""


@dataclasses.dataclass
class _GNState:
    """What the patched GroupNorms do during one forward; GroupNorms are named by call index."""

    # (mean, var) per group of each GroupNorm, by call index; float64
    known: list[tuple[Tensor, Tensor]] = dataclasses.field(default_factory=list)
    # exact mode: the call index that records partial sums and then stops the forward
    record: int | None = None
    # fast mode's stats run: each call past `known` uses, and appends, its own whole-input statistics
    record_all: bool = False
    order: list[str] = dataclasses.field(default_factory=list)  # module name per call index
    regions: list[Box] = dataclasses.field(default_factory=list)  # core box per batch item, in the crop
    tile_hw: tuple[int, int] = (1, 1)  # crop size in latent px
    partials: Tensor | None = None  # (B, groups, 3): sum, sum of squares, count (float64)
    calls: int = 0

    def start(self, regions: list[Box], tile_hw: tuple[int, int]) -> None:
        self.regions, self.tile_hw, self.partials, self.calls = regions, tile_hw, None, 0


def _partial_sums(x: Tensor, groups: int, state: _GNState) -> Tensor:
    """Per item and group: (sum, sum of squares, count), float64, over the core box at this layer's scale."""
    th, tw = state.tile_hw
    if x.ndim == 3:  # attention's GroupNorm sees (B, C, H*W)
        s = math.isqrt(x.shape[-1] // (th * tw))
        x = x.reshape(*x.shape[:2], th * s, tw * s)
    s = x.shape[-2] // th
    if (th * s, tw * s) != tuple(x.shape[-2:]):
        raise RuntimeError(f"GroupNorm input {tuple(x.shape)} is not a whole multiple of the tile {th}x{tw}")
    acc = torch.float32 if x.device.type == "mps" else torch.float64  # MPS has no float64
    out = []
    for b, (t, l, bo, r) in enumerate(state.regions):
        core = x[b, :, t * s:bo * s, l * s:r * s].reshape(groups, -1)
        sq = torch.linalg.vector_norm(core, dim=1, dtype=acc).square()
        count = torch.full_like(sq, core.shape[1])
        out.append(torch.stack([core.sum(1, dtype=acc), sq, count], dim=1).double().cpu())
    return torch.stack(out)


def _reduce(partials: Tensor) -> tuple[Tensor, Tensor]:
    """Global (mean, biased var) per group from stacked (…, groups, 3) partial sums."""
    total = partials.reshape(-1, *partials.shape[-2:]).sum(0)
    mean = total[:, 0] / total[:, 2]
    return mean, (total[:, 1] / total[:, 2] - mean.square()).clamp_min(0)


def _apply_stats(gn: nn.GroupNorm, x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    """GroupNorm with given per-group (mean, var), then the affine: a per-channel eval-mode batch norm."""
    per, dtype = x.shape[1] // gn.num_groups, torch.promote_types(x.dtype, torch.float32)
    mean, var = (t.repeat_interleave(per).to(x.device, dtype) for t in (mean, var))
    weight, bias = (None, None) if not gn.affine else (gn.weight.to(dtype), gn.bias.to(dtype))
    return F.batch_norm(x, mean, var, weight, bias, training=False, eps=gn.eps)


def _group_norm_forward(state: _GNState, name: str, gn: nn.GroupNorm, x: Tensor) -> Tensor:
    """Replacement GroupNorm forward: apply known global stats, or record partial sums (exact/fast modes)."""
    i, state.calls = state.calls, state.calls + 1
    if i == len(state.order):
        state.order.append(name)
    elif state.order[i] != name:
        raise RuntimeError(f"GroupNorm call #{i} is {name}, was {state.order[i]}: call order changed")
    if i == state.record:
        state.partials = _partial_sums(x, gn.num_groups, state)
        raise _StopForward
    if i >= len(state.known):
        if not state.record_all:
            raise RuntimeError(f"GroupNorm call #{i} ({name}) has no statistics")
        state.known.append(_reduce(_partial_sums(x, gn.num_groups, state)))
    return _apply_stats(gn, x, *state.known[i])


@contextlib.contextmanager
def _patched_group_norms(module: nn.Module, state: _GNState) -> Iterator[None]:
    """Route every GroupNorm inside ``module`` through ``state``; restore the forwards on exit."""
    norms = [(n, m) for n, m in module.named_modules() if isinstance(m, nn.GroupNorm)]
    saved = [m.__dict__.get("forward") for _, m in norms]
    try:
        for name, m in norms:
            m.forward = functools.partial(_group_norm_forward, state, name, m)
        yield
    finally:
        for (_, m), old in zip(norms, saved):
            if old is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = old


# ----------------------------------------------------------------------------------------------
# Running tiles


def _dtype_of(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


@dataclasses.dataclass
class _Runner:
    """Runs batches of tiles through ``model`` with patched GroupNorms, redoing non-finite ones in fp32."""

    model: nn.Module
    source: Callable[[Box], Tensor]  # crop box in latent px -> (1, C, h, w) input
    state: _GNState
    bar: Any
    fallback: bool  # low-precision model: redo non-finite items in a float32 copy
    upcasts: int = 0
    _model32: nn.Module | None = None

    def model32(self) -> nn.Module:
        """Lazily made float32 copy of the model (the fp16 "black spots" fix)."""
        if self._model32 is None:
            self._model32 = copy.deepcopy(self.model).float()
        return self._model32

    def _forward(self, model: nn.Module, x: Tensor, regions: list[Box],
                 tile_hw: tuple[int, int]) -> tuple[Tensor | None, Tensor | None]:
        self.state.start(regions, tile_hw)
        p = next(model.parameters())
        with _patched_group_norms(model, self.state):
            try:
                return None, model(x.to(p.device, p.dtype))
            except _StopForward:
                return self.state.partials, None

    def run(self, x: Tensor, regions: list[Box], tile_hw: tuple[int, int]) -> tuple[Tensor | None, ...]:
        """One batch: (partial sums, None) if a GroupNorm recorded, else (None, model output)."""
        n_known = len(self.state.known)
        part, y = self._forward(self.model, x, regions, tile_hw)
        if not self.fallback:
            return part, y
        bad = ~torch.isfinite((part if part is not None else y).flatten(1)).all(1)
        if not all(torch.isfinite(t).all() for s in self.state.known[n_known:] for t in s):
            bad[:] = True
        if not bad.any():
            return part, y
        del self.state.known[n_known:]
        idx = bad.nonzero().flatten().tolist()
        self.upcasts += len(idx)
        part32, y32 = self._forward(self.model32(), x[idx], [regions[i] for i in idx], tile_hw)
        if part is not None:
            part = part.clone()
            part[idx] = part32
            return part, None
        y = y.float()
        y[idx] = y32.float()
        return None, y

    def tiles(self, tiles: list[_Tile], batch: list[int]) -> tuple[Tensor | None, Tensor | None]:
        """Run the tiles ``batch`` (equal crop shapes) as one batch."""
        x = torch.cat([self.source(tiles[i].crop) for i in batch])
        out = self.run(x, [tiles[i].region() for i in batch], tiles[batch[0]].shape)
        self.bar.update(len(batch))
        return out


def _exact_passes(run: _Runner, tiles: list[_Tile], batch: int, emit: Emit) -> None:
    """Exact mode: one pass per GroupNorm gathers its global stats; the pass reaching no new one writes."""
    run.state.known, run.state.record_all = [], False
    for g in itertools.count():
        run.state.record, partials = g, {}
        for idx in _batches(tiles, batch):
            part, y = run.tiles(tiles, idx)
            if part is not None:
                partials.update(zip(idx, part))
            else:
                for i, yi in zip(idx, y):
                    emit(tiles[i], yi)
        if not partials:
            return
        if len(partials) != len(tiles):
            raise RuntimeError(f"some tiles reached GroupNorm #{g} and others did not")
        run.state.known.append(_reduce(torch.stack([partials[i] for i in range(len(tiles))])))


def _fast_passes(run: _Runner, tiles: list[_Tile], batch: int, emit: Emit, small: Tensor,
                 small_hw: tuple[int, int]) -> None:
    """Fast mode: stats from one untiled run on a downsampled copy, then one tiled pass applying them."""
    run.state.known, run.state.record, run.state.record_all = [], None, True
    run.run(small, [(0, 0, *small_hw)], small_hw)
    run.bar.update(1)
    run.state.record_all = False
    for idx in _batches(tiles, batch):
        _, y = run.tiles(tiles, idx)
        for i, yi in zip(idx, y):
            emit(tiles[i], yi)


def _run_tiled(vae: nn.Module, model: nn.Module, source: Callable[[Box], Tensor], tiles: list[_Tile], *,
               mode: str, batch: int, emit: Emit, small: Callable[[], tuple[Tensor, tuple[int, int]]],
               progress: Progress, desc: str) -> None:
    """Shared driver of decode and encode: picks precision, runs exact or fast passes, reports upcasts."""
    dtype = _dtype_of(model)
    low = dtype in (torch.float16, torch.bfloat16)
    n_norms = sum(isinstance(m, nn.GroupNorm) for m in model.modules())
    total = len(tiles) * (n_norms + 1) if mode == "exact" else len(tiles) + 1
    run = _Runner(model, source, _GNState(), progress_bar(progress, total, desc), fallback=low)
    if low and dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        run.model, run.fallback = run.model32(), False
    try:
        with torch.inference_mode():
            if mode == "exact":
                _exact_passes(run, tiles, batch, emit)
            else:
                _fast_passes(run, tiles, batch, emit, *small())
    finally:
        run.bar.close()
    if run.upcasts:
        warnings.warn(f"{run.upcasts} tile evaluation(s) were not finite in {dtype} and were redone in "
                      "float32", RuntimeWarning, stacklevel=3)


# ----------------------------------------------------------------------------------------------
# Argument checks and output sinks


def _check_int(name: str, value: Any, minimum: int, multiple: int = 1) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum and value % multiple == 0
    if not ok:
        rule = f"an integer >= {minimum}"
        if multiple > 1:
            rule += f" and a multiple of the VAE scale factor {multiple}"
        raise ValueError(f"{name}={value!r}: must be {rule}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r}: must be one of {choices}")


class _ArraySink:
    """Writes tiles into an (H, W, C) numpy array or memmap."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def write(self, top: int, left: int, tile: np.ndarray) -> None:
        self.array[top:top + tile.shape[0], left:left + tile.shape[1]] = tile


def _make_sink(out: Any, shape: tuple[int, int, int], output: str) -> tuple[Any, Any]:
    """(sink with .write, object to return) for ``out``: None (new array), an array/memmap, or a writer."""
    dtype = np.dtype(output)
    if out is None:
        out = np.empty(shape, dtype)
    if isinstance(out, np.ndarray):
        if out.shape != shape:
            raise ValueError(f"out.shape={out.shape}: must be (H, W, C) = {shape}")
        if out.dtype != dtype:
            raise ValueError(f"out.dtype={out.dtype}: must be {dtype} for output={output!r}")
        return _ArraySink(out), out
    if callable(getattr(out, "write", None)):
        return out, out
    raise ValueError(f"out={type(out).__name__}: must be None, a numpy array of shape {shape}, "
                     "or have write(top, left, tile)")


def _to_pixels(y: Tensor, output: str) -> np.ndarray:
    """A decoded (C, h, w) tile in [-1, 1] as HWC uint8 [0, 255] (rounded, clipped) or float32 [0, 1]."""
    y = (y.float() / 2 + 0.5).clamp(0, 1).permute(1, 2, 0)
    if output == "uint8":
        y = (y * 255).round().to(torch.uint8)
    return y.cpu().numpy()


def _sequential(*modules: nn.Module | None) -> nn.Sequential:
    return nn.Sequential(*(m for m in modules if m is not None))


# ----------------------------------------------------------------------------------------------
# Public API


def tiled_decode(
    vae: nn.Module,
    latents: Tensor,
    *,
    tile_size: int = 64,
    margin: int | None = None,
    mode: Mode = "exact",
    out: np.ndarray | TileWriter | None = None,
    output: Literal["uint8", "float32"] = "uint8",
    tile_batch_size: int = 1,
    stats_size: int = 96,
    progress: Progress = None,
) -> np.ndarray | TileWriter:
    """Decode ``latents`` tile by tile with whole-image GroupNorm statistics, pixels straight into ``out``.

    Args:
        vae: a diffusers ``AutoencoderKL`` (any dtype/device; fp16 tiles that come out non-finite are
            redone in float32, and fp16 with ``config.force_upcast`` runs in float32 throughout).
        latents: ``(1, C, h, w)`` in the VAE's latent space: the caller has already undone
            ``scaling_factor`` (and ``shift_factor``), exactly as before ``vae.decode``; or latents on
            disk (anything with ``shape`` and ``box((top, left, bottom, right))``, such as
            :class:`anysize.core.bands.DiskTensor`), read one tile's rows at a time.
        tile_size: core tile side in latent px; cores partition the latent.
        margin: latent px read around each core (clamped to the canvas); default
            :func:`decoder_margin` (18 for SD's VAE), which makes tiles exact.
        mode: ``"exact"`` (equal to untiled up to rounding and the tile-local mid-block attention;
            ~G/2 decodes for G GroupNorms) or ``"fast"`` (approximate: GroupNorm statistics from an
            untiled run on a copy downsampled to at most ``stats_size`` latent px; ~1 decode).
        out: None (a new array is returned), an ``(H, W, C)`` numpy array or memmap of dtype
            ``output``, or any object with ``write(top, left, tile_hwc)``.
        output: ``"uint8"`` ([-1, 1] -> [0, 255], rounded and clipped) or ``"float32"`` ([0, 1]).
        tile_batch_size: tiles of equal shape run together, up to this many.
        stats_size: longer side, latent px, of fast mode's downsampled copy; the default 96 is about
            one default tile plus SD's margins, so the statistics run needs no more memory than a tile.
        progress: None/False, True (tqdm), or a tqdm-like factory; total = tile evaluations.

    Returns:
        ``out`` (the new array when ``out`` was None).
    """
    on_disk = _made_on_demand(latents)
    if not (torch.is_tensor(latents) or on_disk) or latents.ndim != 4:
        raise ValueError(f"latents with shape {getattr(latents, 'shape', None)}: must be a 4-D tensor (1, C, h, w)")
    if latents.shape[0] != 1:
        raise ValueError(f"latents.shape[0]={latents.shape[0]}: must be 1; decode a batch one image at a time")
    channels = vae.config.latent_channels
    if latents.shape[1] != channels:
        raise ValueError(f"latents.shape[1]={latents.shape[1]}: must be vae.config.latent_channels={channels}")
    margin = decoder_margin(vae.config) if margin is None else margin
    _check_args(tile_size=tile_size, margin=margin, mode=mode, tile_batch_size=tile_batch_size,
                stats_size=stats_size)
    _check_choice("output", output, OUTPUTS)
    f, (h, w) = vae_scale_factor(vae), latents.shape[-2:]
    sink, result = _make_sink(out, (h * f, w * f, vae.config.out_channels), output)
    source = latents.box if on_disk else lambda b: latents[:, :, b[0]:b[2], b[1]:b[3]]  # noqa: E731

    def emit(tile: _Tile, y: Tensor) -> None:
        t, l, bo, r = tile.region()
        sink.write(tile.core[0] * f, tile.core[1] * f, _to_pixels(y[:, t * f:bo * f, l * f:r * f], output))

    def small() -> tuple[Tensor, tuple[int, int]]:
        hw = _stats_shape(h, w, stats_size)
        return _area_downsample(source, h, w, hw), hw

    model = _sequential(getattr(vae, "post_quant_conv", None), vae.decoder)
    _run_tiled(vae, model, source, _plan_tiles(h, w, tile_size, margin), mode=mode, batch=tile_batch_size,
               emit=emit, small=small, progress=progress, desc="VAE decode")
    return result


def tiled_encode(
    vae: nn.Module,
    images: Tensor | np.ndarray,
    *,
    tile_size: int = 512,
    margin: int | None = None,
    mode: Mode = "exact",
    sample: bool = False,
    generator: torch.Generator | None = None,
    tile_batch_size: int = 1,
    stats_size: int = 768,
    progress: Progress = None,
) -> Tensor:
    """Encode ``images`` tile by tile with whole-image GroupNorm statistics (encoder + quant_conv).

    Args:
        vae: a diffusers ``AutoencoderKL``.
        images: ``(1, C, H, W)`` tensor in [-1, 1], an ``(H, W, C)`` uint8 numpy array, or an image
            made on demand: an object with ``shape`` ``(H, W, C)`` whose ``box((top, left, bottom,
            right))`` returns that crop as a uint8 ``(h, w, C)`` array (read one tile with its margins
            at a time); ``H`` and ``W`` multiples of the scale factor :func:`vae_scale_factor`.
        tile_size, margin, stats_size: in image px, multiples of the scale factor (margin default:
            ``encoder_margin(config) * factor``, exact; stats_size default 768 = 96 latent px for
            SD). Cores live on the latent grid.
        mode: as in :func:`tiled_decode`; mid-block attention, if any, is tile-local.
        sample: draw from the latent distribution with ``generator`` instead of returning its mean.
        tile_batch_size, progress: as in :func:`tiled_decode`.

    Returns:
        ``(1, latent_channels, H / f, W / f)`` latents in the VAE's latent space (not yet multiplied by
        ``scaling_factor``), in the VAE's dtype and device.
    """
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    f = vae_scale_factor(vae)
    crop, (height, width) = _image_source(images, vae.config.in_channels)
    for name, value in (("images height", height), ("images width", width)):
        if value % f:
            raise ValueError(f"{name}={value}: must be a multiple of the VAE scale factor {f}")
    margin = encoder_margin(vae.config) * f if margin is None else margin
    _check_args(tile_size=tile_size, margin=margin, mode=mode, tile_batch_size=tile_batch_size,
                stats_size=stats_size, multiple=f)
    h, w = height // f, width // f
    p = next(vae.parameters())
    moments = torch.empty(1, 2 * vae.config.latent_channels, h, w, device=p.device)
    source = lambda b: crop(tuple(v * f for v in b))  # noqa: E731

    def emit(tile: _Tile, y: Tensor) -> None:
        t, l, bo, r = tile.region()
        c = tile.core
        moments[0, :, c[0]:c[2], c[1]:c[3]] = y[:, t:bo, l:r].to(moments)

    def small() -> tuple[Tensor, tuple[int, int]]:
        hw = _stats_shape(h, w, stats_size // f)
        return _area_downsample(crop, height, width, (hw[0] * f, hw[1] * f)), hw

    model = _sequential(vae.encoder, getattr(vae, "quant_conv", None))
    _run_tiled(vae, model, source, _plan_tiles(h, w, tile_size // f, margin // f), mode=mode,
               batch=tile_batch_size, emit=emit, small=small, progress=progress, desc="VAE encode")
    dist = DiagonalGaussianDistribution(moments.to(p.dtype))
    return dist.sample(generator) if sample else dist.mean


def _check_args(*, tile_size: int, margin: int, mode: str, tile_batch_size: int, stats_size: int,
                multiple: int = 1) -> None:
    _check_int("tile_size", tile_size, multiple, multiple)
    _check_int("margin", margin, 0, multiple)
    _check_choice("mode", mode, MODES)
    _check_int("tile_batch_size", tile_batch_size, 1)
    _check_int("stats_size", stats_size, multiple, multiple)


def _made_on_demand(x: Any) -> bool:
    """Whether ``x`` is read through ``box((top, left, bottom, right))`` (latents on disk, an image
    resized crop by crop) rather than being an array or tensor in memory."""
    return not isinstance(x, (np.ndarray, Tensor)) and callable(getattr(x, "box", None))


def _image_source(images: Tensor | np.ndarray, channels: int) -> tuple[Callable[[Box], Tensor], tuple[int, ...]]:
    """(crop box in image px -> (1, C, h, w) float in [-1, 1], (H, W)) for a tensor, a uint8 HWC array,
    or an object with ``shape`` (H, W, C) whose ``box((top, left, bottom, right))`` makes that crop
    as a uint8 HWC array."""
    lazy = _made_on_demand(images)
    if isinstance(images, np.ndarray) or lazy:
        shape = tuple(getattr(images, "shape", ()))
        if (not lazy and images.dtype != np.uint8) or len(shape) != 3 or shape[2] != channels:
            kind = f"array {images.dtype}" if not lazy else type(images).__name__
            raise ValueError(f"images {kind} {shape}: must be uint8, shape (H, W, {channels})")
        read = images.box if lazy else lambda b: images[b[0]:b[2], b[1]:b[3]]  # noqa: E731

        def crop(b: Box) -> Tensor:
            tile = torch.from_numpy(np.array(read(b), dtype=np.uint8))
            return tile.permute(2, 0, 1)[None].float() / 127.5 - 1

        return crop, shape[:2]
    if torch.is_tensor(images):
        if images.ndim != 4 or images.shape[0] != 1 or images.shape[1] != channels:
            raise ValueError(f"images.shape={tuple(images.shape)}: must be (1, {channels}, H, W)")
        return (lambda b: images[:, :, b[0]:b[2], b[1]:b[3]]), tuple(images.shape[-2:])
    raise ValueError(f"images={type(images).__name__}: must be a torch tensor or a uint8 numpy array")
