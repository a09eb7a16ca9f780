"""The A1111 ``parameters`` text of an output: what A1111's PNG Info, Civitai and ComfyUI's readers show.

A1111 WebUI stores a result's settings as text in a PNG ``tEXt`` chunk keyed ``parameters``: the
prompt on the first lines, then ``Negative prompt: ...``, then one line of ``Key: value`` pairs
separated by ", " (``Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 3,
Size: 768x384, Model: ...``); a value holding a comma, a colon or a quote is written as a JSON
string. :func:`parameters` writes that text from anysize's metadata (the JSON object every output
carries, whose ``request`` is the exact call), with the keys A1111 has for stage 1 and anysize's own
for what A1111 has no word for (``Base size``, ``Stage 2 passes``, ``Tiling``...). The JSON chunk stays
the exact record; this text is for people's tools.

This module does not import torch.
"""

from __future__ import annotations

import json
from typing import Any

from .schedulers import SCHEDULERS


def _value(value: Any) -> str:
    text = str(value)
    return json.dumps(text) if any(c in text for c in ',:"\n') else text


def _sampler(short: str | None) -> list[tuple[str, str]]:
    """(key, value) pairs naming a sampler from its :data:`SCHEDULERS` key (or a class name)."""
    if not short:
        return []
    entry = SCHEDULERS.get(short)
    if entry is None:
        return [("Sampler", short.removesuffix("Scheduler"))]
    return [("Sampler", entry.a1111)] + ([("Schedule type", entry.schedule)] if entry.schedule else [])


def _size(pair) -> str:
    return f"{pair[0]}x{pair[1]}"


def parameters(metadata: dict[str, Any]) -> str | None:
    """The A1111 ``parameters`` text of ``metadata`` (the dict an output file carries), or None when
    it holds no request to describe."""
    request = metadata.get("request")
    if not isinstance(request, dict):
        return None
    generate = request.get("call") == "generate"
    lines = [str(request.get("prompt") if isinstance(request.get("prompt"), str) else metadata.get("prompt", ""))]
    if request.get("negative_prompt"):
        lines.append(f"Negative prompt: {request['negative_prompt']}")
    upscale_steps = request.get("upscale_inference_steps")
    upscale_cfg = request.get("upscale_guidance_scale")
    if upscale_cfg is None:
        upscale_cfg = request.get("guidance_scale")
    pairs: list[tuple[str, Any]] = []
    if generate:
        pairs += [("Steps", request.get("num_inference_steps"))]
        pairs += _sampler(metadata.get("scheduler"))
        pairs += [("CFG scale", request.get("guidance_scale"))]
    else:
        pairs += [("Steps", upscale_steps)] + _sampler(metadata.get("upscale_scheduler"))
        pairs += [("CFG scale", upscale_cfg)]
    if metadata.get("seed") is not None:
        pairs.append(("Seed", metadata["seed"]))
    if request.get("eta") is not None:
        pairs.append(("Eta", request["eta"]))
    if request.get("clip_skip") is not None:
        pairs.append(("Clip skip", request["clip_skip"]))
    if request.get("guidance_rescale"):
        pairs.append(("CFG Rescale phi", request["guidance_rescale"]))  # the A1111 CFG-rescale extension's key
    pairs.append(("Size", _size((request.get("width"), request.get("height")))))
    if metadata.get("base") not in (None, "none"):
        pairs.append(("Model", metadata["base"]))
    passes = metadata.get("passes") or []
    if generate and metadata.get("base_size"):
        pairs.append(("Base size", _size(metadata["base_size"])))
    if not generate and request.get("source_size"):
        pairs.append(("Source size", _size(request["source_size"])))
    if passes:
        pairs.append(("Stage 2 passes", " ".join(_size(p) for p in passes)))
        pairs.append(("Tiling", metadata.get("tiling", request.get("tiling"))))
        if generate:
            pairs += [("Upscale steps", upscale_steps)]
            pairs += [(f"Upscale {k.lower()}" if k == "Sampler" else "Upscale schedule type", v)
                      for k, v in _sampler(metadata.get("upscale_scheduler"))]
            pairs += [("Upscale CFG scale", upscale_cfg)]
        upscaler = metadata.get("upscaler")
        if upscaler and upscaler != "base (img2img)":
            pairs += [("Upscaler", upscaler), ("Noise level", request.get("noise_level"))]
        else:
            pairs += [("Denoising strength", request.get("strength"))]
    if request.get("regions"):
        pairs.append(("Regions", len(request["regions"])))
    if request.get("control_images"):
        pairs.append(("ControlNets", len(request["control_images"])))
    if metadata.get("version"):
        pairs.append(("Version", f"anysize {metadata['version']}"))
    lines.append(", ".join(f"{k}: {_value(v)}" for k, v in pairs if v is not None))
    return "\n".join(lines)
