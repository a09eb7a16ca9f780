"""Tile parallelism over torch.distributed: the batch assignment, and 2-process gloo runs on the CPU
that must equal the single-process run bit for bit.

Every comparison runs both sides at ONE thread per process (torchrun's default): oneDNN's CPU
convolution can round differently at another thread count, so 2 ranks x 1 thread equal 1 process x
1 thread, not 1 process x 2 threads (README: Determinism).
"""

import contextlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import torch.multiprocessing as mp
from conftest import EMBED_DIM, make_unet
from diffusers import DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler

from anysize import cli
from anysize.core import distributed
from anysize.core.distributed import assign_batches
from anysize.io.output import read_metadata
from anysize.core.sampler import UNetTileDenoiser, sample_tiled
from anysize.core.tiling import TilingConfig

WORLD = 2
SCHEDULERS = {"dpmpp": DPMSolverMultistepScheduler, "euler_a": EulerAncestralDiscreteScheduler}
# fstd on a 40x56 latent with 16 px tiles: 15-16 tiles a step in batches of 3, the last one short
CONFIG = TilingConfig(method="fstd", tile_size=16, tile_batch_size=3)
HEIGHT, WIDTH, STEPS = 40, 56, 5


# ---------------------------------------------------------------------- batch assignment
def test_equal_batches_go_round_robin():
    assert assign_batches([6] * 5, 2) == [0, 1, 0, 1, 0]
    assert assign_batches([6] * 4, 4) == [0, 1, 2, 3]


def test_short_last_batch_goes_to_a_rank_with_fewer_batches():
    # 5 full batches and a short one on 2 ranks: 3 full on rank 0, 2 full + the short one on rank 1
    owners = assign_batches([8, 8, 8, 8, 8, 2], 2)
    assert owners[-1] == 1 and owners.count(0) == 3


@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_assignment_covers_every_batch_and_balances_cost(world):
    costs = [9, 9, 9, 9, 9, 9, 9, 4, 1]
    owners = assign_batches(costs, world)
    loads = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(world)]
    assert len(owners) == len(costs) and set(owners) <= set(range(world))
    assert max(loads) - min(loads) <= max(costs)
    assert owners == assign_batches(costs, world)  # pure: every rank computes the same


def test_more_ranks_than_batches_and_no_batch():
    assert assign_batches([5, 5], 4) == [0, 1]
    assert assign_batches([], 3) == []
    with pytest.raises(ValueError, match="world_size"):
        assign_batches([1], 0)


def test_single_process_is_not_distributed(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init() is None and distributed.current() is None and distributed.is_main()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.init() is None


def test_init_names_what_torchrun_should_have_set(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        distributed.init("cpu")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    with pytest.raises(ValueError, match="cuda:LOCAL_RANK"):  # checked before any CUDA call
        distributed.init("cuda:1")
    assert distributed.current() is None


# ---------------------------------------------------------------------- 2 processes, sampler level
def _free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sample(unet, scheduler_name: str) -> tuple[torch.Tensor, int]:
    """The sampled latents, and the bytes of tile outputs this process computed."""
    g = torch.Generator().manual_seed(1)
    pos, neg = torch.randn(1, 5, EMBED_DIM, generator=g), torch.randn(1, 5, EMBED_DIM, generator=g)
    scheduler = SCHEDULERS[scheduler_name](num_train_timesteps=1000)
    scheduler.set_timesteps(STEPS)
    latents = torch.randn(1, 4, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(2))
    den = UNetTileDenoiser(unet, pos, negative_prompt_embeds=neg, guidance_scale=5.0)
    computed = 0

    def counting(x, t, boxes):
        nonlocal computed
        out = den(x, t, boxes)
        computed += out.numel() * out.element_size()
        return out

    with torch.no_grad():
        out = sample_tiled(counting, latents, scheduler, CONFIG, generator=torch.Generator().manual_seed(3),
                           progress=False)
    return out, computed


def _rank(rank: int, port: int, out_dir: str) -> None:
    """One rank of the 2-process run (torch.multiprocessing.spawn), joining as torchrun would."""
    os.environ.update(WORLD_SIZE=str(WORLD), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    group = distributed.init("cpu")
    try:
        unet = make_unet()
        results = {name: _sample(unet, name) for name in SCHEDULERS}
        traffic = {"received": group.bytes_received, "sent": group.bytes_sent}
        torch.save({"results": results, "traffic": traffic, "backend": group.backend}, Path(out_dir) / f"{rank}.pt")
    finally:
        distributed.destroy()


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_two_processes_equal_one_bit_for_bit(tmp_path, unet, one_thread):
    mp.spawn(_rank, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    reference = {name: _sample(unet, name) for name in SCHEDULERS}
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(WORLD)]
    for name, (ref, _) in reference.items():
        for r, got in enumerate(ranks):
            assert torch.equal(got["results"][name][0], ref), (name, r)
    # each rank sent what it computed and received what the other did: every tile output once
    for name, (_, total) in reference.items():
        assert sum(rank["results"][name][1] for rank in ranks) == total
    sent = [sum(rank["results"][name][1] for name in SCHEDULERS) for rank in ranks]
    assert [rank["traffic"]["sent"] for rank in ranks] == sent and min(sent) > 0
    assert [rank["traffic"]["received"] for rank in ranks] == sent[::-1]
    assert all(rank["backend"] == "gloo" for rank in ranks)


# ---------------------------------------------------------------------- 2 processes, command line
def test_torchrun_cli_writes_one_file_equal_to_one_process(tmp_path, model_dirs, capsys, one_thread):
    """``torchrun -m anysize generate`` without --seed: rank 0's seed on both ranks, one file and no
    leftovers, the pixels of a single-process run with that seed."""
    base, upscaler = model_dirs
    args = ["--size", "200x120", "--steps", "2", "--upscale-steps", "3", "--tile-size", "8", "--tile-batch", "3",
            "--base", str(base), "--upscaler", str(upscaler), "--device", "cpu"]
    out_dir = tmp_path / "dist"
    out_dir.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
         "-m", "anysize", "generate", "a red circle", *args, "-o", str(out_dir / "out.png")],
        env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines() == [str(out_dir / "out.png")]  # rank 0 alone prints
    assert sorted(p.name for p in out_dir.iterdir()) == ["out.png"]
    seed = read_metadata(out_dir / "out.png")["seed"]
    assert cli.main(["generate", "a red circle", *args, "--seed", str(seed), "--quiet",
                     "-o", str(tmp_path / "one.png")]) == 0
    capsys.readouterr()
    a, b = (np.asarray(PIL.Image.open(p)) for p in (out_dir / "out.png", tmp_path / "one.png"))
    assert np.array_equal(a, b)
