"""SD3 and FLUX through both stages (tiny random-weight pipelines saved in diffusers layout, offline): stage 1
is diffusers' own pipeline bit for bit, the output has exactly the asked size at odd sizes, tiled img2img
passes do not depend on the tile batch, a run directory resumes to the same image, and what anysize does
only for UNets is refused in one line."""

import numpy as np
import pytest
import tiny_models
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline

from anysize import AnySizePipeline, cli
from anysize.core.dit import unpack
from anysize.io.output import read_metadata

SMALL = [(64, 64), (96, 48), (48, 96)]  # stage 1's buckets in these tests: small, so stage 2 has passes
KW = dict(num_inference_steps=2, upscale_inference_steps=2, guidance_scale=3.5)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit")
    return {"flux": tiny_models.make_flux(root / "flux"), "sd3": tiny_models.make_sd3(root / "sd3")}


@pytest.fixture(scope="module", params=["flux", "sd3"])
def arch(request):
    return request.param


@pytest.fixture(scope="module")
def pipe(dirs, arch):
    p = AnySizePipeline.from_pretrained(dirs[arch], device="cpu", buckets=SMALL)
    p.set_progress_bar_config(disable=True)
    return p


def negative(arch):
    return {} if arch == "flux" else {"negative_prompt": "dark"}


def test_loading_names_the_family_and_its_geometry(pipe, arch):
    assert pipe.granularity == 4  # VAE factor 2 x 2 (FLUX's packing, SD3's patch)
    assert pipe.upscaler is None and pipe.model_ids["upscaler"] == "base (img2img)"
    assert pipe.base_tile == {"flux": 128, "sd3": 32}[arch]
    default = AnySizePipeline(pipe.base)
    assert default.buckets[len(default.buckets) // 2] == {"flux": (256, 256), "sd3": (64, 64)}[arch]


def test_stage_1_is_diffusers_own_pipeline(pipe, arch):
    """At a bucket (no stage-2 pass) stage 1 is untiled: bit for bit diffusers' FluxPipeline /
    StableDiffusion3Pipeline on the same components, prompt, generator and steps (FLUX: its guidance
    embedding and the shift of the whole latent's token count)."""
    w, h = 96, 48
    ours = pipe("a red cat", height=h, width=w, generator=gen(3), output_type="latent", num_inference_steps=3,
                guidance_scale=4.0, **negative(arch)).images[0]
    base = pipe.base
    cls = FluxPipeline if arch == "flux" else StableDiffusion3Pipeline
    ref = cls(**base.components)
    ref.set_progress_bar_config(disable=True)
    theirs = ref("a red cat", height=h, width=w, generator=gen(3), output_type="latent", num_inference_steps=3,
                 guidance_scale=4.0, **negative(arch)).images
    if arch == "flux":
        theirs = unpack(theirs, h // 2, w // 2)
    assert ours.shape == theirs.shape and torch.equal(ours, theirs)


def test_exact_size_at_odd_sizes_through_both_stages(pipe):
    for w, h in ((203, 117), (117, 203), (250, 61)):
        out = pipe("a red cat on grass", height=h, width=w, generator=gen(1), tile_size=16, **KW)
        assert out.images[0].size == (w, h)
        assert out.info[0]["passes"], "an img2img pass with the same model"
        assert np.asarray(out.images[0]).std() > 0


def test_tiled_passes_are_bit_identical_whatever_the_tile_batch(pipe, arch):
    images = [np.asarray(pipe("a red cat", height=150, width=230, generator=gen(2), tile_size=16,
                              tile_batch_size=b, **KW, **negative(arch)).images[0]) for b in (1, 3, 16)]
    assert np.array_equal(images[0], images[1]) and np.array_equal(images[0], images[2])


def test_a_run_directory_resumes_to_the_same_image(pipe, tmp_path):
    kw = {**KW, "upscale_inference_steps": 4, "strength": 0.5}  # two stage-2 steps: the crash is after the first
    expected = np.asarray(pipe("a red cat", height=150, width=230, generator=gen(4), tile_size=16, **kw).images[0])

    def crash(p, i, t, kw):
        if kw["stage"] == "upscale" and i == 1:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated"):
        pipe("a red cat", height=150, width=230, generator=gen(4), tile_size=16, run_dir=tmp_path / "run",
             callback_on_step_end=crash, **kw)
    assert (tmp_path / "run" / "phase1.step.safetensors").is_file()
    resumed = pipe("a red cat", height=150, width=230, generator=gen(4), tile_size=16, run_dir=tmp_path / "run", **kw)
    assert np.array_equal(np.asarray(resumed.images[0]), expected)


@pytest.mark.parametrize("call, words", [
    (dict(guidance_rescale=0.5), "guidance_rescale: anysize supports it"),
])
def test_unet_only_features_are_refused_in_one_line(pipe, call, words):
    kwargs = {"prompt": "a red cat", **call}
    with pytest.raises(ValueError) as caught:
        pipe(height=48, width=96, num_inference_steps=1, **kwargs)
    assert words in str(caught.value) and "\n" not in str(caught.value)


def test_prompt_embeds_of_a_transformer_are_its_prompt(pipe, arch):
    """prompt_embeds and pooled_prompt_embeds (and the negatives: SD3's CFG, FLUX's true CFG) as diffusers'
    encode_prompt gives them make the image the prompt makes, bit for bit; FLUX's negative comes as
    embeddings with true CFG or not at all, and embeddings of the wrong width get one line."""
    base = pipe.base
    kw = dict(height=48, width=96, num_inference_steps=2, guidance_scale=3.5, output_type="latent")
    with torch.no_grad():  # as the pipeline encodes (the text encoders' attention kernels differ with grad)
        if arch == "flux":
            encode = dict(prompt_2=None, device=torch.device("cpu"), num_images_per_prompt=1)
            pos, pooled, _ = base.encode_prompt("a red cat", **encode)
            neg, neg_pooled, _ = base.encode_prompt("dark", **encode)
            text, extra = dict(negative_prompt="dark"), dict(true_cfg_scale=4.0)
        else:
            pos, neg, pooled, neg_pooled = base.encode_prompt("a red cat", None, None, device=torch.device("cpu"),
                                                              do_classifier_free_guidance=True, negative_prompt="dark")
            text, extra = dict(negative_prompt="dark"), {}
    by_text = pipe("a red cat", generator=gen(2), **text, **extra, **kw).images[0]
    by_embeds = pipe(prompt_embeds=pos, pooled_prompt_embeds=pooled, negative_prompt_embeds=neg,
                     negative_pooled_prompt_embeds=neg_pooled, generator=gen(2), **extra, **kw).images[0]
    assert torch.equal(by_text, by_embeds)
    if arch == "flux":
        with pytest.raises(ValueError, match="FLUX's negative comes as negative_prompt_embeds"):
            pipe(prompt_embeds=pos, pooled_prompt_embeds=pooled, true_cfg_scale=4.0, **kw)
    with pytest.raises(ValueError, match="must be a \\(prompts, tokens,"):
        pipe(prompt_embeds=pos[..., :-1], pooled_prompt_embeds=pooled, **kw)
    with pytest.raises(ValueError, match="pooled_prompt_embeds: an .* base model needs them"):
        pipe(prompt_embeds=pos, **kw)
    with pytest.raises(ValueError, match="pooled_prompt_embeds: \\(1, 3\\), must be a \\(1, "):
        pipe(prompt_embeds=pos, pooled_prompt_embeds=pooled[:, :3], **kw)


def test_region_prompts_reach_both_stages_of_a_transformer(pipe, arch, monkeypatch):
    """Region prompts on SD3 / FLUX: every phase's denoiser gets the region, its box on that phase's
    latent and its own pooled embedding; the region changes the image, mostly where it lies; the
    metadata records it."""
    from anysize.core import dit

    den_cls = dit.FluxTileDenoiser if arch == "flux" else dit.SD3TileDenoiser
    seen = []
    real = den_cls.__init__

    def spy(self, *args, regions=(), **kwargs):
        seen.append(tuple(regions))
        real(self, *args, regions=regions, **kwargs)

    monkeypatch.setattr(den_cls, "__init__", spy)
    kw = dict(height=117, width=203, tile_size=16, **KW, **negative(arch))
    out = pipe("a red cat", regions=[((0, 0, 100, 117), "a blue dog")], generator=gen(1), **kw)
    assert out.images[0].size == (203, 117)
    assert out.info[0]["regions"] == [[[0.0, 0.0, 100 / 203, 1.0], "a blue dog", 1.0]]
    assert len(seen) >= 2 and all(len(r) == 1 for r in seen), "stage 1 and every stage-2 pass"
    widths = [r[0].canvas[1] for r in seen]
    assert widths == sorted(widths) and widths[0] < widths[-1]
    assert all(r[0].added["pooled_projections"].ndim == 2 for r in seen)
    plain = np.asarray(pipe("a red cat", generator=gen(1), **kw).images[0]).astype(float)
    diff = np.abs(np.asarray(out.images[0]).astype(float) - plain)
    assert diff[:, :90].mean() > 2 * diff[:, 120:].mean() > 0


def test_flux_true_cfg_with_a_negative_prompt_is_flux_pipeline(dirs):
    """FLUX's negative prompt acts through true CFG (diffusers' true_cfg_scale): stage 1 is FluxPipeline
    bit for bit; a negative prompt alone, or true CFG alone, is refused in one line before any compute."""
    p = AnySizePipeline.from_pretrained(dirs["flux"], device="cpu", buckets=SMALL)
    p.set_progress_bar_config(disable=True)
    kw = dict(height=48, width=96, num_inference_steps=2, guidance_scale=3.5, output_type="latent")
    ours = p("a red cat", negative_prompt="dark", true_cfg_scale=4.0, generator=gen(2), **kw).images[0]
    ref = FluxPipeline(**p.base.components)
    ref.set_progress_bar_config(disable=True)
    theirs = ref("a red cat", negative_prompt="dark", true_cfg_scale=4.0, generator=gen(2), **kw).images
    assert torch.equal(ours, unpack(theirs, 24, 48))
    assert not torch.equal(ours, p("a red cat", generator=gen(2), **kw).images[0])
    for bad in (dict(negative_prompt="dark"), dict(true_cfg_scale=4.0)):
        with pytest.raises(ValueError, match="negative prompt acts only through true CFG"):
            p("a red cat", **bad, **kw)


def test_true_cfg_is_flux_only(dirs):
    p = AnySizePipeline.from_pretrained(dirs["sd3"], device="cpu", buckets=SMALL)
    with pytest.raises(ValueError, match="true_cfg_scale=2.0: FLUX's true CFG; this base \\(sd3\\)"):
        p("a red cat", height=48, width=96, num_inference_steps=1, true_cfg_scale=2.0)


def test_cli_generates_with_a_transformer_base(dirs, arch, tmp_path, capsys):
    out = tmp_path / "dit.png"
    code = cli.main(["generate", "a red cat on grass", "--size", "203x117", "-o", str(out), "--base", str(dirs[arch]),
                     "--buckets", "96x48,64x64,48x96", "--steps", "2", "--upscale-steps", "2", "--seed", "5",
                     "--guidance", "3.5", "--tile-size", "16", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "stage 2: 2 passes" in err or "stage 2: 1 pass" in err, err
    meta = read_metadata(out)
    assert meta["width"] == 203 and meta["height"] == 117 and "Pipeline" in meta["base"]


def test_sd3_without_its_t5(dirs, tmp_path, capsys):
    """--no-t5: SD3's CLIP encoders alone read the prompt (diffusers pads the T5 part with zeros); another
    image than with T5; FLUX, which reads the prompt only through T5, refuses it in one line."""
    kw = dict(height=48, width=96, generator=gen(1), output_type="latent", num_inference_steps=2)
    with_t5 = AnySizePipeline.from_pretrained(dirs["sd3"], device="cpu", buckets=SMALL)
    without = AnySizePipeline.from_pretrained(dirs["sd3"], device="cpu", buckets=SMALL, without_t5=True)
    assert without.base.text_encoder_3 is None
    a, b = (p("a red cat", **kw).images[0] for p in (with_t5, without))
    assert a.shape == b.shape and not torch.equal(a, b)
    capsys.readouterr()  # the progress bars above
    code = cli.main(["generate", "x", "--size", "96x48", "-o", str(tmp_path / "x.png"), "--base", str(dirs["flux"]),
                     "--no-t5", "--steps", "1"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "--no-t5) is for SD3" in err and "FluxPipeline" in err


def test_samplers_of_a_flow_matching_model(pipe):
    """'euler' is the model's own FlowMatchEulerDiscreteScheduler; an SD noise-schedule sampler is refused."""
    p = AnySizePipeline(pipe.base, buckets=SMALL)
    p.set_progress_bar_config(disable=True)
    original = pipe.base.scheduler  # set_scheduler sets the shared diffusers pipeline's: put it back after
    try:
        p.set_scheduler("euler-karras")
        assert type(p.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
        assert p.scheduler.config.use_karras_sigmas
        assert p("a red cat", height=48, width=96, num_inference_steps=2).images[0].size == (96, 48)
        with pytest.raises(ValueError, match="'dpm\\+\\+2m': samples the SD / SDXL noise schedule"):
            p.set_scheduler("dpm++2m")
    finally:
        pipe.base.scheduler = original


# ---------------------------------------------------------------------- single-file transformers
def _sd3_file(dirs, tmp_path, seed=5):
    """A single-file SD3 checkpoint (original MMDiT layout) of a transformer of the tiny SD3's config with
    other weights than the directory's: (its path, that transformer)."""
    from diffusers import SD3Transformer2DModel
    from safetensors.torch import save_file

    config = SD3Transformer2DModel.load_config(dirs["sd3"] / "transformer")
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel.from_config(config).eval()
    path = tmp_path / "sd3_tiny.safetensors"
    save_file(tiny_models.sd3_original_layout(transformer), str(path))
    return path, transformer


def test_a_single_file_sd3_transformer_with_its_config_directory(dirs, tmp_path, capsys):
    """An SD3 transformer in its original single-file layout loads (``config=``: the family's diffusers
    directory, for the VAE and text encoders): its weights bit for bit, not the directory's, and stage 1 is
    diffusers' StableDiffusion3Pipeline with that transformer bit for bit; the CLI runs it; without a
    config, or with another family's, one line and exit 1."""
    path, source = _sd3_file(dirs, tmp_path)
    p = AnySizePipeline.from_pretrained(path, config=dirs["sd3"], device="cpu", buckets=SMALL)
    p.set_progress_bar_config(disable=True)
    loaded, want = p.base.transformer.state_dict(), source.state_dict()
    assert loaded.keys() == want.keys() and all(torch.equal(loaded[k], want[k]) for k in want)
    directory = StableDiffusion3Pipeline.from_pretrained(dirs["sd3"])
    assert not torch.equal(directory.transformer.proj_out.weight, loaded["proj_out.weight"])
    kw = dict(height=48, width=96, num_inference_steps=2, guidance_scale=4.0, negative_prompt="dark",
              output_type="latent")
    ours = p("a red cat", generator=gen(3), **kw).images[0]
    ref = StableDiffusion3Pipeline(**{**directory.components, "transformer": source})
    ref.set_progress_bar_config(disable=True)
    assert torch.equal(ours, ref("a red cat", generator=gen(3), **kw).images)
    capsys.readouterr()
    out = tmp_path / "file.png"
    args = ["generate", "a red cat", "--size", "130x70", "-o", str(out), "--base", str(path), "--steps", "1",
            "--upscale-steps", "1", "--buckets", "96x48,64x64,48x96", "--tile-size", "16", "--device", "cpu"]
    assert cli.main([*args, "--config", str(dirs["sd3"])]) == 0, capsys.readouterr().err
    assert read_metadata(out)["width"] == 130
    for extra, words in (([], "needs its family's VAE and text encoders: pass config=DIR (CLI: --config DIR)"),
                         (["--config", str(dirs["flux"])], "is a FluxPipeline, not a StableDiffusion3Pipeline")):
        capsys.readouterr()
        assert cli.main([*args[:5], str(tmp_path / "no.png"), *args[6:], *extra]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err and "Traceback" not in err, err
        assert not (tmp_path / "no.png").exists()


def test_a_single_file_flux_transformer_goes_to_diffusers_with_its_config(dirs, tmp_path, monkeypatch):
    """A FLUX file (original layout, ``double_blocks.*``, as flux1-dev.safetensors) is read by diffusers'
    ``FluxTransformer2DModel.from_single_file`` with the config directory's ``transformer`` subfolder, and
    the pipeline is that directory's with the file's transformer. diffusers' FLUX conversion fixes
    FLUX.1's width (3072), so a tiny FLUX cannot be converted: here diffusers' converter is replaced by
    one returning a tiny transformer, and what is checked is the routing anysize does around it."""
    import diffusers
    from safetensors.torch import save_file

    path = tmp_path / "flux_tiny.safetensors"
    save_file({"model.diffusion_model.double_blocks.0.img_attn.qkv.weight": torch.zeros(3, 1)}, str(path))
    config = diffusers.FluxTransformer2DModel.load_config(dirs["flux"] / "transformer")
    torch.manual_seed(7)
    source = diffusers.FluxTransformer2DModel.from_config(config).eval()
    calls = []

    def converted(cls, file, **kwargs):
        calls.append((file, kwargs))
        return source

    monkeypatch.setattr(diffusers.FluxTransformer2DModel, "from_single_file", classmethod(converted))
    p = AnySizePipeline.from_pretrained(path, config=dirs["flux"], device="cpu", buckets=SMALL)
    assert type(p.base).__name__ == "FluxPipeline" and p.base.transformer is source
    (file, kwargs), = calls
    assert file == str(path) and kwargs["config"] == str(dirs["flux"]) and kwargs["subfolder"] == "transformer"
    p.set_progress_bar_config(disable=True)
    assert p("a red cat", height=48, width=96, num_inference_steps=1, generator=gen(1)).images[0].size == (96, 48)
    with pytest.raises(Exception, match="is a StableDiffusion3Pipeline, not a FluxPipeline"):
        AnySizePipeline.from_pretrained(path, config=dirs["sd3"], device="cpu")


# ---------------------------------------------------------------------- SD3 and FLUX ControlNets
@pytest.fixture(scope="module")
def dit_controlnet(dirs, arch, tmp_path_factory):
    """A tiny ControlNet directory of ``arch`` (FluxControlNetModel / SD3ControlNetModel) for its tiny base."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    cls = FluxTransformer2DModel if arch == "flux" else SD3Transformer2DModel
    transformer = cls.from_pretrained(dirs[arch] / "transformer")
    directory = tmp_path_factory.mktemp(f"{arch}cn") / "net"
    make = tiny_models.make_flux_controlnet if arch == "flux" else tiny_models.make_sd3_controlnet
    make(transformer).save_pretrained(directory, safe_serialization=True)
    return directory


def test_a_transformer_controlnet_steers_both_stages(dirs, arch, dit_controlnet, tmp_path, capsys):
    """A FluxControlNetModel / SD3ControlNetModel directory (--controlnet) with a control image steers
    stage 1 and every img2img pass (each phase's condition encoded at its size); 'tile' (the pass's own
    input as the condition) runs too; the memory plan names it; the CLI takes it."""
    import PIL.Image

    p = AnySizePipeline.from_pretrained(dirs[arch], controlnet=dit_controlnet, device="cpu", buckets=SMALL)
    p.set_progress_bar_config(disable=True)
    control = PIL.Image.new("RGB", (203, 117))
    control.paste((255, 255, 255), (20, 20, 90, 90))
    kw = dict(height=117, width=203, tile_size=16, **KW, **negative(arch))
    out = p("a red cat", control_image=control, generator=gen(1), **kw)
    off = p("a red cat", control_image=control, controlnet_conditioning_scale=0.0, generator=gen(1), **kw)
    assert out.images[0].size == (203, 117) and out.info[0]["passes"]
    diff = np.abs(np.asarray(out.images[0]).astype(float) - np.asarray(off.images[0]).astype(float))
    assert diff.mean() > 1, "the ControlNet steers"
    tile = p("a red cat", control_image="tile", generator=gen(1), **kw)
    assert tile.images[0].size == (203, 117)
    plan = p.plan_memory(203, 117, control_images=(control,), tile_size=16)
    assert all("1 ControlNet" in s.detail for s in plan.stages if s.kind == "sample")
    without = AnySizePipeline(p.base, buckets=SMALL).plan_memory(203, 117, tile_size=16)
    pairs = [(a.device, b.device) for a, b in zip(plan.stages, without.stages) if a.kind == "sample"]
    assert pairs and all(a > b for a, b in pairs), "the planner counts the ControlNet's residuals and weights"
    hosts = [(a.host, b.host) for a, b in zip(plan.stages, without.stages) if a.kind == "sample"]
    assert all(a == b for a, b in hosts), "its condition is encoded latents on the device, no image on the host"
    path = tmp_path / "control.png"
    control.save(path)
    capsys.readouterr()
    code = cli.main(["generate", "a red cat", "--size", "203x117", "-o", str(tmp_path / "c.png"), "--base",
                     str(dirs[arch]), "--controlnet", str(dit_controlnet), "--control-image", str(path),
                     "--buckets", "96x48,64x64,48x96", "--steps", "1", "--upscale-steps", "1", "--tile-size", "16",
                     "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    assert read_metadata(tmp_path / "c.png")["width"] == 203


@pytest.mark.parametrize("which, words", [
    ("unet-on-flux", "a ControlNetModel for a FLUX base"),
    ("flux-on-sd3", "a FluxControlNetModel for a SD3 base"),
    ("xlabs", "pixel hint block (XLabs' layout)"),
    ("union", "ControlNet-Union (num_mode=2)"),
    ("sd3-extra", "an SD3 ControlNet with 4 extra conditioning channels"),
    ("sd3-deep", "3 blocks for a transformer of 2"),
])
def test_controlnets_a_transformer_cannot_take_are_refused_in_one_line(dirs, which, words):
    from diffusers import FluxTransformer2DModel

    from anysize.models import ModelLoadError

    transformer = FluxTransformer2DModel.from_pretrained(dirs["flux"] / "transformer")
    base = "sd3" if which.startswith(("flux-on-sd3", "sd3")) else "flux"
    if which == "unet-on-flux":
        net = tiny_models.make_controlnet(tiny_models._unet(4, 32))
    elif which.startswith("sd3"):
        from diffusers import SD3Transformer2DModel

        sd3 = SD3Transformer2DModel.from_pretrained(dirs["sd3"] / "transformer")
        extra = dict(extra_conditioning_channels=4) if which == "sd3-extra" else dict(num_layers=3)
        net = tiny_models.make_sd3_controlnet(sd3, **extra)
    else:
        extra = {"xlabs": dict(conditioning_embedding_channels=16), "union": dict(num_mode=2)}.get(which, {})
        net = tiny_models.make_flux_controlnet(transformer, **extra)
    with pytest.raises(ModelLoadError) as caught:
        AnySizePipeline.from_pretrained(dirs[base], controlnet=net, device="cpu")
    assert words in str(caught.value) and "\n" not in str(caught.value)


def test_the_lora_scale_reaches_the_transformer(dirs, arch):
    """cross_attention_kwargs={"scale": s} is diffusers' LoRA scale; on SD3 / FLUX it reaches every
    transformer call (diffusers' joint_attention_kwargs): scale 0 is the model without its LoRA bit for
    bit, scale 1 another image."""
    from peft import LoraConfig

    p = AnySizePipeline.from_pretrained(dirs[arch], device="cpu", buckets=SMALL)
    p.set_progress_bar_config(disable=True)
    kw = dict(height=117, width=203, tile_size=16, output_type="latent", **KW, **negative(arch))
    plain = p("a red cat", generator=gen(4), **kw).images[0]
    torch.manual_seed(3)
    p.base.transformer.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                              target_modules=["to_q", "to_k", "to_v"]))
    off = p("a red cat", cross_attention_kwargs={"scale": 0.0}, generator=gen(4), **kw).images[0]
    on = p("a red cat", cross_attention_kwargs={"scale": 1.0}, generator=gen(4), **kw).images[0]
    assert torch.equal(off, plain) and not torch.equal(on, plain)
