"""Copies trained runs into ``anysize/default_model/{base,upscaler}`` as fp16 safetensors (the shipped model).

    .venv/bin/python tools/ship_default.py runs/base/model runs/upscaler/model [--vae runs/vae-decoder/model]
    .venv/bin/python tools/ship_default.py --controlnet runs/controlnet/model
    .venv/bin/python tools/ship_default.py --gligen runs/gligen-open/model

``--controlnet``: an ``anysize train controlnet`` export (a diffusers ``ControlNetModel`` directory) in
float16 to ``anysize/default_model/controlnet`` (``--controlnet default``).

``--gligen``: a GLIGEN run of the shipped base (``anysize train gligen --init anysize/default_model/base``):
only its new layers (the box projection and the gated self-attention, 3.3M parameters) go to
``anysize/default_model/gligen/gligen_layers.safetensors``; the pipeline adds them to the shipped base's
UNet on load (``anysize.models.add_gligen_layers``), so the base's weights are not shipped twice.

``--vae`` puts one VAE into both parts in place of the one they were trained with: a decoder-only
fine-tune of that VAE (``anysize train vae --init ... --decoder-only``), whose encoder, and so whose
latents, the UNets were trained on.

Each component is loaded with diffusers/transformers, cast to float16 and saved with
``save_pretrained(safe_serialization=True)`` into a temp directory that replaces the old one in one
rename, so an interrupted run never leaves a half-written default model. fp16 halves the size (the
budget is 40 MB in all); the pipeline casts back to its working dtype on load.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

DEST = Path(__file__).resolve().parents[1] / "anysize" / "default_model"
# Each part's anysize.json (anysize.models.ModelSettings). The upscaler was trained on the empty prompt
# only, and one step scores best with it (docs/benchmarks.md, "Upscaling quality").
SETTINGS = {"upscaler": {"upscale_inference_steps": 1, "text": False}}


def _bytes(path: Path) -> int:
    """Bytes of the files under ``path``."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _save_dir(out: Path, save) -> int:
    """``save(tmp)`` into a temp directory beside ``out`` that then replaces ``out`` in one rename
    (``anysize.io.atomic.replace_dir``: the old one is deleted only after it); returns the bytes written."""
    from anysize.io.atomic import replace_dir

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save(tmp)
    replace_dir(tmp, out)
    return _bytes(out)


def save_fp16(source: str | Path, out: Path, vae: str | Path | None = None, settings: dict | None = None) -> int:
    """``source`` (a diffusers directory) saved to ``out`` with its UNet, VAE (``vae``'s if given) and
    text encoder in float16, and ``settings`` as its ``anysize.json``, through a temp directory
    renamed into place; returns the bytes written."""
    from diffusers import AutoencoderKL, DiffusionPipeline

    from anysize.models import SETTINGS_FILE, component_dir, restore_vae_scale

    out = Path(out)
    parts = {} if vae is None else {"vae": AutoencoderKL.from_pretrained(component_dir(vae, "vae"), use_safetensors=True)}
    pipe = DiffusionPipeline.from_pretrained(source, use_safetensors=True, **parts)
    restore_vae_scale(pipe.vae, vae if vae is not None else source)  # the x4 upscaler class resets it
    for name in ("unet", "vae", "text_encoder"):
        getattr(pipe, name).to(torch.float16)

    def save(tmp: Path) -> None:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if settings:
            (tmp / SETTINGS_FILE).write_text(json.dumps(settings, indent=1) + "\n")

    return _save_dir(out, save)


def ship(source: str, role: str, vae: str | None = None) -> int:
    return save_fp16(source, DEST / role, vae, SETTINGS.get(role))


def ship_gligen(source: str | Path) -> int:
    """The GLIGEN layers of ``source``'s UNet in float16, written atomically
    (``anysize.io.atomic.atomic_write``); returns the bytes written."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save

    from anysize.core.grounding import is_gligen_parameter
    from anysize.io.atomic import atomic_write
    from anysize.models import GLIGEN_LAYERS_FILE, component_dir

    unet = UNet2DConditionModel.from_pretrained(component_dir(source, "unet"), use_safetensors=True)
    layers = {k: v.to(torch.float16).contiguous() for k, v in unet.state_dict().items() if is_gligen_parameter(k)}
    if not layers:
        raise SystemExit(f"{source}: its UNet has no GLIGEN layers (not an `anysize train gligen` export)")
    out = DEST / "gligen" / GLIGEN_LAYERS_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda f: f.write(save(layers)))
    return out.stat().st_size


def ship_controlnet(source: str | Path) -> int:
    """``source``'s ControlNet in float16 at ``DEST / "controlnet"``, through a temp directory renamed
    into place; returns the bytes written."""
    from diffusers import ControlNetModel

    net = ControlNetModel.from_pretrained(source, use_safetensors=True).to(torch.float16)
    return _save_dir(DEST / "controlnet", lambda tmp: net.save_pretrained(tmp, safe_serialization=True))


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] in ("--controlnet", "--gligen"):
        role = argv[0][2:]
        size = (ship_controlnet if role == "controlnet" else ship_gligen)(argv[1])
        total = _bytes(DEST)
        print(f"{DEST / role}: {size / 1e6:.1f} MB; the default model in all: {total / 1e6:.1f} MB")
        return 0 if total <= 60e6 else 1
    vae = None
    if len(argv) == 4 and argv[2] == "--vae":
        argv, vae = argv[:2], argv[3]
    if len(argv) != 2:
        print("usage: ship_default.py BASE_MODEL_DIR UPSCALER_MODEL_DIR [--vae VAE_DIR]\n"
              "       ship_default.py --controlnet CONTROLNET_DIR | --gligen GLIGEN_BASE_DIR", file=sys.stderr)
        return 2
    DEST.mkdir(parents=True, exist_ok=True)
    total = ship(argv[0], "base", vae) + ship(argv[1], "upscaler", vae)
    print(f"{DEST}: {total / 1e6:.1f} MB")
    return 0 if total <= 40e6 else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
