"""Tile denoisers for diffusion transformers (diffusers' ``FluxTransformer2DModel`` and
``SD3Transformer2DModel``), beside :class:`~anysize.core.sampler.UNetTileDenoiser`: the same protocol
(``x`` box-major tiles of the latent, ``boxes`` their places), so the one sampling loop, FSTD's plans and
the tile merger work unchanged.

What tiles of a transformer need that a UNet's do not is their place. A tiled node that crops the latent
gives every tile the positions of an image of the tile's size, so each tile believes it is a whole image
(FLUX: rotary ids from 0; SD3: the positional table cropped at the centre). Here each tile gets the
positions its pixels have in the whole latent (``positions="global"``, the default):

- FLUX: the image tokens' rotary ids ``(0, row, col)`` in 2x2-patch units, offset by the tile's corner
  (a fraction when the corner falls between patches: rotary ids are real numbers). RoPE is relative, so
  among a tile's own tokens nothing changes; what changes is their attention to the text tokens (all at
  id 0), which then matches the whole image's.
- SD3: the sin-cos table (``pos_embed_max_size`` patches a side) cropped where the tile lies in the
  whole image's own centred crop. A latent larger than the table has no global place to take, so its
  tiles fall back to each tile's own centred crop (``positions_used`` says which).

A tile's positions are its own (FLUX's rotary table and SD3's table crop are shared by a call's batch),
so each tile runs a transformer call of its own, its images (and, under CFG, their unconditional rows)
together: a call's batch never depends on the tile batch, so neither does any tile's bits (MKL's GEMMs
do round by their row count on the CPU), and a transformer tile at a model's native size fills a GPU
by itself.
Guidance as each model expects: FLUX's embedded guidance (``guidance_scale`` into the guidance
embedding, dev) and optional true CFG with a negative prompt (``true_cfg_scale``); SD3's CFG with
unconditional rows first. Timesteps are the flow-matching scheduler's (0..1000): FLUX reads ``t / 1000``,
SD3 ``t``.
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from . import nets
from .control import TileControl
from .regions import TileRegion, region_crop, with_regions
from .tiling import Box

POSITIONS = ("global", "local")


def _check_positions(positions: str) -> None:
    if positions not in POSITIONS:
        raise ValueError(f"positions={positions!r}: must be one of {', '.join(POSITIONS)}")


def _rows(value: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """``value`` with ``n`` rows (one row repeated, or as it is)."""
    if value is None or value.shape[0] == n:
        return value
    if value.shape[0] != 1:
        raise ValueError(f"embeddings have {value.shape[0]} rows for a batch of {n}")
    return value.expand(n, *value.shape[1:])


class _TransformerTiles:
    """What the FLUX and SD3 tile denoisers share: one transformer call per tile (its images together),
    region prompts, the facts of their network (:mod:`anysize.core.nets`), and what a
    ``callback_on_step_end`` may read and change: the guidance scale (``pipe._guidance_scale``), for the
    steps left; the embeddings are not exposed (no tensors).

    ``regions`` (:class:`~anysize.core.regions.TileRegion`, boxes in this latent's px, ``added`` holding
    the region prompt's ``pooled_projections``): as the UNet denoiser's, each region reaching into a tile
    is evaluated on the tile's crop to the region (on the tile's patch grid) and blended by its mask. The
    crop gets the positions it has in the whole image, like any tile, so the region's prompt composes
    where the region lies, not as the corner of an image."""

    transformer: torch.nn.Module
    regions: tuple[TileRegion, ...] = ()

    def __call__(self, x: torch.Tensor, t: torch.Tensor, boxes: Sequence[Box]) -> torch.Tensor:
        per = x.shape[0] // len(boxes)  # images per box
        outs = []
        for i, box in enumerate(boxes):
            xi = x[i * per : (i + 1) * per]
            out = self._tile(xi, t, box)  # each subclass's own tile call
            outs.append(self._with_regions(xi, t, box, out) if self.regions else out)
        return torch.cat(outs)

    def _with_regions(self, x: torch.Tensor, t: torch.Tensor, box: Box, out: torch.Tensor) -> torch.Tensor:
        """Tile ``box``'s guided output ``out`` with the region prompts reaching into it blended in."""
        return with_regions(out, x, box, self.regions,
                            lambda r, b: region_crop(r, b, self.granularity, aligned=True, native=self.native_tile_size),
                            lambda r, xi, crop: self._tile(xi, t, crop, r.embeds, r.added["pooled_projections"]))

    @property
    def granularity(self) -> int:
        """FLUX's 2x2 packing, SD3's patch: tile sides and (with edges="cut") tile corners keep it."""
        return nets.granularity(self.transformer)

    @property
    def native_tile_size(self) -> int:
        """Latent px: FLUX's 1024 px training side at its VAE's factor 8, SD3's ``sample_size``."""
        return nets.native_latent(self.transformer)

    def callback_tensors(self, names) -> dict[str, torch.Tensor]:
        return {}

    def update_from_callback(self, guidance_scale: float, tensors: dict[str, torch.Tensor]) -> None:
        self.guidance_scale = guidance_scale
        if hasattr(self, "do_cfg"):
            self.do_cfg = guidance_scale > 1.0 and self.negative_prompt_embeds is not None


# ---------------------------------------------------------------------- FLUX
def pack(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) latents -> (B, h/2 * w/2, 4C) FLUX tokens (2x2 patches), as diffusers' FluxPipeline."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`pack` for a (h, w) latent."""
    b, _, d = tokens.shape
    return tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def flux_image_ids(h: int, w: int, top: float = 0.0, left: float = 0.0, *, device=None,
                   dtype=torch.float32) -> torch.Tensor:
    """FLUX's image-token ids ``(0, row, col)`` of a (h, w) latent whose corner is at latent ``(top, left)``
    of the whole image, in patch units: ``(h/2 * w/2, 3)``, row-major as :func:`pack` orders tokens.
    With ``top = left = 0`` this is diffusers' ``FluxPipeline._prepare_latent_image_ids``."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = ids[..., 1] + (torch.arange(h // 2)[:, None] + top / 2)
    ids[..., 2] = ids[..., 2] + (torch.arange(w // 2)[None, :] + left / 2)
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FluxTileDenoiser(_TransformerTiles):
    """Tile-level denoiser over a diffusers ``FluxTransformer2DModel`` (16-channel latents, 2x2 patches).

    ``prompt_embeds`` (B or 1, L, D) and ``pooled_prompt_embeds`` (B or 1, P): the T5 and CLIP
    embeddings as diffusers' ``FluxPipeline.encode_prompt`` gives them. ``controls``: FLUX ControlNets
    (diffusers ``FluxControlNetModel``, InstantX's layout) with their condition in latent space
    (:class:`~anysize.core.control.TileControl` with ``factor=1``: the control image VAE-encoded at the
    phase's size, shifted and scaled as the latents): each tile's ControlNet call gets the crop under
    the tile, packed, with the tile's global ids, and the residuals of all of them are summed, as
    diffusers' ``FluxControlNetPipeline`` and ``FluxMultiControlNetModel`` do (the true-CFG negative
    call reuses the positive call's residuals, as there). ``guidance_scale``: the guidance
    embedding's value where the model has one (FLUX.1-dev; ignored by schnell). ``true_cfg_scale`` > 1
    with ``negative_prompt_embeds`` / ``negative_pooled_prompt_embeds``: a second, unconditional call
    per tile and ``neg + s * (pos - neg)``, as diffusers' ``true_cfg_scale``. ``positions``: "global"
    (each tile's ids where it lies in the whole latent) or "local" (ids from 0, as tiled nodes do).
    """

    def __init__(self, transformer, prompt_embeds: torch.Tensor, pooled_prompt_embeds: torch.Tensor, *,
                 guidance_scale: float = 3.5, true_cfg_scale: float = 1.0,
                 negative_prompt_embeds: torch.Tensor | None = None,
                 negative_pooled_prompt_embeds: torch.Tensor | None = None, positions: str = "global",
                 joint_attention_kwargs: dict | None = None, regions: Sequence[TileRegion] = (),
                 controls: Sequence[TileControl] = ()):
        _check_positions(positions)
        self.regions, self.controls = tuple(regions), tuple(controls)
        if true_cfg_scale > 1 and (negative_prompt_embeds is None or negative_pooled_prompt_embeds is None):
            raise ValueError("true_cfg_scale > 1: needs negative_prompt_embeds and negative_pooled_prompt_embeds")
        self.transformer, self.positions = transformer, positions
        self.prompt_embeds, self.pooled_prompt_embeds = prompt_embeds, pooled_prompt_embeds
        self.negative_prompt_embeds, self.negative_pooled_prompt_embeds = (negative_prompt_embeds,
                                                                           negative_pooled_prompt_embeds)
        self.guidance_scale, self.true_cfg_scale = guidance_scale, true_cfg_scale
        self.joint_attention_kwargs = joint_attention_kwargs

    def _tile(self, x: torch.Tensor, t: torch.Tensor, box: Box, embeds: torch.Tensor | None = None,
              pooled: torch.Tensor | None = None) -> torch.Tensor:
        """The guided output of tile ``box`` (``embeds`` / ``pooled``: a region's prompt instead of the
        global one; true CFG's negative stays the call's)."""
        b, _, h, w = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"a FLUX tile must have even sides (2x2 patches), got {h}x{w}")
        top, left = (box[0], box[1]) if self.positions == "global" else (0, 0)
        dtype = self.transformer.dtype
        ids = flux_image_ids(h, w, top, left, device=x.device, dtype=dtype)
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full([b], self.guidance_scale, device=x.device, dtype=torch.float32)
        step = t.expand(b).to(dtype) / 1000 if torch.is_tensor(t) else torch.full([b], t / 1000, dtype=dtype)

        def run(embeds, pooled, residuals):
            embeds = _rows(embeds, b).to(x.device, dtype)
            txt_ids = torch.zeros(embeds.shape[1], 3, device=x.device, dtype=dtype)
            pooled = _rows(pooled, b).to(x.device, dtype)
            if residuals is None:
                residuals = self._control(x, t, box, step.to(x.device), embeds, pooled, txt_ids, ids)
            out = self.transformer(hidden_states=pack(x.to(dtype)), timestep=step.to(x.device), guidance=guidance,
                                   pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=txt_ids,
                                   img_ids=ids, joint_attention_kwargs=self.joint_attention_kwargs, return_dict=False,
                                   **residuals)[0]
            return unpack(out, h, w), residuals

        if embeds is None:
            embeds, pooled = self.prompt_embeds, self.pooled_prompt_embeds
        out, residuals = run(embeds, pooled, None)
        if self.true_cfg_scale > 1:
            neg, _ = run(self.negative_prompt_embeds, self.negative_pooled_prompt_embeds, residuals)
            out = neg + self.true_cfg_scale * (out - neg)
        return out

    def _control(self, x: torch.Tensor, t, box: Box, step: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor,
                 txt_ids: torch.Tensor, ids: torch.Tensor) -> dict:
        """The summed residuals of the ControlNets acting at ``t`` for tile ``box`` (the transformer's
        ``controlnet_block_samples`` / ``controlnet_single_block_samples`` keywords); {} when none acts."""
        blocks = singles = None
        dtype = self.transformer.dtype
        for control in self.controls:
            if not control.active(t):
                continue
            net = control.model
            guidance = None
            if net.config.guidance_embeds:
                guidance = torch.full([x.shape[0]], self.guidance_scale, device=x.device, dtype=torch.float32)
            cond = pack(control.crops([box], x.shape[0]).to(x.device, dtype))
            d, s = net(hidden_states=pack(x.to(dtype)), controlnet_cond=cond, conditioning_scale=control.scale,
                       timestep=step, guidance=guidance, pooled_projections=pooled, encoder_hidden_states=embeds,
                       txt_ids=txt_ids, img_ids=ids, joint_attention_kwargs=self.joint_attention_kwargs,
                       return_dict=False)
            blocks, singles = _summed(blocks, d), _summed(singles, s)
        if blocks is None and singles is None:
            return {}
        return {"controlnet_block_samples": blocks, "controlnet_single_block_samples": singles,
                "controlnet_blocks_repeat": False}


def _summed(total: list | None, more: list | None) -> list | None:
    """Residual lists added element by element (None: a ControlNet without such blocks)."""
    if total is None or more is None:
        return more if total is None else total
    return [a + b for a, b in zip(total, more)]


# ---------------------------------------------------------------------- SD3
class SD3TileDenoiser(_TransformerTiles):
    """Tile-level denoiser over a diffusers ``SD3Transformer2DModel`` (SD 3.0 / 3.5), with CFG.

    ``prompt_embeds`` (B or 1, L, D) / ``pooled_prompt_embeds`` (B or 1, P) and their negatives: as
    diffusers' ``StableDiffusion3Pipeline.encode_prompt`` gives them. ``latent``: the whole latent's
    (H, W), which places the tiles in the positional table (see the module's docstring). ``controls``:
    SD3 ControlNets (diffusers ``SD3ControlNetModel``) with their condition in latent space
    (``TileControl`` with ``factor=1``): each tile's ControlNet call gets the crop under the tile (every
    row, unconditional ones too, as diffusers' ``StableDiffusion3ControlNetPipeline``), its own
    positional table cropped at the tile's place, the pooled embedding or zeros as its config says
    (``force_zeros_for_pooled_projection``), and the residuals of all of them are summed.
    """

    def __init__(self, transformer, prompt_embeds: torch.Tensor, pooled_prompt_embeds: torch.Tensor, *,
                 latent: tuple[int, int], guidance_scale: float = 7.0,
                 negative_prompt_embeds: torch.Tensor | None = None,
                 negative_pooled_prompt_embeds: torch.Tensor | None = None, positions: str = "global",
                 joint_attention_kwargs: dict | None = None, regions: Sequence[TileRegion] = (),
                 controls: Sequence[TileControl] = ()):
        _check_positions(positions)
        self.regions, self.controls = tuple(regions), tuple(controls)
        self.do_cfg = guidance_scale > 1.0
        if self.do_cfg and (negative_prompt_embeds is None or negative_pooled_prompt_embeds is None):
            raise ValueError("guidance_scale > 1: needs negative_prompt_embeds and negative_pooled_prompt_embeds")
        self.transformer, self.guidance_scale = transformer, guidance_scale
        self.prompt_embeds, self.pooled_prompt_embeds = prompt_embeds, pooled_prompt_embeds
        self.negative_prompt_embeds, self.negative_pooled_prompt_embeds = (negative_prompt_embeds,
                                                                           negative_pooled_prompt_embeds)
        self.joint_attention_kwargs = joint_attention_kwargs
        self.patch = int(transformer.config.patch_size)
        self.table = int(transformer.config.pos_embed_max_size)
        self._full = (-(-latent[0] // self.patch), -(-latent[1] // self.patch))  # the whole latent, in patches
        self.positions = positions
        self.positions_used = positions if max(self._full) <= self.table else "local"

    def corner(self, box: Box, table: int | None = None) -> tuple[int, int]:
        """Where tile ``box``'s crop of a positional table of ``table`` patches a side (None: the
        transformer's) starts, in patches: where the tile lies in the whole latent's centred crop, or,
        with local positions or a latent larger than the table, the tile's own centred crop (as diffusers)."""
        table = self.table if table is None else table
        top, left, bottom, right = box
        if self.positions == "global" and max(self._full) <= table:
            return (table - self._full[0]) // 2 + top // self.patch, (table - self._full[1]) // 2 + left // self.patch
        h, w = -(-(bottom - top) // self.patch), -(-(right - left) // self.patch)
        return (table - h) // 2, (table - w) // 2

    def _tile(self, x: torch.Tensor, t: torch.Tensor, box: Box, embeds: torch.Tensor | None = None,
              pooled: torch.Tensor | None = None) -> torch.Tensor:
        """The guided output of tile ``box`` (``embeds`` / ``pooled``: a region's prompt instead of the
        global one; the unconditional rows stay the call's negative prompt)."""
        b, dtype = x.shape[0], self.transformer.dtype
        if embeds is None:
            embeds, pooled = self.prompt_embeds, self.pooled_prompt_embeds
        pos, pooled = _rows(embeds, b), _rows(pooled, b)
        if self.do_cfg:  # unconditional rows first, one call, as diffusers' StableDiffusion3Pipeline
            x = torch.cat([x, x])
            pos = torch.cat([_rows(self.negative_prompt_embeds, b), pos])
            pooled = torch.cat([_rows(self.negative_pooled_prompt_embeds, b), pooled])
        step = t.expand(x.shape[0]) if torch.is_tensor(t) else torch.full([x.shape[0]], float(t))
        x, step, pos, pooled = x.to(dtype), step.to(x.device, dtype), pos.to(x.device, dtype), pooled.to(x.device, dtype)
        residuals = self._control(x, t, box, step, pos, pooled, b)
        with _table_crop(self.transformer.pos_embed, self.corner(box)):
            out = self.transformer(hidden_states=x, timestep=step, encoder_hidden_states=pos, pooled_projections=pooled,
                                   joint_attention_kwargs=self.joint_attention_kwargs, return_dict=False,
                                   **residuals)[0]
        if not self.do_cfg:
            return out
        uncond, cond = out.chunk(2)
        return uncond + self.guidance_scale * (cond - uncond)

    def _control(self, x: torch.Tensor, t, box: Box, step: torch.Tensor, pos: torch.Tensor, pooled: torch.Tensor,
                 images: int) -> dict:
        """The summed residuals of the ControlNets acting at ``t`` for tile ``box`` (the transformer's
        ``block_controlnet_hidden_states``), for the call's rows ``x`` (``images`` a copy); {} when none acts."""
        total = None
        for control in self.controls:
            if not control.active(t):
                continue
            net, config = control.model, control.model.config
            cond = control.crops([box], images).to(x.device, x.dtype)
            cond = torch.cat([cond] * (x.shape[0] // images))  # the unconditional rows get it too
            c_pooled = torch.zeros_like(pooled) if config.force_zeros_for_pooled_projection else pooled
            c_text = pos if config.joint_attention_dim is not None else None
            table = getattr(net.pos_embed, "pos_embed_max_size", None)
            crop = _table_crop(net.pos_embed, self.corner(box, table)) if table else contextlib.nullcontext()
            with crop:
                samples = net(hidden_states=x, timestep=step, encoder_hidden_states=c_text, pooled_projections=c_pooled,
                              joint_attention_kwargs=self.joint_attention_kwargs, controlnet_cond=cond,
                              conditioning_scale=control.scale, return_dict=False)[0]
            total = _summed(total, list(samples))
        return {} if total is None else {"block_controlnet_hidden_states": total}


@contextlib.contextmanager
def _table_crop(patch_embed, corner: tuple[int, int]):
    """While the transformer runs, its ``PatchEmbed`` crops the positional table at ``corner`` (in
    patches) instead of at the centre."""
    def cropped(height: int, width: int) -> torch.Tensor:
        h, w = height // patch_embed.patch_size, width // patch_embed.patch_size
        size, (top, left) = patch_embed.pos_embed_max_size, corner
        table = patch_embed.pos_embed.reshape(1, size, size, -1)
        return table[:, top : top + h, left : left + w, :].reshape(1, h * w, -1)

    patch_embed.cropped_pos_embed = cropped  # an instance attribute over the method, removed after
    try:
        yield
    finally:
        del patch_embed.cropped_pos_embed
