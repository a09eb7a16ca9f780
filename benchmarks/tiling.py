"""Tiled sampling speed and memory: FSTD vs explicit overlap vs naive vs diffusers' MultiDiffusion.

Every method samples the same latent with the same UNet, scheduler (DDIM), steps and prompt
embeddings; each runs in its own child process so its peak RSS is its own. Prints a table and one
JSON line. Weights are random: honest for speed and memory, says nothing about image quality.

    .venv/bin/python benchmarks/tiling.py                      # CPU, tiny UNet, 4096^2 px canvas
    .venv/bin/python benchmarks/tiling.py --unet sd15 --device cuda --dtype float16   # on a GPU
    .venv/bin/python benchmarks/tiling.py --arch flux --size 4096 --device cuda --dtype bfloat16 --guidance 3.5

``--arch flux|sd3`` (FLUX.1-dev's / SD3 medium's published transformer sizes, random weights) samples a
16-channel latent on a flow-matching schedule with anysize.core.dit's tile denoisers, each tile at its
global position; MultiDiffusion (a UNet pipeline) is left out for them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("MKL_CBWR", "AVX2,STRICT")

import torch  # noqa: E402

# fstd: the default (edge tiles cut to the band, both axes shifted every step); fstd-clamp: edge tiles
# clamped inward with the "auto" shift; fstd-clamp-both / fstd-clamp-alt: clamped, both axes / alternate
METHODS = ("fstd", "fstd-clamp", "fstd-clamp-both", "overlap", "naive", "multidiffusion")
SHIFTS = {"fstd": "auto", "fstd-clamp": "auto", "fstd-clamp-both": "both", "fstd-clamp-alt": "alternate"}

# Published UNet configs (SD 1.5 and SDXL base), instantiated with random weights.
UNETS = {
    "tiny": dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=8, attention_head_dim=8,
    ),
    "sd15": dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8,
    ),
    "sdxl": dict(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=2048,
        attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    ),
}


TRANSFORMERS = ("flux", "sd3")


def build_transformer(args):
    """A random-weight FLUX.1-dev / SD3 medium transformer, prompt embeddings of their widths, and the
    flow-matching scheduler (FLUX's shifted by the whole latent's token count)."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from random_models import FLUX_SCHEDULER, transformer

    from anysize.core.nets import text_tokens

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    with torch.device(args.device):
        net = transformer(args.unet).to(dtype).eval()
    g = torch.Generator().manual_seed(0)
    width, pooled = net.config.joint_attention_dim, net.config.pooled_projection_dim
    text = [torch.randn(1, text_tokens(args.unet), width, generator=g).to(args.device, dtype) for _ in range(2)]
    pools = [torch.randn(1, pooled, generator=g).to(args.device, dtype) for _ in range(2)]
    lat = args.size // args.vae_factor
    if args.unet == "flux":
        scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
        sigmas = np.linspace(1.0, 1 / args.steps, args.steps)
        scheduler.set_timesteps(args.steps, sigmas=sigmas, mu=calculate_shift((lat // 2) ** 2))
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        scheduler.set_timesteps(args.steps)
    return net, scheduler, text, pools


def run_transformer(args):
    from anysize.core.dit import FluxTileDenoiser, SD3TileDenoiser
    from anysize.core.sampler import TiledModel, sample
    from anysize.core.tiling import TilingConfig

    net, scheduler, (pos, neg), (pooled, neg_pooled) = build_transformer(args)
    lat = args.size // args.vae_factor
    if args.unet == "flux":
        den = FluxTileDenoiser(net, pos, pooled, guidance_scale=args.guidance)
    else:
        den = SD3TileDenoiser(net, pos, pooled, latent=(lat, lat), guidance_scale=args.guidance,
                              negative_prompt_embeds=neg, negative_pooled_prompt_embeds=neg_pooled)
    method = args.method
    cfg = TilingConfig(method="fstd" if method.startswith("fstd") else method, tile_size=den.native_tile_size,
                       shift=SHIFTS.get(method, "auto"), tile_batch_size=args.tile_batch,
                       edges="clamp" if method.startswith("fstd-clamp") else "cut")
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, lat, lat, generator=g).to(args.device, net.dtype)
    model = TiledModel(den, cfg, height=lat, width=lat, num_steps=args.steps, generator=g)
    tile = min(cfg.tile_size, lat)
    with torch.no_grad():
        den(latents[..., :tile, :tile], scheduler.timesteps[0], [(0, 0, tile, tile)])  # warm-up
        sync(args.device)
        start = time.perf_counter()
        sample(model, latents, scheduler, generator=g)
        sync(args.device)
    return time.perf_counter() - start, model.total_evaluations / args.steps, cfg.tile_size


def build(args):
    from diffusers import DDIMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    unet = UNet2DConditionModel(**UNETS[args.unet]).to(args.device, dtype).eval()
    dim = unet.config.cross_attention_dim
    g = torch.Generator().manual_seed(0)
    pos, neg = (torch.randn(1, 77, dim, generator=g).to(args.device, dtype) for _ in range(2))
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    return unet, scheduler, pos, neg


def sdxl_extras(unet, args, dtype):
    if unet.config.addition_embed_type != "text_time":
        return None
    side = args.size
    return {"text_embeds": torch.zeros(1, 1280, device=args.device, dtype=dtype),
            "time_ids": torch.tensor([[side, side, 0, 0, side, side]], device=args.device, dtype=dtype)}


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_ours(args, unet, scheduler, pos, neg):
    from anysize.core.sampler import TiledModel, UNetTileDenoiser, sample
    from anysize.core.tiling import TilingConfig

    method = args.method
    cfg = TilingConfig(
        method="fstd" if method.startswith("fstd") else method, tile_size=unet.config.sample_size,
        shift=SHIFTS.get(method, "auto"), tile_batch_size=args.tile_batch,
        edges="clamp" if method.startswith("fstd-clamp") else "cut",
    )
    dtype = getattr(torch, args.dtype)
    den = UNetTileDenoiser(unet, pos, negative_prompt_embeds=neg, guidance_scale=args.guidance,
                           added_cond_kwargs=sdxl_extras(unet, args, dtype))
    lat_side = args.size // args.vae_factor
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, lat_side, lat_side, generator=g).to(args.device, dtype)
    scheduler.set_timesteps(args.steps)
    model = TiledModel(den, cfg, height=lat_side, width=lat_side, num_steps=args.steps, generator=g)
    with torch.no_grad():
        den(latents[..., : cfg.tile_size, : cfg.tile_size], scheduler.timesteps[0], [(0, 0, 1, 1)])  # warm-up
        sync(args.device)
        start = time.perf_counter()
        sample(model, latents, scheduler, generator=g)
        sync(args.device)
    evals = model.total_evaluations / args.steps
    return time.perf_counter() - start, evals, cfg.tile_size


def run_multidiffusion(args, unet, scheduler, pos, neg):
    """diffusers' StableDiffusionPanoramaPipeline as shipped (64-latent windows, stride 8)."""
    from diffusers import AutoencoderKL, StableDiffusionPanoramaPipeline

    vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8, latent_channels=4)
    pipe = StableDiffusionPanoramaPipeline(vae=vae.to(args.device), text_encoder=None, tokenizer=None, unet=unet,
                                           scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor == 8, "MultiDiffusion's views assume a factor-8 VAE"
    views = pipe.get_views(args.size, args.size)
    sync(args.device)
    start = time.perf_counter()
    pipe(prompt_embeds=pos, negative_prompt_embeds=neg, height=args.size, width=args.size,
               num_inference_steps=args.steps, guidance_scale=args.guidance, view_batch_size=args.tile_batch,
               generator=torch.Generator().manual_seed(0), output_type="latent")
    sync(args.device)
    return time.perf_counter() - start, len(views), 64


def child(args):
    if args.unet in TRANSFORMERS:
        seconds, evals, tile = run_transformer(args)
    else:
        unet, scheduler, pos, neg = build(args)
        fn = run_multidiffusion if args.method == "multidiffusion" else run_ours
        seconds, evals, tile = fn(args, unet, scheduler, pos, neg)
    lat_side = args.size // args.vae_factor
    peak = (torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps({
        "method": args.method, "seconds": seconds, "s_per_step": seconds / args.steps,
        "tiles_per_step": evals, "area_ratio": evals * min(tile, lat_side) ** 2 / lat_side**2,
        "peak_mb": peak
    }))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=4096, help="canvas side in image pixels")
    p.add_argument("--vae-factor", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--unet", "--arch", dest="unet", choices=(*UNETS, *TRANSFORMERS), default="tiny",
                   help="the denoiser: a UNet config, or FLUX.1-dev's / SD3 medium's transformer (random weights)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--tile-batch", type=int, default=16)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--method", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.method:
        return child(args)
    if args.unet in ("sdxl", *TRANSFORMERS):
        args.methods = ",".join(m for m in args.methods.split(",") if m != "multidiffusion")  # SD 1.x pipeline only
    rows = []
    for m in args.methods.split(","):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--method", m]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            sys.exit(f"{m} failed:\n{res.stderr[-3000:]}")
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(f"  done {m}: {rows[-1]['seconds']:.1f} s", file=sys.stderr)
    report(args, rows)


def report(args, rows):
    base = next((r for r in rows if r["method"] == "fstd"), rows[0])
    lat = args.size // args.vae_factor
    what = f"{args.unet} transformer" if args.unet in TRANSFORMERS else f"{args.unet} UNet"
    schedule = "flow matching" if args.unet in TRANSFORMERS else "DDIM"
    print(f"\n{what}, {args.dtype} on {args.device}, {args.size}^2 px canvas ({lat}^2 latent), "
          f"{schedule} {args.steps} steps, guidance {args.guidance}, tile batch {args.tile_batch}")
    print("| method | tiles/step | evaluated area / latent | s/step | x fstd time | peak MB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        r["time_vs_fstd"] = r["seconds"] / base["seconds"]
        print(f"| {r['method']} | {r['tiles_per_step']:.1f} | {r['area_ratio']:.3f} | {r['s_per_step']:.3f} | "
              f"{r['time_vs_fstd']:.2f} | {r['peak_mb']:.0f} |")
    print(json.dumps({"benchmark": "tiling", "unet": args.unet, "size": args.size, "device": args.device,
                      "dtype": args.dtype, "steps": args.steps, "rows": rows}))


if __name__ == "__main__":
    main()
