"""Tile parallelism over ``torch.distributed``: each step's tile batches split across processes.

Under ``torchrun --nproc_per_node N``, :func:`init` joins the process group that torchrun describes
(``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``): NCCL with one GPU per
process (``cuda:LOCAL_RANK``) on CUDA, gloo on the CPU. :class:`anysize.core.sampler.TiledModel` then asks
:func:`current` and, inside a group, hands its tile batches to :func:`share_batches`: each WHOLE batch
(the exact chunk the single-process loop would make) is evaluated by one rank and broadcast to all,
and every rank merges every output in the original order. Each rank thus holds the same merged model
output and steps the scheduler identically, and the result equals the single-process run bit for bit
(same kernels, same batch composition, same merge order; README: Determinism for the thread count).

Noise and tile plans need nothing from here: they come from seeded CPU generators on every rank.
Outside torchrun (``WORLD_SIZE`` unset or 1) :func:`init` does nothing and :func:`current` is None.
"""

from __future__ import annotations

import heapq
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

# dtypes a tile output may have, by index: the header that announces an output's dtype sends the index
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass
class Group:
    """This process's place in a tile-parallel run, and the traffic it has seen.

    ``device``: where this rank computes (``cuda:LOCAL_RANK`` under NCCL); ``comm_device``: where
    tensors travel (the GPU for NCCL, the CPU for gloo). The counters add up over the whole run:
    ``bytes_received`` / ``bytes_sent`` are tile-output payloads (what this rank took from others /
    broadcast of its own), ``exchange_seconds`` the time spent in the exchange, which includes waiting
    for the slowest rank to finish its share.
    """

    world_size: int
    rank: int
    local_rank: int
    backend: str
    device: torch.device
    comm_device: torch.device
    owned: bool = True  # False when the caller had already initialised torch.distributed
    bytes_received: int = 0
    bytes_sent: int = 0
    exchange_seconds: float = 0.0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_GROUP: Group | None = None


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    if value is None or not value.strip().isdigit():
        raise RuntimeError(f"{name}={value!r}: must be a non-negative integer; start the processes with torchrun")
    return int(value)


def init(device: str | torch.device | None = None) -> Group | None:
    """Join the torchrun process group; None (and nothing done) when ``WORLD_SIZE`` is unset or 1.

    ``device``: what the caller would compute on alone (None: cuda if present, then mps, else cpu). A
    CUDA device becomes ``cuda:LOCAL_RANK`` with the NCCL backend (an explicit other index is an
    error: two ranks on one GPU); anything else keeps its device and talks over gloo through the CPU.
    Calling it again returns the same group.
    """
    global _GROUP
    if _GROUP is not None:
        return _GROUP
    if os.environ.get("WORLD_SIZE", "1").strip() in ("", "1"):
        return None
    world_size, rank, local_rank = _env_int("WORLD_SIZE"), _env_int("RANK"), _env_int("LOCAL_RANK")
    if not os.environ.get("MASTER_ADDR") or not os.environ.get("MASTER_PORT"):
        raise RuntimeError("MASTER_ADDR and MASTER_PORT: not set; start the processes with torchrun")
    from .devices import default_device

    wanted = torch.device(device) if device is not None else default_device()
    if wanted.type == "cuda":
        if wanted.index is not None and wanted.index != local_rank:
            raise ValueError(f"device={str(wanted)!r}: under torchrun each process uses cuda:LOCAL_RANK "
                             f"(here cuda:{local_rank}); pass 'cuda' or no device")
        wanted = torch.device("cuda", local_rank)
        torch.cuda.set_device(wanted)
    owned = not dist.is_initialized()  # else the caller's group, whatever its backend
    if owned:
        dist.init_process_group("nccl" if wanted.type == "cuda" else "gloo", init_method="env://",
                                world_size=world_size, rank=rank)
    backend = dist.get_backend()
    comm_device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    _GROUP = Group(dist.get_world_size(), dist.get_rank(), local_rank, backend, wanted, comm_device, owned=owned)
    return _GROUP


def current() -> Group | None:
    """The group :func:`init` joined, or None in a single-process run."""
    return _GROUP


def is_main() -> bool:
    """True on rank 0 and in a single-process run: the process that prints and writes files."""
    return _GROUP is None or _GROUP.is_main


def destroy() -> None:
    """Leave the group (destroying it if :func:`init` created it); a no-op outside one."""
    global _GROUP
    if _GROUP is not None and _GROUP.owned and dist.is_initialized():
        dist.destroy_process_group()
    _GROUP = None


def broadcast_object(value: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``value`` (any picklable object) on every rank, e.g. a seed drawn at random."""
    if _GROUP is None:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def assign_batches(costs: Sequence[int], world_size: int) -> list[int]:
    """The rank that evaluates each batch: longest batch first to the least-loaded rank (ties: lowest).

    ``costs``: per batch, e.g. tiles x tile area. Equal batches go round-robin; the short last batch
    goes to a rank with one batch fewer where there is one. Pure and deterministic: every rank
    computes the same assignment.
    """
    if world_size < 1:
        raise ValueError(f"world_size={world_size}: must be >= 1")
    owners = [0] * len(costs)
    loads = [(0, rank) for rank in range(world_size)]  # a heap of (load, rank)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, rank = heapq.heappop(loads)
        owners[i] = rank
        heapq.heappush(loads, (load + costs[i], rank))
    return owners


def share_batches(
    evaluate: Callable[[int], torch.Tensor], shapes: Sequence[tuple[int, int, int]], device: torch.device
) -> list[torch.Tensor]:
    """Every batch's output on every rank, each batch evaluated by one rank only.

    ``evaluate(i)``: batch i's output, ``(rows, C, h, w)`` with ``shapes[i] == (rows, h, w)``; C and
    the dtype are the same for every batch. Returns the outputs in batch order, on ``device``.

    Batches differ in shape (the last is short; tiles differ between steps), so each one travels in
    its own broadcast from its owner, whose shape every rank knows from ``shapes``: no padding, no
    pickling (``all_gather_object`` would pickle on the CPU), one collective per batch, and each rank
    receives exactly the outputs it did not compute. Only C and the dtype are announced, once per call.
    """
    group = _GROUP
    assert group is not None, "share_batches needs init() under torchrun"
    owners = assign_batches([rows * h * w for rows, h, w in shapes], group.world_size)
    mine = {i: evaluate(i) for i, owner in enumerate(owners) if owner == group.rank}
    start = time.perf_counter()
    channels, dtype = _output_spec(mine.get(0), owners[0], group)
    outs = []
    for i, ((rows, h, w), owner) in enumerate(zip(shapes, owners)):
        if owner == group.rank:
            out = mine.pop(i)
            if tuple(out.shape) != (rows, channels, h, w) or out.dtype != dtype:
                raise RuntimeError(f"batch {i}: output {tuple(out.shape)} {out.dtype}, expected "
                                   f"{(rows, channels, h, w)} {dtype}")
            dist.broadcast(out.to(group.comm_device).contiguous(), src=owner)
            group.bytes_sent += out.numel() * out.element_size()
        else:
            buf = torch.empty((rows, channels, h, w), dtype=dtype, device=group.comm_device)
            dist.broadcast(buf, src=owner)
            group.bytes_received += buf.numel() * buf.element_size()
            out = buf.to(device)
        outs.append(out)
    group.exchange_seconds += time.perf_counter() - start
    return outs


def _output_spec(first: torch.Tensor | None, owner: int, group: Group) -> tuple[int, torch.dtype]:
    """(channels, dtype) of the tile outputs, broadcast by the owner of batch 0."""
    header = torch.zeros(2, dtype=torch.int64, device=group.comm_device)
    if group.rank == owner:
        assert first is not None
        header[0], header[1] = first.shape[1], _DTYPES.index(first.dtype)
    dist.broadcast(header, src=owner)
    return int(header[0]), _DTYPES[int(header[1])]
