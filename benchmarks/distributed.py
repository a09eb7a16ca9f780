"""Tile parallelism: one stage-2 upscale with 1 process vs 2 (torchrun, gloo on the CPU).

The same ``pipe.upscale`` (the shipped default model, a rendered scene as the source) runs as
1 process x 2 threads, 1 process x 1 thread and 2 processes x 1 thread (torchrun, gloo), each in its
own child after a 1-step warm-up. Times cover the sampling (``output_type="latent"``: the decode is
rank 0's alone). Prints a markdown table with the tile-output bytes each rank receives per step,
whether the 2-process latents equal the 1 x 1 ones bit for bit, the machine's load, and on paper the
same ratio of compute to communication for SDXL tiles (FLOPs counted on the meta device).

    .venv/bin/python benchmarks/distributed.py                              # 256x192 -> 1024x768, 10 steps
    .venv/bin/python benchmarks/distributed.py --size 2048x1536 --steps 4
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("MKL_CBWR", "AVX2,STRICT")

import torch  # noqa: E402

# (label, processes, threads per process)
RUNS = (("1 proc x 2 threads", 1, 2), ("1 proc x 1 thread", 1, 1), ("2 procs x 1 thread (gloo)", 2, 1))


def _size(text: str) -> tuple[int, int]:
    w, h = text.lower().split("x")
    return int(w), int(h)


def worker(args) -> None:
    """One run (one rank of it under torchrun); rank 0 prints one JSON line."""
    import PIL.Image

    from anysize import AnySizePipeline, distributed
    from anysize.train.scenes import render, sample_scene

    group = distributed.init("cpu")
    pipe = AnySizePipeline.from_pretrained(device="cpu")
    pipe.set_progress_bar_config(disable=True)
    w, h = args.source
    source = PIL.Image.fromarray(render(sample_scene(0, h / w), w, h))
    stamps: list[float] = []

    def stamp(pipe, i, t, kwargs):
        stamps.append(time.perf_counter())
        return None

    def upscale(steps: int) -> torch.Tensor:
        return pipe.upscale(source, *args.size, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                            tile_batch_size=args.tile_batch, output_type="latent", callback_on_step_end=stamp).images[0]

    upscale(1)  # warm-up
    if group is not None:
        group.bytes_received = group.bytes_sent = 0
        group.exchange_seconds = 0.0
    stamps.clear()
    start = time.perf_counter()
    latents = upscale(args.steps)
    seconds = time.perf_counter() - start
    if distributed.is_main():
        steps = [b - a for a, b in zip([start, *stamps], stamps)]
        print("RESULT " + json.dumps({
            "seconds": seconds, "ms_per_step": 1e3 * statistics.median(steps[1:] or steps),
            "threads": torch.get_num_threads(), "latent": list(latents.shape),
            "sha": hashlib.sha256(latents.float().numpy().tobytes()).hexdigest()[:16],
            "recv_per_step": group.bytes_received / args.steps if group else 0,
            "sent_per_step": group.bytes_sent / args.steps if group else 0,
            "exchange_ms_per_step": 1e3 * group.exchange_seconds / args.steps if group else 0.0,
        }), flush=True)
    distributed.destroy()


def run(args, procs: int, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    script = [__file__, "--worker", "--size", "x".join(map(str, args.size)), "--source",
              "x".join(map(str, args.source)), "--steps", str(args.steps), "--tile-batch", str(args.tile_batch)]
    launch = [sys.executable] if procs == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc_per_node={procs}"]
    res = subprocess.run([*launch, *script], env=env, capture_output=True, text=True)
    lines = [line for line in res.stdout.splitlines() if line.startswith("RESULT ")]
    if res.returncode or not lines:
        sys.exit(f"{procs} x {threads} failed:\n{res.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def sdxl_on_paper(size: tuple[int, int] = (4096, 4096)) -> str:
    """FLOPs of SDXL tiles (meta device: nothing allocated) vs the bytes each step's gather moves."""
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from anysize.core.tiling import TilingConfig
    from tiling import UNETS

    with torch.device("meta"):
        unet = UNet2DConditionModel(**UNETS["sdxl"]).to(torch.float16)
        f16 = dict(dtype=torch.float16)
        added = {"text_embeds": torch.randn(2, 1280, **f16), "time_ids": torch.randn(2, 6, **f16)}
        with FlopCounterMode(display=False) as counter:
            unet(torch.randn(2, 4, 128, 128, **f16), torch.tensor(500),
                 encoder_hidden_states=torch.randn(2, 77, 2048, **f16), added_cond_kwargs=added)
    lat_w, lat_h = size[0] // 8, size[1] // 8
    tiles = statistics.mean(len(TilingConfig(tile_size=128).plan(lat_h, lat_w, i, torch.Generator().manual_seed(i)))
                            for i in range(8))
    flops = counter.get_total_flops() * tiles
    gather = tiles * 4 * 128 * 128 * 2  # fp16 tile outputs: CFG is merged before the gather
    return (f"SDXL on paper, {size[0]}x{size[1]} px ({lat_w}x{lat_h} latent, {tiles:.1f} fstd tiles of 128^2 "
            f"a step, CFG): {flops / 1e12:.0f} TFLOP a step vs {gather / 2**20:.1f} MiB of tile outputs a step "
            f"(each of N ranks receives (N-1)/N of it): {flops / gather / 1e6:.0f} MFLOP per byte moved")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=_size, default=(1024, 768), help="output WxH in pixels")
    p.add_argument("--source", type=_size, default=(256, 192), help="source WxH in pixels (a rendered scene)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--tile-batch", type=int, default=8)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    load = [os.getloadavg()[0]]
    rows = []
    for label, procs, threads in RUNS:
        rows.append({"run": label, "procs": procs, **run(args, procs, threads)})
        load.append(os.getloadavg()[0])
        print(f"  done {label}: {rows[-1]['seconds']:.1f} s", file=sys.stderr)
    report(args, rows, load)


def report(args, rows: list[dict], load: list[float]) -> None:
    base = rows[0]
    reference = next(r for r in rows if r["procs"] == 1 and r["threads"] == 1)
    lat = rows[0]["latent"]
    print(f"\nstage-2 upscale {args.source[0]}x{args.source[1]} -> {args.size[0]}x{args.size[1]} "
          f"(latent {lat[-1]}x{lat[-2]}), default model, {args.steps} steps, tile batch {args.tile_batch}, "
          f"CPU float32, {os.cpu_count()} cores, 1-min load {' / '.join(f'{x:.1f}' for x in load)} "
          "(before / after each run)")
    print("| run | s | ms/step | vs 1x2 | recv KiB/step/rank | exchange ms/step | = 1x1 bit for bit |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        same = "(reference)" if r is reference else ("yes" if r["sha"] == reference["sha"] else "no")
        print(f"| {r['run']} | {r['seconds']:.1f} | {r['ms_per_step']:.0f} | {base['seconds'] / r['seconds']:.2f}x | "
              f"{r['recv_per_step'] / 1024:.0f} | {r['exchange_ms_per_step']:.1f} | {same} |")
    print("exchange ms includes waiting for the other rank to finish its share (load imbalance)")
    print(sdxl_on_paper())
    print(json.dumps({"benchmark": "distributed", "size": args.size, "source": args.source, "steps": args.steps,
                      "load": load, "rows": rows}))


if __name__ == "__main__":
    main()
