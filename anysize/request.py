"""One call's arguments, once: :class:`Request` holds, validates and serializes what a caller asked for.

:meth:`anysize.AnySizePipeline.__call__`, :meth:`~anysize.AnySizePipeline.upscale` and the command line
all build a Request; :mod:`anysize.plan` turns it into a :class:`~anysize.plan.RunPlan`. Validation
needs two facts of the loaded models (whether there is a base model, the upscaler's highest noise
level), so it is a method taking them rather than a check at construction: a Request read back from a
run directory's JSON is checked against the models of the resuming pipeline.

This module does not import torch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any

from .buckets import BEYOND_BUCKETS
from .core.grounding import MAX_OBJECTS
from .core.tiling import METHODS, TilingConfig
from .regions import Region, normalize

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
COLOR_FIXES = ("backproject", "adain", "none")
CALLS = ("generate", "upscale")
MIN_SIDE = 8
TILE = "tile"  # a control image that is each stage-2 pass's own input (ControlNet-tile upscaling)
_CONTROL_FIELDS = ("control_images", "controlnet_conditioning_scale", "control_guidance_start",
                   "control_guidance_end")

# What decides the sampled values (and so what a run directory's checkpoints belong to): not the tile
# batch, the VAE tile, the budgets, the output's type or file, which change no sampled value.
LONG_PROMPTS = ("cut", "chunk")
_SAMPLING_FIELDS = ("call", "prompt", "negative_prompt", "width", "height", "num_inference_steps",
                    "upscale_inference_steps", "guidance_scale", "upscale_guidance_scale", "tiling", "tile_size",
                    "noise_level", "strength", "latent_memory", "panorama", "source_size", "source_digest")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _or(value, default):
    """``value``, or ``default`` when it is None (0 stays 0, so it is checked)."""
    return default if value is None else value


@dataclass(frozen=True)
class Request:
    """What one call asked for (see :meth:`anysize.AnySizePipeline.__call__` for each argument).

    ``call`` is "generate" (text to image: both stages) or "upscale" (stage 2 alone, from an image of
    ``source_size``; ``num_inference_steps`` is then None and ``upscale_inference_steps`` /
    ``upscale_guidance_scale`` are the call's steps and guidance). ``tiling`` is a method name or a
    :class:`~anysize.core.tiling.TilingConfig`; ``tile_size`` and ``tile_batch_size`` may also be given
    on their own (None: the model's native sample size and the memory planner's choice).
    """

    prompt: str | list[str] = ""
    width: int = 1024
    height: int = 1024
    call: str = "generate"
    negative_prompt: str | None = None
    num_inference_steps: int | None = 30
    upscale_inference_steps: int | None = None  # None: the stage-2 model's (AnySizePipeline.default_upscale_steps)
    guidance_scale: float = 7.5
    upscale_guidance_scale: float | None = None
    tiling: str | TilingConfig = "fstd"
    tile_size: int | None = None
    tile_batch_size: int | None = None
    vae_tile_size: int | None = None
    max_memory: int | None = None
    latent_memory: int | None = None
    output_type: str = "pil"
    noise_level: int = 20
    strength: float = 0.3
    color_fix: str | None = "backproject"
    panorama: str = "auto"  # beyond the buckets: "stretch", or "direct" when a ControlNet steers stage 1
    source_size: tuple[int, int] | None = None  # upscale: the input image's (width, height)
    source_digest: str | None = None  # upscale: a hash of the input's pixels (run directories compare it)
    output_path: str | None = None
    output_metadata: dict | None = field(default=None, hash=False)
    run_dir: str | None = None
    checkpoint_every: int = 1
    num_images_per_prompt: int = 1
    eta: float | None = None  # DDIM's eta (None: the scheduler's default, 0)
    clip_skip: int | None = None  # text-encoder layers to skip from the end, as diffusers' clip_skip
    guidance_rescale: float = 0.0  # diffusers' guidance_rescale (Lin et al. 2023, sec. 3.4), in CFG phases
    prompt_embeds: str | None = None  # a digest of the caller's prompt embeddings (prompt is then "" each)
    long_prompt: str = "cut"  # past the text encoder's window: "cut" (diffusers, with a warning) or "chunk" (A1111)
    # GLIGEN: phrases grounded to boxes (x0, y0, x1, y1 in fractions of the image), as diffusers names them
    gligen_phrases: tuple = field(default=(), hash=False)
    gligen_boxes: tuple = field(default=(), hash=False)
    gligen_scheduled_sampling_beta: float = 0.3
    true_cfg_scale: float = 1.0  # FLUX: diffusers' true CFG with the negative prompt (> 1), off at 1
    cross_attention_kwargs: dict | None = field(default=None, hash=False)  # to every UNet call: {"scale": LoRA scale}
    regions: tuple = field(default=(), hash=False)  # region prompts (anysize.regions); validate() normalizes
    # ControlNet: per ControlNet of the pipeline, its control image's digest (or TILE) and its settings;
    # a number for all of them or one per ControlNet (validate() makes them tuples)
    control_images: tuple = ()
    controlnet_conditioning_scale: float | tuple = 1.0
    control_guidance_start: float | tuple = 0.0
    control_guidance_end: float | tuple = 1.0

    @classmethod
    def of(cls, arguments: dict[str, Any], **overrides) -> Request:
        """A Request from a call's ``locals()``: the names that are Request fields, then ``overrides``."""
        names = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in arguments.items() if k in names}, **overrides})

    # ------------------------------------------------------------------ derived values
    @property
    def size(self) -> tuple[int, int]:
        return (self.width, self.height)

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @property
    def stage2_guidance(self) -> float:
        return self.guidance_scale if self.upscale_guidance_scale is None else self.upscale_guidance_scale

    @property
    def color_fixed(self) -> bool:
        return self.color_fix in ("adain", "backproject")

    def tiling_config(self) -> TilingConfig:
        """The tiling as a :class:`TilingConfig`, with ``tile_size`` / ``tile_batch_size`` given on their own
        filled in (None stays None: the model's and the planner's to choose)."""
        config = self.tiling if isinstance(self.tiling, TilingConfig) else TilingConfig(method=self.tiling)
        return dataclasses.replace(config, tile_size=self.tile_size or config.tile_size,
                                   tile_batch_size=self.tile_batch_size or config.tile_batch_size)

    @property
    def method(self) -> str:
        return self.tiling.method if isinstance(self.tiling, TilingConfig) else self.tiling

    # ------------------------------------------------------------------ checks
    def validate(self, *, has_base: bool = True, max_noise_level: int = 1000, controlnets: int = 0) -> Request:
        """Check every argument before any compute; each message names the argument, its value and the
        rule. ``has_base``: the pipeline has a base model; ``max_noise_level``: its upscaler's highest
        noise level; ``controlnets``: how many ControlNets it holds. Returns the request (normalized:
        region boxes as fractions, ControlNet settings one per ControlNet), so calls chain."""
        generate = self.call == "generate"
        if self.call not in CALLS:
            raise ValueError(f"call={self.call!r}: must be one of {', '.join(CALLS)}")
        if generate and not has_base:
            raise ValueError("base=None: text-to-image needs a base model; this pipeline only has an upscaler")
        prompt = self.prompt
        if not generate and not isinstance(prompt, str):
            raise ValueError(f"prompt={prompt!r}: upscale takes one image and one prompt string")
        if not isinstance(prompt, str) and not (isinstance(prompt, list) and prompt
                                                and all(isinstance(p, str) for p in prompt)):
            raise ValueError(f"prompt={prompt!r}: must be a string or a non-empty list of strings")
        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            raise ValueError(f"negative_prompt={self.negative_prompt!r}: must be a string or None")
        steps = self.num_inference_steps
        for name, value, minimum in (("width", self.width, MIN_SIDE), ("height", self.height, MIN_SIDE),
                                     ("num_inference_steps", 1 if steps is None else steps, 1),
                                     ("upscale_inference_steps", _or(self.upscale_inference_steps, 1), 1),
                                     ("tile_batch_size", _or(self.tile_batch_size, 1), 1),
                                     ("vae_tile_size", _or(self.vae_tile_size, 8), 8),
                                     ("noise_level", self.noise_level, 0),
                                     ("max_memory", _or(self.max_memory, 1), 1),
                                     ("latent_memory", _or(self.latent_memory, 0), 0),
                                     ("checkpoint_every", self.checkpoint_every, 1),
                                     ("num_images_per_prompt", self.num_images_per_prompt, 1)):
            if not _is_int(value) or value < minimum:
                raise ValueError(f"{name}={value!r}: must be an integer >= {minimum}")
        if self.panorama not in BEYOND_BUCKETS:
            raise ValueError(f"panorama={self.panorama!r}: must be one of {', '.join(BEYOND_BUCKETS)}")
        if self.noise_level > max_noise_level:
            raise ValueError(f"noise_level={self.noise_level}: must be <= the upscaler's max_noise_level "
                             f"{max_noise_level}")
        if self.tile_size is not None and (not _is_int(self.tile_size) or self.tile_size < 8):
            raise ValueError(f"tile_size={self.tile_size!r}: must be None (the model's native size) or an "
                             "integer >= 8 latent px")
        for name, value in (("guidance_scale", self.guidance_scale),
                            ("upscale_guidance_scale", self.upscale_guidance_scale)):
            if value is not None and not (_is_number(value) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}={value!r}: must be a finite number >= 0")
        self._check_tiling()
        if self.output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={self.output_type!r}: must be one of {', '.join(OUTPUT_TYPES)}")
        if not _is_number(self.strength) or not 0 < self.strength <= 1:
            raise ValueError(f"strength={self.strength!r}: must be a number in (0, 1]")
        if self.color_fix is not None and self.color_fix not in COLOR_FIXES:
            raise ValueError(f"color_fix={self.color_fix!r}: must be one of {', '.join(COLOR_FIXES)} or None")
        if not generate and self.source_size is None:
            raise ValueError("source_size: an upscale request needs the input image's (width, height)")
        if self.eta is not None and not (_is_number(self.eta) and 0 <= self.eta <= 1):
            raise ValueError(f"eta={self.eta!r}: must be a number in [0, 1] or None")
        if self.clip_skip is not None and (not _is_int(self.clip_skip) or self.clip_skip < 0):
            raise ValueError(f"clip_skip={self.clip_skip!r}: must be an integer >= 0 or None")
        self._check_gligen()
        if self.long_prompt not in LONG_PROMPTS:
            raise ValueError(f"long_prompt={self.long_prompt!r}: must be one of {', '.join(LONG_PROMPTS)}")
        if not (_is_number(self.true_cfg_scale) and 1 <= self.true_cfg_scale < math.inf):
            raise ValueError(f"true_cfg_scale={self.true_cfg_scale!r}: must be a number >= 1 (1: off)")
        if not (_is_number(self.guidance_rescale) and 0 <= self.guidance_rescale <= 1):
            raise ValueError(f"guidance_rescale={self.guidance_rescale!r}: must be a number in [0, 1]")
        kwargs = self.cross_attention_kwargs
        if kwargs is not None and not (isinstance(kwargs, dict) and set(kwargs) <= {"scale"}
                                       and all(_is_number(v) and math.isfinite(v) for v in kwargs.values())):
            raise ValueError(f"cross_attention_kwargs={kwargs!r}: anysize passes {{'scale': number}} (the LoRA "
                             "scale); set other attention options on the model itself")
        if self.num_images_per_prompt > 1 and not generate:
            raise ValueError("num_images_per_prompt: upscale makes one image from one input")
        for name in ("output_path", "run_dir"):
            if self.num_images_per_prompt > 1 and getattr(self, name) is not None:
                raise ValueError(f"num_images_per_prompt={self.num_images_per_prompt}: {name} holds one image; "
                                 "run once per image (the CLI's --count writes one file per image)")
        self._check_output()
        regions = normalize(self.regions, self.width, self.height)
        checked = dataclasses.replace(self, regions=regions, **self._check_control(controlnets))
        return self if checked == self else checked

    def _check_control(self, controlnets: int) -> dict[str, tuple]:
        """The ControlNet fields, one entry per ControlNet, checked."""
        images = tuple(self.control_images or ())
        if not controlnets:
            if images:
                raise ValueError(f"control_image: {len(images)} given, but this pipeline has no ControlNet "
                                 "(from_pretrained(controlnet=...); CLI: --controlnet PATH)")
            return {}
        if len(images) != controlnets:
            raise ValueError(f"control_image: {len(images)} given for {controlnets} ControlNet"
                             f"{'s' if controlnets > 1 else ''}; pass one per ControlNet, in order (an image, or "
                             f"'{TILE}': each stage-2 pass's input)")
        out: dict[str, tuple] = {"control_images": images}
        for name in _CONTROL_FIELDS[1:]:
            value = getattr(self, name)
            values = tuple(value) if isinstance(value, (list, tuple)) else (value,) * controlnets
            if len(values) != controlnets:
                raise ValueError(f"{name}={value!r}: {len(values)} values for {controlnets} ControlNets; "
                                 "give one number or one per ControlNet")
            for v in values:
                if not (_is_number(v) and math.isfinite(v) and v >= 0) or (name != _CONTROL_FIELDS[1] and v > 1):
                    rule = "a finite number >= 0" if name == _CONTROL_FIELDS[1] else "a number in [0, 1]"
                    raise ValueError(f"{name}={value!r}: each must be {rule}")
            out[name] = tuple(float(v) for v in values)
        for k, (start, end) in enumerate(zip(out["control_guidance_start"], out["control_guidance_end"])):
            if start >= end:
                raise ValueError(f"control_guidance_start={start} >= control_guidance_end={end} (ControlNet {k}): "
                                 "the start must come before the end")
        return out

    @property
    def controlled(self) -> bool:
        return bool(self.control_images)

    def _check_tiling(self) -> None:
        tiling = self.tiling
        if not isinstance(tiling, TilingConfig):
            if tiling not in METHODS:
                raise ValueError(f"tiling={tiling!r}: must be one of {', '.join(METHODS)} or a TilingConfig")
            return
        for name in ("tile_size", "tile_batch_size"):
            given, inside = getattr(self, name), getattr(tiling, name)
            if given is not None and inside is not None and given != inside:
                raise ValueError(f"{name}={given}: differs from the TilingConfig's {name}={inside}; give it once")

    def _check_output(self) -> None:
        if self.output_path is None:
            if self.output_metadata is not None:
                raise ValueError("output_metadata: is stored in the output file; pass output_path too")
            return
        if self.output_type == "latent":
            raise ValueError("output_path: writes an image; output_type='latent' returns latents instead, pass one")
        if not isinstance(self.prompt, str):
            raise ValueError("output_path: writes one image; pass one prompt string, not a list")
        if self.output_metadata is not None and not isinstance(self.output_metadata, dict):
            raise ValueError(f"output_metadata={self.output_metadata!r}: must be a dict or None")

    # ------------------------------------------------------------------ JSON
    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (a TilingConfig becomes a dict of its fields); :meth:`from_json` reverses it."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        if isinstance(self.tiling, TilingConfig):
            out["tiling"] = dataclasses.asdict(self.tiling)
        for name in ("output_path", "run_dir"):
            out[name] = None if out[name] is None else str(out[name])
        if self.source_size is not None:
            out["source_size"] = list(self.source_size)
        out["regions"] = [r.to_json() if isinstance(r, Region) else list(r) for r in self.regions or ()]
        out["gligen_phrases"] = list(self.gligen_phrases)
        out["gligen_boxes"] = [list(b) for b in self.gligen_boxes]
        for name in _CONTROL_FIELDS:
            if isinstance(out[name], tuple):
                out[name] = list(out[name])
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Request:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"request: unknown fields {', '.join(unknown)}")
        values = dict(data)
        if isinstance(values.get("tiling"), dict):
            values["tiling"] = TilingConfig(**values["tiling"])
        if values.get("source_size") is not None:
            values["source_size"] = tuple(values["source_size"])
        values["gligen_phrases"] = tuple(values.get("gligen_phrases") or ())
        values["gligen_boxes"] = tuple(tuple(b) for b in values.get("gligen_boxes") or ())
        if isinstance(values.get("prompt"), list):
            values["prompt"] = list(values["prompt"])
        values["regions"] = tuple(Region.from_json(r) for r in values.get("regions") or ())
        for name in _CONTROL_FIELDS:
            if isinstance(values.get(name), list):
                values[name] = tuple(values[name])
        return cls(**values)

    def _check_gligen(self) -> None:
        phrases, boxes = self.gligen_phrases, self.gligen_boxes
        if len(phrases) != len(boxes):
            raise ValueError(f"gligen_phrases and gligen_boxes: {len(phrases)} phrases for {len(boxes)} boxes; "
                             "one box each")
        if len(phrases) > MAX_OBJECTS:
            raise ValueError(f"gligen_phrases: {len(phrases)}; GLIGEN grounds at most {MAX_OBJECTS}")
        for k, (phrase, box) in enumerate(zip(phrases, boxes)):
            if not isinstance(phrase, str) or not phrase.strip():
                raise ValueError(f"gligen_phrases[{k}]={phrase!r}: must be a non-empty text")
            ok = (isinstance(box, (list, tuple)) and len(box) == 4 and all(_is_number(v) and 0 <= v <= 1 for v in box)
                  and box[0] < box[2] and box[1] < box[3])
            if not ok:
                raise ValueError(f"gligen_boxes[{k}]={box!r}: must be (x0, y0, x1, y1), fractions of the image in "
                                 "[0, 1] with x0 < x1 and y0 < y1")
        beta = self.gligen_scheduled_sampling_beta
        if not (_is_number(beta) and 0 <= beta <= 1):
            raise ValueError(f"gligen_scheduled_sampling_beta={beta!r}: must be a number in [0, 1]")

    def sampling_identity(self) -> dict[str, Any]:
        """The fields that decide the sampled values, as JSON: what a run directory holds checkpoints of."""
        data = self.to_json()
        # absent when unused: what earlier run directories hold
        regions = {"regions": data["regions"]} if self.regions else {}
        control = {name: data[name] for name in _CONTROL_FIELDS} if self.controlled else {}
        extra = {n: data[n] for n in ("eta", "clip_skip", "cross_attention_kwargs", "prompt_embeds")
                 if data[n] is not None}
        extra |= {"guidance_rescale": data["guidance_rescale"]} if self.guidance_rescale else {}
        extra |= {"long_prompt": data["long_prompt"]} if self.long_prompt != "cut" else {}
        extra |= {"true_cfg_scale": data["true_cfg_scale"]} if self.true_cfg_scale != 1 else {}
        extra |= {n: data[n] for n in ("gligen_phrases", "gligen_boxes", "gligen_scheduled_sampling_beta")} \
            if self.gligen_phrases else {}
        return {name: data[name] for name in _SAMPLING_FIELDS} | regions | control | extra
