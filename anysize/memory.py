"""Memory planner and preflight: choose tile batch and VAE tile from the free memory, or refuse with the numbers.

:func:`plan_memory` estimates the peak bytes of every stage of a request (stage 1 sampling and its
decode, each stage-2 pass's tiled sampling and tiled VAE decode, the output image), before any
compute. Stages run one after another, so the request's peak is the largest stage. Where the caller
leaves them open it picks the largest tile batch (UNet calls) and VAE decode tile whose stages fit in
the budget less :data:`SAFETY_MARGIN`; it raises :class:`MemoryPreflightError` with the numbers when
the request does not fit even at tile batch 1 and the smallest VAE tile. The budget is the device's
free memory on CUDA (plus what torch holds cached but unused), the host's available memory on the CPU
(and MPS, whose memory is the host's), or ``max_memory`` bytes; weights already loaded are not counted.

The estimate is a sum of the big buffers (latents and sampler state, tile batches, images), with
per-call activation costs from the model configs, calibrated against measured peaks of the shipped
default model and of SD-1.5-sized random-weight UNet and VAE (``benchmarks/memory_planner.py``). It
assumes memory-efficient attention (PyTorch's ``scaled_dot_product_attention``), which never holds a
tile's whole ``tokens x tokens`` attention matrix.

This module imports torch only inside functions, so the command line can import :func:`parse_bytes`
without loading torch.
"""

from __future__ import annotations

import ctypes
import functools
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import psutil

from .core import nets as _nets  # memory's own `nets` are a phase's ControlNets

if TYPE_CHECKING:
    import torch

GIB = 2**30
MIB = 2**20

SAFETY_MARGIN = 0.15  # fraction of the budget the plan leaves free: estimate error, allocator slack, other jobs
TILE_BATCH_CHOICES = (64, 32, 16, 8, 4, 2, 1)  # tile batch sizes tried, largest first
VAE_TILE_CHOICES = (64, 48, 32, 16)  # VAE decode core tiles (latent px) tried, largest first; 64 preferred
EXACT_STATS_SIDE = 128  # latent side up to which a decode's GroupNorm statistics come from the whole latent
FAST_STATS_SIZE = 96  # longer side (latent px) of fast mode's downsampled statistics copy above that
COLOR_FIX_BYTES = 32 * MIB  # host bytes of one band of the AdaIN colour fix (anysize.pipeline.adain_color_fix)
STREAM_ROWS = 256  # rows per band when the output streams to a file (anysize.io.stream: TIFF and Deep Zoom tiles)

# ---- calibration (benchmarks/memory_planner.py: CPU peak RSS; docs/benchmarks.md, Memory planner)
# Bytes per latent pixel of one latent-sized float32 tensor's worth of sampler state, times the
# number of such tensors live: latents, scaled input, merged value and weight, its quotient, the
# scheduler's multistep history and step temporaries, the conditioning image and its noise.
_STATE_FLOATS = 36  # float32 values per latent px during sampling
_DECODE_FLOATS = 8  # latents and their unscaled copy during a decode
_ENCODE_FLOATS = 8  # the encoder's moments (mean and log-variance)
# Live activations of one UNet call, as multiples of the feature maps of all levels
# (sum_i channels_i * (h / 2^i) * (w / 2^i)) per batch item: skips held for the up path plus the
# widest block's working set. Measured 8-10 as live tensors; 13-21 as CPU resident memory, since
# the allocator keeps freed blocks; the base of 10 plus 5 per resnet layer covers the latter.
_UNET_LIVE_BASE = 10
_UNET_LIVE_PER_LAYER = 5
# Live activations of one VAE decoder call at full resolution, as multiples of
# (block_out_channels[1] + block_out_channels[0]) * pixels: the upsample into the last block and that
# block's resnet. Measured 2.4-2.9 as live tensors, up to 6.4 as CPU resident memory.
_VAE_LIVE = 6
# The encoder's full-resolution block: multiples of block_out_channels[0] * pixels.
_VAE_ENCODE_LIVE = 8
# Per stage, whatever the sizes: thread-local buffers, allocator arenas, the text encoder's activations.
_RUNTIME_BYTES = 32 * MIB
# The stage-2 img2img encode's tile and statistics size in image px (anysize.core.vae.tiled_encode defaults).
_ENCODE_TILE_PX = 512
_ENCODE_STATS_PX = 768
# Host bytes per output pixel besides the uint8 result (3): PIL keeps RGB as 4 bytes a pixel, and a
# writer may take one more uint8 copy (PNG, TIFF); numpy and torch outputs are float32 (a temporary and
# the result for "pt").
_OUTPUT_EXTRA = {"pil": 4 + 3, "np": 12, "pt": 24, "latent": 0}
# Host bytes per pixel of one colour-fix band: float64 sums and squares (anysize.pipeline.adain_color_fix).
_BAND_BYTES_PER_PX = 48

# Sampling state above this many bytes (_STATE_FLOATS per latent px) is kept on disk and worked on by
# bands (anysize.core.bands): the default keeps 4096^2 px outputs of the x4 upscaler (1024^2 latent, 144 MiB)
# in memory and sends 8192^2 and up to disk.
LATENT_MEMORY = 256 * MIB

StageKind = Literal["sample", "decode", "output"]


class MemoryPreflightError(ValueError):
    """The request cannot fit; the message has the estimate and the limit."""


# ----------------------------------------------------------------------------------------------
# Byte counts as text


_UNITS = {"": 1, "b": 1, "k": 2**10, "kib": 2**10, "kb": 10**3, "m": 2**20, "mib": 2**20, "mb": 10**6,
          "g": 2**30, "gib": 2**30, "gb": 10**9, "t": 2**40, "tib": 2**40, "tb": 10**12}


def parse_bytes(text: str | int) -> int:
    """A byte count from ``"8GiB"``, ``"512MiB"``, ``"1.5G"``, ``"8GB"`` or ``"1000000"`` -> int bytes.

    KiB, MiB, GiB, TiB (and the bare K, M, G, T) are powers of 1024; KB, MB, GB, TB powers of 1000.
    Case and spaces are ignored. Raises ValueError (naming the value and the rule) unless >= 1 byte.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", str(text))
        unit = match[2].lower() if match else None
        if unit not in _UNITS:
            raise ValueError(f"max_memory={text!r}: must be a byte count such as 8GiB, 512MiB, 16GB or 1000000")
        value = int(float(match[1]) * _UNITS[unit])
    if value < 1:
        raise ValueError(f"max_memory={text!r}: must be at least 1 byte")
    return value


def format_bytes(n: float) -> str:
    """``n`` bytes in GiB: two decimals from 1 GiB, three below (``0.043 GiB``)."""
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / GIB:.3f} GiB"


# ----------------------------------------------------------------------------------------------
# Per-call activation costs from model configs


def _dtype_bytes(dtype: torch.dtype) -> int:
    import torch

    return torch.finfo(dtype).bits // 8


def _largest_weight_bytes(module: Any) -> int:
    """The largest parameter tensor: the CPU's convolution kernels reorder one weight at a time."""
    return max((p.numel() * p.element_size() for p in module.parameters()), default=0)


def unet_activation_bytes(unet: Any, height: int, width: int, batch: int) -> int:
    """Peak activation bytes of one UNet call on ``batch`` latents of ``height x width`` latent px
    (classifier-free guidance: twice the tile count), weights excluded."""
    config = unet.config
    features = sum(c * math.ceil(height / 2**i) * math.ceil(width / 2**i)
                   for i, c in enumerate(config.block_out_channels))
    live = _UNET_LIVE_BASE + _UNET_LIVE_PER_LAYER * int(config.layers_per_block)
    return int(live * features * batch * _dtype_bytes(unet.dtype) + _largest_weight_bytes(unet))


# Live (tokens x hidden) tensors of one transformer block: the residual stream, the normed input, q, k, v,
# the attention output and the MLP's 4x-wide hidden layer. An estimate from the block's structure, NOT
# calibrated by a measured peak (unlike the UNet's); attention itself runs in fused kernels here.
_TRANSFORMER_LIVE = 11


def transformer_activation_bytes(net: Any, height: int, width: int, batch: int) -> int:
    """Peak activation bytes of one SD3 / FLUX transformer call on ``batch`` latents of ``height x
    width`` latent px, weights excluded (:data:`_TRANSFORMER_LIVE`, uncalibrated)."""
    config, p = net.config, _nets.granularity(net)
    tokens = math.ceil(height / p) * math.ceil(width / p) + _nets.text_tokens(_nets.kind(net))
    hidden = int(config.num_attention_heads) * int(config.attention_head_dim)
    return int(_TRANSFORMER_LIVE * tokens * hidden * batch * _dtype_bytes(net.dtype) + _largest_weight_bytes(net))


def controlnet_bytes(nets: list, height: int, width: int, batch: int) -> int:
    """Extra activation bytes of ControlNets steering a UNet or transformer call on ``batch`` latents of
    ``height x width``: the residuals they hand the model (a UNet ControlNet's every down block's
    outputs and the mid block's; an SD3 / FLUX ControlNet's one (tokens x width) per block, a token a
    2x2 patch; live through the model's call, twice over with several ControlNets: the sum and the next
    one's) and the ControlNet call's own working set beyond them (its largest weight; its activations
    are freed before the model's peak). An estimate from the configs, not calibrated by a measured peak."""
    if not nets:
        return 0
    config = nets[0].config
    sets = 2 if len(nets) > 1 else 1
    if not hasattr(config, "block_out_channels"):  # an SD3 / FLUX ControlNet
        blocks = int(config.num_layers) + int(getattr(config, "num_single_layers", 0))
        inner = int(config.num_attention_heads) * int(config.attention_head_dim)
        residual = blocks * math.ceil(height / 2) * math.ceil(width / 2) * inner
    else:
        residual = sum(c * math.ceil(height / 2**i) * math.ceil(width / 2**i) * (int(config.layers_per_block) + 1)
                       for i, c in enumerate(config.block_out_channels))
        residual += config.block_out_channels[-1] * math.ceil(height / 2 ** (len(config.block_out_channels) - 1)) \
            * math.ceil(width / 2 ** (len(config.block_out_channels) - 1))
    return int(residual * batch * sets * _dtype_bytes(nets[0].dtype) + max(_largest_weight_bytes(n) for n in nets))


def _vae_bytes_per_value(vae: Any) -> int:
    """float32 when the config asks for an upcast (SD's fp16-unsafe VAE); else the VAE's dtype."""
    return 4 if getattr(vae.config, "force_upcast", False) else _dtype_bytes(vae.dtype)


def vae_decode_bytes(vae: Any, height: int, width: int) -> int:
    """Peak activation bytes of one decoder call on a ``height x width`` latent (pixels: x the scale factor)."""
    channels = list(vae.config.block_out_channels)
    factor = 2 ** (len(channels) - 1)
    widest = channels[0] + (channels[1] if len(channels) > 1 else channels[0])
    return int(_VAE_LIVE * widest * height * factor * width * factor * _vae_bytes_per_value(vae))


def vae_encode_bytes(vae: Any, height: int, width: int) -> int:
    """Peak activation bytes of one encoder call on a ``height x width`` pixel image."""
    return int(_VAE_ENCODE_LIVE * vae.config.block_out_channels[0] * height * width * _vae_bytes_per_value(vae))


def decode_stats_size(side: int, tile_size: int, margin: int) -> int:
    """Longer side (latent px) of the GroupNorm statistics run of a fast tiled decode of a latent
    whose longer side is ``side``: the whole latent up to :data:`EXACT_STATS_SIDE` (exact), else a
    copy downsampled to :data:`FAST_STATS_SIZE`; with a VAE tile below 64 the statistics run is no
    larger than one tile with its margins, so a smaller tile also lowers this run's peak."""
    if tile_size >= 64:
        return side if side <= EXACT_STATS_SIDE else FAST_STATS_SIZE
    return min(side, tile_size + 2 * margin)


def decode_kwargs(vae: Any, height: int, width: int, tile_size: int = 64) -> dict[str, int]:
    """``tile_size`` and ``stats_size`` for :func:`anysize.core.vae.tiled_decode` (``mode="fast"``) of a
    ``height x width`` latent, as the planner assumed them."""
    from .core.vae import decoder_margin

    side = max(height, width)
    return {"tile_size": tile_size, "stats_size": decode_stats_size(side, tile_size, decoder_margin(vae.config))}


def tiled_decode_bytes(vae: Any, height: int, width: int, tile_size: int) -> int:
    """Peak activation bytes of a fast tiled decode (one tile per call): the larger of one tile with
    its margins and the statistics run on the (downsampled) whole latent."""
    from .core.vae import decoder_margin

    margin = decoder_margin(vae.config)
    crop = min(tile_size + 2 * margin, height), min(tile_size + 2 * margin, width)
    stats = decode_kwargs(vae, height, width, tile_size)["stats_size"]
    scale = min(1.0, stats / max(height, width))
    small = max(1, round(height * scale)), max(1, round(width * scale))
    return max(vae_decode_bytes(vae, *crop), vae_decode_bytes(vae, *small))


def tiles_per_step(method: str, height: int, width: int, tile: int) -> int:
    """At most how many tiles one sampling step evaluates (anysize.core.tiling): the most a tile batch can hold."""
    if method == "none":
        return 1

    def axis(length: int) -> int:
        t = min(tile, length)
        if t >= length:
            return 1
        if method == "overlap":
            return math.ceil((length - t) / max(1, t // 2)) + 1
        return math.ceil(length / t) + (method == "fstd")

    return axis(height) * axis(width)


# ----------------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class StagePeak:
    """Estimated peak of one stage. ``device``: bytes where the models run (sampler state, activations);
    ``host``: bytes of images in host memory. On the CPU both are one pool."""

    name: str  # "stage 1", "stage 1 decode", "pass 2", "pass 2 decode", "output"
    kind: StageKind  # which choice it depends on: "sample" (tile batch), "decode" (VAE tile), "output" (none)
    detail: str
    device: int
    host: int


@dataclass(frozen=True)
class MemoryPlan:
    """The memory plan of one request: the choices, and the estimated peak per stage.

    ``budget`` is what the device had free (or ``max_memory``) before the plan; ``usable`` is it less
    the safety margin; the plan fits when every stage does. On a CUDA device, images count against
    ``host_budget`` (host available memory) instead, likewise less the margin.
    """

    width: int
    height: int
    tile_batch_size: int
    vae_tile_size: int
    stages: tuple[StagePeak, ...]
    budget: int
    budget_source: str  # "max_memory", "host available" or e.g. "free on cuda:0"
    host_budget: int | None = None  # separate host budget (CUDA); None when device and host share memory
    margin: float = SAFETY_MARGIN

    @property
    def shared(self) -> bool:
        """Device and host draw on one pool (CPU, MPS)."""
        return self.host_budget is None

    @property
    def usable(self) -> int:
        return int(self.budget * (1 - self.margin))

    def cost(self, stage: StagePeak) -> int:
        """What ``stage`` takes from ``budget``: device plus host bytes when they share memory, else device."""
        return stage.device + stage.host if self.shared else stage.device

    @property
    def peak_stage(self) -> StagePeak:
        return max(self.stages, key=self.cost)

    @property
    def peak(self) -> int:
        """The request's estimated peak against ``budget`` (the largest stage)."""
        return self.cost(self.peak_stage)

    @property
    def host_peak(self) -> int:
        return max(s.host for s in self.stages)

    @property
    def fits(self) -> bool:
        host_ok = self.shared or self.host_peak <= self.host_budget * (1 - self.margin)
        return self.peak <= self.usable and host_ok

    def decode_kwargs(self, vae: Any, height: int, width: int) -> dict[str, int]:
        """:func:`anysize.core.vae.tiled_decode` ``tile_size`` and ``stats_size`` for a ``height x width`` latent."""
        return decode_kwargs(vae, height, width, self.vae_tile_size)

    def describe(self) -> str:
        """A few lines to print before starting: the budget, the choices, each stage's peak."""
        lines = [f"memory plan: budget {format_bytes(self.budget)} ({self.budget_source}), "
                 f"{format_bytes(self.usable)} usable ({self.margin:.0%} kept free); "
                 f"tile batch {self.tile_batch_size}, VAE tile {self.vae_tile_size}"]
        width = max(len(s.name) for s in self.stages)
        for s in self.stages:
            amount = format_bytes(self.cost(s)) if self.shared else \
                f"{format_bytes(s.device)} device + {format_bytes(s.host)} host"
            lines.append(f"  {s.name:<{width}}  {amount:>10}  {s.detail}")
        lines.append(f"  {'peak':<{width}}  {format_bytes(self.peak):>10}  ({self.peak_stage.name})")
        return "\n".join(lines)


def _px(size: tuple[int, int]) -> int:
    return size[0] * size[1]


def _factor(vae: Any) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def color_fix_rows(width: int) -> int:
    """Rows per band of the colour fix for a ``width``-px image: :data:`COLOR_FIX_BYTES` of float64 work
    (512 rows at 2048 px, 64 at 16384 px), so the band does not grow with the image."""
    return max(1, COLOR_FIX_BYTES // (width * _BAND_BYTES_PER_PX))


def _band(width: int, height: int, rows: int | None = None) -> int:
    """Host bytes of one band of ``rows`` rows (default: the colour fix's) worked on in float64."""
    rows = color_fix_rows(width) if rows is None else rows
    return min(rows, height) * width * _BAND_BYTES_PER_PX


def sampler_state_bytes(lat_h: int, lat_w: int, channels: int = 4) -> int:
    """Bytes of sampling state on a ``lat_h x lat_w`` latent held in memory (:data:`_STATE_FLOATS`,
    measured on 4-channel latents; SD3's and FLUX's 16 channels hold four times as much)."""
    return lat_h * lat_w * _STATE_FLOATS * 4 * channels // 4


def banded_sampling(lat_h: int, lat_w: int, latent_memory: int | None = None, tiling: str = "fstd",
                    channels: int = 4) -> bool:
    """Whether sampling a ``lat_h x lat_w`` latent keeps its state on disk by bands (:mod:`anysize.core.bands`):
    when the in-memory state would exceed ``latent_memory`` bytes (None: :data:`LATENT_MEMORY`). An
    untiled sampler ("none") always works in memory."""
    limit = LATENT_MEMORY if latent_memory is None else latent_memory
    return tiling != "none" and sampler_state_bytes(lat_h, lat_w, channels) > limit


def _sampling(unet: Any, lat_h: int, lat_w: int, tiling: str, tile: int, batch: int, cfg: bool,
              banded: bool = False, channels: int = 4, regions: int = 0, controlnets=()) -> tuple[int, str]:
    """(device bytes, description) of tiled sampling on a ``lat_h x lat_w`` latent; ``banded``: the
    state held is a band (and the tiles reaching past it) instead of the latent; ``regions``: the
    request's region prompts, named in the description only: a region prompt runs in calls of its own,
    on one tile's crop at a time, so it adds time, not peak memory; ``controlnets``: the ControlNets
    steering it (:func:`controlnet_bytes`)."""
    th, tw = (lat_h, lat_w) if tiling == "none" else (min(tile, lat_h), min(tile, lat_w))
    n = min(batch, tiles_per_step(tiling, lat_h, lat_w, tile))
    if _nets.is_transformer(unet):
        n = 1  # a transformer tile runs a call of its own (its positions are its own: anysize.core.dit)
    state = sampler_state_bytes(lat_h, lat_w, channels)
    detail = f"{n} tile{'s' if n > 1 else ''} of {th}x{tw} latent px per call" + (", CFG" if cfg else "")
    if regions:
        detail += f", {regions} region prompt{'s' if regions > 1 else ''} (one tile a call)"
    calls = n * (2 if cfg else 1)  # UNet batch rows
    if controlnets:
        detail += f", {len(controlnets)} ControlNet{'s' if len(controlnets) > 1 else ''}"
    if banded:
        from .core.bands import band_rows

        rows = band_rows((1, channels, lat_h, lat_w), minimum=th)
        state = sampler_state_bytes(min(lat_h, rows + 2 * th), lat_w, channels)
        detail += f", state on disk in bands of {rows} rows"
    activation = (transformer_activation_bytes if _nets.is_transformer(unet) else unet_activation_bytes)
    return (_RUNTIME_BYTES + state + activation(unet, th, tw, calls)
            + controlnet_bytes(list(controlnets), th, tw, calls)), detail


def _decode(vae: Any, size: tuple[int, int], vae_tile: int, on_disk: bool = False) -> int:
    """Bytes of a tiled decode; ``on_disk``: the latents are read from disk a tile's rows at a time."""
    from .core.vae import decoder_margin

    f = _factor(vae)
    lat_h, lat_w = math.ceil(size[1] / f), math.ceil(size[0] / f)
    held = min(lat_h, vae_tile + 2 * decoder_margin(vae.config)) if on_disk else lat_h
    return _RUNTIME_BYTES + held * lat_w * _DECODE_FLOATS * 4 + tiled_decode_bytes(vae, lat_h, lat_w, vae_tile)


def _encode_bytes(vae: Any, lat_h: int, lat_w: int) -> int:
    """Device bytes of ``anysize.stages._encoded`` to a ``lat_h x lat_w`` latent: the moments of the whole
    latent, and the larger of one encoder tile and fast mode's statistics run on a downsampled copy."""
    f = _factor(vae)
    px_h, px_w = lat_h * f, lat_w * f
    encode = vae_encode_bytes(vae, min(_ENCODE_TILE_PX, px_h), min(_ENCODE_TILE_PX, px_w))
    stats = vae_encode_bytes(vae, min(_ENCODE_STATS_PX, px_h), min(_ENCODE_STATS_PX, px_w))
    return lat_h * lat_w * _ENCODE_FLOATS * 4 + max(encode, stats)


def _control_bytes(phase: Any, nets: list) -> tuple[int, int, int]:
    """(host, device held through sampling, device peak of preparing them) bytes of a phase's ControlNet
    conditions, beyond the ControlNets' own (:func:`controlnet_bytes`). A UNet ControlNet's control
    image is held resized to the phase's latent x VAE factor, uint8 on the host. An SD3 / FLUX
    ControlNet's is encoded by the tiled VAE before sampling and held on the device as latents
    (``anysize.stages._controls``): the encode's peak, with the conditions encoded before it, comes
    before the sampling peak, so the two are compared rather than added."""
    if not nets:
        return 0, 0, 0
    lat_h, lat_w = phase.latent
    if not _nets.is_transformer(phase.unet):
        return len(nets) * 3 * lat_h * lat_w * _factor(phase.vae) ** 2, 0, 0
    held = int(phase.vae.config.latent_channels) * lat_h * lat_w * _dtype_bytes(phase.vae.dtype)
    return 0, len(nets) * held, (len(nets) - 1) * held + _encode_bytes(phase.vae, lat_h, lat_w)


def _stages(run: Any, batch: int, vae_tile: int) -> tuple[StagePeak, ...]:
    """Every phase's peak of the :class:`~anysize.plan.RunPlan` ``run`` for tile batch ``batch`` and
    VAE tile ``vae_tile``, in the order the pipeline runs them."""
    stages: list[StagePeak] = []
    regions = len(run.request.regions)
    reference = _px(run.source) * 4  # the stage-2 input (a PIL image), kept for the colour fix
    previous = 0  # pixels of the previous pass, whose uint8 array and PIL image stay alive
    for phase in run.phases:
        (w, h), kind = phase.size, phase.kind
        nets = [run.controlnets[k] for k in phase.controls]
        control, held, encode = _control_bytes(phase, nets)
        if kind == "base":
            lat_h, lat_w = phase.latent
            device, detail = _sampling(phase.unet, lat_h, lat_w, phase.tiling.method, phase.tiling.tile_size, batch,
                                       phase.cfg, channels=phase.vae.config.latent_channels, regions=regions,
                                       controlnets=nets)
            where = "panorama" if run.panorama else "bucket"
            stages.append(StagePeak(phase.name, "sample", f"{where} {w}x{h}: {detail}", max(device + held, encode),
                                    control))
        elif kind in ("sr", "img2img"):
            lat_h, lat_w = phase.latent
            vae = phase.vae
            device, detail = _sampling(phase.unet, lat_h, lat_w, phase.tiling.method, phase.tiling.tile_size, batch,
                                       phase.cfg, phase.banded, vae.config.latent_channels, regions, nets)
            if kind == "sr":
                host = lat_h * lat_w * 4  # the conditioning image, resized
            else:
                device += _encode_bytes(vae, lat_h, lat_w)
                # the resized input as a PIL image and a uint8 array
                host = lat_h * lat_w * _factor(vae) ** 2 * (3 + 4)
            stages.append(StagePeak(phase.name, "sample", f"{w}x{h}: {detail}", max(device + held, encode),
                                    reference + previous * (3 + 4) + host + control))
        elif kind == "decode" and run.base is not None and phase.name == "stage 1 decode":
            stages.append(StagePeak(phase.name, "decode", f"{w}x{h}, VAE tile {vae_tile}",
                                    _decode(phase.vae, phase.size, vae_tile), _px(phase.size) * (3 + 4)))
        elif kind == "decode":
            # the decoded image: uint8 (and PIL for the next pass); streamed, one row of VAE tiles at a time
            result = w * h * (3 if phase.last else 3 + 4)
            if phase.streaming:
                result = min(h, vae_tile * _factor(phase.vae)) * w * 3
            stages.append(StagePeak(phase.name, "decode", f"{w}x{h}, VAE tile {vae_tile}",
                                    _decode(phase.vae, (w, h), vae_tile, phase.banded),
                                    reference + previous * (3 + 4) + result))
            previous = w * h
        else:
            stages.append(_output(run, reference))
    return tuple(stages)


def _output(run: Any, reference: int) -> StagePeak:
    """Colour fix and conversion to the output type (a plain resize when there is no pass); the last
    pass's input image (a PIL image) is still alive."""
    req = run.request
    size = req.size
    if not run.passes:
        held = reference + _px(size) * 4  # the resized image
    else:
        held = reference + (_px(run.passes[-2]) * 4 if len(run.passes) > 1 else 0)
    streaming = run.phases[-1].streaming
    if streaming:
        return StagePeak("output", "output", f"{req.width}x{req.height} written by bands", 0,
                         held + max(_band(*size), _band(*size, rows=STREAM_ROWS // 4)))
    extra = _OUTPUT_EXTRA[req.output_type] * _px(size)
    band = _band(*size) if req.color_fixed and run.passes else 0
    return StagePeak("output", "output", f"{req.width}x{req.height} {req.output_type}", 0,
                     held + _px(size) * 3 + max(band, extra))


def _budget(device: Any, max_memory: int | None) -> tuple[int, str, int | None]:
    """(budget, where it comes from, separate host budget or None) for a model on ``device``."""
    device_free, host_free = available_bytes(None if device is None else str(device))
    separate = device_free > 0
    if max_memory is not None:
        return max_memory, f"max_memory={format_bytes(max_memory)}", host_free if separate else None
    if separate:
        return device_free, f"free on {device}", host_free
    return host_free, "host available", None


def plan_memory(run: Any, *, margin: float = SAFETY_MARGIN) -> MemoryPlan:
    """The memory plan of the :class:`~anysize.plan.RunPlan` ``run`` before any compute: every phase's
    estimated peak, and the tile batch and VAE tile (the request's, or where it leaves them open
    (None) the largest of :data:`TILE_BATCH_CHOICES`, no more than a step's tiles, and of
    :data:`VAE_TILE_CHOICES` whose phases fit in the budget less ``margin``). The budget is the
    request's ``max_memory`` or what is free where ``run.device`` is. Guidance above 1 doubles a
    phase's UNet batch; a banded phase holds a band of its state (:func:`banded_sampling`); a
    streamed output never holds the full image.

    Raises :class:`MemoryPreflightError` with the estimate and the budget when the request does not
    fit at the given choices, or at tile batch 1 and the smallest VAE tile.
    """
    req = run.request
    tile_batch_size, vae_tile_size = req.tiling_config().tile_batch_size, req.vae_tile_size
    budget, where, host_budget = _budget(run.device, req.max_memory)

    def plan(batch: int, vae_tile: int) -> MemoryPlan:
        return MemoryPlan(req.width, req.height, batch, vae_tile, _stages(run, batch, vae_tile), budget, where,
                          host_budget, margin)

    fixed_batch, fixed_tile = tile_batch_size or 1, vae_tile_size or VAE_TILE_CHOICES[-1]
    batch = tile_batch_size or _largest(plan, "sample", _batch_choices(run), lambda b: (b, fixed_tile))
    vae_tile = vae_tile_size or _largest(plan, "decode", VAE_TILE_CHOICES, lambda t: (fixed_batch, t))
    chosen = plan(batch, vae_tile)
    if not chosen.fits:
        raise MemoryPreflightError(_refusal(chosen, plan(1, VAE_TILE_CHOICES[-1]), tile_batch_size, vae_tile_size))
    return chosen


def _batch_choices(run: Any) -> tuple[int, ...]:
    """Tile batch sizes worth trying: :data:`TILE_BATCH_CHOICES` up to the most tiles any step evaluates."""
    most = max((tiles_per_step(p.tiling.method, *p.latent, p.tiling.tile_size) for p in run.phases if p.sampling),
               default=1)
    return tuple(sorted({min(b, most) for b in TILE_BATCH_CHOICES}, reverse=True))


def _largest(plan, kind: StageKind, choices: tuple[int, ...], settings) -> int:
    """The first of ``choices`` (largest first) whose ``kind`` stages fit, ``plan(*settings(choice))``
    making the plan; the last choice when none does."""
    for choice in choices:
        candidate = plan(*settings(choice))
        if all(candidate.cost(s) <= candidate.usable for s in candidate.stages if s.kind == kind):
            return choice
    return choices[-1]


def _refusal(chosen: MemoryPlan, smallest: MemoryPlan, tile_batch_size: int | None,
             vae_tile_size: int | None) -> str:
    """Why ``chosen`` does not fit, with the numbers: the host's images (CUDA), the caller's choices
    (when ``smallest``, at tile batch 1 and the smallest VAE tile, would fit), or the size itself."""
    size = f"{chosen.width}x{chosen.height}"
    if not chosen.shared and chosen.host_peak > chosen.host_budget * (1 - chosen.margin):
        stage = max(chosen.stages, key=lambda s: s.host)
        return (f"size {size} needs about {format_bytes(stage.host)} of host memory ({stage.name}: {stage.detail}), "
                f"more than the {format_bytes(chosen.host_budget * (1 - chosen.margin))} usable of the "
                f"{format_bytes(chosen.host_budget)} available ({chosen.margin:.0%} kept free); lower the size")
    if smallest.fits:  # the caller's tile batch or VAE tile is too large
        plan, given = chosen, [f"{name}={value}" for name, value in
                               (("tile_batch_size", tile_batch_size), ("vae_tile_size", vae_tile_size)) if value]
        fix = f"lower {' or '.join(given)} (or leave it to the planner)"
    else:
        plan, fix = smallest, "lower the size"
    stage = plan.peak_stage
    return (f"size {size} needs about {format_bytes(plan.peak)} at tile batch {plan.tile_batch_size} and VAE tile "
            f"{plan.vae_tile_size} ({stage.name}: {stage.detail}), more than the {format_bytes(plan.usable)} usable "
            f"of {format_bytes(plan.budget)} ({plan.budget_source}, {plan.margin:.0%} kept free); {fix}")


# ----------------------------------------------------------------------------------------------
# What is free


def available_bytes(device: str | None) -> tuple[int, int]:
    """(bytes free on ``device`` if it is a CUDA device, else 0; host available bytes). On CUDA the free
    bytes include what torch's allocator holds cached but unused, which it hands out first."""
    host = psutil.virtual_memory().available
    if device is None or not str(device).startswith("cuda"):
        return 0, host
    import torch

    if not torch.cuda.is_available():
        return 0, host
    dev = torch.device(device)
    cached = torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
    return torch.cuda.mem_get_info(dev)[0] + cached, host


# ---------------------------------------------------------------------- handing freed memory back
@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none (macOS, musl, Windows)."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None


def release_freed_memory() -> bool:
    """Hand the pages that the C allocator holds free back to the system; True where it could (glibc).

    glibc keeps freed heap blocks mapped (and after a large tensor is freed it raises its threshold
    for giving blocks back at once), so without this a request's working memory stays in the
    process's resident memory after the request returns: 0.4-0.7 GiB at 1024^2-2048^2 with the
    default model (``benchmarks/held_memory.py``). The pipeline calls this when a call ends: one
    ``malloc_trim(0)``, tens of milliseconds. Calling it between stages too lowered no peak, and fixing
    ``M_MMAP_THRESHOLD`` instead costs page faults on every large allocation (about 2x the wall time).
    Neither PyTorch nor psutil offers this, hence ctypes.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
