"""Loading models: one path for the embedded default model and a user's Stable Diffusion weights.

Everything loads through diffusers: a local diffusers directory (``model_index.json``), a single-file
``.safetensors`` checkpoint (``from_single_file``), or a hub id where a network exists. Weights load
from safetensors; pickle checkpoints (``.ckpt``, ``.bin``, ``.pt``, ``.pth``) can run arbitrary code
and are refused unless ``allow_pickle=True``.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .core import nets
from .core.devices import default_device  # noqa: F401  (re-exported: models.default_device)

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")
DEFAULT_MODEL_DIR = Path(__file__).parent / "default_model"


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message is one line naming what was tried."""


SETTINGS_FILE = "anysize.json"  # optional, beside model_index.json: how the model wants to be run


@dataclass(frozen=True)
class ModelSettings:
    """What a model directory's optional ``anysize.json`` says about running it (diffusers has no place
    for it). ``upscale_inference_steps``: the steps of a stage-2 pass with this model when the call
    gives none (None: the pipeline's default, 20). ``text``: False for a model trained on the empty
    prompt only (the default upscaler): it then gets the empty prompt, no negative prompt and no
    regions, whatever the call's, since any other text is outside what it learned."""

    upscale_inference_steps: int | None = None
    text: bool = True


def read_settings(root: str | os.PathLike) -> ModelSettings:
    """The :class:`ModelSettings` of a diffusers directory (the defaults where it has no ``anysize.json``);
    one-line :class:`ModelLoadError` for a file that is not what it should be."""
    path = Path(root) / SETTINGS_FILE
    if not path.is_file():
        return ModelSettings()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: not readable JSON ({_first_line(exc)})") from exc
    known = {"upscale_inference_steps", "text"}
    if not isinstance(data, dict) or set(data) - known:
        raise ModelLoadError(f"{path}: must be an object with only {', '.join(sorted(known))}")
    steps, text = data.get("upscale_inference_steps"), data.get("text", True)
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
        raise ModelLoadError(f"{path}: upscale_inference_steps={steps!r} must be an integer >= 1")
    if not isinstance(text, bool):
        raise ModelLoadError(f"{path}: text={text!r} must be true or false")
    return ModelSettings(upscale_inference_steps=steps, text=text)


def settings_of(pipe) -> ModelSettings:
    """The settings a loaded pipeline came with (:func:`load_pipeline` reads them; a pipeline built
    elsewhere has the defaults)."""
    return getattr(pipe, "anysize_settings", None) or ModelSettings()


def default_dtype(device: torch.device) -> torch.dtype:
    """float16 on accelerators (the VAE is upcast where it overflows), float32 on the CPU."""
    return torch.float32 if device.type == "cpu" else torch.float16


def parse_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if name is None or name == "auto":
        return default_dtype(device)
    if isinstance(name, torch.dtype):
        return name
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if name not in table:
        raise ValueError(f"dtype={name!r}: must be one of {', '.join(table)} or 'auto'")
    return table[name]


@dataclass
class ModelKind:
    """What a loaded diffusers pipeline can do for anysize."""

    is_upscaler: bool  # SD x4-upscaler layout: UNet in_channels = latent + 3, noise level as class label
    is_sdxl: bool  # two text encoders and added time ids
    family: str = "sd"  # "sd" (1.x / 2.x), "sdxl", "sd-x4" (the upscaler), "sd3" or "flux"

    @property
    def is_transformer(self) -> bool:
        """SD3 and FLUX: a diffusion transformer on a flow-matching schedule."""
        return self.family in ("sd3", "flux")


def model_kind(pipe) -> ModelKind:
    net = nets.of(pipe)
    if nets.is_transformer(net):
        return ModelKind(is_upscaler=False, is_sdxl=False, family=nets.kind(net))
    latent = pipe.vae.config.latent_channels
    upscaler = net.config.in_channels == latent + 3 and hasattr(pipe, "low_res_scheduler")
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    return ModelKind(is_upscaler=upscaler, is_sdxl=sdxl, family="sd-x4" if upscaler else "sdxl" if sdxl else "sd")


def _first_line(exc: Exception) -> str:
    """An exception's message as one line (diffusers and peft raise many kinds, over many lines)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _refuse_pickle(path: Path, allow_pickle: bool) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
        raise ModelLoadError(
            f"{path}: a pickle checkpoint can run arbitrary code when loaded; convert it to .safetensors, "
            "or pass allow_pickle=True (CLI: --allow-pickle) if you trust it"
        )


def _dir_has_only_pickle(path: Path) -> bool:
    weights = [p for p in path.rglob("*") if p.suffix.lower() in (".safetensors", *PICKLE_SUFFIXES)]
    return bool(weights) and not any(p.suffix.lower() == ".safetensors" for p in weights)


def _check_weights(path: Path, role: str, allow_pickle: bool) -> None:
    """The safety rule every loader applies before diffusers reads ``path``: a directory must hold
    safetensors weights, a file must be ``.safetensors`` (pickles only with ``allow_pickle``)."""
    if path.is_dir():
        if _dir_has_only_pickle(path) and not allow_pickle:
            raise ModelLoadError(
                f"{role} {path}: holds only pickle weights (.bin/.ckpt), which can run arbitrary code when "
                "loaded; convert them to .safetensors, or pass allow_pickle=True (CLI: --allow-pickle)")
        return
    _refuse_pickle(path, allow_pickle)
    if path.suffix.lower() != ".safetensors" and not allow_pickle:
        raise ModelLoadError(f"{role} {path}: not a .safetensors checkpoint or a diffusers directory")


def _is_hub_id(source) -> bool:
    """``owner/name``, not a local path."""
    return str(source).count("/") == 1 and not str(source).startswith((".", "/", "~"))


def _no_safety_checker(path: Path) -> dict:
    """Keywords that skip loading an SD directory's safety checker (a 303M-parameter CLIP that anysize
    never runs; it filters nothing in a tiled output); none for pipelines without one."""
    try:
        index = json.loads((path / "model_index.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in index else {}


def _without_t5(path: Path, role: str) -> dict:
    """The from_pretrained keywords that leave an SD3 directory's T5 encoder unloaded; a one-line error
    for any other model (FLUX reads the prompt through T5 alone)."""
    index = json.loads((path / "model_index.json").read_text())
    if "text_encoder_3" not in index:
        raise ModelLoadError(f"{role} {path}: without_t5 (--no-t5) is for SD3, whose two CLIP encoders can read "
                             f"the prompt alone; this is a {index.get('_class_name', 'pipeline')}")
    return {"text_encoder_3": None, "tokenizer_3": None}


# A key only each diffusion transformer's original checkpoint layout has (with or without the
# ``model.diffusion_model.`` prefix of ComfyUI / Stability files), and the diffusers pipeline of its family
_TRANSFORMER_FILES = {"sd3": ("joint_blocks.0.x_block.attn.qkv.weight", "StableDiffusion3Pipeline",
                              "SD3Transformer2DModel"),
                      "flux": ("double_blocks.0.img_attn.qkv.weight", "FluxPipeline", "FluxTransformer2DModel")}


def _file_family(path: Path, role: str) -> str:
    """What a single-file checkpoint holds: "upscaler" for the upscaler role; "sd3" / "flux" for an MMDiT
    or FLUX transformer in its original layout; "sdxl" when it has SDXL's second text encoder
    (``conditioner.embedders.1``); else "sd" (SD 1.x / 2.x)."""
    from safetensors import safe_open

    if role == "upscaler":
        return "upscaler"
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
    except Exception:  # not readable as safetensors: let diffusers say why
        return "sd"
    for family, (key, _, _) in _TRANSFORMER_FILES.items():
        if key in keys or f"model.diffusion_model.{key}" in keys:
            return family
    return "sdxl" if any(k.startswith("conditioner.embedders.1.") for k in keys) else "sd"


def _single_file_class(family: str):
    """The diffusers pipeline class a UNet single-file checkpoint of ``family`` loads as."""
    from diffusers import StableDiffusionPipeline, StableDiffusionUpscalePipeline, StableDiffusionXLPipeline

    return {"upscaler": StableDiffusionUpscalePipeline, "sdxl": StableDiffusionXLPipeline}.get(
        family, StableDiffusionPipeline)


def _transformer_from_file(path: Path, family: str, role: str, config, dtype: torch.dtype, allow_pickle: bool,
                           variant: str | None, without_t5: bool):
    """An SD3 / FLUX pipeline whose transformer is the single file's (diffusers' ``from_single_file``
    converts the original layout) and whose VAE, text encoders and scheduler are those of ``config``,
    a diffusers directory of the same family: what these files need, since the published ones hold the
    transformer alone (FLUX.1's ``flux1-dev.safetensors``) or beside encoders diffusers takes from a
    directory anyway. One-line :class:`ModelLoadError` for a missing or mismatched ``config``."""
    import diffusers
    from diffusers import DiffusionPipeline

    _, pipeline_name, transformer_name = _TRANSFORMER_FILES[family]
    what = f"{role} {path}: a single-file {family.upper()} transformer"
    if config is None:
        raise ModelLoadError(f"{what} needs its family's VAE and text encoders: pass config=DIR (CLI: --config "
                             f"DIR), a diffusers {pipeline_name} directory")
    cfg = Path(config).expanduser()
    index_file = cfg / "model_index.json"
    if not index_file.is_file():
        raise ModelLoadError(f"{what}: config {cfg} is not a diffusers directory (no model_index.json)")
    found = json.loads(index_file.read_text()).get("_class_name")
    if found != pipeline_name:
        raise ModelLoadError(f"{what}: config {cfg} is a {found}, not a {pipeline_name}")
    _check_weights(cfg, role, allow_pickle)
    transformer = getattr(diffusers, transformer_name).from_single_file(
        str(path), config=str(cfg), subfolder="transformer", dtype=dtype, local_files_only=True)
    drop = _without_t5(cfg, role) if without_t5 else {}
    return DiffusionPipeline.from_pretrained(cfg, transformer=transformer, dtype=dtype, local_files_only=True,
                                             use_safetensors=not allow_pickle or None, variant=variant, **drop)


def _hint(exc: Exception, path: Path, single_file: bool) -> str:
    """What to do about a load failure that has a known cause: a single file's missing config, an
    fp16-variant directory loaded without ``variant``."""
    text = str(exc)
    if single_file and ("snapshot" in text or "config" in text.lower()):
        return ("; a single-file checkpoint needs its original config, which offline must be on disk: pass "
                "config=DIR (CLI: --config DIR), a diffusers directory of the same model family")
    if path.is_dir() and "no file named" in text and any(path.rglob("*.fp16.safetensors")):
        return "; the directory holds fp16-variant weights: pass variant='fp16' (CLI: --variant fp16)"
    return ""


def load_pipeline(source: str | os.PathLike, *, device: torch.device, dtype: torch.dtype,
                  allow_pickle: bool = False, role: str = "model", config=None, variant: str | None = None,
                  without_t5: bool = False):
    """A diffusers pipeline from a directory, a single ``.safetensors`` file (SD 1.x/2.x, SDXL, the x4
    upscaler; ``config``: a diffusers directory of the same family, which diffusers needs offline; an
    SD3 or FLUX transformer in its original layout, with the VAE and text encoders of ``config``), or
    a hub id; ``variant``: the weights' variant (``"fp16"`` for ``*.fp16.safetensors``);
    ``without_t5``: SD3 without its T5 encoder (4.8B parameters; diffusers then encodes the prompt with
    the two CLIP encoders alone).

    Raises :class:`ModelLoadError` with one line naming the source and what was tried.
    """
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as dlogging

    path = Path(source).expanduser()
    dlogging.set_verbosity_error()
    family = _file_family(path, role) if path.is_file() else None
    if without_t5 and not (path.is_dir() or family == "sd3"):
        raise ModelLoadError(f"{role} {source}: without_t5 (--no-t5) needs an SD3 diffusers directory or an SD3 "
                             "single file with its config directory")
    try:
        if path.is_dir():
            if not (path / "model_index.json").is_file():
                raise ModelLoadError(f"{role} {path}: directory has no model_index.json (not a diffusers model)")
            _check_weights(path, role, allow_pickle)
            drop = _without_t5(path, role) if without_t5 else {}
            with warnings.catch_warnings():  # the x4 class's scaling_factor reset, undone below
                warnings.filterwarnings("ignore", message=".*scaling_factor.*", category=FutureWarning)
                pipe = DiffusionPipeline.from_pretrained(
                    path, dtype=dtype, use_safetensors=not allow_pickle or None, local_files_only=True,
                    variant=variant, **_no_safety_checker(path), **drop)
        elif path.is_file():
            _check_weights(path, role, allow_pickle)
            if family in _TRANSFORMER_FILES:
                pipe = _transformer_from_file(path, family, role, config, dtype, allow_pickle, variant, without_t5)
            else:
                extra = {"config": str(Path(config).expanduser())} if config is not None else {}
                pipe = _single_file_class(family).from_single_file(str(path), dtype=dtype, local_files_only=True,
                                                                   **extra)
        elif _is_hub_id(source):
            pipe = DiffusionPipeline.from_pretrained(str(source), dtype=dtype, use_safetensors=not allow_pickle or None,
                                                     variant=variant)
        else:
            raise ModelLoadError(f"{role} {source}: no such file or directory")
    except ModelLoadError:
        raise
    except Exception as exc:  # diffusers raises many kinds; the user needs one line
        first = _first_line(exc)  # diffusers raises many kinds; the user needs one line
        tried = "local diffusers directory" if path.is_dir() else (
            "single-file checkpoint" if path.is_file() else "hub id (no network here?)")
        raise ModelLoadError(f"{role} {source}: could not load as a {tried}: {first}"
                             f"{_hint(exc, path, path.is_file())}") from exc
    if nets.of(pipe) is None or getattr(pipe, "vae", None) is None:
        raise ModelLoadError(f"{role} {source}: needs a UNet or a diffusion transformer, and a VAE "
                             f"(got {type(pipe).__name__})")
    if path.is_dir():
        restore_vae_scale(pipe.vae, path)
        pipe.anysize_settings = read_settings(path)
    elif family in _TRANSFORMER_FILES:  # its config directory's, which gave all but the transformer
        pipe.anysize_settings = read_settings(Path(config).expanduser())
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def saved_vae_scale(root: str | os.PathLike) -> float | None:
    """The ``scaling_factor`` written in a diffusers directory's VAE config (``root/vae`` or ``root``
    itself), or None where there is none."""
    config = component_dir(root, "vae") / "config.json"
    try:
        value = json.loads(config.read_text()).get("scaling_factor")
    except (OSError, json.JSONDecodeError):
        return None
    return float(value) if isinstance(value, (int, float)) else None


def restore_vae_scale(vae, root: str | os.PathLike) -> None:
    """Put back the ``scaling_factor`` that ``root``'s VAE config holds.

    diffusers' ``StableDiffusionUpscalePipeline.__init__`` overwrites any other value with 0.08333,
    the factor of Stability's own x4 upscaler VAE. An x4-layout upscaler trained on another VAE (the
    default model's: 0.6458) then decodes latents 7.75x too large, and its noisy latents are scaled
    wrongly all through sampling: the output loses ~7 dB of PSNR and shifts colour. diffusers has
    no switch for this, so the loader and the trainer's export undo it from the config on disk.
    """
    scale = saved_vae_scale(root)
    if scale is not None and scale != vae.config.scaling_factor:
        vae.register_to_config(scaling_factor=scale)


def component_dir(root: str | os.PathLike, name: str) -> Path:
    """A pipeline component's directory: ``root / name`` when ``root`` is a diffusers model directory
    that has it (``runs/vae/model`` -> ``runs/vae/model/vae``), else ``root`` itself (the component's own)."""
    sub = Path(root) / name
    return sub if sub.is_dir() else Path(root)


def default_controlnet_path() -> Path:
    """The embedded default model's ControlNet (object silhouettes); a clear error while it is not shipped."""
    path = DEFAULT_MODEL_DIR / "controlnet"
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"controlnet default: not in this install ({path} is missing)")
    return path


GLIGEN_LAYERS_FILE = "gligen_layers.safetensors"


def default_gligen_path() -> Path | None:
    """The embedded default model's GLIGEN layers (gated self-attention and box projection for its
    base UNet, :func:`add_gligen_layers`), or None where this install has none."""
    path = DEFAULT_MODEL_DIR / "gligen" / GLIGEN_LAYERS_FILE
    return path if path.is_file() else None


def add_gligen_layers(unet, weights: str | os.PathLike):
    """``unet`` rebuilt with GLIGEN's gated layers (diffusers' ``attention_type="gated"``): every weight
    of ``unet`` and the new layers' from ``weights``, a safetensors file holding those alone (the box
    projection ``position_net.*`` and the ``*.fuser.*`` layers, as ``anysize train gligen`` trains
    them), on ``unet``'s device and dtype. Called without ``gligen`` arguments the gated UNet skips
    the new layers and computes what ``unet`` does. A file that does not fit raises
    :class:`ModelLoadError`."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from .core.grounding import is_gligen_parameter

    layers = load_file(str(weights))
    if not layers or not all(is_gligen_parameter(k) for k in layers):
        raise ModelLoadError(f"gligen layers {weights}: holds tensors that are not GLIGEN layers "
                             f"({next((k for k in layers if not is_gligen_parameter(k)), 'none at all')})")
    with torch.device("meta"):
        gated = UNet2DConditionModel.from_config({**unet.config, "attention_type": "gated"})
    want = {k: tuple(v.shape) for k, v in gated.state_dict().items() if is_gligen_parameter(k)}
    missing = [k for k in want if k not in layers]
    wrong = [f"{k} {tuple(v.shape)}, not {want[k]}" for k, v in layers.items() if k in want and tuple(v.shape) != want[k]]
    extra = [k for k in layers if k not in want]
    if missing or wrong or extra:
        first = (wrong or missing or extra)[0]
        raise ModelLoadError(f"gligen layers {weights}: do not fit this UNet ({len(missing)} missing, {len(wrong)} of "
                             f"another shape, {len(extra)} unknown; e.g. {first})")
    gated.load_state_dict({**unet.state_dict(), **layers}, strict=True, assign=True)
    return gated.to(unet.device, unet.dtype).eval()


def default_model_paths() -> tuple[Path, Path]:
    """(base, upscaler) directories of the embedded default model; a clear error while it is not shipped."""
    base, up = DEFAULT_MODEL_DIR / "base", DEFAULT_MODEL_DIR / "upscaler"
    if not (base / "model_index.json").is_file() or not (up / "model_index.json").is_file():
        raise ModelLoadError(
            f"the embedded default model is not in this install ({DEFAULT_MODEL_DIR} is missing); "
            "it ships with a later release. Pass base=... and upscaler=... (CLI: --base, --upscaler) "
            "with diffusers directories or .safetensors files"
        )
    return base, up


def describe(source) -> str:
    """A short id for metadata: the directory or file name, or the hub id."""
    if source is None:
        return "none"
    p = Path(source)
    if (p / "model_index.json").is_file():
        try:
            return f"{p.name} ({json.loads((p / 'model_index.json').read_text())['_class_name']})"
        except (OSError, KeyError, json.JSONDecodeError):
            return p.name
    return str(source)


# ---------------------------------------------------------------------- ControlNets
def controlnet_factor(net) -> int:
    """Control-image pixels per latent pixel: the conditioning embedding halves once per stage after the first."""
    channels = getattr(net.config, "conditioning_embedding_out_channels", None) or (16, 32, 96, 256)
    return 2 ** (len(channels) - 1)


CONTROLNET_CLASSES = ("ControlNetModel", "FluxControlNetModel", "SD3ControlNetModel")  # the diffusers classes anysize steers with


def load_controlnet(source, *, device: torch.device, dtype: torch.dtype, allow_pickle: bool = False):
    """A diffusers ``ControlNetModel`` (SD 1.x / 2.x, SDXL), ``FluxControlNetModel`` (FLUX.1) or
    ``SD3ControlNetModel`` (SD 3 / 3.5) from a
    directory (``config.json`` + weights), a single ``.safetensors`` file (``ControlNetModel``), a hub
    id, a loaded model (moved to ``device`` / ``dtype``), or "default": the default model's (its
    condition: object silhouettes, white on black, :func:`anysize.train.scenes.render_mask`). Raises
    :class:`ModelLoadError` with one line."""
    import diffusers
    from diffusers import ControlNetModel
    from diffusers.utils import logging as dlogging

    if isinstance(source, str) and source == "default":
        source = default_controlnet_path()
    if isinstance(source, torch.nn.Module):
        if type(source).__name__ not in CONTROLNET_CLASSES:
            raise ModelLoadError(f"controlnet: a {type(source).__name__} is not a diffusers "
                                 f"{' or '.join(CONTROLNET_CLASSES)}")
        return source.to(device, dtype).eval()
    path = Path(source).expanduser()
    dlogging.set_verbosity_error()
    try:
        if path.is_dir():
            config = path / "config.json"
            if not config.is_file():
                raise ModelLoadError(f"controlnet {path}: directory has no config.json (not a diffusers ControlNet)")
            name = json.loads(config.read_text()).get("_class_name", "")
            if name not in CONTROLNET_CLASSES:
                raise ModelLoadError(f"controlnet {path}: is a {name or 'model of unknown class'}; anysize runs "
                                     "diffusers ControlNetModel (SD 1.x/2.x and SDXL), FluxControlNetModel and "
                                     "SD3ControlNetModel checkpoints")
            _check_weights(path, "controlnet", allow_pickle)
            with warnings.catch_warnings():  # diffusers' own FluxControlNetModel imports its deprecated FluxPosEmbed
                warnings.filterwarnings("ignore", message=".*FluxPosEmbed.*", category=FutureWarning)
                net = getattr(diffusers, name).from_pretrained(path, dtype=dtype, local_files_only=True,
                                                               use_safetensors=not allow_pickle or None)
        elif path.is_file():
            _check_weights(path, "controlnet", allow_pickle)
            net = ControlNetModel.from_single_file(str(path), dtype=dtype, local_files_only=True)
        elif _is_hub_id(source):
            net = ControlNetModel.from_pretrained(str(source), dtype=dtype, use_safetensors=not allow_pickle or None)
        else:
            raise ModelLoadError(f"controlnet {source}: no such file or directory")
    except ModelLoadError:
        raise
    except Exception as exc:  # diffusers raises many kinds; the user needs one line
        raise ModelLoadError(f"controlnet {source}: could not load: {_first_line(exc)}") from exc
    return net.to(device).eval()


def check_controlnet(net, base, index: int = 0) -> None:
    """Refuse, in one line, a ControlNet that cannot steer ``base`` (a diffusers pipeline): its latent
    channels, text width, SDXL-ness and control-pixel factor must match the base model's."""
    from .core.vae import vae_scale_factor

    family, name = model_kind(base).family, f"controlnet[{index}]"
    own = {"FluxControlNetModel": "flux", "SD3ControlNetModel": "sd3"}.get(type(net).__name__)
    if own is not None or model_kind(base).is_transformer:
        if own != family:
            raise ModelLoadError(f"{name}: a {type(net).__name__} for a {family.upper()} base; "
                                 + ("a FLUX base takes a FluxControlNetModel, an SD3 base an SD3ControlNetModel"
                                    if model_kind(base).is_transformer else
                                    "it steers the transformer it was made for"))
        (_check_flux_controlnet if family == "flux" else _check_sd3_controlnet)(net, base, name)
        return
    unet, config = base.unet.config, net.config
    checks = (("latent channels", config.in_channels, unet.in_channels),
              ("text embedding width (cross_attention_dim)", config.cross_attention_dim, unet.cross_attention_dim),
              ("added conditioning (addition_embed_type)", config.addition_embed_type, unet.addition_embed_type),
              ("control px per latent px", controlnet_factor(net), vae_scale_factor(base.vae)))
    _require_same(name, checks)


def _require_same(name: str, checks) -> None:
    """One line for the first ``(what, the ControlNet's, the base model's)`` that differ."""
    for what, got, want in checks:
        if got != want:
            raise ModelLoadError(f"{name}: {what} is {got}, the base model's is {want}; this ControlNet was "
                                 "made for another base model")


def _check_flux_controlnet(net, base, name: str) -> None:
    """:func:`check_controlnet` for FLUX: a ``FluxControlNetModel`` of InstantX's layout (its condition
    VAE-encoded, no pixel hint block, no union modes) whose widths are the base transformer's."""
    config = net.config
    if config.conditioning_embedding_channels is not None:
        raise ModelLoadError(f"{name}: a FLUX ControlNet with a pixel hint block (XLabs' layout); anysize takes "
                             "ControlNets whose condition is VAE-encoded (InstantX's layout)")
    if config.num_mode is not None:
        raise ModelLoadError(f"{name}: a FLUX ControlNet-Union (num_mode={config.num_mode}); its control modes are "
                             "not supported yet")
    _check_widths(net, base, name, joint=True)


def _check_sd3_controlnet(net, base, name: str) -> None:
    """:func:`check_controlnet` for SD3: an ``SD3ControlNetModel`` without extra conditioning channels
    whose widths are the base transformer's and that has no more blocks than it. A ControlNet that
    shares the transformer's positional table (SD 3.5's 8B ones, ``use_pos_embed=False``) gets a copy of
    it here, as diffusers' ``StableDiffusion3ControlNetPipeline`` gives it one."""
    config, transformer = net.config, base.transformer.config
    if config.extra_conditioning_channels:
        raise ModelLoadError(f"{name}: an SD3 ControlNet with {config.extra_conditioning_channels} extra conditioning "
                             "channels; anysize hands it the VAE-encoded control image only")
    if config.num_layers > transformer.num_layers:
        raise ModelLoadError(f"{name}: {config.num_layers} blocks for a transformer of {transformer.num_layers}; this "
                             "ControlNet was made for another base model")
    _check_widths(net, base, name, joint=config.joint_attention_dim is not None)
    if net.pos_embed is None:
        net.pos_embed = net._get_pos_embed_from_transformer(base.transformer).to(net.device, net.dtype)


def _check_widths(net, base, name: str, joint: bool) -> None:
    """A transformer ControlNet's latent channels, text width (``joint``: where it reads text) and
    hidden width must be its base transformer's."""
    config, transformer = net.config, base.transformer.config
    checks = (("latent channels (in_channels)", config.in_channels, transformer.in_channels),
              ("width (heads x head dim)", config.num_attention_heads * config.attention_head_dim,
               transformer.num_attention_heads * transformer.attention_head_dim))
    if joint:
        checks += (("text embedding width (joint_attention_dim)", config.joint_attention_dim,
                    transformer.joint_attention_dim),)
    _require_same(name, checks)


# ---------------------------------------------------------------------- LoRA
def load_lora(pipe, source, adapter_name: str, *, allow_pickle: bool = False) -> None:
    """Load a LoRA file (kohya / A1111 or diffusers format) into ``pipe`` through diffusers'
    ``load_lora_weights`` as ``adapter_name``; a one-line :class:`ModelLoadError` when it fails."""
    path = Path(source).expanduser()
    if not path.exists():
        raise ModelLoadError(f"lora {source}: no such file or directory")
    _check_weights(path, "lora", allow_pickle)
    try:
        if path.is_file():
            pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=adapter_name)
        else:
            pipe.load_lora_weights(str(path), adapter_name=adapter_name, use_safetensors=not allow_pickle or None)
    except Exception as exc:  # diffusers and peft raise many kinds; the user needs one line
        raise ModelLoadError(f"lora {source}: could not load: {_first_line(exc)}") from exc


def load_embedding(pipe, source, token: str | None = None, *, allow_pickle: bool = False) -> str:
    """Load a textual-inversion embedding (A1111's ``emb_params`` / ``string_to_param`` or diffusers'
    format; SDXL's ``clip_l`` + ``clip_g`` files into both text encoders) into ``pipe`` through diffusers'
    ``load_textual_inversion``, as ``token`` (default: the file's name without its suffix, A1111's
    trigger word); returns the token. A one-line :class:`ModelLoadError` when it fails."""
    path = Path(source).expanduser()
    if not path.exists():
        raise ModelLoadError(f"embedding {source}: no such file or directory")
    _check_weights(path, "embedding", allow_pickle)
    token = token or path.stem
    try:
        if model_kind(pipe).is_sdxl:
            from safetensors.torch import load_file

            if not path.is_file() or path.suffix.lower() != ".safetensors":
                raise ValueError("an SDXL embedding must be a .safetensors file with clip_l and clip_g tensors")
            state = load_file(str(path))
            if not {"clip_l", "clip_g"} <= set(state):
                raise ValueError(f"holds {', '.join(sorted(state))}; an SDXL embedding has clip_l and clip_g")
            pipe.load_textual_inversion(state["clip_l"], token=token, text_encoder=pipe.text_encoder,
                                        tokenizer=pipe.tokenizer)
            pipe.load_textual_inversion(state["clip_g"], token=token, text_encoder=pipe.text_encoder_2,
                                        tokenizer=pipe.tokenizer_2)
        else:
            pipe.load_textual_inversion(str(path), token=token, use_safetensors=not allow_pickle or None)
    except Exception as exc:  # diffusers raises many kinds (a taken token, a width mismatch); one line
        raise ModelLoadError(f"embedding {source}: could not load: {_first_line(exc)}") from exc
    return token


# ---------------------------------------------------------------------- prompts
def prompt_problems(pipe, prompt: str, chunked: bool = False) -> list[str]:
    """What ``pipe``'s text encoder will not read of ``prompt``, one line each: tokens past its window
    (cut by diffusers' ``encode_prompt``, unless ``chunked``: read window by window), and words its
    tokenizer does not know (a word-level vocabulary such as the default model's maps them to its
    unknown token)."""
    tokenizer = getattr(pipe, "tokenizer", None)
    if tokenizer is None or not prompt:
        return []
    out = []
    limit = int(tokenizer.model_max_length)
    net = nets.of(pipe)
    family = nets.kind(net) if net is not None else "unet"
    t5 = getattr(pipe, "tokenizer_3" if family == "sd3" else "tokenizer_2", None) if family != "unet" else None
    if t5 is not None:  # the T5 encoder reads the prompt (diffusers' max_sequence_length); CLIP adds a summary
        tokenizer, limit = t5, nets.T5_WINDOW[family]
    ids = tokenizer(prompt, truncation=False).input_ids
    if len(ids) > limit and not chunked:
        kept = tokenizer.decode(ids[1 : limit - 1], skip_special_tokens=True)
        out.append(f"prompt: {len(ids)} tokens, but the text encoder reads {limit}; it sees only "
                   f"{kept!r}, the rest is cut (long_prompt='chunk', --long-prompt chunk: read it all, "
                   "window by window, as A1111)")
    unk = tokenizer.unk_token_id
    if unk is not None and unk not in {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}:
        words = [w for w in dict.fromkeys(prompt.replace(",", " ").split())
                 if unk in tokenizer(w, add_special_tokens=False).input_ids]
        if words:
            out.append(f"prompt: the model does not know {', '.join(repr(w) for w in words)}; each reads as the "
                       "unknown token (the default model knows only its scene vocabulary: "
                       "anysize.train.trainer.scene_vocabulary())")
    return out
