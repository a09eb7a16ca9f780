"""Region prompts inside the tile denoiser: feathered masks and the blend of the prompts' outputs.

Each tile is evaluated with the global prompt, and each region prompt whose mask reaches into it is
evaluated on the tile's crop to the region (MultiDiffusion's region control, Bar-Tal et al. 2023, done
per tile inside the one-step-per-timestep loop; as A1111 Tiled Diffusion's region control, a region is
denoised as its own box, so the model composes its prompt inside the box instead of anywhere in the
tile and having it cut by the mask). The guided outputs are blended per pixel: a region's mask ``m``
(its weight times a ramp that rises over ``feather`` latent px inside its box) weighs its output, and
the global prompt gets ``max(0, 1 - sum(m))``, so a region of weight 1 replaces it inside the box and
neither is cut off at the box's edge. A tile no region reaches gets the global prompt's output unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .tiling import Box


@dataclass(frozen=True)
class TileRegion:
    """A region prompt at one phase's latent resolution.

    ``embeds``: the prompt's embeddings (B, seq, dim) or (1, seq, dim); ``box``: (x0, y0, x1, y1) in
    latent px of this phase (floats); ``weight``: the mask's height; ``feather``: the ramp's width in
    latent px; ``canvas``: the latent's (height, width), where a side of the box on the canvas's edge
    (or beyond) has no ramp, so a region reaching the edge is whole there; ``added``: SDXL's added
    conditions for this prompt (its pooled ``text_embeds`` and the ``time_ids``), SD3's and FLUX's
    pooled embedding (``pooled_projections``), None for SD 1.x / 2.x."""

    embeds: torch.Tensor
    box: tuple[float, float, float, float]
    weight: float = 1.0
    feather: float = 1.0
    canvas: tuple[int, int] | None = None
    added: dict[str, torch.Tensor] | None = None

    def _sides(self) -> tuple[float, float, float, float]:
        """The box with the sides on the canvas's edges moved out to infinity (no ramp there)."""
        x0, y0, x1, y1 = self.box
        if self.canvas is None:
            return x0, y0, x1, y1
        h, w = self.canvas
        inf = math.inf
        return (-inf if x0 <= 0 else x0, -inf if y0 <= 0 else y0, inf if x1 >= w else x1, inf if y1 >= h else y1)


def _ramp(start: int, end: int, lo: float, hi: float, feather: float) -> torch.Tensor:
    """A 1-D mask over pixels ``start..end-1`` (centres at +0.5): 0 outside ``[lo, hi]``, rising linearly
    over ``feather`` px inside each end, 1 in the middle (float64)."""
    c = torch.arange(start, end, dtype=torch.float64) + 0.5
    f = max(float(feather), 0.5)
    return ((c - lo) / f).clamp(0, 1) * ((hi - c) / f).clamp(0, 1)


def region_mask(region: TileRegion, box: Box) -> torch.Tensor:
    """The region's mask over the tile ``box`` (top, left, bottom, right), (h, w) float64, weight included."""
    top, left, bottom, right = box
    x0, y0, x1, y1 = region._sides()
    rows = _ramp(top, bottom, y0, y1, region.feather)
    cols = _ramp(left, right, x0, x1, region.feather)
    return torch.outer(rows, cols) * region.weight


def reaches(region: TileRegion, box: Box) -> bool:
    """Whether the region's mask is non-zero anywhere in the tile ``box``."""
    top, left, bottom, right = box
    x0, y0, x1, y1 = region._sides()
    return bool(_ramp(top, bottom, y0, y1, region.feather).max() > 0
                and _ramp(left, right, x0, x1, region.feather).max() > 0)


# The least side of a region's crop, as a fraction of the model's native latent side. Below about half
# its native side a model composes nothing: on the default model (native 20 latent px) a 4-5 px crop
# came out as bare background, so a box an object's size was painted empty and the global prompt drew
# the object beside it (0% of objects in their box, benchmarks/grounding.py); a crop of half the native
# side centred on the box gives the model room to draw (centred in their box: 11-27% of the objects, from
# 0-5%), and the mask still keeps its output to the box. It does not make region prompts place objects
# of a box's size (0-3% by IoU >= 0.5, below no regions): they control areas; objects are the ControlNet's.
REGION_CONTEXT = 0.5


def region_crop(region: TileRegion, box: Box, granularity: int, aligned: bool = False, native: int = 0) -> Box:
    """The part of tile ``box`` a region prompt is evaluated on: the tile cut to the region's box,
    rounded outward to whole pixels, widened to at least :data:`REGION_CONTEXT` of the model's native
    latent side ``native`` a side around the box's centre (0: not at all), and to a multiple of
    ``granularity``, all inside the tile. ``aligned``: the crop's sides on the tile's own
    ``granularity`` grid, so a transformer's patches in the crop are the tile's patches (its positions
    then fall on the same patch grid)."""
    top, left, bottom, right = box
    x0, y0, x1, y1 = region.box
    g = granularity

    def side(lo: float, hi: float, start: int, end: int) -> tuple[int, int]:
        a, b = max(start, math.floor(lo)), min(end, math.ceil(hi))
        want = min(math.ceil(REGION_CONTEXT * native), end - start)
        if want > b - a:  # grown around the box's centre, shifted to stay inside the tile
            a = max(start, min(a - (want - (b - a)) // 2, end - want))
            b = a + want
        if aligned:
            a, b = start + (a - start) // g * g, min(end, start + -(-(b - start) // g) * g)
        need = min(-(b - a) % g, end - start - (b - a))
        grow = min(need, end - b)
        return a - (need - grow), b + grow

    (t0, b0), (l0, r0) = side(y0, y1, top, bottom), side(x0, x1, left, right)
    return t0, l0, b0, r0


def with_regions(out: torch.Tensor, x: torch.Tensor, box: Box, regions, crop_of, evaluate) -> torch.Tensor:
    """Tile ``box``'s guided output ``out`` (its input ``x``, the same rows) with the region prompts
    that reach into it blended in: each region is evaluated by ``evaluate(region, x_crop, crop)`` on its
    crop ``crop_of(region, box)`` of the tile, zero outside it, and blended by its mask (:func:`blend`).
    What the UNet and transformer tile denoisers share; how a crop is cut and evaluated is theirs."""
    outs, masks = [], []
    for r in regions:
        if not reaches(r, box):
            continue
        crop = crop_of(r, box)
        ct, cl, cb, cr = crop[0] - box[0], crop[1] - box[1], crop[2] - box[0], crop[3] - box[1]
        full = torch.zeros_like(out)
        full[:, :, ct:cb, cl:cr] = evaluate(r, x[:, :, ct:cb, cl:cr], crop)
        outs.append(full)
        masks.append(region_mask(r, box).to(out.device))  # zero outside the crop already
    return blend(out, outs, masks)


def blend(global_out: torch.Tensor, region_outs: list[torch.Tensor], masks: list[torch.Tensor]) -> torch.Tensor:
    """Per-pixel blend of one tile's conditional outputs (each (B, C, h, w)): the global prompt's with
    weight ``max(0, 1 - sum(masks))``, each region's with its mask. With no region, ``global_out``
    itself (bit for bit)."""
    if not region_outs:
        return global_out
    total = torch.stack(masks).sum(0)
    rest = (1 - total).clamp(min=0)
    value = global_out.double() * rest
    for out, mask in zip(region_outs, masks):
        value = value + out.double() * mask
    return (value / (rest + total)).to(global_out.dtype)
