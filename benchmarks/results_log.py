"""Result rows of a long benchmark, one JSON object per line, appended as they come so a rerun resumes."""

from __future__ import annotations

import json
from pathlib import Path


def done_keys(path: Path, fields: tuple[str, ...]) -> set[tuple]:
    """The ``fields`` of every row already in ``path`` (none when it does not exist)."""
    if not path.exists():
        return set()
    return {tuple(json.loads(line)[f] for f in fields) for line in path.read_text().splitlines() if line.strip()}


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
