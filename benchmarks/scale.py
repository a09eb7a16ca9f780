"""Scale benchmark: peak memory and wall time of ``anysize generate`` from 512^2 up to gigapixel sizes.

Each size runs in a fresh process (``python -m anysize generate ... -o OUT.tif``, streamed to a pyramid
TIFF), so peaks do not mix; the parent samples the child's whole RSS with psutil every 20 ms and keeps
the peak (``ru_maxrss`` of the child as a cross-check). Prints a markdown table (size, megapixels, wall
s, s/MP, peak RSS, peak relative to 2048^2) and writes a JSON file and a plot.

    python benchmarks/scale.py --sizes 512 1024 2048 4096 --steps 2 --upscale-steps 2

Targets (issue 5): peak RSS at 16384^2 within 1.5x of 2048^2; s/MP constant within 20% from 2048^2 up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def run_one(side: int, args: argparse.Namespace, out_dir: Path) -> dict:
    out = out_dir / f"scale_{side}.tif"
    cmd = [sys.executable, "-m", "anysize", "generate", args.prompt, "--size", f"{side}x{side}", "-o", str(out),
           "--steps", str(args.steps), "--upscale-steps", str(args.upscale_steps), "--seed", "1",
           "--guidance", "4", "--upscale-guidance", "1", "--quiet", *args.extra]
    env = {**os.environ, "MKL_CBWR": "AVX2,STRICT"}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = [0]

    def watch() -> None:
        try:
            p = psutil.Process(proc.pid)
            while proc.poll() is None:
                peak[0] = max(peak[0], p.memory_info().rss)
                time.sleep(0.02)
        except psutil.NoSuchProcess:
            pass

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    _, err = proc.communicate()
    wall = time.perf_counter() - start
    watcher.join()
    if proc.returncode != 0:
        raise SystemExit(f"{side}x{side} failed: {err.decode().strip()}")
    size = out.stat().st_size
    out.unlink()
    return {"side": side, "megapixels": side * side / 1e6, "wall_s": wall, "s_per_mp": wall / (side * side / 1e6),
            "peak_rss_mib": peak[0] / 2**20, "file_mib": size / 2**20,
            "ru_maxrss_children_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--upscale-steps", type=int, default=2)
    parser.add_argument("--prompt", default="two large red circles and a small blue triangle on grass")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "scale.json")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "scale.png")
    parser.add_argument("extra", nargs="*", help="more anysize generate options, after --")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for side in args.sizes:
            rows.append(run_one(side, args, Path(tmp)))
            r = rows[-1]
            print(f"{side}x{side}: {r['wall_s']:.1f} s, peak RSS {r['peak_rss_mib']:.0f} MiB", file=sys.stderr,
                  flush=True)
    ref = next((r for r in rows if r["side"] == 2048), None)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"steps {args.steps}+{args.upscale_steps}; load average {os.getloadavg()[0]:.1f}")
    print("| size | MP | wall s | s/MP | peak RSS MiB | peak / 2048^2 | file MiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        rel = f"{r['peak_rss_mib'] / ref['peak_rss_mib']:.2f}" if ref else "-"
        print(f"| {r['side']}^2 | {r['megapixels']:.2f} | {r['wall_s']:.1f} | {r['s_per_mp']:.1f} | "
              f"{r['peak_rss_mib']:.0f} | {rel} | {r['file_mib']:.1f} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"command": " ".join(sys.argv), "steps": args.steps,
                                     "upscale_steps": args.upscale_steps, "rows": rows}, indent=1))
    _plot(rows, args.plot)


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mp = [r["megapixels"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    a.plot(mp, [r["peak_rss_mib"] for r in rows], "o-")
    a.set(xscale="log", xlabel="output megapixels", ylabel="peak RSS, MiB", title="peak memory (whole process)")
    b.plot(mp, [r["s_per_mp"] for r in rows], "o-")
    b.set(xscale="log", xlabel="output megapixels", ylabel="seconds per megapixel", title="time per megapixel")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
