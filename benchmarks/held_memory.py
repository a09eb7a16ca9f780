"""What a request leaves resident once it returns, with and without handing freed memory back.

The pipeline calls :func:`anysize.memory.release_freed_memory` (glibc's ``malloc_trim``) before and
after every VAE decode, where its stages meet. This runs default-model requests with that call on and
off (replaced by a no-op), each in a fresh process, interleaved: the process's peak RSS during the
call and its RSS after the call returned, both above the RSS with the models loaded (and the
allocator trimmed once), and the call's wall time; with the call off, how long one ``malloc_trim(0)``
then takes by hand. CPU only (on CUDA the host side is small).

    .venv/bin/python benchmarks/held_memory.py --sizes 1024 2048 --repeats 3 --json benchmarks/results/held_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("MKL_CBWR", "AVX2,STRICT")

sys.path.insert(0, os.path.dirname(__file__))
from memory import run_case  # noqa: E402

MIB = 2**20


def case(size: int, release: bool) -> dict:
    import psutil
    import torch
    from memory_planner import Meter

    from anysize import AnySizePipeline, memory

    pipe = AnySizePipeline.from_pretrained()
    pipe.set_progress_bar_config(disable=True)
    meter = Meter(pipe.device)  # the baseline, with loading's leftovers handed back in both modes
    release_freed_memory = memory.release_freed_memory
    if not release:
        memory.release_freed_memory = lambda: False  # the pipeline looks it up on the module at each call
    start = time.perf_counter()
    image = pipe("two red circles over water", size, size, generator=torch.Generator().manual_seed(1),
                 num_inference_steps=2, upscale_inference_steps=2, guidance_scale=7.5,
                 upscale_guidance_scale=1.0).images[0]
    seconds = time.perf_counter() - start
    peak = meter.mark()
    row = {"size": size, "release": release, "seconds": seconds, "image": list(image.size),
           "peak_mib": peak / MIB, "held_mib": (psutil.Process().memory_info().rss - meter.base) / MIB}
    if not release:  # what the call costs, done by hand after the request
        start = time.perf_counter()
        if release_freed_memory():
            row["trim_ms"] = (time.perf_counter() - start) * 1000
            row["held_after_trim_mib"] = (psutil.Process().memory_info().rss - meter.base) / MIB
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048], help="square output sides")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--case", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        print(json.dumps(case(int(args.case[0]), args.case[1] == "on")))
        return
    if not sys.platform.startswith("linux"):
        sys.exit("held_memory.py reads /proc: Linux only")
    rows = [run_case([sys.executable, __file__, "--case", str(size), mode], f"{size}^2, release {mode}")
            for _ in range(args.repeats) for mode in ("off", "on") for size in args.sizes]
    print("| size | release freed memory | runs | wall s | peak above models MiB | held after return MiB |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        for release in (False, True):
            rs = [r for r in rows if r["size"] == size and r["release"] == release]

            def span(key: str, fmt: str = "{:.0f}") -> str:
                lo, hi = min(r[key] for r in rs), max(r[key] for r in rs)
                return fmt.format(lo) if fmt.format(lo) == fmt.format(hi) else f"{fmt.format(lo)}-{fmt.format(hi)}"

            print(f"| {size}^2 | {'on' if release else 'off'} | {len(rs)} | {span('seconds', '{:.1f}')} | "
                  f"{span('peak_mib')} | {span('held_mib')} |")
    trims = [r["trim_ms"] for r in rows if "trim_ms" in r]
    if trims:
        print(f"\nmalloc_trim(0) after a request without release: {min(trims):.1f}-{max(trims):.1f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "held_memory", "cpu_count": os.cpu_count(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
