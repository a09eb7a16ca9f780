"""Region prompts: box checks, feathered masks, the per-tile blend, and both stages of the pipeline."""

import math

import numpy as np
import pytest
import torch

from anysize import cli
from anysize.core.regions import REGION_CONTEXT, TileRegion, blend, reaches, region_crop, region_mask
from anysize.core.sampler import TiledModel, UNetTileDenoiser, sample_tiled
from anysize.core.tiling import TilingConfig
from anysize.regions import Region, normalize, parse

FAST = dict(num_inference_steps=2, upscale_inference_steps=2)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------- boxes
def test_pixel_boxes_become_fractions_and_fraction_boxes_stay():
    (a, b, c) = normalize([((0, 0, 100, 50), "left"), ((0.5, 0, 1, 1), "right", 0.5),
                           Region((0.1, 0.2, 0.3, 0.4), "r", 2.0)], 200, 100)
    assert a == Region((0.0, 0.0, 0.5, 0.5), "left", 1.0)
    assert b == Region((0.5, 0.0, 1.0, 1.0), "right", 0.5)
    assert c == Region((0.1, 0.2, 0.3, 0.4), "r", 2.0)
    assert normalize(None, 64, 64) == () and normalize([], 64, 64) == ()
    assert Region.from_json(b.to_json()) == b


@pytest.mark.parametrize("regions, words", [
    ([((-1, 0, 10, 10), "x")], "negative"),
    ([((10, 0, 5, 10), "x")], "inverted"),
    ([((0, 0, 0, 10), "x")], "empty or inverted"),
    ([((0, 0, math.nan, 10), "x")], "not finite"),
    ([((0, 0, math.inf, 10), "x")], "not finite"),
    ([((0, 0, 65, 10), "x")], "outside the 64x64 canvas"),
    ([(Region((0, 0, 2, 1), "x"))], "goes past 1"),
    ([((0, 0, 10, 10), "")], "non-empty string"),
    ([((0, 0, 10, 10), "x", 0)], "weight 0"),
    ([((0, 0, 10, 10), "x", math.nan)], "weight nan"),
    ([((0, 0, 10), "x")], "4 numbers"),
    ([((0, 0, 10, "a"), "x")], "4 numbers"),
    ([("x",)], "(box, prompt)"),
    ("0,0,1,1:x", "must be a list"),
])
def test_bad_regions_get_one_line_errors(regions, words):
    with pytest.raises(ValueError) as e:
        normalize(regions, 64, 64)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_command_line_region_syntax():
    assert parse("0,0,0.5,1:a red circle on grass") == ((0.0, 0.0, 0.5, 1.0), "a red circle on grass", 1.0)
    assert parse("10, 20, 30, 40, 0.5 : a: b") == ((10.0, 20.0, 30.0, 40.0), "a: b", 0.5)
    for text, words in (("0,0,1,1", "must be"), ("0,0,1:x", "4 numbers"), ("0,0,a,1:x", "'a' is not a number")):
        with pytest.raises(ValueError, match=words):
            parse(text)


# ---------------------------------------------------------------------- masks and the blend
def test_mask_is_zero_outside_its_box_one_inside_and_ramps_over_the_feather():
    region = TileRegion(torch.zeros(1, 1, 1), (4.0, 2.0, 20.0, 10.0), weight=1.0, feather=2.0)
    mask = region_mask(region, (0, 0, 12, 24))
    assert mask.shape == (12, 24) and mask.dtype == torch.float64
    assert float(mask[:, :4].abs().max()) == 0 and float(mask[:, 20:].abs().max()) == 0
    assert float(mask[:2].abs().max()) == 0 and float(mask[10:].abs().max()) == 0
    assert bool((mask[4:8, 6:18] == 1).all())
    assert mask[6, 4].item() == 0.25 and mask[6, 5].item() == 0.75  # centres 4.5 and 5.5 on a 2-px ramp
    # a tile's mask is the crop of the whole canvas's
    assert torch.equal(region_mask(region, (3, 5, 9, 17)), mask[3:9, 5:17])
    assert reaches(region, (0, 0, 4, 8)) and not reaches(region, (0, 20, 12, 24)) and not reaches(region, (10, 0, 12, 24))
    assert torch.equal(region_mask(TileRegion(region.embeds, region.box, 0.5, 2.0), (0, 0, 12, 24)), mask * 0.5)
    # on the canvas's edges a box has no ramp: a region reaching the edge is whole there
    edge = TileRegion(region.embeds, (0.0, 2.0, 24.0, 12.0), 1.0, 2.0, canvas=(12, 24))
    mask = region_mask(edge, (0, 0, 12, 24))
    assert bool((mask[4:, :] == 1).all()) and mask[2, 0].item() == 0.25


def test_blend_replaces_shares_and_leaves_alone():
    g, r = torch.zeros(1, 4, 3, 3), torch.ones(1, 4, 3, 3)
    assert blend(g, [], []) is g
    full, half = torch.ones(3, 3, dtype=torch.float64), torch.full((3, 3), 0.5, dtype=torch.float64)
    assert torch.equal(blend(g, [r], [full]), r)  # weight 1 inside: the region's output, exactly
    assert torch.allclose(blend(g, [r], [half]), torch.full_like(g, 0.5))
    two = blend(g, [r, 3 * r], [full, full])  # overlapping regions share the pixel; the global gets 0
    assert torch.allclose(two, torch.full_like(g, 2.0))


# ---------------------------------------------------------------------- the tile denoiser
def _denoiser(unet, pos, neg, regions=(), scale=3.0):
    return UNetTileDenoiser(unet, pos, negative_prompt_embeds=neg, guidance_scale=scale, regions=regions)


def test_region_prompts_in_tiles(unet, embeds):
    pos, neg = embeds
    other = torch.randn(1, 5, pos.shape[-1], generator=gen(9))
    # on a 32 x 48 latent, a region over the left 24 columns, feather 2 px
    region = TileRegion(other, (0.0, 0.0, 24.0, 32.0), weight=1.0, feather=2.0, canvas=(32, 48))
    x, t = torch.randn(1, 4, 32, 48, generator=gen(1)), torch.tensor(400)
    config = TilingConfig(method="naive", tile_size=16)

    def whole(den):
        return TiledModel(den, config, height=32, width=48, num_steps=1)(x, t, 0)

    with torch.no_grad():
        plain, with_region = whole(_denoiser(unet, pos, neg)), whole(_denoiser(unet, pos, neg, [region]))
        as_global = whole(_denoiser(unet, other, neg))
    # the tiles no region reaches (columns 32..48) are the tiles without regions, bit for bit
    assert torch.equal(with_region[..., 32:], plain[..., 32:])
    # inside the feather the region's prompt replaces the global one, bit for bit: evaluated on the whole
    # tile where the region covers it (columns 0..16), on the tile's crop to the region elsewhere (16..24)
    assert torch.equal(with_region[..., :16], as_global[..., :16])
    with torch.no_grad():
        crops = [_denoiser(unet, other, neg)(x[..., top : top + 16, 16:24], t, [(top, 16, top + 16, 24)])
                 for top in (0, 16)]
    assert torch.equal(with_region[..., 16:22], torch.cat(crops, dim=-2)[..., :6])
    # across the ramp (columns 22..24) the two are mixed, neither alone
    ramp = with_region[..., 22:24]
    assert not torch.equal(ramp, plain[..., 22:24]) and not torch.equal(ramp, as_global[..., 22:24])


def test_region_crop_is_the_box_grown_to_the_least_side_inside_the_tile():
    r = TileRegion(torch.zeros(1, 1, 1), (21.2, 3.0, 23.0, 9.5))  # x 21.2..23, y 3..9.5
    tile = (0, 16, 32, 48)  # top, left, bottom, right
    assert region_crop(r, tile, 1) == (3, 21, 10, 23)  # rounded outward, nothing more
    assert region_crop(r, tile, 4) == (3, 21, 11, 25)  # widened to multiples of 4, inside the tile
    # at least 8 a side (half the native 16) around the box's centre: rows 3..10 grow by 1 (to 3..11), columns 21..23 by 6
    assert region_crop(r, tile, 1, native=16) == (3, 18, 11, 26)
    # near the tile's edge the grown crop shifts inward instead of leaving the tile
    edge = TileRegion(torch.zeros(1, 1, 1), (46.0, 30.0, 48.0, 32.0))
    assert region_crop(edge, tile, 1, native=16) == (24, 40, 32, 48)
    # never more than the tile
    assert region_crop(r, tile, 1, native=200) == tile
    assert region_crop(r, tile, 4, native=13) == (3, 19, 11, 27)  # 7 px around the centre, then 8


def test_a_small_region_is_evaluated_on_a_crop_of_half_the_native_side(unet, embeds):
    # a 2-px region on one 16-px tile of the tiny UNet (native side 16): evaluated on the 8-px crop
    # around it, not on its own 2 px, which no model can compose in
    pos, neg = embeds
    other = torch.randn(1, 5, pos.shape[-1], generator=gen(9))
    region = TileRegion(other, (7.0, 4.0, 9.0, 6.0), weight=1.0, feather=0.5, canvas=(16, 16))
    x, t = torch.randn(1, 4, 16, 16, generator=gen(1)), torch.tensor(400)
    assert REGION_CONTEXT * unet.config.sample_size == 8
    with torch.no_grad():
        out = _denoiser(unet, pos, neg, [region])(x, t, [(0, 0, 16, 16)])
        crop = _denoiser(unet, other, neg)(x[..., 1:9, 4:12], t, [(1, 4, 9, 12)])
        a, b, c, d = region_crop(region, (0, 0, 16, 16), _denoiser(unet, pos, neg).granularity)  # no least side
        assert (c - a, d - b) != (8, 8)
        tight = _denoiser(unet, other, neg)(x[..., a:c, b:d], t, [(a, b, c, d)])
    assert torch.equal(out[..., 4:6, 7:9], crop[..., 3:5, 3:5])
    assert not torch.equal(crop[..., 3:5, 3:5], tight[..., 4 - a : 6 - a, 7 - b : 9 - b])


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_region_sampling_is_bit_identical_whatever_tile_batch_size(unet, embeds, scale):
    # two regions, one overlapping tile edges and each other, so tiles carry 1, 2 or 3 prompts and
    # batches mix them; cut edge tiles of several shapes
    pos, neg = embeds
    a, b = (torch.randn(1, 5, pos.shape[-1], generator=gen(s)) for s in (5, 6))
    regions = [TileRegion(a, (3.0, 2.0, 21.5, 15.0), 1.0, 1.5), TileRegion(b, (15.0, 9.0, 40.0, 24.0), 0.7, 2.5)]
    outs = []
    for batch in (1, 3, 64):
        scheduler = __import__("diffusers").EulerDiscreteScheduler(num_train_timesteps=1000)
        scheduler.set_timesteps(3)
        lat = torch.randn(1, 4, 24, 40, generator=gen(0))
        with torch.no_grad():
            outs.append(sample_tiled(_denoiser(unet, pos, neg, regions, scale), lat, scheduler,
                                     TilingConfig(tile_size=16, tile_batch_size=batch), generator=gen(2), progress=False))
    assert torch.isfinite(outs[0]).all()
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


# ---------------------------------------------------------------------- the pipeline and the CLI
def test_pipeline_regions_reach_both_stages_and_the_metadata(pipe, monkeypatch):
    seen = []
    real = UNetTileDenoiser.__init__

    def spy(self, *args, regions=(), **kwargs):
        seen.append(tuple(regions))
        real(self, *args, regions=regions, **kwargs)

    monkeypatch.setattr(UNetTileDenoiser, "__init__", spy)
    kw = dict(width=200, height=120, generator=gen(3), guidance_scale=3.0, **FAST)
    out = pipe("grass", regions=[((0, 0, 100, 120), "a red circle")], **kw)
    assert out.images[0].size == (200, 120)
    assert out.info[0]["regions"] == [[[0.0, 0.0, 0.5, 1.0], "a red circle", 1.0]]
    assert len(seen) >= 2 and all(len(r) == 1 for r in seen)  # stage 1 and every stage-2 pass
    lat_w = [r[0].box[2] / 0.5 for r in seen]  # each phase's latent width: the box follows it
    assert lat_w == sorted(lat_w) and lat_w[0] < lat_w[-1]
    plain = pipe("grass", **{**kw, "generator": gen(3)})
    assert not np.array_equal(np.asarray(plain.images[0]), np.asarray(out.images[0]))
    up = pipe.upscale(plain.images[0], 400, 240, "grass", regions=[((0.5, 0.5, 1.0, 1.0), "blue")], generator=gen(1),
                      num_inference_steps=2)
    assert up.images[0].size == (400, 240) and up.info[0]["regions"][0][1] == "blue"


def test_memory_plan_names_region_prompts_which_add_no_peak(pipe):
    # a region prompt runs on one tile's crop per call, never more rows than a tile batch's call
    base = pipe.plan_memory(512, 512, tile_batch_size=2)
    more = pipe.plan_memory(512, 512, tile_batch_size=2, regions=[((0, 0, 0.5, 0.5), "a"), ((0.5, 0.5, 1, 1), "b")])
    sampling = lambda plan: [s.device for s in plan.stages if "per call" in s.detail]  # noqa: E731
    assert len(sampling(base)) >= 2 and sampling(more) == sampling(base)
    assert "2 region prompts (one tile a call)" in more.describe()


def test_regions_are_checked_before_any_compute(pipe, monkeypatch):
    monkeypatch.setattr(pipe.base.unet, "forward", lambda *a, **k: pytest.fail("computed before checking"))
    with pytest.raises(ValueError, match=r"regions\[1\]: box .* outside the 64x64 canvas"):
        pipe("x", width=64, height=64, regions=[((0, 0, 0.5, 0.5), "a"), ((0, 0, 65, 10), "b")])


def test_cli_region(tmp_path, capsys, model_dirs):
    base, upscaler = model_dirs
    models = ["--base", str(base), "--upscaler", str(upscaler)]
    out = tmp_path / "o.png"
    code = cli.main(["generate", "grass", "--size", "96x64", "-o", str(out), "--quiet", "--steps", "2",
                     "--upscale-steps", "2", "--seed", "1", "--region", "0,0,0.5,1:a red circle",
                     "--region", "48,0,96,64,0.5:a blue square", *models])
    assert code == 0 and out.exists()
    from anysize.io.output import read_metadata

    regions = read_metadata(out)["request"]["regions"]
    assert regions == [[[0.0, 0.0, 0.5, 1.0], "a red circle", 1.0], [[0.5, 0.0, 1.0, 1.0], "a blue square", 0.5]]
    capsys.readouterr()
    for bad, words in (("0,0,1:x", "needs 4 numbers"), ("0,0,200,10:x", "outside the 96x64 canvas"),
                       ("5,0,1,1:x", "inverted")):
        code = cli.main(["generate", "grass", "--size", "96x64", "-o", str(tmp_path / "b.png"), "--quiet",
                         "--region", bad, *models])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and words in err, err
        assert "Traceback" not in err and not (tmp_path / "b.png").exists()


def test_sdxl_region_prompts_carry_their_own_pooled_embedding(tmp_path, model_dirs):
    import tiny_models

    from anysize import AnySizePipeline

    p = AnySizePipeline.from_pretrained(base=tiny_models.make_sdxl(tmp_path / "sdxl"), upscaler=model_dirs[1],
                                        device="cpu")
    p.set_progress_bar_config(disable=True)
    calls = []
    forward = p.base.unet.forward

    def spy(*args, **kwargs):
        calls.append(kwargs["added_cond_kwargs"]["text_embeds"])
        return forward(*args, **kwargs)

    p.base.unet.forward = spy
    out = p("a green star", width=150, height=90, negative_prompt="red", generator=gen(),
            regions=[((0, 0, 0.5, 1), "a red circle")], **FAST)
    assert out.images[0].size == (150, 90)
    glob, region = calls[0], calls[1]  # stage 1, one tile: (negative, global), then (negative, region)
    assert glob.shape == region.shape == (2, 32)
    assert torch.equal(glob[0], region[0]) and not torch.equal(glob[1], region[1])
