"""Scale benchmark: peak memory and wall time of ``anysize generate`` from 512^2 up to gigapixel sizes.

Each size runs in a fresh process (``anysize generate ... -o OUT.tif``, streamed to a pyramid TIFF,
through ``benchmarks/stage_times.py``, which adds each stage's seconds to the row), so peaks do not
mix; the parent samples the child's whole RSS with psutil every 20 ms and keeps the peak
(``ru_maxrss`` of the child as a cross-check). Prints a markdown table (size, megapixels, wall s,
s/MP, CPU s/MP, steal, peak RSS, peak relative to 2048^2) and writes a JSON file and a plot.

Wall time on a shared virtual machine includes time the host gave to other guests: the row's
``steal_s`` is the machine's steal time (``/proc/stat``, all CPUs) during the run, and ``cpu_s`` the
child's user + system seconds, which steal does not inflate.

    python benchmarks/scale.py --sizes 512 1024 2048 4096 --steps 2 --upscale-steps 2

Targets (issue 5): peak RSS at 16384^2 within 1.5x of 2048^2; s/MP constant within 20% from 2048^2 up.

On a GPU, ``--arch sd15`` (SD 1.5 base + the SD x4 upscaler) or ``--arch sdxl`` (SDXL base, upscaling
img2img-style with itself) builds random-weight models of those architectures first
(``benchmarks/random_models.py``: honest for speed and memory, not for images) and the parent also
samples the GPU's used memory with NVML (``nvidia-ml-py``), less what was used before the child started:

    python benchmarks/scale.py --arch sd15 --sizes 2048 8192 32768 --json OUT.json --plot OUT.png -- --dtype float16
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


class GpuMemory:
    """Used memory of GPU 0 through NVML (whole device: the CUDA context and caching allocator
    included); None where NVML or a GPU is missing."""

    def __init__(self):
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml, self._handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
            self.name = pynvml.nvmlDeviceGetName(self._handle)
        except Exception:  # no nvidia-ml-py, no driver, no GPU: the CPU benchmark
            self._handle = None
            self.name = None

    def used(self) -> int | None:
        if self._handle is None:
            return None
        return int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)


def run_one(side: int, args: argparse.Namespace, out_dir: Path, gpu: GpuMemory) -> dict:
    out, stages = out_dir / f"scale_{side}.tif", out_dir / f"stages_{side}.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "stage_times.py"), "--json", str(stages), "--",
           "generate", args.prompt, "--size", f"{side}x{side}", "-o", str(out),
           "--steps", str(args.steps), "--upscale-steps", str(args.upscale_steps), "--seed", "1",
           "--guidance", "4", "--upscale-guidance", "1", "--quiet", *args.models, *args.extra]
    env = {**os.environ, "MKL_CBWR": "AVX2,STRICT"}
    gpu_before = gpu.used()
    cpu_before, steal_before = _child_cpu(), _steal()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak, gpu_peak = [0], [gpu_before or 0]

    def watch() -> None:
        try:
            p = psutil.Process(proc.pid)
            while proc.poll() is None:
                peak[0] = max(peak[0], p.memory_info().rss)
                if gpu_before is not None:
                    gpu_peak[0] = max(gpu_peak[0], gpu.used())
                time.sleep(0.02)
        except psutil.NoSuchProcess:
            pass

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        _, err = proc.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise SystemExit(f"{side}x{side}: still running after --timeout {args.timeout} s; killed")
    wall = time.perf_counter() - start
    cpu, steal = _child_cpu() - cpu_before, _steal()
    watcher.join()
    if proc.returncode != 0:
        raise SystemExit(f"{side}x{side} failed: {err.decode().strip()}")
    size = out.stat().st_size
    out.unlink()
    row = {"side": side, "megapixels": side * side / 1e6, "wall_s": wall, "s_per_mp": wall / (side * side / 1e6),
           "peak_rss_mib": peak[0] / 2**20, "file_mib": size / 2**20,
           "ru_maxrss_children_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
           "cpu_s": cpu, "cpu_s_per_mp": cpu / (side * side / 1e6),
           "steal_s": None if steal is None else steal - steal_before,
           "stages": json.loads(stages.read_text())}
    if gpu_before is not None:
        row["peak_gpu_mib"] = (gpu_peak[0] - gpu_before) / 2**20
    return row


def _child_cpu() -> float:
    """User + system CPU seconds of this process's finished children."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _steal() -> float | None:
    """The machine's steal time so far, CPU seconds summed over CPUs (Linux ``/proc/stat``); None elsewhere."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--upscale-steps", type=int, default=2)
    parser.add_argument("--prompt", default="two large red circles and a small blue triangle on grass")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "scale.json")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "scale.png")
    parser.add_argument("--arch", choices=("default", "sd15", "sdxl", "flux", "sd3"), default="default",
                        help="the embedded default model, or random-weight SD 1.5 (+ x4 upscaler) / SDXL / FLUX.1-dev / "
                             "SD3 medium models (the transformers upscale img2img)")
    parser.add_argument("--timeout", type=float, default=None, help="kill a size still running after this many s")
    parser.add_argument("--plot-from", type=Path, nargs="+", default=None, metavar="JSON",
                        help="run nothing: draw --plot from earlier --json files, one series each")
    parser.add_argument("extra", nargs="*", help="more anysize generate options, after --")
    args = parser.parse_args()
    if args.plot_from:
        _plot_series({f"{d.get('arch', 'default')}" + (f" ({d['gpu']})" if d.get("gpu") else ""): d["rows"]
                      for d in (json.loads(f.read_text()) for f in args.plot_from)}, args.plot)
        return
    gpu = GpuMemory()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        args.models = _models(args.arch, Path(tmp))
        try:
            for side in args.sizes:
                rows.append(run_one(side, args, Path(tmp), gpu))
                r = rows[-1]
                print(f"{side}x{side}: {r['wall_s']:.1f} s, peak RSS {r['peak_rss_mib']:.0f} MiB, "
                      f"GPU {r.get('peak_gpu_mib', 0):.0f} MiB", file=sys.stderr, flush=True)
                _write(rows, args, gpu)  # each size as it lands: a later size that fails keeps the others
        finally:
            _report(rows, args, gpu)


def _models(arch: str, tmp: Path) -> list[str]:
    if arch == "default":
        return []
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from random_models import build

    t0 = time.perf_counter()
    dirs = build(arch, tmp / "models")
    print(f"random {arch} models built in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return ["--base", str(dirs[0]), *(["--upscaler", str(dirs[1])] if len(dirs) > 1 else ["--img2img"])]


def _write(rows: list[dict], args: argparse.Namespace, gpu: GpuMemory) -> None:
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"command": " ".join(sys.argv), "arch": args.arch, "gpu": gpu.name,
                                     "steps": args.steps, "upscale_steps": args.upscale_steps, "rows": rows},
                                    indent=1))


def _report(rows: list[dict], args: argparse.Namespace, gpu: GpuMemory) -> None:
    if not rows:
        return
    ref = next((r for r in rows if r["side"] == 2048), None)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
          f"{'; GPU ' + gpu.name if gpu.name else ''}; model {args.arch}; steps {args.steps}+{args.upscale_steps}; "
          f"load average {os.getloadavg()[0]:.1f}")
    gpu_col = "peak_gpu_mib" in rows[0]
    print("| size | MP | wall s | s/MP | CPU s/MP | steal s | peak RSS MiB | peak / 2048^2 |"
          + (" peak GPU MiB |" if gpu_col else "") + " file MiB |")
    print("|---|---|---|---|---|---|---|---|" + ("---|" if gpu_col else "") + "---|")
    for r in rows:
        rel = f"{r['peak_rss_mib'] / ref['peak_rss_mib']:.2f}" if ref else "-"
        steal = "-" if r.get("steal_s") is None else f"{r['steal_s']:.0f}"
        print(f"| {r['side']}^2 | {r['megapixels']:.2f} | {r['wall_s']:.1f} | {r['s_per_mp']:.2f} | "
              f"{r['cpu_s_per_mp']:.2f} | {steal} | {r['peak_rss_mib']:.0f} | {rel} |" + (f" {r['peak_gpu_mib']:.0f} |" if gpu_col else "")
              + f" {r['file_mib']:.1f} |")
    _plot_series({"": rows}, args.plot)


def _plot_series(series: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    for name, rows in series.items():
        mp = [r["megapixels"] for r in rows]
        a.plot(mp, [r["peak_rss_mib"] for r in rows], "o-", label=f"{name} process RSS".strip())
        if "peak_gpu_mib" in rows[0]:
            a.plot(mp, [r["peak_gpu_mib"] for r in rows], "s--", label=f"{name} GPU (NVML)".strip())
        b.plot(mp, [r["s_per_mp"] for r in rows], "o-", label=f"{name} wall".strip())
        if "cpu_s_per_mp" in rows[0]:
            b.plot(mp, [r["cpu_s_per_mp"] for r in rows], "s--", label=f"{name} CPU (user + system)".strip())
    if len(series) > 1 or any("peak_gpu_mib" in rows[0] for rows in series.values()):
        a.legend(fontsize=7)
    if len(series) > 1 or any("cpu_s_per_mp" in rows[0] for rows in series.values()):
        b.legend(fontsize=7)
    a.set(xscale="log", xlabel="output megapixels", ylabel="peak memory, MiB", title="peak memory (whole process)")
    b.set(xscale="log", xlabel="output megapixels", ylabel="seconds per megapixel", title="time per megapixel")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
