"""GLIGEN grounding through the pipeline (anysize.core.grounding): phrases tied to boxes, each tile reading
the boxes where they fall in it; tiny random-weight GLIGEN UNet (gated self-attention), offline."""

import numpy as np
import pytest
import tiny_models
import torch

from anysize import AnySizePipeline, cli
from anysize.core.grounding import TileGrounding
from anysize.core.sampler import batch_invariant_linears
from anysize.io.output import read_metadata

PHRASES = ["a red circle", "a blue square"]
BOXES = [(0.05, 0.1, 0.45, 0.9), (0.55, 0.2, 0.95, 0.7)]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def gligen_dir(tmp_path_factory):
    return tiny_models.make_gligen_base(tmp_path_factory.mktemp("gligen") / "base")


@pytest.fixture(scope="module")
def gpipe(gligen_dir):
    p = AnySizePipeline.from_pretrained(gligen_dir, device="cpu", img2img=True)
    p.set_progress_bar_config(disable=True)
    return p


def test_a_tile_reads_the_boxes_where_they_fall_in_it():
    g = TileGrounding(BOXES, torch.zeros(2, 4), latent=(40, 80))
    whole, masks = g.tile_boxes((0, 0, 40, 80))
    assert whole == [list(b) for b in BOXES] and masks == [1.0, 1.0], "the whole latent: the boxes unchanged"
    # the right half of the latent: the first box misses it, the second fills its own place there
    right, masks = g.tile_boxes((0, 40, 40, 80))
    assert masks == [0.0, 1.0] and right[0] == [0.0] * 4
    assert right[1] == pytest.approx([0.1, 0.2, 0.9, 0.7])
    # a tile cutting the first box: clipped to the tile
    cut, masks = g.tile_boxes((10, 20, 30, 60))
    assert masks[0] == 1.0 and cut[0] == pytest.approx([0.0, 0.0, 0.4, 1.0])
    kw = g.kwargs([(0, 0, 40, 80), (0, 40, 40, 80)], per=1, cfg=True, device="cpu", dtype=torch.float32)
    assert kw["boxes"].shape == (4, 30, 4) and kw["positive_embeddings"].shape == (4, 30, 4)
    assert kw["masks"][:2].sum() == 0, "the unconditional rows are not grounded"
    assert kw["masks"][2:, :2].tolist() == [[1, 1], [0, 1]]


def test_stage_1_is_diffusers_gligen_pipeline(gpipe):
    """At a bucket size stage 1 is untiled: bit for bit diffusers' StableDiffusionGLIGENPipeline with the
    same phrases, boxes and scheduled sampling; the grounding changes the result."""
    from diffusers import StableDiffusionGLIGENPipeline

    base = gpipe.base
    w, h = gpipe.buckets[len(gpipe.buckets) // 2]
    kw = dict(width=w, height=h, num_inference_steps=4, guidance_scale=4.0, output_type="latent")
    grounded = dict(gligen_phrases=PHRASES, gligen_boxes=BOXES, gligen_scheduled_sampling_beta=0.5)
    ours = gpipe("two shapes on grass", generator=gen(1), **kw, **grounded).images[0]
    ref = StableDiffusionGLIGENPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                        unet=base.unet, scheduler=base.scheduler, safety_checker=None,
                                        feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    with batch_invariant_linears(base.unet):
        theirs = ref("two shapes on grass", generator=gen(1), **kw, **grounded).images
    assert torch.equal(ours, theirs)
    plain = gpipe("two shapes on grass", generator=gen(1), **kw).images[0]
    assert not torch.equal(plain, ours)


def test_grounded_tiles_are_bit_identical_whatever_the_tile_batch(gpipe):
    kw = dict(num_inference_steps=2, upscale_inference_steps=3, strength=0.7, guidance_scale=3.0,
              gligen_phrases=PHRASES, gligen_boxes=BOXES, gligen_scheduled_sampling_beta=1.0, tile_size=16)
    images = [np.asarray(gpipe("two shapes", height=120, width=200, generator=gen(2), tile_batch_size=b,
                               **kw).images[0]) for b in (1, 3, 16)]
    assert images[0].shape == (120, 200, 3)
    assert np.array_equal(images[0], images[1]) and np.array_equal(images[0], images[2])
    plain = np.asarray(gpipe("two shapes", height=120, width=200, generator=gen(2), tile_batch_size=3,
                             **{**kw, "gligen_phrases": None, "gligen_boxes": None}).images[0])
    assert not np.array_equal(plain, images[0])


@pytest.mark.parametrize("call, message", [
    (dict(gligen_phrases=["a"], gligen_boxes=[]), "1 phrases for 0 boxes"),
    (dict(gligen_phrases=["a"], gligen_boxes=[(0.5, 0, 0.2, 1)]), "gligen_boxes[0]=(0.5, 0, 0.2, 1): must be"),
    (dict(gligen_phrases=[""], gligen_boxes=[(0, 0, 1, 1)]), "gligen_phrases[0]='': must be a non-empty text"),
    (dict(gligen_phrases=["a"], gligen_boxes=[(0, 0, 1, 1)], gligen_scheduled_sampling_beta=2),
     "gligen_scheduled_sampling_beta=2"),
])
def test_bad_grounding_is_one_line(gpipe, call, message):
    with pytest.raises(ValueError) as caught:
        gpipe("x", height=64, width=64, num_inference_steps=1, **call)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_a_base_without_gated_layers_refuses_grounding(pipe):
    with pytest.raises(ValueError, match="gligen_phrases: need a GLIGEN base model"):
        pipe("x", height=64, width=64, num_inference_steps=1, gligen_phrases=["a"], gligen_boxes=[(0, 0, 1, 1)])


def test_cli_gligen_option(gligen_dir, tmp_path, capsys):
    out = tmp_path / "g.png"
    code = cli.main(["generate", "two shapes on grass", "--size", "200x120", "-o", str(out), "--base", str(gligen_dir),
                     "--img2img", "--steps", "2", "--upscale-steps", "2", "--seed", "3",
                     "--gligen", "0.05,0.1,0.45,0.9:a red circle", "--gligen", "0.55,0.2,0.95,0.7:a blue square",
                     "--gligen-beta", "0.5"])
    assert code == 0, capsys.readouterr().err
    request = read_metadata(out)["request"]
    assert request["gligen_phrases"] == PHRASES and request["gligen_boxes"] == [list(b) for b in BOXES]
    assert request["gligen_scheduled_sampling_beta"] == 0.5
    assert cli.main(["generate", "x", "--size", "64x64", "-o", str(tmp_path / "h.png"), "--base", str(gligen_dir),
                     "--gligen", "0.5,0.5:a"]) == 2
    assert "--gligen" in capsys.readouterr().err


def test_gligen_layers_added_to_a_plain_unet_are_the_gligen_unet(gligen_dir, tmp_path):
    """The default model ships GLIGEN's layers alone (anysize.models.add_gligen_layers): a plain UNet plus
    those layers is the GLIGEN UNet bit for bit, grounded; ungrounded it is the plain UNet bit for bit.
    Layers of another UNet, or tensors that are not GLIGEN's, are refused in one line."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    from anysize import models
    from anysize.core.grounding import is_gligen_parameter

    gated = UNet2DConditionModel.from_pretrained(gligen_dir / "unet").eval()
    state = gated.state_dict()
    plain = UNet2DConditionModel.from_config({**gated.config, "attention_type": "default"}).eval()
    plain.load_state_dict({k: v for k, v in state.items() if not is_gligen_parameter(k)})
    layers = tmp_path / "layers.safetensors"
    save_file({k: v.contiguous() for k, v in state.items() if is_gligen_parameter(k)}, str(layers))
    rebuilt = models.add_gligen_layers(plain, layers)
    assert all(t.device.type == "cpu" for t in [*rebuilt.parameters(), *rebuilt.buffers()])
    cfg = gated.config
    x = torch.randn(2, cfg.in_channels, 16, 16, generator=gen(1))
    text = torch.randn(2, 5, cfg.cross_attention_dim, generator=gen(2))
    g = {"boxes": torch.tensor([[BOXES[0], BOXES[1]]] * 2), "masks": torch.tensor([[1.0, 1.0], [1.0, 0.0]]),
         "positive_embeddings": torch.randn(2, 2, cfg.cross_attention_dim, generator=gen(3))}
    with torch.no_grad():
        want = gated(x, 500, encoder_hidden_states=text, cross_attention_kwargs={"gligen": g}).sample
        got = rebuilt(x, 500, encoder_hidden_states=text, cross_attention_kwargs={"gligen": g}).sample
        assert torch.equal(got, want)
        assert torch.equal(rebuilt(x, 500, encoder_hidden_states=text).sample,
                           plain(x, 500, encoder_hidden_states=text).sample)
        assert not torch.equal(got, plain(x, 500, encoder_hidden_states=text).sample)
    wrong = tmp_path / "wrong.safetensors"
    save_file({"position_net.linears.0.weight": torch.zeros(3, 3)}, str(wrong))
    with pytest.raises(models.ModelLoadError, match="do not fit this UNet"):
        models.add_gligen_layers(plain, wrong)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"conv_in.weight": torch.zeros(3, 3)}, str(foreign))
    with pytest.raises(models.ModelLoadError, match="not GLIGEN layers .conv_in.weight"):
        models.add_gligen_layers(plain, foreign)
