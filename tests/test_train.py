"""Training: a few steps on small models run, checkpoint, resume exactly, export and load through AnySizePipeline."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from anysize import AnySizePipeline
from anysize.train.scenes import sample_scene
from anysize.train.trainer import (GLIGEN_GATE_INIT, FolderData, TrainConfig, Trainer, scene_vocabulary, train,
                                   word_tokenizer)

QUICK = dict(batch_size=2, checkpoint_every=2, progress=False, lr=1e-3)


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae")
    return train(TrainConfig(task="vae", output_dir=out, steps=2, resolution=32, **QUICK))


def test_word_tokenizer_spells_domain_words_as_single_tokens(tmp_path):
    tok = word_tokenizer(scene_vocabulary(), tmp_path)
    caption = sample_scene(3, 0.5).caption
    ids = tok(caption).input_ids
    assert len(ids) == len(caption.replace(",", " ,").split()) + 2  # one token a word, plus BOS/EOS
    assert tok.decode(ids, skip_special_tokens=True).replace(" ,", ",") == caption
    assert tok("a purple zebra").input_ids[3] == tok.unk_token_id
    assert word_tokenizer(scene_vocabulary(), tmp_path / "again").get_vocab() == tok.get_vocab()


def test_vae_run_exports_a_diffusers_vae(vae_run):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_run / "vae")
    assert vae.config.scaling_factor > 0 and 2 ** (len(vae.config.block_out_channels) - 1) == 4


def test_decoder_only_keeps_the_encoder_and_its_latent_scale(tmp_path, vae_run):
    from diffusers import AutoencoderKL

    out = train(TrainConfig(task="vae", output_dir=tmp_path, init=vae_run, decoder_only=True, steps=2,
                            resolution=32, **QUICK))
    before, after = AutoencoderKL.from_pretrained(vae_run / "vae"), AutoencoderKL.from_pretrained(out / "vae")
    assert after.config.scaling_factor == before.config.scaling_factor
    old, new = before.state_dict(), after.state_dict()
    frozen = [k for k in old if k.startswith(("encoder.", "quant_conv."))]
    trained = [k for k in old if k.startswith(("decoder.", "post_quant_conv."))]
    assert frozen and trained and len(frozen) + len(trained) == len(old)
    assert all(torch.equal(old[k], new[k]) for k in frozen)
    assert sum(not torch.equal(old[k], new[k]) for k in trained) > len(trained) // 2
    with pytest.raises(ValueError, match="decoder_only"):
        TrainConfig(task="base", output_dir=tmp_path / "x", init=vae_run, decoder_only=True)
    with pytest.raises(ValueError, match="decoder_only"):
        TrainConfig(task="vae", output_dir=tmp_path / "y", decoder_only=True)


def test_resume_continues_exactly(tmp_path, vae_run):
    cfg = dict(task="base", vae=vae_run, resolution=32, **QUICK)
    straight = Trainer(TrainConfig(output_dir=tmp_path / "a", steps=4, **cfg))
    straight.run()
    first = Trainer(TrainConfig(output_dir=tmp_path / "b", steps=2, **cfg))
    first.run()
    resumed = Trainer(TrainConfig(output_dir=tmp_path / "b", steps=4, **cfg))
    assert resumed.step == 2
    resumed.run()
    for p, q in zip(straight.unet.parameters(), resumed.unet.parameters()):
        assert torch.equal(p, q)
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert steps == [2, 4]


def test_arad_batches_come_from_one_bucket_each(tmp_path, vae_run):
    t = Trainer(TrainConfig(task="base", output_dir=tmp_path, vae=vae_run, resolution=32, steps=1, **QUICK))
    assert len(t.buckets) >= 5 and all(w % 16 == 0 and h % 16 == 0 for w, h in t.buckets)
    images, captions = t.data.batch(t.buckets[0], 3)
    assert images.shape == (3, t.buckets[0][1], t.buckets[0][0], 3) and len(captions) == 3
    square = Trainer(TrainConfig(task="base", output_dir=tmp_path / "sq", vae=vae_run, resolution=32, steps=1,
                                 buckets="square", **QUICK))
    assert square.buckets == [(32, 32)]


def test_base_and_upscaler_runs_load_through_the_pipeline(tmp_path, vae_run):
    base = train(TrainConfig(task="base", output_dir=tmp_path / "base", vae=vae_run, resolution=32, steps=2, **QUICK))
    up = train(TrainConfig(task="upscaler", output_dir=tmp_path / "up", vae=vae_run, crop=32, steps=2, **QUICK))
    pipe = AnySizePipeline.from_pretrained(base=base, upscaler=up, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    out = pipe("two red circles on grass", width=100, height=60, num_inference_steps=2, upscale_inference_steps=2)
    assert out.images[0].size == (100, 60)


def test_fine_tune_an_existing_model_on_a_captioned_folder(tmp_path, model_dirs):
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i, size in enumerate([(64, 64), (96, 48), (48, 96), (80, 60)]):
        PIL.Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"picture number {i}")
    cfg = TrainConfig(task="base", output_dir=tmp_path / "ft", init=model_dirs[0], data=str(data), steps=2, **QUICK)
    trainer = Trainer(cfg)
    assert isinstance(trainer.data, FolderData) and len(trainer.data.items) >= 3  # images sorted into buckets
    assert trainer.trainable == [trainer.unet]  # a pretrained text encoder stays frozen
    out = trainer.run()
    pipe = AnySizePipeline.from_pretrained(base=out, img2img=True, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    assert pipe("picture", width=64, height=64, num_inference_steps=2).images[0].size == (64, 64)


def test_fine_tune_takes_a_fp16_model_and_moves_its_native_size(tmp_path, model_dirs):
    from diffusers import StableDiffusionPipeline

    half = tmp_path / "half"  # saved as the shipped default model is: fp16
    StableDiffusionPipeline.from_pretrained(model_dirs[0], dtype=torch.float16).save_pretrained(half)
    same = Trainer(TrainConfig(task="base", output_dir=tmp_path / "same", init=half, steps=1, **QUICK))
    native = same.unet.config.sample_size * same._factor()
    assert same.config.resolution == native  # no --resolution: the model's own
    assert {p.dtype for m in (same.unet, same.text_encoder, same.vae) for p in m.parameters()} == {torch.float32}
    wider = TrainConfig(task="base", output_dir=tmp_path / "wider", init=half, resolution=2 * native, steps=1, **QUICK)
    trainer = Trainer(wider)
    assert max(w * h for w, h in trainer.buckets) > 3 * native**2
    pipe = AnySizePipeline.from_pretrained(base=trainer.run(), img2img=True, device="cpu")
    assert pipe.base_tile * pipe.base_factor == 2 * native  # the pipeline's buckets follow
    assert pipe.buckets == trainer.buckets


def test_vae_trains_on_a_folder_of_images(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i, size in enumerate([(40, 30), (100, 80)]):  # one image smaller than the crop: enlarged first
        PIL.Image.new("RGB", size, (40 * i, 90, 200)).save(data / f"{i}.png")
    out = train(TrainConfig(task="vae", output_dir=tmp_path / "vae", data=str(data), resolution=32, steps=1, **QUICK))
    assert (out / "vae" / "diffusion_pytorch_model.safetensors").is_file()


def test_upscaler_exports_the_noise_schedule_it_was_trained_with(tmp_path, vae_run):
    t = Trainer(TrainConfig(task="upscaler", output_dir=tmp_path, vae=vae_run, crop=32, steps=1, **QUICK))
    assert t._pipeline().low_res_scheduler is t.low_res_scheduler


def test_upscaler_keeps_the_latent_scale_it_trains_with_through_export_and_load(tmp_path, vae_run):
    from diffusers import AutoencoderKL

    scale = AutoencoderKL.from_pretrained(vae_run / "vae").config.scaling_factor
    assert scale != 0.08333  # the value diffusers' x4 upscaler class forces on any VAE it is given
    t = Trainer(TrainConfig(task="upscaler", output_dir=tmp_path, vae=vae_run, crop=32, steps=2, **QUICK))
    out = t.run()  # exports at the end: builds a StableDiffusionUpscalePipeline around t.vae
    assert t.vae.config.scaling_factor == scale  # a longer run would go on training at the same scale
    assert json.loads((out / "vae" / "config.json").read_text())["scaling_factor"] == scale
    pipe = AnySizePipeline.from_pretrained(upscaler=out, device="cpu")
    assert pipe.upscaler.vae.config.scaling_factor == scale
    # tools/ship_default.py: fp16 copy with a VAE put in from another directory (--vae)
    ship = ship_tool()
    ship.save_fp16(out, tmp_path / "shipped", vae=vae_run, settings=ship.SETTINGS["upscaler"])
    assert json.loads((tmp_path / "shipped" / "vae" / "config.json").read_text())["scaling_factor"] == scale
    from anysize.models import ModelSettings, read_settings

    assert read_settings(tmp_path / "shipped") == ModelSettings(upscale_inference_steps=1, text=False)
    assert AnySizePipeline.from_pretrained(upscaler=tmp_path / "shipped", device="cpu").default_upscale_steps == 1


def ship_tool():
    """tools/ship_default.py as a module."""
    spec = importlib.util.spec_from_file_location("ship_default", Path(__file__).parents[1] / "tools" / "ship_default.py")
    ship = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ship)
    return ship


def test_final_t_fraction_trains_at_the_last_timestep(tmp_path, vae_run):
    """final_t_fraction=1 trains every sample at the last timestep; the default draws them uniformly."""
    import types

    def one_loss(**options):
        t = Trainer(TrainConfig(task="upscaler", output_dir=tmp_path / str(options), vae=vae_run, crop=32, steps=1,
                                seed=3, **QUICK, **options))
        seen = {}

        def unet(x, timesteps, **kw):
            seen.update(x=x, t=timesteps)
            return types.SimpleNamespace(sample=torch.zeros_like(x[:, :4]))

        t.unet = unet
        t.loss()
        return seen

    plain, tuned = one_loss(), one_loss(final_t_fraction=1.0)
    assert (tuned["t"] == 999).all() and not (plain["t"] == 999).all()
    with pytest.raises(ValueError, match="final_t_fraction=1.5"):
        TrainConfig(task="upscaler", output_dir=tmp_path, final_t_fraction=1.5)


def test_bad_config_names_the_argument(tmp_path):
    with pytest.raises(ValueError, match="task='gan'"):
        TrainConfig(task="gan", output_dir=tmp_path)
    with pytest.raises(ValueError, match="data="):
        TrainConfig(task="base", output_dir=tmp_path, data=str(tmp_path / "missing"))


def test_render_workers_give_the_same_stream(tmp_path):
    import concurrent.futures

    from anysize.train.trainer import SceneData

    with concurrent.futures.ProcessPoolExecutor(2) as pool:
        a, b = SceneData(7), SceneData(7, pool)
        for _ in range(2):
            (x, cx), (y, cy) = a.batch((48, 32), 5), b.batch((48, 32), 5)
            assert cx == cy and np.array_equal(x, y)
        assert np.array_equal(a.crops(32, 3), b.crops(32, 3))


def test_max_minutes_stops_checkpoints_exports_and_a_rerun_continues(tmp_path, vae_run):
    cfg = dict(task="base", output_dir=tmp_path, vae=vae_run, resolution=32, steps=6, workers=1, **QUICK)
    first = Trainer(TrainConfig(max_minutes=1e-9, **cfg))
    out = first.run()
    assert first.step == 1 and (out / "unet").is_dir()
    again = Trainer(TrainConfig(**cfg))
    assert again.step == 1
    again.run()
    assert again.step == 6
    logs = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in logs] == [1, 2, 4, 6]
    assert all(0 < e["data_s_per_step"] < e["step_s_per_step"] for e in logs)  # where a GPU run's time goes
    with pytest.raises(ValueError, match="max_minutes="):
        TrainConfig(task="base", output_dir=tmp_path, max_minutes=0)


def test_controlnet_run_trains_only_the_controlnet_and_it_steers_the_pipeline(tmp_path, model_dirs):
    """A ControlNet of the tiny base (factor-2 VAE: its condition embedding halves once) trains a few
    steps on the scenes' silhouettes, leaves the base model as it was, and loads as a ControlNet."""
    base = model_dirs[0]
    trainer = Trainer(TrainConfig(task="controlnet", output_dir=tmp_path, init=base, steps=2, **QUICK))
    assert trainer.trainable == [trainer.controlnet]
    assert not any(p.requires_grad for m in trainer.frozen for p in m.parameters())
    unet_before = {k: v.clone() for k, v in trainer.unet.state_dict().items()}
    out = trainer.run()
    assert all(torch.equal(unet_before[k], v) for k, v in trainer.unet.state_dict().items())
    zero_convs = [p for p in trainer.controlnet.controlnet_down_blocks.parameters()]
    assert any(p.abs().sum() > 0 for p in zero_convs)  # from_unet's zero convolutions have learnt
    ship = ship_tool()  # tools/ship_default.py --controlnet: the export in float16, loadable as one
    ship.DEST = tmp_path / "shipped"
    ship.ship_controlnet(out)
    from diffusers import ControlNetModel
    from safetensors.torch import load_file

    weights = load_file(str(ship.DEST / "controlnet" / "diffusion_pytorch_model.safetensors"))
    assert weights and all(v.dtype == torch.float16 for v in weights.values())
    assert ControlNetModel.from_pretrained(ship.DEST / "controlnet").state_dict().keys() == weights.keys()
    pipe = AnySizePipeline.from_pretrained(base=base, img2img=True, controlnet=out)
    pipe.set_progress_bar_config(disable=True)
    mask = PIL.Image.fromarray(np.zeros((64, 64, 3), np.uint8))
    image = pipe("a red circle", width=64, height=64, num_inference_steps=2, control_image=mask,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    with pytest.raises(ValueError, match="needs init"):
        TrainConfig(task="controlnet", output_dir=tmp_path / "x")


def test_gligen_run_trains_only_the_gated_layers_and_grounds_the_pipeline(tmp_path, model_dirs):
    """GLIGEN's gated layers added to the tiny base train a few steps on the scenes' phrases and boxes:
    every base weight stays as it was, the new layers learn, and the export loads as a GLIGEN base."""
    from anysize.train.scenes import sample_scene
    from anysize.train.trainer import grounding

    scene = sample_scene(np.random.default_rng(3), 0.5)
    for (x0, y0, x1, y1), phrase in grounding(scene, 128, 64):
        assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 and phrase.split()[0] in ("a", "an")
    base = model_dirs[0]
    trainer = Trainer(TrainConfig(task="gligen", output_dir=tmp_path, init=base, steps=2, box_weight=4.0,
                                  min_t_fraction=0.6, **QUICK))
    t = trainer._timesteps(2000)
    assert int(t.min()) >= 600 and int(t.max()) == trainer.noise_scheduler.config.num_train_timesteps - 1
    assert trainer.unet.position_net is not None
    # gates open and the new layers' output projections zero: before training, grounded or not, the gated
    # UNet is the base UNet exactly
    from diffusers import UNet2DConditionModel

    plain = UNet2DConditionModel.from_pretrained(Path(base) / "unet", dtype=torch.float32)
    cfg = trainer.unet.config
    x = torch.randn(1, cfg.in_channels, 8, 8, generator=torch.Generator().manual_seed(1))
    text = torch.randn(1, 4, cfg.cross_attention_dim, generator=torch.Generator().manual_seed(2))
    gligen = {"boxes": torch.tensor([[[0.1, 0.1, 0.6, 0.6]]]), "masks": torch.ones(1, 1),
              "positive_embeddings": torch.randn(1, 1, cfg.cross_attention_dim)}
    with torch.no_grad():
        grounded = trainer.unet(x, 10, encoder_hidden_states=text, cross_attention_kwargs={"gligen": gligen})
        assert torch.equal(grounded.sample, plain(x, 10, encoder_hidden_states=text).sample)
    gates = [m for n, m in trainer.unet.named_parameters() if n.endswith(("alpha_attn", "alpha_dense"))]
    assert gates and all(float(g.detach()) == GLIGEN_GATE_INIT > 0 for g in gates)
    trained = {k for k, p in trainer.unet.named_parameters() if p.requires_grad}
    assert trained and all(k.startswith("position_net.") or ".fuser." in k for k in trained)
    before = {k: v.clone() for k, v in trainer.unet.state_dict().items()}
    out = trainer.run()
    after = trainer.unet.state_dict()
    assert all(torch.equal(before[k], v) for k, v in after.items() if k not in trained)
    assert any(not torch.equal(before[k], after[k]) for k in trained)
    pipe = AnySizePipeline.from_pretrained(base=out, img2img=True)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", width=64, height=64, num_inference_steps=2, gligen_phrases=["a red circle"],
                 gligen_boxes=[(0.1, 0.1, 0.6, 0.6)], generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    # tools/ship_default.py --gligen: the new layers alone, fp16, which the base's plain UNet takes back
    from safetensors.torch import load_file

    from anysize.core.grounding import is_grounded
    from anysize.models import add_gligen_layers

    ship = ship_tool()
    ship.DEST = tmp_path / "shipped"
    ship.ship_gligen(out)
    layers = load_file(str(ship.DEST / "gligen" / "gligen_layers.safetensors"))
    assert set(layers) == trained and all(v.dtype == torch.float16 for v in layers.values())
    assert is_grounded(add_gligen_layers(plain, ship.DEST / "gligen" / "gligen_layers.safetensors"))
    with pytest.raises(ValueError, match="task 'gligen': needs init"):
        TrainConfig(task="gligen", output_dir=tmp_path / "x")
    with pytest.raises(ValueError, match="box_weight: only for task 'gligen'"):
        TrainConfig(task="base", output_dir=tmp_path / "x", box_weight=1.0)
    with pytest.raises(ValueError, match="min_t_fraction=1.0"):
        TrainConfig(task="gligen", output_dir=tmp_path / "x", init=base, min_t_fraction=1.0)
    with pytest.raises(ValueError, match="box_weight=-1"):
        TrainConfig(task="gligen", output_dir=tmp_path / "x", init=base, box_weight=-1.0)


def test_box_mask_marks_the_pixels_whose_centres_lie_in_a_kept_box():
    from anysize.train.trainer import box_mask

    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.25], [0.5, 0.5, 1.0, 1.0]], [[0.25, 0.0, 0.75, 1.0], [0, 0, 1, 1]]])
    masks = torch.tensor([[1.0, 1.0], [1.0, 0.0]])  # the second image's second box is padding
    m = box_mask(boxes, masks, 4, 4)
    assert m.shape == (2, 1, 4, 4)
    expected0 = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=torch.float32)
    expected1 = torch.tensor([[0, 1, 1, 0]] * 4, dtype=torch.float32)
    assert torch.equal(m[0, 0], expected0) and torch.equal(m[1, 0], expected1)
