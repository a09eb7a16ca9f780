"""One sampling loop for every tiling.

The loop (:func:`sample`) knows nothing of tiles: it takes a model callable ``model(x, t, step)`` that
returns the model output for the WHOLE latent, and a diffusers scheduler, and calls
``scheduler.step`` exactly once per timestep on the whole latent, so multistep schedulers (DPM-Solver++,
UniPC) keep a correct history. Tiling is :class:`TiledModel`, a wrapper with that same call contract:
it evaluates a tile-level denoiser on the step's boxes in batches, and merges the outputs with
explicit weights (FSTD: Zheng et al. 2023, sec. 3.3; the MultiDiffusion-style merge of Bar-Tal et al. 2023).
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from . import distributed
from .tiling import Box, TilingConfig, tile_weights


class TileDenoiser(Protocol):
    """Evaluates the model on a batch of tiles.

    ``x`` is ``(len(boxes) * B, C, h, w)``, box-major (all B images of box 0, then box 1, ...);
    ``boxes`` are the tiles' places in the full latent. Returns the model output, same layout.
    """

    def __call__(self, x: torch.Tensor, t: torch.Tensor, boxes: Sequence[Box]) -> torch.Tensor: ...


def crop_tiles(x: torch.Tensor, boxes: Sequence[Box]) -> torch.Tensor:
    """Stack the crops of ``x`` (B, C, H, W) at ``boxes`` into (len(boxes) * B, C, h, w), box-major."""
    return torch.cat([x[:, :, t:b, l:r] for t, l, b, r in boxes])


class TileMerger:
    """Weighted average of tile outputs into one full-latent tensor: ``sum(w * out) / sum(w)``."""

    def __init__(self, shape: torch.Size, weighting: str, *, dtype: torch.dtype, device: torch.device):
        self.value = torch.zeros(shape, dtype=dtype, device=device)
        self.weight = torch.zeros(shape[-2:], dtype=dtype, device=device)
        self.weighting = weighting
        self._cache: dict[tuple[int, int], torch.Tensor] = {}

    def _w(self, h: int, w: int) -> torch.Tensor:
        if (h, w) not in self._cache:
            self._cache[(h, w)] = tile_weights(h, w, self.weighting, dtype=self.value.dtype, device=self.value.device)
        return self._cache[(h, w)]

    def add(self, out: torch.Tensor, boxes: Sequence[Box]) -> None:
        """Accumulate ``out`` (len(boxes) * B, C, h, w), box-major, at ``boxes``."""
        per_box = out.shape[0] // len(boxes)
        full = tuple(self.weight.shape)
        for i, (t, l, b, r) in enumerate(boxes):
            # a tile covering the whole canvas has nothing to blend with: weight 1 keeps it exact
            w = self._w(b - t, r - l) if (b - t, r - l) != full else 1.0
            self.value[:, :, t:b, l:r] += out[i * per_box : (i + 1) * per_box] * w
            self.weight[t:b, l:r] += w

    def result(self) -> torch.Tensor:
        if not bool((self.weight > 0).all()):
            missing = int((self.weight <= 0).sum())
            raise RuntimeError(f"tile plan left {missing} latent pixels uncovered; this is a bug in the plan")
        return self.value / self.weight


class TiledModel:
    """Whole-latent model callable built from a tile-level denoiser and a tiling config.

    All tile plans are drawn up front from ``generator`` (so a progress bar knows the total and a
    seed reproduces every plan); tile batching never changes which boxes are drawn or how they merge.
    Under torchrun each whole tile batch runs on one process (:mod:`anysize.distributed`), every
    process merges all of them in order, so the output is the single-process one bit for bit.
    """

    def __init__(
        self,
        denoiser: TileDenoiser,
        config: TilingConfig,
        *,
        height: int,
        width: int,
        num_steps: int,
        generator: torch.Generator | None = None,
    ):
        self.denoiser, self.config = denoiser, config
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.plans = [config.plan(height, width, i, generator) for i in range(num_steps)]
        self.progress: Callable[[int], Any] | None = None

    @property
    def total_evaluations(self) -> int:
        """Tile evaluations over all steps (classifier-free guidance not counted twice)."""
        return sum(len(p) for p in self.plans)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        boxes = self.plans[step]
        n = self.config.tile_batch_size
        chunks = [boxes[start : start + n] for start in range(0, len(boxes), n)]
        merger: TileMerger | None = None
        for chunk, out in zip(chunks, self._outputs(x, t, chunks)):
            if merger is None:
                shape = torch.Size((x.shape[0], out.shape[1], *x.shape[2:]))
                merger = TileMerger(shape, self.config.blend, dtype=out.dtype, device=out.device)
            merger.add(out, chunk)
            if self.progress is not None:
                self.progress(len(chunk))
        assert merger is not None
        return merger.result()

    def _outputs(self, x: torch.Tensor, t: torch.Tensor, chunks: list[list[Box]]) -> Iterable[torch.Tensor]:
        """The denoiser's output for each chunk, in order: one at a time here, or, under torchrun
        (:mod:`anysize.distributed`), each whole chunk on one rank and all of them on every rank."""
        if distributed.current() is None:
            return (self.denoiser(crop_tiles(x, chunk), t, chunk) for chunk in chunks)
        # every box of a chunk has one size (crop_tiles stacks them); the output has x's batch per box
        shapes = [(len(c) * x.shape[0], c[0][2] - c[0][0], c[0][3] - c[0][1]) for c in chunks]
        return distributed.share_batches(lambda i: self.denoiser(crop_tiles(x, chunks[i]), t, chunks[i]),
                                         shapes, x.device)


def _step_kwargs(scheduler, generator: torch.Generator | None) -> dict:
    """Pass ``generator`` to ``scheduler.step`` only where it takes one (UniPC does not)."""
    params = inspect.signature(scheduler.step).parameters
    return {"generator": generator} if "generator" in params else {}


def sample(
    model: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor],
    latents: torch.Tensor,
    scheduler,
    *,
    generator: torch.Generator | None = None,
    timesteps: Sequence | None = None,
    callback_on_step_end: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor | None] | None = None,
    start: int = 0,
) -> torch.Tensor:
    """Run the reverse process: one model evaluation and ONE ``scheduler.step`` per timestep.

    ``model(x, t, step)`` returns the model output for the whole latent (a :class:`TiledModel` or
    anything else); ``scheduler`` is any diffusers scheduler whose ``set_timesteps`` was called.
    ``callback_on_step_end(step, t, latents)`` may return a replacement latent.
    ``start``: resume at this step index, with ``latents``, the scheduler's state and the generator's
    as they were after step ``start - 1`` (see :mod:`anysize.resume`).
    """
    extra = _step_kwargs(scheduler, generator)
    for i, t in enumerate(scheduler.timesteps if timesteps is None else timesteps):
        if i < start:
            continue
        model_input = scheduler.scale_model_input(latents, t)
        output = model(model_input, t, i)
        latents = scheduler.step(output, t, latents, return_dict=False, **extra)[0]
        if callback_on_step_end is not None:
            replaced = callback_on_step_end(i, t, latents)
            latents = latents if replaced is None else replaced
    return latents


def sample_tiled(
    denoiser: TileDenoiser,
    latents: torch.Tensor,
    scheduler,
    config: TilingConfig,
    *,
    generator: torch.Generator | None = None,
    callback_on_step_end=None,
    progress: bool = True,
    desc: str = "denoise",
    timesteps: Sequence | None = None,
    start: int = 0,
    plan_generator: torch.Generator | None = None,
) -> torch.Tensor:
    """:func:`sample` over a :class:`TiledModel`, with one progress bar counting tile evaluations.

    ``timesteps``: a tail of ``scheduler.timesteps`` to run (img2img), default all of them.
    ``start``: resume at this step (as in :func:`sample`); the plans of every step are still drawn,
    from ``plan_generator`` (default :func:`plan_generator` of ``generator``; a resumed run passes
    the one made when the run first started).
    """
    steps = len(scheduler.timesteps if timesteps is None else timesteps)
    if plan_generator is None and generator is not None:
        plan_generator = make_plan_generator(generator)
    model = TiledModel(
        denoiser, config, height=latents.shape[-2], width=latents.shape[-1], num_steps=steps,
        generator=plan_generator,
    )
    done = sum(len(p) for p in model.plans[:start])
    with tqdm(total=model.total_evaluations, initial=done, desc=desc, unit="tile", disable=not progress) as bar:
        model.progress = bar.update
        return sample(model, latents, scheduler, generator=generator, timesteps=timesteps,
                      callback_on_step_end=callback_on_step_end, start=start)


def make_plan_generator(generator: torch.Generator) -> torch.Generator:
    """The tile plans' own generator, seeded from a hash of ``generator``'s state without advancing it:
    the caller's noise stream is then the same for every tiling method (fstd draws offsets, naive
    none) and for untiled sampling, also across several upscale passes."""
    digest = hashlib.blake2b(generator.get_state().numpy().tobytes(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


class UNetTileDenoiser:
    """Tile-level denoiser over a diffusers ``UNet2DConditionModel``, with classifier-free guidance.

    The unconditional and conditional passes of all tiles in a batch go through ONE UNet call.
    ``prompt_embeds``/``negative_prompt_embeds``: (B, seq, dim) for the whole image.
    ``cond``: (B, c, H, W) at latent resolution, cropped per tile and concatenated on channels
        (super-resolution UNets such as the SD x4 upscaler: in_channels = latent + c).
    ``class_labels``: (B,) e.g. the x4 upscaler's noise level. ``added_cond_kwargs``: per-image SDXL
        extras (``text_embeds`` (B, d), ``time_ids`` (B, 6)); ``negative_added_cond_kwargs`` the same for
        the unconditional half (SDXL's negative pooled embedding; default: ``added_cond_kwargs``).
    ``tile_prompt_embeds(box)``: optional per-tile positive embeddings (B, seq, dim) (regional prompts).
    """

    def __init__(
        self,
        unet,
        prompt_embeds: torch.Tensor,
        *,
        negative_prompt_embeds: torch.Tensor | None = None,
        guidance_scale: float = 1.0,
        cond: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        negative_added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        tile_prompt_embeds: Callable[[Box], torch.Tensor] | None = None,
    ):
        self.unet, self.guidance_scale = unet, guidance_scale
        self.prompt_embeds, self.cond, self.class_labels = prompt_embeds, cond, class_labels
        self.added_cond_kwargs, self.tile_prompt_embeds = added_cond_kwargs, tile_prompt_embeds
        self.do_cfg = guidance_scale > 1.0
        if self.do_cfg and negative_prompt_embeds is None:
            negative_prompt_embeds = torch.zeros_like(prompt_embeds)
        self.negative_prompt_embeds = negative_prompt_embeds
        self.negative_added_cond_kwargs = negative_added_cond_kwargs or added_cond_kwargs

    def _per_box(self, value: torch.Tensor | None, n_boxes: int) -> torch.Tensor | None:
        return None if value is None else value.repeat(n_boxes, *([1] * (value.dim() - 1)))

    def __call__(self, x: torch.Tensor, t: torch.Tensor, boxes: Sequence[Box]) -> torch.Tensor:
        n = len(boxes)
        if self.tile_prompt_embeds is not None:
            pos = torch.cat([self.tile_prompt_embeds(box) for box in boxes])
        else:
            pos = self._per_box(self.prompt_embeds, n)
        if self.cond is not None:
            x = torch.cat([x, crop_tiles(self.cond, boxes).to(x.dtype)], dim=1)
        labels = self._per_box(self.class_labels, n)
        added = self._added(self.added_cond_kwargs, n)
        if not self.do_cfg:
            return self._unet(x, t, pos, labels, added)
        neg = self._per_box(self.negative_prompt_embeds, n)
        if added is not None:
            neg_added = self._added(self.negative_added_cond_kwargs, n)
            added = {k: torch.cat([neg_added[k], v]) for k, v in added.items()}
        out = self._unet(
            torch.cat([x, x]), t, torch.cat([neg, pos]), None if labels is None else torch.cat([labels, labels]), added
        )
        uncond, cond = out.chunk(2)
        return uncond + self.guidance_scale * (cond - uncond)

    def _added(self, kwargs: dict[str, torch.Tensor] | None, n_boxes: int) -> dict[str, torch.Tensor] | None:
        return {k: self._per_box(v, n_boxes) for k, v in kwargs.items()} if kwargs else None

    def _unet(self, x, t, embeds, labels, added) -> torch.Tensor:
        kwargs: dict[str, Any] = {"encoder_hidden_states": embeds.to(x.dtype), "return_dict": False}
        if labels is not None:
            kwargs["class_labels"] = labels
        if added is not None:
            kwargs["added_cond_kwargs"] = added
        return self.unet(x, t, **kwargs)[0]
