"""Resumable runs: a run directory holds each sampling phase's checkpoints, so a killed run continues.

A request samples in phases (stage 1, then each stage-2 pass). For a phase the directory holds at most
two files, each written atomically (temporary file, fsync, rename), so a kill at any moment leaves
either the previous or the next checkpoint, never half of one:

- ``phaseK.step.safetensors``: after step ``i`` of phase K: the latents, the scheduler's state (every
  attribute that ``step`` changes: multistep history, step index...), the generator's state and ``i + 1``.
- ``phaseK.done.safetensors``: the phase's final latents and the generator's state after it.

On resume the pipeline replays each phase's set-up from the same generator state (so the same noise is
drawn and the same tile plans made), then jumps to the saved step: on the CPU in float32 the result is
bit-identical to an uninterrupted run. ``request.json`` holds what the request was (prompt, sizes,
steps, models, the seed's generator state...) and a directory refuses a different request.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save

from ..io.atomic import atomic_write
from .sampler import make_plan_generator, sample_tiled
from .tiling import TilingConfig

_SKIP = ("config", "_internal_dict")  # the scheduler's configuration: set by the pipeline, not by step()


class RunDirError(ValueError):
    """The run directory cannot serve this request."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run with a run directory: stopped at a step boundary after a checkpoint."""


def generator_fingerprint(generator: torch.Generator) -> str:
    """A short hash of a generator's state: identifies the seed a request started from."""
    return hashlib.blake2b(generator.get_state().numpy().tobytes(), digest_size=8).hexdigest()


# ---------------------------------------------------------------------- scheduler state
def scheduler_state(scheduler) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, JSON-able values) of every attribute of a diffusers scheduler but its config."""
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, Any] = {}
    for name, value in vars(scheduler).items():
        if name in _SKIP:
            continue
        if torch.is_tensor(value) or isinstance(value, np.ndarray):
            tensors[f"t.{name}"] = _tensor(value)
            plain[name] = {"kind": "numpy" if isinstance(value, np.ndarray) else "tensor"}
        elif isinstance(value, (list, tuple)) and all(v is None or torch.is_tensor(v) for v in value) and value:
            plain[name] = {"kind": "tensors", "present": [v is not None for v in value],
                           "tuple": isinstance(value, tuple)}
            tensors.update({f"l.{name}.{i}": _tensor(v) for i, v in enumerate(value) if v is not None})
        elif _is_plain(value):
            plain[name] = {"kind": "value", "value": list(value) if isinstance(value, tuple) else value,
                           "tuple": isinstance(value, tuple)}
        else:
            raise TypeError(f"scheduler {type(scheduler).__name__}.{name} ({type(value).__name__}): "
                            "cannot be checkpointed")
    return tensors, plain


def load_scheduler_state(scheduler, tensors: dict[str, torch.Tensor], plain: dict[str, Any], device) -> None:
    """Set the attributes saved by :func:`scheduler_state` back on ``scheduler``."""
    for name, spec in plain.items():
        kind = spec["kind"]
        if kind == "tensor":
            value: Any = tensors[f"t.{name}"].to(device)
        elif kind == "numpy":
            value = tensors[f"t.{name}"].numpy()
        elif kind == "tensors":
            value = [tensors[f"l.{name}.{i}"].to(device) if present else None
                     for i, present in enumerate(spec["present"])]
            value = tuple(value) if spec["tuple"] else value
        else:
            value = tuple(spec["value"]) if spec["tuple"] else spec["value"]
        setattr(scheduler, name, value)


def _tensor(value) -> torch.Tensor:
    """A contiguous CPU copy (safetensors refuses tensors that share memory)."""
    value = torch.from_numpy(np.array(value)) if isinstance(value, np.ndarray) else value
    return value.detach().to("cpu", copy=True).contiguous()


def _is_plain(value) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


# ---------------------------------------------------------------------- the directory
class RunDir:
    """Checkpoints of one request's sampling phases in ``path`` (see the module docstring).

    ``request``: JSON-able description of the request; a directory made for another request is refused.
    ``every``: save a step checkpoint after every ``every``-th step of a phase (and always on Ctrl-C).
    """

    def __init__(self, path: str | os.PathLike, request: dict, *, every: int = 1):
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"checkpoint_every={every!r}: must be an integer >= 1")
        self.path, self.every = Path(path), every
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"run_dir '{self.path}': is a file, not a directory")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunDirError(f"run_dir '{self.path}': cannot be created ({exc.strerror})") from None
        self._check_request(json.loads(json.dumps(request, default=str)))
        self.phase = -1
        self.stop_requested = False

    def _check_request(self, request: dict) -> None:
        file = self.path / "request.json"
        if file.is_file():
            stored = json.loads(file.read_text())
            if stored != request:
                diff = sorted(k for k in {*stored, *request} if stored.get(k) != request.get(k))
                raise RunDirError(f"run_dir '{self.path}': holds a run of another request (differs in "
                                  f"{', '.join(diff)}); use a new directory")
        else:
            data = json.dumps(request, indent=1).encode()
            atomic_write(file, lambda f: f.write(data))

    def next_phase(self) -> str:
        self.phase += 1
        return f"phase{self.phase}"

    def _file(self, phase: str, kind: str) -> Path:
        return self.path / f"{phase}.{kind}.safetensors"

    def load(self, phase: str, kind: str) -> tuple[dict[str, torch.Tensor], dict] | None:
        """(tensors, metadata) of ``phase``'s ``kind`` ("step" or "done") checkpoint, or None."""
        file = self._file(phase, kind)
        if not file.is_file():
            return None
        from safetensors import safe_open

        with safe_open(file, "pt") as f:
            meta = json.loads(f.metadata()["anysize"])
        return load_file(file), meta

    def save(self, phase: str, kind: str, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        data = save({k: _tensor(v) for k, v in tensors.items()}, metadata={"anysize": json.dumps(meta)})
        atomic_write(self._file(phase, kind), lambda f: f.write(data))

    def save_step(self, phase: str, step: int, latents: torch.Tensor, scheduler, generator: torch.Generator) -> None:
        tensors, plain = scheduler_state(scheduler)
        tensors.update({"latents": latents, "generator": generator.get_state()})
        self.save(phase, "step", tensors, {"step": step, "scheduler": plain})

    def save_done(self, phase: str, latents: torch.Tensor, generator: torch.Generator) -> None:
        self.save(phase, "done", {"latents": latents, "generator": generator.get_state()}, {})
        with contextlib.suppress(FileNotFoundError):
            self._file(phase, "step").unlink()

    @contextlib.contextmanager
    def stop_on_interrupt(self) -> Iterator[None]:
        """While the block runs, the first Ctrl-C asks for a stop at the next step boundary (after a
        checkpoint); a second one interrupts at once. Only in the main thread (signals live there)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self.stop_requested:
                raise KeyboardInterrupt
            self.stop_requested = True

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


# ---------------------------------------------------------------------- a resumable phase
def sample_resumable(run: RunDir | None, denoiser, latents: torch.Tensor, scheduler, tiles: TilingConfig, *,
                     generator: torch.Generator, callback_on_step_end: Callable | None = None,
                     progress=False, desc: str | None = None,
                     timesteps: Sequence | None = None, eta: float | None = None) -> torch.Tensor:
    """:func:`anysize.core.sampler.sample_tiled` as one phase of ``run``: skipped when the directory
    holds the phase as done, continued from its last step checkpoint, checkpointed every ``run.every``
    steps, and stopped after a checkpoint when Ctrl-C asked for it. Without a run directory, plain
    :func:`sample_tiled`."""
    kw = dict(generator=generator, progress=progress, desc=desc, timesteps=timesteps, eta=eta)
    if run is None:
        return sample_tiled(denoiser, latents, scheduler, tiles, callback_on_step_end=callback_on_step_end, **kw)
    phase = run.next_phase()
    done = run.load(phase, "done")
    if done is not None:  # the set-up before this call drew its noise as before; jump to the phase's end
        generator.set_state(done[0]["generator"])
        return done[0]["latents"].to(latents)
    plans, start = make_plan_generator(generator), 0  # the plans as first drawn, before any restore
    saved = run.load(phase, "step")
    if saved is not None:
        tensors, meta = saved
        load_scheduler_state(scheduler, tensors, meta["scheduler"], latents.device)
        generator.set_state(tensors["generator"])
        latents, start = tensors["latents"].to(latents), meta["step"]

    def checkpointing(i, t, x):
        replaced = callback_on_step_end(i, t, x) if callback_on_step_end is not None else None
        x = x if replaced is None else replaced
        if run.stop_requested or (i + 1) % run.every == 0:
            run.save_step(phase, i + 1, x, scheduler, generator)
        if run.stop_requested:
            raise RunInterrupted(f"interrupted at step {i + 1} of {phase}; the run continues from there")
        return replaced

    latents = sample_tiled(denoiser, latents, scheduler, tiles, callback_on_step_end=checkpointing, start=start,
                           plan_generator=plans, **kw)
    run.save_done(phase, latents, generator)
    return latents
