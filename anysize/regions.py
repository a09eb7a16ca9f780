"""Region prompts: a prompt for a box of the output, blended into the global prompt (training-free).

A caller gives ``regions=[(box, prompt), (box, prompt, weight), Region(...), ...]``; a box is
``(x0, y0, x1, y1)`` in fractions of the output when every number is at most 1 (``(0, 0, 0.5, 1)``: the
left half; a box of 1 px or less is no use) and in output pixels otherwise. :func:`normalize` checks them against the output size and returns
:class:`Region` objects whose boxes are fractions, so one region means the same place in stage 1's
bucket (the stage-1 image is stretched to the output's ratio as a whole), in every stage-2 pass and in
the output. The sampler (:mod:`anysize.core.regions`) turns a fraction box into a feathered mask at
each phase's latent size.

This module does not import torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

FEATHER = 0.1  # the mask's ramp, as a fraction of the region's shorter side


@dataclass(frozen=True)
class Region:
    """A prompt for ``box`` (x0, y0, x1, y1: fractions of the output's width and height, x0 < x1,
    y0 < y1). ``weight`` scales its mask: 1 (default) replaces the global prompt inside the box (the
    global prompt keeps ``max(0, 1 - sum of masks)``), 0.5 shares it half and half; where regions
    overlap, their weights share the pixel."""

    box: tuple[float, float, float, float]
    prompt: str
    weight: float = 1.0

    def to_json(self) -> list:
        return [list(self.box), self.prompt, self.weight]

    @classmethod
    def from_json(cls, value) -> Region:
        box, prompt, weight = value
        return cls(tuple(float(v) for v in box), prompt, float(weight))

    def pixels(self, width: int, height: int) -> tuple[int, int, int, int]:
        """The box in pixels of a ``width x height`` image (rounded), e.g. for a message or a drawing."""
        x0, y0, x1, y1 = self.box
        return round(x0 * width), round(y0 * height), round(x1 * width), round(y1 * height)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def normalize(regions, width: int, height: int) -> tuple[Region, ...]:
    """``regions`` checked against a ``width x height`` output, boxes as fractions. Each error names
    the region (its index) and what is wrong in one line."""
    if regions is None:
        return ()
    if isinstance(regions, (str, bytes)) or not hasattr(regions, "__iter__"):
        raise ValueError(f"regions={regions!r}: must be a list of (box, prompt) or (box, prompt, weight)")
    out = []
    for i, region in enumerate(regions):
        name = f"regions[{i}]"
        if isinstance(region, Region):
            box, prompt, weight = region.box, region.prompt, region.weight
        else:
            if not isinstance(region, (tuple, list)) or len(region) not in (2, 3):
                raise ValueError(f"{name}={region!r}: must be (box, prompt) or (box, prompt, weight)")
            box, prompt, weight = (*region, 1.0) if len(region) == 2 else region
        if not isinstance(box, (tuple, list)) or len(box) != 4 or not all(_number(v) for v in box):
            raise ValueError(f"{name}: box {box!r} must be 4 numbers (x0, y0, x1, y1)")
        if not all(math.isfinite(v) for v in box):
            raise ValueError(f"{name}: box {tuple(box)} holds a number that is not finite")
        if any(v < 0 for v in box):
            raise ValueError(f"{name}: box {tuple(box)} has a negative coordinate")
        x0, y0, x1, y1 = box
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"{name}: box {tuple(box)} is empty or inverted (needs x0 < x1 and y0 < y1)")
        if isinstance(region, Region) and max(box) > 1:
            raise ValueError(f"{name}: a Region's box {tuple(box)} is in fractions and goes past 1")
        if max(box) > 1:  # pixels
            if x1 > width or y1 > height:
                raise ValueError(f"{name}: box {tuple(box)} reaches outside the {width}x{height} canvas")
            box = (x0 / width, y0 / height, x1 / width, y1 / height)
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{name}: prompt {prompt!r} must be a non-empty string")
        if not _number(weight) or not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"{name}: weight {weight!r} must be a finite number > 0")
        out.append(Region(tuple(float(v) for v in box), prompt, float(weight)))
    return tuple(out)


def parse(text: str) -> tuple:
    """A command line's ``x0,y0,x1,y1[,weight]:prompt`` as ``(box, prompt, weight)`` for
    :func:`normalize` (a box whose numbers are all at most 1 is in fractions, else in pixels)."""
    head, sep, prompt = text.partition(":")
    if not sep:
        raise ValueError(f"--region {text!r}: must be 'x0,y0,x1,y1:prompt' or 'x0,y0,x1,y1,weight:prompt'")
    numbers = []
    for part in head.split(","):
        try:
            numbers.append(float(part))
        except ValueError:
            raise ValueError(f"--region {text!r}: {part.strip()!r} is not a number") from None
    if len(numbers) not in (4, 5):
        raise ValueError(f"--region {text!r}: needs 4 numbers (x0,y0,x1,y1) or 5 (with a weight) before ':'")
    box = tuple(numbers[:4])
    weight = float(numbers[4]) if len(numbers) == 5 else 1.0
    return box, prompt.strip(), weight
