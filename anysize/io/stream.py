"""Streaming output: images larger than memory, written tile by tile into a pyramid TIFF or Deep Zoom.

The tiled VAE decode writes its tiles into a :class:`Raster`, an uncompressed ``H x W x C`` uint8 image
in a scratch file on disk, with positional reads and writes. It is not memory-mapped on purpose: pages
of a mapping stay in the process's resident set once touched (a 16384^2 image would add 0.8 GB to
RSS), while ``pread``/``pwrite`` go through the page cache, which the kernel may drop at will. Tiles may
arrive in any order (the decode batches tiles of equal shape together).

From a Raster (or any array), :func:`write_pyramid_tiff` writes a tiled TIFF (BigTIFF when large) with
reduced levels as SubIFDs, each half the previous, and :func:`write_dzi` writes a Deep Zoom image
(``NAME.dzi`` plus ``NAME_files/LEVEL/COL_ROW.png``, the layout of Microsoft's Deep Zoom and
OpenSeadragon). Both read one band of 256 rows at a time; each reduced level is itself a Raster made
from the one above it by a 2x2 box average, so memory stays at a few bands whatever the image size.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, Protocol, Union

import numpy as np

from .atomic import atomic_write, replace_dir

TILE = 256  # TIFF and Deep Zoom tile side, px
GIB = 2**30


class Rows(Protocol):
    """An ``(height, width, channels)`` uint8 image read and written a band of rows at a time."""

    height: int
    width: int
    channels: int

    def read(self, top: int, bottom: int) -> np.ndarray: ...

    def write_rows(self, top: int, rows: np.ndarray) -> None: ...


class ArrayRows:
    """:class:`Rows` over an in-memory ``(H, W, C)`` uint8 array (no copy)."""

    def __init__(self, array: np.ndarray):
        if array.ndim == 2:
            array = array[..., None]
        self.array = array
        self.height, self.width, self.channels = array.shape

    def read(self, top: int, bottom: int) -> np.ndarray:
        return self.array[top:bottom]

    def write_rows(self, top: int, rows: np.ndarray) -> None:
        self.array[top : top + rows.shape[0]] = rows


def pread_into(fd: int, data, offset: int, name: str) -> None:
    """Fill all of ``data`` (any writable buffer) from ``offset`` of ``fd``: ``os.preadv`` may read less.
    Raises OSError naming ``name`` when the file ends first."""
    view = memoryview(data).cast("B")
    while view:
        n = os.preadv(fd, [view], offset)
        if n <= 0:
            raise OSError(f"{name}: short read at byte {offset}")
        view, offset = view[n:], offset + n


def pwrite_all(fd: int, data, offset: int) -> None:
    """Write all of ``data`` (any buffer) at ``offset`` of ``fd``: ``os.pwrite`` may write less."""
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


class Raster:
    """An ``(height, width, channels)`` uint8 image in a raw scratch file, written and read with
    positional I/O. A :class:`anysize.core.vae.TileWriter`: ``write(top, left, tile)`` clips ``tile`` to the
    image, so a decode of a padded latent lands cropped. The file is deleted by :meth:`close`."""

    def __init__(self, path: str | os.PathLike, height: int, width: int, channels: int = 3):
        if min(height, width, channels) < 1:
            raise ValueError(f"raster {width}x{height}x{channels}: every side must be >= 1")
        self.path, self.height, self.width, self.channels = Path(path), height, width, channels
        self._row = width * channels
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(self._fd, height * self._row)  # sparse: unwritten pixels read as 0

    def write(self, top: int, left: int, tile: np.ndarray) -> None:
        """Place ``tile`` (h, w, C) or (h, w) at ``(top, left)``, clipped to the image."""
        tile = tile[: max(0, self.height - top), : max(0, self.width - left)]
        if tile.size == 0:
            return
        data = np.ascontiguousarray(tile, dtype=np.uint8).reshape(tile.shape[0], -1)
        if left == 0 and tile.shape[1] == self.width:
            self._pwrite(data.tobytes(), top * self._row)
            return
        for i, row in enumerate(data):
            self._pwrite(row.tobytes(), (top + i) * self._row + left * self.channels)

    def write_rows(self, top: int, rows: np.ndarray) -> None:
        self.write(top, 0, rows)

    def read(self, top: int, bottom: int) -> np.ndarray:
        """Rows ``top:bottom`` as a new (bottom - top, W, C) array."""
        top, bottom = max(0, top), min(self.height, bottom)
        out = np.empty((bottom - top, self.width, self.channels), np.uint8)
        pread_into(self._fd, out, top * self._row, f"raster {self.path}")
        return out

    def _pwrite(self, data: bytes, offset: int) -> None:
        pwrite_all(self._fd, data, offset)

    def close(self) -> None:
        """Close and delete the scratch file."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def __enter__(self) -> Raster:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


Source = Union[Rows, np.ndarray]


def as_rows(source: Source) -> Rows:
    return ArrayRows(source) if isinstance(source, np.ndarray) else source


def bands(source: Rows, rows: int = TILE) -> Iterator[tuple[int, np.ndarray]]:
    """``(top, band)`` over the image, ``rows`` rows at a time."""
    for top in range(0, source.height, rows):
        yield top, source.read(top, min(top + rows, source.height))


# ---------------------------------------------------------------------- colour statistics
def channel_moments(source: Rows, rows: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation, accumulated ``rows`` rows at a time in float64."""
    total, squares = np.zeros(source.channels), np.zeros(source.channels)
    for _, band in bands(source, rows):
        flat = band.reshape(-1, source.channels).astype(np.float64)
        total += flat.sum(0)
        squares += (flat**2).sum(0)
    n = source.height * source.width
    mean = total / n
    return mean, np.sqrt(np.maximum(squares / n - mean**2, 1e-12))


def apply_affine(source: Rows, scale: np.ndarray, shift: np.ndarray, rows: int = 1024) -> None:
    """``pixel * scale + shift`` per channel, rounded and clipped to uint8, in place, ``rows`` rows at a time."""
    scale, shift = scale.astype(np.float32), shift.astype(np.float32)
    for top, band in bands(source, rows):
        source.write_rows(top, np.clip((band.astype(np.float32) * scale + shift).round(), 0, 255).astype(np.uint8))


# ---------------------------------------------------------------------- pyramid levels
def halve(band: np.ndarray) -> np.ndarray:
    """2x2 box average (rounded), sides ``ceil(n / 2)``: an odd last row or column is averaged with itself."""
    if band.shape[0] % 2:
        band = np.concatenate([band, band[-1:]], 0)
    if band.shape[1] % 2:
        band = np.concatenate([band, band[:, -1:]], 1)
    s = band.astype(np.uint16)
    total = s[0::2, 0::2] + s[1::2, 0::2] + s[0::2, 1::2] + s[1::2, 1::2]
    return ((total + 2) // 4).astype(np.uint8)


def reduced_levels(source: Rows, scratch: Path, *, smallest: int = 1) -> Iterator[Rows]:
    """``source``, then each half-size level down to a longer side of at most ``smallest`` px. Levels
    with more than one band of pixels go to Rasters in ``scratch`` (closed as the next one is made);
    small ones live in memory."""
    level, k = source, 0
    try:
        yield level
        while max(level.height, level.width) > smallest:
            h, w = math.ceil(level.height / 2), math.ceil(level.width / 2)
            if h * w <= 4 * TILE * TILE:
                nxt: Rows = ArrayRows(np.concatenate([halve(b) for _, b in bands(level, 2 * TILE)]))
            else:
                nxt = Raster(scratch / f"level{k + 1}.raw", h, w, level.channels)
                for top, band in bands(level, 2 * TILE):
                    nxt.write_rows(top // 2, halve(band))
            if isinstance(level, Raster) and level is not source:
                level.close()
            level, k = nxt, k + 1
            yield level
    finally:
        if isinstance(level, Raster) and level is not source:
            level.close()


def _tiles(source: Rows, tile: int = TILE) -> Iterator[tuple[int, int, np.ndarray]]:
    """``(row, col, tile)`` in row-major order; edge tiles are smaller."""
    for top, band in bands(source, tile):
        for left in range(0, source.width, tile):
            yield top // tile, left // tile, band[:, left : left + tile]


def _padded(source: Rows, tile: int = TILE) -> Iterator[np.ndarray]:
    """Full ``tile x tile`` tiles (edges zero-padded), as tifffile's tile iterator wants them; 2-D for grey."""
    for _, _, t in _tiles(source, tile):
        if t.shape[:2] != (tile, tile):
            t = np.pad(t, ((0, tile - t.shape[0]), (0, tile - t.shape[1]), (0, 0)))
        yield t[..., 0] if source.channels == 1 else t


# ---------------------------------------------------------------------- writers
def write_pyramid_tiff(f: BinaryIO, source: Source, description: str, *, scratch: Path,
                       bigtiff: bool | None = None) -> None:
    """A tiled (256 x 256), zlib-compressed TIFF with reduced levels as SubIFDs (down to one tile), read
    from ``source`` one band at a time. ``bigtiff`` None: when the pixels exceed 2 GiB (a classic TIFF
    addresses 4 GiB). ``scratch``: a directory for the reduced levels."""
    import tifffile

    rows = as_rows(source)
    levels = reduced_levels(rows, scratch, smallest=TILE)
    count = _level_count(rows.height, rows.width, TILE)
    if bigtiff is None:
        bigtiff = rows.height * rows.width * rows.channels > 2 * GIB
    photometric = "minisblack" if rows.channels == 1 else "rgb"
    extras = ("unassalpha",) if rows.channels == 4 else None
    with tifffile.TiffWriter(f, bigtiff=bigtiff) as tif:
        for k, level in enumerate(levels):
            options = {"subifds": count - 1, "description": description} if k == 0 else {"subfiletype": 1}
            shape = (level.height, level.width) + ((level.channels,) if level.channels > 1 else ())
            tif.write(_padded(level), shape=shape, dtype=np.uint8,
                      tile=(TILE, TILE), compression="zlib", photometric=photometric, extrasamples=extras,
                      metadata=None, **options)


def _level_count(height: int, width: int, smallest: int) -> int:
    """How many levels :func:`reduced_levels` yields."""
    n = 1
    while max(height, width) > smallest:
        height, width, n = math.ceil(height / 2), math.ceil(width / 2), n + 1
    return n


def dzi_files_dir(path: str | os.PathLike) -> Path:
    """``NAME_files`` beside ``NAME.dzi``."""
    path = Path(path)
    return path.with_name(f"{path.stem}_files")


def write_dzi(path: Path, source: Source, metadata_json: str, *, scratch: Path,
              progress: Callable[[int], None] | None = None) -> None:
    """A Deep Zoom image: tiles of 256 px without overlap, PNG, every level down to 1 x 1, plus the
    metadata as ``NAME_files/anysize.json``. The tile folder is built beside the target under a
    temporary name and renamed into place; the ``.dzi`` descriptor is written last, atomically, so a
    failure never leaves a descriptor pointing at missing tiles."""
    import PIL.Image

    rows = as_rows(source)
    final = dzi_files_dir(path)
    building = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{final.name}."))
    try:
        top_level = math.ceil(math.log2(max(rows.height, rows.width))) if max(rows.height, rows.width) > 1 else 0
        for k, level in enumerate(reduced_levels(rows, scratch, smallest=1)):
            folder = building / str(top_level - k)
            folder.mkdir()
            for r, c, tile in _tiles(level):
                PIL.Image.fromarray(tile[..., 0] if tile.shape[2] == 1 else tile).save(
                    folder / f"{c}_{r}.png", compress_level=1)
                if progress is not None:
                    progress(1)
        (building / "anysize.json").write_text(metadata_json)
        replace_dir(building, final)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise

    xml = dzi_descriptor(rows.width, rows.height)
    atomic_write(path, lambda f: f.write(xml))


def dzi_descriptor(width: int, height: int, fmt: str = "png") -> bytes:
    """The Deep Zoom XML descriptor of a ``width x height`` image in tiles of :data:`TILE` px, no overlap."""
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n'
            f'<Image xmlns="http://schemas.microsoft.com/deepzoom/2008" TileSize="{TILE}" Overlap="0" '
            f'Format="{fmt}"><Size Width="{width}" Height="{height}"/></Image>\n').encode()
