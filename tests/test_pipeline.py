"""AnySizePipeline on tiny random-weight models: exact sizes, seeds, output types, checks, loading."""

import numpy as np
import PIL.Image
import pytest
import torch

from anysize import AnySizePipeline
from anysize.memory import MemoryPreflightError
from anysize.models import ModelLoadError
from anysize.pipeline import adain_color_fix, upscale_passes
from anysize.core.vae import tiled_decode

FAST = dict(num_inference_steps=2, upscale_inference_steps=2)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("size", [(64, 64), (8, 8), (37, 61), (300, 77), (90, 400), (257, 513)])
def test_exact_size_for_any_request(pipe, size):
    out = pipe("two red circles over water", width=size[0], height=size[1], generator=gen(), **FAST)
    image = out.images[0]
    assert isinstance(image, PIL.Image.Image) and image.size == size and image.mode == "RGB"
    info = out.info[0]
    assert info["width"] == size[0] and info["passes"][-1:] in ([], [list(size)])


def test_plans_follow_the_request():
    assert upscale_passes((64, 64), (64, 64), 4) == ()
    assert upscale_passes((64, 64), (200, 200), 4) == ((200, 200),)
    # the odd ratio goes to the first (smallest) pass: its input is enlarged up to 2x (x4 model) ...
    assert upscale_passes((512, 512), (3000, 3000), 4) == ((3000, 3000),)
    assert upscale_passes((512, 512), (4096, 4096), 4) == ((4096, 4096),)
    assert upscale_passes((64, 64), (2048, 2048), 4) == ((512, 512), (2048, 2048))
    assert upscale_passes((512, 512), (16384, 16384), 4) == ((4096, 4096), (16384, 16384))
    assert upscale_passes((64, 64), (16384, 16384), 4) == ((256, 256), (1024, 1024), (4096, 4096), (16384, 16384))
    # ... or shrunk down to just over 1/2, whichever leaves the ratio nearer a power of 4
    assert upscale_passes((512, 512), (5120, 5120), 4) == ((1280, 1280), (5120, 5120))  # input 320 = 512 x 0.625
    assert upscale_passes((512, 512), (9000, 9000), 4) == ((2250, 2250), (9000, 9000))  # input 562 = 512 x 1.1
    assert upscale_passes((64, 48), (1024, 384), 4) == ((256, 96), (1024, 384))  # the target's ratio
    assert upscale_passes((1, 1), (8, 8000), 4)[0][0] >= 1  # no zero-pixel intermediate
    assert upscale_passes((64, 48), (200, 150), 2) == ((100, 75), (200, 150))  # x2 img2img: stretch <= 1.41
    assert upscale_passes((64, 64), (200, 200), 4, stretch=4) == ((200, 200),)


def test_an_x4_upscaler_leaves_enlargements_of_2x_or_less_to_a_resize(pipe, model_dirs):
    # its one pass would be conditioned on the source shrunk to target / 4 (docs/benchmarks.md: enlargements of 2x or less)
    assert upscale_passes((64, 64), (128, 128), 4, min_scale=2) == ()
    assert upscale_passes((64, 64), (96, 32), 4, min_scale=2) == ()  # narrower: no larger by area scale
    assert upscale_passes((64, 64), (130, 130), 4, min_scale=2) == ((130, 130),)
    assert pipe.stage2_passes((64, 64), (128, 128)) == ()
    assert pipe.stage2_passes((64, 64), (129, 129)) == ((129, 129),)
    img2img = AnySizePipeline.from_pretrained(base=model_dirs[0], img2img=True, device="cpu")
    assert img2img.stage2_passes((64, 64), (80, 80)) == ((80, 80),)  # img2img works at the target's size
    bucket = pipe.plan(100, 100).base
    out = pipe("a red circle", width=2 * bucket[0], height=2 * bucket[1], num_inference_steps=2,
               generator=torch.Generator().manual_seed(0))
    assert out.info[0]["passes"] == []
    assert out.images[0].size == (2 * bucket[0], 2 * bucket[1])


def test_panorama_for_ratios_outside_the_buckets(pipe):
    wide, tall, square = pipe.plan(400, 90, "direct"), pipe.plan(60, 300, "tiled"), pipe.plan(200, 200, "tiled")
    assert wide.panorama and not wide.tiled and wide.base[0] > 3 * wide.base[1]
    assert tall.panorama and tall.tiled and tall.base[1] > 3 * tall.base[0]
    assert not square.panorama and not square.tiled and square.base == (64, 64) and square.passes == ((200, 200),)
    stretched = pipe.plan(400, 90)  # the default: the widest bucket, resized to 4.4:1 on the way up
    assert stretched.base == max(pipe.buckets, key=lambda b: b[0] / b[1]) and not stretched.panorama
    assert stretched.stretch == pytest.approx((400 / 90) / (stretched.base[0] / stretched.base[1]))


@pytest.mark.parametrize("mode, calls", [("stretch", 1), ("direct", 1), ("tiled", 2)])
def test_panorama_mode_decides_stage_1_size_and_tiling(pipe, mode, calls):
    """Stage 1's UNet calls per step: one untiled call at the bucket (stretch) or at the request's
    ratio (direct); several tile batches when tiled (tile batch 1, and the 4:1 latent spans >1 tile)."""
    seen = []
    hook = pipe.base.unet.register_forward_hook(lambda m, a, out: seen.append(tuple(a[0].shape[-2:])))
    try:
        out = pipe("a red circle", width=256, height=64, generator=gen(0), num_inference_steps=1,
                   upscale_inference_steps=1, guidance_scale=1.0, tile_batch_size=1, panorama=mode, output_type="np")
    finally:
        hook.remove()
    plan = pipe.plan(256, 64, mode)
    f = pipe.base_factor
    stage1 = seen[:calls]
    assert out.images[0].shape == (64, 256, 3) and out.info[0]["panorama_mode"] == mode
    assert out.info[0]["base_size"] == list(plan.base) and out.info[0]["stretch"] == pytest.approx(plan.stretch, abs=1e-4)
    if mode == "tiled":
        assert all(s[1] < plan.base[0] // f for s in stage1)
    else:
        assert stage1 == [(plan.base[1] // f, plan.base[0] // f)]


def test_same_seed_same_image_other_seed_differs(pipe):
    a = np.asarray(pipe("a blue square", width=120, height=100, generator=gen(3), **FAST).images[0])
    b = np.asarray(pipe("a blue square", width=120, height=100, generator=gen(3), **FAST).images[0])
    c = np.asarray(pipe("a blue square", width=120, height=100, generator=gen(4), **FAST).images[0])
    assert np.array_equal(a, b) and not np.array_equal(a, c)


@pytest.mark.parametrize("tiling", ["fstd", "overlap", "naive", "none"])
def test_every_tiling_runs(pipe, tiling):
    out = pipe("grass", width=150, height=90, generator=gen(), tiling=tiling, tile_size=8, tile_batch_size=3, **FAST)
    assert out.images[0].size == (150, 90)


def test_output_types(pipe):
    def run(kind):
        return pipe("x", width=70, height=50, generator=gen(), output_type=kind, **FAST).images[0]

    arr = run("np")
    assert arr.shape == (50, 70, 3) and arr.dtype == np.float32 and 0 <= arr.min() and arr.max() <= 1
    pt = run("pt")
    assert pt.shape == (3, 50, 70) and torch.equal(pt, torch.from_numpy(arr).permute(2, 0, 1))
    lat = run("latent")
    plan = pipe.plan(70, 50)  # no stage-2 pass (the bucket is larger): the stage-1 latent
    assert not plan.passes and lat.shape == (1, 4, plan.base[1] // pipe.base_factor, plan.base[0] // pipe.base_factor)
    lat = pipe("x", width=170, height=120, generator=gen(), output_type="latent", **FAST).images[0]
    assert lat.shape == (1, 4, 30, 43)  # the last x4 pass's latent: ceil(size / 4)
    assert np.array_equal(np.asarray(run("pil")), np.round(arr * 255))


def test_negative_prompt_and_guidance_change_the_image(pipe):
    def run(**kw):
        return np.asarray(pipe("a red circle", width=64, height=64, generator=gen(), **FAST, **kw).images[0])

    plain = run()
    assert not np.array_equal(plain, run(negative_prompt="blue"))
    assert not np.array_equal(plain, run(guidance_scale=2.0))
    assert np.array_equal(plain, run())


def test_a_list_of_prompts_gives_one_image_each(pipe):
    out = pipe(["a red circle", "a blue square"], width=90, height=70, generator=gen(), **FAST)
    assert [im.size for im in out.images] == [(90, 70), (90, 70)] and [i["prompt"] for i in out.info] == [
        "a red circle", "a blue square"]
    with pytest.raises(ValueError, match="one prompt string"):
        pipe.upscale(out.images[0], 180, 140, prompt=["a", "b"])


def test_no_generator_draws_a_fresh_seed_from_torch(pipe):
    torch.manual_seed(5)
    a = np.asarray(pipe("x", width=64, height=64, **FAST).images[0])
    b = np.asarray(pipe("x", width=64, height=64, **FAST).images[0])
    torch.manual_seed(5)
    assert not np.array_equal(a, b) and np.array_equal(a, np.asarray(pipe("x", width=64, height=64, **FAST).images[0]))


def test_callback_sees_both_stages_and_can_replace_latents(pipe):
    stages = []

    def cb(p, step, t, kwargs):
        stages.append(kwargs["stage"])
        if kwargs["stage"] == "base" and step == 1:
            return {"latents": torch.zeros_like(kwargs["latents"])}
        return None

    out = pipe("x", width=64, height=64, generator=gen(), callback_on_step_end=cb, output_type="latent", **FAST)
    assert stages == ["base", "base"] and torch.count_nonzero(out.images[0]) == 0
    stages.clear()
    pipe("x", width=130, height=130, generator=gen(), callback_on_step_end=cb, **FAST)
    assert stages == ["base", "base", "upscale", "upscale"]


def test_upscale_alone(pipe):
    src = PIL.Image.new("RGB", (40, 30), (200, 40, 40))
    out = pipe.upscale(src, width=161, height=121, num_inference_steps=2, generator=gen())
    assert out.images[0].size == (161, 121)
    same = pipe.upscale(np.asarray(src), width=161, height=121, num_inference_steps=2, generator=gen())
    assert np.array_equal(np.asarray(out.images[0]), np.asarray(same.images[0]))


def test_img2img_input_is_resized_a_crop_at_a_time():
    """_Resized's crops agree with one whole LANCZOS resize to within a level or two of 255 (PIL
    rounds between its two passes per call) on a photo-like image, and a same-size input is cropped."""
    from anysize.pipeline import _Resized

    y, x = np.mgrid[0:90, 0:120]
    src = np.stack([128 + 100 * np.sin(x / 7.0) * np.cos(y / 11.0), 2.0 * x, 255 - 2.5 * y], -1)
    image = PIL.Image.fromarray(src.clip(0, 255).astype(np.uint8))
    for size in ((300, 225), (176, 128), (60, 45)):
        whole = np.asarray(image.resize(size, PIL.Image.Resampling.LANCZOS)).astype(int)
        lazy = _Resized(image, size)
        assert lazy.shape == (size[1], size[0], 3)
        for t, l, b, r in ((0, 0, size[1], size[0]), (7, 13, size[1] // 2, size[0] - 3), (size[1] // 3, 0, size[1], 40)):
            crop = lazy.box((t, l, b, r))
            assert crop.shape == (b - t, r - l, 3) and crop.dtype == np.uint8
            assert np.abs(crop.astype(int) - whole[t:b, l:r]).max() <= 2
    assert np.array_equal(_Resized(image, image.size).box((5, 6, 50, 70)), np.asarray(image)[5:50, 6:70])


def test_img2img_upscaling_with_the_base_model(model_dirs):
    p = AnySizePipeline.from_pretrained(base=model_dirs[0], img2img=True, device="cpu")
    p.set_progress_bar_config(disable=True)
    out = p("a tree", width=150, height=110, generator=gen(), strength=0.5, **FAST)
    assert out.images[0].size == (150, 110) and out.info[0]["upscaler"] == "base (img2img)"


def test_adain_color_fix_matches_reference_statistics():
    rng = np.random.default_rng(0)
    ref = PIL.Image.fromarray(rng.integers(100, 200, (20, 30, 3), dtype=np.uint8))
    img = rng.integers(0, 90, (50, 70, 3), dtype=np.uint8)
    fixed = adain_color_fix(img.copy(), ref, rows=7).reshape(-1, 3).astype(float)
    ref_px = np.asarray(ref).reshape(-1, 3).astype(float)
    assert np.allclose(fixed.mean(0), ref_px.mean(0), atol=1.5) and np.allclose(fixed.std(0), ref_px.std(0), atol=1.5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(width=0), "width=0"), (dict(width=7), "width=7"), (dict(height=-5), "height=-5"),
    (dict(num_inference_steps=0), "num_inference_steps=0"), (dict(tiling="spiral"), "tiling='spiral'"),
    (dict(output_type="gif"), "output_type='gif'"), (dict(guidance_scale=-1.0), "guidance_scale=-1.0"),
    (dict(tile_batch_size=0), "tile_batch_size=0"), (dict(tile_size=3), "tile_size=3"),
    (dict(strength=0.0), "strength=0.0"), (dict(width=1.5), "width=1.5"), (dict(strength=True), "strength=True"),
    (dict(noise_level=351), "noise_level=351"), (dict(upscale_guidance_scale=float("nan")), "upscale_guidance_scale=nan"),
    (dict(negative_prompt=["a", "b"]), "negative_prompt="), (dict(max_memory=0), "max_memory=0"),
])
def test_check_inputs_before_any_compute(pipe, monkeypatch, kwargs, message):
    monkeypatch.setattr(pipe.base.unet, "forward", lambda *a, **k: pytest.fail("computed before checking"))
    args = dict(width=64, height=64) | kwargs
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        pipe("x", **args)


def test_memory_preflight_refuses_absurd_sizes(pipe, monkeypatch):
    monkeypatch.setattr(pipe.base.unet, "forward", lambda *a, **k: pytest.fail("computed before the preflight"))
    with pytest.raises(MemoryPreflightError, match=r"size 400000x400000 needs about .* GiB"):
        pipe("x", width=400_000, height=400_000)
    with pytest.raises(MemoryPreflightError, match="max_memory"):
        pipe("x", width=2048, height=2048, max_memory=10 * 2**20)
    tiled = pipe.plan_memory(4096, 4096, tile_batch_size=1, max_memory=2**40)
    untiled = pipe.plan_memory(4096, 4096, tiling="none", tile_batch_size=1, max_memory=2**40)
    assert tiled.stages[-1].host >= 4096 * 4096 * 3  # the output image
    # one UNet call over the whole latent costs far more than a tile batch
    last = [s for s in tiled.stages if s.kind == "sample"][-1].name
    assert _stage(untiled, last).device > 10 * _stage(tiled, last).device


def _stage(plan, name):
    return next(s for s in plan.stages if s.name == name)


def test_the_call_decodes_and_batches_as_planned(pipe, monkeypatch):
    """Left open, tile_batch_size and vae_tile_size are the planner's choices; given, they are kept. Either
    way they reach the sampler (info, memory_plan) and the tiled decode."""
    from anysize import stages as module

    seen = []
    monkeypatch.setattr(module, "tiled_decode", lambda *a, tile_size, **k: seen.append(tile_size) or
                        tiled_decode(*a, tile_size=tile_size, **k))
    kw = dict(width=256, height=192, num_inference_steps=1, upscale_inference_steps=1, guidance_scale=1.0)
    plan = pipe.plan_memory(256, 192, guidance_scale=1.0)
    for given, expected in (({}, (plan.tile_batch_size, plan.vae_tile_size)),
                            ({"tile_batch_size": 1, "vae_tile_size": 16}, (1, 16))):
        seen.clear()
        out = pipe("x", **kw, **given, generator=torch.Generator().manual_seed(0))
        assert (out.memory_plan.tile_batch_size, out.memory_plan.vae_tile_size) == expected
        assert (out.info[0]["tile_batch_size"], out.info[0]["vae_tile_size"]) == expected
        assert seen and set(seen) == {expected[1]}
    assert plan.tile_batch_size > 1 and plan.vae_tile_size > 16


def test_default_model_missing_is_a_clear_error(tmp_path, monkeypatch):
    from anysize import models as model_loading

    monkeypatch.setattr(model_loading, "DEFAULT_MODEL_DIR", tmp_path / "no_default_model")
    with pytest.raises(ModelLoadError, match="embedded default model"):
        AnySizePipeline.from_pretrained()


def test_loading_errors(tmp_path, model_dirs):
    with pytest.raises(ModelLoadError, match="no such file"):
        AnySizePipeline.from_pretrained(base=tmp_path / "nope", upscaler=model_dirs[1])
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not really a pickle")
    with pytest.raises(ModelLoadError, match="pickle"):
        AnySizePipeline.from_pretrained(base=ckpt, img2img=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="model_index.json"):
        AnySizePipeline.from_pretrained(base=tmp_path / "empty", img2img=True)
    with pytest.raises(ModelLoadError, match="super-resolution"):
        AnySizePipeline.from_pretrained(base=model_dirs[1], upscaler=model_dirs[1])


def test_pickle_only_directory_is_refused(tmp_path, model_dirs):
    import shutil

    pickled = tmp_path / "pickled"
    shutil.copytree(model_dirs[0], pickled)
    for f in pickled.rglob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    with pytest.raises(ModelLoadError, match="pickle"):
        AnySizePipeline.from_pretrained(base=pickled, img2img=True)


def test_sdxl_base_with_pooled_embeddings_and_time_ids(tmp_path, model_dirs):
    import tiny_models

    sdxl = tiny_models.make_sdxl(tmp_path / "sdxl")
    p = AnySizePipeline.from_pretrained(base=sdxl, upscaler=model_dirs[1], device="cpu")
    p.set_progress_bar_config(disable=True)
    seen = {}
    forward = p.base.unet.forward

    def spy(*args, **kwargs):
        seen.update(kwargs["added_cond_kwargs"])
        return forward(*args, **kwargs)

    p.base.unet.forward = spy
    out = p("a green star", width=150, height=90, negative_prompt="red", generator=gen(), **FAST)
    assert out.images[0].size == (150, 90)
    assert seen["text_embeds"].shape == (2, 32) and seen["time_ids"].shape == (2, 6)
    assert not torch.equal(seen["text_embeds"][0], seen["text_embeds"][1])  # negative pooled is the uncond half


def test_upscaler_alone_serves_upscale_only(model_dirs):
    p = AnySizePipeline.from_pretrained(upscaler=model_dirs[1], device="cpu")
    p.set_progress_bar_config(disable=True)
    src = PIL.Image.new("RGB", (30, 20), (10, 200, 40))
    assert p.upscale(src, width=100, height=70, num_inference_steps=2).images[0].size == (100, 70)
    with pytest.raises(ValueError, match="base model"):
        p("x", width=64, height=64)
    with pytest.raises(ModelLoadError, match="img2img upscaling needs a base"):
        AnySizePipeline.from_pretrained(img2img=True)


@pytest.mark.parametrize("suffix", [".tif", ".dzi", ".png"])
def test_output_path_streams_the_same_pixels_to_a_file(pipe, tmp_path, suffix):
    import tifffile

    from anysize.io.output import read_metadata

    kw = dict(width=300, height=140, generator=gen(5), tile_size=8, tile_batch_size=3, **FAST)
    expected = np.asarray(pipe("a red circle", **kw).images[0])
    kw["generator"] = gen(5)
    out = pipe("a red circle", output_path=tmp_path / f"out{suffix}", output_metadata={"seed": 5}, **kw)
    assert out.images == [] and out.files == [tmp_path / f"out{suffix}"]
    if suffix == ".tif":
        written = tifffile.imread(out.files[0])
    elif suffix == ".dzi":
        with PIL.Image.open(tmp_path / "out_files" / "9" / "1_0.png") as tile:  # 2^9 >= 300: full size
            written = np.asarray(tile)
        expected = expected[:256, 256:]
    else:
        written = np.asarray(PIL.Image.open(out.files[0]))
    np.testing.assert_array_equal(written, expected)
    meta = read_metadata(out.files[0])
    assert meta["seed"] == 5 and meta["prompt"] == "a red circle" and meta["passes"] == out.info[0]["passes"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no scratch left behind


def test_upscale_output_path_and_bad_paths(pipe, tmp_path):
    source = PIL.Image.new("RGB", (40, 30), (200, 30, 30))
    out = pipe.upscale(source, 160, 120, generator=gen(), num_inference_steps=2, output_path=tmp_path / "u.tif")
    import tifffile

    assert tifffile.imread(out.files[0]).shape == (120, 160, 3)
    with pytest.raises(ValueError, match="unknown format"):
        pipe("x", width=64, height=64, output_path=tmp_path / "x.gif", **FAST)
    with pytest.raises(ValueError, match="one prompt"):
        pipe(["x", "y"], width=64, height=64, output_path=tmp_path / "x.tif", **FAST)
    with pytest.raises(ValueError, match="does not exist"):
        pipe("x", width=64, height=64, output_path=tmp_path / "no" / "x.tif", **FAST)
