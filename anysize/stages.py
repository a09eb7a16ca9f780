"""The phases of a :class:`~anysize.plan.RunPlan`, run: stage 1, stage-2 passes, decodes, the output.

:func:`run_image` walks a plan's phases for one prompt. Everything one call needs while it runs (the
generator, the run directory, the scratch files of banded passes, hooks, progress) lives in a
:class:`Context` made per call, never on the pipeline object, so calls are re-entrant.

Stage 1 (ARAD, Zheng et al. 2023, sec. 3.2) samples the base model at the bucket, untiled, or at
the request's ratio (panorama, tiled or not). Each stage-2 pass (FSTD, sec. 3.3) is an x4
super-resolution pass conditioned on the previous image resized to the pass's latent size, or an
img2img pass with the base model; both sample through the tiled sampler, in memory or by bands on
disk (:mod:`anysize.core.bands`), and decode through the tiled VAE.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import shutil
import tempfile
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch

from . import memory, models
from .core import bands, nets
from .core.checkpoint import RunDir, RunInterrupted, sample_resumable
from .core.control import TileControl
from .core.dit import FluxTileDenoiser, SD3TileDenoiser
from .core.grounding import TileGrounding, phrase_embeddings
from .core.progress import Progress
from .core.regions import TileRegion
from .core.sampler import UNetTileDenoiser, sample_banded
from .core.vae import tiled_decode, tiled_encode, vae_scale_factor
from .io import stream
from .io.backproject import backproject
from .io.output import save_image
from .plan import Phase, RunPlan, Size
from .regions import FEATHER, Region
from .request import TILE


def _resize(image: PIL.Image.Image, size: Size) -> PIL.Image.Image:
    return image if image.size == tuple(size) else image.resize(tuple(size), PIL.Image.Resampling.LANCZOS)


class _Resized:
    """``image`` resized to ``size`` (as :func:`_resize`), made one crop at a time for
    :func:`anysize.core.vae.tiled_encode`, so a large img2img pass never holds its whole resized input
    (3 bytes per output pixel, 768 MiB at 16384^2, twice over as PIL image and array). Each crop is
    resampled from the source with PIL's ``box`` argument. PIL rounds to 8 bits between its two
    passes within each call, so a crop can differ from the same pixels of one whole resize: by at
    most 2 levels of 255 on smooth images (``tests/test_pipeline.py``), by more on pixel noise."""

    def __init__(self, image: PIL.Image.Image, size: Size):
        self.image, self.size = image.convert("RGB"), tuple(size)
        self.shape = (size[1], size[0], 3)

    def box(self, box) -> np.ndarray:
        t, l, b, r = box
        if self.image.size == self.size:
            return np.asarray(self.image.crop((l, t, r, b)))
        sx, sy = self.image.width / self.size[0], self.image.height / self.size[1]
        return np.asarray(self.image.resize((r - l, b - t), PIL.Image.Resampling.LANCZOS,
                                            box=(l * sx, t * sy, r * sx, b * sy)))


def to_pil(image) -> PIL.Image.Image:
    """A PIL RGB image from PIL, a uint8 / float [0, 1] HWC array, or a [0, 1] (C, H, W) tensor."""
    if isinstance(image, PIL.Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        arr = image if image.dtype == np.uint8 else (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
        return PIL.Image.fromarray(arr).convert("RGB")
    if torch.is_tensor(image):
        t = image[0] if image.ndim == 4 else image
        return to_pil(t.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy())
    raise ValueError(f"image of type {type(image).__name__}: must be a PIL image, a numpy array or a tensor")


def image_digest(image: PIL.Image.Image) -> str:
    """A short hash of an image's pixels: what an upscale request names its input by (run directories compare it)."""
    return hashlib.blake2b(image.tobytes(), digest_size=8).hexdigest()


def _image_tensor(image: PIL.Image.Image, device) -> torch.Tensor:
    """(1, 3, h, w) float32 in [-1, 1]."""
    arr = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0)
    return arr.permute(2, 0, 1)[None].to(device)


def adain_color_fix(image: np.ndarray | stream.Rows, reference: PIL.Image.Image, rows: int | None = None):
    """Match each channel's mean and std to ``reference`` (the AdaIN colour fix of StableSR), in place,
    a band of rows at a time (default :func:`anysize.memory.color_fix_rows`: a fixed number of bytes)
    so a huge uint8 image (an array or a :class:`anysize.io.stream.Raster` on disk) never becomes float
    all at once. Returns ``image``."""
    ref = np.asarray(reference.convert("RGB"), dtype=np.float64).reshape(-1, 3)
    target = stream.as_rows(image)
    rows = memory.color_fix_rows(target.width) if rows is None else rows
    mean, std = stream.channel_moments(target, rows)
    scale = ref.std(0) / std
    stream.apply_affine(target, scale, ref.mean(0) - mean * scale, rows)
    return image


# ---------------------------------------------------------------------- one call's state
class Hooks:
    """What ``hooks=`` may be: any object with either method (both optional), or a list of them.
    ``on_phase_start(phase)`` runs before a phase of the plan and ``on_phase_end(phase)`` after it
    (also when it raised), with the :class:`~anysize.plan.Phase`; e.g. to time or measure each phase."""

    def on_phase_start(self, phase: Phase) -> None:  # pragma: no cover - documentation of the protocol
        pass

    def on_phase_end(self, phase: Phase) -> None:  # pragma: no cover
        pass


@dataclass
class Context:
    """Everything one call needs while it runs. ``owner``: what ``callback_on_step_end`` gets as its
    first argument (the pipeline, as in diffusers); ``run``: the run directory, if any; ``scratch_dir``:
    where banded work goes without one (None: the system's temp dir); ``control_images``: per ControlNet
    of the plan, its control image (PIL) or :data:`anysize.request.TILE`; ``latents``: the image's
    stage-1 noise when the caller gave it (diffusers' ``latents``)."""

    plan: RunPlan
    generator: torch.Generator
    device: torch.device
    owner: Any = None
    callback: Callable | None = None
    hooks: list = field(default_factory=list)
    progress: Progress = True  # False, True (tqdm) or a tqdm-like factory (anysize.core.progress)
    run: RunDir | None = None
    scratch_dir: Path | None = None
    scratch: contextlib.ExitStack | None = None
    control_images: tuple = ()
    latents: torch.Tensor | None = None  # stage 1's starting noise for this image, instead of drawing it
    tensor_inputs: tuple = ("latents",)  # what a plain callback_on_step_end asks for (diffusers' argument)
    denoiser: Any = None  # the running phase's UNetTileDenoiser, whose tensors a callback may read and replace
    text_embeds: dict | None = None  # the caller's prompt embeddings for the base model, this image's rows

    @contextlib.contextmanager
    def phase(self, phase: Phase) -> Iterator[None]:
        for hook in self.hooks:
            getattr(hook, "on_phase_start", _nothing)(phase)
        try:
            yield
        finally:
            for hook in self.hooks:
                getattr(hook, "on_phase_end", _nothing)(phase)

    def step_end(self, stage: str, steps: int):
        """A diffusers-style ``callback_on_step_end(owner, step, timestep, kwargs)`` as the sampler's
        ``(step, t, latents)`` for a phase of ``steps`` steps. It gets ``{"latents", "stage"}`` and the
        running denoiser's tensors it asks for (a diffusers ``PipelineCallback``'s ``tensor_inputs``, else
        :attr:`tensor_inputs`: ``prompt_embeds``, SDXL's ``add_text_embeds`` / ``add_time_ids``, in
        diffusers' layout), and may return replacements; ``owner._guidance_scale`` (the phase's, set
        before the call) and ``owner.num_timesteps`` are there as in diffusers, and a changed guidance
        scale applies to the phase's remaining steps (``SDCFGCutoffCallback`` works unchanged)."""
        callback, owner = self.callback, self.owner
        if callback is None:
            return None
        names = tuple(getattr(callback, "tensor_inputs", None) or self.tensor_inputs)

        def step_end(i, t, latents):
            den = self.denoiser
            tensors = den.callback_tensors(names) if den is not None else {}
            if owner is not None:
                owner._num_timesteps = steps
                owner._guidance_scale = den.guidance_scale if den is not None else None
            out = callback(owner, i, t, {"latents": latents, "stage": stage, **tensors}) or {}
            if den is not None:
                changed = {n: v for n, v in out.items() if n in tensors and v is not tensors[n]}
                scale = getattr(owner, "_guidance_scale", den.guidance_scale)
                if changed or scale != den.guidance_scale:
                    den.update_from_callback(scale, changed)
            return out.get("latents")

        return step_end

    def noise(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """Gaussian noise from the call's generator (drawn on the generator's device, in float32)."""
        g = self.generator
        return torch.randn(shape, generator=g, device=g.device, dtype=torch.float32).to(self.device, dtype)


def _nothing(phase: Phase) -> None:
    return None


def hook_list(hooks) -> list:
    """``hooks=`` as a list of hook objects (None: none)."""
    if hooks is None:
        return []
    return list(hooks) if isinstance(hooks, (list, tuple)) else [hooks]


# ---------------------------------------------------------------------- the phases of one image
def run_image(ctx: Context, prompt: str, source: PIL.Image.Image | None = None, file=None):
    """Run every phase of ``ctx.plan`` for ``prompt``: from noise (generate) or from ``source``
    (upscale). Returns the output type's image, the latents (``output_type="latent"``) or, with
    ``file`` (an object with ``path`` and ``metadata``), the path written. Banded passes' files and a
    streamed decode's scratch raster live until this returns."""
    with contextlib.ExitStack() as ctx.scratch:
        return _run_phases(ctx, prompt, source, file)


def _run_phases(ctx: Context, prompt: str, source, file):
    image = reference = source
    latents = array = None
    backprojected = ctx.plan.request.color_fix == "backproject"
    for phase in ctx.plan.phases:
        with ctx.phase(phase):
            if phase.kind == "base":
                latents = stage1(ctx, phase, prompt)
            elif phase.kind == "sr":
                latents = sr_pass(ctx, phase, image, prompt)
            elif phase.kind == "img2img":
                latents = img2img_pass(ctx, phase, image, prompt)
            elif phase.kind == "decode" and phase.streaming:
                array = _decode_to_raster(ctx, phase, latents, Path(file.path))
            elif phase.kind == "decode":
                array = decode(ctx, phase, latents)
                if not phase.last:  # the next pass (or the resize) reads the PIL image
                    if backprojected and image is not None:  # a pass's output, consistent with its input
                        _backproject(array, image)
                    image, array = PIL.Image.fromarray(array), None
                    reference = image if reference is None else reference  # stage 1's: the colour reference
            else:
                return _output(ctx, array, image, reference, file)
    return latents if torch.is_tensor(latents) else latents.to_tensor()  # output_type="latent"


def _output(ctx: Context, array, image, reference, file):
    """Colour fix and the output type (or the file); with no pass a plain resize of the image."""
    req = ctx.plan.request
    if array is None:
        array = np.array(_resize(image, req.size))
    elif req.color_fix == "backproject" and ctx.plan.passes:
        array = _backproject(array, image)  # the last pass's input
    elif req.color_fixed and ctx.plan.passes:
        array = adain_color_fix(array, reference)
    if file is not None:
        return save_image(array, file.path, file.metadata, parameters=getattr(file, "parameters", None))
    if req.output_type == "pil":
        return PIL.Image.fromarray(array)
    if req.output_type == "np":
        return array.astype(np.float32) / 255.0
    if req.output_type == "pt":
        return torch.from_numpy(array).permute(2, 0, 1).float().div(255.0)
    return array  # "latent" with no pass: nothing to enlarge


def _backproject(array, source: PIL.Image.Image):
    """:func:`anysize.io.backproject.backproject` of a pass's output onto its input, in the colour fix's bands."""
    return backproject(array, source, rows=memory.color_fix_rows(stream.as_rows(array).width))


def _decode_to_raster(ctx: Context, phase: Phase, latents, path: Path) -> stream.Raster:
    """Decode tile by tile into a scratch Raster on disk beside the target (removed when the image is
    done), so the whole image is never in memory for .tif and .dzi."""
    scratch = ctx.scratch.enter_context(tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.stem}.decode."))
    raster = ctx.scratch.enter_context(stream.Raster(Path(scratch) / "image.raw", phase.size[1], phase.size[0]))
    return decode(ctx, phase, latents, out=raster)


def decode(ctx: Context, phase: Phase, latents, out: stream.Raster | None = None):
    """Latents -> uint8 (H, W, 3) cropped to the phase's size through the tiled VAE, or tile by tile
    into ``out`` (a Raster of that size, which crops), with the plan's VAE tile. Up to 128 latent px
    a side the GroupNorm statistics come from one untiled run over the whole latent (exact, about two
    decodes); above, from a downsampled copy (fast mode); :func:`anysize.memory.decode_kwargs`."""
    vae, size = phase.vae, phase.size
    scale, shift = vae.config.scaling_factor, getattr(vae.config, "shift_factor", None)

    def unscale(x: torch.Tensor) -> torch.Tensor:
        x = x / scale
        return x + shift if shift else x

    scaled = unscale(latents) if torch.is_tensor(latents) else bands.Mapped(latents, unscale)
    height, width = scaled.shape[-2:]
    tile = phase.vae_tile_size or memory.VAE_TILE_CHOICES[0]
    array = tiled_decode(vae, scaled, mode="fast", progress=ctx.progress if height * width > 64 * 64 else False,
                         out=out,
                         **memory.decode_kwargs(vae, height, width, tile))
    return out if out is not None else array[: size[1], : size[0]]


def denoiser(model, prompt: str | None, negative_prompt: str | None, guidance_scale: float, size: Size,
             regions=(), latent: tuple[int, int] | None = None, clip_skip: int | None = None,
             cross_attention_kwargs: dict | None = None, embeds: dict | None = None, long_prompt: str = "cut",
             **extra) -> UNetTileDenoiser:
    """Prompt embeddings through diffusers' own ``encode_prompt`` (SD or SDXL; ``clip_skip`` and the
    LoRA scale of ``cross_attention_kwargs`` as diffusers passes them), wrapped for tiles; ``regions``
    (:class:`anysize.regions.Region`, fraction boxes) placed on the ``latent`` (h, w). ``embeds``: the
    caller's ``prompt_embeds`` (and ``negative_prompt_embeds``, SDXL's pooled ones), which
    ``encode_prompt`` takes instead of ``prompt`` as in diffusers. ``long_prompt="chunk"``: a prompt
    or negative prompt past the text encoder's window is read whole, window by window
    (:func:`chunked_embeds`); "cut": as diffusers, the window alone (with a PromptWarning)."""
    kind = models.model_kind(model)
    if kind.is_transformer:
        return _transformer_denoiser(model, kind.family, prompt, negative_prompt, guidance_scale, latent, regions,
                                     embeds, cross_attention_kwargs, **extra)
    do_cfg = guidance_scale > 1.0
    device = model.unet.device
    added = negative_added = ids = None
    text = {"clip_skip": clip_skip, "lora_scale": (cross_attention_kwargs or {}).get("scale")}
    given = {k: v.to(device) for k, v in (embeds or {}).items() if v is not None}
    if not given and long_prompt == "chunk":
        given = chunked_embeds(model, prompt, negative_prompt, do_cfg, text) or {}
    if given:
        prompt = None
    if clip_skip:
        _clip_skip_layout(model.text_encoder)
    if models.model_kind(model).is_sdxl:
        pos, neg, pooled, neg_pooled = model.encode_prompt(
            prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=do_cfg,
            negative_prompt=negative_prompt, **text, **given)
        w, h = size
        ids = torch.tensor([[h, w, 0, 0, h, w]], device=device, dtype=pos.dtype)
        added = {"text_embeds": pooled, "time_ids": ids}
        negative_added = {"text_embeds": neg_pooled, "time_ids": ids} if do_cfg else None
    else:
        pos, neg = model.encode_prompt(prompt, device, 1, do_cfg, negative_prompt, **text, **given)
    tile_regions = [_tile_region(model, r, latent, ids, text) for r in regions]
    return UNetTileDenoiser(model.unet, pos, negative_prompt_embeds=neg, guidance_scale=guidance_scale,
                            added_cond_kwargs=added, negative_added_cond_kwargs=negative_added,
                            regions=tile_regions, cross_attention_kwargs=cross_attention_kwargs, **extra)


def _transformer_denoiser(model, family: str, prompt: str, negative_prompt: str | None, guidance_scale: float,
                          latent: tuple[int, int] | None, regions, embeds, cross_attention_kwargs,
                          controls=(), guidance_rescale: float = 0.0, true_cfg_scale: float = 1.0, **extra):
    """An SD3 or FLUX tile denoiser (:mod:`anysize.core.dit`), its prompt through diffusers' own
    ``encode_prompt`` (``embeds``: the caller's ``prompt_embeds`` and pooled ones, which it takes instead
    of ``prompt``, as in diffusers); ``cross_attention_kwargs`` reach every transformer and ControlNet
    call as the ``joint_attention_kwargs`` diffusers names them there (``{"scale": s}``: the LoRA
    scale). Each tile gets its global position, and so does each region prompt's crop. What anysize
    does only for UNets (guidance rescale, GLIGEN; FLUX's negative prompt without true CFG) was refused
    in one line when the request was checked (``AnySizePipeline._validate``)."""
    assert not (guidance_rescale or extra), "checked by AnySizePipeline._validate"
    device = model.transformer.device
    lora = (cross_attention_kwargs or {}).get("scale")
    given = {k: v.to(device) for k, v in (embeds or {}).items() if v is not None}
    if given:
        prompt = None
    if family == "flux":
        encode = dict(prompt_2=None, device=device, num_images_per_prompt=1, lora_scale=lora)
        pos, pooled, _ = model.encode_prompt(prompt, prompt_embeds=given.get("prompt_embeds"),
                                             pooled_prompt_embeds=given.get("pooled_prompt_embeds"), **encode)

        def embed(text):
            embeds, pooled_embeds, _ = model.encode_prompt(text, **encode)
            return embeds, pooled_embeds
        tile_regions = [_transformer_region(r, latent, embed) for r in regions]
        negative = {}
        if true_cfg_scale > 1:  # diffusers' FluxPipeline true CFG: a second, unconditional call per tile
            neg, neg_pooled, _ = model.encode_prompt(
                None if given else negative_prompt, prompt_embeds=given.get("negative_prompt_embeds"),
                pooled_prompt_embeds=given.get("negative_pooled_prompt_embeds"), **encode)
            negative = dict(true_cfg_scale=true_cfg_scale, negative_prompt_embeds=neg,
                            negative_pooled_prompt_embeds=neg_pooled)
        return FluxTileDenoiser(model.transformer, pos, pooled, guidance_scale=guidance_scale, regions=tile_regions,
                                controls=controls, joint_attention_kwargs=cross_attention_kwargs, **negative)
    do_cfg = guidance_scale > 1.0
    encode = dict(prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=1, lora_scale=lora)
    pos, neg, pooled, neg_pooled = model.encode_prompt(prompt, do_classifier_free_guidance=do_cfg,
                                                       negative_prompt=negative_prompt, **encode, **given)

    def embed(text):  # positive only: a region's crop takes the call's negative prompt
        embeds, _, pooled_embeds, _ = model.encode_prompt(text, do_classifier_free_guidance=False, **encode)
        return embeds, pooled_embeds
    return SD3TileDenoiser(model.transformer, pos, pooled, latent=latent, guidance_scale=guidance_scale,
                           negative_prompt_embeds=neg, negative_pooled_prompt_embeds=neg_pooled,
                           regions=[_transformer_region(r, latent, embed) for r in regions], controls=controls,
                           joint_attention_kwargs=cross_attention_kwargs)


def set_timesteps(phase: Phase) -> None:
    """The phase's schedule: ``steps`` of its scheduler; a FLUX model's as ``FluxPipeline`` sets it
    (sigmas 1 .. 1/steps, shifted by ``mu`` of the phase's WHOLE latent's token count, never a tile's),
    and an SD3 model's with ``mu`` where its scheduler shifts dynamically (SD 3.5)."""
    scheduler, steps = phase.scheduler, phase.steps
    family = models.model_kind(phase.model).family
    config = scheduler.config
    if family not in ("flux", "sd3") or not hasattr(scheduler, "scale_noise"):  # not a flow-matching schedule
        scheduler.set_timesteps(steps)
        return
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    g = nets.granularity(nets.of(phase.model))
    tokens = (phase.latent[0] // g) * (phase.latent[1] // g)
    mu = None
    if config.get("use_dynamic_shifting"):
        mu = calculate_shift(tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                             config.get("base_shift", 0.5), config.get("max_shift", 1.15))
    sigmas = np.linspace(1.0, 1 / steps, steps) if family == "flux" else None
    scheduler.set_timesteps(steps, sigmas=sigmas, mu=mu)


def _add_noise(scheduler, latents: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """``latents`` noised to ``timestep``: a flow-matching scheduler's ``scale_noise``, else ``add_noise``."""
    if hasattr(scheduler, "scale_noise"):
        return scheduler.scale_noise(latents, timestep, noise)
    return scheduler.add_noise(latents, noise, timestep)


def prompt_windows(tokenizer, text: str | None) -> list[str]:
    """``text`` cut into pieces of at most the tokenizer's window less its two special tokens (A1111's
    75-token chunks for CLIP), each decoded back to text; one piece when it fits."""
    if not text:
        return [""]
    ids = tokenizer(text, add_special_tokens=False, truncation=False).input_ids
    size = int(tokenizer.model_max_length) - 2
    if len(ids) <= size:
        return [text]
    return [tokenizer.decode(ids[i : i + size]) for i in range(0, len(ids), size)]


def chunked_embeds(model, prompt: str, negative_prompt: str | None, do_cfg: bool, text: dict) -> dict | None:
    """A1111's long prompts: the prompt (and the negative one) cut into windows (:func:`prompt_windows`),
    each encoded alone by diffusers' ``encode_prompt`` (so its start and end tokens, clip skip, LoRA
    scale and textual inversions apply), and the windows joined along the token axis; the shorter side
    padded with empty windows so both have as many tokens. SDXL's pooled embedding is the first
    window's, as A1111 takes it. None when both fit one window (then nothing differs from diffusers)."""
    device = model.unet.device
    windows = prompt_windows(model.tokenizer, prompt)
    negative = prompt_windows(model.tokenizer, negative_prompt) if do_cfg else [""]
    if len(windows) == 1 and len(negative) == 1:
        return None
    n = max(len(windows), len(negative))
    windows += [""] * (n - len(windows))
    negative += [""] * (n - len(negative))
    sdxl = models.model_kind(model).is_sdxl

    def encode(piece: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        if sdxl:
            pos, _, pooled, _ = model.encode_prompt(piece, device=device, num_images_per_prompt=1,
                                                    do_classifier_free_guidance=False, **text)
            return pos, pooled
        return model.encode_prompt(piece, device, 1, False, **text)[0], None

    pos = [encode(w) for w in windows]
    out = {"prompt_embeds": torch.cat([p for p, _ in pos], dim=1)}
    if sdxl:
        out["pooled_prompt_embeds"] = pos[0][1]
    if do_cfg:
        zeros = sdxl and negative_prompt is None and model.config.force_zeros_for_empty_prompt
        if zeros:  # SDXL's rule for no negative prompt, as its encode_prompt applies it
            out["negative_prompt_embeds"] = torch.zeros_like(out["prompt_embeds"])
            out["negative_pooled_prompt_embeds"] = torch.zeros_like(out["pooled_prompt_embeds"])
        else:
            neg = [encode(w) for w in negative]
            out["negative_prompt_embeds"] = torch.cat([p for p, _ in neg], dim=1)
            if sdxl:
                out["negative_pooled_prompt_embeds"] = neg[0][1]
    return out


def _clip_skip_layout(encoder) -> None:
    """diffusers 0.42's SD ``encode_prompt`` applies a skipped layer's norm as
    ``text_encoder.text_model.final_layer_norm``, transformers 4's layout; transformers 5's
    ``CLIPTextModel`` holds ``final_layer_norm`` itself. Give it the old path (a plain attribute, not a
    submodule: weights and state dict unchanged) so ``clip_skip`` works with either."""
    if encoder is not None and not hasattr(encoder, "text_model") and hasattr(encoder, "final_layer_norm"):
        object.__setattr__(encoder, "text_model", types.SimpleNamespace(final_layer_norm=encoder.final_layer_norm))


def _phase_denoiser(ctx: Context, phase: Phase, prompt: str, timesteps=None, image=None,
                    **extra) -> UNetTileDenoiser:
    """:func:`denoiser` for a sampling phase of ``ctx``'s plan: its model, guidance, size and latent,
    the request's negative prompt and regions, and the ControlNets that steer it (``timesteps``: the
    ones the phase runs; ``image``: its input, the control image of a :data:`TILE` ControlNet). A model
    trained without text (:class:`anysize.models.ModelSettings`) gets the empty prompt and no regions."""
    req = ctx.plan.request
    text = models.settings_of(phase.model).text
    prompt, negative, regions = (prompt, req.negative_prompt, req.regions) if text else ("", None, ())
    controls = _controls(ctx, phase, timesteps, image) if phase.controls else ()
    embeds = ctx.text_embeds if phase.kind in ("base", "img2img") else None  # the base model's embeddings
    if req.gligen_phrases and phase.kind in ("base", "img2img"):
        extra["grounding"] = _grounding(phase, req, timesteps)
    ctx.denoiser = denoiser(phase.model, prompt, negative, phase.guidance_scale, phase.size,
                            regions=regions, latent=phase.latent, controls=controls, clip_skip=req.clip_skip,
                            cross_attention_kwargs=req.cross_attention_kwargs, embeds=embeds,
                            long_prompt=req.long_prompt, guidance_rescale=req.guidance_rescale,
                            **({"true_cfg_scale": req.true_cfg_scale} if req.true_cfg_scale != 1 else {}), **extra)
    return ctx.denoiser


def _grounding(phase: Phase, req, timesteps) -> TileGrounding:
    """GLIGEN's phrases embedded as diffusers' GLIGEN pipeline embeds them (the text encoder's pooled
    output of the phrases, padded together) and their boxes, for this phase's latent; grounded during the
    first ``beta`` of the steps it runs (scheduled sampling)."""
    embeds = phrase_embeddings(phase.model.tokenizer, phase.model.text_encoder, req.gligen_phrases)
    steps = [float(t) for t in timesteps]
    grounded = int(req.gligen_scheduled_sampling_beta * len(steps))
    return TileGrounding(tuple(req.gligen_boxes), embeds, tuple(phase.latent), frozenset(steps[:grounded]))


def _controls(ctx: Context, phase: Phase, timesteps, image: PIL.Image.Image | None) -> list[TileControl]:
    """The phase's ControlNets with their control images resized to the phase's latent times the VAE
    factor (Lanczos, as diffusers resizes a control image), held as uint8 (read as value / 255 a crop
    at a time) on the host; an SD3 or FLUX ControlNet's condition is in latent space instead (diffusers'
    FluxControlNetPipeline, StableDiffusion3ControlNetPipeline): that image encoded by the tiled VAE
    (its mean, scaled as the latents, and shifted too unless the ControlNet was trained without the
    shift: InstantX's SD3 ones, ``force_zeros_for_pooled_projection``), cropped a tile at a time on the
    latent grid (``factor=1``)."""
    req, f = ctx.plan.request, vae_scale_factor(phase.vae)
    lat_h, lat_w = phase.latent
    steps = tuple(float(t) for t in timesteps)
    out = []
    for k in phase.controls:
        source = image if ctx.control_images[k] == TILE else ctx.control_images[k]
        net = ctx.plan.controlnets[k]
        if models.model_kind(phase.model).is_transformer:
            shift = not getattr(net.config, "force_zeros_for_pooled_projection", False)
            tensor, factor = _encoded(phase.model.vae, _Resized(source, (lat_w * f, lat_h * f)), shift), 1
        else:
            pixels = np.asarray(_resize(source, (lat_w * f, lat_h * f)))  # RGB already: to_pil, or a decode
            tensor, factor = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))[None], f
        out.append(TileControl(net, tensor, scale=req.controlnet_conditioning_scale[k],
                               factor=factor, start=req.control_guidance_start[k], end=req.control_guidance_end[k],
                               timesteps=steps))
    return out


def _encoded(vae, pixels, shifted: bool = True) -> torch.Tensor:
    """``pixels`` (an image made a crop at a time, :class:`_Resized`) through the tiled VAE encoder: the
    latent distribution's mean, shifted (``shifted``) and scaled as the model's latents (SD3's and
    FLUX's VAEs centre them with ``shift_factor``)."""
    latents = tiled_encode(vae, pixels, mode="fast")
    shift = getattr(vae.config, "shift_factor", None) if shifted else None
    return (latents - shift if shift else latents) * vae.config.scaling_factor


def _region_place(region: Region, latent: tuple[int, int]) -> dict:
    """A region's box on this phase's (h, w) latent, in latent px, with the feather
    :data:`anysize.regions.FEATHER` of its shorter side and the canvas: :class:`TileRegion`'s fields."""
    lat_h, lat_w = latent
    x0, y0, x1, y1 = region.box
    box = (x0 * lat_w, y0 * lat_h, x1 * lat_w, y1 * lat_h)
    return dict(box=box, weight=region.weight, feather=FEATHER * min(box[2] - box[0], box[3] - box[1]),
                canvas=(lat_h, lat_w))


def _transformer_region(region: Region, latent: tuple[int, int], embed) -> TileRegion:
    """An SD3 / FLUX region: ``embed(prompt)`` gives its (embeddings, pooled embedding)."""
    embeds, pooled = embed(region.prompt)
    return TileRegion(embeds, added={"pooled_projections": pooled}, **_region_place(region, latent))


def _tile_region(model, region: Region, latent: tuple[int, int], time_ids: torch.Tensor | None,
                 text: dict | None = None) -> TileRegion:
    """A region's prompt embedded (positive only: its crop's unconditional pass takes the negative
    prompt) and placed on this phase's latent (:func:`_region_place`). ``time_ids``: SDXL's, the
    global prompt's (None for other models); ``text``: ``encode_prompt``'s clip_skip and lora_scale, as
    for the global prompt."""
    device = model.unet.device
    added = None
    if time_ids is not None:
        embeds, _, pooled, _ = model.encode_prompt(region.prompt, device=device, num_images_per_prompt=1,
                                                   do_classifier_free_guidance=False, **(text or {}))
        added = {"text_embeds": pooled, "time_ids": time_ids}
    else:
        embeds, _ = model.encode_prompt(region.prompt, device, 1, False, **(text or {}))
    return TileRegion(embeds, added=added, **_region_place(region, latent))


def _desc(ctx: Context, phase: Phase) -> str:
    w, h = phase.size
    if phase.kind == "base":
        return f"stage 1 ({'panorama' if ctx.plan.panorama else 'bucket'} {w}x{h})"
    return f"stage 2 {phase.name}/{len(ctx.plan.passes)} ({w}x{h})"


def _timesteps(phase: Phase, timesteps=None):
    """The timesteps a phase runs: ``timesteps`` (an img2img tail) or all of its scheduler's."""
    return phase.scheduler.timesteps if timesteps is None else timesteps


def _sample(ctx: Context, phase: Phase, den, latents: torch.Tensor, stage: str, timesteps=None) -> torch.Tensor:
    return sample_resumable(ctx.run, den, latents, phase.scheduler, phase.tiling, generator=ctx.generator,
                            callback_on_step_end=ctx.step_end(stage, len(_timesteps(phase, timesteps))),
                            progress=ctx.progress,
                            desc=_desc(ctx, phase), timesteps=timesteps, eta=ctx.plan.request.eta)


def stage1(ctx: Context, phase: Phase, prompt: str) -> torch.Tensor:
    """Base model at the bucket (untiled), or at the request's ratio (panorama), tiled or not."""
    scheduler, net = phase.scheduler, phase.unet
    set_timesteps(phase)
    den = _phase_denoiser(ctx, phase, prompt, scheduler.timesteps)
    shape = (1, nets.latent_channels(net), *phase.latent)
    noise = ctx.noise(shape, net.dtype) if ctx.latents is None else ctx.latents.to(ctx.device, net.dtype)
    latents = noise * getattr(scheduler, "init_noise_sigma", 1.0)  # flow matching starts from the noise itself
    return _sample(ctx, phase, den, latents, "base")


def sr_pass(ctx: Context, phase: Phase, image: PIL.Image.Image, prompt: str):
    """One pass of an x4 super-resolution model landing on the phase's size: the conditioning image is
    the input resized to size / 4 (rounded up), noised to ``noise_level``; the latent has its size."""
    model, req = phase.model, ctx.plan.request
    lat_h, lat_w = phase.latent
    level = torch.tensor([req.noise_level], device=ctx.device, dtype=torch.long)
    dtype = model.unet.dtype
    shape = (1, model.vae.config.latent_channels, lat_h, lat_w)
    if phase.banded:
        return _sr_pass_banded(ctx, phase, image, prompt, shape, level)
    low = _image_tensor(_resize(image, (lat_w, lat_h)), ctx.device)
    low = model.low_res_scheduler.add_noise(low, ctx.noise(low.shape, torch.float32), level)
    den = _phase_denoiser(ctx, phase, prompt, cond=low.to(dtype), class_labels=level)
    phase.scheduler.set_timesteps(phase.steps)
    latents = ctx.noise(shape, dtype)
    return _sample(ctx, phase, den, latents * phase.scheduler.init_noise_sigma, "upscale")


def _sr_pass_banded(ctx: Context, phase: Phase, image: PIL.Image.Image, prompt: str, shape,
                    level: torch.Tensor) -> bands.DiskTensor:
    """:func:`sr_pass` with the conditioning image and the latents on disk, written band by band from
    the same noise draws in the same order (so the same values as in memory)."""
    model, (_, _, lat_h, lat_w) = phase.model, shape
    dtype, device = model.unet.dtype, ctx.device
    work = _band_work(ctx, shape, phase.tiling.tile_size, dtype)
    cond = ctx.scratch.enter_context(bands.DiskTensor(work.dir / "cond.raw", (1, 3, lat_h, lat_w), dtype))
    pixels = np.asarray(_resize(image, (lat_w, lat_h)).convert("RGB"))
    noise = bands.NoiseStream(3 * lat_h * lat_w, ctx.generator)

    def low_rows(b: int, c: int, top: int, bottom: int) -> torch.Tensor:  # as _image_tensor, then add_noise
        x = torch.from_numpy(pixels[top:bottom, :, c].astype(np.float32) / 127.5 - 1.0).to(device)
        return model.low_res_scheduler.add_noise(x, noise.take(x.numel()).view_as(x).to(device), level)

    bands.fill_planes(cond, low_rows)
    del pixels, low_rows  # on disk now
    den = _phase_denoiser(ctx, phase, prompt, cond=cond, class_labels=level)
    phase.scheduler.set_timesteps(phase.steps)
    sigma, noise = phase.scheduler.init_noise_sigma, bands.NoiseStream(math.prod(shape), ctx.generator)
    bands.fill_planes(work.init, lambda b, c, top, bottom: noise.take((bottom - top) * lat_w)
                      .view(bottom - top, lat_w).to(device, dtype) * sigma)
    return _sample_banded(ctx, phase, den, work)


def img2img_pass(ctx: Context, phase: Phase, image: PIL.Image.Image, prompt: str):
    """One img2img pass with the base model: resize to the phase's size, encode with the tiled VAE,
    noise to ``strength``, denoise tiled (Tiled Diffusion / Ultimate SD Upscale style)."""
    model, req = phase.model, ctx.plan.request
    f = vae_scale_factor(model.vae)
    lat_h, lat_w = phase.latent
    dtype = phase.unet.dtype
    pixels = _Resized(image, (lat_w * f, lat_h * f))
    init = _encoded(model.vae, pixels).to(ctx.device, dtype)
    scheduler, steps = phase.scheduler, phase.steps
    set_timesteps(phase)
    start = min(steps - 1, int(round(steps * (1 - req.strength))))
    timesteps = scheduler.timesteps[start * scheduler.order :]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start * scheduler.order)
    den = _phase_denoiser(ctx, phase, prompt, timesteps, image)
    if phase.banded:
        work = _band_work(ctx, init.shape, phase.tiling.tile_size, dtype)
        noise, first = bands.NoiseStream(init.numel(), ctx.generator), timesteps[:1]

        def noisy_rows(b: int, c: int, top: int, bottom: int) -> torch.Tensor:
            rows = init[b : b + 1, c : c + 1, top:bottom]
            fresh = noise.take(rows.numel()).view_as(rows).to(ctx.device, dtype)
            return _add_noise(scheduler, rows, fresh, first)[0, 0]

        bands.fill_planes(work.init, noisy_rows)
        del init
        return _sample_banded(ctx, phase, den, work, timesteps)
    noisy = _add_noise(scheduler, init, ctx.noise(init.shape, dtype), timesteps[:1])
    return _sample(ctx, phase, den, noisy, "upscale", timesteps=timesteps)


def _band_work(ctx: Context, shape, tile: int, dtype: torch.dtype) -> bands.BandWork:
    """The files of a banded phase: in the run directory (a phase of it, durable, resumable), or in a
    scratch directory (beside the output file, else in the temp directory) removed after the image."""
    run, stack = ctx.run, ctx.scratch
    if run is not None:
        directory = run.path / f"{run.next_phase()}.bands"
    else:
        directory = Path(tempfile.mkdtemp(prefix=".anysize-bands.", dir=ctx.scratch_dir))
        stack.callback(shutil.rmtree, directory, ignore_errors=True)
    rows = bands.band_rows(shape, minimum=tile)
    return stack.enter_context(bands.BandWork(directory, shape, rows=rows, durable=run is not None, dtype=dtype))


def _sample_banded(ctx: Context, phase: Phase, den, work: bands.BandWork, timesteps=None) -> bands.DiskTensor:
    """:func:`anysize.core.sampler.sample_banded` for one pass; with a run directory, continued from its
    last commit, and Ctrl-C stops after the next one."""
    run = ctx.run

    def stop(step: int) -> None:
        if run is not None and run.stop_requested:
            raise RunInterrupted(f"interrupted at step {step} of {work.dir.name}; the run continues from there")

    return sample_banded(den, work, phase.scheduler, phase.tiling, generator=ctx.generator,
                         callback_on_step_end=ctx.step_end("upscale", len(_timesteps(phase, timesteps))),
                         on_commit=stop, progress=ctx.progress,
                         desc=_desc(ctx, phase), timesteps=timesteps, device=ctx.device, eta=ctx.plan.request.eta)
