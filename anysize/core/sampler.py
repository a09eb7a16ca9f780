"""One sampling loop for every tiling.

The loop (:func:`sample`) knows nothing of tiles: it takes a model callable ``model(x, t, step)`` that
returns the model output for the WHOLE latent, and a diffusers scheduler, and calls
``scheduler.step`` exactly once per timestep on the whole latent, so multistep schedulers (DPM-Solver++,
UniPC) keep a correct history. Tiling is :class:`TiledModel`, a wrapper with that same call contract:
it evaluates a tile-level denoiser on the step's boxes in batches, and merges the outputs with
explicit weights (FSTD: Zheng et al. 2023, sec. 3.3; the MultiDiffusion-style merge of Bar-Tal et al. 2023).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Any, Protocol

import torch

from . import distributed, nets
from .control import TileControl
from .control import residuals as control_residuals
from .grounding import TileGrounding, gated_layers
from .progress import Progress, progress_bar
from .regions import TileRegion, region_crop, with_regions
from .tiling import Box, TilingConfig, tile_weights


class TileDenoiser(Protocol):
    """Evaluates the model on a batch of tiles.

    ``x`` is ``(len(boxes) * B, C, h, w)``, box-major (all B images of box 0, then box 1, ...);
    ``boxes`` are the tiles' places in the full latent. Returns the model output, same layout.
    """

    def __call__(self, x: torch.Tensor, t: torch.Tensor, boxes: Sequence[Box]) -> torch.Tensor: ...


def crop_tiles(x: torch.Tensor, boxes: Sequence[Box]) -> torch.Tensor:
    """Stack the crops of ``x`` (B, C, H, W) at ``boxes`` into (len(boxes) * B, C, h, w), box-major.
    ``x`` may also be an :class:`anysize.core.bands.DiskTensor` (its own ``crop``)."""
    if not torch.is_tensor(x):
        return x.crop(boxes)
    return torch.cat([x[:, :, t:b, l:r] for t, l, b, r in boxes])


class TileMerger:
    """Weighted average of tile outputs into one full-latent tensor: ``sum(w * out) / sum(w)``.

    ``canvas``: the latent's (H, W) when this merger holds only some of its rows (:class:`BandMerger`)."""

    def __init__(self, shape: torch.Size, weighting: str, *, dtype: torch.dtype, device: torch.device,
                 canvas: tuple[int, int] | None = None):
        self.value = torch.zeros(shape, dtype=dtype, device=device)
        self.weight = torch.zeros(shape[-2:], dtype=dtype, device=device)
        self.weighting, self.top = weighting, 0  # self.top: the latent row that self.value's row 0 holds
        self.canvas = tuple(shape[-2:]) if canvas is None else tuple(canvas)
        self._cache: dict[tuple[int, int], torch.Tensor] = {}

    def _w(self, h: int, w: int) -> torch.Tensor:
        if (h, w) not in self._cache:
            self._cache[(h, w)] = tile_weights(h, w, self.weighting, dtype=self.value.dtype, device=self.value.device)
        return self._cache[(h, w)]

    def add(self, out: torch.Tensor, boxes: Sequence[Box]) -> None:
        """Accumulate ``out`` (len(boxes) * B, C, h, w), box-major, at ``boxes``."""
        per_box = out.shape[0] // len(boxes)
        for i, (t, l, b, r) in enumerate(boxes):
            # a tile covering the whole canvas has nothing to blend with: weight 1 keeps it exact
            w = self._w(b - t, r - l) if (b - t, r - l) != self.canvas else 1.0
            t, b = t - self.top, b - self.top
            self.value[:, :, t:b, l:r] += out[i * per_box : (i + 1) * per_box] * w
            self.weight[t:b, l:r] += w

    def result(self) -> torch.Tensor:
        return self._quotient(self.value, self.weight)

    @staticmethod
    def _quotient(value: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if not bool((weight > 0).all()):
            missing = int((weight <= 0).sum())
            raise RuntimeError(f"tile plan left {missing} latent pixels uncovered; this is a bug in the plan")
        return value / weight


class BandMerger(TileMerger):
    """A :class:`TileMerger` over a window of rows that grows as tiles arrive and gives up finished
    bands (:meth:`take`): same sums in the same order, so the same values bit for bit."""

    def __init__(self, batch: int, channels: int, weighting: str, *, canvas: tuple[int, int],
                 dtype: torch.dtype, device: torch.device):
        super().__init__(torch.Size((batch, channels, 0, canvas[1])), weighting, dtype=dtype, device=device,
                         canvas=canvas)

    def add(self, out: torch.Tensor, boxes: Sequence[Box]) -> None:
        bottom = max(b[2] for b in boxes) - self.top
        grow = bottom - self.value.shape[2]
        if grow > 0:
            v, w = self.value, self.weight
            self.value = torch.cat([v, v.new_zeros((*v.shape[:2], grow, v.shape[3]))], dim=2)
            self.weight = torch.cat([w, w.new_zeros((grow, w.shape[1]))])
        super().add(out, boxes)

    def take(self, top: int, bottom: int) -> torch.Tensor:
        """The merged output of rows ``top:bottom`` (the window's first rows), dropped from the window."""
        if top != self.top or bottom - top > self.value.shape[2]:
            raise RuntimeError(f"band {top}:{bottom} taken out of order (window starts at row {self.top})")
        n = bottom - top
        result = self._quotient(self.value[:, :, :n], self.weight[:n])
        self.value, self.weight, self.top = self.value[:, :, n:].clone(), self.weight[n:].clone(), bottom
        return result


class TiledModel:
    """Whole-latent model callable built from a tile-level denoiser and a tiling config.

    All tile plans are drawn up front from ``generator`` (so a progress bar knows the total and a
    seed reproduces every plan); tile batching never changes which boxes are drawn or how they merge.
    Under torchrun each whole tile batch runs on one process (:mod:`anysize.core.distributed`), every
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
        if config.tile_size is None and config.method != "none":
            native = getattr(denoiser, "native_tile_size", None)
            if native is None:
                raise ValueError("tile_size=None: this denoiser has no native size (native_tile_size); "
                                 "give TilingConfig a tile_size")
            config = config.resolved(native)
        if config.granularity is None:
            config = replace(config, granularity=getattr(denoiser, "granularity", 1))
        self.denoiser, self.config = denoiser, config.resolved(config.tile_size)
        self.height, self.width = height, width
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.plans = [config.plan(height, width, i, generator, num_steps) for i in range(num_steps)]
        self.progress: Callable[[int], Any] | None = None

    @property
    def total_evaluations(self) -> int:
        """Tile evaluations over all steps (classifier-free guidance not counted twice)."""
        return sum(len(p) for p in self.plans)

    def context(self, box: Box) -> Box:
        """The box the denoiser sees for ``box``: ``box`` itself, or, where a side is not a multiple of
        the UNet's ``granularity`` (a cut edge tile on a canvas whose side is not, or a tile size that
        is not) and the canvas has room, widened to the next multiple (on the far side, or inward at the
        canvas's far edge). The output is trimmed back to ``box``, so every pixel is still written by the
        boxes of the plan alone. A side the UNet does not divide evenly is padded inside it at every
        downsampling, which left a line of wrong colour along the tile's last column (the right edge
        of a 45-latent-px-wide pass, enlarged into red specks by the next pass)."""
        g = self.config.granularity or 1
        top, left, bottom, right = box

        def widen(start: int, end: int, length: int) -> tuple[int, int]:
            need = -(end - start) % g
            if need == 0 or end - start + need > length:
                return start, end
            return (start, end + need) if end + need <= length else (start - need, end)

        top, bottom = widen(top, bottom, self.height)
        left, right = widen(left, right, self.width)
        return top, left, bottom, right

    def _key(self, box: Box) -> tuple:
        ctx = self.context(box)
        return _shape(box), _shape(ctx), box[0] - ctx[0], box[1] - ctx[1]

    def chunks(self, step: int, *, plan_order: bool = False) -> list[list[Box]]:
        """The step's boxes in tile batches of up to ``tile_batch_size`` boxes of one shape (a batch stacks
        its crops): grouped by shape in order of first appearance, plan order (row-major) within a shape;
        with ``plan_order``, runs of consecutive boxes of one shape instead, so the batches stay in plan
        order (banded sampling finishes rows as the batches pass them).

        Where every box has one shape (clamped, overlap and naive grids) both are plan order cut into
        runs; only cut edge tiles (``edges="cut"``) give several shapes, and those tiles are disjoint, so
        the merge does not depend on the order, and a tile's output does not depend on its batch
        (:class:`UNetTileDenoiser` on the CPU), so neither does the result.
        """
        n = self.config.tile_batch_size
        if plan_order:
            runs: list[list[Box]] = []
            for box in self.plans[step]:
                if runs and len(runs[-1]) < n and self._key(runs[-1][0]) == self._key(box):
                    runs[-1].append(box)
                else:
                    runs.append([box])
            return runs
        by_shape: dict[tuple, list[Box]] = {}
        for box in self.plans[step]:
            by_shape.setdefault(self._key(box), []).append(box)
        return [boxes[i : i + n] for boxes in by_shape.values() for i in range(0, len(boxes), n)]

    def __call__(self, x: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        chunks = self.chunks(step)
        merger: TileMerger | None = None
        for chunk, out in zip(chunks, self._outputs(lambda c: crop_tiles(x, c), x.shape[0], x.device, t, chunks)):
            if merger is None:
                shape = torch.Size((x.shape[0], out.shape[1], *x.shape[2:]))
                merger = TileMerger(shape, self.config.blend_at(step, len(self.plans)), dtype=out.dtype,
                                     device=out.device)
            merger.add(out, chunk)
            if self.progress is not None:
                self.progress(len(chunk))
        assert merger is not None
        return merger.result()

    def _outputs(self, crop: Callable[[list[Box]], torch.Tensor], batch: int, device: torch.device,
                 t: torch.Tensor, chunks: list[list[Box]]) -> Iterable[torch.Tensor]:
        """The denoiser's output for each chunk (its input tiles from ``crop(chunk)``), in order: one at
        a time here, or, under torchrun (:mod:`anysize.core.distributed`), each whole chunk on one rank and
        all of them on every rank."""
        def run(chunk: list[Box]) -> torch.Tensor:
            seen = [self.context(box) for box in chunk]
            out = self.denoiser(crop(seen), t, seen)
            if seen == chunk:
                return out
            (h, w), _, dy, dx = self._key(chunk[0])  # one key per chunk: one trim for all its boxes
            return out[:, :, dy : dy + h, dx : dx + w]

        if distributed.current() is None:
            return (run(chunk) for chunk in chunks)
        # every box of a chunk has one size (crop_tiles stacks them); the output has x's batch per box
        shapes = [(len(c) * batch, *_shape(c[0])) for c in chunks]
        return distributed.share_batches(lambda i: run(chunks[i]), shapes, device)


def _shape(box: Box) -> tuple[int, int]:
    return box[2] - box[0], box[3] - box[1]


def scale_model_input(scheduler, latents: torch.Tensor, t) -> torch.Tensor:
    """The scheduler's ``scale_model_input`` where it has one; flow-matching schedulers have none (their
    model reads the latents as they are)."""
    scale = getattr(scheduler, "scale_model_input", None)
    return latents if scale is None else scale(latents, t)


def _step_kwargs(scheduler, generator: torch.Generator | None, eta: float | None = None) -> dict:
    """Pass ``generator`` to ``scheduler.step`` only where it takes one (UniPC does not), and ``eta``
    (DDIM's share of fresh noise, as diffusers' pipelines pass it) where it takes that."""
    params = inspect.signature(scheduler.step).parameters
    out = {"generator": generator} if "generator" in params else {}
    return {**out, "eta": eta} if eta is not None and "eta" in params else out


def sample(
    model: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor],
    latents: torch.Tensor,
    scheduler,
    *,
    generator: torch.Generator | None = None,
    timesteps: Sequence | None = None,
    callback_on_step_end: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor | None] | None = None,
    start: int = 0,
    eta: float | None = None,
) -> torch.Tensor:
    """Run the reverse process: one model evaluation and ONE ``scheduler.step`` per timestep.

    ``model(x, t, step)`` returns the model output for the whole latent (a :class:`TiledModel` or
    anything else); ``scheduler`` is any diffusers scheduler whose ``set_timesteps`` was called.
    ``callback_on_step_end(step, t, latents)`` may return a replacement latent.
    ``start``: resume at this step index, with ``latents``, the scheduler's state and the generator's
    as they were after step ``start - 1`` (see :mod:`anysize.core.checkpoint`). ``eta``: DDIM's.
    """
    extra = _step_kwargs(scheduler, generator, eta)
    for i, t in enumerate(scheduler.timesteps if timesteps is None else timesteps):
        if i < start:
            continue
        model_input = scale_model_input(scheduler, latents, t)
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
    progress: Progress = True,
    desc: str = "denoise",
    timesteps: Sequence | None = None,
    start: int = 0,
    plan_generator: torch.Generator | None = None,
    eta: float | None = None,
) -> torch.Tensor:
    """:func:`sample` over a :class:`TiledModel`, with one progress bar counting tile evaluations.

    ``timesteps``: a tail of ``scheduler.timesteps`` to run (img2img), default all of them.
    ``start``: resume at this step (as in :func:`sample`); the plans of every step are still drawn,
    from ``plan_generator`` (default :func:`plan_generator` of ``generator``; a resumed run passes
    the one made when the run first started).
    """
    steps = len(scheduler.timesteps if timesteps is None else timesteps)
    model = _tiled_model(denoiser, config, latents.shape, steps, generator, plan_generator)
    done = sum(len(p) for p in model.plans[:start])
    with contextlib.closing(progress_bar(progress, model.total_evaluations, desc, initial=done)) as bar:
        model.progress = bar.update
        return sample(model, latents, scheduler, generator=generator, timesteps=timesteps,
                      callback_on_step_end=callback_on_step_end, start=start, eta=eta)


def _tiled_model(denoiser: TileDenoiser, config: TilingConfig, shape: Sequence[int], steps: int,
                 generator: torch.Generator | None, plan_generator: torch.Generator | None) -> TiledModel:
    """The :class:`TiledModel` of a sampling run over a latent of ``shape``; its plans come from
    ``plan_generator`` (default :func:`make_plan_generator` of ``generator``, before it draws anything)."""
    if plan_generator is None and generator is not None:
        plan_generator = make_plan_generator(generator)
    return TiledModel(denoiser, config, height=shape[-2], width=shape[-1], num_steps=steps, generator=plan_generator)


def sample_banded(
    denoiser: TileDenoiser,
    work,
    scheduler,
    config: TilingConfig,
    *,
    generator: torch.Generator | None = None,
    callback_on_step_end=None,
    progress: Progress = True,
    desc: str = "denoise",
    timesteps: Sequence | None = None,
    plan_generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    on_commit: Callable[[int], None] | None = None,
    eta: float | None = None,
):
    """:func:`sample_tiled` with the latents and the scheduler's state kept out of memory, in ``work``
    (an :class:`anysize.core.bands.BandWork`, whose ``init`` holds the starting latents); returns the
    :class:`~anysize.core.bands.DiskTensor` holding the result.

    Each step evaluates the tile batches in plan order (row-major) into a :class:`BandMerger`; as soon
    as no later batch reaches a band of rows, that band is stepped by its own copy of ``scheduler``
    (``scheduler.step`` is elementwise for diffusers' deterministic schedulers, so the copies together
    do what one step on the whole latent does; a multistep solver's history is per band, on disk).
    Memory then holds a band and a tile batch whatever the size.

    On the CPU in float32 the result is bit-identical to :func:`sample_tiled`'s for deterministic
    schedulers (DDIM, Euler, DPM-Solver++, UniPC...). Stochastic ones (DDPM, Euler ancestral, SDE
    solvers) draw their step noise band by band: the same distribution and the same result per seed,
    but not the in-memory run's noise. Schedulers with whole-image operations (dynamic thresholding)
    would see one band at a time.

    A step's results go to the other of two buffers and are committed (``work.commit``) when every band
    is done, so ``work`` always holds a whole step; called on a ``work`` with a commit, sampling
    continues from it (the generator's state restored). ``callback_on_step_end(step, t, latents)``
    gets the committed :class:`~anysize.core.bands.DiskTensor` and may return a tensor to replace it;
    ``on_commit(steps_done)`` runs after each step is committed (it may raise to stop the run there).
    """
    ts = list(scheduler.timesteps if timesteps is None else timesteps)
    device = torch.device(device if device is not None else "cpu")
    model = _tiled_model(denoiser, config, work.shape, len(ts), generator, plan_generator)
    start = 0
    committed = work.committed()
    if committed is not None:
        start, state = committed
        if generator is not None and state is not None:
            generator.set_state(state)
    bands = [copy.deepcopy(scheduler) for _ in work.bands]
    if start > 0:
        for k, band in enumerate(bands):
            work.load_band(k, start % 2, band, device)
            work.strip(band)
    extra = _step_kwargs(scheduler, generator, eta)
    done = sum(len(p) for p in model.plans[:start])
    with contextlib.closing(progress_bar(progress, model.total_evaluations, desc, initial=done)) as bar:
        for i in range(start, len(ts)):
            _banded_step(model, work, bands, i, ts[i], extra, device, bar.update)
            work.commit(i + 1, generator)
            if callback_on_step_end is not None:
                result = work.source(i + 1)
                replaced = callback_on_step_end(i, ts[i], result)
                if replaced is not None and replaced is not result:
                    result.write(0, replaced)
                    work.commit(i + 1, generator)
            if on_commit is not None:
                on_commit(i + 1)
    return work.source(len(ts))


def _banded_step(model: TiledModel, work, bands: list, i: int, t, extra: dict, device: torch.device,
                 progress: Callable[[int], Any]) -> None:
    """Step ``i`` of :func:`sample_banded`: from ``work.source(i)`` into the other buffer."""
    src, dst = work.source(i), work.latents[(i + 1) % 2]
    batch, _, height, width = work.shape
    scaler = copy.deepcopy(bands[0])  # band tensors dropped: the state every band shares, before this step
    chunks = model.chunks(i, plan_order=True)
    # later_top[j]: the first row any batch after batch j reads; bands ending above it are finished
    later_top = [height] * len(chunks)
    for j in range(len(chunks) - 2, -1, -1):
        later_top[j] = min(later_top[j + 1], min(b[0] for b in chunks[j + 1]))
    merger: BandMerger | None = None
    k = 0

    def finish(k: int) -> None:
        top, bottom = work.bands[k]
        assert merger is not None
        output = merger.take(top, bottom)
        x = src.read(top, bottom).to(device)
        band = bands[k]
        if i > 0:
            work.load_band(k, i % 2, band, device)
        scale_model_input(band, x, t)  # as the in-memory loop calls it before step (Euler checks it was)
        dst.write(top, band.step(output, t, x, return_dict=False, **extra)[0])
        work.save_band(k, (i + 1) % 2, band)

    def crop(chunk: list[Box]) -> torch.Tensor:
        return src.crop(chunk, lambda rows: scale_model_input(scaler, rows.to(device), t))

    for j, (chunk, out) in enumerate(zip(chunks, model._outputs(crop, batch, device, t, chunks))):
        if merger is None:
            merger = BandMerger(batch, out.shape[1], model.config.blend_at(i, len(model.plans)),
                                canvas=(height, width), dtype=out.dtype, device=out.device)
        merger.add(out, chunk)
        progress(len(chunk))
        while k < len(work.bands) and work.bands[k][1] <= later_top[j]:
            finish(k)
            k += 1
    while k < len(work.bands):
        finish(k)
        k += 1


def make_plan_generator(generator: torch.Generator) -> torch.Generator:
    """The tile plans' own generator, seeded from a hash of ``generator``'s state without advancing it:
    the caller's noise stream is then the same for every tiling method (fstd draws offsets, naive
    none) and for untiled sampling, also across several upscale passes."""
    digest = hashlib.blake2b(generator.get_state().numpy().tobytes(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def _per_sample_linears(unet) -> list[torch.nn.Module]:
    """The UNet's ``nn.Linear`` layers outside attention blocks: the timestep, class and SDXL added
    embeddings and every ResNet's ``time_emb_proj``. They see one row per sample, so their GEMM has as
    many rows as the UNet batch; attention projections see batch x tokens rows and are left alone.
    Plain ``nn.Linear`` only: a subclass (LoRA-compatible, quantized) has its own forward, which the
    hook's ``F.linear`` on ``weight`` would not reproduce."""
    if not isinstance(unet, torch.nn.Module):
        return []
    return [m for name, m in unet.named_modules()
            if type(m) is torch.nn.Linear and "attentions" not in name.split(".")]


def _row_by_row(module: torch.nn.Linear, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
    """Forward hook: recompute a per-sample linear one distinct row at a time on the CPU.

    MKL's SGEMM sums a product in another order when it has fewer than four rows (even with
    ``MKL_CBWR=...,STRICT``, whose AVX2 branch MKL ignores on AMD CPUs), so one tile's timestep embedding
    changed with the number of tiles in the UNet call (README: Determinism). A one-row product takes the
    same path whatever the batch, and the rows here are few distinct values (one timestep for all tiles,
    at most a positive and a negative pooled embedding), so this costs a handful of GEMVs on tiny layers.
    No torch or diffusers switch makes small GEMMs batch-invariant, hence this hook.
    """
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.device.type != "cpu" or x.shape[0] < 2:
        return None
    rows, index = torch.unique(x, dim=0, return_inverse=True)
    one = [torch.nn.functional.linear(r.unsqueeze(0).clone(), module.weight, module.bias) for r in rows]
    return torch.cat(one)[index]


@contextlib.contextmanager
def batch_invariant_linears(unet_or_linears, device: torch.device | str = "cpu"):
    """Within the block, on the CPU, the per-sample linears of ``unet_or_linears`` (a UNet, or the list
    :func:`_per_sample_linears` made of one) give each sample the same bits whatever the batch size."""
    linears = unet_or_linears if isinstance(unet_or_linears, list) else _per_sample_linears(unet_or_linears)
    if torch.device(device).type != "cpu":
        yield
        return
    handles = [m.register_forward_hook(_row_by_row) for m in linears]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class UNetTileDenoiser:
    """Tile-level denoiser over a diffusers ``UNet2DConditionModel``, with classifier-free guidance.

    The unconditional and conditional passes of all tiles in a batch go through ONE UNet call.
    ``prompt_embeds``/``negative_prompt_embeds``: (B, seq, dim) for the whole image.
    ``cond``: (B, c, H, W) at latent resolution, cropped per tile and concatenated on channels
        (super-resolution UNets such as the SD x4 upscaler: in_channels = latent + c).
    ``class_labels``: (B,) e.g. the x4 upscaler's noise level. ``added_cond_kwargs``: per-image SDXL
        extras (``text_embeds`` (B, d), ``time_ids`` (B, 6)); ``negative_added_cond_kwargs`` the same for
        the unconditional half (SDXL's negative pooled embedding; default: ``added_cond_kwargs``).
    ``tile_prompt_embeds(box)``: optional per-tile positive embeddings (B, seq, dim).
    ``controls``: ControlNets with their condition (:class:`anysize.core.control.TileControl`): each
        tile's ControlNet call gets the crop of the control image under that tile (every row of the
        tile: unconditional, global and region prompts), and the residuals of all of them are summed.
    ``cross_attention_kwargs``: passed to every UNet call, as diffusers' pipelines pass it (e.g.
        ``{"scale": 0.7}``, the LoRA scale).
    ``regions``: region prompts (:class:`anysize.core.regions.TileRegion`, boxes in this latent's px):
        every region prompt whose mask reaches into a tile is also evaluated on the tile's crop to the
        region, and the guided outputs are blended by the masks (:func:`anysize.core.regions.blend`).
        Each region runs in a call of its own (one tile's crop), so a tile's output does not depend on
        its batch; a tile no region reaches is bit for bit the tile without regions.
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
        regions: Sequence[TileRegion] = (),
        controls: Sequence[TileControl] = (),
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        grounding: TileGrounding | None = None,
    ):
        self.unet, self.guidance_scale, self.guidance_rescale = unet, guidance_scale, guidance_rescale
        self.cross_attention_kwargs = cross_attention_kwargs
        self.prompt_embeds, self.cond, self.class_labels = prompt_embeds, cond, class_labels
        self.added_cond_kwargs, self.tile_prompt_embeds = added_cond_kwargs, tile_prompt_embeds
        self.do_cfg = guidance_scale > 1.0
        if self.do_cfg and negative_prompt_embeds is None:
            negative_prompt_embeds = torch.zeros_like(prompt_embeds)
        self.negative_prompt_embeds = negative_prompt_embeds
        self.negative_added_cond_kwargs = negative_added_cond_kwargs or added_cond_kwargs
        self.regions, self.controls = tuple(regions), tuple(controls)
        self.grounding = grounding
        self._gated = gated_layers(unet) if grounding else []
        self._row_linears = _per_sample_linears(unet) + [m for c in self.controls for m in _per_sample_linears(c.model)]

    @property
    def native_tile_size(self) -> int:
        """The UNet's native latent side (``sample_size``): the tile side when the config leaves it open."""
        return nets.native_latent(self.unet)

    @property
    def granularity(self) -> int:
        """The UNet's downsampling factor: a tile side it divides evenly at every level."""
        return nets.granularity(self.unet)

    def _per_box(self, value: torch.Tensor | None, n_boxes: int) -> torch.Tensor | None:
        return None if value is None else value.repeat(n_boxes, *([1] * (value.dim() - 1)))

    def __call__(self, x: torch.Tensor, t: torch.Tensor, boxes: Sequence[Box]) -> torch.Tensor:
        n = len(boxes)
        if self.tile_prompt_embeds is not None:
            pos = torch.cat([self.tile_prompt_embeds(box) for box in boxes])
        else:
            pos = self._per_box(self.prompt_embeds, n)
        if self.cond is not None:
            x = torch.cat([x, crop_tiles(self.cond, boxes).to(x.device, x.dtype)], dim=1)
        out = self._guided(x, t, boxes, pos, self.added_cond_kwargs)
        return self._with_regions(x, t, boxes, out) if self.regions else out

    def _guided(self, x: torch.Tensor, t: torch.Tensor, boxes: Sequence[Box], pos: torch.Tensor,
                added_kwargs: dict[str, torch.Tensor] | None) -> torch.Tensor:
        """The guided output for tiles ``x`` at ``boxes`` (conditioning channels included) with the
        positive embeddings ``pos`` (box-major): one UNet call, unconditional rows first under CFG."""
        n = len(boxes)
        labels = self._per_box(self.class_labels, n)
        added = self._added(added_kwargs, n)
        control = [c.crops(boxes, x.shape[0] // n) for c in self.controls]
        gligen = self._grounding(boxes, x, t)
        if not self.do_cfg:
            return self._unet(x, t, pos, labels, added, control, gligen)
        neg = self._per_box(self.negative_prompt_embeds, n)
        if added is not None:
            neg_added = self._added(self.negative_added_cond_kwargs, n)
            added = {k: torch.cat([neg_added[k], v]) for k, v in added.items()}
        out = self._unet(
            torch.cat([x, x]), t, torch.cat([neg, pos.to(neg.dtype)]),
            None if labels is None else torch.cat([labels, labels]), added, [torch.cat([c, c]) for c in control],
            gligen,
        )
        uncond, cond = out.chunk(2)
        guided = uncond + self.guidance_scale * (cond - uncond)
        if self.guidance_rescale > 0:  # diffusers' own, per tile (std over each tile's own values)
            from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

            guided = rescale_noise_cfg(guided, cond, self.guidance_rescale)
        return guided

    # diffusers' callback tensors this denoiser holds: what a callback_on_step_end may read and replace
    CALLBACK_TENSORS = ("prompt_embeds", "add_text_embeds", "add_time_ids")

    def callback_tensors(self, names) -> dict[str, torch.Tensor]:
        """The tensors of ``names`` in diffusers' layout (unconditional rows first under CFG), for a
        ``callback_on_step_end``: ``prompt_embeds``, and SDXL's ``add_text_embeds`` / ``add_time_ids``."""
        added, neg_added = self.added_cond_kwargs or {}, self.negative_added_cond_kwargs or {}
        pairs = {"prompt_embeds": (self.negative_prompt_embeds, self.prompt_embeds),
                 "add_text_embeds": (neg_added.get("text_embeds"), added.get("text_embeds")),
                 "add_time_ids": (neg_added.get("time_ids"), added.get("time_ids"))}
        out = {}
        for name in names:
            neg, pos = pairs.get(name, (None, None))
            if pos is not None:
                out[name] = torch.cat([neg, pos]) if self.do_cfg else pos
        return out

    def update_from_callback(self, guidance_scale: float, tensors: dict[str, torch.Tensor]) -> None:
        """What a callback changed, for the steps left: the guidance scale (at most 1 turns classifier-free
        guidance off, as diffusers' ``SDCFGCutoffCallback`` does) and the tensors of
        :meth:`callback_tensors`, given in the layout of the guidance they are for."""
        self.guidance_scale = guidance_scale
        self.do_cfg = guidance_scale > 1.0 and self.negative_prompt_embeds is not None
        keys = {"prompt_embeds": None, "add_text_embeds": "text_embeds", "add_time_ids": "time_ids"}
        for name, value in tensors.items():
            key = keys[name]
            current = self.prompt_embeds if key is None else self.added_cond_kwargs[key]
            # twice the rows: both halves (unconditional first); else the conditional rows alone
            neg, pos = value.chunk(2) if value.shape[0] == 2 * current.shape[0] else (None, value)
            if key is None:
                self.prompt_embeds = pos
                self.negative_prompt_embeds = neg if neg is not None else self.negative_prompt_embeds
            else:
                self.added_cond_kwargs = {**self.added_cond_kwargs, key: pos}
                if neg is not None:
                    self.negative_added_cond_kwargs = {**self.negative_added_cond_kwargs, key: neg}

    def _region_crop(self, region: TileRegion, box: Box) -> Box:
        """The part of tile ``box`` a region prompt is evaluated on (:func:`anysize.core.regions.region_crop`)."""
        return region_crop(region, box, self.granularity, native=self.native_tile_size)

    def _with_regions(self, x: torch.Tensor, t: torch.Tensor, boxes: Sequence[Box], out: torch.Tensor) -> torch.Tensor:
        """Blend into each tile's guided output ``out`` the region prompts reaching into it. A region is
        evaluated on its own crop of the tile (:meth:`_region_crop`; as A1111 Tiled Diffusion's region
        control does), so the model composes the region's prompt inside the region rather than
        anywhere in the tile, with its own unconditional pass; one UNet call per tile and region, so no
        output depends on the batch."""
        per = x.shape[0] // len(boxes)  # images per box

        def evaluate(r: TileRegion, xi: torch.Tensor, crop: Box) -> torch.Tensor:
            embeds = r.embeds if r.embeds.shape[0] == per else r.embeds.repeat(per, 1, 1)
            return self._guided(xi, t, [crop], embeds, r.added or self.added_cond_kwargs)

        rows = [slice(i * per, (i + 1) * per) for i in range(len(boxes))]
        return torch.cat([with_regions(out[r], x[r], box, self.regions, self._region_crop, evaluate)
                          for r, box in zip(rows, boxes)])

    def _grounding(self, boxes: Sequence[Box], x: torch.Tensor, t: torch.Tensor) -> dict | None:
        """GLIGEN's ``cross_attention_kwargs["gligen"]`` for these tiles while the phase's grounded steps
        last (its gated layers switched on), else None (switched off): :mod:`anysize.core.grounding`."""
        g = self.grounding
        if g is None:
            return None
        active = float(t) in g.active
        for module in self._gated:
            module.enabled = active
        if not active:
            return None
        return g.kwargs(boxes, x.shape[0] // len(boxes), self.do_cfg, x.device, self.prompt_embeds.dtype)

    def _added(self, kwargs: dict[str, torch.Tensor] | None, n_boxes: int) -> dict[str, torch.Tensor] | None:
        return {k: self._per_box(v, n_boxes) for k, v in kwargs.items()} if kwargs else None

    def _unet(self, x, t, embeds, labels, added, control=(), gligen=None) -> torch.Tensor:
        if x.shape[0] == 1 and x.device.type == "cpu":
            # a batch of 1 takes its own CPU kernels (oneDNN's convolution; with it off, MKL's GEMM for
            # small tiles such as cut edge tiles), which round differently from every larger batch; run it
            # as a batch of 2 so a tile's bits do not depend on the batch it falls in (docs/design.md)
            pair = lambda v: None if v is None else torch.cat([v, v])  # noqa: E731
            added = None if added is None else {k: pair(v) for k, v in added.items()}
            gligen = None if gligen is None else {k: pair(v) for k, v in gligen.items()}
            return self._unet(pair(x), t, pair(embeds), pair(labels), added, [pair(c) for c in control], gligen)[:1]
        kwargs: dict[str, Any] = {"encoder_hidden_states": embeds.to(x.dtype), "return_dict": False}
        if labels is not None:
            kwargs["class_labels"] = labels
        if added is not None:
            kwargs["added_cond_kwargs"] = added
        if self.cross_attention_kwargs or gligen is not None:
            kwargs["cross_attention_kwargs"] = dict(self.cross_attention_kwargs or {})  # the UNet pops "scale"
            if gligen is not None:
                kwargs["cross_attention_kwargs"]["gligen"] = gligen
        with batch_invariant_linears(self._row_linears, x.device):
            if self.controls:
                kwargs.update(control_residuals(self.controls, control, x, t, kwargs))
            return self.unet(x, t, **kwargs)[0]
