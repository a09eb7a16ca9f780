"""Samplers by the names Stable Diffusion users know, as diffusers schedulers.

A1111 WebUI and ComfyUI name a sampler ("DPM++ 2M") and a schedule ("Karras") where diffusers has a
scheduler class and config options (``DPMSolverMultistepScheduler`` with ``use_karras_sigmas=True``).
:data:`SCHEDULERS` maps the command line's short names (``dpm++2m-karras``) to both; :func:`make`
builds one from a model's own scheduler config, so the training schedule (betas, prediction type,
timestep spacing) stays the model's and only the solver changes; :func:`a1111_name` names any
scheduler back in A1111's words, for the ``parameters`` text of an output file.

Every one of these runs through anysize's one-step-per-timestep loop (each UNet evaluation a full
tiled pass, the scheduler stepping the whole latent), first- and second-order, deterministic and
ancestral alike (``tests/test_schedulers.py``).

This module does not import torch; diffusers is imported inside :func:`make`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Sampler:
    """A short name's diffusers class and options, and its A1111 sampler and schedule type."""

    cls: str
    options: dict = field(default_factory=dict)
    a1111: str = ""
    schedule: str | None = None  # A1111's "Schedule type" (None: the sampler's own)


_DPM = {"algorithm_type": "dpmsolver++", "solver_order": 2}
_SDE = {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}
_KARRAS = {"use_karras_sigmas": True}

SCHEDULERS: dict[str, Sampler] = {
    "ddim": Sampler("DDIMScheduler", {}, "DDIM"),
    "ddpm": Sampler("DDPMScheduler", {}, "DDPM"),
    "pndm": Sampler("PNDMScheduler", {"skip_prk_steps": True}, "PLMS"),
    "euler": Sampler("EulerDiscreteScheduler", {"use_karras_sigmas": False}, "Euler"),
    "euler-karras": Sampler("EulerDiscreteScheduler", _KARRAS, "Euler", "Karras"),
    "euler-a": Sampler("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "heun": Sampler("HeunDiscreteScheduler", {"use_karras_sigmas": False}, "Heun"),
    "heun-karras": Sampler("HeunDiscreteScheduler", _KARRAS, "Heun", "Karras"),
    "lms": Sampler("LMSDiscreteScheduler", {"use_karras_sigmas": False}, "LMS"),
    "lms-karras": Sampler("LMSDiscreteScheduler", _KARRAS, "LMS", "Karras"),
    "dpm2": Sampler("KDPM2DiscreteScheduler", {"use_karras_sigmas": False}, "DPM2"),
    "dpm2-karras": Sampler("KDPM2DiscreteScheduler", _KARRAS, "DPM2", "Karras"),
    "dpm2-a": Sampler("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": False}, "DPM2 a"),
    "dpm2-a-karras": Sampler("KDPM2AncestralDiscreteScheduler", _KARRAS, "DPM2 a", "Karras"),
    "dpm++2m": Sampler("DPMSolverMultistepScheduler", {**_DPM, "use_karras_sigmas": False}, "DPM++ 2M"),
    "dpm++2m-karras": Sampler("DPMSolverMultistepScheduler", {**_DPM, **_KARRAS}, "DPM++ 2M", "Karras"),
    "dpm++2m-sde": Sampler("DPMSolverMultistepScheduler", {**_SDE, "use_karras_sigmas": False}, "DPM++ 2M SDE"),
    "dpm++2m-sde-karras": Sampler("DPMSolverMultistepScheduler", {**_SDE, **_KARRAS}, "DPM++ 2M SDE", "Karras"),
    "dpm++2s": Sampler("DPMSolverSinglestepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": False},
                       "DPM++ 2S"),
    "dpm++2s-karras": Sampler("DPMSolverSinglestepScheduler", {"algorithm_type": "dpmsolver++", **_KARRAS},
                              "DPM++ 2S", "Karras"),
    "unipc": Sampler("UniPCMultistepScheduler", {"use_karras_sigmas": False}, "UniPC"),
    "unipc-karras": Sampler("UniPCMultistepScheduler", _KARRAS, "UniPC", "Karras"),
    "deis": Sampler("DEISMultistepScheduler", {"use_karras_sigmas": False}, "DEIS"),
    "lcm": Sampler("LCMScheduler", {}, "LCM"),
}


def make(name: str, config: dict[str, Any]):
    """The scheduler ``name`` (a key of :data:`SCHEDULERS`) built from ``config`` (a model's
    scheduler config), its options applied. A one-line ValueError for an unknown name."""
    import diffusers

    sampler = SCHEDULERS.get(name)
    if sampler is None:
        raise ValueError(f"scheduler {name!r}: unknown; one of {', '.join(SCHEDULERS)}")
    if "FlowMatch" in str(config.get("_class_name", "")):  # SD3 and FLUX: a flow-matching model
        if name not in FLOW_MATCHING:
            raise ValueError(f"scheduler {name!r}: samples the SD / SDXL noise schedule; a flow-matching model "
                             f"(SD3, FLUX) takes {', '.join(FLOW_MATCHING)}")
        return diffusers.FlowMatchEulerDiscreteScheduler.from_config(dict(config), **FLOW_MATCHING[name])
    cls = getattr(diffusers, sampler.cls)
    return cls.from_config(dict(config), **sampler.options)


# The names a flow-matching model's scheduler takes (diffusers' FlowMatchEulerDiscreteScheduler, its own
# shift kept): "euler" as the model ships it, "euler-karras" with Karras sigmas.
FLOW_MATCHING = {"euler": {}, "euler-karras": {"use_karras_sigmas": True}}


def _match(scheduler) -> str | None:
    """The :data:`SCHEDULERS` key whose class and options a scheduler instance matches (the most
    specific one), or None."""
    name, config = type(scheduler).__name__, getattr(scheduler, "config", {})
    matches = [(len(s.options), key) for key, s in SCHEDULERS.items()
               if s.cls == name and all(config.get(k, v) == v for k, v in s.options.items())]
    return max(matches)[1] if matches else None


def a1111_name(scheduler) -> tuple[str, str | None]:
    """(A1111 sampler, schedule type or None) of a diffusers scheduler instance; for one outside the
    table, its class name without "Scheduler"."""
    key = _match(scheduler)
    if key is None:
        return type(scheduler).__name__.removesuffix("Scheduler"), None
    return SCHEDULERS[key].a1111, SCHEDULERS[key].schedule


def short_name(scheduler) -> str:
    """The :data:`SCHEDULERS` key a scheduler instance matches, else its class name."""
    return _match(scheduler) or type(scheduler).__name__
