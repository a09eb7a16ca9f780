"""Memory preflight: estimate a request's peak before any compute and refuse with the numbers.

The estimate is deliberately simple (a sum of the big buffers, with per-tile activation costs from
the model configs) and errs high; it exists to turn an out-of-memory crash hours into a run into a
one-line refusal at the start.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import psutil
import torch

GIB = 2**30

# float32 values held per latent pixel during sampling: latents, scaled input, model output, merged
# value and weight, up to three multistep histories, the conditioning image and its noise.
_FLOATS_PER_LATENT_PX = 36
# live activation tensors per UNet level during one forward, as a multiple of its feature map
_UNET_LIVE = 40
# live activation tensors in the VAE decoder's full-resolution block
_VAE_LIVE = 8


def _unet_tile_bytes(unet, tile: int) -> float:
    """Live activations of one UNet forward on a ``tile x tile`` latent: feature maps of every level."""
    bytes_per = torch.finfo(unet.dtype).bits // 8
    channels = list(unet.config.block_out_channels)
    return sum(c * (tile / 2**i) ** 2 for i, c in enumerate(channels)) * _UNET_LIVE * bytes_per


class MemoryPreflightError(ValueError):
    """The request cannot fit; the message has the estimate and the limit."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak bytes of one request, by part; ``device`` parts live where the model runs."""

    width: int
    height: int
    latents: int
    tiles: int
    vae: int
    image: int
    on_accelerator: bool
    device: str | None = None

    @property
    def device_bytes(self) -> int:
        return self.latents + self.tiles + self.vae

    @property
    def total(self) -> int:
        return self.device_bytes + self.image

    @classmethod
    def for_request(cls, width: int, height: int, *, latent_factor: int, unets, tile_batch_size: int,
                    output_bytes_per_px: int, vae_tile_px: int, vae_channels: int = 128,
                    device=None) -> MemoryEstimate:
        """``unets``: (unet, tile side in latent px) for every model that samples tiles; the largest
        per-batch activation counts. ``vae_tile_px``: the side of one VAE decode tile with its margins."""
        lat_px = math.ceil(width / latent_factor) * math.ceil(height / latent_factor)
        per_tile = max(_unet_tile_bytes(unet, tile) for unet, tile in unets)
        on_acc = device is not None and torch.device(device).type != "cpu"
        return cls(
            width=width, height=height,
            latents=lat_px * _FLOATS_PER_LATENT_PX * 4,
            tiles=int(per_tile * 2 * tile_batch_size),  # x2: classifier-free guidance
            vae=vae_tile_px**2 * vae_channels * _VAE_LIVE * 4,
            # the uint8 result, one copy (colour fix / PIL), and the caller's format
            image=width * height * (3 + 3 + output_bytes_per_px),
            on_accelerator=on_acc, device=None if device is None else str(device),
        )

    def describe(self) -> str:
        parts = ", ".join(f"{k} {getattr(self, k) / GIB:.2f}" for k in ("latents", "tiles", "vae", "image"))
        return f"about {self.total / GIB:.2f} GiB ({parts} GiB)"


def available_bytes(device: str | None) -> tuple[int, int]:
    """(free bytes on ``device`` if it is a CUDA device, else 0; host available bytes)."""
    host = psutil.virtual_memory().available
    if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available():
        return torch.cuda.mem_get_info(torch.device(device))[0], host
    return 0, host


def check_memory(estimate: MemoryEstimate, max_memory: int | None = None) -> None:
    """Raise :class:`MemoryPreflightError` when ``estimate`` exceeds ``max_memory`` or what is free."""
    size = f"{estimate.width}x{estimate.height}"
    if max_memory is not None:
        if estimate.total > max_memory:
            raise MemoryPreflightError(
                f"size {size} needs {estimate.describe()}, more than max_memory={max_memory / GIB:.2f} GiB")
        return
    device_free, host_free = available_bytes(estimate.device)
    if estimate.on_accelerator and device_free:
        if estimate.device_bytes > device_free:
            raise MemoryPreflightError(
                f"size {size} needs {estimate.device_bytes / GIB:.2f} GiB on the GPU ({estimate.describe()}), "
                f"more than the {device_free / GIB:.2f} GiB free; lower tile_batch_size or the size")
        need = estimate.image
    else:
        need = estimate.total
    if need > host_free:
        raise MemoryPreflightError(
            f"size {size} needs {estimate.describe()}, more than the {host_free / GIB:.2f} GiB of memory available; "
            "lower the size or tile_batch_size")
