"""Aspect-ratio buckets (ARAD, Zheng et al. 2023, sec. 3.2), shared by inference and training.

A bucket is a ``(width, height)`` in image pixels, both multiples of the model's granularity, with
an area close to the model's native area. Generation starts at the bucket nearest the requested
ratio, so the base model composes at a shape it was trained on; training sorts each image into the
bucket nearest its own ratio. Ratios are height / width, as in the paper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# The paper's nine ratios, H / W.
ARAD_RATIOS = (0.5, 0.5625, 0.625, 0.75, 1.0, 4 / 3, 1.6, 16 / 9, 2.0)

Bucket = tuple[int, int]

# SDXL's training sizes (Podell et al. 2023, appendix), the ones its users know: the buckets an SDXL
# base at its native 1024^2 gets by default, instead of ARAD's nine ratios at 1024^2.
SDXL_BUCKETS: tuple[Bucket, ...] = (
    (1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344),
    (1536, 640), (640, 1536),
)


def parse_buckets(text: str) -> list[Bucket]:
    """``"1024x1024,1216x832,..."`` -> [(1024, 1024), (1216, 832), ...]; ValueError naming a bad item."""
    out = []
    for item in text.split(","):
        w, sep, h = item.strip().lower().partition("x")
        if not (sep and w.isdigit() and h.isdigit() and int(w) > 0 and int(h) > 0):
            raise ValueError(f"bucket {item.strip()!r}: must be WIDTHxHEIGHT with positive integers")
        out.append((int(w), int(h)))
    return out


def check_buckets(buckets, granularity: int) -> list[Bucket]:
    """A model's own bucket list, checked: non-empty (width, height) pairs of positive integers, each
    side a multiple of ``granularity`` (so every UNet level stays whole)."""
    out = [tuple(b) for b in buckets]
    if not out:
        raise ValueError("buckets: the list is empty")
    for b in out:
        if len(b) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in b):
            raise ValueError(f"bucket {b!r}: must be (width, height) with positive integers")
        if b[0] % granularity or b[1] % granularity:
            raise ValueError(f"bucket {b[0]}x{b[1]}: sides must be multiples of {granularity} px for this model")
    return sorted(set(out), key=lambda b: b[1] / b[0])


def model_granularity(vae, unet) -> int:
    """Image px that keep every level of the network whole: VAE factor x UNet downsampling (64 px for
    SD), or x the transformer's patch (16 px for SD3 and FLUX)."""
    from .core import nets
    from .core.vae import vae_scale_factor  # here, not at the top: the command line imports this module without torch

    return vae_scale_factor(vae) * nets.granularity(unet)


def native_side(vae, unet) -> int:
    """Image px of the side the UNet was trained at: its ``sample_size`` (latent px) x the VAE factor
    (512 for SD 1.5). The buckets hold about its square; the trainer writes ``sample_size`` so that
    inference picks the buckets training used. A transformer: SD3's ``sample_size``, FLUX's 1024 px."""
    from .core import nets
    from .core.vae import vae_scale_factor

    return nets.native_latent(unet) * vae_scale_factor(vae)


def _positive_int(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}={value!r}: must be a positive integer")


def _round_to(value: float, step: int) -> int:
    return max(step, int(round(value / step)) * step)


def arad_buckets(area: int = 512 * 512, granularity: int = 64, ratios: tuple[float, ...] = ARAD_RATIOS) -> list[Bucket]:
    """The paper's ratio buckets at about ``area`` pixels, sides multiples of ``granularity`` px.

    For each ratio the side pair on the grid is the one that best trades ratio error against area
    error (``|log ratio error| + |log area error| / 2``); ratios that land on the same pair merge.
    """
    _positive_int("area", area)
    _positive_int("granularity", granularity)
    buckets = set()
    for r in ratios:
        if r <= 0:
            raise ValueError(f"ratio={r!r}: must be > 0")
        ideal = math.sqrt(area / r) / granularity
        candidates = [(w * granularity, _round_to(w * granularity * r, granularity))
                      for w in range(max(1, math.floor(ideal) - 2), math.ceil(ideal) + 3)]
        buckets.add(min(candidates, key=lambda b: abs(math.log(b[1] / b[0] / r)) + abs(math.log(b[0] * b[1] / area)) / 2))
    return sorted(buckets, key=lambda b: b[1] / b[0])


def kohya_buckets(min_side: int = 256, max_side: int = 1024, step: int = 64, max_area: int = 512 * 512) -> list[Bucket]:
    """kohya / NovelAI-style buckets: for every width on the ``step`` grid, the tallest height that fits
    ``max_area`` (and vice versa), within ``[min_side, max_side]``."""
    for name, v in (("min_side", min_side), ("max_side", max_side), ("step", step), ("max_area", max_area)):
        _positive_int(name, v)
    if min_side > max_side:
        raise ValueError(f"min_side={min_side}: must be <= max_side={max_side}")
    buckets = set()
    for w in range(_round_to(min_side, step), max_side + 1, step):
        h = min(max_side, (max_area // w) // step * step)
        if h >= min_side:
            buckets.add((w, h))
            buckets.add((h, w))
    if not buckets:
        raise ValueError(f"max_area={max_area}: no bucket with sides in [{min_side}, {max_side}] fits")
    return sorted(buckets, key=lambda b: b[1] / b[0])


def nearest_bucket(width: int, height: int, buckets: list[Bucket]) -> Bucket:
    """The bucket whose ratio H/W is nearest the request's, measured by ``|log ratio|``."""
    _positive_int("width", width)
    _positive_int("height", height)
    if not buckets:
        raise ValueError("buckets=[]: need at least one bucket")
    target = math.log(height / width)
    return min(buckets, key=lambda b: (abs(math.log(b[1] / b[0]) - target), -b[0] * b[1]))


# What stage 1 does for a ratio outside the buckets (``choose_base_size``'s ``beyond``). Measured on
# the default model (benchmarks/panorama.py, docs/benchmarks.md; the VAE before the sharper decoder): "stretch" kept
# the composition at 2.4:1 to 4:1 (exact match 0.41-0.44, level with the true scenes through the VAE;
# 0.58-0.60 with the decoder shipped now), sampling at the request's own ratio drew the caption's
# objects again (untiled "direct": 0.01-0.20; "tiled" views: 0.00). With a ControlNet steering stage 1
# the control image fixes the layout, and the stretch only distorts it: the default ControlNet put
# 87-88% of the objects in their box at 4:1 and 1:4 sampled "direct", 28-35% stretched
# (benchmarks/grounding.py). "auto", the default, is "stretch" here; the run plan
# (anysize.plan.build) makes it "direct" when a ControlNet steers stage 1.
BEYOND_BUCKETS = ("auto", "stretch", "direct", "tiled")


@dataclass(frozen=True)
class BucketChoice:
    """Where stage 1 generates for a ``width x height`` request."""

    width: int
    height: int
    panorama: bool  # at the request's own ratio (outside the buckets), not at a bucket
    tiled: bool = False  # panorama sampled by the tiled sampler (``beyond="tiled"``)

    @property
    def size(self) -> Bucket:
        return self.width, self.height


def stretch_factor(size: Bucket, width: int, height: int) -> float:
    """How much resizing ``size`` to ``width x height`` distorts it: the larger ratio of the two
    aspect ratios, 1.0 for the same ratio."""
    return math.exp(abs(math.log(size[1] / size[0]) - math.log(height / width)))


def stretch_note(factor: float) -> str:
    """A note when stage 1's image is resized to another ratio by 0.5% or more (inside the buckets'
    range too: 1920x1080 from 704x384 is 1.03x); empty otherwise."""
    return f" (stretched {factor:.2f}x to the ratio)" if factor >= 1.005 else ""


def choose_base_size(width: int, height: int, buckets: list[Bucket], *, granularity: int = 64,
                     tolerance: float = 0.15, beyond: str = "auto") -> BucketChoice:
    """Stage 1's size: the nearest bucket. When the requested ratio lies more than ``tolerance`` (in
    log ratio) outside the buckets' range (a 4:1 banner, a 1:3 scroll), ``beyond`` decides:
    "stretch" (and "auto", which only the run plan turns into "direct", with a ControlNet) keeps the
    nearest bucket (the pipeline resizes its image to the request's ratio);
    "direct" and "tiled" sample at the requested ratio, at a size whose shorter side is the nearest
    extreme bucket's shorter side, or the request's own when that is smaller (panorama mode; never
    larger than the request needs), "tiled" with the tiled sampler."""
    if beyond not in BEYOND_BUCKETS:
        raise ValueError(f"beyond={beyond!r}: must be one of {', '.join(BEYOND_BUCKETS)}")
    bucket = nearest_bucket(width, height, buckets)
    logs = [math.log(b[1] / b[0]) for b in buckets]
    target = math.log(height / width)
    if beyond in ("auto", "stretch") or min(logs) - tolerance <= target <= max(logs) + tolerance:
        return BucketChoice(*bucket, panorama=False)
    # the shorter side of the nearest extreme bucket, or of the request when that is smaller
    short = min(min(bucket), max(granularity, min(width, height) // granularity * granularity))
    long = min(_round_to(short * max(width, height) / min(width, height), granularity),
               math.ceil(max(width, height) / granularity) * granularity)
    size = (long, short) if width >= height else (short, long)
    return BucketChoice(*size, panorama=True, tiled=beyond == "tiled")
