"""Banded sampling (latents and scheduler state on disk, one band of rows in memory) against in-memory."""

import os
import signal

import pytest
import torch

from anysize.core.bands import BandWork, DiskTensor, NoiseStream, fill_planes
from anysize.core.sampler import BandMerger, TileMerger, UNetTileDenoiser, sample_banded, sample_tiled
from anysize.core.tiling import TilingConfig
from test_sampler import SCHEDULERS, make_scheduler, noise

DETERMINISTIC = ["ddim", "euler", "dpmpp", "unipc"]


def _denoiser(unet, embeds, **extra):
    pos, neg = embeds
    return UNetTileDenoiser(unet, pos, negative_prompt_embeds=neg, guidance_scale=5.0, **extra)


def _banded(den, latents, name, config, directory, *, rows=5, seed=0, callback=None):
    g = torch.Generator().manual_seed(seed)
    with BandWork(directory, latents.shape, rows=rows) as work:
        work.init.write(0, latents)
        with torch.no_grad():
            out = sample_banded(den, work, make_scheduler(name), config, generator=g, progress=False,
                                callback_on_step_end=callback)
        return out.to_tensor(), g


@pytest.mark.parametrize("name", DETERMINISTIC)
@pytest.mark.parametrize("method", ["fstd", "overlap"])
def test_banded_is_bit_identical_to_in_memory(unet, embeds, tmp_path, name, method):
    den = _denoiser(unet, embeds)
    config = TilingConfig(method=method, tile_size=16, tile_batch_size=3)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        ref = sample_tiled(den, noise(40, 24), make_scheduler(name), config, generator=g, progress=False)
    out, g2 = _banded(den, noise(40, 24), name, config, tmp_path)
    assert torch.isfinite(ref).all()
    assert torch.equal(out, ref)
    assert torch.equal(g.get_state(), g2.get_state())


def test_banded_window_stays_a_few_tile_rows_with_cut_edges(unet, embeds, tmp_path, monkeypatch):
    # cut edge tiles come in several shapes; batching them by shape across the whole step would hold the
    # merger window open from the first row to the last. Banded sampling batches in plan order instead.
    window = []
    add = BandMerger.add
    monkeypatch.setattr(BandMerger, "add", lambda self, out, boxes: (add(self, out, boxes),
                                                                     window.append(self.value.shape[2])))
    config = TilingConfig(tile_size=8, tile_batch_size=64, edges="cut")
    out, _ = _banded(_denoiser(unet, embeds), noise(96, 24), "ddim", config, tmp_path, rows=4)
    assert torch.isfinite(out).all() and window
    assert max(window) <= 2 * 8 + 4, max(window)


def test_banded_super_resolution_conditioning_from_disk(sr_unet, embeds, tmp_path):
    low = noise(40, 24, seed=3, channels=3)
    config = TilingConfig(tile_size=16)
    level = torch.tensor([20])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        ref = sample_tiled(_denoiser(sr_unet, embeds, cond=low, class_labels=level), noise(40, 24),
                           make_scheduler("dpmpp"), config, generator=g, progress=False)
    with DiskTensor(tmp_path / "cond.raw", low.shape) as cond:
        cond.write(0, low)
        out, _ = _banded(_denoiser(sr_unet, embeds, cond=cond, class_labels=level), noise(40, 24), "dpmpp",
                         config, tmp_path / "work")
    assert torch.equal(out, ref)


def test_stochastic_scheduler_banded_is_reproducible(unet, embeds, tmp_path):
    den, config = _denoiser(unet, embeds), TilingConfig(tile_size=16)
    a, _ = _banded(den, noise(40, 24), "euler_a", config, tmp_path / "a")
    b, _ = _banded(den, noise(40, 24), "euler_a", config, tmp_path / "b")
    c, _ = _banded(den, noise(40, 24), "euler_a", config, tmp_path / "c", seed=1)
    assert torch.isfinite(a).all() and torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("name", ["euler_a", "dpmpp", "unipc"])
def test_banded_resumes_from_its_last_commit(unet, embeds, tmp_path, name):
    """A run stopped after step 2 (an exception from the callback) continues to the uninterrupted
    result: the committed latents, per-band scheduler history and generator state are what it reads
    (multistep solvers' history; a stochastic scheduler, where a generator not restored would show)."""
    den, config = _denoiser(unet, embeds), TilingConfig(tile_size=16)
    full, g_full = _banded(den, noise(40, 24), name, config, tmp_path / "full")

    class Stop(Exception):
        pass

    def stop(i, t, latents):
        if i == 1:
            raise Stop

    with pytest.raises(Stop):
        _banded(den, noise(40, 24), name, config, tmp_path / "cut", callback=stop)
    # same seed (the tile plans come from the generator as the phase starts); starting latents ignored
    resumed, g = _banded(den, torch.zeros(1, 4, 40, 24), name, config, tmp_path / "cut")
    assert torch.equal(resumed, full)
    assert torch.equal(g.get_state(), g_full.get_state())


def test_callback_gets_the_disk_latents_and_can_replace_them(unet, embeds, tmp_path):
    den, config = _denoiser(unet, embeds), TilingConfig(tile_size=16)
    seen = []

    def zero_last(i, t, latents):
        seen.append(tuple(latents.shape))
        return torch.zeros(latents.shape) if i == 3 else None

    out, _ = _banded(den, noise(40, 24), "ddim", config, tmp_path, callback=zero_last)
    assert seen == [(1, 4, 40, 24)] * 4 and not out.any()


def test_disk_tensor_rows_boxes_and_crops(tmp_path):
    x = torch.randn(2, 3, 17, 11)
    with DiskTensor(tmp_path / "x.raw", x.shape) as d:
        assert not d.to_tensor().any()  # a new file reads as zeros
        d.write(0, x[:, :, :9])
        d.write(9, x[:, :, 9:])
        assert torch.equal(d.to_tensor(), x)
        assert torch.equal(d.read(4, 12), x[:, :, 4:12])
        assert torch.equal(d.read(5, 6), x[:, :, 5:6])  # from the cache of the last read
        assert torch.equal(d.box((3, 2, 10, 7)), x[:, :, 3:10, 2:7])
        boxes = [(0, 0, 8, 8), (9, 3, 17, 11)]
        want = torch.cat([x[:, :, t:b, l:r] for t, l, b, r in boxes])
        assert torch.equal(d.crop(boxes), want)
        assert torch.equal(d.crop(boxes, lambda r: r * 2), want * 2)
        with pytest.raises(ValueError, match="do not fit"):
            d.write(10, x)
    with pytest.raises(ValueError, match="not the"):
        DiskTensor(tmp_path / "x.raw", (2, 3, 17, 12), create=False)


@pytest.mark.parametrize("total", [5, 16, 17, 40 * 24 * 4, 3 * 2**10 + 7])
def test_noise_stream_equals_one_draw(total):
    full = torch.randn(total, generator=torch.Generator().manual_seed(4))
    stream = NoiseStream(total, torch.Generator().manual_seed(4), chunk=2**10)
    parts, left = [], total
    for n in (3, 100, 1, 2**11):  # pieces of any size, across the draws' boundaries
        n = min(n, left)
        parts.append(stream.take(n))
        left -= n
    parts.append(stream.take(left))
    assert torch.equal(torch.cat(parts), full)
    with pytest.raises(ValueError, match="more values"):
        stream.take(1)


def test_fill_planes_writes_in_file_order(tmp_path):
    x = torch.randn(1, 3, 10, 7)
    with DiskTensor(tmp_path / "x.raw", x.shape) as d:
        fill_planes(d, lambda b, c, top, bottom: x[b, c, top:bottom], rows=4)
        assert torch.equal(d.to_tensor(), x)


def test_band_merger_equals_tile_merger():
    boxes = [(0, 0, 8, 8), (0, 6, 8, 14), (5, 0, 13, 8), (5, 6, 13, 14)]
    outs = [torch.randn(1, 4, 8, 8) for _ in boxes]
    whole = TileMerger(torch.Size((1, 4, 13, 14)), "gaussian", dtype=torch.float32, device=torch.device("cpu"))
    band = BandMerger(1, 4, "gaussian", canvas=(13, 14), dtype=torch.float32, device=torch.device("cpu"))
    for box, out in zip(boxes, outs):
        whole.add(out, [box])
        band.add(out, [box])
    ref = whole.result()
    assert torch.equal(band.take(0, 5), ref[:, :, :5])
    assert torch.equal(band.take(5, 13), ref[:, :, 5:])
    with pytest.raises(RuntimeError, match="out of order"):
        band.take(0, 1)


def test_schedulers_listed():
    assert set(DETERMINISTIC) < set(SCHEDULERS)


# ---------------------------------------------------------------------- through the pipeline
KW = dict(width=200, height=120, num_inference_steps=2, upscale_inference_steps=3, tile_size=8, tile_batch_size=3,
          output_type="np")


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_pipeline_on_disk_is_bit_identical_and_leaves_no_scratch(pipe, tmp_path):
    import numpy as np

    expected = pipe("a red circle", generator=_gen(), **KW).images[0]
    out = pipe("a red circle", generator=_gen(), latent_memory=0, **{**KW, "output_type": "pil"},
               output_path=tmp_path / "out.tif")
    import tifffile

    assert out.memory_plan is not None and "on disk" in out.memory_plan.describe()
    np.testing.assert_array_equal(tifffile.imread(out.files[0]), (expected * 255).round().astype(np.uint8))
    assert [p.name for p in tmp_path.iterdir()] == ["out.tif"]  # the band files went with the call
    latents = pipe("a red circle", generator=_gen(), latent_memory=0, **{**KW, "output_type": "latent"}).images[0]
    assert torch.is_tensor(latents) and latents.shape[-2:] == (30, 50)


def test_pipeline_on_disk_upscale_and_img2img(pipe, model_dirs):
    import numpy as np
    import PIL.Image

    from anysize import AnySizePipeline

    src = PIL.Image.new("RGB", (40, 30), (200, 40, 40))
    kw = dict(width=161, height=121, num_inference_steps=2, tile_size=8, output_type="np")
    a = pipe.upscale(src, generator=_gen(), **kw).images[0]
    b = pipe.upscale(src, generator=_gen(), latent_memory=0, **kw).images[0]
    np.testing.assert_array_equal(a, b)
    p = AnySizePipeline.from_pretrained(base=model_dirs[0], img2img=True, device="cpu")
    p.set_progress_bar_config(disable=True)
    kw = dict(KW, width=150, height=110, strength=0.5)
    a = p("a tree", generator=_gen(), **kw).images[0]
    b = p("a tree", generator=_gen(), latent_memory=0, **kw).images[0]
    np.testing.assert_array_equal(a, b)


def test_pipeline_on_disk_resumes_after_a_crash(pipe, tmp_path):
    import numpy as np

    from anysize.core.checkpoint import RunInterrupted

    expected = pipe("grass", generator=_gen(4), **KW).images[0]

    def crash(p, i, t, kw):
        assert kw["latents"].shape[0] == 1
        if kw["stage"] == "upscale" and i == 1:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated"):
        pipe("grass", generator=_gen(4), run_dir=tmp_path / "run", latent_memory=0, callback_on_step_end=crash, **KW)
    state = (tmp_path / "run" / "phase1.bands" / "state.json").read_text()
    assert '"step": 2' in state  # committed before the callback ran
    resumed = pipe("grass", generator=_gen(4), run_dir=tmp_path / "run", latent_memory=0, **KW).images[0]
    np.testing.assert_array_equal(resumed, expected)

    def interrupt(p, i, t, kw):
        if kw["stage"] == "upscale" and i == 0:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, caught by the run's handler

    with pytest.raises(RunInterrupted, match="step 1 of phase1.bands"):
        pipe("grass", generator=_gen(4), run_dir=tmp_path / "run2", latent_memory=0, callback_on_step_end=interrupt,
             **KW)
    resumed = pipe("grass", generator=_gen(4), run_dir=tmp_path / "run2", latent_memory=0, **KW).images[0]
    np.testing.assert_array_equal(resumed, expected)


def test_latent_memory_checked_and_planned(pipe):
    from anysize import memory

    with pytest.raises(ValueError, match="latent_memory=-1"):
        pipe("x", latent_memory=-1, **KW)
    assert memory.banded_sampling(2048, 2048) and not memory.banded_sampling(1024, 1024)
    assert not memory.banded_sampling(2048, 2048, tiling="none") and memory.banded_sampling(8, 8, 0)
    default = pipe.plan_memory(16384, 16384, max_memory=2**40, tile_batch_size=8, output_path="x.tif")
    in_memory = pipe.plan_memory(16384, 16384, max_memory=2**40, tile_batch_size=8, output_path="x.tif",
                                 latent_memory=2**40)
    assert "on disk" in default.describe() and "on disk" not in in_memory.describe()
    assert default.peak < in_memory.peak / 4  # the default keeps 16384^2 on disk; a huge limit does not
