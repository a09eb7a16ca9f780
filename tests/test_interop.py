"""Bringing what diffusers users have: their loaded pipelines, LoRAs, diffusers' call order and outputs."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionUpscalePipeline

from anysize import AnySizePipeline, cli
from anysize.models import ModelLoadError

FAST = dict(num_inference_steps=2, upscale_inference_steps=2, guidance_scale=3.0)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def load(path):
    pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def lora_file(model_dirs, tmp_path_factory):
    """A LoRA of the tiny base's attention projections (random, non-zero B), in diffusers' format."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(5)
    donor = load(model_dirs[0])
    donor.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                      target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    out = tmp_path_factory.mktemp("lora")
    StableDiffusionPipeline.save_lora_weights(
        out, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(donor.unet)),
        safe_serialization=True)
    return out / "pytorch_lora_weights.safetensors"


def test_from_pipe_wraps_a_loaded_pipeline_without_copying(model_dirs):
    sd = load(model_dirs[0])
    wrapped = AnySizePipeline.from_pipe(sd)
    assert wrapped.base is sd and wrapped.upscaler is None
    assert wrapped.base.unet is sd.unet and wrapped.base.vae is sd.vae  # the same modules
    loaded = AnySizePipeline.from_pretrained(base=model_dirs[0], img2img=True)
    for p in (wrapped, loaded):
        p.set_progress_bar_config(disable=True)
    a = wrapped("a red circle", width=128, height=96, generator=gen(1), output_type="np", **FAST).images[0]
    b = loaded("a red circle", width=128, height=96, generator=gen(1), output_type="np", **FAST).images[0]
    assert np.array_equal(a, b)
    assert wrapped.model_ids["base"] == "base (StableDiffusionPipeline)"


def test_from_pipe_takes_an_upscaler_pipeline_and_a_scheduler_name(model_dirs):
    up = StableDiffusionUpscalePipeline.from_pretrained(model_dirs[1])
    wrapped = AnySizePipeline.from_pipe(load(model_dirs[0]), up, scheduler="dpm++2m-karras")
    assert wrapped.upscaler is up and type(wrapped.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert wrapped.scheduler.config.use_karras_sigmas


def test_from_pipe_brings_a_controlnet_pipelines_controlnets(model_dirs):
    import tiny_models
    from diffusers import StableDiffusionControlNetPipeline

    sd = load(model_dirs[0])
    net = tiny_models.make_controlnet(sd.unet)
    cn = StableDiffusionControlNetPipeline(**{k: getattr(sd, k) for k in ("vae", "text_encoder", "tokenizer", "unet",
                                                                            "scheduler")},
                                           controlnet=net, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
    assert AnySizePipeline.from_pipe(cn).controlnets == (net,)


def test_from_pipe_refuses_what_is_not_a_stable_diffusion_pipeline(model_dirs):
    with pytest.raises(ModelLoadError, match="pipe: a object has no unet or transformer, vae"):
        AnySizePipeline.from_pipe(object())


def test_lora_changes_the_image_and_scale_zero_is_bit_identical(model_dirs, lora_file):
    def run(loras):
        pipe = AnySizePipeline.from_pretrained(base=model_dirs[0], img2img=True)
        pipe.set_progress_bar_config(disable=True)
        if loras:
            pipe.load_loras(loras)
        out = pipe("a red circle", width=128, height=96, generator=gen(2), output_type="np", **FAST)
        return out.images[0], out.info[0]

    plain, _ = run([])
    full, info = run([(lora_file, 1.0)])
    zero, _ = run([(lora_file, 0.0)])
    assert not np.array_equal(plain, full)
    assert np.array_equal(plain, zero)
    assert info["lora"] == [f"{lora_file}:1"]


def test_cli_lora_option(model_dirs, lora_file, tmp_path, capsys):
    from anysize.io.output import read_metadata

    out = tmp_path / "o.png"
    code = cli.main(["generate", "a red circle", "--size", "128x96", "-o", str(out), "--base", str(model_dirs[0]),
                     "--img2img", "--lora", f"{lora_file}:0.5", "--steps", "2", "--upscale-steps", "2", "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert read_metadata(out)["lora"] == [f"{lora_file}:0.5"]
    code = cli.main(["generate", "a red circle", "--size", "128x96", "-o", str(out), "--base", str(model_dirs[0]),
                     "--lora", str(tmp_path / "missing.safetensors")])
    err = capsys.readouterr().err
    assert code != 0 and "missing.safetensors: no such file" in err and len(err.strip().splitlines()) == 1


def test_lora_pickle_files_are_refused(model_dirs, tmp_path):
    pipe = AnySizePipeline.from_pretrained(base=model_dirs[0], img2img=True)
    bad = tmp_path / "lora.ckpt"
    bad.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="pickle checkpoint"):
        pipe.load_loras([bad])


def test_positional_order_is_diffusers_and_the_output_indexes_like_diffusers(pipe):
    out = pipe("a red circle", 64, 128, generator=gen(0), **FAST)  # (prompt, height, width)
    assert out.images[0].size == (128, 64)
    assert out[0] is out.images and out["images"] is out.images and out.to_tuple() == (out.images,)
    with pytest.raises(KeyError):
        out["nsfw_content_detected"]


def test_prompts_are_never_cut_silently(pipe, recwarn):
    """The tiny text encoder reads 16 tokens (one a character): a longer prompt warns, naming what it reads."""
    from anysize.pipeline import PromptWarning

    pipe("a red circle on grass", width=64, height=64, generator=gen(0), **FAST)
    messages = [str(w.message) for w in recwarn if issubclass(w.category, PromptWarning)]
    assert messages and all("the text encoder reads 16" in m for m in messages)
    assert "it sees only 'a red circle on gr'" in messages[0]
    recwarn.clear()
    pipe("a red", width=64, height=64, generator=gen(0), **FAST)
    assert not [w for w in recwarn if issubclass(w.category, PromptWarning)]


def test_the_default_models_unknown_words_are_named(capsys):
    from transformers import AutoTokenizer

    from anysize.models import DEFAULT_MODEL_DIR, prompt_problems

    class Model:  # what prompt_problems reads of a pipeline
        tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR / "base" / "tokenizer")

    (line,) = prompt_problems(Model, "a lighthouse on a cliff, two red circles")
    assert "does not know 'lighthouse', 'cliff';" in line
    assert prompt_problems(Model, "two red circles on grass") == []


def test_num_images_per_prompt_and_a_list_of_generators(pipe):
    """Two prompts x two images: with one generator per image, each image is what a call of its own
    with that generator makes."""
    out = pipe(["a red circle", "a blue square"], width=96, height=64, num_images_per_prompt=2,
               generator=[gen(s) for s in (1, 2, 3, 4)], output_type="np", **FAST)
    assert len(out.images) == 4 and [i["prompt"] for i in out.info] == ["a red circle"] * 2 + ["a blue square"] * 2
    alone = pipe("a blue square", width=96, height=64, generator=gen(3), output_type="np", **FAST).images[0]
    assert np.array_equal(out.images[2], alone) and not np.array_equal(out.images[2], out.images[3])
    with pytest.raises(ValueError, match="a list of 3, but this call makes 4 images"):
        pipe(["a", "b"], width=96, height=64, num_images_per_prompt=2, generator=[gen(), gen(), gen()], **FAST)
    with pytest.raises(ValueError, match="num_images_per_prompt=0"):
        pipe("a", width=96, height=64, num_images_per_prompt=0, **FAST)


def test_latents_eta_clip_skip_and_cross_attention_kwargs(pipe):
    """diffusers' keywords: given latents are stage 1's noise (the same as drawing it from the
    generator); clip_skip, eta and the LoRA-scale keyword change the result; bad values get one line."""
    w, h = pipe.buckets[len(pipe.buckets) // 2]
    plan = pipe.plan_run(__import__("anysize").Request(width=w, height=h))
    shape = (1, 4, *plan.sampling[0].latent)
    kw = dict(width=w, height=h, output_type="latent", **FAST)
    drawn = pipe("a red circle", generator=gen(3), **kw).images[0]
    given = pipe("a red circle", generator=gen(99), latents=torch.randn(shape, generator=gen(3)), **kw).images[0]
    assert torch.equal(drawn, given)
    with pytest.raises(ValueError, match=r"latents: \(1, 4, 3, 3\), but stage 1 starts from"):
        pipe("a", latents=torch.zeros(1, 4, 3, 3), **kw)
    skipped = pipe("a red circle", generator=gen(3), clip_skip=1, **kw).images[0]
    assert not torch.equal(drawn, skipped)
    from diffusers import DDIMScheduler

    assert isinstance(pipe.scheduler, DDIMScheduler)
    noisy = pipe("a red circle", generator=gen(3), eta=1.0, **kw).images[0]
    assert not torch.equal(drawn, noisy)
    scaled = pipe("a red circle", generator=gen(3), cross_attention_kwargs={"scale": 0.5}, **kw).images[0]
    assert torch.equal(drawn, scaled)  # no LoRA loaded: the scale has nothing to scale
    for bad, message in ((dict(eta=2), "eta=2"), (dict(clip_skip=-1), "clip_skip=-1"),
                         (dict(cross_attention_kwargs={"gligen": 1}), "anysize passes")):
        with pytest.raises(ValueError, match=message):
            pipe("a", **bad, **kw)


def test_fp16_variant_directories_and_single_file_messages(model_dirs, tmp_path):
    """A directory of *.fp16.safetensors loads with variant='fp16' and says so without it; a single
    file whose config diffusers cannot find offline names config= as the way out."""
    from anysize.models import load_pipeline

    half = tmp_path / "half"
    load(model_dirs[0]).save_pretrained(half, variant="fp16", safe_serialization=True)
    kw = dict(device=torch.device("cpu"), dtype=torch.float32)
    with pytest.raises(ModelLoadError, match="pass variant='fp16'"):
        load_pipeline(half, **kw)
    assert load_pipeline(half, variant="fp16", **kw).unet is not None
    from safetensors.torch import save_file

    single = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, str(single))
    with pytest.raises(ModelLoadError) as info:
        load_pipeline(single, **kw)
    assert "single-file checkpoint" in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------------- prompt_embeds, guidance_rescale, callbacks
def reference(pipe):
    """diffusers' StableDiffusionPipeline on the tiny base's modules, linears row by row as ours run."""
    base = pipe.base
    ref = StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                  unet=base.unet, scheduler=base.scheduler, safety_checker=None,
                                  feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    return ref


def bucket(pipe):
    return pipe.buckets[len(pipe.buckets) // 2]  # (w, h): stage 1 alone, untiled


@pytest.mark.parametrize("options", [
    {"guidance_rescale": 0.7},
    {"callback": {"cutoff_step_ratio": 0.25}},
    {"embeds": True},
])
def test_stage_1_equals_diffusers_with_guidance_rescale_callbacks_and_prompt_embeds(pipe, options):
    """At a bucket size stage 1 is untiled sampling: bit for bit what diffusers' StableDiffusionPipeline
    computes with the same guidance_rescale, the same SDCFGCutoffCallback object (it turns guidance off
    half-way through, through the pipeline's num_timesteps and _guidance_scale), or the same
    prompt_embeds / negative_prompt_embeds; and each changes the result, so the check can fail.

    After the callback's cutoff diffusers runs the UNet at batch 1, which on the CPU takes other kernels
    than every larger batch; ours runs a batch of 1 as 2 (``UNetTileDenoiser._unet``, so a tile's bits do
    not depend on its batch). So that case agrees to rounding: at most 7.6e-6 here (latents of magnitude
    ~70; the same on AVX-512 and under AVX2, ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2), checked
    at 1e-4, while the cutoff itself moves the latents by 1.1e-2."""
    from diffusers.callbacks import SDCFGCutoffCallback

    from anysize.core.sampler import batch_invariant_linears

    w, h = bucket(pipe)
    kw = dict(num_inference_steps=4, guidance_scale=5.0, width=w, height=h, output_type="latent")
    extra = {"guidance_rescale": options.get("guidance_rescale", 0.0)}
    if "callback" in options:
        extra["callback_on_step_end"] = SDCFGCutoffCallback(**options["callback"])
    text = {"prompt": "a red cat", "negative_prompt": "blurry"}
    if options.get("embeds"):
        pos, neg = pipe.base.encode_prompt("a red fox", "cpu", 1, True, "grainy")
        text = {"prompt_embeds": pos, "negative_prompt_embeds": neg}
    ours = pipe(**text, generator=gen(1), **kw, **extra).images[0]
    with batch_invariant_linears(pipe.base.unet):
        theirs = reference(pipe)(**text, generator=gen(1), **kw, **extra).images
    if "callback" in options:
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    else:
        assert torch.equal(ours, theirs)
    plain = pipe("a red cat", negative_prompt="blurry", generator=gen(1), **kw).images[0]
    assert (plain - theirs).abs().max() > 1e-3


def test_prompt_embeds_in_every_base_phase_and_per_image(pipe):
    """With img2img upscaling every phase is the base model's: the embeddings of prompts A and B give bit
    for bit the images of the prompts themselves, row k for image k, at a size with tiled stage-2 passes."""
    img2img = AnySizePipeline(pipe.base, None)
    img2img.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=2, upscale_inference_steps=2, guidance_scale=3.0, tile_batch_size=3)
    by_text = img2img(["a red cat", "a blue dog"], 120, 200, negative_prompt="dark", generator=gen(2), **kw)
    pos = torch.cat([pipe.base.encode_prompt(p, "cpu", 1, False)[0] for p in ("a red cat", "a blue dog")])
    neg = pipe.base.encode_prompt("dark", "cpu", 1, False)[0].repeat(2, 1, 1)
    by_embeds = img2img(prompt_embeds=pos, negative_prompt_embeds=neg, height=120, width=200, generator=gen(2),
                        **kw)
    assert [i.size for i in by_embeds.images] == [(200, 120)] * 2
    for a, b in zip(by_text.images, by_embeds.images):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert by_embeds.info[0]["prompt"] == "" and by_embeds[0][0].size == (200, 120)
    # with an x4 upscaler the embeddings steer stage 1; the upscaler (another text encoder) gets ""
    x4 = pipe(prompt_embeds=pos[:1], height=120, width=200, generator=gen(2), **kw)
    assert x4.images[0].size == (200, 120)


@pytest.mark.parametrize("call, message", [
    (dict(prompt="x", prompt_embeds=torch.zeros(1, 5, 32)), "prompt and prompt_embeds: pass one"),
    (dict(prompt_embeds=torch.zeros(1, 5, 7)), "must be a (prompts, tokens, 32) tensor"),
    (dict(prompt_embeds=torch.zeros(5, 32)), "prompt_embeds: (5, 32)"),
    (dict(prompt_embeds=torch.zeros(1, 5, 32), negative_prompt_embeds=torch.zeros(1, 4, 32)), "shape (1, 5, 32)"),
    (dict(negative_prompt_embeds=torch.zeros(1, 5, 32), prompt="x"), "negative_prompt_embeds: only with prompt_embeds"),
    (dict(prompt_embeds=torch.zeros(1, 5, 32), pooled_prompt_embeds=torch.zeros(1, 32)), "only for SDXL"),
    (dict(), "prompt: required (or prompt_embeds)"),
    (dict(prompt="x", guidance_rescale=1.5), "guidance_rescale=1.5: must be a number in [0, 1]"),
    (dict(prompt="x", callback_on_step_end=lambda *a: None, callback_on_step_end_tensor_inputs=["noise_pred"]),
     "noise_pred not among latents, prompt_embeds"),
])
def test_bad_embeds_rescale_and_callback_inputs_are_one_line(pipe, call, message):
    width = pipe.base.unet.config.cross_attention_dim
    call = {k: (v[..., :width] if torch.is_tensor(v) and v.shape[-1] == 32 and width != 32 else v)
            for k, v in call.items()}
    with pytest.raises(ValueError) as caught:
        pipe(height=64, width=64, num_inference_steps=1, **call)
    assert message.replace("32", str(width)) in str(caught.value) and "\n" not in str(caught.value)


def test_a_plain_callback_reads_and_replaces_the_prompt_embeds(pipe):
    """callback_on_step_end_tensor_inputs=["prompt_embeds"]: a function gets them in diffusers' layout
    (unconditional rows first) and what it returns steers the steps after it: swapping in prompt B's
    embeddings at step 0 gives the image of prompt B from step 1 on, which differs from prompt A's."""
    w, h = bucket(pipe)
    seen = []
    other = torch.cat([pipe.base.encode_prompt("", "cpu", 1, False)[0],
                       pipe.base.encode_prompt("a blue dog", "cpu", 1, False)[0]])

    def swap(p, step, t, kwargs):
        seen.append((step, kwargs["stage"], tuple(kwargs["prompt_embeds"].shape), p.num_timesteps, p.guidance_scale))
        return {"prompt_embeds": other} if step == 0 else {}

    kw = dict(num_inference_steps=3, guidance_scale=4.0, width=w, height=h, output_type="latent")
    swapped = pipe("a red cat", generator=gen(4), callback_on_step_end=swap,
                   callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"], **kw).images[0]
    dim = pipe.base.unet.config.cross_attention_dim
    assert seen[0][0] == 0 and seen[0][1:] == ("base", (2, seen[0][2][1], dim), 3, 4.0) and len(seen) == 3
    cat = pipe("a red cat", generator=gen(4), **kw).images[0]
    assert not torch.equal(swapped, cat)
    assert pipe.num_timesteps is not None  # the last phase's, as diffusers leaves it


def test_cli_guidance_rescale(model_dirs, tmp_path, capsys):
    from anysize.io.output import read_metadata, read_parameters

    out = tmp_path / "r.png"
    argv = ["generate", "a red cat", "--size", "72x40", "-o", str(out), "--steps", "2", "--upscale-steps", "2",
            "--seed", "1", "--base", str(model_dirs[0]), "--upscaler", str(model_dirs[1]), "--quiet"]
    assert cli.main([*argv, "--guidance-rescale", "0.5"]) == 0, capsys.readouterr().err
    assert read_metadata(out)["request"]["guidance_rescale"] == 0.5
    assert "CFG Rescale phi: 0.5" in read_parameters(out)
    assert cli.main([*argv, "--guidance-rescale", "2"]) == 2
    assert "--guidance-rescale: '2'" in capsys.readouterr().err


# ---------------------------------------------------------------------- textual inversion
@pytest.fixture
def embedding_file(model_dirs, tmp_path):
    """A two-vector embedding in A1111's layout (``emb_params``), random, for the tiny base's encoder."""
    from safetensors.torch import save_file

    width = load(model_dirs[0]).text_encoder.config.hidden_size
    path = tmp_path / "toy-style.safetensors"
    save_file({"emb_params": torch.randn(2, width, generator=gen(8))}, path)
    return path


def test_textual_inversion_tokens_steer_the_prompt(model_dirs, embedding_file):
    """The file's name is the token (A1111's rule); its vectors become the token's rows in the text
    encoder; a prompt with it gives another image than before loading, and the token works in stage 1."""
    from safetensors.torch import load_file

    pipe = AnySizePipeline.from_pretrained(model_dirs[0], model_dirs[1], device="cpu")
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=2, guidance_scale=3.0, output_type="latent")
    before = pipe("a toy-style cat", 64, 64, generator=gen(1), **kw).images[0]
    pipe.load_textual_inversion(embedding_file)
    ids = pipe.base.tokenizer.convert_tokens_to_ids(["toy-style", "toy-style_1"])
    rows = pipe.base.text_encoder.get_input_embeddings().weight[ids]
    assert torch.equal(rows, load_file(embedding_file)["emb_params"])
    after = pipe("a toy-style cat", 64, 64, generator=gen(1), **kw).images[0]
    assert not torch.equal(before, after)
    [recorded] = pipe.model_ids["embeddings"]  # in every output's metadata
    assert recorded.startswith("toy-style=") and "toy-style.safetensors" in recorded


def test_cli_embedding_option_and_refusals(model_dirs, embedding_file, tmp_path, capsys):
    from anysize.io.output import read_metadata

    out = tmp_path / "e.png"
    argv = ["generate", "a <toy> cat", "--size", "72x40", "-o", str(out), "--steps", "2", "--upscale-steps", "2",
            "--seed", "1", "--base", str(model_dirs[0]), "--upscaler", str(model_dirs[1]), "--quiet"]
    assert cli.main([*argv, "--embedding", f"{embedding_file}:<toy>"]) == 0, capsys.readouterr().err
    assert read_metadata(out)["embeddings"][0].startswith("<toy>=")
    pickle = tmp_path / "old.pt"
    pickle.write_bytes(b"not really")
    assert cli.main([*argv, "--embedding", str(pickle)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "embedding" in err and "pickle" in err
    assert cli.main([*argv, "--embedding", str(tmp_path / "missing.safetensors")]) == 1
    assert "no such file" in capsys.readouterr().err


# ---------------------------------------------------------------------- long prompts
LONG = "a red cat on a green mat beside a blue dog under a yellow sun"  # 60 characters: 4 windows of 14


def test_long_prompts_chunked_as_a1111(pipe, recwarn):
    """long_prompt="chunk": every window of the prompt encoded alone and joined on the token axis (the
    UNet then reads all of them), the negative prompt padded with empty windows to as many tokens; no
    cut warning. A prompt that fits one window gives the image of "cut" bit for bit."""
    from anysize.pipeline import PromptWarning
    from anysize.stages import prompt_windows

    tok = pipe.base.tokenizer
    windows = prompt_windows(tok, LONG)
    assert len(windows) > 1 and "".join(windows).replace(" ", "") == LONG.replace(" ", "")
    w, h = bucket(pipe)
    seen = {}

    def grab(p, step, t, kwargs):
        seen.setdefault("embeds", kwargs["prompt_embeds"])

    kw = dict(num_inference_steps=2, guidance_scale=3.0, width=w, height=h, output_type="latent")
    chunked = pipe(LONG, negative_prompt="dark", long_prompt="chunk", generator=gen(1), callback_on_step_end=grab,
                   callback_on_step_end_tensor_inputs=["prompt_embeds"], **kw).images[0]
    assert not [x for x in recwarn if issubclass(x.category, PromptWarning)], "chunked: nothing is cut"
    encode = lambda text: pipe.base.encode_prompt(text, "cpu", 1, False)[0]  # noqa: E731
    expected = torch.cat([torch.cat([encode("dark"), *[encode("")] * (len(windows) - 1)], dim=1),
                          torch.cat([encode(x) for x in windows], dim=1)])
    assert torch.equal(seen["embeds"], expected)
    assert seen["embeds"].shape[1] == len(windows) * tok.model_max_length
    cut = pipe(LONG, negative_prompt="dark", generator=gen(1), **kw).images[0]
    assert any("long_prompt='chunk'" in str(x.message) for x in recwarn if issubclass(x.category, PromptWarning))
    assert not torch.equal(chunked, cut)
    short = [pipe("a red cat", long_prompt=mode, generator=gen(1), **kw).images[0] for mode in ("cut", "chunk")]
    assert torch.equal(*short)
    with pytest.raises(ValueError, match="long_prompt='all': must be one of cut, chunk"):
        pipe("x", long_prompt="all", **kw)
