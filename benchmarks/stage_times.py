"""Where the time of one ``anysize`` command goes: imports, model loading, stage 1, each stage-2 pass's
sampling, each VAE decode, the colour fix and the file write.

Runs the command line in this process with timers wrapped around the pipeline's stage methods (the
library itself carries no timing code), then prints one line per stage and, with ``--json``, writes
them as a list of ``{"stage", "seconds", "peak_rss_mib_so_far"}``; the last is the RSS high-water mark
when the stage ended, so the stage where it jumps set the peak. ``benchmarks/scale.py`` runs every size
through this script. Everything after ``--`` is the ``anysize`` command line:

    .venv/bin/python benchmarks/stage_times.py -- generate "two red circles on grass" --size 2048x2048 -o out.tif
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import sys
import time
from pathlib import Path

START = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's anysize, whatever is installed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=None, help="write the stage times here")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the anysize command line, after --")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the anysize command line after --")
    times: list[dict] = []

    def record(stage: str, seconds: float) -> None:
        # the process's RSS high-water mark so far: the first stage whose value jumps set the peak
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        times.append({"stage": stage, "seconds": seconds, "peak_rss_mib_so_far": round(peak)})

    import torch  # noqa: F401  (the heavy imports, counted on their own)
    import diffusers  # noqa: F401
    import transformers  # noqa: F401

    from anysize import cli, pipeline

    record("imports", time.perf_counter() - START)
    _wrap(pipeline.AnySizePipeline, "from_pretrained", lambda *a, **k: "load models", record, classmethod)
    class PhaseTimes:  # every phase of the plan the command runs: stage 1, each pass, each decode, the output
        def on_phase_start(self, phase):
            self.start = time.perf_counter()

        def on_phase_end(self, phase):
            w, h = phase.size
            record(f"{phase.name} ({w}x{h})", time.perf_counter() - self.start)

    run = pipeline.AnySizePipeline.run  # the CLI plans once, then runs the plan: hand it the hooks there

    def run_with_hooks(self, plan, **kwargs):
        return run(self, plan, **kwargs, hooks=PhaseTimes())

    pipeline.AnySizePipeline.run = run_with_hooks
    try:
        code = cli.main(command)
    finally:
        record("total", time.perf_counter() - START)
        width = max(len(t["stage"]) for t in times)
        for t in times:
            print(f"{t['stage']:<{width}}  {t['seconds']:8.2f} s  peak RSS so far {t['peak_rss_mib_so_far']} MiB",
                  file=sys.stderr)
        if args.json is not None:
            args.json.write_text(json.dumps(times, indent=1) + "\n")
    return code


def _wrap(owner, name: str, label, record, kind=None) -> None:
    """Replace ``owner.name`` by a version that records its wall time under ``label(*args)``."""
    original = getattr(owner, name)
    func = original.__func__ if kind is classmethod else original

    @functools.wraps(func)
    def timed(*a, **k):
        start = time.perf_counter()
        try:
            return func(*a, **k)
        finally:
            record(label(*a, **k), time.perf_counter() - start)

    setattr(owner, name, kind(timed) if kind else timed)


if __name__ == "__main__":
    sys.exit(main())
