"""Samplers by name: every one builds from a model's config and runs through the tiled loop; A1111 names."""

import numpy as np
import PIL.Image
import pytest
import torch

from anysize import AnySizePipeline, cli
from anysize.infotext import parameters
from anysize.schedulers import SCHEDULERS, a1111_name, make, short_name


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def img2img(pipe):
    p = AnySizePipeline(pipe.base, None)
    p.set_progress_bar_config(disable=True)
    yield p
    p.scheduler = "ddim"  # the shared tiny base's own kind, for the modules that share it after


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_every_scheduler_runs_both_stages_through_the_tiled_loop(img2img, name):
    """Stage 1 and a tiled img2img pass (4 tiles a step) with each sampler; the model's training
    schedule (betas, prediction type) stays, and its A1111 name comes back from the instance."""
    img2img.set_scheduler(name)
    scheduler = img2img.scheduler
    assert type(scheduler).__name__ == SCHEDULERS[name].cls
    assert scheduler.config.prediction_type == "epsilon" and scheduler.config.num_train_timesteps == 1000
    assert short_name(scheduler) == name
    assert a1111_name(scheduler) == (SCHEDULERS[name].a1111, SCHEDULERS[name].schedule)
    out = img2img("a red circle", width=128, height=96, num_inference_steps=3, upscale_inference_steps=4,
                  strength=0.75, tile_batch_size=2, generator=gen(1), output_type="np")
    image = out.images[0]
    assert image.shape == (96, 128, 3) and np.isfinite(image).all() and image.std() > 0
    assert out.info[0]["scheduler"] == name and out.info[0]["upscale_scheduler"] == name


def test_schedulers_change_the_result_and_stay_bit_identical_across_tile_batches(img2img):
    results = {}
    for name in ("dpm++2m-karras", "euler-a"):
        img2img.set_scheduler(name)
        runs = [np.asarray(img2img("a red circle", width=128, height=96, num_inference_steps=3,
                                   upscale_inference_steps=3, strength=0.6, tile_batch_size=b,
                                   generator=gen(2)).images[0]) for b in (1, 5)]
        assert np.array_equal(runs[0], runs[1])
        results[name] = runs[0]
    assert not np.array_equal(results["dpm++2m-karras"], results["euler-a"])


def test_stage_two_may_sample_with_its_own_scheduler(img2img):
    img2img.set_scheduler("euler")
    img2img.set_scheduler("unipc", stage="upscale")
    try:
        out = img2img("a red circle", width=128, height=96, num_inference_steps=2, upscale_inference_steps=2,
                      generator=gen(0))
        assert (out.info[0]["scheduler"], out.info[0]["upscale_scheduler"]) == ("euler", "unipc")
    finally:
        img2img.upscale_scheduler = None
    with pytest.raises(ValueError, match="unknown; one of ddim"):
        img2img.set_scheduler("dpm++3m")
    with pytest.raises(ValueError, match="is not a diffusers scheduler"):
        img2img.set_scheduler(object())
    with pytest.raises(ValueError, match="stage='refiner'"):
        img2img.set_scheduler("ddim", stage="refiner")


def test_make_keeps_the_models_schedule(pipe):
    upscaler = pipe.upscaler.scheduler.config  # v-prediction
    assert make("dpm++2m-karras", upscaler).config.prediction_type == "v_prediction"
    assert make("dpm++2m-karras", upscaler).config.use_karras_sigmas


def test_a1111_parameters_text_from_a_cli_png(model_dirs, tmp_path, capsys):
    out = tmp_path / "out.png"
    code = cli.main(["generate", "a red circle, small", "--size", "160x96", "-o", str(out), "--base",
                     str(model_dirs[0]), "--img2img", "--steps", "2", "--upscale-steps", "2", "--seed", "7",
                     "--scheduler", "dpm++2m-karras", "--negative", "blurry", "--quiet"])
    assert code == 0, capsys.readouterr().err
    with PIL.Image.open(out) as image:
        text = image.info["parameters"]
    prompt, negative, settings = text.split("\n")
    assert prompt == "a red circle, small" and negative == "Negative prompt: blurry"
    pairs = dict(p.split(": ", 1) for p in settings.split(", "))
    assert pairs["Steps"] == "2" and pairs["Sampler"] == "DPM++ 2M" and pairs["Schedule type"] == "Karras"
    assert pairs["CFG scale"] == "7.5" and pairs["Seed"] == "7" and pairs["Size"] == "160x96"
    assert pairs["Denoising strength"] == "0.3" and pairs["Tiling"] == "fstd" and pairs["Upscale steps"] == "2"
    assert pairs["Version"].startswith("anysize ")


def test_cli_refuses_an_unknown_scheduler(capsys):
    code = cli.main(["generate", "x", "--size", "64x64", "-o", "x.png", "--scheduler", "dpm++9m"])
    assert code == 2 and "--scheduler" in capsys.readouterr().err


def test_parameters_quote_values_with_commas_and_skip_what_is_missing():
    text = parameters({"request": {"call": "upscale", "prompt": "p", "width": 64, "height": 32,
                                   "upscale_inference_steps": 5, "guidance_scale": 1.0, "source_size": [16, 8],
                                   "strength": 0.3}, "upscale_scheduler": "MyScheduler", "base": "a, b",
                       "passes": [[32, 16], [64, 32]], "tiling": "fstd", "upscaler": "base (img2img)"})
    assert text.split("\n")[1] == ('Steps: 5, Sampler: My, CFG scale: 1.0, Size: 64x32, Model: "a, b", '
                                   'Source size: 16x8, Stage 2 passes: 32x16 64x32, Tiling: fstd, '
                                   'Denoising strength: 0.3')
    assert parameters({"prompt": "no request"}) is None
