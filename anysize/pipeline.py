"""AnySizePipeline: text to an image of exactly W x H in two stages (Any-Size-Diffusion).

Stage 1 (ARAD, Zheng et al. 2023, sec. 3.2): the base model samples at the aspect-ratio bucket
nearest the request (untiled, classifier-free guidance), also when the ratio lies outside the
buckets (``panorama="stretch"``; "direct" and "tiled" sample at the requested ratio instead, which
repeats objects on the default model). Stage 2 (FSTD, sec.
3.3): the stage-1 image is enlarged pass by pass (x4 each for an x4 super-resolution model, x2 for
img2img with the base model), the last pass landing exactly on W x H, each through the tiled sampler
and the tiled VAE decode.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import PIL.Image
import torch

from . import models
from .core import bands, distributed
from .io import stream
from .buckets import BEYOND_BUCKETS, arad_buckets, choose_base_size, model_granularity, native_side, stretch_factor
from . import memory
from .io.output import STREAMING, check_output_path, output_format, save_image
from .core.checkpoint import RunDir, RunInterrupted, generator_fingerprint, load_scheduler_state
from .core.sampler import UNetTileDenoiser, make_plan_generator, sample_banded, sample_tiled
from .core.tiling import METHODS, TilingConfig
from .core.vae import tiled_decode, tiled_encode, vae_scale_factor

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
COLOR_FIXES = ("adain", "none")
MIN_SIDE = 8
Size = tuple[int, int]  # (width, height) in image pixels


@dataclass
class AnySizeOutput:
    """``images``: PIL images, float32 HWC arrays in [0, 1] (np), CHW tensors (pt) or latents; empty when
    the image went straight to a file (``output_path``); ``info``: per image, what was done (sizes,
    passes, tiling, models), e.g. for file metadata; ``files``: the paths written."""

    images: list[Any]
    info: list[dict] = field(default_factory=list)
    files: list[Any] = field(default_factory=list)
    memory_plan: memory.MemoryPlan | None = None  # the tile batch and VAE tile chosen, each stage's estimate


@dataclass(frozen=True)
class _FileOutput:
    """Where the last pass's decode streams to, and the metadata to store with it."""

    path: Any
    metadata: dict


@dataclass(frozen=True)
class Plan:
    """Stage sizes for one request."""

    base: Size  # stage 1's size (a bucket, or the request's ratio in panorama mode)
    panorama: bool
    passes: tuple[Size, ...]  # stage 2's output size per pass; the last is the request
    tiled: bool = False  # stage 1 samples by tiles (panorama="tiled")
    stretch: float = 1.0  # how much the stage-1 image is distorted to reach the request's ratio


@dataclass(frozen=True)
class _Stage2:
    """Stage-2 settings shared by every pass."""

    prompt: str
    negative_prompt: str | None
    steps: int
    guidance_scale: float
    tiling: TilingConfig
    tile_size: int | None
    noise_level: int
    strength: float
    generator: torch.Generator
    callback: Callable | None
    latent_memory: int | None = None  # sampling state above this goes to disk (memory.banded_sampling)
    scratch: Any = None  # where banded work goes without a run directory (None: the system's temp dir)


def upscale_passes(source: Size, target: Size, factor: int, *, stretch: float | None = None,
                   min_scale: float = 1.0) -> tuple[Size, ...]:
    """Pass sizes from ``source`` to ``target``: x``factor`` each at the target's aspect ratio, the last
    pass exactly ``target``. A ratio that is not a power of ``factor`` is taken up by the first pass,
    whose input is ``source`` resized by a scale in (1/stretch, stretch] (default stretch
    sqrt(factor): the number of passes is log_factor(ratio) rounded to the nearest whole number, ties
    to fewer). That pass is the smallest, and every later pass starts from the previous one's output
    at its own scale. (Putting the odd ratio in the last pass instead means one more large pass
    whose output is then shrunk: about 25% more work at 2048^2 from 64^2, and measured worse on the
    scene domain; see the README's stage-2 pass plan section.) Empty when the target is no larger
    than the source, or when it is at most ``min_scale`` times the source's area scale (the pipeline
    passes sqrt(factor) = 2 for an x4 super-resolution model, whose one pass would otherwise be
    conditioned on the source shrunk to a quarter to a half: measured far worse than a plain resize,
    README "Enlargements of 2x or less")."""
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


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fresh_generator() -> torch.Generator:
    """No generator given: a seed drawn from torch's global RNG (so ``torch.manual_seed`` still reproduces)."""
    return torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,)).item()))


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


class AnySizePipeline:
    """Two-stage any-size text-to-image: ARAD bucketed base generation, then FSTD tiled upscaling.

    ``base``: a diffusers text-to-image pipeline (SD 1.x/2.x, epsilon or v-prediction; SDXL).
    ``upscaler``: a pipeline in the SD x4-upscaler layout, or None to upscale img2img-style with the
    base model itself (``strength``), as Tiled Diffusion and Ultimate SD Upscale users do.
    """

    def __init__(self, base=None, upscaler=None, *, model_ids: dict | None = None):
        if base is None and upscaler is None:
            raise models.ModelLoadError("base and upscaler: at least one model is needed")
        if base is not None and models.model_kind(base).is_upscaler:
            raise models.ModelLoadError("base: is a super-resolution model (x4-upscaler layout); pass it as upscaler")
        if upscaler is not None and not models.model_kind(upscaler).is_upscaler:
            raise models.ModelLoadError(
                "upscaler: not in the SD x4-upscaler layout (UNet in_channels = latent + 3 and a low_res_scheduler)")
        self.base, self.upscaler = base, upscaler
        self.model_ids = model_ids or {}
        self.progress = True
        self._vae_tile = memory.VAE_TILE_CHOICES[0]  # the memory plan's VAE decode tile, set by each call
        self._run: RunDir | None = None
        if base is not None:
            self.base_factor = vae_scale_factor(base.vae)
            self.base_tile = int(base.unet.config.sample_size)
            self.granularity = model_granularity(base.vae, base.unet)
            self.buckets = arad_buckets(native_side(base.vae, base.unet) ** 2, granularity=self.granularity)

    @classmethod
    def from_pretrained(cls, base=None, upscaler=None, *, device=None, dtype=None, allow_pickle: bool = False,
                        img2img: bool = False) -> AnySizePipeline:
        """Load ``base`` and ``upscaler`` (diffusers directories, ``.safetensors`` files or hub ids);
        with neither, the embedded default model. ``img2img=True`` with no upscaler upscales with the
        base model; an upscaler alone serves :meth:`upscale` only. ``dtype``: "auto" (float16 on GPUs,
        float32 on the CPU), "float32", "float16", "bfloat16"."""
        device = torch.device(device) if device is not None else models.default_device()
        dtype = models.parse_dtype(dtype, device)
        if base is None and upscaler is None:
            if img2img:
                raise models.ModelLoadError("base: img2img upscaling needs a base model (CLI: --base)")
            base, upscaler = models.default_model_paths()
        kw = dict(device=device, dtype=dtype, allow_pickle=allow_pickle)
        base_pipe = None if base is None else models.load_pipeline(base, role="base", **kw)
        up_pipe = None if upscaler is None else models.load_pipeline(upscaler, role="upscaler", **kw)
        ids = {"base": models.describe(base), "upscaler": models.describe(upscaler) if upscaler else "base (img2img)"}
        return cls(base_pipe, up_pipe, model_ids=ids)

    def set_progress_bar_config(self, disable: bool = False) -> None:
        self.progress = not disable

    @property
    def device(self) -> torch.device:
        return (self.base if self.base is not None else self.upscaler).unet.device

    @property
    def dtype(self) -> torch.dtype:
        return (self.base if self.base is not None else self.upscaler).unet.dtype

    @property
    def stage2_factor(self) -> int:
        return 4 if self.upscaler is not None else 2

    def stage2_passes(self, source: Size, target: Size) -> tuple[Size, ...]:
        """Stage 2's pass sizes from ``source`` to ``target`` (:func:`upscale_passes`). With an x4
        super-resolution upscaler, an enlargement of 2x or less has no pass (a Lanczos resize): its
        one pass would be conditioned on the source shrunk to target / 4. img2img passes work at their
        own size from the source enlarged, so they keep the one pass."""
        min_scale = math.sqrt(self.stage2_factor) if self.upscaler is not None else 1.0
        return upscale_passes(tuple(source), tuple(target), self.stage2_factor, min_scale=min_scale)

    # ------------------------------------------------------------------ checks and plans
    def check_inputs(self, prompt, width, height, num_inference_steps=1, upscale_inference_steps=1,
                     guidance_scale=1.0, tiling="fstd", tile_size=None, tile_batch_size=None, output_type="pil",
                     strength=0.3, color_fix="adain", noise_level=20, *, negative_prompt=None,
                     upscale_guidance_scale=None, max_memory=None, vae_tile_size=None, latent_memory=None,
                     panorama="stretch") -> None:
        """Validate every argument before any compute; each message names the argument, its value and the rule.

        ``num_inference_steps=None`` checks a stage-2-only call (:meth:`upscale`).
        """
        if self.base is None and num_inference_steps is not None:
            raise ValueError("base=None: text-to-image needs a base model; this pipeline only has an upscaler")
        if not isinstance(prompt, str) and not (isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt)):
            raise ValueError(f"prompt={prompt!r}: must be a string or a non-empty list of strings")
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise ValueError(f"negative_prompt={negative_prompt!r}: must be a string or None")
        max_level = self._max_noise_level()
        for name, value, minimum in (("width", width, MIN_SIDE), ("height", height, MIN_SIDE),
                                     ("num_inference_steps", 1 if num_inference_steps is None else num_inference_steps, 1),
                                     ("upscale_inference_steps", upscale_inference_steps, 1),
                                     ("tile_batch_size", 1 if tile_batch_size is None else tile_batch_size, 1),
                                     ("vae_tile_size", 8 if vae_tile_size is None else vae_tile_size, 8),
                                     ("noise_level", noise_level, 0),
                                     ("max_memory", 1 if max_memory is None else max_memory, 1),
                                     ("latent_memory", 0 if latent_memory is None else latent_memory, 0)):
            if not _is_int(value) or value < minimum:
                raise ValueError(f"{name}={value!r}: must be an integer >= {minimum}")
        if panorama not in BEYOND_BUCKETS:
            raise ValueError(f"panorama={panorama!r}: must be one of {', '.join(BEYOND_BUCKETS)}")
        if noise_level > max_level:
            raise ValueError(f"noise_level={noise_level}: must be <= the upscaler's max_noise_level {max_level}")
        if tile_size is not None and (not _is_int(tile_size) or tile_size < 8):
            raise ValueError(f"tile_size={tile_size!r}: must be None (the model's native size) or an integer >= 8 latent px")
        for name, value in (("guidance_scale", guidance_scale), ("upscale_guidance_scale", upscale_guidance_scale)):
            if value is not None and not (_is_number(value) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}={value!r}: must be a finite number >= 0")
        if tiling not in METHODS:
            raise ValueError(f"tiling={tiling!r}: must be one of {', '.join(METHODS)}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r}: must be one of {', '.join(OUTPUT_TYPES)}")
        if not _is_number(strength) or not 0 < strength <= 1:
            raise ValueError(f"strength={strength!r}: must be a number in (0, 1]")
        if color_fix is not None and color_fix not in COLOR_FIXES:
            raise ValueError(f"color_fix={color_fix!r}: must be one of {', '.join(COLOR_FIXES)} or None")

    def _max_noise_level(self) -> int:
        """The x4 upscaler's highest noise level (its class embedding's range); 1000 without one."""
        if self.upscaler is None:
            return 1000
        return int(getattr(self.upscaler.config, "max_noise_level", None) or 350)

    def plan(self, width: int, height: int, panorama: str = "stretch") -> Plan:
        """Where stage 1 generates and which stage-2 passes follow, for a ``width x height`` request;
        ``panorama`` for a ratio outside the buckets (:func:`anysize.buckets.choose_base_size`)."""
        choice = choose_base_size(width, height, self.buckets, granularity=self.granularity, beyond=panorama)
        return Plan(choice.size, choice.panorama, self.stage2_passes(choice.size, (width, height)),
                    choice.tiled, stretch_factor(choice.size, width, height))

    def plan_memory(self, width: int, height: int, *, source: Size | None = None, max_memory: int | None = None,
                    tile_batch_size: int | None = None, vae_tile_size: int | None = None, tile_size=None,
                    tiling: str = "fstd", output_type: str = "pil", color_fix: str | None = "adain",
                    output_path=None, guidance_scale: float = 7.5,
                    upscale_guidance_scale: float | None = None,
                    latent_memory: int | None = None, panorama: str = "stretch") -> memory.MemoryPlan:
        """The memory plan of a request (:func:`anysize.memory.plan_memory`), before any compute: the
        tile batch and VAE decode tile (None: the largest that fit the free memory or ``max_memory``)
        and each stage's estimated peak; ``plan.describe()`` prints it. ``source``: the input's
        (width, height) for :meth:`upscale`. ``latent_memory``: as in :meth:`__call__`. Raises :class:`~anysize.memory.MemoryPreflightError` with
        the numbers when the request cannot fit even at tile batch 1 and the smallest VAE tile."""
        streaming = output_path is not None and output_format(output_path) in STREAMING
        return memory.plan_memory(
            self, width, height, source=source, max_memory=max_memory, tile_batch_size=tile_batch_size,
            vae_tile_size=vae_tile_size, tile_size=tile_size, tiling=tiling, output_type=output_type,
            color_fix=color_fix == "adain", streaming=streaming, guidance_scale=guidance_scale,
            upscale_guidance_scale=upscale_guidance_scale, latent_memory=self._latent_limit(latent_memory),
            panorama=panorama)

    def _latent_limit(self, latent_memory: int | None) -> int | None:
        """``latent_memory`` as given; by default (None) :data:`anysize.memory.LATENT_MEMORY` where the
        sampling state lives in host memory (CPU, MPS), no limit on CUDA, whose state is not the host's."""
        if latent_memory is None and self.device.type == "cuda":
            return 2**62
        return latent_memory

    def _plan_call(self, width: int, height: int, **kwargs) -> memory.MemoryPlan:
        """:meth:`plan_memory` for a call, which then decodes with its VAE tile. Under torchrun every rank
        takes rank 0's choices: the tile batches are the unit the ranks share, so they must agree."""
        plan = self.plan_memory(width, height, **kwargs)
        if distributed.current() is not None:
            batch, tile = distributed.broadcast_object((plan.tile_batch_size, plan.vae_tile_size))
            if (batch, tile) != (plan.tile_batch_size, plan.vae_tile_size):
                plan = self.plan_memory(width, height, **{**kwargs, "tile_batch_size": batch, "vae_tile_size": tile})
        self._vae_tile = plan.vae_tile_size
        return plan

    # ------------------------------------------------------------------ public calls
    @torch.no_grad()
    def __call__(self, prompt, width: int = 1024, height: int = 1024, *, generator: torch.Generator | None = None,
                 num_inference_steps: int = 30, upscale_inference_steps: int = 20, guidance_scale: float = 7.5,
                 upscale_guidance_scale: float | None = None, negative_prompt: str | None = None,
                 tiling: str = "fstd", tile_size: int | None = None, tile_batch_size: int | None = None,
                 output_type: str = "pil", callback_on_step_end: Callable | None = None, noise_level: int = 20,
                 strength: float = 0.3, color_fix: str | None = "adain", max_memory: int | None = None,
                 vae_tile_size: int | None = None, output_path=None, output_metadata: dict | None = None,
                 run_dir=None, checkpoint_every: int = 1, latent_memory: int | None = None,
                 panorama: str = "stretch") -> AnySizeOutput:
        """Generate one image of exactly ``width x height`` pixels per prompt.

        Stage 1 uses ``num_inference_steps`` and ``guidance_scale``; stage 2 uses
        ``upscale_inference_steps``, ``upscale_guidance_scale`` (default ``guidance_scale``) and
        ``noise_level`` (x4 upscaler) or ``strength`` (img2img). ``tiling``: "fstd" | "overlap" |
        "naive" | "none"; ``tile_size`` in latent px (None: the model's native sample size);
        ``tile_batch_size`` tiles per UNet call and ``vae_tile_size`` the VAE decode's core tile (latent
        px): None lets the memory planner choose (:meth:`plan_memory`; the result's ``memory_plan``).
        ``color_fix="adain"`` matches stage 2's colour statistics to stage 1's. ``callback_on_step_end(pipe, step, timestep, kwargs)`` gets
        ``{"latents", "stage"}`` and may return ``{"latents": tensor}`` to replace them.
        ``max_memory`` (bytes): the planner's budget instead of the free memory; a request that cannot
        fit raises :class:`~anysize.memory.MemoryPreflightError` before any compute.
        ``output_path`` (one prompt only): decode the last pass tile by tile straight into this file
        (format by extension; ``.tif`` and ``.dzi`` never hold the whole image in memory), with the
        run's info and ``output_metadata`` stored in it; ``images`` is then empty and ``files`` has the path.
        ``run_dir``: checkpoint every ``checkpoint_every`` steps there and continue from what it holds
        (:mod:`anysize.core.checkpoint`); Ctrl-C then stops at the next step boundary with a checkpoint.
        ``panorama``, for a ratio outside the buckets (past 2:1 / 1:2 with ARAD's): "stretch" (default)
        samples stage 1 at the nearest bucket and resizes it to the ratio; "direct" samples at the
        ratio itself, "tiled" at the ratio with the tiled sampler (MultiDiffusion-style panorama).
        On the default model stretch keeps the composition where the others repeat objects (README,
        ``benchmarks/panorama.py``); ``out.info`` records the ``stretch`` factor.
        ``latent_memory`` (bytes; None: :data:`anysize.memory.LATENT_MEMORY` on the CPU and MPS, no
        limit on CUDA, where the state is in GPU memory): a stage-2 pass whose
        sampling state would hold more keeps its latents, scheduler state and conditioning image on disk
        and samples by bands of rows (:mod:`anysize.core.bands`; beside ``output_path`` or in the run
        directory, else in the temp directory), so memory stays flat at any size; bit-identical on the
        CPU for deterministic schedulers; such a pass checkpoints every step.
        """
        self.check_inputs(prompt, width, height, num_inference_steps, upscale_inference_steps, guidance_scale,
                          tiling, tile_size, tile_batch_size, output_type, strength, color_fix, noise_level,
                          negative_prompt=negative_prompt, upscale_guidance_scale=upscale_guidance_scale,
                          max_memory=max_memory, vae_tile_size=vae_tile_size, latent_memory=latent_memory,
                          panorama=panorama)
        file = self._file_output(output_path, output_metadata, (width, height), prompt, output_type)
        mem = self._plan_call(width, height, max_memory=max_memory, tile_batch_size=tile_batch_size,
                              vae_tile_size=vae_tile_size, tile_size=tile_size, tiling=tiling,
                              output_type=output_type, color_fix=color_fix, output_path=output_path,
                              guidance_scale=guidance_scale, upscale_guidance_scale=upscale_guidance_scale,
                              latent_memory=latent_memory, panorama=panorama)
        generator = generator if generator is not None else _fresh_generator()
        request = {"call": "generate", "prompt": prompt, "negative_prompt": negative_prompt, "width": width,
                   "height": height, "steps": num_inference_steps, "upscale_steps": upscale_inference_steps,
                   "guidance": guidance_scale, "upscale_guidance": upscale_guidance_scale, "tiling": tiling,
                   "tile_size": tile_size, "noise_level": noise_level, "strength": strength,
                   "latent_memory": latent_memory, "panorama": panorama}
        with self._running(run_dir, checkpoint_every, request, generator):
            plan = self.plan(width, height, panorama)
            tiles = TilingConfig(method=tiling, tile_size=tile_size or self.base_tile,
                                 tile_batch_size=mem.tile_batch_size)
            images, infos = [], []
            for text in [prompt] if isinstance(prompt, str) else prompt:
                latents = self._stage1(text, negative_prompt, plan, num_inference_steps, guidance_scale, tiles,
                                       generator, callback_on_step_end)
                opts = _Stage2(text, negative_prompt, upscale_inference_steps,
                               guidance_scale if upscale_guidance_scale is None else upscale_guidance_scale,
                               tiles, tile_size, noise_level, strength, generator, callback_on_step_end,
                               self._latent_limit(latent_memory), file and Path(file.path).parent)
                infos.append({"prompt": text, "negative_prompt": negative_prompt, "width": width,
                              "height": height, "base_size": list(plan.base), "panorama": plan.panorama,
                              "panorama_mode": panorama, "stretch": round(plan.stretch, 4),
                              "passes": [list(p) for p in plan.passes], "tiling": tiling,
                              "tile_batch_size": mem.tile_batch_size, "vae_tile_size": mem.vae_tile_size,
                              **self.model_ids})
                if not plan.passes and output_type == "latent" and file is None:
                    images.append(latents)
                else:
                    stage1 = PIL.Image.fromarray(self._decode(self.base.vae, latents, plan.base))
                    file_k = file and replace(file, metadata={**infos[-1], **file.metadata})
                    images.append(self._stage2(stage1, plan.passes, (width, height), opts, output_type, color_fix,
                                               file_k))
        return self._output(images, infos, file, mem)

    @torch.no_grad()
    def upscale(self, image, width: int, height: int, prompt: str = "", *, num_inference_steps: int = 20,
                guidance_scale: float = 1.0, negative_prompt: str | None = None, tiling: str = "fstd",
                tile_size: int | None = None, tile_batch_size: int | None = None,
                vae_tile_size: int | None = None, generator: torch.Generator | None = None,
                output_type: str = "pil", noise_level: int = 20, strength: float = 0.3,
                color_fix: str | None = "adain", callback_on_step_end: Callable | None = None,
                max_memory: int | None = None, output_path=None, output_metadata: dict | None = None,
                run_dir=None, checkpoint_every: int = 1, latent_memory: int | None = None) -> AnySizeOutput:
        """Stage 2 alone: enlarge ``image`` (PIL, uint8 / float array, or tensor) to exactly ``width x height``;
        ``tile_batch_size``, ``vae_tile_size``, ``max_memory``, ``output_path``, ``output_metadata``,
        ``run_dir``, ``checkpoint_every``, ``latent_memory``: as in :meth:`__call__`."""
        if not isinstance(prompt, str):
            raise ValueError(f"prompt={prompt!r}: upscale takes one image and one prompt string")
        self.check_inputs(prompt, width, height, None, num_inference_steps, guidance_scale, tiling, tile_size,
                          tile_batch_size, output_type, strength, color_fix, noise_level,
                          negative_prompt=negative_prompt, max_memory=max_memory, vae_tile_size=vae_tile_size,
                          latent_memory=latent_memory)
        file = self._file_output(output_path, output_metadata, (width, height), prompt, output_type)
        source = to_pil(image)
        mem = self._plan_call(width, height, source=source.size, max_memory=max_memory,
                              tile_batch_size=tile_batch_size, vae_tile_size=vae_tile_size, tile_size=tile_size,
                              tiling=tiling, output_type=output_type, color_fix=color_fix, output_path=output_path,
                              guidance_scale=guidance_scale, latent_memory=latent_memory)
        generator = generator if generator is not None else _fresh_generator()
        native = int((self.upscaler if self.upscaler is not None else self.base).unet.config.sample_size)
        tiles = TilingConfig(method=tiling, tile_size=tile_size or native, tile_batch_size=mem.tile_batch_size)
        opts = _Stage2(prompt, negative_prompt, num_inference_steps, guidance_scale, tiles, tile_size, noise_level,
                       strength, generator, callback_on_step_end, self._latent_limit(latent_memory),
                       file and Path(file.path).parent)
        passes = self.stage2_passes(source.size, (width, height))
        info = {"prompt": prompt, "width": width, "height": height, "passes": [list(p) for p in passes],
                "tiling": tiling, "tile_batch_size": mem.tile_batch_size, "vae_tile_size": mem.vae_tile_size,
                **self.model_ids}
        request = {"call": "upscale", "image": hashlib.blake2b(source.tobytes(), digest_size=8).hexdigest(),
                   "source_size": list(source.size), "prompt": prompt, "negative_prompt": negative_prompt,
                   "width": width, "height": height, "steps": num_inference_steps, "guidance": guidance_scale,
                   "tiling": tiling, "tile_size": tile_size, "noise_level": noise_level, "strength": strength,
                   "latent_memory": latent_memory}
        with self._running(run_dir, checkpoint_every, request, generator):
            result = self._stage2(source, passes, (width, height), opts, output_type, color_fix,
                                  file and replace(file, metadata={**info, **file.metadata}))
        return self._output([result], [info], file, mem)

    # ------------------------------------------------------------------ shared steps
    @staticmethod
    def _file_output(path, metadata: dict | None, size: Size, prompt, output_type: str) -> _FileOutput | None:
        """Check ``output_path`` before any compute (writable, known format, within its size limits)."""
        if path is None:
            return None
        if output_type == "latent":
            raise ValueError("output_path: writes an image; output_type='latent' returns latents instead, pass one")
        if not isinstance(prompt, str):
            raise ValueError("output_path: writes one image; pass one prompt string, not a list")
        if metadata is not None and not isinstance(metadata, dict):
            raise ValueError(f"output_metadata={metadata!r}: must be a dict or None")
        return _FileOutput(check_output_path(path, size), dict(metadata or {}))

    @contextlib.contextmanager
    def _running(self, run_dir, every: int, request: dict, generator: torch.Generator):
        """With ``run_dir``: checkpoints there (:meth:`_sample`) and Ctrl-C at a step boundary. Either
        way, the memory the request freed goes back to the system when it ends, however it ends
        (:func:`anysize.memory.release_freed_memory`): otherwise glibc keeps hundreds of MiB of it
        resident in the caller's process (``benchmarks/held_memory.py``)."""
        try:
            if run_dir is None:
                yield
                return
            request = {**request, "seed_state": generator_fingerprint(generator), "dtype": str(self.dtype),
                       **self.model_ids}
            self._run = RunDir(run_dir, request, every=every)
            try:
                with self._run.stop_on_interrupt():
                    yield
            finally:
                self._run = None
        finally:
            memory.release_freed_memory()

    @staticmethod
    def _output(images: list, infos: list[dict], file: _FileOutput | None, plan: memory.MemoryPlan) -> AnySizeOutput:
        if file is None:
            return AnySizeOutput(images=images, info=infos, memory_plan=plan)
        return AnySizeOutput(images=[], info=infos, files=images, memory_plan=plan)

    def _denoiser(self, pipe, prompt: str, negative_prompt: str | None, guidance_scale: float, size: Size,
                  **extra) -> UNetTileDenoiser:
        """Prompt embeddings through diffusers' own ``encode_prompt`` (SD or SDXL), wrapped for tiles."""
        do_cfg = guidance_scale > 1.0
        device = pipe.unet.device
        added = negative_added = None
        if models.model_kind(pipe).is_sdxl:
            pos, neg, pooled, neg_pooled = pipe.encode_prompt(
                prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=do_cfg,
                negative_prompt=negative_prompt)
            w, h = size
            ids = torch.tensor([[h, w, 0, 0, h, w]], device=device, dtype=pos.dtype)
            added = {"text_embeds": pooled, "time_ids": ids}
            negative_added = {"text_embeds": neg_pooled, "time_ids": ids} if do_cfg else None
        else:
            pos, neg = pipe.encode_prompt(prompt, device, 1, do_cfg, negative_prompt)
        return UNetTileDenoiser(pipe.unet, pos, negative_prompt_embeds=neg, guidance_scale=guidance_scale,
                                added_cond_kwargs=added, negative_added_cond_kwargs=negative_added, **extra)

    def _callback(self, callback: Callable | None, stage: str):
        """Adapt a diffusers-style ``callback_on_step_end`` to the sampler's ``(step, t, latents)``."""
        if callback is None:
            return None

        def step_end(i, t, latents):
            out = callback(self, i, t, {"latents": latents, "stage": stage})
            return out.get("latents") if out else None

        return step_end

    def _noise(self, shape, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
        """Gaussian noise from the caller's generator (drawn on the generator's device, in float32)."""
        noise = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
        return noise.to(self.device, dtype)

    def _sample(self, pipe, denoiser, latents, tiles: TilingConfig, generator, callback, stage: str,
                desc: str, timesteps=None) -> torch.Tensor:
        """One sampling phase; with a run directory, skipped when done there, resumed from its last
        checkpoint, and checkpointed as it goes."""
        step_end = self._callback(callback, stage)
        kw = dict(generator=generator, progress=self.progress, desc=desc, timesteps=timesteps)
        run = self._run
        if run is None:
            return sample_tiled(denoiser, latents, pipe.scheduler, tiles, callback_on_step_end=step_end, **kw)
        phase = run.next_phase()
        done = run.load(phase, "done")
        if done is not None:  # the set-up before this call drew its noise as before; jump to the phase's end
            generator.set_state(done[0]["generator"])
            return done[0]["latents"].to(latents)
        plans, start = make_plan_generator(generator), 0  # the plans as first drawn, before any restore
        saved = run.load(phase, "step")
        if saved is not None:
            tensors, meta = saved
            load_scheduler_state(pipe.scheduler, tensors, meta["scheduler"], latents.device)
            generator.set_state(tensors["generator"])
            latents, start = tensors["latents"].to(latents), meta["step"]

        def checkpointing(i, t, x):
            replaced = step_end(i, t, x) if step_end is not None else None
            x = x if replaced is None else replaced
            if run.stop_requested or (i + 1) % run.every == 0:
                run.save_step(phase, i + 1, x, pipe.scheduler, generator)
            if run.stop_requested:
                raise RunInterrupted(f"interrupted at step {i + 1} of {phase}; the run continues from there")
            return replaced

        latents = sample_tiled(denoiser, latents, pipe.scheduler, tiles, callback_on_step_end=checkpointing,
                               start=start, plan_generator=plans, **kw)
        run.save_done(phase, latents, generator)
        return latents

    def _decode(self, vae, latents: torch.Tensor, size: Size, out: stream.Raster | None = None):
        """Latents -> uint8 (H, W, 3) cropped to ``size`` through the tiled VAE, or tile by tile into
        ``out`` (a Raster of ``size``, which crops), with the memory plan's VAE tile. Up to 128 latent px
        a side the GroupNorm statistics come from one untiled run over the whole latent (exact, about two
        decodes); above, from a downsampled copy (fast mode); :func:`anysize.memory.decode_kwargs`."""
        scale, shift = vae.config.scaling_factor, getattr(vae.config, "shift_factor", None)

        def unscale(x: torch.Tensor) -> torch.Tensor:
            x = x / scale
            return x + shift if shift else x

        scaled = unscale(latents) if torch.is_tensor(latents) else bands.Mapped(latents, unscale)
        height, width = scaled.shape[-2:]
        array = tiled_decode(vae, scaled, mode="fast", progress=self.progress and max(height, width) > 128, out=out,
                             **memory.decode_kwargs(vae, height, width, self._vae_tile))
        return out if out is not None else array[: size[1], : size[0]]

    # ------------------------------------------------------------------ stages
    def _stage1(self, prompt, negative_prompt, plan: Plan, steps, guidance_scale, tiles, generator, callback):
        """Base model at the bucket (untiled), or at the request's ratio (panorama), tiled or not."""
        pipe, (w, h) = self.base, plan.base
        den = self._denoiser(pipe, prompt, negative_prompt, guidance_scale, plan.base)
        pipe.scheduler.set_timesteps(steps)
        shape = (1, pipe.unet.config.in_channels, h // self.base_factor, w // self.base_factor)
        latents = self._noise(shape, generator, pipe.unet.dtype) * pipe.scheduler.init_noise_sigma
        config = tiles if plan.tiled else replace(tiles, method="none")
        desc = f"stage 1 ({'panorama' if plan.panorama else 'bucket'} {w}x{h})"
        return self._sample(pipe, den, latents, config, generator, callback, "base", desc)

    def _stage2(self, image: PIL.Image.Image, passes, target: Size, opts: _Stage2, output_type: str, color_fix,
                file: _FileOutput | None = None):
        """Every upscaling pass, then colour fix and the output type; no pass: a plain resize. With
        ``file``, the last pass decodes into a scratch Raster beside the target and is written from it.
        Banded passes' files (:meth:`_band_work`) live until the end of this call."""
        with contextlib.ExitStack() as self._scratch:
            return self._stage2_passes(image, passes, target, opts, output_type, color_fix, file)

    def _stage2_passes(self, image: PIL.Image.Image, passes, target: Size, opts: _Stage2, output_type: str,
                       color_fix, file: _FileOutput | None):
        reference, array = image, None
        run = self._sr_pass if self.upscaler is not None else self._img2img_pass
        for k, size in enumerate(passes):
            last = k == len(passes) - 1
            desc = f"stage 2 pass {k + 1}/{len(passes)} ({size[0]}x{size[1]})"
            latents, vae = run(image, size, opts, desc)
            if last and file is not None:
                return self._write_file(vae, latents, size, reference, color_fix, file)
            if last and output_type == "latent":
                return latents if torch.is_tensor(latents) else latents.to_tensor()
            array = self._decode(vae, latents, size)
            if not last:  # the next pass reads the PIL image; the array would only sit in memory
                image, array = PIL.Image.fromarray(array), None
        if array is None:
            array = np.array(_resize(image, target))
        elif color_fix == "adain":
            array = adain_color_fix(array, reference)
        if file is not None:
            return save_image(array, file.path, file.metadata)
        if output_type == "pil":
            return PIL.Image.fromarray(array)
        if output_type == "np":
            return array.astype(np.float32) / 255.0
        if output_type == "pt":
            return torch.from_numpy(array).permute(2, 0, 1).float().div(255.0)
        return array  # "latent" with no pass: nothing to enlarge

    def _write_file(self, vae, latents: torch.Tensor, size: Size, reference: PIL.Image.Image, color_fix,
                    file: _FileOutput):
        """Decode tile by tile into a scratch Raster (on disk, beside the target), colour-fix it band by
        band, then write the file from it: the whole image is never in memory for .tif and .dzi."""
        path = Path(file.path)
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.stem}.decode.") as scratch:
            with stream.Raster(Path(scratch) / "image.raw", size[1], size[0]) as raster:
                self._decode(vae, latents, size, out=raster)
                if color_fix == "adain":
                    adain_color_fix(raster, reference)
                return save_image(raster, path, file.metadata)

    def _sr_pass(self, image: PIL.Image.Image, size: Size, opts: _Stage2, desc: str):
        """One pass of an x4 super-resolution model landing on ``size``: the conditioning image is the
        input resized to size / 4 (rounded up), noised to ``noise_level``; the latent has its size."""
        pipe = self.upscaler
        f = vae_scale_factor(pipe.vae)
        lat_w, lat_h = math.ceil(size[0] / f), math.ceil(size[1] / f)
        level = torch.tensor([opts.noise_level], device=self.device, dtype=torch.long)
        dtype = pipe.unet.dtype
        tiles = replace(opts.tiling, tile_size=opts.tile_size or int(pipe.unet.config.sample_size))
        shape = (1, pipe.vae.config.latent_channels, lat_h, lat_w)
        if memory.banded_sampling(lat_h, lat_w, opts.latent_memory, tiles.method):
            return self._sr_pass_banded(image, size, shape, level, tiles, opts, desc), pipe.vae
        low = _image_tensor(_resize(image, (lat_w, lat_h)), self.device)
        low = pipe.low_res_scheduler.add_noise(low, self._noise(low.shape, opts.generator, torch.float32), level)
        den = self._denoiser(pipe, opts.prompt, opts.negative_prompt, opts.guidance_scale, size,
                             cond=low.to(dtype), class_labels=level)
        pipe.scheduler.set_timesteps(opts.steps)
        latents = self._noise(shape, opts.generator, dtype)
        latents = self._sample(pipe, den, latents * pipe.scheduler.init_noise_sigma, tiles, opts.generator,
                               opts.callback, "upscale", desc)
        return latents, pipe.vae

    def _sr_pass_banded(self, image: PIL.Image.Image, size: Size, shape, level: torch.Tensor, tiles: TilingConfig,
                        opts: _Stage2, desc: str) -> bands.DiskTensor:
        """:meth:`_sr_pass` with the conditioning image and the latents on disk, written band by band
        from the same noise draws in the same order (so the same values as in memory)."""
        pipe, (_, _, lat_h, lat_w) = self.upscaler, shape
        dtype = pipe.unet.dtype
        work = self._band_work(shape, tiles.tile_size, dtype, opts)
        cond = self._scratch.enter_context(bands.DiskTensor(work.dir / "cond.raw", (1, 3, lat_h, lat_w), dtype))
        pixels = np.asarray(_resize(image, (lat_w, lat_h)).convert("RGB"))
        noise = bands.NoiseStream(3 * lat_h * lat_w, opts.generator)

        def low_rows(b: int, c: int, top: int, bottom: int) -> torch.Tensor:  # as _image_tensor, then add_noise
            x = torch.from_numpy(pixels[top:bottom, :, c].astype(np.float32) / 127.5 - 1.0).to(self.device)
            return pipe.low_res_scheduler.add_noise(x, noise.take(x.numel()).view_as(x).to(self.device), level)

        bands.fill_planes(cond, low_rows)
        del pixels, low_rows  # on disk now
        den = self._denoiser(pipe, opts.prompt, opts.negative_prompt, opts.guidance_scale, size, cond=cond,
                             class_labels=level)
        pipe.scheduler.set_timesteps(opts.steps)
        sigma, noise = pipe.scheduler.init_noise_sigma, bands.NoiseStream(math.prod(shape), opts.generator)
        bands.fill_planes(work.init, lambda b, c, top, bottom: noise.take((bottom - top) * lat_w)
                          .view(bottom - top, lat_w).to(self.device, dtype) * sigma)
        return self._sample_banded(pipe, den, work, tiles, opts, desc)

    def _band_work(self, shape, tile: int, dtype: torch.dtype, opts: _Stage2) -> bands.BandWork:
        """The files of a banded phase: in the run directory (a phase of it, durable, resumable), or in a
        scratch directory (beside the output file, else in the temp directory) removed after the call."""
        run, stack = self._run, self._scratch
        if run is not None:
            directory = run.path / f"{run.next_phase()}.bands"
        else:
            directory = Path(tempfile.mkdtemp(prefix=".anysize-bands.", dir=opts.scratch))
            stack.callback(shutil.rmtree, directory, ignore_errors=True)
        rows = bands.band_rows(shape, minimum=tile)
        return stack.enter_context(bands.BandWork(directory, shape, rows=rows, durable=run is not None, dtype=dtype))

    def _sample_banded(self, pipe, denoiser, work: bands.BandWork, tiles: TilingConfig, opts: _Stage2, desc: str,
                       timesteps=None) -> bands.DiskTensor:
        """:func:`anysize.core.sampler.sample_banded` for one pass; with a run directory, continued from its
        last commit, and Ctrl-C stops after the next one."""
        run = self._run

        def stop(step: int) -> None:
            if run is not None and run.stop_requested:
                raise RunInterrupted(f"interrupted at step {step} of {work.dir.name}; the run continues from there")

        return sample_banded(denoiser, work, pipe.scheduler, tiles, generator=opts.generator,
                             callback_on_step_end=self._callback(opts.callback, "upscale"), on_commit=stop,
                             progress=self.progress, desc=desc, timesteps=timesteps, device=self.device)

    def _img2img_pass(self, image: PIL.Image.Image, size: Size, opts: _Stage2, desc: str):
        """One img2img pass with the base model: resize to ``size``, encode with the tiled VAE, noise to
        ``strength``, denoise tiled (Tiled Diffusion / Ultimate SD Upscale style)."""
        pipe, f = self.base, self.base_factor
        lat_w, lat_h = math.ceil(size[0] / f), math.ceil(size[1] / f)
        dtype = pipe.unet.dtype
        pixels = _Resized(image, (lat_w * f, lat_h * f))
        init = tiled_encode(pipe.vae, pixels, mode="fast").to(self.device, dtype) * pipe.vae.config.scaling_factor
        scheduler = pipe.scheduler
        scheduler.set_timesteps(opts.steps)
        start = min(opts.steps - 1, int(round(opts.steps * (1 - opts.strength))))
        timesteps = scheduler.timesteps[start * scheduler.order :]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start * scheduler.order)
        den = self._denoiser(pipe, opts.prompt, opts.negative_prompt, opts.guidance_scale, size)
        if memory.banded_sampling(lat_h, lat_w, opts.latent_memory, opts.tiling.method):
            work = self._band_work(init.shape, opts.tiling.tile_size, dtype, opts)
            noise, first = bands.NoiseStream(init.numel(), opts.generator), timesteps[:1]

            def noisy_rows(b: int, c: int, top: int, bottom: int) -> torch.Tensor:
                rows = init[b : b + 1, c : c + 1, top:bottom]
                fresh = noise.take(rows.numel()).view_as(rows).to(self.device, dtype)
                return scheduler.add_noise(rows, fresh, first)[0, 0]

            bands.fill_planes(work.init, noisy_rows)
            del init
            return self._sample_banded(pipe, den, work, opts.tiling, opts, desc, timesteps), pipe.vae
        noisy = scheduler.add_noise(init, self._noise(init.shape, opts.generator, dtype), timesteps[:1])
        latents = self._sample(pipe, den, noisy, opts.tiling, opts.generator, opts.callback, "upscale", desc,
                               timesteps=timesteps)
        return latents, pipe.vae
