"""Geometry properties of the tile plans, over hundreds of random sizes."""

import math
from dataclasses import replace

import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from anysize.core.tiling import TilingConfig, coverage, fstd_tiles, naive_tiles, overlap_tiles, tile_weights

sizes = st.integers(min_value=1, max_value=300) | st.sampled_from([1, 2, 63, 64, 65, 128, 4096])
tiles = st.integers(min_value=1, max_value=96) | st.sampled_from([64, 128])
# Every size and tile stays drawable (1-px tiles, odd sizes, a 4096 canvas), but a plan of more than
# MAX_TILES boxes is skipped: a 4096^2 canvas in 1-px tiles is 16.8M boxes and took 10-20 s by itself, while
# the edge cases these tests look for (ragged last tiles, tile > side, snapping) show on small grids.
MAX_TILES = 20_000
EXAMPLES = 300  # with MAX_TILES each property test takes 0.3-0.5 s on 2 cores (was 13-19 s uncapped)


def few_tiles(rows, cols):
    assume(rows * cols <= MAX_TILES)


def assert_valid(boxes, h, w, tile):
    th, tw = min(tile, h), min(tile, w)
    for top, left, bottom, right in boxes:
        assert 0 <= top < bottom <= h and 0 <= left < right <= w, "tile outside the canvas"
        assert (bottom - top, right - left) == (th, tw), "tiles of one step must share one size"
    assert len(set(boxes)) == len(boxes), "duplicate tile"
    rows = sorted({b[0] for b in boxes})
    cols = sorted({b[1] for b in boxes})
    assert len(boxes) == len(rows) * len(cols)
    # full coverage, checked per axis (the plans are products of two 1-D covers)
    for starts, t, n in ((rows, th, h), (cols, tw, w)):
        covered = 0
        for s in starts:
            assert s <= covered, f"gap at {covered}"
            covered = max(covered, s + t)
        assert covered == n


@settings(max_examples=EXAMPLES, deadline=None)
@given(h=sizes, w=sizes, tile=tiles, seed=st.integers(0, 2**31 - 1), max_offset=st.none() | st.integers(0, 200))
@example(h=1, w=1, tile=1, seed=0, max_offset=None).via("corner")
@example(h=4096, w=65, tile=64, seed=1, max_offset=None).via("corner")
@example(h=131, w=97, tile=1, seed=2, max_offset=0).via("corner")
@example(h=63, w=300, tile=128, seed=3, max_offset=200).via("corner")
def test_fstd_covers_everything_inside_canvas(h, w, tile, seed, max_offset):
    few_tiles(math.ceil(h / tile) + 1, math.ceil(w / tile) + 1)
    boxes = fstd_tiles(h, w, tile, generator=torch.Generator().manual_seed(seed), max_offset=max_offset)
    assert_valid(boxes, h, w, tile)
    assert len(boxes) <= (math.ceil(h / tile) + 1) * (math.ceil(w / tile) + 1)


@settings(max_examples=EXAMPLES, deadline=None)
@given(h=sizes, w=sizes, tile=tiles, seed=st.integers(0, 2**31 - 1), granularity=st.sampled_from([1, 2, 4, 8]),
       max_offset=st.none() | st.integers(0, 200))
@example(h=1, w=1, tile=1, seed=0, granularity=1, max_offset=None).via("corner")
@example(h=4096, w=65, tile=64, seed=1, granularity=8, max_offset=None).via("corner")
@example(h=65, w=97, tile=64, seed=2, granularity=4, max_offset=None).via("corner")  # 1-px remainder: rejoined
@example(h=63, w=300, tile=128, seed=3, granularity=8, max_offset=200).via("corner")
def test_fstd_cut_evaluates_each_pixel_once(h, w, tile, seed, granularity, max_offset):
    few_tiles(math.ceil(h / tile) + 1, math.ceil(w / tile) + 1)
    boxes = fstd_tiles(h, w, tile, generator=torch.Generator().manual_seed(seed), max_offset=max_offset,
                       edges="cut", granularity=granularity)
    assert bool((coverage(h, w, boxes) == 1).all()), "cut tiles must cover every pixel exactly once"
    assert len(boxes) <= (math.ceil(h / tile) + 1) * (math.ceil(w / tile) + 1)
    for top, left, bottom, right in boxes:
        for side, length in ((bottom - top, h), (right - left, w)):
            assert side <= min(tile, length)
            if length > tile:  # a sliver is rejoined to its neighbour: no tile thinner than about half a tile
                assert 2 * side >= tile - 2 * granularity, (side, tile)
    if h % granularity == 0 and w % granularity == 0 and tile % granularity == 0:
        assert all(v % granularity == 0 for box in boxes for v in box), "tile edges off the UNet's grid"


def test_fstd_cut_moves_every_tile_edge_and_clamp_pins_two():
    # with clamped edge tiles, the first tile always ends at column `tile` and the last always starts at
    # `width - tile`: tile edges at the same two columns every step, which accumulate into bands there
    def edge_share(edges):
        g = torch.Generator().manual_seed(0)
        plans = [fstd_tiles(256, 256, 64, generator=g, edges=edges, granularity=4) for _ in range(200)]
        counts = torch.zeros(257)
        for boxes in plans:
            for col in {b[1] for b in boxes} | {b[3] for b in boxes}:
                counts[col] += 1
        return counts[1:256] / len(plans)  # interior columns only

    clamp, cut = edge_share("clamp"), edge_share("cut")
    assert clamp[64 - 1] > 0.9 and clamp[192 - 1] > 0.9
    assert float(cut.max()) < 0.2, float(cut.max())


def test_fstd_cut_shifts_both_axes_at_the_latent_area():
    cfg = TilingConfig(tile_size=64, granularity=8)  # default: edges="cut", shift="auto"
    assert cfg._axes(512, 512, 0, 20) == cfg._axes(512, 512, 1, 20) == "both"
    g = torch.Generator().manual_seed(0)
    for step in range(19):
        boxes = cfg.plan(512, 384, step, g, 20)
        assert sum((b[2] - b[0]) * (b[3] - b[1]) for b in boxes) == 512 * 384
    # the last step (last_step="blend") evaluates two grids: each pixel exactly twice, one step's area more
    assert bool((coverage(512, 384, cfg.plan(512, 384, 19, g, 20)) == 2).all())
    single = replace(cfg, last_step="single").plan(512, 384, 19, g, 20)
    assert bool((coverage(512, 384, single) == 1).all())


@pytest.mark.parametrize("edges", ["cut", "clamp"])
@pytest.mark.parametrize("side", [64, 100, 180, 300])
@pytest.mark.parametrize("seed", range(4))
def test_blended_last_step_puts_each_grids_cuts_inside_the_others_tiles(edges, side, seed):
    # two grids from the same offsets (no extra draw); on each axis with more than one tile every cut
    # of one lies at least a quarter tile from every cut of the other, so neither grid's cuts are left
    # unblended; no tile is larger than the tile size
    cfg = TilingConfig(tile_size=32, granularity=4, edges=edges)
    blended = cfg.plan(side, 256, 9, torch.Generator().manual_seed(seed), 10)
    first = replace(cfg, last_step="single").plan(side, 256, 9, torch.Generator().manual_seed(seed), 10)
    assert blended == sorted(blended) and all(blended.count(b) >= first.count(b) for b in first)
    second = list(blended)
    for b in first:
        second.remove(b)
    assert max(b[2] - b[0] for b in second) <= 32 and max(b[3] - b[1] for b in second) <= 32
    assert bool((coverage(side, 256, second) >= 1).all())
    if edges == "cut":
        assert bool((coverage(side, 256, blended) == 2).all())
    for lo, hi, length in ((0, 2, side), (1, 3, 256)):
        def cuts(boxes):  # clamped tiles of both grids always end at 32 and length - 32: not counted
            fixed = {32, length - 32} if edges == "clamp" else set()
            return ({b[lo] for b in boxes if b[lo] > 0} | {b[hi] for b in boxes if b[hi] < length}) - fixed
        if length > 32:
            gap = min(abs(a - b) for a in cuts(first) for b in cuts(second))
            assert gap >= 8, (lo, gap)
    assert cfg.blend_at(9, 10) == "linear" and cfg.blend_at(8, 10) == "uniform"
    assert replace(cfg, weighting="gaussian").blend_at(9, 10) == "gaussian"
    if edges == "cut":  # number of steps unknown: one grid (clamped "auto" would also alternate axes)
        assert cfg.plan(side, 256, 9, torch.Generator().manual_seed(seed)) == first


def test_one_tile_canvas_never_blends():
    assert TilingConfig(tile_size=64).plan(40, 60, 0, torch.Generator(), 1) == [(0, 0, 40, 60)]


@settings(max_examples=EXAMPLES, deadline=None)
@given(h=sizes, w=sizes, tile=tiles)
@example(h=1, w=1, tile=1).via("corner")
@example(h=4096, w=65, tile=64).via("corner")
@example(h=131, w=97, tile=1).via("corner")
@example(h=63, w=300, tile=128).via("corner")
def test_naive_is_minimal_grid(h, w, tile):
    few_tiles(math.ceil(h / tile), math.ceil(w / tile))
    boxes = naive_tiles(h, w, tile)
    assert_valid(boxes, h, w, tile)
    assert len(boxes) == math.ceil(h / tile) * math.ceil(w / tile)


@settings(max_examples=EXAMPLES, deadline=None)
@given(h=sizes, w=sizes, tile=tiles, frac=st.floats(0.05, 1.0))
@example(h=1, w=1, tile=1, frac=1.0).via("corner")
@example(h=4096, w=65, tile=64, frac=0.5).via("corner")
@example(h=131, w=97, tile=3, frac=0.05).via("corner")
@example(h=63, w=300, tile=128, frac=0.05).via("corner")
def test_overlap_snaps_last_tile_and_covers(h, w, tile, frac):
    stride = max(1, int(tile * frac))
    few_tiles(max(h - tile, 0) // stride + 2, max(w - tile, 0) // stride + 2)
    boxes = overlap_tiles(h, w, tile, stride)
    assert_valid(boxes, h, w, tile)
    assert max(b[2] for b in boxes) == h and max(b[3] for b in boxes) == w


def test_small_coverage_map_is_exact():
    # a 1-pixel-wide canvas, a latent smaller than a tile, and a large one, checked pixel by pixel
    for h, w, t in ((1, 37, 8), (5, 3, 64), (300, 260, 64)):
        for boxes in (fstd_tiles(h, w, t, generator=torch.Generator().manual_seed(3)), naive_tiles(h, w, t)):
            assert int(coverage(h, w, boxes).min()) >= 1


def test_fstd_same_generator_state_same_tiles_and_borders_move():
    plans = [fstd_tiles(200, 200, 64, generator=torch.Generator().manual_seed(s)) for s in range(20)]
    assert plans[0] == fstd_tiles(200, 200, 64, generator=torch.Generator().manual_seed(0))
    assert len({tuple(p) for p in plans}) > 10, "offsets should vary with the seed"


def test_fstd_offset_spreads_borders_and_never_wraps():
    g = torch.Generator().manual_seed(0)
    starts = set()
    for _ in range(400):
        boxes = fstd_tiles(256, 256, 64, generator=g)
        starts |= {b[0] for b in boxes}
    # every interior border position 1..255 is reachable with the default bound (tile - 1)
    assert len(starts) > 150
    g = torch.Generator().manual_seed(0)
    bounded = {b[1] for _ in range(200) for b in fstd_tiles(256, 256, 64, generator=g, max_offset=8)}
    assert all(s % 64 <= 8 or s == 256 - 64 for s in bounded)


def test_fstd_single_tile_draws_nothing():
    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    assert fstd_tiles(40, 60, 64, generator=g) == [(0, 0, 40, 60)]
    assert torch.equal(g.get_state(), state)


def test_fstd_axes_option_limits_the_shift():
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        boxes = fstd_tiles(256, 256, 64, generator=g, axes="y")
        assert {b[1] for b in boxes} == {0, 64, 128, 192}
    assert fstd_tiles(256, 256, 64, generator=g, axes="none") == naive_tiles(256, 256, 64)


def test_fstd_area_alternate_vs_both_vs_auto():
    def counts(shift, side):
        cfg = TilingConfig(tile_size=64, shift=shift, edges="clamp")
        g = torch.Generator().manual_seed(0)
        return [len(cfg.plan(side, side, i, g)) for i in range(50)]

    assert max(counts("both", 512)) == 81 and max(counts("alternate", 512)) == 72  # (n+1)^2 vs n(n+1), 8x8
    assert counts("auto", 512) == counts("alternate", 512)  # (9/8)^2 = 1.27 > 1.15: alternate
    assert max(counts("auto", 1024)) == 17 * 17  # (17/16)^2 = 1.13 <= 1.15: both axes every step
    for side in (512, 1024, 4096):  # auto keeps the evaluated area within the budget
        assert max(counts("auto", side)) * 64 * 64 <= 1.15 * side * side


def test_fstd_auto_always_shifts_a_single_row():
    cfg = TilingConfig(tile_size=64)
    g = torch.Generator().manual_seed(0)
    plans = [cfg.plan(64, 640, i, g) for i in range(10)]
    assert sum(len(p) == 11 for p in plans) >= 8  # a 1 x 10 strip shifts along x at every step


def test_reset_every_uses_the_fixed_grid():
    cfg = TilingConfig(tile_size=64, reset_every=4)
    g = torch.Generator().manual_seed(0)
    assert cfg.plan(256, 256, 0, g) == naive_tiles(256, 256, 64)
    assert cfg.plan(256, 256, 8, g) == naive_tiles(256, 256, 64)


@pytest.mark.parametrize("kind", ["uniform", "linear", "gaussian"])
@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (64, 64), (5, 64)])
def test_weights_positive(kind, shape):
    w = tile_weights(*shape, kind)
    assert w.shape == shape and bool((w > 0).all())


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: naive_tiles(0, 5, 4), "height=0"),
        (lambda: overlap_tiles(5, 5, 4, 8), "stride=8"),
        (lambda: fstd_tiles(5, 5, -1, generator=torch.Generator()), "tile=-1"),
        (lambda: TilingConfig(method="spiral"), "tiling='spiral'"),
        (lambda: TilingConfig(tile_batch_size=0), "tile_batch_size=0"),
        (lambda: TilingConfig(tile_size=16, stride=32), "stride=32"),
        (lambda: TilingConfig(edges="wrap"), "edges='wrap'"),
        (lambda: TilingConfig(granularity=0), "granularity=0"),
        (lambda: fstd_tiles(5, 5, 4, generator=torch.Generator(), edges="pad"), "edges='pad'"),
        (lambda: tile_weights(4, 4, "cosine"), "weighting='cosine'"),
    ],
)
def test_bad_arguments_name_the_argument(call, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        call()


def test_fstd_auto_shifts_both_axes_on_the_last_step():
    # on an 8 x 8 grid "auto" alternates, but the last step's update is never blurred by a later one:
    # it shifts both axes, so neither axis of the final update sits on the base grid
    cfg = TilingConfig(tile_size=64, edges="clamp", last_step="single")
    assert [cfg._axes(512, 512, i, 20) for i in (0, 1, 18, 19)] == ["y", "x", "y", "both"]
    assert cfg._axes(512, 512, 19) == "x"  # number of steps unknown: plain alternation
    assert TilingConfig(tile_size=64, shift="alternate", edges="clamp")._axes(512, 512, 19, 20) == "x"
    g = torch.Generator().manual_seed(0)
    plans = [cfg.plan(512, 512, i, g, 20) for i in range(20)]
    assert {len(p) for p in plans[:-1]} <= {64, 72} and len(plans[-1]) == 81
