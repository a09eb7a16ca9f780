"""ControlNet in the tile denoiser: each tile's ControlNet call gets the control pixels under it."""

import pytest
import torch
import tiny_models
from diffusers import EulerDiscreteScheduler

from anysize.core.control import TileControl
from anysize.core.regions import TileRegion
from anysize.core.sampler import TiledModel, UNetTileDenoiser, batch_invariant_linears, sample_tiled
from anysize.core.tiling import TilingConfig

F = 2  # control px per latent px: the tiny ControlNet's conditioning embedding halves once


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def controlnet(unet):
    return tiny_models.make_controlnet(unet)


def control_image(h, w, seed=4):
    return torch.rand(1, 3, h * F, w * F, generator=gen(seed))


def test_one_tile_is_the_untiled_controlnet_call(unet, controlnet, embeds):
    pos, neg = embeds
    x, t, image = torch.randn(1, 4, 24, 40, generator=gen(1)), torch.tensor(500), control_image(24, 40)
    den = UNetTileDenoiser(unet, pos, negative_prompt_embeds=neg, guidance_scale=4.0,
                           controls=[TileControl(controlnet, image, scale=0.8, factor=F)])
    with torch.no_grad():
        one = TiledModel(den, TilingConfig(method="none"), height=24, width=40, num_steps=1)(x, t, 0)
        with batch_invariant_linears(unet), batch_invariant_linears(controlnet):
            rows, embeds_ = torch.cat([x, x]), torch.cat([neg, pos])
            down, mid = controlnet(rows, t, encoder_hidden_states=embeds_, controlnet_cond=torch.cat([image, image]),
                                   conditioning_scale=0.8, return_dict=False)
            u, c = unet(rows, t, encoder_hidden_states=embeds_, down_block_additional_residuals=down,
                        mid_block_additional_residual=mid).sample.chunk(2)
        plain = TiledModel(UNetTileDenoiser(unet, pos, negative_prompt_embeds=neg, guidance_scale=4.0),
                           TilingConfig(method="none"), height=24, width=40, num_steps=1)(x, t, 0)
    assert torch.equal(one, u + 4.0 * (c - u))
    assert not torch.equal(one, plain)  # the control changed the output


def test_each_tile_gets_exactly_the_control_pixels_under_it(unet, controlnet, embeds):
    pos, neg = embeds
    image = control_image(24, 40)
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, x, t, *, controlnet_cond, **kwargs):
            seen.append((x.shape[-2:], controlnet_cond.clone()))
            return controlnet(x, t, controlnet_cond=controlnet_cond, **kwargs)

    den = UNetTileDenoiser(unet, pos, negative_prompt_embeds=neg, guidance_scale=2.0,
                           controls=[TileControl(Spy(), image, factor=F)])
    model = TiledModel(den, TilingConfig(tile_size=16, tile_batch_size=64), height=24, width=40, num_steps=2,
                       generator=gen(5))
    x = torch.randn(1, 4, 24, 40, generator=gen(1))
    with torch.no_grad():
        for step in range(2):
            seen.clear()
            model(x, torch.tensor(300), step)
            chunks = model.chunks(step)
            assert len(seen) == len(chunks)
            for (shape, cond), chunk in zip(seen, chunks):
                boxes = [model.context(b) for b in chunk]
                expected = torch.cat([image[..., t * F : b * F, l * F : r * F] for t, l, b, r in boxes])
                # the crops, not the whole image resized; the unconditional rows get them too
                assert torch.equal(cond, torch.cat([expected, expected]))
    # shifted grids: the boxes moved between the steps, and so did the crops
    assert model.plans[0] != model.plans[1]


def test_control_is_bit_identical_whatever_tile_batch_size_with_regions_too(unet, controlnet, embeds):
    pos, neg = embeds
    other = torch.randn(1, 5, pos.shape[-1], generator=gen(9))
    image = control_image(24, 40)
    outs = []
    for regions in ((), (TileRegion(other, (4.0, 3.0, 22.0, 20.0), 1.0, 2.0),)):
        for batch in (1, 3, 64):
            scheduler = EulerDiscreteScheduler(num_train_timesteps=1000)
            scheduler.set_timesteps(3)
            den = UNetTileDenoiser(unet, pos, negative_prompt_embeds=neg, guidance_scale=3.0, regions=regions,
                                   controls=[TileControl(controlnet, image, scale=0.7, factor=F)])
            with torch.no_grad():
                outs.append(sample_tiled(den, torch.randn(1, 4, 24, 40, generator=gen(0)), scheduler,
                                         TilingConfig(tile_size=16, tile_batch_size=batch), generator=gen(2),
                                         progress=False))
    assert all(torch.isfinite(o).all() for o in outs)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert torch.equal(outs[3], outs[4]) and torch.equal(outs[3], outs[5])
    assert not torch.equal(outs[0], outs[3])


def test_guidance_start_and_end_follow_diffusers_rule(controlnet):
    timesteps = (999.0, 749.0, 499.0, 249.0)
    control = TileControl(controlnet, control_image(4, 4), factor=F, start=0.25, end=0.75, timesteps=timesteps)
    assert [control.active(torch.tensor(t)) for t in timesteps] == [False, True, True, False]
    assert all(TileControl(controlnet, control_image(4, 4), factor=F).active(torch.tensor(t)) for t in timesteps)


def test_a_control_image_that_does_not_cover_the_latent_is_refused(controlnet):
    control = TileControl(controlnet, control_image(8, 8), factor=F)
    with pytest.raises(ValueError, match="does not cover latent box"):
        control.crops([(0, 0, 8, 12)], 1)
