"""Diffusion transformers in tiles (anysize.core.dit): tiny random-weight FLUX and SD3 transformers built
here, offline. One tile over the whole latent is diffusers' own pipeline bit for bit; tiles are
bit-identical whatever the tile batch; global positions are what the tiles get, and they bring a tiled
step nearer the untiled one than local positions do."""


import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel
from diffusers import StableDiffusion3Pipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from anysize.core import regions as core_regions
from anysize.core.dit import FluxTileDenoiser, SD3TileDenoiser, flux_image_ids, pack, unpack
from anysize.core.control import TileControl
from anysize.core.regions import TileRegion
from anysize.core.sampler import TiledModel, sample_tiled
from anysize.core.tiling import TilingConfig

TEXT, POOLED = 32, 24  # tiny text widths (T5 / CLIP-pooled)


@pytest.fixture(autouse=True)
def no_grad():
    with torch.inference_mode():
        yield


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def flux():
    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=TEXT,
                                  pooled_projection_dim=POOLED, guidance_embeds=True, axes_dims_rope=(4, 6, 6)).eval()


@pytest.fixture(scope="module")
def sd3():
    torch.manual_seed(1)
    return SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=TEXT, caption_projection_dim=16,
                                 pooled_projection_dim=POOLED, out_channels=16, pos_embed_max_size=24).eval()


def text(seed, rows=1, tokens=7):
    g = gen(seed)
    return torch.randn(rows, tokens, TEXT, generator=g), torch.randn(rows, POOLED, generator=g)


def flow_scheduler(dynamic: bool) -> FlowMatchEulerDiscreteScheduler:
    if dynamic:  # FLUX's: the shift from the image's token count
        return FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                               base_image_seq_len=256, max_image_seq_len=4096, shift=3.0)
    return FlowMatchEulerDiscreteScheduler(shift=3.0)  # SD3's


def flux_timesteps(scheduler, steps: int, latent: tuple[int, int]):
    """The schedule FluxPipeline sets: sigmas 1..1/steps, shifted by mu of the WHOLE latent's tokens."""
    seq = (latent[0] // 2) * (latent[1] // 2)
    scheduler.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps), mu=calculate_shift(seq))
    return scheduler


# ---------------------------------------------------------------------- FLUX
def test_flux_pack_and_ids_are_diffusers():
    x = torch.randn(2, 16, 6, 10, generator=gen(3))
    assert torch.equal(pack(x), FluxPipeline._pack_latents(x, 2, 16, 6, 10))
    assert torch.equal(unpack(pack(x), 6, 10), x)
    assert torch.equal(flux_image_ids(6, 10), FluxPipeline._prepare_latent_image_ids(1, 3, 5, "cpu", torch.float32))
    ids = flux_image_ids(4, 4, top=6, left=3)
    assert ids[0].tolist() == [0, 3, 1.5] and ids[-1].tolist() == [0, 4, 2.5]


def test_flux_one_tile_is_flux_pipeline(flux):
    """One tile over the whole latent, in the one sampling loop: bit for bit diffusers' FluxPipeline from
    the same noise, embeddings, guidance embedding and dynamically shifted schedule."""
    h, w, steps = 12, 20, 4
    noise = torch.randn(1, 16, h, w, generator=gen(5))
    embeds, pooled = text(1)
    scheduler = flux_timesteps(flow_scheduler(True), steps, (h, w))
    den = FluxTileDenoiser(flux, embeds, pooled, guidance_scale=3.5)
    ours = sample_tiled(den, noise.clone(), scheduler, TilingConfig(method="none"), progress=False)
    ref = FluxPipeline(scheduler=flow_scheduler(True), vae=None, text_encoder=None, tokenizer=None,
                       text_encoder_2=None, tokenizer_2=None, transformer=flux)
    ref.set_progress_bar_config(disable=True)
    theirs = ref(prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=h * 8, width=w * 8,
                 num_inference_steps=steps, guidance_scale=3.5, latents=pack(noise), output_type="latent").images
    assert torch.equal(ours, unpack(theirs, h, w))
    den.guidance_scale = 1.0
    other = sample_tiled(den, noise.clone(), flux_timesteps(flow_scheduler(True), steps, (h, w)),
                         TilingConfig(method="none"), progress=False)
    assert not torch.equal(other, ours), "the guidance embedding is read"


def test_flux_true_cfg_is_diffusers(flux):
    h, w = 8, 8
    noise = torch.randn(1, 16, h, w, generator=gen(6))
    (embeds, pooled), (neg, neg_pooled) = text(2), text(3)
    den = FluxTileDenoiser(flux, embeds, pooled, true_cfg_scale=4.0, negative_prompt_embeds=neg,
                           negative_pooled_prompt_embeds=neg_pooled)
    ours = sample_tiled(den, noise.clone(), flux_timesteps(flow_scheduler(True), 3, (h, w)),
                        TilingConfig(method="none"), progress=False)
    ref = FluxPipeline(scheduler=flow_scheduler(True), vae=None, text_encoder=None, tokenizer=None,
                       text_encoder_2=None, tokenizer_2=None, transformer=flux)
    ref.set_progress_bar_config(disable=True)
    theirs = ref(prompt_embeds=embeds, pooled_prompt_embeds=pooled, negative_prompt_embeds=neg,
                 negative_pooled_prompt_embeds=neg_pooled, true_cfg_scale=4.0, height=h * 8, width=w * 8,
                 num_inference_steps=3, latents=pack(noise), output_type="latent").images
    assert torch.equal(ours, unpack(theirs, h, w))


def test_flux_tiles_get_their_global_ids(flux, monkeypatch):
    seen = []
    forward = flux.forward

    def spy(*args, **kwargs):
        seen.append(kwargs["img_ids"].clone())
        return forward(*args, **kwargs)

    monkeypatch.setattr(flux, "forward", spy)
    embeds, pooled = text(1)
    x = torch.randn(2, 16, 4, 6, generator=gen(1))
    for positions, expected in (("global", (8, 4)), ("local", (0, 0))):
        seen.clear()
        FluxTileDenoiser(flux, embeds, pooled, positions=positions)(x, torch.tensor(500.0), [(0, 0, 4, 6), (8, 4, 12, 10)])
        assert torch.equal(seen[0], flux_image_ids(4, 6))
        assert torch.equal(seen[1], flux_image_ids(4, 6, *expected))


# ---------------------------------------------------------------------- SD3
def test_sd3_one_tile_is_sd3_pipeline(sd3):
    h, w, steps = 12, 16, 4
    noise = torch.randn(1, 16, h, w, generator=gen(7))
    (embeds, pooled), (neg, neg_pooled) = text(4), text(5)
    den = SD3TileDenoiser(sd3, embeds, pooled, latent=(h, w), guidance_scale=5.0, negative_prompt_embeds=neg,
                          negative_pooled_prompt_embeds=neg_pooled)
    scheduler = flow_scheduler(False)
    scheduler.set_timesteps(steps)
    ours = sample_tiled(den, noise.clone(), scheduler, TilingConfig(method="none"), progress=False)
    ref = StableDiffusion3Pipeline(transformer=sd3, scheduler=flow_scheduler(False), vae=None, text_encoder=None,
                                   tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
                                   tokenizer_3=None)
    ref.set_progress_bar_config(disable=True)
    theirs = ref(prompt_embeds=embeds, pooled_prompt_embeds=pooled, negative_prompt_embeds=neg,
                 negative_pooled_prompt_embeds=neg_pooled, guidance_scale=5.0, height=h * 8, width=w * 8,
                 num_inference_steps=steps, latents=noise.clone(), output_type="latent").images
    assert torch.equal(ours, theirs)


def test_sd3_tiles_take_their_crop_of_the_positional_table(sd3):
    embeds, pooled = text(4)
    den = SD3TileDenoiser(sd3, embeds, pooled, latent=(20, 32), guidance_scale=1.0)
    # the whole latent is 10 x 16 patches in a 24 x 24 table: its crop starts at (7, 4)
    assert den.positions_used == "global" and den.corner((0, 0, 8, 8)) == (7, 4)
    assert den.corner((4, 10, 12, 18)) == (9, 9)
    local = SD3TileDenoiser(sd3, embeds, pooled, latent=(20, 32), guidance_scale=1.0, positions="local")
    assert local.corner((4, 10, 12, 18)) == (10, 10)  # an 8 x 8 tile's own centred crop, as diffusers
    big = SD3TileDenoiser(sd3, embeds, pooled, latent=(20, 64), guidance_scale=1.0)
    assert big.positions_used == "local", "32 patches do not fit a 24-patch table: no global place to take"
    x = torch.randn(1, 16, 8, 8, generator=gen(2))
    box = (4, 10, 12, 18)
    assert not torch.equal(den(x, torch.tensor(700.0), [box]), local(x, torch.tensor(700.0), [box]))
    centred = SD3TileDenoiser(sd3, embeds, pooled, latent=(8, 8), guidance_scale=1.0)  # the tile is the image
    assert torch.equal(local(x, torch.tensor(700.0), [box]), centred(x, torch.tensor(700.0), [(0, 0, 8, 8)]))


# ---------------------------------------------------------------------- tiled sampling
@pytest.mark.parametrize("arch", ["flux", "sd3"])
def test_tiled_sampling_is_bit_identical_whatever_the_tile_batch(arch, flux, sd3):
    h, w = 24, 40
    embeds, pooled = text(8)
    if arch == "flux":
        den = FluxTileDenoiser(flux, embeds, pooled)
        make = lambda: flux_timesteps(flow_scheduler(True), 3, (h, w))  # noqa: E731
    else:
        neg, neg_pooled = text(9)
        den = SD3TileDenoiser(sd3, embeds, pooled, latent=(h, w), guidance_scale=4.0, negative_prompt_embeds=neg,
                              negative_pooled_prompt_embeds=neg_pooled)

        def make():
            s = flow_scheduler(False)
            s.set_timesteps(3)
            return s

    noise = torch.randn(1, 16, h, w, generator=gen(11))
    results = [sample_tiled(den, noise.clone(), make(), TilingConfig(method="fstd", tile_size=16, tile_batch_size=b),
                            generator=gen(2), progress=False) for b in (1, 3, 16)]
    assert results[0].shape == noise.shape and torch.isfinite(results[0]).all()
    for other in results[1:]:
        assert torch.equal(results[0], other)


@pytest.mark.parametrize("arch", ["flux", "sd3"])
def test_global_positions_bring_tiles_nearer_the_untiled_model(arch, flux, sd3):
    """One model evaluation over a 2 x 2 grid of tiles against the untiled evaluation of the same latent
    (random weights): with global positions the tiles' outputs are nearer the untiled one than with local
    positions. Mean absolute difference relative to the untiled output's, measured on AVX-512 and under
    AVX2 (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2), the same to
    four digits: SD3 0.0258 global vs 0.2550 local (its sin-cos table is absolute); FLUX 0.02079 vs
    0.02085, a margin 50x float noise but small, as RoPE is relative: among a tile's own tokens global
    ids change nothing, only the attention to the text tokens (all at id 0) moves to the whole image's."""
    h, w = 16, 16
    embeds, pooled = text(12)
    x = torch.randn(1, 16, h, w, generator=gen(13))
    t = torch.tensor(600.0)
    config = TilingConfig(method="naive", tile_size=8)

    def make(positions):
        if arch == "flux":
            return FluxTileDenoiser(flux, embeds, pooled, positions=positions)
        return SD3TileDenoiser(sd3, embeds, pooled, latent=(h, w), guidance_scale=1.0, positions=positions)

    whole = make("global")(x, t, [(0, 0, h, w)])
    errors = {}
    for positions in ("global", "local"):
        tiled = TiledModel(make(positions), config, height=h, width=w, num_steps=1)(x, t, 0)
        errors[positions] = ((tiled - whole).abs().mean() / whole.abs().mean()).item()
    assert errors["global"] < errors["local"], errors


# ---------------------------------------------------------------------- region prompts
def _regional(arch, flux, sd3, embeds, pooled, latent, regions=(), scale=4.0):
    """A tile denoiser of ``arch`` with CFG (SD3) or true CFG (FLUX) and these ``regions``."""
    neg, neg_pooled = text(21)
    if arch == "flux":
        return FluxTileDenoiser(flux, embeds, pooled, true_cfg_scale=scale, negative_prompt_embeds=neg,
                                negative_pooled_prompt_embeds=neg_pooled, regions=regions)
    return SD3TileDenoiser(sd3, embeds, pooled, latent=latent, guidance_scale=scale, negative_prompt_embeds=neg,
                           negative_pooled_prompt_embeds=neg_pooled, regions=regions)


@pytest.mark.parametrize("arch", ["flux", "sd3"])
def test_region_prompts_in_transformer_tiles(arch, flux, sd3, monkeypatch):
    """On a 16 x 24 latent in 8 x 8 tiles, a region over columns 0..12 (feather 1): the tiles it does not
    reach are the tiles without regions bit for bit; where it covers a whole tile its prompt replaces the
    global one bit for bit; on a tile it covers in part it is evaluated on the tile's crop to it, that crop
    with the positions it has in the whole latent (a denoiser called on the crop's own box gives the
    same bits), and the ramp mixes the two. The crop's least side is off here (its growth to half the
    native side, which on these tiles would be the whole tile, is tested in test_regions)."""
    monkeypatch.setattr(core_regions, "REGION_CONTEXT", 0.0)
    h, w = 16, 24
    (embeds, pooled), (other, other_pooled) = text(1), text(2)
    region = TileRegion(other, (0.0, 0.0, 12.0, 16.0), weight=1.0, feather=1.0, canvas=(h, w),
                        added={"pooled_projections": other_pooled})
    x, t = torch.randn(1, 16, h, w, generator=gen(3)), torch.tensor(600.0)
    config = TilingConfig(method="naive", tile_size=8)

    def whole(den):
        return TiledModel(den, config, height=h, width=w, num_steps=1)(x, t, 0)

    plain = whole(_regional(arch, flux, sd3, embeds, pooled, (h, w)))
    with_region = whole(_regional(arch, flux, sd3, embeds, pooled, (h, w), [region]))
    as_global = whole(_regional(arch, flux, sd3, other, other_pooled, (h, w)))
    assert torch.equal(with_region[..., 16:], plain[..., 16:])
    assert torch.equal(with_region[..., :8], as_global[..., :8])
    crop_den = _regional(arch, flux, sd3, other, other_pooled, (h, w))
    crops = torch.cat([crop_den(x[..., top : top + 8, 8:12], t, [(top, 8, top + 8, 12)]) for top in (0, 8)], dim=-2)
    assert torch.equal(with_region[..., 8:11], crops[..., :3])
    local = _regional(arch, flux, sd3, other, other_pooled, (h, w))(x[..., 0:8, 8:12], t, [(0, 0, 8, 4)])
    assert not torch.equal(local[..., :3], crops[..., :8, :3]), "the crop's place in the whole latent is read"
    ramp = with_region[..., 11:12]
    assert not torch.equal(ramp, plain[..., 11:12]) and not torch.equal(ramp, crops[..., 3:4])


@pytest.mark.parametrize("arch", ["flux", "sd3"])
def test_transformer_regions_are_bit_identical_whatever_the_tile_batch(arch, flux, sd3):
    h, w = 24, 40
    (embeds, pooled), (a, a_pooled), (b, b_pooled) = text(8), text(5), text(6)
    regions = [TileRegion(a, (3.0, 2.0, 21.5, 15.0), 1.0, 1.5, added={"pooled_projections": a_pooled}),
               TileRegion(b, (15.0, 9.0, 40.0, 24.0), 0.7, 2.5, added={"pooled_projections": b_pooled})]
    den = _regional(arch, flux, sd3, embeds, pooled, (h, w), regions)
    noise = torch.randn(1, 16, h, w, generator=gen(11))
    results = []
    for batch in (1, 3, 16):
        scheduler = flux_timesteps(flow_scheduler(True), 2, (h, w))
        results.append(sample_tiled(den, noise.clone(), scheduler, TilingConfig(tile_size=16, tile_batch_size=batch),
                                    generator=gen(2), progress=False))
    assert torch.isfinite(results[0]).all()
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


# ---------------------------------------------------------------------- FLUX ControlNets
def test_flux_controlnet_one_tile_is_flux_controlnet_pipeline(flux):
    """One tile over the whole latent with a FLUX ControlNet: bit for bit diffusers' FluxControlNetPipeline
    from the same noise, embeddings, control latents and conditioning scale (the pipeline's VAE encode
    spied on, so both read the same latents: diffusers samples the latent distribution, anysize takes
    its mean through the tiled encoder)."""
    from types import SimpleNamespace

    import tiny_models
    from diffusers import FluxControlNetPipeline

    net = tiny_models.make_flux_controlnet(flux)
    vae = tiny_models._vae16(0.3611, 0.1159)
    h, w, steps = 12, 20, 3
    noise = torch.randn(1, 16, h, w, generator=gen(5))
    embeds, pooled = text(1)
    seen = []
    encode = vae.encode

    def spied(pixels):
        seen.append(encode(pixels).latent_dist.mode())
        return SimpleNamespace(latents=seen[-1])

    vae.encode = spied
    ref = FluxControlNetPipeline(scheduler=flow_scheduler(True), vae=vae, text_encoder=None, tokenizer=None,
                                 text_encoder_2=None, tokenizer_2=None, transformer=flux, controlnet=net)
    ref.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 2 * h, 2 * w, generator=gen(6))
    theirs = ref(prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=2 * h, width=2 * w, num_inference_steps=steps,
                 guidance_scale=3.5, latents=pack(noise), control_image=image, controlnet_conditioning_scale=0.8,
                 output_type="latent").images
    cond = (seen[0] - vae.config.shift_factor) * vae.config.scaling_factor
    den = FluxTileDenoiser(flux, embeds, pooled, guidance_scale=3.5, controls=[TileControl(net, cond, 0.8, factor=1)])
    ours = sample_tiled(den, noise.clone(), flux_timesteps(flow_scheduler(True), steps, (h, w)),
                        TilingConfig(method="none"), progress=False)
    assert torch.equal(ours, unpack(theirs, h, w))
    plain = sample_tiled(FluxTileDenoiser(flux, embeds, pooled, guidance_scale=3.5), noise.clone(),
                         flux_timesteps(flow_scheduler(True), steps, (h, w)), TilingConfig(method="none"), progress=False)
    assert not torch.equal(ours, plain), "the ControlNet steers"


def test_flux_controlnet_tiles_get_their_crop_and_their_place(flux, monkeypatch):
    """Each tile's ControlNet call gets exactly the crop of the control latents under it, packed, and the
    tile's global ids; tiled sampling with ControlNets and a region does not depend on the tile batch."""
    import tiny_models

    net = tiny_models.make_flux_controlnet(flux)
    h, w = 16, 24
    cond = torch.randn(1, 16, h, w, generator=gen(7))
    embeds, pooled = text(2)
    seen = []
    forward = net.forward

    def spy(*args, **kwargs):
        seen.append((kwargs["controlnet_cond"].clone(), kwargs["img_ids"].clone()))
        return forward(*args, **kwargs)

    monkeypatch.setattr(net, "forward", spy)
    control = TileControl(net, cond, 1.0, factor=1)
    den = FluxTileDenoiser(flux, embeds, pooled, controls=[control])
    x = torch.randn(1, 16, h, w, generator=gen(8))
    TiledModel(den, TilingConfig(method="naive", tile_size=8), height=h, width=w, num_steps=1)(x, torch.tensor(500.0), 0)
    boxes = [(r, c, r + 8, c + 8) for r in (0, 8) for c in (0, 8, 16)]
    assert len(seen) == len(boxes)
    for (got, ids), (top, left, bottom, right) in zip(seen, boxes):
        assert torch.equal(got, pack(cond[..., top:bottom, left:right]))
        assert torch.equal(ids, flux_image_ids(8, 8, top, left))
    monkeypatch.undo()
    (a, a_pooled) = text(3)
    region = TileRegion(a, (3.0, 2.0, 15.5, 13.0), 1.0, 1.5, added={"pooled_projections": a_pooled})
    two = [control, TileControl(tiny_models.make_flux_controlnet(flux, seed=9), cond.flip(-1), 0.5, factor=1)]
    den = FluxTileDenoiser(flux, embeds, pooled, controls=two, regions=[region])
    noise = torch.randn(1, 16, h, w, generator=gen(11))
    results = [sample_tiled(den, noise.clone(), flux_timesteps(flow_scheduler(True), 2, (h, w)),
                            TilingConfig(tile_size=8, tile_batch_size=b), generator=gen(2), progress=False)
               for b in (1, 4)]
    assert torch.isfinite(results[0]).all() and torch.equal(results[0], results[1])


# ---------------------------------------------------------------------- SD3 ControlNets
@pytest.mark.parametrize("layout", ["instantx", "sd35"])
def test_sd3_controlnet_one_tile_is_sd3_controlnet_pipeline(sd3, layout):
    """One tile over the whole latent with an SD3 ControlNet, under CFG: bit for bit diffusers'
    StableDiffusion3ControlNetPipeline from the same noise, embeddings and control latents (its VAE
    encode spied on, as for FLUX): InstantX's layout (own positional table, zero pooled projection,
    unshifted condition) and SD 3.5's (the transformer's table, the pooled projection, shifted)."""
    from types import SimpleNamespace

    import tiny_models
    from diffusers import StableDiffusion3ControlNetPipeline

    from anysize import models

    extra = {} if layout == "instantx" else dict(use_pos_embed=False, force_zeros_for_pooled_projection=False)
    net = tiny_models.make_sd3_controlnet(sd3, **extra)
    if layout == "sd35":  # what check_controlnet gives it: a copy of the transformer's table
        models._check_sd3_controlnet(net, SimpleNamespace(transformer=sd3), "controlnet[0]")
    vae = tiny_models._vae16(1.5305, 0.0609)
    h, w, steps = 12, 16, 3
    noise = torch.randn(1, 16, h, w, generator=gen(7))
    (embeds, pooled), (neg, neg_pooled) = text(1), text(2)
    seen = []
    encode = vae.encode

    def spied(pixels):
        seen.append(encode(pixels).latent_dist.mode())
        return SimpleNamespace(latent_dist=SimpleNamespace(sample=lambda: seen[-1]))

    vae.encode = spied
    ref = StableDiffusion3ControlNetPipeline(
        transformer=sd3, scheduler=flow_scheduler(False), vae=vae, text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None, controlnet=net)
    ref.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 2 * h, 2 * w, generator=gen(6))
    theirs = ref(prompt_embeds=embeds, pooled_prompt_embeds=pooled, negative_prompt_embeds=neg,
                 negative_pooled_prompt_embeds=neg_pooled, height=2 * h, width=2 * w, num_inference_steps=steps,
                 guidance_scale=4.0, latents=noise.clone(), control_image=image, controlnet_conditioning_scale=0.7,
                 output_type="latent").images
    shift = 0 if net.config.force_zeros_for_pooled_projection else vae.config.shift_factor
    cond = (seen[0][:1] - shift) * vae.config.scaling_factor  # diffusers encodes it once per CFG row
    kw = dict(latent=(h, w), guidance_scale=4.0, negative_prompt_embeds=neg, negative_pooled_prompt_embeds=neg_pooled)
    scheduler = flow_scheduler(False)
    scheduler.set_timesteps(steps)
    den = SD3TileDenoiser(sd3, embeds, pooled, controls=[TileControl(net, cond, 0.7, factor=1)], **kw)
    ours = sample_tiled(den, noise.clone(), scheduler, TilingConfig(method="none"), progress=False)
    assert torch.equal(ours, theirs)
    scheduler.set_timesteps(steps)
    plain = sample_tiled(SD3TileDenoiser(sd3, embeds, pooled, **kw), noise.clone(), scheduler,
                         TilingConfig(method="none"), progress=False)
    assert not torch.equal(ours, plain), "the ControlNet steers"


def test_sd3_controlnet_tiles_get_their_crop_and_their_table(sd3, monkeypatch):
    """Each tile's SD3 ControlNet call gets the crop of the control latents under it (for the
    unconditional rows too) and its own table cropped where the tile lies; tile batches change no bit."""
    import tiny_models

    net = tiny_models.make_sd3_controlnet(sd3)
    h, w = 16, 24
    cond = torch.randn(1, 16, h, w, generator=gen(7))
    (embeds, pooled), (neg, neg_pooled) = text(2), text(3)
    seen = []
    forward = net.forward

    def spy(*args, **kwargs):
        table = net.pos_embed.cropped_pos_embed(8, 8)  # the crop in force during the call (8 latent px a side)
        seen.append((kwargs["controlnet_cond"].clone(), table.clone()))
        return forward(*args, **kwargs)

    monkeypatch.setattr(net, "forward", spy)
    kw = dict(latent=(h, w), guidance_scale=4.0, negative_prompt_embeds=neg, negative_pooled_prompt_embeds=neg_pooled)
    den = SD3TileDenoiser(sd3, embeds, pooled, controls=[TileControl(net, cond, 1.0, factor=1)], **kw)
    x = torch.randn(1, 16, h, w, generator=gen(8))
    TiledModel(den, TilingConfig(method="naive", tile_size=8), height=h, width=w, num_steps=1)(x, torch.tensor(500.0), 0)
    boxes = [(r, c, r + 8, c + 8) for r in (0, 8) for c in (0, 8, 16)]
    full = net.pos_embed.pos_embed.reshape(24, 24, -1)
    assert len(seen) == len(boxes)
    for (got, table), box in zip(seen, boxes):
        crop = cond[..., box[0]:box[2], box[1]:box[3]]
        assert torch.equal(got, torch.cat([crop, crop]))
        top, left = den.corner(box, 24)
        assert (top, left) == (8 + box[0] // 2, 6 + box[1] // 2)  # 8 x 12 patches centred in 24, plus the tile's place
        assert torch.equal(table, full[top:top + 4, left:left + 4].reshape(1, 16, -1))
    monkeypatch.undo()
    noise = torch.randn(1, 16, h, w, generator=gen(11))
    results = []
    for b in (1, 4):
        scheduler = flow_scheduler(False)
        scheduler.set_timesteps(2)
        results.append(sample_tiled(den, noise.clone(), scheduler, TilingConfig(tile_size=8, tile_batch_size=b),
                                    generator=gen(2), progress=False))
    assert torch.isfinite(results[0]).all() and torch.equal(results[0], results[1])


# ---------------------------------------------------------------------- torchrun: tiles across 2 processes
def _flux_model():
    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=TEXT,
                                  pooled_projection_dim=POOLED, guidance_embeds=True, axes_dims_rope=(4, 6, 6)).eval()


def _flux_tiled() -> torch.Tensor:
    h, w = 24, 40
    embeds, pooled = text(8)
    with torch.inference_mode():
        return sample_tiled(FluxTileDenoiser(_flux_model(), embeds, pooled), torch.randn(1, 16, h, w, generator=gen(11)),
                            flux_timesteps(flow_scheduler(True), 3, (h, w)),
                            TilingConfig(method="fstd", tile_size=16, tile_batch_size=2), generator=gen(2),
                            progress=False)


def _flux_rank(rank: int, port: int, out_dir: str) -> None:
    import os

    from anysize.core import distributed

    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    distributed.init("cpu")
    try:
        torch.save(_flux_tiled(), f"{out_dir}/{rank}.pt")
    finally:
        distributed.destroy()


def test_flux_tiles_split_across_two_processes_equal_one(tmp_path):
    """Under torchrun each tile batch runs on one rank and every rank gets every output (gloo, CPU): the
    same latents bit for bit as one process, at one thread each (tests/test_distributed.py says why)."""
    import contextlib
    import socket

    import torch.multiprocessing as mp

    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_flux_rank, args=(port, str(tmp_path)), nprocs=2, join=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = _flux_tiled()
    finally:
        torch.set_num_threads(threads)
    for rank in range(2):
        assert torch.equal(torch.load(tmp_path / f"{rank}.pt"), reference), rank
