"""The sampling loop: tiled == untiled for one tile, batch invariance, seeds, every scheduler."""

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

from anysize.core.sampler import TiledModel, TileMerger, UNetTileDenoiser, batch_invariant_linears, sample, sample_tiled
from anysize.core.tiling import TilingConfig

SCHEDULERS = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "dpmpp": DPMSolverMultistepScheduler,
    "unipc": UniPCMultistepScheduler,
}
STEPS = 4


def make_scheduler(name):
    s = SCHEDULERS[name](num_train_timesteps=1000)
    s.set_timesteps(STEPS)
    return s


def noise(h, w, seed=0, channels=4):
    return torch.randn(1, channels, h, w, generator=torch.Generator().manual_seed(seed))


def reference_loop(unet, latents, scheduler, pos, neg, scale, generator, *, invariant=True):
    """Plain untiled sampling with CFG, written as diffusers' StableDiffusionPipeline writes it; with
    ``invariant`` under the same batch-invariant per-sample linears as the tile denoiser."""
    extra = {"generator": generator} if not isinstance(scheduler, UniPCMultistepScheduler) else {}
    for t in scheduler.timesteps:
        x = scheduler.scale_model_input(latents, t)
        with batch_invariant_linears(unet if invariant else []):
            out = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([neg, pos])).sample
        u, c = out.chunk(2)
        latents = scheduler.step(u + scale * (c - u), t, latents, **extra).prev_sample
    return latents


def run(unet, embeds, config, scheduler_name, *, h=24, w=40, seed=0, scale=5.0):
    pos, neg = embeds
    g = torch.Generator().manual_seed(seed)
    den = UNetTileDenoiser(unet, pos, negative_prompt_embeds=neg, guidance_scale=scale)
    with torch.no_grad():
        return sample_tiled(den, noise(h, w), make_scheduler(scheduler_name), config, generator=g, progress=False)


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_one_tile_is_exactly_untiled_sampling(unet, embeds, name):
    pos, neg = embeds
    with torch.no_grad():
        ref = reference_loop(unet, noise(24, 40), make_scheduler(name), pos, neg, 5.0, torch.Generator().manual_seed(0))
    for method in ("fstd", "naive", "overlap", "none"):
        out = run(unet, embeds, TilingConfig(method=method, tile_size=64), name)
        assert torch.equal(out, ref), method
    # the batch-invariant linears change rounding only: plain diffusers arithmetic agrees to float32 noise,
    # amplified by 4 steps at guidance 5 on latents that reach |ref| = 660 (euler..unipc; ddim's stay in [-1, 1]).
    # Measured max |plain - ref| over the 5 schedulers, AMD EPYC Zen4, 1/2/4/8 threads: AVX-512 (this CPU's
    # default) 1.9e-3; AVX2 (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2, what an
    # EPYC without AVX-512 runs) 2.5e-3; ATEN_CPU_CAPABILITY=default 3.3e-3. The most any element exceeds
    # rtol * |ref| is 1.3e-3 (euler/euler_a): atol 1e-3 failed on an EPYC without AVX-512 (1.39e-3 at an element
    # where |ref| = 0.21; the AVX2 emulation gives the same figure), so atol is 5e-3, above every measured max.
    with torch.no_grad():
        plain = reference_loop(unet, noise(24, 40), make_scheduler(name), pos, neg, 5.0,
                               torch.Generator().manual_seed(0), invariant=False)
    torch.testing.assert_close(plain, ref, rtol=1e-3, atol=5e-3)


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_fstd_bit_identical_whatever_tile_batch_size(unet, embeds, name):
    # the default edges="cut": tiles of up to 9 shapes per step, batched by shape
    outs = [run(unet, embeds, TilingConfig(tile_size=16, tile_batch_size=b), name) for b in (1, 3, 64)]
    assert torch.isfinite(outs[0]).all()
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("edges", ["cut", "clamp"])
def test_batch_invariance_without_guidance(unet, embeds, edges):
    # without CFG a tile batch of 1 would be a UNet batch of 1, whose CPU kernels round differently from
    # larger batches (oneDNN's convolution; with oneDNN off, MKL's GEMM on small cut edge tiles: a 10x8
    # tile failed here). UNetTileDenoiser runs it as a batch of 2, so no kernel flag is needed.
    outs = [run(unet, embeds, TilingConfig(tile_size=16, tile_batch_size=b, edges=edges), "euler_a", scale=1.0)
            for b in (1, 2, 4, 64)]
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_unet_rows_do_not_depend_on_the_batch_under_batch_invariant_linears(unet):
    # the UNet alone, batches of 2..8 samples: each sample's output must be the same bits (batch 1 is
    # oneDNN's own convolution path, see above). Without the hooks this failed on an AMD EPYC machine.
    g = torch.Generator().manual_seed(5)
    x, e = torch.randn(8, 4, 16, 16, generator=g), torch.randn(8, 5, 32, generator=g)
    with torch.no_grad(), batch_invariant_linears(unet):
        full = unet(x, 500, encoder_hidden_states=e).sample
        for b in (2, 3, 5):
            assert torch.equal(unet(x[:b], 500, encoder_hidden_states=e[:b]).sample, full[:b]), b
    assert not unet.time_embedding.linear_1._forward_hooks  # removed on leaving the block


def test_batch_invariant_linears_skip_subclasses_and_token_inputs():
    class Scaled(torch.nn.Linear):  # a subclass with its own forward (as LoRA or quantized layers have)
        def forward(self, x):
            return 2 * super().forward(x)

    net = torch.nn.Module()
    net.plain, net.scaled = torch.nn.Linear(4, 3), Scaled(4, 3)
    x = torch.randn(6, 4)
    with batch_invariant_linears(net):
        torch.testing.assert_close(net.scaled(x), 2 * torch.nn.functional.linear(x, net.scaled.weight, net.scaled.bias))
        tokens = torch.randn(2, 5, 4)
        assert torch.equal(net.plain(tokens), torch.nn.functional.linear(tokens, net.plain.weight, net.plain.bias))
        rows = net.plain(x)
    torch.testing.assert_close(rows, net.plain(x))  # both assert_close here measured 0 on AVX-512 and AVX2


@pytest.mark.parametrize("method", ["fstd", "overlap", "naive"])
def test_same_seed_same_output_other_seed_differs(unet, embeds, method):
    cfg = TilingConfig(method=method, tile_size=16, tile_batch_size=4)
    a, b = run(unet, embeds, cfg, "euler_a", seed=7), run(unet, embeds, cfg, "euler_a", seed=7)
    assert torch.equal(a, b)
    assert not torch.equal(a, run(unet, embeds, cfg, "euler_a", seed=8))


def test_small_tiles_really_tile(unet, embeds):
    # guards against a plan that silently falls back to one whole-latent tile
    untiled = run(unet, embeds, TilingConfig(method="none"), "ddim")
    for method in ("fstd", "overlap", "naive"):
        tiled = run(unet, embeds, TilingConfig(method=method, tile_size=16), "ddim")
        assert torch.isfinite(tiled).all() and not torch.equal(tiled, untiled)


def test_super_resolution_conditioning_is_cropped_per_tile(sr_unet, embeds):
    """Concat-conditioned UNet (SD x4-upscaler layout): tiled with one tile == a direct call."""
    pos, _ = embeds
    low_res = noise(24, 40, seed=3, channels=3)
    level = torch.tensor([20])
    den = UNetTileDenoiser(sr_unet, pos, cond=low_res, class_labels=level)
    x, t = noise(24, 40), torch.tensor(500)
    with torch.no_grad():
        # as the denoiser runs a CPU batch of 1: a batch of 2 (test_batch_invariance_without_guidance) with
        # its per-sample linears one distinct row at a time
        pair = lambda v: torch.cat([v, v])  # noqa: E731
        with batch_invariant_linears(sr_unet):
            direct = sr_unet(pair(torch.cat([x, low_res], 1)), t, encoder_hidden_states=pair(pos),
                             class_labels=pair(level)).sample[:1]
        one = TiledModel(den, TilingConfig(method="none"), height=24, width=40, num_steps=1)(x, t, 0)
        assert torch.equal(one, direct)
        # with many tiles each crop of the conditioning goes with its crop of the latent
        tiled = TiledModel(den, TilingConfig(method="naive", tile_size=8), height=24, width=40, num_steps=1)(x, t, 0)
        crop = sr_unet(torch.cat([x[..., 8:16, 16:24], low_res[..., 8:16, 16:24]], 1), t,
                       encoder_hidden_states=pos, class_labels=level).sample
        # measured 7.2e-7..9.4e-7 max abs on AVX-512, AVX2 and default kernels, 1-4 threads
        assert torch.allclose(tiled[..., 8:16, 16:24], crop, atol=1e-5)


def test_per_tile_prompt_embeddings(unet, embeds):
    pos, neg = embeds
    seen = []

    def regional(box):
        seen.append(box)
        return pos if box[1] < 16 else neg

    den = UNetTileDenoiser(unet, pos, tile_prompt_embeds=regional)
    x, t = noise(16, 32), torch.tensor(300)
    with torch.no_grad():
        out = TiledModel(den, TilingConfig(method="naive", tile_size=16), height=16, width=32, num_steps=1)(x, t, 0)
        right = unet(x[..., 16:], t, encoder_hidden_states=neg).sample
    assert seen == [(0, 0, 16, 16), (0, 16, 16, 32)]
    assert torch.allclose(out[..., 16:], right, atol=1e-5)  # measured 1.4e-6..2.1e-6 max abs, any ISA above


def test_batch_of_images_and_progress_counts_tiles(unet, embeds):
    pos, neg = embeds
    den = UNetTileDenoiser(unet, pos.repeat(2, 1, 1), negative_prompt_embeds=neg.repeat(2, 1, 1), guidance_scale=3)
    model = TiledModel(den, TilingConfig(tile_size=16, tile_batch_size=3), height=24, width=40, num_steps=STEPS,
                       generator=torch.Generator().manual_seed(0))
    counted = []
    model.progress = counted.append
    lat = torch.randn(2, 4, 24, 40, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = sample(model, lat, make_scheduler("ddim"))
    assert out.shape == lat.shape and sum(counted) == model.total_evaluations
    assert model.total_evaluations == sum(len(p) for p in model.plans) >= STEPS * 6


def test_callback_can_replace_latents(unet, embeds):
    calls = []

    def cb(i, t, lat):
        calls.append(i)
        return torch.zeros_like(lat) if i == STEPS - 1 else None

    den = UNetTileDenoiser(unet, embeds[0])
    with torch.no_grad():
        out = sample_tiled(den, noise(16, 16), make_scheduler("euler"), TilingConfig(tile_size=8),
                           callback_on_step_end=cb, progress=False)
    assert calls == list(range(STEPS)) and torch.equal(out, torch.zeros_like(out))


def test_merger_refuses_uncovered_pixels():
    m = TileMerger(torch.Size((1, 4, 8, 8)), "uniform", dtype=torch.float32, device=torch.device("cpu"))
    m.add(torch.ones(1, 4, 4, 8), [(0, 0, 4, 8)])
    with pytest.raises(RuntimeError, match="uncovered"):
        m.result()


def test_merger_blends_overlaps_with_weights():
    m = TileMerger(torch.Size((1, 1, 1, 6)), "uniform", dtype=torch.float32, device=torch.device("cpu"))
    m.add(torch.cat([torch.full((1, 1, 1, 4), 1.0), torch.full((1, 1, 1, 4), 3.0)]), [(0, 0, 1, 4), (0, 2, 1, 6)])
    assert m.result().flatten().tolist() == [1, 1, 2, 2, 3, 3]


def test_blended_last_step_leaves_no_line_at_the_cuts():
    # a denoiser whose every tile returns its own constant: a one-grid step is a patchwork with a line
    # (a jump along a whole column or row) at each cut; the blended last step (two grids, tent weights)
    # leaves jumps only near the points where one grid's column cut crosses the other's row cut, so the
    # mean jump along any line is small; every other step stays one grid (each pixel its tile's output)
    def patchwork(x, t, boxes):
        values = [((b[0] * 7 + b[1] * 13) % 17) / 17 for b in boxes]
        return torch.cat([torch.full((x.shape[0] // len(boxes), *x.shape[1:]), v) for v in values])

    def biggest_jump(out):  # the largest mean jump along a column or a row line
        return max(float(out.diff(dim=-1).abs().mean(dim=(0, 1, 2)).max()),
                   float(out.diff(dim=-2).abs().mean(dim=(0, 1, 3)).max()))

    x = torch.zeros(1, 4, 96, 160)
    jumps = {}
    for last_step in ("single", "blend"):
        config = TilingConfig(tile_size=32, granularity=4, last_step=last_step)
        model = TiledModel(patchwork, config, height=96, width=160, num_steps=3,
                           generator=torch.Generator().manual_seed(0))
        first = model(x, torch.tensor(999), 0)
        for box in model.plans[0]:
            assert bool((first[..., box[0]:box[2], box[1]:box[3]] == patchwork(x[..., :1, :1], 0, [box])).all())
        jumps[last_step] = biggest_jump(model(x, torch.tensor(1), 2))
    assert jumps["single"] > 0.3 and jumps["blend"] < 0.25 * jumps["single"], jumps


@pytest.mark.parametrize("edges", ["cut", "clamp"])
def test_tiles_the_unet_sees_have_sides_it_divides(edges):
    # a 45 x 29 latent with granularity 4: cut edge tiles such as (24, 45) would be 21 wide, which a UNet
    # pads inside at each downsampling (a line of wrong colour along the tile's last column); the
    # denoiser sees them widened to a multiple of 4 and their outputs are trimmed back to the plan's box
    seen = []

    def coordinates(x, t, boxes):  # each output pixel holds its global (row, column)
        seen.extend(boxes)
        rows = [torch.arange(b[0], b[2]).view(-1, 1) * 1000 + torch.arange(b[1], b[3]) for b in boxes]
        return torch.stack(rows).unsqueeze(1).float()

    height, width, g = 29, 45, 4
    config = TilingConfig(tile_size=16, granularity=g, edges=edges, last_step="single")
    model = TiledModel(coordinates, config, height=height, width=width, num_steps=6,
                       generator=torch.Generator().manual_seed(1))
    x = torch.zeros(1, 1, height, width)
    truth = torch.arange(height).view(-1, 1) * 1000 + torch.arange(width)
    for step in range(6):
        seen.clear()
        assert torch.equal(model(x, torch.tensor(1), step)[0, 0], truth.float())
        assert len(seen) == len(model.plans[step])
        for (t, l, b, r), plan in zip(sorted(seen), sorted(model.plans[step])):
            assert (b - t) % g == 0 and (r - l) % g == 0
            assert t <= plan[0] and l <= plan[1] and b >= plan[2] and r >= plan[3]  # holds its box
            assert b - t - (plan[2] - plan[0]) < g and r - l - (plan[3] - plan[1]) < g
            assert 0 <= t and 0 <= l and b <= height and r <= width
    cut_plans = [p for plan in model.plans for p in plan if (p[3] - p[1]) % g]
    assert (edges == "cut") == bool(cut_plans)  # the cut plans did hold sides 4 does not divide


def test_widened_edge_tiles_stay_bit_identical_whatever_tile_batch_size(unet, embeds):
    # 25 x 41: odd sides, so every edge tile of the fixture UNet (granularity 2) is widened
    outs = [run(unet, embeds, TilingConfig(tile_size=16, tile_batch_size=b), "euler", h=25, w=41)
            for b in (1, 3, 64)]
    assert torch.isfinite(outs[0]).all()
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
