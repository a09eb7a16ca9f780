"""Peak memory of a tiled sampling step and a tiled VAE decode at 2048^2 and 8192^2 pixels (CPU).

Each case runs in its own child process; reported: the process's whole peak RSS, and its peak minus
the RSS right after the models were built (what the case itself added). The decoded pixels go
straight into a memory-mapped uint8 file whose written pages are flushed and released tile by tile,
so the full image is never resident. Tiny random-weight models: honest for memory, not for quality.

    .venv/bin/python benchmarks/memory.py
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import resource
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("MKL_CBWR", "AVX2,STRICT")

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from tiling import UNETS  # noqa: E402

VAE_FACTOR = 8


class ReleasingMemmapWriter:
    """Writes tiles into a uint8 memmap and drops the written pages from this process's RSS."""

    def __init__(self, path: str, shape: tuple[int, int, int]):
        self.array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)

    def write(self, top: int, left: int, tile: np.ndarray) -> None:
        self.array[top : top + tile.shape[0], left : left + tile.shape[1]] = tile
        self.array.flush()
        self.array._mmap.madvise(mmap.MADV_DONTNEED)


def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(16, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=8, latent_channels=4,
    ).eval()


def case_decode(side: int, mode: str) -> dict:
    from anysize.core.vae import tiled_decode

    vae = tiny_vae()
    lat = torch.randn(1, 4, side // VAE_FACTOR, side // VAE_FACTOR)
    base = psutil.Process().memory_info().rss
    with tempfile.TemporaryDirectory() as d, torch.no_grad():
        writer = ReleasingMemmapWriter(os.path.join(d, "out.npy"), (side, side, 3))
        start = time.perf_counter()
        tiled_decode(vae, lat, tile_size=64, mode=mode, out=writer, tile_batch_size=1)
        seconds = time.perf_counter() - start
        assert writer.array[side // 2, side // 2].any() or writer.array[-1, -1].any()
    return {"seconds": seconds, "base_mb": base / 2**20}


def case_sample(side: int) -> dict:
    from diffusers import DDIMScheduler, UNet2DConditionModel

    from anysize.core.sampler import TiledModel, UNetTileDenoiser, sample
    from anysize.core.tiling import TilingConfig

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNETS["tiny"]).eval()
    pos = torch.randn(1, 77, unet.config.cross_attention_dim)
    lat = torch.randn(1, 4, side // VAE_FACTOR, side // VAE_FACTOR)
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(1)
    base = psutil.Process().memory_info().rss
    cfg = TilingConfig(tile_size=64, tile_batch_size=8)
    model = TiledModel(UNetTileDenoiser(unet, pos, guidance_scale=7.5), cfg, height=lat.shape[-2],
                       width=lat.shape[-1], num_steps=1, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    with torch.no_grad():
        sample(model, lat, scheduler)
    return {"seconds": time.perf_counter() - start, "base_mb": base / 2**20, "tiles": model.total_evaluations}


def child(args) -> None:
    res = case_sample(args.side) if args.case == "sample" else case_decode(args.side, args.case.split("-")[1])
    res["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res.update(case=args.case, side=args.side)
    print(json.dumps(res))


def run_case(cmd: list[str], label: str) -> dict:
    """Run one case in a fresh process (so peaks do not mix); its last line of output is the JSON row."""
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"{label} failed:\n{res.stderr[-3000:]}")
    row = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"  done {label}: {row['seconds']:.1f} s", file=sys.stderr)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="2048,8192")
    p.add_argument("--cases", default="sample,decode-fast,decode-exact")
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--side", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        return child(args)
    rows = [run_case([sys.executable, __file__, "--case", case, "--side", str(side)], f"{case} {side}")
            for case in args.cases.split(",") for side in map(int, args.sizes.split(","))]
    print("| case | output px | latent | wall s | peak RSS MB | peak - models MB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        lat = r["side"] // VAE_FACTOR
        print(f"| {r['case']} | {r['side']}^2 | {lat}^2 | {r['seconds']:.1f} | {r['peak_mb']:.0f} | "
              f"{r['peak_mb'] - r['base_mb']:.0f} |")
    print(json.dumps({"benchmark": "memory", "rows": rows}))


if __name__ == "__main__":
    main()
