"""Tiled VAE with whole-image GroupNorm statistics (anysize.core.vae) against the untiled VAE.

Tiny random-weight AutoencoderKL (block_out_channels (16, 32): scale factor 2, decoder margin 12,
encoder margin 9 latent px) with randomly perturbed GroupNorm affines, so that statistics matter.
Measured on CPU at latent 73x97, abs error in [-1, 1] (the numbers the bounds below are set against):
exact decode 5.9e-6 max, exact encode 1.4e-6 max, fast decode (stats_size 48) 0.083 mean / 1.48 max
(stats_size 96, the default: 0.012 mean / 0.15 max), fast encode (stats_size 128 px) 0.029 mean,
naive per-tile GroupNorm 1.22 max / 0.092 mean. This random VAE with perturbed GroupNorm affines is
far more sensitive to statistics than a trained one, so fast-mode errors here are pessimistic.

The same figures on other kernels (AMD EPYC Zen4, 1/2/4 threads; AVX-512 is this CPU's default, AVX2 is
ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 as on an EPYC without AVX-512,
"default" is ATEN_CPU_CAPABILITY=default): exact decode 5.3e-6..5.8e-6 (AVX-512), 6.0e-6..9.9e-6 (AVX2),
7.6e-6..8.1e-6 (default), batched decode at most 8.3e-6, exact encode at most 1.6e-6 and its sample 2.4e-6
(bound 1e-4 for all, >= 10x); margin-1 decode 5.0e-4 everywhere; fp16 overflow 4.2e-3 (bound 0.02);
fp16 upcast at most 2.9e-6 (bound 1e-4); uint8 decode off by at most 1 level (float noise across a rounding
boundary); uint8 vs float encode input 0. Fast-mode means (0.083, 0.029) and the naive 1.22 are the same to
3 digits on every kernel.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from anysize.core.vae import (
    _GNState,
    _patched_group_norms,
    decoder_margin,
    encoder_margin,
    tiled_decode,
    tiled_encode,
    vae_scale_factor,
)

H, W = 73, 97  # odd latent size: ragged last tiles in both directions


def make_vae(*, attention: bool = False, force_upcast: bool = True) -> AutoencoderKL:
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=8, mid_block_add_attention=attention, sample_size=32,
        force_upcast=force_upcast,
    ).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random init of GroupNorm is the identity affine: perturb it so GN matters
        for m in vae.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.copy_(1 + 0.5 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.5 * torch.randn(m.bias.shape, generator=g))
    return vae


def smooth(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Spatially correlated field (like real latents/images), not white noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(*shape[:2], shape[2] // 7 + 2, shape[3] // 7 + 2, generator=g)
    return F.interpolate(coarse, size=shape[2:], mode="bicubic") + 0.05 * torch.randn(shape, generator=g)


@pytest.fixture(scope="module")
def vae() -> AutoencoderKL:
    return make_vae()


@pytest.fixture(scope="module")
def latents() -> torch.Tensor:
    return smooth((1, 4, H, W), seed=2)


@pytest.fixture(scope="module")
def reference(vae, latents) -> np.ndarray:
    """Untiled decode in [-1, 1], HWC, clamped as the tiled output is."""
    with torch.no_grad():
        return vae.decode(latents).sample[0].clamp(-1, 1).permute(1, 2, 0).numpy()


def decode_pm1(vae, latents, **kw) -> np.ndarray:
    return tiled_decode(vae, latents, output="float32", **kw) * 2 - 1


def naive_decode(vae, latents, tile: int, margin: int) -> np.ndarray:
    """Tiles decoded independently (each with its own GroupNorm statistics), same tiles and margin."""
    f, (h, w) = vae_scale_factor(vae), latents.shape[-2:]
    out = np.zeros((h * f, w * f, 3), np.float32)
    for t in range(0, h, tile):
        for left in range(0, w, tile):
            t0, l0 = max(t - margin, 0), max(left - margin, 0)
            b, r = min(t + tile, h), min(left + tile, w)
            with torch.no_grad():
                y = vae.decode(latents[:, :, t0:min(b + margin, h), l0:min(r + margin, w)]).sample
            y = y[0].clamp(-1, 1).permute(1, 2, 0).numpy()
            out[t * f:b * f, left * f:r * f] = y[(t - t0) * f:(b - t0) * f, (left - l0) * f:(r - l0) * f]
    return out


def test_margins_from_config(vae):
    class SD15:
        block_out_channels, layers_per_block = (128, 256, 512, 512), 2

    assert vae_scale_factor(vae) == 2
    assert (decoder_margin(vae.config), encoder_margin(vae.config)) == (12, 9)
    assert (decoder_margin(SD15), encoder_margin(SD15)) == (18, 14)


def test_exact_decode_matches_untiled(vae, latents, reference):
    """Measured 5.9e-6 max abs (fp32, [-1, 1]); margin one below the radius: 5.0e-4."""
    err = np.abs(decode_pm1(vae, latents, tile_size=16) - reference).max()
    assert err < 1e-4
    batched = decode_pm1(vae, latents, tile_size=16, tile_batch_size=4)
    assert np.abs(batched - reference).max() < 1e-4
    short = np.abs(decode_pm1(vae, latents, tile_size=16, margin=decoder_margin(vae.config) - 1) - reference).max()
    assert short > 10 * err  # the computed margin is tight: one px less is visibly worse


def test_naive_tiles_differ_much_more(vae, latents, reference):
    """Per-tile GroupNorm statistics: measured 1.22 max abs error, vs 5.9e-6 with shared statistics."""
    margin = decoder_margin(vae.config)
    naive = np.abs(naive_decode(vae, latents, 16, margin) - reference).max()
    exact = np.abs(decode_pm1(vae, latents, tile_size=16) - reference).max()
    assert naive > 0.1
    assert exact < naive / 10


def test_fast_decode_error(vae, latents, reference):
    """Stats from a copy 48 latent px long (2x smaller): measured mean 0.083, max 1.48 on this random VAE."""
    fast = decode_pm1(vae, latents, tile_size=32, mode="fast", stats_size=48)
    assert np.isfinite(fast).all()
    assert np.abs(fast - reference).mean() < 0.15
    # No downsampling needed (stats_size >= longer side): fast equals exact.
    full = decode_pm1(vae, latents, tile_size=32, mode="fast", stats_size=W)
    assert np.abs(full - reference).max() < 1e-4


def test_uint8_default_output(vae, latents, reference):
    img = tiled_decode(vae, latents, tile_size=32)
    assert img.dtype == np.uint8 and img.shape == (2 * H, 2 * W, 3)
    expected = np.round((reference + 1) / 2 * 255)
    assert np.abs(img.astype(np.float32) - expected).max() <= 1


def test_memmap_and_writer_receive_every_pixel(vae, tmp_path):
    z = smooth((1, 4, 21, 30), seed=5)
    mm = np.memmap(tmp_path / "img.f32", dtype=np.float32, mode="w+", shape=(42, 60, 3))
    mm[:] = -7.0  # sentinel outside [0, 1]
    assert tiled_decode(vae, z, tile_size=8, out=mm, output="float32") is mm
    assert not (mm == -7.0).any()
    assert np.array_equal(np.asarray(mm), tiled_decode(vae, z, tile_size=8, output="float32"))

    class Writer:
        def __init__(self):
            self.hits = np.zeros((42, 60), np.int32)

        def write(self, top, left, tile):
            assert tile.dtype == np.uint8 and tile.shape[2] == 3
            self.hits[top:top + tile.shape[0], left:left + tile.shape[1]] += 1

    writer = tiled_decode(vae, z, tile_size=8, out=Writer())
    assert (writer.hits == 1).all()  # every pixel exactly once


def test_exact_encode_matches_untiled(vae):
    """Latent 73x97 from a 146x194 image, 32-px tiles: measured 1.4e-6 max abs (mean); margin-1: 3.2e-3."""
    x = smooth((1, 3, 2 * H, 2 * W), seed=3).clamp(-1, 1)
    with torch.no_grad():
        moments = vae.encode(x).latent_dist.parameters
    ref = DiagonalGaussianDistribution(moments).mean
    z = tiled_encode(vae, x, tile_size=32)
    assert z.shape == (1, 4, H, W)
    assert (z - ref).abs().max() < 1e-4
    s = tiled_encode(vae, x, tile_size=32, sample=True, generator=torch.Generator().manual_seed(4))
    ref_s = DiagonalGaussianDistribution(moments).sample(torch.Generator().manual_seed(4))
    assert (s - ref_s).abs().max() < 1e-4
    fast = tiled_encode(vae, x, tile_size=32, mode="fast", stats_size=128)  # measured 0.029 mean
    assert (fast - ref).abs().mean() < 0.05


def test_encode_accepts_uint8_array(vae):
    x = smooth((1, 3, 40, 58), seed=6).clamp(-1, 1)
    u8 = ((x[0].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()
    as_tensor = torch.from_numpy(u8).permute(2, 0, 1)[None].float() / 127.5 - 1
    assert (tiled_encode(vae, u8, tile_size=16) - tiled_encode(vae, as_tensor, tile_size=16)).abs().max() < 1e-6


def test_encode_reads_an_image_made_on_demand(vae):
    """An object with shape and box() is read one tile (with margins) at a time, never whole."""
    x = smooth((1, 3, 40, 58), seed=6).clamp(-1, 1)
    u8 = ((x[0].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()

    class OnDemand:
        shape, boxes = u8.shape, []

        def box(self, b):
            self.boxes.append(b)
            return u8[b[0]:b[2], b[1]:b[3]]

    lazy = OnDemand()
    for mode in ("exact", "fast"):
        assert torch.equal(tiled_encode(vae, lazy, tile_size=16, mode=mode), tiled_encode(vae, u8, tile_size=16, mode=mode))
    assert max((b[2] - b[0]) * (b[3] - b[1]) for b in lazy.boxes) < u8.shape[0] * u8.shape[1]
    with pytest.raises(ValueError, match=r"shape \(H, W, 3\)"):
        OnDemand.shape = (40, 58)
        tiled_encode(vae, OnDemand(), tile_size=16)


def test_fp16_overflow_redone_in_float32():
    """A mid-block that overflows in fp16 (x1e5 > 65504) on every other call: those tiles go to fp32.

    A 12x20 latent in 8-px tiles: 2x3 tiles, ragged in both directions (20x28 took 3.7 s, 11.5 s on ATen's
    default kernels; 12x20 1.1 s). Measured: 30 of 60 tile evaluations redone; max abs error against the fp32
    decode 4.2e-3 on AVX-512, AVX2 and ATen's default kernels alike; bound 0.02.
    """
    vae16 = make_vae(force_upcast=False).half()
    vae32 = make_vae(force_upcast=False).half().float()  # the same (fp16-rounded) weights in fp32
    z = smooth((1, 4, 12, 20), seed=7)
    calls = [0]

    def overflow(module, args, output):  # the float32 copy inherits the hook: leave fp32 alone
        if output.dtype != torch.float16:
            return None
        calls[0] += 1
        return output * 1e5 if calls[0] % 2 else None

    vae16.decoder.mid_block.register_forward_hook(overflow)
    with torch.no_grad():
        assert not torch.isfinite(vae16.decode(z.half()).sample).all()  # the hook really breaks fp16
        ref = vae32.decode(z).sample[0].clamp(-1, 1).permute(1, 2, 0).numpy()
    with pytest.warns(RuntimeWarning, match="redone in float32"):
        out = decode_pm1(vae16, z.half(), tile_size=8)
    assert np.isfinite(out).all()
    assert np.abs(out - ref).max() < 0.02  # fp16 tiles mixed with fp32 ones


def test_fp16_force_upcast_runs_in_float32():
    vae16 = make_vae(force_upcast=True).half()
    vae32 = make_vae().half().float()
    z = smooth((1, 4, 20, 28), seed=8).half()
    with torch.no_grad():
        ref = vae32.decode(z.float()).sample[0].clamp(-1, 1).permute(1, 2, 0).numpy()
    out = decode_pm1(vae16, z, tile_size=8)
    assert np.abs(out - ref).max() < 1e-4
    assert next(vae16.parameters()).dtype == torch.float16  # the caller's VAE is left as it was


def test_group_norms_restored_also_on_error(vae, latents):
    norms = [m for m in vae.decoder.modules() if isinstance(m, torch.nn.GroupNorm)]
    with pytest.raises(KeyError):
        with _patched_group_norms(vae.decoder, _GNState()):
            assert all("forward" in m.__dict__ for m in norms)
            raise KeyError("boom")
    tiled_decode(vae, latents[:, :, :10, :10], tile_size=4)
    assert not any("forward" in m.__dict__ for m in norms)


def test_progress_counts_tile_evaluations(vae):
    z = smooth((1, 4, 10, 20), seed=9)
    bars = []

    class Bar:
        def __init__(self, total, desc, unit):
            self.total, self.n, self.closed = total, 0, False
            bars.append(self)

        def update(self, n=1):
            self.n += n

        def close(self):
            self.closed = True

    tiled_decode(vae, z, tile_size=8, progress=Bar)  # 2 x 3 tiles, 13 GroupNorms: 14 passes
    tiled_decode(vae, z, tile_size=8, mode="fast", stats_size=8, progress=Bar)
    assert [(b.total, b.n, b.closed) for b in bars] == [(6 * 14, 6 * 14, True), (7, 7, True)]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tile_size": 0}, r"tile_size=0: must be an integer >= 1"),
        ({"tile_size": 2.5}, r"tile_size=2.5: must be an integer"),
        ({"margin": -1}, r"margin=-1: must be an integer >= 0"),
        ({"mode": "quick"}, r"mode='quick': must be one of \('exact', 'fast'\)"),
        ({"output": "png"}, r"output='png': must be one of"),
        ({"tile_batch_size": 0}, r"tile_batch_size=0: must be an integer >= 1"),
        ({"out": np.zeros((4, 4, 3), np.uint8)}, r"out.shape=\(4, 4, 3\): must be \(H, W, C\) = \(20, 24, 3\)"),
        ({"out": np.zeros((20, 24, 3), np.float32)}, r"out.dtype=float32: must be uint8"),
        ({"out": [1, 2]}, r"out=list: must be None"),
    ],
)
def test_decode_bad_args(vae, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiled_decode(vae, torch.zeros(1, 4, 10, 12), **kwargs)


def test_bad_inputs(vae):
    with pytest.raises(ValueError, match=r"latents.shape\[0\]=2: must be 1"):
        tiled_decode(vae, torch.zeros(2, 4, 8, 8))
    with pytest.raises(ValueError, match=r"latents.shape\[1\]=3: must be vae.config.latent_channels=4"):
        tiled_decode(vae, torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"images height=31: must be a multiple of the VAE scale factor 2"):
        tiled_encode(vae, torch.zeros(1, 3, 31, 32))
    with pytest.raises(ValueError, match=r"tile_size=33: must be an integer >= 2 and a multiple of the VAE scale"):
        tiled_encode(vae, torch.zeros(1, 3, 32, 32), tile_size=33)
    with pytest.raises(ValueError, match=r"margin=3: must be an integer >= 0 and a multiple"):
        tiled_encode(vae, torch.zeros(1, 3, 32, 32), margin=3)
    with pytest.raises(ValueError, match=r"images array float32 \(32, 32, 3\): must be uint8, shape"):
        tiled_encode(vae, np.zeros((32, 32, 3), np.float32))


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_mid_block_attention_is_tile_local_but_runs(mode):
    """Attention sees only tile + margin, so only shapes and finiteness are checked.

    Measured (exact, 30x42 latent, 16-px tiles): 0.023 mean / 0.32 max abs error against untiled.
    """
    vae = make_vae(attention=True)
    z = smooth((1, 4, 30, 42), seed=10)
    img = tiled_decode(vae, z, tile_size=16, mode=mode, stats_size=16, output="float32")
    assert img.shape == (60, 84, 3) and np.isfinite(img).all()
    x = torch.from_numpy(img).permute(2, 0, 1)[None] * 2 - 1
    lat = tiled_encode(vae, x, tile_size=32, mode=mode, stats_size=32)
    assert lat.shape == (1, 4, 30, 42) and torch.isfinite(lat).all()
