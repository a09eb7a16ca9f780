"""From a :class:`~anysize.request.Request` to a :class:`RunPlan`: every phase a call will run, before any compute.

A generate request runs stage 1 (ARAD: the base model at the aspect-ratio bucket nearest the request,
or at the request's ratio beyond the buckets), then stage 2's passes (FSTD: an x4 super-resolution
model, x4 per pass, or img2img with the base model, x2 per pass), the last landing exactly on the
request's size. Each sampling phase is followed by the decode of its latents, and the call by one
output phase (colour fix, conversion, or a plain resize when there is no pass). An upscale request is
stage 2 alone from the caller's image.

The plan is the one description of that sequence: the pipeline runs its phases (:mod:`anysize.stages`),
the memory planner estimates them (:func:`anysize.memory.plan_memory`), hooks see them, and a
benchmark may edit them (``dataclasses.replace``) before running. Phases hold the diffusers model
they run (its UNet and VAE), never the :class:`~anysize.AnySizePipeline`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .buckets import choose_base_size, stretch_factor, stretch_note
from .core import nets
from .core.tiling import TilingConfig
from .request import TILE, Request
from .schedulers import short_name

if TYPE_CHECKING:
    from .memory import MemoryPlan

Size = tuple[int, int]  # (width, height) in image pixels
SAMPLE_KINDS = ("base", "sr", "img2img")
PHASE_KINDS = (*SAMPLE_KINDS, "decode", "output")
# Sampling state above this many bytes goes to disk on hosts whose memory holds it (CPU, MPS): the
# default of Request.latent_memory there (anysize.memory.LATENT_MEMORY; repeated so this module
# stays free of the planner). On CUDA the state is in GPU memory: no limit.
NO_LIMIT = 2**62


def upscale_passes(source: Size, target: Size, factor: int, *, stretch: float | None = None,
                   min_scale: float = 1.0) -> tuple[Size, ...]:
    """Pass sizes from ``source`` to ``target``: x``factor`` each at the target's aspect ratio, the last
    pass exactly ``target``. A ratio that is not a power of ``factor`` is taken up by the first pass,
    whose input is ``source`` resized by a scale in (1/stretch, stretch] (default stretch
    sqrt(factor): the number of passes is log_factor(ratio) rounded to the nearest whole number, ties
    to fewer). That pass is the smallest, and every later pass starts from the previous one's output
    at its own scale. (Putting the odd ratio in the last pass instead means one more large pass
    whose output is then shrunk: about 25% more work at 2048^2 from 64^2, and measured worse on the
    scene domain; docs/benchmarks.md, stage-2 pass plan.) Empty when the target is no larger than the
    source, or when it is at most ``min_scale`` times the source's area scale (the pipeline passes
    sqrt(factor) = 2 for an x4 super-resolution model, whose one pass would otherwise be conditioned
    on the source shrunk to a quarter to a half: measured far worse than a plain resize)."""
    (sw, sh), (tw, th) = source, target
    if tw <= sw and th <= sh:
        return ()
    scale = math.sqrt(tw * th / (sw * sh))
    if scale <= min_scale:
        return ()
    stretch = math.sqrt(factor) if stretch is None else stretch
    n = max(1, math.ceil(math.log(scale / stretch) / math.log(factor) - 1e-9))
    return tuple((max(1, round(tw / factor ** (n - k))), max(1, round(th / factor ** (n - k))))
                 for k in range(1, n + 1))


def stage2_passes(source: Size, target: Size, super_resolution: bool) -> tuple[Size, ...]:
    """Stage 2's pass sizes (:func:`upscale_passes`): x4 per pass with an x4 super-resolution model,
    where an enlargement of 2x or less has no pass (a Lanczos resize), since its one pass would be
    conditioned on the source shrunk to target / 4; x2 per pass for img2img, which works at its own
    size from the source enlarged and so keeps the one pass."""
    factor = 4 if super_resolution else 2
    return upscale_passes(tuple(source), tuple(target), factor, min_scale=math.sqrt(factor) if super_resolution else 1.0)


@dataclass(frozen=True)
class Plan:
    """Stage sizes for one request."""

    base: Size  # stage 1's size (a bucket, or the request's ratio in panorama mode)
    panorama: bool
    passes: tuple[Size, ...]  # stage 2's output size per pass; the last is the request
    tiled: bool = False  # stage 1 samples by tiles (panorama="tiled")
    stretch: float = 1.0  # how much the stage-1 image is distorted to reach the request's ratio


def stage_plan(width: int, height: int, buckets, granularity: int, panorama: str,
               super_resolution: bool) -> Plan:
    """Where stage 1 generates and which stage-2 passes follow (:func:`anysize.buckets.choose_base_size`)."""
    choice = choose_base_size(width, height, buckets, granularity=granularity, beyond=panorama)
    return Plan(choice.size, choice.panorama, stage2_passes(choice.size, (width, height), super_resolution),
                choice.tiled, stretch_factor(choice.size, width, height))


@dataclass(frozen=True)
class Phase:
    """One step of a run. ``kind``: "base" (stage 1), "sr" / "img2img" (a stage-2 pass), "decode" (the
    latents of the phase before it to pixels) or "output" (colour fix and conversion).

    ``size``: the image px it produces; ``latent``: (height, width) in latent px (sampling and decode
    phases); ``tiling``: a sampling phase's tiling, tile size resolved (the tile batch once the memory
    planner chose it); ``banded``: a sampling phase keeps its state on disk by bands of rows
    (:mod:`anysize.core.bands`), and its decode reads the latents from there; ``vae_tile_size``: a
    decode's core tile; ``streaming``: the last decode writes into the output file tile by tile."""

    kind: str
    name: str
    size: Size
    latent: tuple[int, int] | None = None
    tiling: TilingConfig | None = None
    banded: bool = False
    steps: int = 0
    guidance_scale: float = 1.0
    vae_tile_size: int | None = None
    streaming: bool = False
    last: bool = False  # the last sampling phase, or its decode
    model: Any = field(default=None, compare=False, repr=False)  # the diffusers pipeline it runs
    controls: tuple[int, ...] = ()  # the ControlNets (indices into RunPlan.controlnets) that steer this phase
    scheduler: Any = field(default=None, compare=False, repr=False)  # a sampling phase's diffusers scheduler

    @property
    def sampling(self) -> bool:
        return self.kind in SAMPLE_KINDS

    @property
    def cfg(self) -> bool:
        """Classifier-free guidance (an unconditional pass beside each conditional one): guidance above
        1, except for FLUX, whose guidance scale is an input of its one pass."""
        return self.guidance_scale > 1.0 and nets.kind(self.unet) != "flux"

    @property
    def unet(self):
        """The phase's denoising network: its model's UNet, or its transformer (SD3, FLUX)."""
        return nets.of(self.model)

    @property
    def vae(self):
        return self.model.vae


@dataclass(frozen=True)
class RunPlan:
    """Every phase of one request (per prompt), in order, and the choices they share.

    ``base`` is stage 1's size (None for an upscale request), ``source`` the image stage 2 starts
    from, ``passes`` stage 2's output sizes; ``latent_memory`` the resolved in-memory state limit;
    ``memory`` the memory plan once :func:`anysize.memory.plan_memory` made one."""

    request: Request
    phases: tuple[Phase, ...]
    source: Size
    passes: tuple[Size, ...]
    base: Size | None = None
    panorama: bool = False
    tiled: bool = False
    stretch: float = 1.0
    device: str = "cpu"
    latent_memory: int | None = None
    memory: MemoryPlan | None = field(default=None, compare=False)
    controlnets: tuple = field(default=(), compare=False, repr=False)  # diffusers ControlNetModels, in request order

    @property
    def sampling(self) -> tuple[Phase, ...]:
        return tuple(p for p in self.phases if p.sampling)

    @property
    def tile_batch_size(self) -> int | None:
        if self.memory is not None:
            return self.memory.tile_batch_size
        return next((p.tiling.tile_batch_size for p in self.sampling), None)

    @property
    def vae_tile_size(self) -> int | None:
        if self.memory is not None:
            return self.memory.vae_tile_size
        return next((p.vae_tile_size for p in self.phases if p.kind == "decode"), self.request.vae_tile_size)

    def with_choices(self, tile_batch_size: int, vae_tile_size: int) -> RunPlan:
        """This plan with every sampling phase's tile batch and every decode's VAE tile set."""
        def choose(p: Phase) -> Phase:
            if p.sampling:
                return dataclasses.replace(p, tiling=dataclasses.replace(p.tiling, tile_batch_size=tile_batch_size))
            return dataclasses.replace(p, vae_tile_size=vae_tile_size) if p.kind == "decode" else p
        return dataclasses.replace(self, phases=tuple(choose(p) for p in self.phases))

    def describe(self) -> str:
        """One line: e.g. ``stage 1: bucket 832x1216 -> stage 2: 2 passes (...) -> 3000x4500``."""
        w, h = self.request.size
        if self.base is None:
            return f"upscale: {self.source[0]}x{self.source[1]} -> {_passes(self.passes)} -> {w}x{h}"
        where = ("tiled " if self.tiled else "") + ("panorama" if self.panorama else "bucket")
        return (f"stage 1: {where} {self.base[0]}x{self.base[1]}{stretch_note(self.stretch)} -> stage 2: "
                f"{_passes(self.passes)} -> {w}x{h}")

    def info(self) -> dict[str, Any]:
        """What the plan does, for ``out.info`` and file metadata."""
        req = self.request
        out: dict[str, Any] = {"width": req.width, "height": req.height}
        if self.base is not None:
            out.update(base_size=list(self.base), panorama=self.panorama, panorama_mode=req.panorama,
                       stretch=round(self.stretch, 4))
        out.update(passes=[list(p) for p in self.passes], tiling=req.method,
                   tile_batch_size=self.tile_batch_size, vae_tile_size=self.vae_tile_size)
        for phase in self.sampling[:1] + self.sampling[1:2]:  # stage 1's, and stage 2's (one for all passes)
            if phase.scheduler is not None:
                out["scheduler" if phase.kind == "base" else "upscale_scheduler"] = short_name(phase.scheduler)
        if req.regions:
            out["regions"] = [r.to_json() for r in req.regions]
        if req.controlled:
            out["controlnet"] = [
                {"control_image": image, "conditioning_scale": scale, "guidance_start": start, "guidance_end": end,
                 "phases": [p.name for p in self.sampling if k in p.controls]}
                for k, (image, scale, start, end) in enumerate(zip(
                    req.control_images, req.controlnet_conditioning_scale, req.control_guidance_start,
                    req.control_guidance_end))]
        return out


def _passes(passes) -> str:
    if not passes:
        return "no pass (resize)"
    return f"{len(passes)} pass{'es' if len(passes) > 1 else ''} ({', '.join(f'{w}x{h}' for w, h in passes)})"


def _factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _streams(output_path) -> bool:
    if output_path is None:
        return False
    from .io.output import STREAMING, output_format

    return output_format(output_path) in STREAMING


def build(request: Request, *, base_model=None, upscaler=None, buckets=None, granularity: int = 64,
          device: str = "cpu", passes: tuple[Size, ...] | None = None, controlnets: tuple = (),
          schedulers: dict | None = None) -> RunPlan:
    """The :class:`RunPlan` of a validated ``request`` for these models (diffusers pipelines:
    ``base_model`` for stage 1 and img2img passes, ``upscaler`` an x4 super-resolution model or None),
    ``buckets`` and ``granularity`` stage 1's (:func:`anysize.buckets.arad_buckets`). ``passes``:
    stage 2's pass sizes instead of :func:`stage2_passes`' (benchmarks of other pass plans).
    ``controlnets``: ControlNets of the base model, one per ``request.control_images``; they steer the
    phases the base model samples (stage 1, for a control image that is not :data:`TILE`, and every
    img2img pass), never an x4 upscaler's, whose UNet is another model. A ControlNet that would steer
    no phase is refused. ``schedulers``: {"base": ..., "upscale": ...}, a stage's diffusers scheduler
    instead of its model's own (None or absent: the model's)."""
    from .memory import banded_sampling  # torch-free; plan -> memory is one-way (memory reads plans by duck type)

    sr = upscaler is not None
    chosen_schedulers = schedulers or {}
    config, streaming = request.tiling_config(), _streams(request.output_path)
    limit = request.latent_memory
    if limit is None and str(device).startswith("cuda"):
        limit = NO_LIMIT

    def sample(kind: str, name: str, size: Size, model, steps: int, guidance: float, untiled: bool = False) -> Phase:
        f = _factor(model.vae)
        lat = (size[1] // f, size[0] // f) if kind == "base" else (math.ceil(size[1] / f), math.ceil(size[0] / f))
        net = nets.of(model)
        if nets.is_transformer(net):  # whole patches (a bucket has them already); the decode crops to size
            g = nets.granularity(net)
            lat = (-(-lat[0] // g) * g, -(-lat[1] // g) * g)
        tiling = dataclasses.replace(config, tile_size=config.tile_size or nets.native_latent(net))
        if untiled:
            tiling = dataclasses.replace(tiling, method="none")
        banded = kind != "base" and banded_sampling(lat[0], lat[1], limit, tiling.method,
                                                    model.vae.config.latent_channels)
        scheduler = chosen_schedulers.get("base" if kind == "base" else "upscale") or model.scheduler
        return Phase(kind, name, size, lat, tiling, banded, steps, guidance, model=model, scheduler=scheduler)

    def decode(sampled: Phase, last: bool) -> Phase:
        return Phase("decode", f"{sampled.name} decode", sampled.size, sampled.latent, banded=sampled.banded,
                     vae_tile_size=request.vae_tile_size, streaming=last and streaming, last=last,
                     model=sampled.model)

    images = tuple(request.control_images)
    steered = {"base": tuple(k for k, image in enumerate(images) if image != TILE),
               "img2img": tuple(range(len(images)))}
    phases: list[Phase] = []
    stages = None
    if request.call == "generate":
        beyond = request.panorama
        if beyond == "auto":  # a ControlNet's layout is kept by sampling at the ratio, not by a stretch
            beyond = "direct" if steered["base"] else "stretch"
        stages = stage_plan(*request.size, buckets, granularity, beyond, sr)
        source = stages.base
        chosen = stages.passes if passes is None else tuple(passes)
        first = sample("base", "stage 1", stages.base, base_model, request.num_inference_steps,
                       request.guidance_scale, untiled=not stages.tiled)
        phases.append(dataclasses.replace(first, last=not chosen, controls=steered["base"]))
        if chosen or request.output_type != "latent":  # never the last decode: with no pass a resize follows
            phases.append(decode(first, last=False))
    else:
        source = tuple(request.source_size)
        chosen = stage2_passes(source, request.size, sr) if passes is None else tuple(passes)
    kind, model = ("sr", upscaler) if sr else ("img2img", base_model)
    for k, size in enumerate(chosen, 1):
        last = k == len(chosen)
        phase = sample(kind, f"pass {k}", tuple(size), model, request.upscale_inference_steps,
                       request.stage2_guidance)
        phases.append(dataclasses.replace(phase, last=last, controls=steered.get(kind, ())))
        if not (last and request.output_type == "latent"):
            phases.append(decode(phase, last))
    if not (phases and phases[-1].sampling):
        phases.append(Phase("output", "output", request.size, streaming=streaming))
    _check_steered(images, phases, sr)
    extra = {} if stages is None else dict(base=stages.base, panorama=stages.panorama, tiled=stages.tiled,
                                           stretch=stages.stretch)
    return RunPlan(request, tuple(phases), tuple(source), tuple(tuple(p) for p in chosen), device=str(device),
                   latent_memory=limit, controlnets=tuple(controlnets), **extra)


def _check_steered(images: tuple, phases: list[Phase], super_resolution: bool) -> None:
    """Every ControlNet must steer some phase of the plan (a one-line ValueError says why not)."""
    for k, image in enumerate(images):
        if any(k in p.controls for p in phases):
            continue
        if image == TILE:
            why = ("an x4 upscaler runs stage 2 (the ControlNet belongs to the base model); load the pipeline "
                   "with img2img=True (CLI: --img2img) and no upscaler" if super_resolution
                   else "the plan has no stage-2 pass (the output is no larger than its source)")
            raise ValueError(f"control_image[{k}]='{TILE}': steers the base model's img2img passes, but {why}")
        raise ValueError(f"control_image[{k}]: steers the base model, which runs no phase of this plan "
                         "(an upscale with an x4 upscaler)")
