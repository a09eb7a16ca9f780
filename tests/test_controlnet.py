"""ControlNet through the pipeline: stage 1 at the bucket, img2img passes crop by crop, ControlNet-tile upscaling."""

import numpy as np
import PIL.Image
import pytest
import tiny_models
import torch

from anysize import AnySizePipeline, cli
from anysize.core.sampler import batch_invariant_linears
from anysize.models import ModelLoadError
from anysize.request import Request


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def controlnets(pipe):
    return tiny_models.make_controlnet(pipe.base.unet, seed=3), tiny_models.make_controlnet(pipe.base.unet, seed=4)


@pytest.fixture(scope="module")
def cpipe(pipe, controlnets):
    """The tiny base with one ControlNet, upscaling img2img (no x4 upscaler): the modules are shared."""
    p = AnySizePipeline(pipe.base, None, controlnet=controlnets[0])
    p.set_progress_bar_config(disable=True)
    return p


def picture(w, h, seed=0):
    """A smooth test picture (a control image or a source)."""
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    rng = np.random.default_rng(seed)
    a, b = rng.uniform(2, 6, 2)
    rgb = np.stack([np.sin(a * x * 6), np.cos(b * y * 6), np.sin(3 * (x + y))], -1)
    return PIL.Image.fromarray(((rgb * 0.5 + 0.5) * 255).astype(np.uint8))


def test_stage_1_equals_diffusers_controlnet_pipeline(cpipe, controlnets):
    """At a bucket size (no stage-2 pass), stage 1 is untiled ControlNet sampling: bit for bit what
    diffusers' StableDiffusionControlNetPipeline computes from the same noise, scale and guidance window
    (its linears run row by row as ours do, so both sides compute the same arithmetic)."""
    from diffusers import StableDiffusionControlNetPipeline

    base = cpipe.base
    w, h = cpipe.buckets[len(cpipe.buckets) // 2]
    image = picture(w, h)
    kw = dict(num_inference_steps=4, guidance_scale=5.0, controlnet_conditioning_scale=0.7,
              control_guidance_start=0.25, control_guidance_end=0.75)
    ours = cpipe("a red cat", width=w, height=h, control_image=image, output_type="latent", generator=gen(1), **kw)
    ref = StableDiffusionControlNetPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
        controlnet=controlnets[0], scheduler=base.scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    with batch_invariant_linears(base.unet), batch_invariant_linears(controlnets[0]):
        theirs = ref("a red cat", image=image, width=w, height=h, output_type="latent", generator=gen(1), **kw).images
    assert ours.images[0].shape == theirs.shape
    assert torch.equal(ours.images[0], theirs)
    plain = cpipe.__class__(base, None)("a red cat", width=w, height=h, output_type="latent", generator=gen(1),
                                        num_inference_steps=4, guidance_scale=5.0)
    assert not torch.equal(plain.images[0], theirs)  # the control changed the result


def test_tile_mode_is_the_pass_input_as_control_image(cpipe):
    """ControlNet-tile upscaling: with one img2img pass, 'tile' is the source itself as the control image."""
    source = picture(48, 32, seed=2)
    kw = dict(num_inference_steps=3, strength=0.6, generator=None, tile_batch_size=4)
    tile = cpipe.upscale(source, 96, 64, control_image="tile", **{**kw, "generator": gen(3)})
    explicit = cpipe.upscale(source, 96, 64, control_image=source, **{**kw, "generator": gen(3)})
    assert np.array_equal(np.asarray(tile.images[0]), np.asarray(explicit.images[0]))
    assert tile.info[0]["controlnet"][0]["control_image"] == "tile"
    assert tile.info[0]["controlnet"][0]["phases"] == ["pass 1"]


def test_two_controlnets_bit_identical_whatever_tile_batch_size(pipe, controlnets):
    """Several ControlNets (one on an image, one in tile mode) in stage 1 and a tiled img2img pass: the
    tile batch changes no bit; each ControlNet changes the image."""
    both = AnySizePipeline(pipe.base, None, controlnet=list(controlnets))
    both.set_progress_bar_config(disable=True)
    control = picture(160, 96, seed=5)
    kw = dict(width=160, height=96, num_inference_steps=2, upscale_inference_steps=3, guidance_scale=3.0)
    outs = [np.asarray(both("a cat", control_image=[control, "tile"], controlnet_conditioning_scale=[0.8, 0.5],
                            tile_batch_size=b, generator=gen(2), **kw).images[0]) for b in (1, 3, 16)]
    assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], outs[2])
    one = AnySizePipeline(pipe.base, None, controlnet=controlnets[0])
    one.set_progress_bar_config(disable=True)
    single = np.asarray(one("a cat", control_image=control, controlnet_conditioning_scale=0.8, tile_batch_size=3,
                            generator=gen(2), **kw).images[0])
    assert not np.array_equal(outs[0], single)


def test_the_plan_says_where_each_controlnet_acts_and_the_memory_plan_counts_it(pipe, cpipe):
    plain = AnySizePipeline(pipe.base, None)
    request = dict(width=160, height=96, tile_batch_size=4)
    with_control = cpipe.plan_run(Request(control_images=("abc",), **request))
    without = plain.plan_run(Request(**request))
    assert [p.controls for p in with_control.sampling] == [(0,), (0,)]
    for a, b in zip(with_control.memory.stages, without.memory.stages):
        if a.kind == "sample":
            assert a.device > b.device and a.host > b.host and "1 ControlNet" in a.detail
    tile = cpipe.plan_run(Request(control_images=("tile",), **request))
    assert [p.controls for p in tile.sampling] == [(), (0,)]  # stage 1 has no input to be steered by


def test_beyond_the_buckets_a_controlnet_samples_stage_1_at_the_ratio_by_default(pipe, cpipe):
    # 8:1 is far beyond the tiny model's buckets: "auto" stretches the nearest bucket, unless a ControlNet
    # steers stage 1 (its control image sets the layout); an explicit mode is kept either way
    request = dict(width=512, height=64)
    plain = AnySizePipeline(pipe.base, None)
    bucket = plain.plan_run(Request(**request))
    assert not bucket.panorama and bucket.base in plain.buckets
    steered = cpipe.plan_run(Request(control_images=("abc",), **request))
    assert steered.panorama and not steered.tiled and steered.base[0] / steered.base[1] == 8
    assert not cpipe.plan_run(Request(control_images=("abc",), panorama="stretch", **request)).panorama
    assert not cpipe.plan_run(Request(control_images=("tile",), **request)).panorama  # stage 1 unsteered
    assert cpipe.plan_run(Request(control_images=("abc",), panorama="tiled", **request)).tiled


@pytest.mark.parametrize("kwargs, message", [
    (dict(), "0 given for 1 ControlNet"),
    (dict(control_image=["tile", "tile"]), "2 given for 1 ControlNet"),
    (dict(control_image="edges"), "must be an image or 'tile'"),
    (dict(control_image="tile", controlnet_conditioning_scale=-1), "controlnet_conditioning_scale=-1"),
    (dict(control_image="tile", controlnet_conditioning_scale=[1, 2]), "2 values for 1 ControlNets"),
    (dict(control_image="tile", control_guidance_start=0.6, control_guidance_end=0.5), "start must come before"),
    (dict(control_image="tile", control_guidance_end=float("nan")), "control_guidance_end=nan"),
])
def test_bad_control_arguments_get_one_line_errors(cpipe, kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        cpipe("a cat", width=160, height=96, num_inference_steps=1, upscale_inference_steps=1, **kwargs)
    assert "\n" not in str(info.value)


def test_controlnets_steer_only_the_base_model(pipe, controlnets):
    with pytest.raises(ValueError, match="has no ControlNet"):
        pipe("a cat", width=64, height=64, control_image=picture(64, 64))
    with_up = AnySizePipeline(pipe.base, pipe.upscaler, controlnet=controlnets[0])
    with pytest.raises(ValueError, match="an x4 upscaler runs stage 2"):
        with_up("a cat", width=256, height=256, control_image="tile")
    with pytest.raises(ValueError, match="steers the base model, which runs no phase"):
        with_up.upscale(picture(32, 32), 128, 128, control_image=picture(32, 32))
    cpipe = AnySizePipeline(pipe.base, None, controlnet=controlnets[0])
    w, h = cpipe.buckets[0]
    with pytest.raises(ValueError, match="has no stage-2 pass"):
        cpipe("a cat", width=w, height=h, control_image="tile")


def test_a_controlnet_for_another_model_is_refused(pipe, sr_unet):
    from diffusers import ControlNetModel

    wrong_factor = ControlNetModel.from_unet(pipe.base.unet, conditioning_embedding_out_channels=(8, 16, 32))
    with pytest.raises(ModelLoadError, match="control px per latent px is 4, the base model's is 2"):
        AnySizePipeline(pipe.base, None, controlnet=wrong_factor)
    with pytest.raises(ModelLoadError, match="latent channels is 7"):
        AnySizePipeline(pipe.base, None, controlnet=ControlNetModel.from_unet(sr_unet))
    with pytest.raises(ModelLoadError, match="steers a base model"):
        AnySizePipeline(None, pipe.upscaler, controlnet=wrong_factor)


def test_request_round_trips_control_settings_and_identity_names_them():
    req = Request(width=64, height=64, control_images=("abc", "tile")).validate(controlnets=2)
    assert req.controlnet_conditioning_scale == (1.0, 1.0) and req.control_guidance_end == (1.0, 1.0)
    assert Request.from_json(req.to_json()) == req
    assert req.sampling_identity()["control_images"] == ["abc", "tile"]
    assert "control_images" not in Request(width=64, height=64).validate().sampling_identity()


@pytest.fixture(scope="module")
def controlnet_dir(tmp_path_factory, controlnets):
    path = tmp_path_factory.mktemp("controlnet") / "net"
    controlnets[0].save_pretrained(path, safe_serialization=True)
    return path


def test_cli_generates_with_a_controlnet_and_a_control_image(model_dirs, controlnet_dir, tmp_path, capsys):
    control = tmp_path / "edges.png"
    picture(160, 96).save(control)
    out = tmp_path / "out.png"
    code = cli.main(["generate", "a cat", "--size", "160x96", "-o", str(out), "--base", str(model_dirs[0]),
                     "--img2img", "--controlnet", str(controlnet_dir), "--control-image", str(control),
                     "--controlnet-scale", "0.6", "--steps", "2", "--upscale-steps", "2", "--seed", "1", "--quiet"])
    assert code == 0, capsys.readouterr().err
    with PIL.Image.open(out) as image:
        assert image.size == (160, 96)
        assert '"controlnet"' in image.info["anysize"]


@pytest.mark.parametrize("extra, message", [
    (["--control-image", "missing.png"], "--control-image 'missing.png': no such file"),
    ([], "--control-image: 0 given for 1 --controlnet"),
])
def test_cli_refuses_a_missing_control_image_in_one_line(model_dirs, controlnet_dir, tmp_path, capsys, extra,
                                                          message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out.png"
    code = cli.main(["generate", "a cat", "--size", "160x96", "-o", str(out), "--base", str(model_dirs[0]),
                     "--img2img", "--controlnet", str(controlnet_dir), *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_control_settings_need_a_controlnet(model_dirs, tmp_path, capsys):
    code = cli.main(["generate", "a cat", "--size", "160x96", "-o", str(tmp_path / "o.png"), "--base",
                     str(model_dirs[0]), "--controlnet-scale", "0.5"])
    assert code == 2 and "--controlnet-scale: sets a ControlNet" in capsys.readouterr().err


def test_loading_refuses_pickle_only_and_non_controlnet_directories(tmp_path, controlnet_dir, model_dirs):
    from anysize.models import load_controlnet

    net = load_controlnet(controlnet_dir, device=torch.device("cpu"), dtype=torch.float32)
    assert type(net).__name__ == "ControlNetModel"
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((controlnet_dir / "config.json").read_text())
    (pickled / "diffusion_pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ModelLoadError, match="holds only pickle weights"):
        load_controlnet(pickled, device=torch.device("cpu"), dtype=torch.float32)
    with pytest.raises(ModelLoadError, match="has no config.json"):
        load_controlnet(model_dirs[0], device=torch.device("cpu"), dtype=torch.float32)
    with pytest.raises(ModelLoadError, match="is a UNet2DConditionModel"):
        load_controlnet(model_dirs[0] / "unet", device=torch.device("cpu"), dtype=torch.float32)
