"""Resumable runs: checkpoints in a run directory; killed, interrupted and resumed runs give the same image."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       HeunDiscreteScheduler, UniPCMultistepScheduler)

from anysize import cli
from anysize.core.checkpoint import RunDir, RunDirError, RunInterrupted, load_scheduler_state, scheduler_state

ROOT = Path(__file__).resolve().parents[1]
KW = dict(width=200, height=120, num_inference_steps=3, upscale_inference_steps=4, tile_size=8, tile_batch_size=3)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("kind", [DPMSolverMultistepScheduler, UniPCMultistepScheduler, EulerAncestralDiscreteScheduler,
                                  DDPMScheduler, DDIMScheduler, HeunDiscreteScheduler])
def test_scheduler_state_round_trip_continues_identically(kind):
    def model(x, t):  # any deterministic function of the input
        return torch.sin(x * 3 + float(t) / 100)

    def run(stop=None):
        s = kind(num_train_timesteps=1000)
        s.set_timesteps(8)
        g, x = gen(1), torch.randn(1, 4, 6, 5, generator=gen(2))
        for i, t in enumerate(s.timesteps):
            if i == stop:  # save everything, rebuild from nothing, continue
                tensors, plain = scheduler_state(s)
                plain = json.loads(json.dumps(plain))
                state, x = g.get_state(), x.clone()
                s = kind(num_train_timesteps=1000)
                s.set_timesteps(8)
                load_scheduler_state(s, tensors, plain, x.device)
                g = torch.Generator()
                g.set_state(state)
            kw = {"generator": g} if "generator" in s.step.__code__.co_varnames else {}
            x = s.step(model(s.scale_model_input(x, t), t), t, x, **kw).prev_sample
        return x

    assert torch.equal(run(), run(stop=5))


def test_killed_then_resumed_run_is_bit_identical(pipe, tmp_path):
    expected = np.asarray(pipe("a red circle", generator=gen(), **KW).images[0])

    def crash(p, i, t, kw):
        if kw["stage"] == "upscale" and i == 2:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated"):
        pipe("a red circle", generator=gen(), run_dir=tmp_path / "run", callback_on_step_end=crash, **KW)
    names = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert names == ["phase0.done.safetensors", "phase1.step.safetensors", "request.json"]
    resumed = pipe("a red circle", generator=gen(), run_dir=tmp_path / "run", **KW)
    np.testing.assert_array_equal(np.asarray(resumed.images[0]), expected)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "phase0.done.safetensors", "phase1.done.safetensors", "request.json"]


def test_ctrl_c_stops_at_a_step_boundary_with_a_checkpoint(pipe, tmp_path):
    expected = np.asarray(pipe("grass", generator=gen(4), **KW).images[0])
    steps, before = [], signal.getsignal(signal.SIGINT)  # SIG_IGN when pytest runs in the background

    def interrupt(p, i, t, kw):
        steps.append((kw["stage"], i))
        if kw["stage"] == "upscale" and i == 1:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, caught by the run's handler

    with pytest.raises(RunInterrupted, match="step 2 of phase1"):
        pipe("grass", generator=gen(4), run_dir=tmp_path / "run", callback_on_step_end=interrupt, **KW)
    assert steps[-1] == ("upscale", 1)  # stopped right after the step it was in
    assert signal.getsignal(signal.SIGINT) is before  # handler put back
    resumed = pipe("grass", generator=gen(4), run_dir=tmp_path / "run", **KW)
    np.testing.assert_array_equal(np.asarray(resumed.images[0]), expected)


def test_a_run_dir_refuses_another_request(pipe, tmp_path):
    pipe("a red circle", generator=gen(), run_dir=tmp_path / "run", **KW)
    with pytest.raises(RunDirError, match="differs in prompt"):
        pipe("a blue square", generator=gen(), run_dir=tmp_path / "run", **KW)
    with pytest.raises(RunDirError, match="seed_state"):
        pipe("a red circle", generator=gen(1), run_dir=tmp_path / "run", **KW)
    with pytest.raises(ValueError, match="checkpoint_every=0"):
        RunDir(tmp_path / "other", {}, every=0)


def _generate_argv(model_dirs, out, run_dir):
    return ["generate", "a red circle", "--size", "200x120", "-o", str(out), "--steps", "3", "--upscale-steps",
            "30", "--tile-size", "8", "--seed", "11", "--base", str(model_dirs[0]), "--upscaler",
            str(model_dirs[1]), "--run-dir", str(run_dir), "--quiet"]


def test_sigkill_mid_run_then_resume_from_the_cli_is_bit_identical(model_dirs, tmp_path):
    """A real ``kill -9`` in the middle of stage 2, then ``anysize resume DIR``: the same pixels as an
    uninterrupted run."""
    env = {**os.environ, "MKL_CBWR": "AVX2,STRICT"}
    reference = tmp_path / "reference.png"
    assert cli.main(_generate_argv(model_dirs, reference, tmp_path / "ref-run")) == 0

    out, run_dir = tmp_path / "killed.png", tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "anysize", *_generate_argv(model_dirs, out, run_dir)],
                            cwd=ROOT, env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (run_dir / "phase1.step.safetensors").exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "no stage-2 checkpoint within 120 s"
        time.sleep(0.01)
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists() and not (run_dir / "phase1.done.safetensors").exists(), "the kill came too late"
    assert 0 < _step(run_dir / "phase1.step.safetensors") < 30

    resumed = subprocess.run([sys.executable, "-m", "anysize", "resume", str(run_dir)], cwd=tmp_path, env=env,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.strip() == str(out)
    with PIL.Image.open(out) as a, PIL.Image.open(reference) as b:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _step(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return json.loads(f.metadata()["anysize"])["step"]


def test_resume_errors_are_one_line(tmp_path, capsys):
    assert cli.main(["resume", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err
