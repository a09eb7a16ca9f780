"""Facts of a denoising network that the geometry, the planner and the stages need, for a diffusers
``UNet2DConditionModel`` or a diffusion transformer (``SD3Transformer2DModel``, ``FluxTransformer2DModel``)
alike: its kind, the latent side it was trained at, the step its tiles' sides and corners keep, and the
latent channels it samples."""
from __future__ import annotations

from typing import Any

FLUX_NATIVE_LATENT = 128  # FLUX.1's 1024 px training side at its VAE's factor 8 (its config has no sample_size)
T5_WINDOW = {"flux": 512, "sd3": 256}  # diffusers' default max_sequence_length: the T5 tokens each reads
CLIP_WINDOW = 77


def kind(net: Any) -> str:
    """"unet", "sd3" or "flux"."""
    name = type(net).__name__
    if "Flux" in name:
        return "flux"
    if "SD3" in name:
        return "sd3"
    return "unet"


def is_transformer(net: Any) -> bool:
    return kind(net) != "unet"


def native_latent(net: Any) -> int:
    """The latent side the network was trained at: a UNet's or SD3's ``sample_size`` (its largest side),
    FLUX's 128."""
    if kind(net) == "flux":
        return FLUX_NATIVE_LATENT
    size = net.config.sample_size
    return int(size if isinstance(size, int) else max(size))


def granularity(net: Any) -> int:
    """Latent px a tile side (and, with FSTD's cut edges, a tile corner) is a multiple of: a UNet's
    downsampling factor, SD3's patch, FLUX's 2x2 packing."""
    k = kind(net)
    if k == "flux":
        return 2
    if k == "sd3":
        return int(net.config.patch_size)
    return 2 ** (len(net.config.block_out_channels) - 1)


def text_tokens(kind_: str) -> int:
    """The text tokens a transformer's joint attention carries beside the image's: FLUX's T5 window,
    SD3's CLIP window and T5 window joined."""
    return T5_WINDOW[kind_] + (CLIP_WINDOW if kind_ == "sd3" else 0)


def latent_channels(net: Any) -> int:
    """The channels of the latent the network samples (FLUX packs 2x2 patches of them into its input)."""
    channels = int(net.config.in_channels)
    return channels // 4 if kind(net) == "flux" else channels


def of(pipe: Any) -> Any:
    """A diffusers pipeline's denoising network: its ``unet``, else its ``transformer``."""
    unet = getattr(pipe, "unet", None)
    return unet if unet is not None else getattr(pipe, "transformer", None)
