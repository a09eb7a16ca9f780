"""AnySizePipeline: text to an image of exactly W x H in two stages (Any-Size-Diffusion).

Stage 1 (ARAD, Zheng et al. 2023, sec. 3.2): the base model samples at the aspect-ratio bucket
nearest the request (untiled, classifier-free guidance), also when the ratio lies outside the
buckets (``panorama="stretch"``; "direct" and "tiled" sample at the requested ratio instead, which
repeats objects on the default model; the default "auto" samples "direct" when a ControlNet steers
stage 1, whose control image sets the layout, and stretches otherwise). Stage 2 (FSTD, sec. 3.3): the stage-1 image is enlarged pass
by pass (x4 each for an x4 super-resolution model, x2 for img2img with the base model), the last pass
landing exactly on W x H, each through the tiled sampler and the tiled VAE decode.

A call is one :class:`~anysize.request.Request`, planned once into a :class:`~anysize.plan.RunPlan`
(:meth:`AnySizePipeline.plan_run`, memory plan included) and run once (:meth:`AnySizePipeline.run`,
through :mod:`anysize.stages`). The pipeline object holds the models and nothing of a call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from . import infotext, memory, models, schedulers
from . import plan as planning
from .buckets import SDXL_BUCKETS, arad_buckets, check_buckets, model_granularity, native_side
from .core import distributed
from .core import nets as _nets  # `nets` is a ControlNet list here
from .core.checkpoint import RunDir, generator_fingerprint
from .core.sampler import UNetTileDenoiser
from .core.tiling import TilingConfig
from .core.vae import vae_scale_factor
from .io.output import check_output_path
from .plan import Plan, RunPlan, Size, stage2_passes, upscale_passes  # noqa: F401  (public here too)
from .request import COLOR_FIXES, MIN_SIDE, OUTPUT_TYPES, TILE, Request  # noqa: F401
from .stages import Context, _Resized, adain_color_fix, hook_list, image_digest, run_image, to_pil  # noqa: F401


@dataclass
class AnySizeOutput:
    """``images``: PIL images, float32 HWC arrays in [0, 1] (np), CHW tensors (pt) or latents; empty when
    the image went straight to a file (``output_path``); ``info``: per image, what was done (sizes,
    passes, tiling, models), e.g. for file metadata; ``files``: the paths written."""

    images: list[Any]
    info: list[dict] = field(default_factory=list)
    files: list[Any] = field(default_factory=list)
    memory_plan: memory.MemoryPlan | None = None  # the tile batch and VAE tile chosen, each phase's estimate

    def to_tuple(self) -> tuple:
        """``(images,)``, as a diffusers output's ``to_tuple()`` (``return_dict=False``)."""
        return (self.images,)

    def __getitem__(self, key):
        """``out[0]`` and ``out["images"]`` are the images, as for a diffusers pipeline's output."""
        if isinstance(key, str):
            if key not in ("images", "info", "files", "memory_plan"):
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]


@dataclass(frozen=True)
class _FileOutput:
    """Where the last pass's decode streams to, the metadata to store with it, and its A1111 text."""

    path: Any
    metadata: dict
    parameters: str | None = None


class PromptWarning(UserWarning):
    """Part of a prompt that a model will not read (past its text encoder's window, or unknown words)."""


def _fresh_generator() -> torch.Generator:
    """No generator given: a seed drawn from torch's global RNG (so ``torch.manual_seed`` still reproduces)."""
    return torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,)).item()))


def _control_inputs(control_image) -> tuple:
    """``control_image`` as a tuple of PIL RGB images and :data:`~anysize.request.TILE`; a single image
    (or "tile") counts as a list of one."""
    if control_image is None:
        return ()
    items = list(control_image) if isinstance(control_image, (list, tuple)) else [control_image]
    out = []
    for k, item in enumerate(items):
        if isinstance(item, str):
            if item != TILE:
                raise ValueError(f"control_image[{k}]={item!r}: must be an image or '{TILE}'")
            out.append(TILE)
            continue
        try:
            out.append(to_pil(item))
        except ValueError as exc:
            raise ValueError(f"control_image[{k}]: {exc}") from None
    return tuple(out)


def _generators(generator, count: int) -> list[torch.Generator]:
    """One generator per image: a list as given (its length checked), else the one generator (or a
    fresh one) for every image, drawn from in turn."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != count or not all(isinstance(g, torch.Generator) for g in generator):
            raise ValueError(f"generator: a list of {len(generator)}, but this call makes {count} image"
                             f"{'s' if count > 1 else ''}; pass one torch.Generator per image, or one for all")
        return list(generator)
    one = generator if generator is not None else _fresh_generator()
    return [one] * count


def _stage1_latents(latents, plan: RunPlan, count: int) -> list:
    """Per image, the caller's stage-1 noise (one row of ``latents``, or the one row for all) or None."""
    if latents is None:
        return [None] * count
    base = next((p for p in plan.sampling if p.kind == "base"), None)
    if base is None:
        raise ValueError("latents: are stage 1's starting noise; an upscale has no stage 1")
    if plan.request.run_dir is not None:
        raise ValueError("latents: a run directory cannot check given noise on resume; draw it from the generator")
    shape = (_nets.latent_channels(base.unet), *base.latent)
    if not (torch.is_tensor(latents) and latents.ndim == 4 and tuple(latents.shape[1:]) == shape
            and latents.shape[0] in (1, count)):
        got = tuple(latents.shape) if torch.is_tensor(latents) else type(latents).__name__
        raise ValueError(f"latents: {got}, but stage 1 starts from ({count} or 1, {shape[0]}, {shape[1]}, "
                         f"{shape[2]}): the bucket {base.size[0]}x{base.size[1]}'s latent")
    return [latents[k if latents.shape[0] == count else 0][None] for k in range(count)]


def _pipe_id(pipe) -> str:
    """A loaded pipeline's id for metadata: where it was loaded from, and its class."""
    source = getattr(getattr(pipe, "config", None), "_name_or_path", None)
    name = type(pipe).__name__
    return f"{Path(source).name} ({name})" if source else name


EMBED_NAMES = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
CALLBACK_TENSOR_INPUTS = ("latents", *UNetTileDenoiser.CALLBACK_TENSORS)


def _text_embeds(prompt, embeds: dict, base) -> dict | None:
    """The caller's prompt embeddings checked (diffusers' rules: instead of ``prompt``, one row per
    prompt, the negative ones of the same shape, the pooled ones of SDXL, SD3 and FLUX beside them);
    None when not given."""
    given = {k: v for k, v in embeds.items() if v is not None}
    if not given:
        return None
    if "prompt_embeds" not in given:
        raise ValueError(f"{', '.join(given)}: only with prompt_embeds")
    if prompt is not None:
        raise ValueError("prompt and prompt_embeds: pass one, as in diffusers")
    if base is None:
        raise ValueError("prompt_embeds: are the base model's; this pipeline has none")
    kind = models.model_kind(base)
    if kind.is_transformer:  # T5's width (FLUX) or CLIP's and T5's joined (SD3): the transformer's text input
        width, pooled_width = base.transformer.config.joint_attention_dim, base.transformer.config.pooled_projection_dim
    else:
        width, pooled_width = base.unet.config.cross_attention_dim, None
    pooled_kind, family = kind.is_sdxl or kind.is_transformer, kind.family.upper() if kind.is_transformer else "SDXL"
    pos = given["prompt_embeds"]
    if not (torch.is_tensor(pos) and pos.ndim == 3 and pos.shape[2] == width):
        got = tuple(pos.shape) if torch.is_tensor(pos) else type(pos).__name__
        raise ValueError(f"prompt_embeds: {got}, must be a (prompts, tokens, {width}) tensor for this base model")
    neg = given.get("negative_prompt_embeds")
    if neg is not None and (not torch.is_tensor(neg) or neg.shape != pos.shape):
        raise ValueError(f"negative_prompt_embeds: must have prompt_embeds' shape {tuple(pos.shape)}")
    pooled = [n for n in ("pooled_prompt_embeds", "negative_pooled_prompt_embeds") if n in given]
    if not pooled_kind and pooled:
        raise ValueError(f"{', '.join(pooled)}: only for SDXL, SD3 and FLUX base models")
    if pooled_kind and "pooled_prompt_embeds" not in given:
        raise ValueError(f"pooled_prompt_embeds: an {family} base model needs them with prompt_embeds, as in diffusers")
    if pooled_kind and neg is not None and "negative_pooled_prompt_embeds" not in given:
        raise ValueError(f"negative_pooled_prompt_embeds: needed with negative_prompt_embeds for {family}, as in "
                         "diffusers")
    for name in pooled:
        value = given[name]
        if not (torch.is_tensor(value) and value.ndim == 2 and value.shape[0] == pos.shape[0]
                and pooled_width in (None, value.shape[1])):
            got = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
            raise ValueError(f"{name}: {got}, must be a ({pos.shape[0]}, {pooled_width or 'width'}) tensor: one row per "
                             "row of prompt_embeds")
    return given


def _embeds_digest(embeds: dict | None) -> str | None:
    """What a Request stores of given prompt embeddings: a digest of their values (run directories compare it)."""
    if embeds is None:
        return None
    h = hashlib.blake2b(digest_size=8)
    for name in EMBED_NAMES:
        if name in embeds:
            h.update(name.encode() + embeds[name].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def _digests(controls: tuple) -> tuple:
    """What a Request stores of each control image: its digest (run directories compare it), or TILE."""
    return tuple(c if c == TILE else image_digest(c) for c in controls)


class AnySizePipeline:
    """Two-stage any-size text-to-image: ARAD bucketed base generation, then FSTD tiled upscaling.

    ``base``: a diffusers text-to-image pipeline (SD 1.x/2.x, epsilon or v-prediction; SDXL).
    ``upscaler``: a pipeline in the SD x4-upscaler layout, or None to upscale img2img-style with the
    base model itself (``strength``), as Tiled Diffusion and Ultimate SD Upscale users do.
    ``controlnet``: a diffusers ``ControlNetModel`` (``SD3ControlNetModel`` / ``FluxControlNetModel``
    for SD3 / FLUX) of the base model, or a list of them; each call
    then passes one ``control_image`` per ControlNet. ``buckets``: stage 1's sizes, ``[(width,
    height), ...]`` (default: SDXL's training sizes for an SDXL base at 1024^2, else ARAD's nine ratios
    at the base's native area).
    """

    def __init__(self, base=None, upscaler=None, *, controlnet=None, buckets=None, model_ids: dict | None = None):
        if base is None and upscaler is None:
            raise models.ModelLoadError("base and upscaler: at least one model is needed")
        if base is not None and models.model_kind(base).is_upscaler:
            raise models.ModelLoadError("base: is a super-resolution model (x4-upscaler layout); pass it as upscaler")
        if upscaler is not None and not models.model_kind(upscaler).is_upscaler:
            raise models.ModelLoadError(
                "upscaler: not in the SD x4-upscaler layout (UNet in_channels = latent + 3 and a low_res_scheduler)")
        self.base, self.upscaler = base, upscaler
        self.upscale_scheduler = None  # stage 2's scheduler instead of its model's own (set_scheduler)
        self.model_ids = model_ids or {}
        self.progress = True
        self._guidance_scale = self._num_timesteps = None  # the running phase's, for diffusers' callbacks
        if base is not None:
            self.base_factor = vae_scale_factor(base.vae)
            net = _nets.of(base)
            self.base_tile = _nets.native_latent(net)
            self.granularity = model_granularity(base.vae, net)
            side = native_side(base.vae, net)
            if buckets is not None:
                self.buckets = check_buckets(buckets, self.granularity)
            elif models.model_kind(base).is_sdxl and side == 1024 and self.granularity <= 64:
                self.buckets = check_buckets(SDXL_BUCKETS, self.granularity)
            else:
                self.buckets = arad_buckets(side**2, granularity=self.granularity)
        elif buckets is not None:
            raise models.ModelLoadError("buckets: are stage 1's sizes; this pipeline has no base model")
        nets = () if controlnet is None else tuple(controlnet) if isinstance(controlnet, (list, tuple)) else (controlnet,)
        if nets and base is None:
            raise models.ModelLoadError("controlnet: steers a base model; this pipeline has none")
        for k, net in enumerate(nets):
            models.check_controlnet(net, base, k)
        self.controlnets = nets

    @classmethod
    def from_pretrained(cls, base=None, upscaler=None, *, controlnet=None, scheduler=None, upscale_scheduler=None,
                        buckets=None, device=None, dtype=None, allow_pickle: bool = False,
                        img2img: bool = False, config=None, variant: str | None = None,
                        without_t5: bool = False) -> AnySizePipeline:
        """Load ``base`` and ``upscaler`` (diffusers directories, ``.safetensors`` files or hub ids);
        with neither, the embedded default model. ``img2img=True`` with no upscaler upscales with the
        base model; an upscaler alone serves :meth:`upscale` only. ``controlnet``: one ControlNet of the
        base model or a list (diffusers ``ControlNetModel``, ``SD3ControlNetModel`` or
        ``FluxControlNetModel`` directories, ``.safetensors`` files, hub ids, loaded models, or
        "default": the default model's). ``scheduler`` / ``upscale_scheduler``: stage 1's and stage 2's
        sampler (:meth:`set_scheduler`); ``buckets``: stage 1's sizes (see the class). ``dtype``: "auto" (float16 on GPUs, float32 on the CPU), "float32", "float16",
        "bfloat16". ``config``: for a single-file ``base``, a diffusers directory of its family
        (diffusers needs the original config, offline from disk); ``variant``: e.g. "fp16" for a
        directory of ``*.fp16.safetensors``; ``without_t5``: an SD3 base without its T5 encoder."""
        device = torch.device(device) if device is not None else models.default_device()
        dtype = models.parse_dtype(dtype, device)
        embedded = base is None and upscaler is None
        if embedded:
            if img2img:
                raise models.ModelLoadError("base: img2img upscaling needs a base model (CLI: --base)")
            base, upscaler = models.default_model_paths()
        kw = dict(device=device, dtype=dtype, allow_pickle=allow_pickle)
        base_pipe = None if base is None else models.load_pipeline(base, role="base", config=config, variant=variant,
                                                                   without_t5=without_t5, **kw)
        if embedded and (layers := models.default_gligen_path()) is not None:
            # the default base grounds gligen_phrases with its shipped GLIGEN layers; without them its
            # gated UNet computes exactly what the plain one does
            base_pipe.unet = models.add_gligen_layers(base_pipe.unet, layers)
        up_pipe = None if upscaler is None else models.load_pipeline(upscaler, role="upscaler", variant=variant, **kw)
        ids = {"base": models.describe(base), "upscaler": models.describe(upscaler) if upscaler else "base (img2img)"}
        sources = [] if controlnet is None else list(controlnet) if isinstance(controlnet, (list, tuple)) else [controlnet]
        nets = [models.load_controlnet(c, **kw) for c in sources]
        if nets:
            ids["controlnet"] = [type(c).__name__ if isinstance(c, torch.nn.Module) else
                                 "default (object silhouettes)" if c == "default" else models.describe(c)
                                 for c in sources]
        pipe = cls(base_pipe, up_pipe, controlnet=nets or None, buckets=buckets, model_ids=ids)
        for stage, chosen in (("base", scheduler), ("upscale", upscale_scheduler)):
            if chosen is not None:
                pipe.set_scheduler(chosen, stage=stage)
        return pipe

    @classmethod
    def from_pipe(cls, pipe, upscaler=None, *, controlnet=None, scheduler=None, upscale_scheduler=None,
                  buckets=None) -> AnySizePipeline:
        """Wrap already-loaded diffusers pipelines, sharing their modules (no weight is copied):
        ``pipe`` a text-to-image pipeline (SD 1.x/2.x, SDXL; a ControlNet pipeline brings its
        ControlNets), ``upscaler`` a loaded ``StableDiffusionUpscalePipeline`` or None (img2img with
        ``pipe``). LoRAs, textual inversions and schedulers set on ``pipe`` with diffusers' own calls
        (``load_lora_weights``, ``set_adapters``, ``load_textual_inversion``) act here too."""
        for role, model in (("pipe", pipe), ("upscaler", upscaler)):
            if model is None:
                continue
            missing = [n for n in ("vae", "text_encoder", "tokenizer", "scheduler") if getattr(model, n, None) is None]
            missing = (["unet or transformer"] if _nets.of(model) is None else []) + missing
            if missing or not callable(getattr(model, "encode_prompt", None)):
                what = f"has no {', '.join(missing)}" if missing else "has no encode_prompt"
                raise models.ModelLoadError(f"{role}: a {type(model).__name__} {what}; pass a diffusers Stable "
                                            "Diffusion (1.x/2.x, SDXL, 3) or FLUX pipeline")
        own = getattr(pipe, "controlnet", None)
        if controlnet is None and own is not None:
            controlnet = list(getattr(own, "nets", [own]))  # MultiControlNetModel holds a list
        ids = {"base": _pipe_id(pipe), "upscaler": _pipe_id(upscaler) if upscaler is not None else "base (img2img)"}
        if controlnet is not None:
            nets = controlnet if isinstance(controlnet, (list, tuple)) else [controlnet]
            ids["controlnet"] = [type(n).__name__ for n in nets]
        wrapped = cls(pipe, upscaler, controlnet=controlnet, buckets=buckets, model_ids=ids)
        for stage, chosen in (("base", scheduler), ("upscale", upscale_scheduler)):
            if chosen is not None:
                wrapped.set_scheduler(chosen, stage=stage)
        return wrapped

    def load_loras(self, loras, *, allow_pickle: bool = False) -> None:
        """Load LoRA files into the base model through diffusers (``load_lora_weights``, PEFT) and set
        their scales (``set_adapters``): ``loras`` a list of ``path`` or ``(path, scale)``. Safetensors
        only unless ``allow_pickle``. One-line :class:`~anysize.models.ModelLoadError` on failure."""
        if self.base is None:
            raise models.ModelLoadError("lora: adapts a base model; this pipeline has none")
        names, weights, ids = [], [], []
        for item in loras:
            path, scale = (item, 1.0) if not isinstance(item, (list, tuple)) else (item[0], float(item[1]))
            name = f"anysize_lora_{len(names)}"
            models.load_lora(self.base, path, name, allow_pickle=allow_pickle)
            names.append(name)
            weights.append(scale)
            ids.append(f"{models.describe(path)}:{scale:g}")
        if names:
            self.base.set_adapters(names, adapter_weights=weights)
            self.model_ids["lora"] = ids

    def load_textual_inversion(self, embeddings, token: str | None = None, *, allow_pickle: bool = False) -> None:
        """Load textual-inversion embeddings into the base model's text encoder(s) through diffusers
        (``load_textual_inversion``): ``embeddings`` a path, or a list of ``path`` or ``(path, token)``;
        ``token`` (one path) defaults to the file's name (A1111's trigger word). Write the token in a
        prompt to use it. Safetensors only unless ``allow_pickle``; one-line ModelLoadError on failure."""
        if self.base is None:
            raise models.ModelLoadError("embedding: belongs to a base model's text encoder; this pipeline has none")
        items = embeddings if isinstance(embeddings, (list, tuple)) else [(embeddings, token)]
        ids = list(self.model_ids.get("embeddings", []))
        for item in items:
            path, name = (item, None) if not isinstance(item, (list, tuple)) else item
            name = models.load_embedding(self.base, path, name, allow_pickle=allow_pickle)
            ids.append(f"{name}={models.describe(path)}")
        self.model_ids["embeddings"] = ids

    # ------------------------------------------------------------------ samplers
    @property
    def scheduler(self):
        """Stage 1's scheduler: the base model's (assigning it sets the base model's, as in diffusers)."""
        return (self.base if self.base is not None else self.upscaler).scheduler

    @scheduler.setter
    def scheduler(self, value) -> None:
        self.set_scheduler(value, stage="base")

    def set_scheduler(self, scheduler, stage: str = "base") -> None:
        """Sample ``stage`` ("base": stage 1, and stage 2's img2img passes unless "upscale" is set too;
        "upscale": every stage-2 pass) with ``scheduler``: a diffusers scheduler instance, or a name of
        :data:`anysize.schedulers.SCHEDULERS` ("dpm++2m-karras", "euler-a", ...) built from that
        stage's model's own scheduler config (its betas, prediction type and spacing stay)."""
        if stage not in ("base", "upscale"):
            raise ValueError(f"stage={stage!r}: must be 'base' or 'upscale'")
        model = self.base if stage == "base" else (self.upscaler or self.base)
        if model is None:
            raise ValueError(f"scheduler: this pipeline has no {'base model' if stage == 'base' else 'stage-2 model'}")
        if isinstance(scheduler, str):
            scheduler = schedulers.make(scheduler, model.scheduler.config)
        elif not (hasattr(scheduler, "set_timesteps") and hasattr(scheduler, "step")):
            raise ValueError(f"scheduler: a {type(scheduler).__name__} is not a diffusers scheduler or a name "
                             f"({', '.join(schedulers.SCHEDULERS)})")
        if stage == "base":
            model.scheduler = scheduler
        else:
            self.upscale_scheduler = scheduler

    # what diffusers' callbacks read of their pipeline (SDCFGCutoffCallback: num_timesteps, _guidance_scale)
    _callback_tensor_inputs = list(CALLBACK_TENSOR_INPUTS)

    @property
    def guidance_scale(self) -> float | None:
        """The running phase's guidance scale (None between calls), as diffusers' pipelines expose it."""
        return self._guidance_scale

    @property
    def num_timesteps(self) -> int | None:
        """The running phase's number of steps (None between calls)."""
        return self._num_timesteps

    @property
    def do_classifier_free_guidance(self) -> bool:
        return (self._guidance_scale or 0) > 1

    def set_progress_bar_config(self, disable: bool = False, bar: Callable | None = None) -> None:
        """Progress of the long loops (sampling, decoding; counted in tile evaluations): tqdm's bars, none
        (``disable=True``), or ``bar``, a tqdm-like factory called as ``bar(total=, desc=, unit=)``
        (``initial=`` too, for a resumed loop) whose result has ``update(n)`` and ``close()``
        (:mod:`anysize.core.progress`)."""
        self.progress = False if disable else (bar or True)

    @property
    def device(self) -> torch.device:
        return _nets.of(self.base if self.base is not None else self.upscaler).device

    @property
    def dtype(self) -> torch.dtype:
        return _nets.of(self.base if self.base is not None else self.upscaler).dtype

    @property
    def default_upscale_steps(self) -> int:
        """Stage 2's steps per pass when a call gives none: the upscaler's own choice (its directory's
        ``anysize.json``, :class:`anysize.models.ModelSettings`; the embedded default model's is 1), else 20."""
        own = models.settings_of(self.upscaler).upscale_inference_steps if self.upscaler is not None else None
        return own or 20

    @property
    def stage2_factor(self) -> int:
        return 4 if self.upscaler is not None else 2

    def stage2_passes(self, source: Size, target: Size) -> tuple[Size, ...]:
        """Stage 2's pass sizes from ``source`` to ``target`` (:func:`anysize.plan.stage2_passes`)."""
        return stage2_passes(source, target, self.upscaler is not None)

    # ------------------------------------------------------------------ requests and plans
    def check_inputs(self, prompt, width, height, num_inference_steps=1, upscale_inference_steps=1,
                     guidance_scale=1.0, tiling="fstd", tile_size=None, tile_batch_size=None, output_type="pil",
                     strength=0.3, color_fix="backproject", noise_level=20, **request) -> None:
        """Validate every argument before any compute (:meth:`anysize.request.Request.validate`);
        ``num_inference_steps=None`` checks a stage-2-only call (:meth:`upscale`)."""
        self._validate(Request(
            prompt, width, height, "generate" if num_inference_steps is not None else "upscale",
            num_inference_steps=num_inference_steps, upscale_inference_steps=upscale_inference_steps,
            guidance_scale=guidance_scale, tiling=tiling, tile_size=tile_size, tile_batch_size=tile_batch_size,
            output_type=output_type, strength=strength, color_fix=color_fix, noise_level=noise_level,
            source_size=None if num_inference_steps is not None else (width, height), **request))

    def _validate(self, request: Request) -> Request:
        up = self.upscaler
        if request.upscale_inference_steps is None:
            request = dataclasses.replace(request, upscale_inference_steps=self.default_upscale_steps)
        level = 1000 if up is None else int(getattr(up.config, "max_noise_level", None) or 350)
        request = request.validate(has_base=self.base is not None, max_noise_level=level,
                                   controlnets=len(self.controlnets))
        family = models.model_kind(self.base).family if self.base is not None else None
        if request.true_cfg_scale != 1 and family != "flux":
            raise ValueError(f"true_cfg_scale={request.true_cfg_scale}: FLUX's true CFG; this base ({family or 'none'}) "
                             "guides with guidance_scale")
        if family == "flux" and request.prompt_embeds is None and bool(request.negative_prompt) != (
                request.true_cfg_scale > 1):
            raise ValueError("negative_prompt and true_cfg_scale: FLUX.1's guidance is embedded (guidance_scale); a "
                             "negative prompt acts only through true CFG, so pass both (true_cfg_scale > 1, CLI: "
                             "--true-cfg X) or neither")
        if family in ("sd3", "flux") and request.guidance_rescale:  # the UNet denoisers' alone
            raise ValueError(f"guidance_rescale: anysize supports it for SD 1.x / 2.x and SDXL; this base is "
                             f"{family.upper()}")
        if request.gligen_phrases:
            from .core.grounding import is_grounded

            if self.base is None or not is_grounded(_nets.of(self.base)):
                raise ValueError("gligen_phrases: need a GLIGEN base model (a UNet with gated self-attention, "
                                 "attention_type='gated'); this base has none")
            if self.controlnets:
                raise ValueError("gligen_phrases with ControlNets: not together (a ControlNet's blocks have no "
                                 "gated layers); pass one or the other")
        return request

    def plan(self, width: int, height: int, panorama: str = "stretch") -> Plan:
        """Where stage 1 generates and which stage-2 passes follow, for a ``width x height`` request;
        ``panorama`` for a ratio outside the buckets (:func:`anysize.buckets.choose_base_size`)."""
        return planning.stage_plan(width, height, self.buckets, self.granularity, panorama, self.upscaler is not None)

    def plan_run(self, request: Request, *, passes: tuple[Size, ...] | None = None) -> RunPlan:
        """Validate ``request`` and plan it: every phase, with the memory planner's tile batch and VAE
        tile (:func:`anysize.memory.plan_memory`; ``plan.memory.describe()`` prints it), before any
        compute. ``passes``: other stage-2 pass sizes (benchmarks). Raises
        :class:`~anysize.memory.MemoryPreflightError` with the numbers when it cannot fit. Under
        torchrun every rank takes rank 0's choices: the tile batches are the unit the ranks share."""
        request = self._validate(request)
        run = planning.build(request, base_model=self.base, upscaler=self.upscaler,
                             buckets=getattr(self, "buckets", None), granularity=getattr(self, "granularity", 64),
                             device=str(self.device), passes=passes, controlnets=self.controlnets,
                             schedulers={"upscale": self.upscale_scheduler})
        mem = memory.plan_memory(run)
        if distributed.current() is not None:
            batch, tile = distributed.broadcast_object((mem.tile_batch_size, mem.vae_tile_size))
            if (batch, tile) != (mem.tile_batch_size, mem.vae_tile_size):
                run = dataclasses.replace(run, request=dataclasses.replace(
                    request, tile_batch_size=batch, vae_tile_size=tile))
                mem = memory.plan_memory(run)
        return dataclasses.replace(run.with_choices(mem.tile_batch_size, mem.vae_tile_size), memory=mem)

    def plan_memory(self, width: int, height: int, *, source: Size | None = None, **request) -> memory.MemoryPlan:
        """The memory plan of a ``width x height`` request (``source``: the input's (width, height) for
        :meth:`upscale`); ``request``: any :class:`~anysize.request.Request` field (``max_memory``,
        ``tile_batch_size``, ``output_path``...). See :meth:`plan_run`."""
        call = "generate" if source is None else "upscale"
        steps = {} if source is None else {"num_inference_steps": None}
        return self.plan_run(Request(width=width, height=height, call=call, source_size=source,
                                     **{**steps, **request})).memory

    # ------------------------------------------------------------------ public calls
    @torch.no_grad()
    def __call__(self, prompt=None, height: int = 1024, width: int = 1024, *,
                 generator: torch.Generator | list[torch.Generator] | None = None, num_images_per_prompt: int = 1,
                 num_inference_steps: int = 30, upscale_inference_steps: int | None = None, guidance_scale: float = 7.5,
                 upscale_guidance_scale: float | None = None, negative_prompt: str | None = None,
                 tiling: str | TilingConfig = "fstd", tile_size: int | None = None,
                 tile_batch_size: int | None = None, output_type: str = "pil",
                 callback_on_step_end: Callable | None = None, noise_level: int = 20, strength: float = 0.3,
                 color_fix: str | None = "backproject", max_memory: int | None = None, vae_tile_size: int | None = None,
                 output_path=None, output_metadata: dict | None = None, run_dir=None, checkpoint_every: int = 1,
                 latent_memory: int | None = None, panorama: str = "auto", regions=None,
                 control_image=None, controlnet_conditioning_scale: float | list[float] = 1.0,
                 control_guidance_start: float | list[float] = 0.0,
                 control_guidance_end: float | list[float] = 1.0, eta: float | None = None,
                 clip_skip: int | None = None, cross_attention_kwargs: dict | None = None,
                 latents: torch.Tensor | None = None, guidance_rescale: float = 0.0, long_prompt: str = "cut",
                 prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
                 pooled_prompt_embeds: torch.Tensor | None = None,
                 negative_pooled_prompt_embeds: torch.Tensor | None = None,
                 callback_on_step_end_tensor_inputs: list[str] | None = None, gligen_phrases=None,
                 gligen_boxes=None, gligen_scheduled_sampling_beta: float = 0.3, true_cfg_scale: float = 1.0,
                 hooks=None) -> AnySizeOutput:
        """Generate ``num_images_per_prompt`` images of exactly ``width x height`` pixels per prompt.
        Positionally ``(prompt, height, width)``, diffusers' order. ``generator``: one for all images (drawn
        from in turn), or a list of one per image (prompt-major), as in diffusers.

        Stage 1 uses ``num_inference_steps`` and ``guidance_scale``; stage 2 ``upscale_inference_steps``
        (None: :attr:`default_upscale_steps`, the upscaler's own choice), ``upscale_guidance_scale``
        (default ``guidance_scale``) and ``noise_level`` (x4 upscaler) or ``strength`` (img2img).
        ``tiling``: "fstd" | "overlap" | "naive" | "none", or a :class:`~anysize.core.tiling.TilingConfig` (stride, shift, weighting...); ``tile_size`` in latent
        px (None: the model's native sample size); ``tile_batch_size`` tiles per UNet call and
        ``vae_tile_size`` the VAE decode's core tile (latent px): None lets the memory planner choose
        within ``max_memory`` bytes (default: what is free), and a request that cannot fit raises
        :class:`~anysize.memory.MemoryPreflightError` before any compute (``out.memory_plan``).
        ``color_fix``: "backproject" (default) makes each stage-2 pass's output consistent with its input
        (area-averaged back down, it gives the input: :mod:`anysize.io.backproject`), so stage 2 keeps
        stage 1's colours and shapes and adds only what lies above their resolution; "adain" matches
        only the colour statistics to stage 1's (StableSR's AdaIN fix); None or "none" leaves them.
        ``callback_on_step_end(pipe, step, timestep, kwargs)`` gets ``{"latents", "stage"}`` and may
        return ``{"latents": tensor}``; ``hooks``: an object (or list) with ``on_phase_start(phase)`` /
        ``on_phase_end(phase)``, called around each phase of the plan (:class:`anysize.stages.Hooks`).
        ``output_path`` (one prompt): decode the last pass straight into this file (``.tif`` and ``.dzi``
        never hold the whole image), with ``out.info`` and ``output_metadata`` stored in it.
        ``run_dir``: checkpoint every ``checkpoint_every`` steps there and continue from what it holds;
        Ctrl-C then stops at the next step boundary. ``panorama``, for a ratio outside the buckets:
        "stretch" (stage 1 at the nearest bucket, resized to the ratio), "direct" or "tiled" (at the
        ratio, untiled or tiled); "auto" (default): "direct" when a ControlNet steers stage 1 (its control
        image sets the layout, and a stretch would distort it), else "stretch". ``latent_memory`` (bytes; None: 256 MiB on the CPU, no limit
        on CUDA): a pass whose sampling state would hold more keeps it on disk and samples by bands of
        rows (:mod:`anysize.core.bands`), bit-identical on the CPU for deterministic schedulers.
        ``regions``: region prompts, ``[(box, prompt), (box, prompt, weight), ...]`` with boxes
        ``(x0, y0, x1, y1)`` in output pixels, or in fractions of the output when every number is at most
        1 (:mod:`anysize.regions`): inside each box its prompt replaces (weight 1) or shares (weight < 1)
        the global one, with feathered edges, in stage 1 and in every stage-2 pass.
        ``control_image``: with ControlNets (``controlnet=`` of :meth:`from_pretrained`), one image per
        ControlNet (PIL, array or tensor, any size: it is resized to each phase, so give it at the output's
        ratio), or ``"tile"``: each stage-2 pass's input (ControlNet-tile). A ControlNet steers the base
        model's phases: stage 1 (at the bucket) and every img2img pass, where each tile gets the crop of
        the control image under it, never an x4 upscaler's. ``controlnet_conditioning_scale``,
        ``control_guidance_start`` / ``control_guidance_end``: as in diffusers, one number or one per
        ControlNet; start and end are fractions of each phase's steps. ``eta`` (DDIM), ``clip_skip`` and
        ``cross_attention_kwargs`` (``{"scale": LoRA scale}``) as in diffusers, in every phase. ``latents``:
        stage 1's starting noise, (images, channels, h, w) at the bucket's latent size (``plan_run``'s
        first phase says it), scaled by the scheduler's ``init_noise_sigma`` as diffusers does.
        ``long_prompt``: a prompt past the text encoder's window is "cut" to it (diffusers; with a
        PromptWarning) or read whole as A1111 does, "chunk": window by window, joined on the token axis
        (:func:`anysize.stages.chunked_embeds`). ``guidance_rescale``: diffusers' (Lin et al. 2023) in
        every phase with guidance; tiled, each tile
        rescales by its own statistics. ``prompt_embeds`` (and ``negative_prompt_embeds``, SDXL's
        ``pooled_prompt_embeds`` / ``negative_pooled_prompt_embeds``): the base model's embeddings
        instead of ``prompt``, one row per image prompt, in stage 1 and img2img passes; an x4 upscaler
        (another text encoder) then gets the empty prompt. ``callback_on_step_end`` may be a diffusers
        ``PipelineCallback`` (e.g. ``SDCFGCutoffCallback``) or a function asking for
        ``callback_on_step_end_tensor_inputs`` (:data:`CALLBACK_TENSOR_INPUTS`). ``gligen_phrases`` /
        ``gligen_boxes`` (a GLIGEN base): phrases grounded to boxes ``(x0, y0, x1, y1)``, fractions of
        the output, as diffusers' GLIGEN pipeline takes them; each tile of every base-model phase reads
        the boxes where they fall in it (:mod:`anysize.core.grounding`); the gated layers act during the
        first ``gligen_scheduled_sampling_beta`` of each phase's steps. ``true_cfg_scale`` (FLUX, > 1,
        with ``negative_prompt``): diffusers' true CFG, an unconditional call beside each tile's.
        """
        gligen_phrases = tuple(gligen_phrases or ())
        gligen_boxes = tuple(tuple(b) if isinstance(b, (list, tuple)) else b for b in gligen_boxes or ())
        controls = _control_inputs(control_image)
        given = {"prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_prompt_embeds,
                 "pooled_prompt_embeds": pooled_prompt_embeds,
                 "negative_pooled_prompt_embeds": negative_pooled_prompt_embeds}
        embeds = _text_embeds(prompt, given, self.base)
        if prompt is None and embeds is None:
            raise ValueError("prompt: required (or prompt_embeds)")
        if embeds is not None and models.model_kind(self.base).family == "flux" and (
                negative_prompt is not None or ("negative_prompt_embeds" in embeds) != (true_cfg_scale > 1)):
            raise ValueError("negative_prompt_embeds and true_cfg_scale: with prompt_embeds, FLUX's negative comes as "
                             "negative_prompt_embeds (and its pooled ones) and acts only through true CFG: pass both "
                             "or neither")
        if embeds is not None:
            prompt = [""] * embeds["prompt_embeds"].shape[0]
        request = Request.of(locals(), call="generate", regions=regions or (), control_images=_digests(controls),
                             prompt_embeds=_embeds_digest(embeds))
        return self.run(self.plan_run(request), generator=generator, callback_on_step_end=callback_on_step_end,
                        hooks=hooks, control_image=controls, latents=latents, text_embeds=embeds,
                        callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs)

    @torch.no_grad()
    def upscale(self, image, width: int, height: int, prompt: str = "", *, num_inference_steps: int | None = None,
                guidance_scale: float = 1.0, negative_prompt: str | None = None,
                tiling: str | TilingConfig = "fstd", tile_size: int | None = None,
                tile_batch_size: int | None = None, vae_tile_size: int | None = None,
                generator: torch.Generator | None = None, output_type: str = "pil", noise_level: int = 20,
                strength: float = 0.3, color_fix: str | None = "backproject", callback_on_step_end: Callable | None = None,
                max_memory: int | None = None, output_path=None, output_metadata: dict | None = None,
                run_dir=None, checkpoint_every: int = 1, latent_memory: int | None = None,
                regions=None, control_image=None, controlnet_conditioning_scale: float | list[float] = 1.0,
                control_guidance_start: float | list[float] = 0.0, control_guidance_end: float | list[float] = 1.0,
                hooks=None) -> AnySizeOutput:
        """Stage 2 alone: enlarge ``image`` (PIL, uint8 / float array, or tensor) to exactly ``width x height``;
        the other arguments as in :meth:`__call__` (``num_inference_steps`` and ``guidance_scale`` are
        stage 2's). With a tile ControlNet and ``control_image="tile"`` this is ControlNet-tile
        upscaling: every img2img pass is steered by its own input, crop by crop (base model, no x4
        upscaler)."""
        if not isinstance(prompt, str):
            raise ValueError(f"prompt={prompt!r}: upscale takes one image and one prompt string")
        source = to_pil(image)
        controls = _control_inputs(control_image)
        request = Request.of(locals(), call="upscale", num_inference_steps=None,
                             upscale_inference_steps=num_inference_steps, source_size=source.size,
                             source_digest=image_digest(source), regions=regions or (),
                             control_images=_digests(controls))
        return self.run(self.plan_run(request), image=source, generator=generator,
                        callback_on_step_end=callback_on_step_end, hooks=hooks, control_image=controls)

    @torch.no_grad()
    def run(self, plan: RunPlan, *, image=None, generator: torch.Generator | list[torch.Generator] | None = None,
            callback_on_step_end: Callable | None = None, hooks=None, control_image=None,
            latents: torch.Tensor | None = None, text_embeds: dict | None = None,
            callback_on_step_end_tensor_inputs: list[str] | None = None) -> AnySizeOutput:
        """Run a plan of :meth:`plan_run` (``image``: an upscale plan's input; ``control_image``,
        ``latents`` and ``callback_on_step_end_tensor_inputs`` as in :meth:`__call__`; ``text_embeds``:
        its ``prompt_embeds`` and kin by name); what :meth:`__call__` and :meth:`upscale` do after
        planning."""
        req = plan.request
        controls = _control_inputs(control_image)
        if _digests(controls) != tuple(req.control_images):
            raise ValueError(f"control_image: {len(controls)} image(s) that differ from the "
                             f"{len(req.control_images)} the plan was made for")
        if _embeds_digest(text_embeds) != req.prompt_embeds:
            raise ValueError("prompt_embeds: differ from the ones the plan was made for")
        inputs = tuple(callback_on_step_end_tensor_inputs or ("latents",))
        unknown = [n for n in inputs if n not in CALLBACK_TENSOR_INPUTS]
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs: {', '.join(map(str, unknown))} not among "
                             f"{', '.join(CALLBACK_TENSOR_INPUTS)}")
        if req.call == "upscale":
            if image is None:
                raise ValueError("image: an upscale plan needs its input image")
            image = to_pil(image)
            if image.size != tuple(req.source_size):
                raise ValueError(f"image: {image.width}x{image.height}, but the plan was made for "
                                 f"{req.source_size[0]}x{req.source_size[1]}")
        file = None
        if req.output_path is not None:
            file = _FileOutput(check_output_path(req.output_path, req.size), dict(req.output_metadata or {}))
        count = len(req.prompts) * req.num_images_per_prompt
        generators = _generators(generator, count)
        starts = _stage1_latents(latents, plan, count)
        ctx = Context(plan, generators[0], self.device, owner=self, callback=callback_on_step_end,
                      hooks=hook_list(hooks), progress=self.progress, scratch_dir=file and Path(file.path).parent,
                      control_images=controls, tensor_inputs=inputs)
        images, infos = [], []
        self._warn_prompts(plan)
        with self._running(ctx):
            for k, text in enumerate(t for t in req.prompts for _ in range(req.num_images_per_prompt)):
                ctx.generator, ctx.latents = generators[k], starts[k]
                if text_embeds is not None:  # image k is prompt k // num_images_per_prompt's
                    row = k // req.num_images_per_prompt
                    ctx.text_embeds = {n: v[row : row + 1] for n, v in text_embeds.items()}
                negative = {"negative_prompt": req.negative_prompt} if req.call == "generate" else {}
                infos.append({"prompt": text, **negative, **plan.info(), **self.model_ids})
                stored = {**infos[-1], "request": dataclasses.replace(req, output_metadata=None).to_json()}
                if file is not None:
                    metadata = {**stored, **file.metadata}
                    here = dataclasses.replace(file, metadata=metadata, parameters=infotext.parameters(metadata))
                images.append(run_image(ctx, text, image, here if file is not None else None))
        if file is None:
            return AnySizeOutput(images=images, info=infos, memory_plan=plan.memory)
        return AnySizeOutput(images=[], info=infos, files=images, memory_plan=plan.memory)

    def _warn_prompts(self, plan: RunPlan) -> None:
        """A warning for each prompt part a model of the plan cannot read (never cut silently)."""
        req = plan.request
        chunked = req.long_prompt == "chunk"  # the global and negative prompts; a region's is cut
        texts = [*((t, chunked) for t in req.prompts), *((r.prompt, False) for r in req.regions),
                 *([(req.negative_prompt, chunked)] if req.negative_prompt else [])]
        seen = set()
        for model in {id(p.model): p.model for p in plan.sampling}.values():
            for text, whole in texts:
                for line in models.prompt_problems(model, text, chunked=whole):
                    if line not in seen:
                        seen.add(line)
                        warnings.warn(line, PromptWarning, stacklevel=3)

    @contextlib.contextmanager
    def _running(self, ctx: Context):
        """With a run directory: checkpoints there and Ctrl-C at a step boundary. Either way, the memory
        the request freed goes back to the system when it ends, however it ends
        (:func:`anysize.memory.release_freed_memory`): otherwise glibc keeps hundreds of MiB of it
        resident in the caller's process (``benchmarks/held_memory.py``)."""
        req = ctx.plan.request
        try:
            if req.run_dir is None:
                yield
                return
            identity = {**req.sampling_identity(), "seed_state": generator_fingerprint(ctx.generator),
                        "dtype": str(self.dtype), **self.model_ids,
                        "schedulers": [schedulers.short_name(p.scheduler) for p in ctx.plan.sampling]}
            ctx.run = RunDir(req.run_dir, identity, every=req.checkpoint_every)
            with ctx.run.stop_on_interrupt():
                yield
        finally:
            memory.release_freed_memory()
