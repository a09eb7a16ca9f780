"""The memory planner on tiny random-weight pipelines: choices against budgets, refusals, stages, parsing."""

import math
import subprocess
import sys
from pathlib import Path

import PIL.Image
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from anysize import memory
from anysize.memory import (
    GIB,
    MIB,
    TILE_BATCH_CHOICES,
    VAE_TILE_CHOICES,
    MemoryPreflightError,
    decode_kwargs,
    parse_bytes,
    tiles_per_step,
)
from anysize.pipeline import upscale_passes
from anysize.core.tiling import TilingConfig

ROOT = Path(__file__).resolve().parents[1]
BIG = 2**40  # a budget everything fits in


def budget_for(need: int, margin: float = memory.SAFETY_MARGIN) -> int:
    """The smallest max_memory whose usable part holds ``need`` bytes."""
    return math.ceil(need / (1 - margin)) + 1


def sample_peak(pipe, size, batch: int, **kwargs) -> int:
    """The costliest sampling stage of ``size`` at tile batch ``batch``."""
    plan = pipe.plan_memory(*size, tile_batch_size=batch, vae_tile_size=VAE_TILE_CHOICES[-1], max_memory=BIG,
                       **kwargs)
    return max(plan.cost(s) for s in plan.stages if s.kind == "sample")


# ---------------------------------------------------------------------- stages
def test_describe_names_every_stage_and_the_choices(pipe):
    width, height = 1024, 768
    plan = pipe.plan_memory(width, height, max_memory=BIG)
    passes = pipe.plan(width, height).passes
    assert len(passes) >= 2
    expected = ["stage 1", "stage 1 decode"]
    for k in range(1, len(passes) + 1):
        expected += [f"pass {k}", f"pass {k} decode"]
    assert [s.name for s in plan.stages] == expected + ["output"]
    text = plan.describe()
    lines = text.splitlines()
    assert lines[0].startswith("memory plan: budget 1024.00 GiB (max_memory=1024.00 GiB)")
    assert f"tile batch {plan.tile_batch_size}, VAE tile {plan.vae_tile_size}" in lines[0]
    for name, line in zip(expected + ["output", "peak"], lines[1:]):
        assert line.split()[0:len(name.split())] == name.split()
        assert "GiB" in line
    assert len(lines) == len(expected) + 3
    assert plan.peak == max(s.device + s.host for s in plan.stages) and plan.fits


def test_stages_follow_the_request(pipe):
    # stage 2 alone: no stage 1, the passes of upscale()
    plan = pipe.plan_memory(400, 300, source=(50, 40), max_memory=BIG)
    passes = upscale_passes((50, 40), (400, 300), pipe.stage2_factor)
    assert [s.name for s in plan.stages if s.kind == "sample"] == [f"pass {k}" for k in range(1, len(passes) + 1)]
    # latents out: no last decode and no output image
    names = [s.name for s in pipe.plan_memory(256, 256, output_type="latent", max_memory=BIG).stages]
    assert names[-1] == "pass 1" and "output" not in names
    # tiled panorama: stage 1 samples tiles, so the tile batch counts there too; not when untiled
    assert pipe.plan(2048, 64, "tiled").tiled
    small, large = (pipe.plan_memory(2048, 64, tile_batch_size=b, max_memory=BIG, panorama="tiled").stages[0]
                    for b in (1, 8))
    assert small.name == "stage 1" and "panorama" in small.detail and large.device > small.device
    one, eight = (pipe.plan_memory(2048, 64, tile_batch_size=b, max_memory=BIG, panorama="direct").stages[0]
                  for b in (1, 8))
    assert "panorama" in one.detail and one.device == eight.device


def test_output_type_and_streaming(pipe):
    size = (8192, 8192)
    out = {t: pipe.plan_memory(*size, output_type=t, color_fix=None, max_memory=BIG).stages[-1]
           for t in ("pil", "np", "pt")}
    assert out["pil"].host >= 8192 * 8192 * (3 + 4)  # the uint8 result and its PIL copy
    assert out["pil"].host < out["np"].host < out["pt"].host
    fixed, plain = (pipe.plan_memory(4096, 64, color_fix=c, max_memory=BIG).stages[-1].host for c in ("adain", None))
    assert fixed > plain + 64 * 4096 * 24  # the colour fix's float64 band
    # the colour fix's band is a fixed number of bytes, whatever the width
    from anysize.memory import COLOR_FIX_BYTES, color_fix_rows

    for width in (2048, 16384, 100_000):
        assert COLOR_FIX_BYTES / 2 < color_fix_rows(width) * width * 48 <= COLOR_FIX_BYTES
    streamed = pipe.plan_memory(*size, output_path="out.tif", max_memory=BIG)
    assert streamed.stages[-1].host < out["pil"].host / 4
    held = pipe.plan_memory(*size, max_memory=BIG).stages[-2]
    assert held.name == streamed.stages[-2].name == f"pass {len(pipe.plan(*size).passes)} decode"
    assert held.host - streamed.stages[-2].host > 0.9 * 8192 * 8192 * 3  # decoded pixels go to the file


def test_estimates_grow_with_size_and_batch(pipe):
    # sampling state in memory (latent_memory=BIG), it grows with the latent; on disk (the default) it stays flat
    peaks = [pipe.plan_memory(s, s, max_memory=BIG, tile_batch_size=8, latent_memory=BIG).peak
             for s in (64, 256, 1024, 4096)]
    assert peaks == sorted(peaks) and peaks[-1] > 3 * peaks[1]
    last_pass = [[s for s in pipe.plan_memory(4096, 4096, max_memory=BIG, tile_batch_size=8, latent_memory=m).stages
                  if s.kind == "sample"][-1] for m in (BIG, 0)]
    assert last_pass[1].device < last_pass[0].device and "on disk in bands of 512 rows" in last_pass[1].detail
    by_batch = [sample_peak(pipe, (2048, 2048), b) for b in sorted(TILE_BATCH_CHOICES)]
    assert by_batch == sorted(by_batch) and by_batch[-1] > by_batch[0]
    guided, unguided = (sample_peak_cfg(pipe, g) for g in (7.5, 1.0))
    assert guided > unguided  # classifier-free guidance doubles the UNet batch


def sample_peak_cfg(pipe, guidance: float) -> int:
    plan = pipe.plan_memory(1024, 1024, tile_batch_size=8, max_memory=BIG, guidance_scale=guidance)
    return plan.stages[2].device


# ---------------------------------------------------------------------- choices
def test_tile_batch_shrinks_with_the_budget(pipe):
    size, latent = (2048, 2048), dict(output_type="latent")  # no output image: sampling is the peak
    roomy = pipe.plan_memory(*size, max_memory=BIG, **latent)
    assert roomy.tile_batch_size == 64 and roomy.vae_tile_size == 64
    for batch in (32, 8, 2, 1):
        # just enough for `batch`, not for the next choice up
        plan = pipe.plan_memory(*size, max_memory=budget_for(sample_peak(pipe, size, batch, **latent)), **latent)
        assert plan.tile_batch_size == batch
        assert plan.peak <= plan.usable


def test_choices_are_monotonic_in_the_budget(pipe):
    size, choices, budget = (1536, 1024), [], 8 * GIB
    while True:
        try:
            plan = pipe.plan_memory(*size, max_memory=budget, output_path="out.tif")
        except MemoryPreflightError:
            break
        choices.append((budget, plan.tile_batch_size, plan.vae_tile_size))
        budget = int(budget * 0.8)
    assert len(choices) > 5
    batches, tiles = [c[1] for c in choices], [c[2] for c in choices]
    assert batches == sorted(batches, reverse=True) and tiles == sorted(tiles, reverse=True)
    assert batches[-1] < batches[0]


def test_vae_tile_shrinks_when_the_decode_does_not_fit(pipe):
    size, kw = (2048, 2048), dict(tile_batch_size=1, output_path="out.tif")  # streamed: the decode is the peak
    plans = {t: pipe.plan_memory(*size, vae_tile_size=t, max_memory=BIG, **kw) for t in VAE_TILE_CHOICES}
    decode = {t: max(p.cost(s) for s in p.stages if s.kind == "decode") for t, p in plans.items()}
    assert decode[16] < decode[32] < decode[48] < decode[64]
    others = max(plans[16].cost(s) for s in plans[16].stages if s.kind != "decode")
    checked = 0
    for tile, larger in zip(VAE_TILE_CHOICES[1:], VAE_TILE_CHOICES):
        need = max(decode[tile], others)
        if need < decode[larger]:
            assert pipe.plan_memory(*size, max_memory=budget_for(need), **kw).vae_tile_size == tile
            checked += 1
    assert checked >= 2


def test_refuses_with_the_numbers_when_batch_1_does_not_fit(pipe):
    smallest = pipe.plan_memory(2048, 2048, tile_batch_size=1, vae_tile_size=16, max_memory=BIG)
    budget = budget_for(smallest.peak) - 2**16
    with pytest.raises(MemoryPreflightError) as info:
        pipe.plan_memory(2048, 2048, max_memory=budget)
    message = str(info.value)
    assert message.startswith(f"size 2048x2048 needs about {memory.format_bytes(smallest.peak)} at tile batch 1 "
                              "and VAE tile 16")
    assert smallest.peak_stage.name in message
    assert f"max_memory={memory.format_bytes(budget)}" in message and "15% kept free" in message
    assert "lower the size" in message


def test_a_given_tile_batch_is_kept_or_refused(pipe):
    size, latent = (2048, 2048), dict(output_type="latent")
    budget = budget_for(sample_peak(pipe, size, 4, **latent))
    assert pipe.plan_memory(*size, tile_batch_size=3, max_memory=budget, **latent).tile_batch_size == 3
    with pytest.raises(MemoryPreflightError, match=r"at tile batch 64 .* lower tile_batch_size=64"):
        pipe.plan_memory(*size, tile_batch_size=64, max_memory=budget, **latent)


def test_budget_is_the_free_memory(pipe, monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device: (0, 3 * GIB))
    plan = pipe.plan_memory(256, 256)
    assert plan.budget == 3 * GIB and plan.budget_source == "host available" and plan.shared
    assert plan.usable == int(3 * GIB * (1 - memory.SAFETY_MARGIN))
    monkeypatch.setattr(memory, "available_bytes", lambda device: (0, 10 * MIB))
    with pytest.raises(MemoryPreflightError, match=r"size 256x256 needs about .* \(host available, 15% kept free\)"):
        pipe.plan_memory(256, 256)


def test_accelerator_budget_keeps_images_on_the_host(pipe, monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device: (4 * GIB, 8 * GIB))
    plan = pipe.plan_memory(2048, 2048)
    assert not plan.shared and plan.budget == 4 * GIB and plan.host_budget == 8 * GIB
    assert plan.peak == max(s.device for s in plan.stages)
    assert "device +" in plan.describe()
    monkeypatch.setattr(memory, "available_bytes", lambda device: (64 * GIB, 20 * MIB))
    with pytest.raises(MemoryPreflightError, match="of host memory"):
        pipe.plan_memory(2048, 2048)


# ---------------------------------------------------------------------- pieces
@settings(max_examples=60, deadline=None)
@given(st.integers(1, 300), st.integers(1, 300), st.integers(4, 96), st.sampled_from(["fstd", "naive", "overlap"]))
def test_tiles_per_step_bounds_every_plan(height, width, tile, method):
    config = TilingConfig(method=method, tile_size=tile)
    generator = torch.Generator().manual_seed(height * 1000 + width)
    bound = tiles_per_step(method, height, width, tile)
    assert all(len(config.plan(height, width, step, generator)) <= bound for step in range(4))
    assert tiles_per_step("none", height, width, tile) == 1


def test_decode_kwargs_follow_the_pipeline_rule(pipe):
    vae = pipe.upscaler.vae
    assert decode_kwargs(vae, 100, 128) == {"tile_size": 64, "stats_size": 128}  # whole latent: exact stats
    assert decode_kwargs(vae, 100, 129) == {"tile_size": 64, "stats_size": 96}
    small = decode_kwargs(vae, 500, 500, tile_size=16)
    assert small["tile_size"] == 16 and small["stats_size"] < 96


@pytest.mark.parametrize("text, value", [
    ("8GiB", 8 * GIB), ("512MiB", 512 * MIB), ("512 mib", 512 * MIB), ("1.5G", int(1.5 * GIB)),
    ("16GB", 16 * 10**9), ("1000000", 10**6), (" 2k ", 2048), ("1TiB", 2**40), (4096, 4096),
])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["", "GiB", "8 parsecs", "-1GiB", "0", "0.0001B", "1e9", "8GiBs"])
def test_parse_bytes_refuses(text):
    with pytest.raises(ValueError, match="max_memory="):
        parse_bytes(text)


def test_memory_module_imports_without_torch():
    code = "import sys, anysize.memory as m; m.parse_bytes('8GiB'); assert 'torch' not in sys.modules"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------------- handing freed memory back
RETENTION = """
import ctypes, platform, psutil
from anysize.memory import release_freed_memory
rss = lambda: psutil.Process().memory_info().rss
libc = platform.libc_ver()[0]
if libc == "glibc":  # pin glibc's thresholds (mmap above 64 MiB, never trim by itself): what it retains is certain
    ctypes.CDLL(None).mallopt(-3, 64 << 20), ctypes.CDLL(None).mallopt(-1, 1 << 30)
blocks = [bytearray(1 << 20) for _ in range(128)]
del blocks  # 128 MiB freed onto the heap and kept resident
before = rss()
ok = release_freed_memory()
print(libc, ok, (before - rss()) >> 20)
"""


def test_release_freed_memory_hands_the_freed_heap_back():
    out = subprocess.run([sys.executable, "-c", RETENTION], capture_output=True, text=True, check=True).stdout
    libc, ok, dropped_mib = out.split()
    if libc == "glibc":
        assert ok == "True" and int(dropped_mib) >= 96, out
    else:  # no malloc_trim to call: it says so and does nothing
        assert ok == "False", out


def test_every_pipeline_call_hands_freed_memory_back_once_at_its_end(pipe, monkeypatch):
    calls = []
    monkeypatch.setattr(memory, "release_freed_memory", lambda: calls.append(1) or True)
    pipe("a red circle", width=256, height=256, generator=torch.Generator().manual_seed(0),
         num_inference_steps=1, upscale_inference_steps=1)
    assert len(calls) == 1
    pipe.upscale(PIL.Image.new("RGB", (32, 32), "red"), 128, 128, num_inference_steps=1)
    assert len(calls) == 2
    with pytest.raises(ValueError):  # refused before any work: still nothing held
        pipe("a red circle", width=0, height=256)
    with pytest.raises(RuntimeError, match="stop"):  # stopped mid-way: released all the same
        pipe("a red circle", width=256, height=256, num_inference_steps=2, upscale_inference_steps=1,
             callback_on_step_end=lambda *a: (_ for _ in ()).throw(RuntimeError("stop")))
    assert len(calls) == 3
