"""Time and peak memory of the tiled VAE decode against its core tile size (CPU, default model's VAE).

The decode reads a margin of latent px around every core tile (13 for the default VAE), so a tile
of t latent px evaluates ((t + 2 * margin) / t)^2 times the pixels it keeps: 2.0x at 64, 1.45x at 128.
Larger tiles waste less, but hold larger activations. Each case runs in its own child process: the
default model's VAE in float32 (as the pipeline runs it on the CPU), random latents (the cost does not
depend on their values), fast mode with the statistics the planner's ``decode_kwargs`` would pass,
pixels into a memory-mapped file whose pages are released tile by tile (as a streamed output).
Reported: decode wall time, the process's peak RSS, that peak minus the RSS before the decode, and the
planner's estimate of the decode's activations (``anysize.memory.tiled_decode_bytes``).

    .venv/bin/python benchmarks/vae_tile.py --sides 256 512 --tiles 32 64 96 128 192 256
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

os.environ.setdefault("MKL_CBWR", "AVX2,STRICT")

import psutil  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from memory import ReleasingMemmapWriter, run_case  # noqa: E402


def case(side: int, tile: int, vae_dir: str) -> dict:
    from diffusers import AutoencoderKL

    from anysize import memory
    from anysize.core.vae import _plan_tiles, decoder_margin, tiled_decode, vae_scale_factor

    vae = AutoencoderKL.from_pretrained(vae_dir, torch_dtype=torch.float32).eval()
    factor = vae_scale_factor(vae)
    lat = torch.randn(1, vae.config.latent_channels, side, side, generator=torch.Generator().manual_seed(0))
    kwargs = memory.decode_kwargs(vae, side, side, tile)
    px = side * factor
    base = psutil.Process().memory_info().rss
    with tempfile.TemporaryDirectory() as d, torch.no_grad():
        writer = ReleasingMemmapWriter(os.path.join(d, "out.npy"), (px, px, 3))
        start = time.perf_counter()
        tiled_decode(vae, lat, mode="fast", out=writer, **kwargs)
        seconds = time.perf_counter() - start
        checksum = int(writer.array[:: max(1, px // 64), :: max(1, px // 64)].sum(dtype="int64"))
    # latent px the decode reads (its own tile plan: cores plus clamped margins) per px it keeps
    read = sum(h * w for h, w in (t.shape for t in _plan_tiles(side, side, tile, decoder_margin(vae.config))))
    return {"side": side, "tile": tile, "pixels": px, "seconds": seconds, "base_mb": base / 2**20,
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "estimate_mb": memory.tiled_decode_bytes(vae, side, side, tile) / 2**20,
            "overhead": read / side**2,
            "stats_size": kwargs["stats_size"], "checksum": checksum}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sides", type=int, nargs="+", default=[256, 512], help="latent sides (output: x4 for the default VAE)")
    p.add_argument("--tiles", type=int, nargs="+", default=[32, 48, 64, 96, 128, 192, 256])
    p.add_argument("--vae", default="anysize/default_model/upscaler/vae")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--case", nargs=2, type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        print(json.dumps(case(*args.case, args.vae)))
        return
    rows = [run_case([sys.executable, __file__, "--vae", args.vae, "--case", str(side), str(tile)],
                     f"latent {side}^2, tile {tile}") for side in args.sides for tile in args.tiles]
    print("| output | latent | VAE tile | evaluated / kept px | decode s | s / MP | peak RSS MiB | decode adds MiB | planner estimate MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        mp = r["pixels"] ** 2 / 1e6
        print(f"| {r['pixels']}^2 | {r['side']}^2 | {r['tile']} | {r['overhead']:.2f} | {r['seconds']:.1f} | "
              f"{r['seconds'] / mp:.2f} | {r['peak_mb']:.0f} | {r['peak_mb'] - r['base_mb']:.0f} | {r['estimate_mb']:.0f} |")
    for side in args.sides:
        sums = {r["checksum"] for r in rows if r["side"] == side}
        print(f"latent {side}^2: {'the same' if len(sums) == 1 else len(sums)} pixel checksums across tile sizes")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "vae_tile", "command": " ".join(sys.argv), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
