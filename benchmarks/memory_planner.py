"""The memory planner's estimates against measured peaks, per stage and per request.

Every case runs in its own child process so peaks do not mix. Measured: on the CPU, the process's
peak resident memory (VmHWM, reset between stages through /proc/self/clear_refs) less the resident
memory right after the models loaded; on CUDA, ``torch.cuda.max_memory_allocated`` less the memory
allocated after loading (host memory is not measured there). Stages are the phases of the request's
plan (``pipe.plan_run``), told apart by a ``hooks=`` object: a phase's window runs from the end of the
previous one to its own end, and the plan's phases are the memory planner's stages, name for name.

Cases: full requests of the shipped default model (``AnySizePipeline.from_pretrained()``, ~15M
parameters, 2 + 2 steps, guidance 7.5, the planner's tile batch, VAE tile 64), and components at
realistic widths: one CFG tile-batch call of an SD-1.5-shaped random-weight UNet (fp32, 64 latent px
tiles), a tiled decode of a 64 x 64 latent with SD's VAE shape, and the sampler state of a large
latent with a trivial denoiser.

    .venv/bin/python benchmarks/memory_planner.py              # everything, ~4 min on 2 CPU cores
    .venv/bin/python benchmarks/memory_planner.py --no-sd      # without the SD-sized components
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import subprocess
import sys
import time

os.environ.setdefault("MKL_CBWR", "AVX2,STRICT")

import psutil  # noqa: E402
import torch  # noqa: E402

from random_models import SD_VAE  # noqa: E402  (benchmarks/ is on the path when run as a script)
from tiling import UNETS  # noqa: E402

MIB = 2**20
REQUESTS = ("256x256", "512x512", "1024x1024", "2048x2048", "1024x256")
SD15_UNET = UNETS["sd15"]


def _malloc_trim() -> None:
    """Hand the C allocator's free heap memory back to the system (glibc), so RSS is what is live."""
    from anysize import memory

    gc.collect()
    memory.release_freed_memory()


class Meter:
    """Peak memory since the last :meth:`mark`, above the baseline taken at construction (after
    handing the allocator's free memory back, so loading's leftovers do not hide the request's)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        _malloc_trim()
        if self.cuda:
            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated(device)
        else:
            self.base = psutil.Process().memory_info().rss
        self._reset()

    def _reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := current RSS

    def mark(self) -> int:
        """Peak bytes above the baseline since the previous mark; starts the next window."""
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            status = open("/proc/self/status").read()
            peak = int(re.search(r"VmHWM:\s+(\d+)", status)[1]) * 1024
        self._reset()
        return peak - self.base


def _random_init(cls, config: dict, device: torch.device):
    """A diffusers model of ``config`` with N(0, 0.02) weights, built without the slow default init."""
    with torch.device("meta"):
        model = cls(**config)
    model = model.to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model.eval()


# ---------------------------------------------------------------------- child cases
def case_request(size: str, img2img: bool) -> dict:
    """One default-model request, stage by stage."""
    from anysize import AnySizePipeline, Request
    from anysize.models import default_model_paths

    width, height = map(int, size.split("x"))
    if img2img:
        pipe = AnySizePipeline.from_pretrained(default_model_paths()[0], img2img=True)
    else:
        pipe = AnySizePipeline.from_pretrained()
    pipe.set_progress_bar_config(disable=True)
    # the default model's upscaler was trained without captions: guidance 1 in stage 2 (docs/model_card.md)
    # panorama="tiled": the 1024x256 case measures stage 1 sampled by tiles (the "(panorama)" row in docs/benchmarks.md)
    request = Request("a red fox in the snow", width, height, num_inference_steps=2, upscale_inference_steps=2,
                      guidance_scale=7.5, upscale_guidance_scale=1.0, panorama="tiled", vae_tile_size=64)
    run = pipe.plan_run(request)  # the same plan the call runs; the pipeline decodes 64 px tiles
    plan, meter, measured = run.memory, Meter(pipe.device), {}

    class PhasePeaks:  # a phase's window runs from the end of the previous one to its own end
        def on_phase_end(self, phase):
            measured[phase.name] = meter.mark()

    start = time.perf_counter()
    pipe.run(run, generator=torch.Generator().manual_seed(0), hooks=PhasePeaks())
    return {"case": f"{'img2img ' if img2img else ''}{size}", "seconds": time.perf_counter() - start,
            "tile_batch_size": plan.tile_batch_size, "vae_tile_size": plan.vae_tile_size,
            "stages": [{"stage": s.name, "estimate": plan.cost(s), "measured": measured.get(s.name)}
                       for s in plan.stages],
            "estimate": plan.peak, "measured": max(measured.values())}


def case_sd_unet(tile_batch: int) -> dict:
    """One classifier-free-guidance call of an SD-1.5-shaped UNet on ``tile_batch`` 64 x 64 latent tiles."""
    from diffusers import UNet2DConditionModel

    from anysize.memory import _RUNTIME_BYTES, unet_activation_bytes
    from anysize.core.sampler import UNetTileDenoiser

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    unet = _random_init(UNet2DConditionModel, SD15_UNET, device)
    pos, neg = torch.randn(2, 1, 77, 768, device=device)
    denoiser = UNetTileDenoiser(unet, pos, negative_prompt_embeds=neg, guidance_scale=7.5)
    x = torch.randn(tile_batch, 4, 64, 64, device=device)
    boxes = [(0, 0, 64, 64)] * tile_batch
    meter = Meter(device)
    start = time.perf_counter()
    with torch.no_grad():
        denoiser(x, torch.tensor(500, device=device), boxes)
    measured = meter.mark()
    estimate = _RUNTIME_BYTES + unet_activation_bytes(unet, 64, 64, 2 * tile_batch)
    return {"case": f"SD-1.5 UNet, {tile_batch} tile(s) of 64x64, CFG", "seconds": time.perf_counter() - start,
            "estimate": estimate, "measured": measured}


def case_sd_vae(side: int) -> dict:
    """A fast tiled decode of a ``side`` x ``side`` latent (one tile) through an SD-shaped decoder."""
    from diffusers import AutoencoderKL

    from anysize.memory import _RUNTIME_BYTES, tiled_decode_bytes
    from anysize.core.vae import tiled_decode

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vae = _random_init(AutoencoderKL, SD_VAE, device)
    latents = torch.randn(1, 4, side, side, device=device)
    meter = Meter(device)
    start = time.perf_counter()
    with torch.no_grad():
        tiled_decode(vae, latents, tile_size=64, mode="fast", stats_size=side)
    measured = meter.mark()
    estimate = _RUNTIME_BYTES + tiled_decode_bytes(vae, side, side, 64)
    return {"case": f"SD VAE decode, {side}x{side} latent ({8 * side} px)", "seconds": time.perf_counter() - start,
            "estimate": estimate, "measured": measured}


def case_state(side: int) -> dict:
    """Sampler state alone: 2 DPM-Solver++ steps on a ``side`` x ``side`` latent, a trivial denoiser, FSTD tiles."""
    from diffusers import DPMSolverMultistepScheduler

    from anysize.memory import _RUNTIME_BYTES, _STATE_FLOATS
    from anysize.core.sampler import sample_tiled
    from anysize.core.tiling import TilingConfig

    scheduler = DPMSolverMultistepScheduler(prediction_type="v_prediction")
    scheduler.set_timesteps(2)
    meter = Meter(torch.device("cpu"))
    start = time.perf_counter()
    cond = torch.randn(1, 3, side, side)  # an upscaler's noised conditioning image, held by its denoiser
    cond = cond + torch.randn_like(cond)
    latents = torch.randn(1, 4, side, side) * scheduler.init_noise_sigma
    sample_tiled(lambda x, t, boxes: x * 0.5, latents, scheduler, TilingConfig(tile_size=64, tile_batch_size=8),
                 generator=torch.Generator().manual_seed(0), progress=False)
    measured = meter.mark()
    return {"case": f"sampler state, {side}x{side} latent", "seconds": time.perf_counter() - start,
            "estimate": _RUNTIME_BYTES + side * side * _STATE_FLOATS * 4, "measured": measured}


def child(args: argparse.Namespace) -> None:
    if args.case in ("request", "img2img"):
        result = case_request(args.arg, img2img=args.case == "img2img")
    elif args.case == "sd-unet":
        result = case_sd_unet(int(args.arg))
    elif args.case == "sd-vae":
        result = case_sd_vae(int(args.arg))
    else:
        result = case_state(int(args.arg))
    print(json.dumps(result))


# ---------------------------------------------------------------------- parent
def _ratio(row: dict) -> str:
    if not row.get("measured"):
        return "-"
    return f"{row['estimate'] / row['measured']:.2f}x ({(row['estimate'] / row['measured'] - 1) * 100:+.0f}%)"


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / MIB:.0f}"


def _run(case: str, arg: str, mmap_threshold: int | None) -> dict:
    """One case in a fresh child process; its JSON result."""
    env = dict(os.environ)
    if mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    res = subprocess.run([sys.executable, __file__, "--case", case, "--arg", arg], capture_output=True, text=True,
                         env=env)
    if res.returncode:
        sys.exit(f"{case} {arg} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default=",".join(REQUESTS), help="default-model requests, WxH,...")
    p.add_argument("--img2img", default="512x512", help="img2img requests with the default base model ('' for none)")
    p.add_argument("--no-sd", action="store_true", help="skip the SD-sized UNet and VAE components")
    p.add_argument("--mmap-threshold", type=int, default=None, metavar="BYTES",
                   help="run the cases with glibc's MALLOC_MMAP_THRESHOLD_ fixed at BYTES (freed blocks above it "
                        "go back to the system at once, so resident memory follows live tensors)")
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--arg", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        return child(args)
    jobs = [("request", s) for s in args.sizes.split(",") if s]
    jobs += [("img2img", s) for s in args.img2img.split(",") if s]
    jobs += [("state", "1024")]
    if not args.no_sd:
        jobs += [("sd-unet", "1"), ("sd-unet", "2"), ("sd-vae", "64")]
    rows = []
    for case, arg in jobs:
        rows.append(_run(case, arg, args.mmap_threshold))
        print(f"  done {rows[-1]['case']}: {rows[-1]['seconds']:.1f} s", file=sys.stderr)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else \
        f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), torch {torch.__version__}"
    allocator = f", MALLOC_MMAP_THRESHOLD_={args.mmap_threshold}" if args.mmap_threshold else ""
    print(f"Peak memory above the loaded models: planner estimate vs measured ({device}{allocator}).\n")
    print("| case | tile batch | estimate MiB | measured MiB | estimate / measured | wall s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r.get('tile_batch_size', '-')} | {_mib(r['estimate'])} | {_mib(r['measured'])} | "
              f"{_ratio(r)} | {r['seconds']:.1f} |")
    print("\nPer stage (requests):\n")
    print("| request | stage | estimate MiB | measured MiB | estimate / measured |")
    print("|---|---|---|---|---|")
    for r in rows:
        for s in r.get("stages", []):
            print(f"| {r['case']} | {s['stage']} | {_mib(s['estimate'])} | {_mib(s['measured'])} | {_ratio(s)} |")
    print(json.dumps({"benchmark": "memory_planner", "device": device, "mmap_threshold": args.mmap_threshold,
                      "rows": rows}))


if __name__ == "__main__":
    main()
