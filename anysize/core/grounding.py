"""GLIGEN grounding in a tile (Li et al. 2023): phrases tied to boxes, read by a UNet whose transformer
blocks carry gated self-attention (diffusers' ``attention_type="gated"`` with a
``GLIGENTextBoundingboxProjection``), through ``cross_attention_kwargs["gligen"]``.

A tile sees the boxes where they fall in it: each box (fractions of the whole image) is re-expressed in
the tile's own fractions, clipped to it, and a box that misses the tile is masked out; so a tile reads
the objects it holds, at the places they have in it, as a whole image cropped to the tile would show
them. One tile over the whole latent gets the boxes unchanged (diffusers' ``StableDiffusionGLIGENPipeline``
bit for bit). The unconditional rows of classifier-free guidance get no grounding (masks 0), as there.
Scheduled sampling as diffusers': the gated layers act during the first ``beta`` of a phase's steps.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .tiling import Box

MAX_OBJECTS = 30  # diffusers' GLIGEN pipeline pads to (and cuts at) 30 grounded phrases


@dataclass
class TileGrounding:
    """``boxes``: (x0, y0, x1, y1) per phrase, fractions of the whole image; ``embeds``: (N, D) phrase
    embeddings (the text encoder's pooled output, as diffusers); ``latent``: the whole latent's (H, W);
    ``active``: the timesteps during which the gated layers act (scheduled sampling)."""

    boxes: Sequence[tuple[float, float, float, float]]
    embeds: torch.Tensor
    latent: tuple[int, int]
    active: frozenset = frozenset()

    def tile_boxes(self, box: Box) -> tuple[list[list[float]], list[float]]:
        """The phrases' boxes in tile ``box``'s own fractions (clipped) and their masks (0: misses it)."""
        top, left, bottom, right = box
        h, w = self.latent
        # (x - left / w) * (w / tw): the identity on a tile that is the whole latent
        sx, sy, ox, oy = w / (right - left), h / (bottom - top), left / w, top / h
        out, masks = [], []
        for x0, y0, x1, y1 in self.boxes:
            rel = [(x0 - ox) * sx, (y0 - oy) * sy, (x1 - ox) * sx, (y1 - oy) * sy]
            clipped = [min(max(v, 0.0), 1.0) for v in rel]
            inside = clipped[2] > clipped[0] and clipped[3] > clipped[1]
            out.append(clipped if inside else [0.0] * 4)
            masks.append(1.0 if inside else 0.0)
        return out, masks

    def kwargs(self, boxes: Sequence[Box], per: int, cfg: bool, device, dtype) -> dict[str, torch.Tensor]:
        """``cross_attention_kwargs["gligen"]`` for a UNet call on ``boxes`` (``per`` images each, box-major;
        under ``cfg`` the unconditional rows first, without grounding)."""
        n, d = len(self.boxes), self.embeds.shape[-1]
        rows_boxes, rows_masks = [], []
        for box in boxes:
            tb, tm = self.tile_boxes(box)
            b = torch.zeros(MAX_OBJECTS, 4, dtype=dtype)
            b[:n] = torch.tensor(tb, dtype=torch.float64).to(dtype)  # through float64 as diffusers' torch.tensor
            m = torch.zeros(MAX_OBJECTS, dtype=dtype)
            m[:n] = torch.tensor(tm, dtype=dtype)
            rows_boxes += [b] * per
            rows_masks += [m] * per
        embeds = torch.zeros(MAX_OBJECTS, d, dtype=dtype, device=self.embeds.device)
        embeds[:n] = self.embeds.to(dtype)
        boxes_t, masks_t = torch.stack(rows_boxes).to(device), torch.stack(rows_masks).to(device)
        embeds_t = embeds.to(device).unsqueeze(0).expand(len(rows_boxes), -1, -1).clone()
        if cfg:
            boxes_t, embeds_t = torch.cat([boxes_t, boxes_t]), torch.cat([embeds_t, embeds_t])
            masks_t = torch.cat([torch.zeros_like(masks_t), masks_t])
        return {"boxes": boxes_t, "positive_embeddings": embeds_t, "masks": masks_t}


def gated_layers(unet) -> list:
    """The UNet's gated self-attention layers, whose ``enabled`` switches them (diffusers' ``enable_fuser``)."""
    from diffusers.models.attention import GatedSelfAttentionDense

    return [m for m in unet.modules() if type(m) is GatedSelfAttentionDense]


def is_gligen_parameter(name: str) -> bool:
    """Whether a UNet parameter belongs to what GLIGEN adds to a base model: the box projection
    (``position_net``) or a gated self-attention layer (``fuser``)."""
    return name.startswith("position_net.") or ".fuser." in name


def phrase_embeddings(tokenizer, text_encoder, phrases) -> torch.Tensor:
    """The phrases' embeddings as diffusers' GLIGEN pipeline takes them: the text encoder's pooled output
    of the phrases tokenized together (padded; cut at the tokenizer's window)."""
    tokens = tokenizer(list(phrases), padding=True, truncation=True, max_length=tokenizer.model_max_length,
                       return_tensors="pt").to(text_encoder.device)
    return text_encoder(**tokens).pooler_output


def is_grounded(unet) -> bool:
    """Whether ``unet`` carries GLIGEN's gated layers and box projection."""
    return getattr(unet, "position_net", None) is not None
