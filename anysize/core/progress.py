"""Progress bars for the long loops (tiled sampling, tiled VAE passes): what ``progress=`` may be.

``progress`` is False / None (no bar), True (tqdm's), or a tqdm-like factory called as
``factory(total=..., desc=..., unit=...)`` (and ``initial=`` where a resumed loop starts part-way) whose
result has ``update(n)`` and ``close()``: ``anysize serve`` passes one that reports each tile to the page
(and stops a cancelled job there).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

Progress = Callable[..., Any] | bool | None


class NullBar:
    """A bar that shows nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(progress: Progress, total: int, desc: str, unit: str = "tile", initial: int = 0) -> Any:
    """A started bar for ``total`` units (``initial`` of them done already); close it when done."""
    if progress is None or progress is False:
        return NullBar()
    if progress is True:
        from tqdm.auto import tqdm

        progress = tqdm
    if not callable(progress):
        raise ValueError(f"progress={progress!r}: must be None, a bool, or a tqdm-like callable")
    return progress(total=total, desc=desc, unit=unit, **({"initial": initial} if initial else {}))
