"""Latent-sized sampler state on disk, read and written by row bands.

At 16384^2 px the x4 upscaler's latent is 4096^2 x 4 floats (256 MiB), and sampling in memory holds
about nine latent-sized tensors at once (latents, the scaled input, the merged output and its weights,
the multistep history, the conditioning image and its noise, step temporaries): 2.4 GB, the whole
growth of the process's memory with the image size. Above a RAM budget
(:func:`anysize.memory.banded_sampling`) the pipeline keeps these tensors in files instead and
:func:`anysize.core.sampler.sample_banded` works through them one band of rows at a time, so RAM holds a
band and a tile batch, whatever the image size.

Files are read and written with positional I/O (``pread``/``pwrite``), not memory-mapped, for the reason
given in :mod:`anysize.io.stream`: pages of a mapping count in the process's resident set once touched,
while the page cache that positional I/O goes through is the kernel's to drop.

numpy's ``memmap`` and safetensors' lazy loading were the library options; both map the file, which is
what this module must avoid, hence the few lines of positional I/O below.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..io.atomic import atomic_write, fsync_dir
from .checkpoint import load_scheduler_state, scheduler_state
from ..io.stream import pread_into, pwrite_all

Box = tuple[int, int, int, int]

BAND_BYTES = 8 * 2**20  # bytes of one latent-sized tensor's band: ~128 rows of a 4096-wide, 4-channel latent
NOISE_CHUNK = 2**20  # values per draw of NoiseStream (a multiple of 16: see there)


class DiskTensor:
    """A ``(B, C, H, W)`` tensor kept in a file (C order), read and written by rows.

    ``read(top, bottom)`` returns rows ``top:bottom`` of every plane as a new CPU tensor; the last read
    is cached, so the tiles of one row of a tile grid (which share their rows) read the file once.
    ``crop(boxes)`` stacks tiles like :func:`anysize.core.sampler.crop_tiles`. A new file starts all zeros.
    """

    def __init__(self, path: str | os.PathLike, shape: Sequence[int], dtype: torch.dtype = torch.float32, *,
                 create: bool = True):
        if len(shape) != 4 or min(shape) < 1:
            raise ValueError(f"shape={tuple(shape)}: must be 4-D (B, C, H, W) with every side >= 1")
        self.path, self.shape, self.dtype = Path(path), torch.Size(shape), dtype
        self.device = torch.device("cpu")
        self._item = torch.empty((), dtype=dtype).element_size()
        self._row = self.shape[3] * self._item
        self._plane = self.shape[2] * self._row
        flags = os.O_RDWR | (os.O_CREAT | os.O_TRUNC if create else 0)
        self._fd = os.open(self.path, flags, 0o600)
        size = self.shape[0] * self.shape[1] * self._plane
        if create:
            os.ftruncate(self._fd, size)  # sparse: reads as zeros until written
        elif os.fstat(self._fd).st_size != size:
            os.close(self._fd)
            raise ValueError(f"{self.path}: holds {os.path.getsize(self.path)} bytes, not the {size} of "
                             f"{tuple(self.shape)} {dtype}")
        self._cache: tuple[int, int, torch.Tensor] | None = None

    @property
    def ndim(self) -> int:
        return 4

    def _planes(self) -> Iterator[tuple[int, int]]:
        for b in range(self.shape[0]):
            for c in range(self.shape[1]):
                yield b, c

    def read(self, top: int, bottom: int) -> torch.Tensor:
        """Rows ``top:bottom`` (clipped to the tensor) of every plane, ``(B, C, bottom - top, W)``."""
        top, bottom = max(0, top), min(self.shape[2], bottom)
        if self._cache is not None and self._cache[0] <= top and bottom <= self._cache[1]:
            first, _, rows = self._cache
            return rows[:, :, top - first : bottom - first].clone()
        out = torch.empty((*self.shape[:2], bottom - top, self.shape[3]), dtype=self.dtype)
        raw = out.view(torch.uint8).numpy()  # the tensor's own bytes: the reads land in place
        for b, c in self._planes():
            pread_into(self._fd, raw[b, c], (b * self.shape[1] + c) * self._plane + top * self._row, str(self.path))
        self._cache = (top, bottom, out)
        return out.clone()

    def write(self, top: int, rows: torch.Tensor) -> None:
        """Store ``rows`` ``(B, C, h, W)`` at rows ``top:top + h``."""
        if rows.shape[:2] != self.shape[:2] or rows.shape[3] != self.shape[3] or top < 0 \
                or top + rows.shape[2] > self.shape[2]:
            raise ValueError(f"rows {tuple(rows.shape)} at row {top}: do not fit {tuple(self.shape)}")
        for b, c in self._planes():
            self.write_plane(b, c, top, rows[b, c])

    def write_plane(self, b: int, c: int, top: int, rows: torch.Tensor) -> None:
        """Store ``rows`` ``(h, W)`` of plane ``(b, c)`` at rows ``top:top + h``."""
        raw = rows.detach().to("cpu", self.dtype).contiguous().view(torch.uint8).numpy()
        pwrite_all(self._fd, raw, (b * self.shape[1] + c) * self._plane + top * self._row)
        self._cache = None

    def box(self, box: Box) -> torch.Tensor:
        """The ``(B, C, h, w)`` crop at ``box`` (top, left, bottom, right)."""
        t, l, b, r = box
        return self.read(t, b)[:, :, :, l:r]

    def crop(self, boxes: Sequence[Box], transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Tiles at ``boxes`` stacked box-major, ``(len(boxes) * B, C, h, w)``, from one read of their
        rows; ``transform`` (elementwise) is applied to those rows first."""
        top, bottom = min(b[0] for b in boxes), max(b[2] for b in boxes)
        rows = self.read(top, bottom)
        rows = rows if transform is None else transform(rows)
        return torch.cat([rows[:, :, t - top : b - top, l:r] for t, l, b, r in boxes])

    def to_tensor(self) -> torch.Tensor:
        """The whole tensor in memory."""
        return self.read(0, self.shape[2])

    def sync(self) -> None:
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._cache = None

    def __enter__(self) -> DiskTensor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Mapped:
    """A read-only elementwise view of a :class:`DiskTensor` for :func:`anysize.core.vae.tiled_decode`: ``box`` applies ``fn``."""

    def __init__(self, base: DiskTensor, fn: Callable[[torch.Tensor], torch.Tensor]):
        self.base, self.fn, self.shape, self.dtype, self.ndim = base, fn, base.shape, base.dtype, 4
        self.device = base.device

    def box(self, box: Box) -> torch.Tensor:
        return self.fn(self.base.box(box))


class NoiseStream:
    """Standard normal values of one ``torch.randn(total)`` draw, handed out a piece at a time.

    torch's CPU normal sampler fills a tensor in blocks of 16 values from consecutive uniforms, so
    draws of a multiple of 16 values in a row continue one another exactly; the last draw takes the
    remainder (never fewer than 16 values when ``total`` allows). With a CPU generator the pieces are
    therefore bit-identical to ``torch.randn(shape, generator=g)`` over the same total, so a banded run
    starts from the same noise as an in-memory one (``tests/test_bands.py`` checks it).
    """

    def __init__(self, total: int, generator: torch.Generator | None, chunk: int = NOISE_CHUNK):
        if chunk % 16:
            raise ValueError(f"chunk={chunk}: must be a multiple of 16")
        self.left, self.generator, self.chunk = total, generator, chunk
        self._buf = torch.empty(0)

    def _draw(self) -> None:
        n = min(self.chunk, self.left)
        if 0 < self.left - n < 16:
            n = self.left
        device = self.generator.device if self.generator is not None else "cpu"
        self._buf = torch.cat([self._buf, torch.randn(n, generator=self.generator, device=device).cpu()])
        self.left -= n

    def take(self, n: int) -> torch.Tensor:
        while self._buf.numel() < n:
            if self.left <= 0:
                raise ValueError("NoiseStream: asked for more values than its total")
            self._draw()
        out, self._buf = self._buf[:n], self._buf[n:].clone()
        return out


def fill_planes(target: DiskTensor, values: Callable[[int, int, int, int], torch.Tensor], *,
                rows: int | None = None) -> None:
    """Write ``target`` plane by plane, band by band, in its file's order: ``values(b, c, top, bottom)``
    returns rows ``top:bottom`` of plane ``(b, c)`` as an ``(h, W)`` tensor."""
    height = target.shape[2]
    rows = rows or band_rows(target.shape)
    for b, c in target._planes():
        for top in range(0, height, rows):
            bottom = min(height, top + rows)
            target.write_plane(b, c, top, values(b, c, top, bottom))


def band_rows(shape: Sequence[int], minimum: int = 1, budget: int = BAND_BYTES) -> int:
    """Rows per band: about ``budget`` bytes of a float32 tensor of ``shape``, at least ``minimum``."""
    per_row = shape[0] * shape[1] * shape[3] * 4
    return max(minimum, min(shape[2], budget // per_row))


def _is_band_tensor(value) -> bool:
    return torch.is_tensor(value) and value.ndim == 4


class BandWork:
    """The files of one banded sampling phase in ``directory``.

    - ``init.raw``: the starting latents (written by the caller before sampling);
    - ``latents0.raw``, ``latents1.raw``: step ``i`` reads buffer ``i % 2`` (``init`` at step 0) and
      writes buffer ``(i + 1) % 2``, so the last committed step's latents stay whole through a crash;
    - ``band{k}.p{parity}.safetensors``: band ``k``'s scheduler state after a step, by the same parity;
    - ``state.json``: the committed step and the generator's state after it, written atomically.

    ``durable``: fsync at each commit (a run directory); scratch work skips it.
    """

    def __init__(self, directory: str | os.PathLike, shape: Sequence[int], *, rows: int, durable: bool = False,
                 dtype: torch.dtype = torch.float32):
        self.dir, self.shape, self.rows, self.durable = Path(directory), torch.Size(shape), rows, durable
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = {"shape": list(self.shape), "rows": rows, "dtype": str(dtype)}
        meta_file = self.dir / "work.json"
        resume = meta_file.is_file()
        if resume and json.loads(meta_file.read_text()) != meta:
            raise ValueError(f"{self.dir}: holds banded work of another shape or band size; use a new run directory")
        self.init = DiskTensor(self.dir / "init.raw", shape, dtype, create=not resume)
        self.latents = [DiskTensor(self.dir / f"latents{p}.raw", shape, dtype, create=not resume) for p in (0, 1)]
        if not resume:
            data = json.dumps(meta).encode()
            atomic_write(meta_file, lambda f: f.write(data))
        height = self.shape[2]
        self.bands = [(top, min(height, top + rows)) for top in range(0, height, rows)]

    def source(self, step: int) -> DiskTensor:
        """The latents that step ``step`` starts from."""
        return self.init if step == 0 else self.latents[step % 2]

    def _band_file(self, k: int, parity: int) -> Path:
        return self.dir / f"band{k}.p{parity}.safetensors"

    def save_band(self, k: int, parity: int, scheduler) -> None:
        """Band ``k``'s scheduler state to its file of ``parity``, then drop its band tensors from memory."""
        tensors, plain = scheduler_state(scheduler)
        save_file(tensors, self._band_file(k, parity), metadata={"plain": json.dumps(plain)})
        self.strip(scheduler)

    @staticmethod
    def strip(scheduler) -> None:
        """Drop a scheduler's band tensors (4-D: latents, history) from memory; its files keep them."""
        for name, value in list(vars(scheduler).items()):
            if _is_band_tensor(value):
                setattr(scheduler, name, None)
            elif isinstance(value, (list, tuple)) and any(_is_band_tensor(v) for v in value):
                stripped = [None if _is_band_tensor(v) else v for v in value]
                setattr(scheduler, name, type(value)(stripped))

    def load_band(self, k: int, parity: int, scheduler, device: torch.device | str = "cpu") -> None:
        """Band ``k``'s scheduler state from its file of ``parity``, when there is one, onto ``device``."""
        file = self._band_file(k, parity)
        if not file.is_file():
            return
        with safe_open(file, "pt") as f:
            plain = json.loads(f.metadata()["plain"])
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        load_scheduler_state(scheduler, tensors, plain, device)

    def commit(self, step: int, generator: torch.Generator | None) -> None:
        """Record that ``step`` steps are done (their latents in :meth:`source` ``(step)``)."""
        if self.durable:
            self.source(step).sync()
            for k in range(len(self.bands)):
                with open(self._band_file(k, step % 2), "rb") as f:
                    os.fsync(f.fileno())
            fsync_dir(self.dir)
        state = {"step": step, "generator": None if generator is None else generator.get_state().tolist()}
        data = json.dumps(state).encode()
        if self.durable:
            atomic_write(self.dir / "state.json", lambda f: f.write(data))
        else:
            (self.dir / "state.json").write_bytes(data)

    def committed(self) -> tuple[int, torch.Tensor | None] | None:
        """(steps done, generator state after them) of the last commit, or None."""
        file = self.dir / "state.json"
        if not file.is_file():
            return None
        state = json.loads(file.read_text())
        gen = state["generator"]
        return state["step"], None if gen is None else torch.tensor(gen, dtype=torch.uint8)

    def close(self) -> None:
        for tensor in (self.init, *self.latents):
            tensor.close()

    def __enter__(self) -> BandWork:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
