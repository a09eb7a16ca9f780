"""Result rows of a long benchmark, one JSON object per line, appended as they come so a rerun resumes."""

from __future__ import annotations

import json
from pathlib import Path


def read_rows(path: Path) -> list[dict]:
    """Every row already in ``path``, a JSON-lines file (none when it does not exist)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def done_keys(path: Path, fields: tuple[str, ...]) -> set[tuple]:
    """The ``fields`` of every row already in ``path`` (none when it does not exist)."""
    return {tuple(row[f] for f in fields) for row in read_rows(path)}


def append(path: Path, row: dict) -> None:
    """Print ``row`` and append it to ``path``."""
    print(json.dumps(row), flush=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def run_and_tabulate(args, run, table) -> None:
    """Unless ``args.table_only``: ``run(args)``, appending to ``args.jsonl``. Then the table of every
    row in ``args.jsonl``, printed and written to ``args.table`` when given."""
    if not args.table_only:
        args.jsonl.parent.mkdir(parents=True, exist_ok=True)
        run(args)
    text = table(args.jsonl)
    print(text)
    if args.table is not None:
        args.table.write_text(text)


# ---------------------------------------------------------------------- layout benchmarks (regions, grounding)
# W:H -> the default model's stage-1-only size: its bucket, or (4:1, 1:4) the 2:1 bucket stretched 2x
STAGE1_SIZES = {"4:1": (256, 64), "2:1": (128, 64), "1:1": (80, 80), "1:2": (64, 128), "1:4": (64, 256)}


def ratio_label(w: int, h: int) -> str:
    """``"4:1"``, ``"1:2"``...: a size's W:H as the tables name it."""
    r = w / h
    return f"{r:g}:1" if r >= 1 else f"1:{1 / r:g}"


def size_order(key: tuple) -> tuple:
    """Table order of a (ratio, "WxH") key: widest first, then smaller first."""
    w, h = (int(v) for v in key[1].split("x"))
    return (-w / h, w * h)


def add_layout_arguments(p, *, layouts: int, seed: int) -> None:
    """The options the layout benchmarks share: ratios, layouts, seed, steps, --full, result files, samples."""
    p.add_argument("--ratios", nargs="+", default=list(STAGE1_SIZES), choices=list(STAGE1_SIZES), help="W:H")
    p.add_argument("--layouts", type=int, default=layouts)
    p.add_argument("--seed", type=int, default=seed)
    p.add_argument("--steps", type=int, default=20, help="stage-1 steps")
    p.add_argument("--upscale-steps", type=int, default=None,
                   help="stage-2 steps (default: the upscaler's own, as the pipeline does: 1 for the default model)")
    p.add_argument("--full", default=None, metavar="WxH", help="both stages at this size instead of stage 1 alone")
    p.add_argument("--jsonl", type=Path, required=True)
    p.add_argument("--table", type=Path, default=None)
    p.add_argument("--samples", type=Path, default=None, help="save the first 4 layouts' images here")
    p.add_argument("--table-only", action="store_true")
