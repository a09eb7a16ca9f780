"""ControlNet inside the tile denoiser: every tile gets the crop of the control image at its own place.

Tiled tools that hand each tile the whole control image (resized to the tile) make every tile follow
the whole layout, and the image becomes a grid of clones. Here the control image is given once, at
the phase's pixel size (its latent times the VAE factor), and each tile's ControlNet call gets exactly
the pixels under that tile, so FSTD's shifted tiles all see the control where it lies in the image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .tiling import Box


@dataclass(frozen=True)
class TileControl:
    """One ControlNet and its condition for one phase.

    ``model``: a diffusers ``ControlNetModel`` (its ``conditioning_embedding`` must reduce by
    ``factor``); ``image``: (1 or B, C, H * factor, W * factor) for an H x W latent, in the range the
    ControlNet was trained on (diffusers' pipelines: [0, 1]), or uint8 (0..255, read as value / 255
    one crop at a time: a quarter of float32's bytes for a large pass's whole control image); ``scale``: ``conditioning_scale``;
    ``start`` / ``end``: the fraction of ``timesteps`` (this phase's, in order) during which it acts, as
    diffusers' ``control_guidance_start`` / ``control_guidance_end``; with ``timesteps`` None it acts at
    every step."""

    model: torch.nn.Module
    image: torch.Tensor
    scale: float = 1.0
    factor: int = 8
    start: float = 0.0
    end: float = 1.0
    timesteps: tuple[float, ...] | None = None

    def active(self, t: torch.Tensor) -> bool:
        """Whether this control acts at timestep ``t`` (diffusers' rule: step i of n acts when
        ``start <= i / n`` and ``(i + 1) / n <= end``)."""
        if self.timesteps is None:
            return True
        value = float(t)
        i = min(range(len(self.timesteps)), key=lambda k: abs(self.timesteps[k] - value))
        n = len(self.timesteps)
        return not (i / n < self.start or (i + 1) / n > self.end)

    def crops(self, boxes: Sequence[Box], per: int) -> torch.Tensor:
        """The control pixels under each latent box, (len(boxes) * per, C, h * factor, w * factor),
        box-major with ``per`` images per box like the tiles."""
        f, image = self.factor, self.image
        parts = []
        for top, left, bottom, right in boxes:
            crop = image[:, :, top * f : bottom * f, left * f : right * f]
            if crop.shape[-2:] != ((bottom - top) * f, (right - left) * f):
                raise ValueError(f"control image {tuple(image.shape[-2:])} does not cover latent box "
                                 f"{(top, left, bottom, right)} at {f} px per latent px")
            if crop.dtype == torch.uint8:
                crop = crop.to(torch.float32) / 255.0  # as diffusers' VaeImageProcessor reads a PIL image
            parts.append(crop if crop.shape[0] == per else crop.expand(per, *crop.shape[1:]))
        return torch.cat(parts)


def residuals(controls: Sequence[TileControl], rows: Sequence[torch.Tensor], x: torch.Tensor, t: torch.Tensor,
              kwargs: dict) -> dict:
    """The summed ControlNet residuals for the UNet call on ``x`` (rows aligned with each control's
    crops in ``rows``), as the UNet's ``down_block_additional_residuals`` /
    ``mid_block_additional_residual`` keywords; {} when none acts at ``t``."""
    down = mid = None
    extra = {"added_cond_kwargs": kwargs["added_cond_kwargs"]} if "added_cond_kwargs" in kwargs else {}
    for control, cond in zip(controls, rows):
        if not control.active(t):
            continue
        d, m = control.model(x, t, encoder_hidden_states=kwargs["encoder_hidden_states"],
                             controlnet_cond=cond.to(x.device, x.dtype), conditioning_scale=control.scale,
                             return_dict=False, **extra)
        down = list(d) if down is None else [a + b for a, b in zip(down, d)]
        mid = m if mid is None else mid + m
    if down is None:
        return {}
    return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
