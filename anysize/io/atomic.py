"""Atomic file writes: a file appears whole under its name or not at all.

Every output of anysize (images, run-directory state, band files' metadata) is written through
:func:`atomic_write`: into a temporary file beside the target, fsynced, then renamed onto it, so a
crash or Ctrl-C never leaves a half-written file under the target's name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def atomic_write(target: Path, write: Callable[[BinaryIO], None]) -> None:
    """``write`` into a temporary file beside ``target``, fsync, then rename it onto ``target``."""
    tmp = tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.stem}.", suffix=target.suffix,
                                      delete=False)
    try:
        with tmp:
            write(tmp)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.chmod(tmp.name, 0o666 & ~_umask())
        os.replace(tmp.name, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp.name)
        raise
    fsync_dir(target.parent)


def _umask() -> int:
    """The process umask (NamedTemporaryFile creates files 0600; the result should get the usual mode)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_dir(directory: Path) -> None:
    """Make the rename durable where the platform allows opening a directory."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def replace_dir(new: Path, target: Path) -> None:
    """Rename ``new`` onto ``target``, deleting an old ``target`` folder only after the rename."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old."))
        os.replace(target, old / target.name)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
