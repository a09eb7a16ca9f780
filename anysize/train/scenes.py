"""A procedural, captioned image domain whose composition can be measured exactly.

anysize's own small text-to-image model is trained on these scenes: one to four flat, saturated
objects (shape x colour x size, optionally striped or dotted) in front of a muted, textured
background, with a caption generated from the scene ("two large red circles and a small striped
blue triangle on grass"). Because every object is known, a generated image can be scored exactly
(:mod:`anysize.train.evaluate`): which objects came out, how many times, and whether the frame cut them.

Geometry
--------
A scene is resolution independent. Object centres are normalised, ``cx`` in [0, 1] across the width
and ``cy`` in [0, 1] down the height; a radius ``r`` is the half-extent of the object's bounding
square in units of the image's *shorter* side ("scene units"). Rendering at ``width x height``
puts the centre at pixel ``(cx * width, cy * height)`` and the half-extent at
``r * min(width, height)`` pixels, so a scene keeps its look at every resolution; it is meant to be
rendered at its own aspect ratio ``height / width`` (at another ratio the layout guarantees below
no longer hold).

The layout follows the frame as a photographer would: objects sit in the cells of a grid whose
shape follows the aspect ratio (one row across a wide frame, one column down a tall one), each
object inside its own cell with a gap, so objects never overlap and never touch the frame.

Rendering
---------
Everything is a function of continuous coordinates, evaluated at pixel centres with the pixel's
footprint, so the same scene renders consistently at every resolution:

* backgrounds are sums of sinusoids (plus box-filtered mortar lines for bricks), each attenuated by
  the exact box-filter response ``sinc(fx p) sinc(fy p)`` of a pixel of size ``p`` and faded out
  between 4 and 2 pixels per period, so fine detail appears only at resolutions that resolve it
  and never as moire. A render at 4x the resolution, area-downsampled by 4, matches the 1x render
  up to the aliasing that the area filter itself lets through (without the fade they would be
  equal: the big pixel's sinc is the small one's times the average of four of them); measured
  mean |diff| <= 6 / 255, <= 1.6 / 255 after a 3x3 blur;
* shapes are signed-distance functions, anti-aliased by ``supersample**2`` sub-samples per pixel,
  each with a one-sub-pixel linear coverage ramp; patterns are short Fourier series, box-filtered
  the same way and faded out near the pixel grid's Nyquist frequency, so they appear only where
  the resolution resolves them (a plain darker shade below, never moire).

Colours are chosen so that an evaluator can segment objects by saturation and classify them by hue:
every background is a convex mix of muted colours (HSV saturation <= 0.26) and every object colour
is saturated (>= 0.76); stripes and dots only darken the object colour, which keeps its hue and
saturation.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np

# ----------------------------------------------------------------------------------------------
# Vocabulary
# ----------------------------------------------------------------------------------------------

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
PLURALS = {s: s + ("es" if s.endswith(("s", "sh", "ch", "x")) else "s") for s in SHAPES}

# Saturated colours, well apart in hue (about 0, 30, 55, 125, 225, 280 degrees).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35),
    "orange": (245, 135, 20),
    "yellow": (235, 215, 25),
    "green": (40, 170, 50),
    "blue": (35, 80, 225),
    "purple": (150, 40, 210),
}

# Half-extent of the object's bounding square, in units of the shorter image side. At 64 px a small
# object is ~17 px across; at 32 px (the short side of a 128x32 frame) ~8 px.
SIZES = {"small": 0.13, "large": 0.19}

PATTERNS = ("plain", "striped", "dotted")
PATTERN_PERIOD = 0.016  # scene units: ~1 px at 64 px (invisible), 8 px at 512 px
PATTERN_DEPTH = {"plain": 0.0, "striped": 0.5, "dotted": 0.6}

BACKGROUNDS = ("grass", "water", "brick", "clouds", "sand")
BACKGROUND_PHRASES = {
    "grass": "on grass",
    "water": "over water",
    "brick": "against a brick wall",
    "clouds": "against a cloudy sky",
    "sand": "on sand",
}

NUMBER_WORDS = {1: "a", 2: "two", 3: "three", 4: "four"}
_WORD_NUMBERS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4}

MAX_OBJECTS = 4
MARGIN = 0.05  # frame inset of the layout grid, scene units
GAP = 0.06  # minimum free space between two objects' bounding squares, scene units
JITTER = 0.6  # fraction of a cell's free play used to jitter an object off the cell centre
REPEAT_PROB = 0.3  # chance that an object repeats an earlier one ("two red circles")

# ----------------------------------------------------------------------------------------------
# Data classes
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SceneObject:
    """One object. ``cx``, ``cy`` normalised to the frame; ``r`` = half-extent / shorter side."""

    shape: str
    color: str
    size: str
    pattern: str
    cx: float
    cy: float
    r: float

    @property
    def key(self) -> tuple[str, str]:
        """``(shape, color)``: what the evaluator recovers and scores."""
        return (self.shape, self.color)


@dataclass(frozen=True)
class Scene:
    """A captioned scene. ``aspect`` = height / width it was laid out for.

    The background's texture is derived deterministically from ``(background, background_seed)``;
    :attr:`background_params` shows the derived parameters.
    """

    background: str
    background_seed: int
    aspect: float
    objects: tuple[SceneObject, ...]
    caption: str

    def __post_init__(self):
        if self.background not in BACKGROUNDS:
            raise ValueError(f"background={self.background!r}: one of {BACKGROUNDS}")
        object.__setattr__(self, "objects", tuple(self.objects))

    @property
    def background_params(self) -> dict:
        return dict(_background_spec(self.background, self.background_seed)["params"])

    def size_for(self, area: int, multiple: int = 1) -> tuple[int, int]:
        """``(width, height)`` of about ``area`` pixels at this scene's aspect, both multiples of
        ``multiple``."""
        w = math.sqrt(area / self.aspect)
        h = w * self.aspect
        return (max(multiple, round(w / multiple) * multiple), max(multiple, round(h / multiple) * multiple))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["objects"] = [asdict(o) for o in self.objects]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        objs = tuple(SceneObject(**o) for o in d["objects"])
        return cls(d["background"], int(d["background_seed"]), float(d["aspect"]), objs, d["caption"])


# ----------------------------------------------------------------------------------------------
# Sampling and layout
# ----------------------------------------------------------------------------------------------


def _frame_units(aspect: float) -> tuple[float, float]:
    """Frame width and height in scene units (the shorter side is 1)."""
    return (1.0 / aspect, 1.0) if aspect <= 1.0 else (1.0, aspect)


def _choose_grid(n: int, aspect: float, rng: np.random.Generator) -> tuple[int, int]:
    """(rows, cols) with the largest square-ish cells; ties go to the grid that follows the frame."""
    fw, fh = (d - 2 * MARGIN for d in _frame_units(aspect))
    best, best_key = None, None
    for rows in range(1, n + 1):
        for cols in range(1, n + 1):
            if rows * cols < n or rows * cols - n >= min(rows, cols):
                continue  # too few cells, or a whole row / column would stay empty
            cell = min(fw / cols, fh / rows)
            if aspect < 1.0:
                follows = cols - rows
            elif aspect > 1.0:
                follows = rows - cols
            else:
                follows = 0
            key = (round(cell, 9), follows, -rows * cols)
            if best_key is None or key > best_key:
                best, best_key = (rows, cols), key
    rows, cols = best
    if aspect == 1.0 and rows != cols and rng.random() < 0.5:
        rows, cols = cols, rows
    return rows, cols


def _layout(sizes: list[float], aspect: float, rng: np.random.Generator) -> list[tuple[float, float]]:
    """Normalised centres for objects of half-extents ``sizes`` (scene units)."""
    n = len(sizes)
    fw_full, fh_full = _frame_units(aspect)
    fw, fh = fw_full - 2 * MARGIN, fh_full - 2 * MARGIN
    rows, cols = _choose_grid(n, aspect, rng)
    cw, ch = fw / cols, fh / rows
    cells = np.sort(rng.choice(rows * cols, size=n, replace=False))
    centres = []
    for r, cell in zip(sizes, cells):
        i, j = divmod(int(cell), cols)
        x0, y0 = MARGIN + j * cw, MARGIN + i * ch
        play_x = max(0.0, cw / 2 - GAP / 2 - r)
        play_y = max(0.0, ch / 2 - GAP / 2 - r)
        x = x0 + cw / 2 + JITTER * play_x * rng.uniform(-1, 1)
        y = y0 + ch / 2 + JITTER * play_y * rng.uniform(-1, 1)
        centres.append((x / fw_full, y / fh_full))
    return centres


def sample_scene(
    seed: int | np.random.Generator,
    aspect: float = 1.0,
    *,
    n_objects: int | None = None,
    background: str | None = None,
) -> Scene:
    """Draw a scene for a frame of ``aspect`` = height / width. Same seed + aspect -> same scene.

    ``n_objects`` (1..4) and ``background`` fix those choices instead of drawing them.
    """
    raw = aspect
    try:
        aspect = float(aspect)
    except (TypeError, ValueError):
        aspect = float("nan")
    if not (math.isfinite(aspect) and aspect > 0):
        raise ValueError(f"aspect={raw!r}: must be a positive finite number (height / width)")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    if n_objects is None:
        n_objects = int(rng.integers(1, MAX_OBJECTS + 1))
    if not 1 <= n_objects <= MAX_OBJECTS:
        raise ValueError(f"n_objects={n_objects}: must be in 1..{MAX_OBJECTS}")
    kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    if background is not None:
        if background not in BACKGROUNDS:
            raise ValueError(f"background={background!r}: one of {BACKGROUNDS}")
        kind = background
    bg_seed = int(rng.integers(0, 2**31 - 1))

    looks: list[tuple[str, str, str, str]] = []
    for _ in range(n_objects):
        if looks and rng.random() < REPEAT_PROB:
            looks.append(looks[int(rng.integers(len(looks)))])
        else:
            looks.append(
                (
                    SHAPES[int(rng.integers(len(SHAPES)))],
                    list(COLORS)[int(rng.integers(len(COLORS)))],
                    ("small", "large")[int(rng.integers(2))],
                    PATTERNS[int(rng.choice(3, p=[0.6, 0.2, 0.2]))],
                )
            )
    centres = _layout([SIZES[size] for _, _, size, _ in looks], aspect, rng)
    objects = tuple(
        SceneObject(shape, color, size, pattern, float(cx), float(cy), SIZES[size])
        for (shape, color, size, pattern), (cx, cy) in zip(looks, centres)
    )
    return Scene(kind, bg_seed, aspect, objects, make_caption(objects, kind, aspect))


# ----------------------------------------------------------------------------------------------
# Captions
# ----------------------------------------------------------------------------------------------


def _phrase(count: int, size: str, pattern: str, color: str, shape: str) -> str:
    words = [size] + ([pattern] if pattern != "plain" else []) + [color, PLURALS[shape] if count > 1 else shape]
    if count == 1:
        article = "an" if words[0][0] in "aeiou" else "a"
        return " ".join([article, *words])
    return " ".join([NUMBER_WORDS[count], *words])


def make_caption(objects, background: str, aspect: float = 1.0) -> str:
    """Caption listing the objects in reading order along the frame's long axis, identical objects
    grouped with a count: "two large red circles and a small striped blue triangle on grass"."""
    axis = (lambda o: (o.cy, o.cx)) if aspect > 1.0 else (lambda o: (o.cx, o.cy))
    groups: dict[tuple[str, str, str, str], int] = {}
    for o in sorted(objects, key=axis):
        k = (o.size, o.pattern, o.color, o.shape)
        groups[k] = groups.get(k, 0) + 1
    items = [_phrase(c, *k) for k, c in groups.items()]
    listing = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    return f"{listing} {BACKGROUND_PHRASES[background]}"


def parse_caption(caption: str) -> tuple[list[dict], str | None]:
    """Inverse of :func:`make_caption`: ``([{count, size, pattern, color, shape}, ...], background)``.

    Unknown words raise ``ValueError``; size and pattern are optional ("a red circle").
    """
    text = caption.strip().lower().rstrip(".")
    background = None
    for kind, phrase in BACKGROUND_PHRASES.items():
        if text.endswith(" " + phrase):
            background, text = kind, text[: -len(phrase) - 1]
            break
    singular = {p: s for s, p in PLURALS.items()}
    items = []
    for part in re.split(r",\s*|\s+and\s+", text):
        words = part.split()
        if not words:
            continue
        if words[0] not in _WORD_NUMBERS:
            raise ValueError(f"caption item {part!r}: no count word")
        item = {"count": _WORD_NUMBERS[words[0]], "size": None, "pattern": "plain", "color": None, "shape": None}
        for w in words[1:]:
            if w in SIZES:
                item["size"] = w
            elif w in PATTERNS:
                item["pattern"] = w
            elif w in COLORS:
                item["color"] = w
            elif w in SHAPES or w in singular:
                item["shape"] = singular.get(w, w)
            else:
                raise ValueError(f"caption item {part!r}: unknown word {w!r}")
        if item["color"] is None or item["shape"] is None:
            raise ValueError(f"caption item {part!r}: needs a colour and a shape")
        items.append(item)
    return items, background


# ----------------------------------------------------------------------------------------------
# Shapes (unit shapes: bounding square [-1, 1]^2, y down)
# ----------------------------------------------------------------------------------------------

_SQUARE_HALF = math.sqrt(math.pi) / 2  # same area as the circle
_CROSS_HALF_WIDTH = 0.36
_SQRT5 = math.sqrt(5.0)


def _box_sdf(x, y, hx, hy):
    qx, qy = np.abs(x) - hx, np.abs(y) - hy
    outside = np.hypot(np.maximum(qx, 0.0), np.maximum(qy, 0.0))
    return outside + np.minimum(np.maximum(qx, qy), 0.0)


def shape_sdf(shape: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Signed distance (negative inside) to the unit ``shape`` at ``(x, y)``; scales linearly with
    the shape (distance to a shape of half-extent R at (x, y) * R is R * shape_sdf(shape, x, y))."""
    if shape == "circle":
        return np.hypot(x, y) - 1.0
    if shape == "square":
        return _box_sdf(x, y, _SQUARE_HALF, _SQUARE_HALF)
    if shape == "diamond":
        return (np.abs(x) + np.abs(y) - 1.0) / math.sqrt(2.0)
    if shape == "triangle":  # apex up at (0, -1), base from (-1, 1) to (1, 1)
        side = (2.0 * np.abs(x) - y - 1.0) / _SQRT5
        return np.maximum(side, y - 1.0)
    if shape == "cross":
        w = _CROSS_HALF_WIDTH
        return np.minimum(_box_sdf(x, y, 1.0, w), _box_sdf(x, y, w, 1.0))
    raise ValueError(f"unknown shape {shape!r}")


# ----------------------------------------------------------------------------------------------
# Band-limited textures
# ----------------------------------------------------------------------------------------------

TWO_PI = 2.0 * math.pi


def _bank(rng, n, fmin, fmax, theta, spread, beta, std):
    """``n`` random sinusoids: log-uniform frequency (cycles / scene unit) in [fmin, fmax], direction
    of the frequency vector ``theta`` +- ``spread`` (radians), amplitude ~ f**-beta, normalised so
    the sum has standard deviation ``std`` (at infinite resolution)."""
    f = np.exp(rng.uniform(math.log(fmin), math.log(fmax), n))
    th = theta + spread * rng.uniform(-1.0, 1.0, n)
    amp = f**-beta
    amp *= std / math.sqrt(float(np.sum(amp**2)) / 2.0)
    return np.stack([f * np.cos(th), f * np.sin(th), rng.uniform(0, TWO_PI, n), amp], axis=1)


def _sinusoid_field(bank: np.ndarray, u: np.ndarray, v: np.ndarray, p: float) -> np.ndarray:
    """Box-filtered sum of the bank's sinusoids over pixels of size ``p`` centred at ``v x u``,
    each faded out as it nears the pixel grid's Nyquist frequency (see :func:`_fade`).

    cos(a + b) = cos a cos b - sin a sin b separates x from y, so the field is one matrix product.
    """
    fx, fy, ph, amp = bank.T
    fade = np.clip(2.0 - 4.0 * np.maximum(np.abs(fx), np.abs(fy)) * p, 0.0, 1.0)
    att = amp * np.sinc(fx * p) * np.sinc(fy * p) * fade
    keep = np.abs(att) > 1e-4 * max(float(np.max(np.abs(amp))), 1e-12)
    fx, fy, ph, att = fx[keep], fy[keep], ph[keep], att[keep]
    if fx.size == 0:
        return np.zeros((v.size, u.size))
    a = TWO_PI * u[:, None] * fx[None, :]
    b = TWO_PI * v[:, None] * fy[None, :] + ph[None, :]
    left = np.concatenate([att * np.cos(b), att * np.sin(b)], axis=1)
    right = np.concatenate([np.cos(a), -np.sin(a)], axis=1)
    return left @ right.T


def _periodic_line_avg(x: np.ndarray, period: float, width: float, p: float) -> np.ndarray:
    """Box average over [x - p/2, x + p/2] of the indicator of [k * period, k * period + width)."""

    def integral(t):
        return np.floor(t / period) * width + np.minimum(np.mod(t, period), width)

    return (integral(x + p / 2) - integral(x - p / 2)) / p


def _hash01(a: np.ndarray, b: np.ndarray, seed: int) -> np.ndarray:
    """Deterministic pseudo-random numbers in [0, 1) from integer arrays (splitmix64 finaliser)."""
    with np.errstate(over="ignore"):
        x = np.asarray(a, np.int64).view(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        x ^= np.asarray(b, np.int64).view(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)
        x ^= np.uint64(seed & 0xFFFFFFFF) * np.uint64(0x165667B19E3779F9)
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) / float(2**53)


@lru_cache(maxsize=256)
def _background_spec(kind: str, seed: int) -> dict:
    """Texture parameters of one background, all derived from ``seed``."""
    rng = np.random.default_rng([seed, BACKGROUNDS.index(kind)])
    s = float(rng.uniform(0.8, 1.25))  # texture scale
    if kind == "grass":  # vertical blades (frequency vectors near horizontal) over soft patches
        banks = [
            _bank(rng, 90, 25 * s, 500 * s, 0.0, 0.45, 0.2, 0.30),
            _bank(rng, 12, 1.0, 6.0, 0.0, math.pi, 1.0, 0.12),
        ]
        spec = dict(lo=(64, 80, 60), hi=(150, 172, 132), offset=0.5)
    elif kind == "water":  # horizontal ripples (frequency vectors near vertical) and swells
        banks = [
            _bank(rng, 60, 12 * s, 350 * s, math.pi / 2, 0.35, 0.4, 0.22),
            _bank(rng, 10, 0.8, 4.0, math.pi / 2, 0.8, 1.0, 0.12),
        ]
        spec = dict(lo=(80, 96, 108), hi=(178, 190, 198), offset=0.45)
    elif kind == "clouds":  # multi-octave smooth noise: clouds over a clear sky
        banks = [_bank(rng, 60, 0.7, 150.0, 0.0, math.pi, 1.0, 0.38)]
        spec = dict(lo=(145, 165, 190), hi=(234, 236, 240), offset=0.42)
    elif kind == "sand":  # wind ripples with a wavy crest, dunes, fine grains
        banks = [
            _bank(rng, 12, 14 * s, 22 * s, rng.uniform(1.2, 1.9), 0.25, 0.0, 0.16),
            _bank(rng, 8, 0.7, 3.0, 0.0, math.pi, 1.0, 0.10),
            _bank(rng, 60, 150 * s, 700 * s, 0.0, math.pi, 0.0, 0.10),
        ]
        spec = dict(lo=(150, 136, 116), hi=(222, 210, 186), offset=0.5)
    elif kind == "brick":
        banks = [_bank(rng, 40, 120 * s, 600 * s, 0.0, math.pi, 0.0, 0.10)]  # grain on the bricks
        spec = dict(
            lo=(112, 92, 86),
            hi=(156, 126, 116),
            offset=0.0,
            mortar=(182, 178, 170),
            course=0.062 * s,
            length=0.17 * s,
            joint=0.009 * s,
        )
    else:
        raise ValueError(f"unknown background {kind!r}; one of {BACKGROUNDS}")
    params = {"kind": kind, "seed": seed, "scale": s, "n_sinusoids": int(sum(len(b) for b in banks))}
    params.update({k: v for k, v in spec.items() if k not in ("lo", "hi")})
    return dict(spec, bank=np.concatenate(banks), params=params)


def _background(kind: str, seed: int, u: np.ndarray, v: np.ndarray, p: float) -> np.ndarray:
    """(len(v), len(u), 3) float RGB in [0, 255]; a convex mix of muted colours, so low saturation."""
    spec = _background_spec(kind, seed)
    lo = np.asarray(spec["lo"], np.float64)
    hi = np.asarray(spec["hi"], np.float64)
    t = _sinusoid_field(spec["bank"], u, v, p)
    if kind != "brick":
        t = np.clip(t + spec["offset"], 0.0, 1.0)
        return lo + t[..., None] * (hi - lo)
    course, length, joint = spec["course"], spec["length"], spec["joint"]
    row = np.floor(v / course).astype(np.int64)  # course of each pixel centre
    mortar_h = _periodic_line_avg(v, course, joint, p)  # (H,)
    rows = np.unique(row)
    shifts = 0.5 * length * (rows % 2) + 0.2 * length * (_hash01(rows, rows * 0 + 7, seed) - 0.5)
    mortar_v = np.stack([_periodic_line_avg(u - sh, length, joint, p) for sh in shifts])  # (R, W)
    col = np.floor((u[None, :] - shifts[:, None]) / length).astype(np.int64)  # brick index (R, W)
    tone = _hash01(rows[:, None] + col * 0, col, seed)  # (R, W)
    idx = np.searchsorted(rows, row)
    mortar = mortar_h[:, None] + (1.0 - mortar_h[:, None]) * mortar_v[idx]
    t = np.clip(0.2 + 0.6 * tone[idx] + t, 0.0, 1.0)
    brick = lo + t[..., None] * (hi - lo)
    return brick + mortar[..., None] * (np.asarray(spec["mortar"], np.float64) - brick)


def _fade(x: float) -> float:
    """1 while a wave has >= 4 pixels per period, 0 from 2 (Nyquist) on: no moire at low res."""
    return min(1.0, max(0.0, 2.0 - 4.0 * x))


def _pattern(pattern: str, du: np.ndarray, dv: np.ndarray, p: float, pixel: float) -> np.ndarray:
    """Band-limited pattern in [~0, ~1] (1 = darkest) at offsets (du, dv) from the object centre,
    box-filtered over sub-pixels of size ``p``, each harmonic faded out as it nears the Nyquist
    frequency of pixels of size ``pixel`` (so it shows only where the resolution resolves it, as a
    flat darker shade elsewhere). ``du`` is (1, W), ``dv`` is (H, 1)."""
    f = 1.0 / PATTERN_PERIOD
    shape = np.broadcast_shapes(du.shape, dv.shape)
    if pattern == "striped":  # diagonal square wave, first three odd harmonics
        g = f / math.sqrt(2.0)
        out = 0.5
        for n in (1, 3, 5):
            att = (2.0 / (math.pi * n)) * float(np.sinc(n * g * p)) ** 2 * _fade(n * g * pixel)
            if att > 1e-4:
                out = out + att * np.sin(TWO_PI * n * g * (du + dv))
        return np.broadcast_to(out, shape)

    if pattern == "dotted":  # ((1 + cos)/2)^3 in x times the same in y: round dots on a lattice
        coef = {0: 5 / 16, 1: 15 / 32, 2: 3 / 16, 3: 1 / 32}

        def g1(x):
            out = coef[0]
            for n in (1, 2, 3):
                att = coef[n] * float(np.sinc(n * f * p)) * _fade(n * f * pixel)
                if abs(att) > 1e-5:
                    out = out + att * np.cos(TWO_PI * n * f * x)
            return out

        return np.broadcast_to(g1(du) * g1(dv), shape)
    return np.zeros(shape)


def _object_cover(obj: SceneObject, width, height, top, left, h, w, ss):
    """``obj``'s sub-sampled coverage (alpha) and shaded coverage (luminance) over the pixels it
    touches inside the ``h x w`` box at (top, left): ``(y0, y1, x0, x1, alpha, lum)``, or None."""
    s = float(min(width, height))
    ox, oy, R = obj.cx * width, obj.cy * height, obj.r * s
    x0 = max(left, int(math.floor(ox - R - 1)))
    x1 = min(left + w, int(math.ceil(ox + R + 1)))
    y0 = max(top, int(math.floor(oy - R - 1)))
    y1 = min(top + h, int(math.ceil(oy + R + 1)))
    if x0 >= x1 or y0 >= y1:
        return None
    offs = (np.arange(ss) + 0.5) / ss
    xs = (np.arange(x0, x1, dtype=np.float64)[:, None] + offs[None, :]).reshape(1, -1)  # (1, w*ss)
    ys = (np.arange(y0, y1, dtype=np.float64)[:, None] + offs[None, :]).reshape(-1, 1)  # (h*ss, 1)
    sd = shape_sdf(obj.shape, (xs - ox) / R, (ys - oy) / R) * R  # pixels
    cov = np.clip(0.5 - sd * ss, 0.0, 1.0)
    shade = 1.0 - PATTERN_DEPTH[obj.pattern] * _pattern(obj.pattern, (xs - ox) / s, (ys - oy) / s, 1.0 / (s * ss), 1.0 / s)
    covshade = cov * shade
    # Sum the ss x ss sub-samples in a fixed order (identical in a crop and in the full render).
    alpha = np.zeros((y1 - y0, x1 - x0))
    lum = np.zeros((y1 - y0, x1 - x0))
    for a in range(ss):
        for b in range(ss):
            alpha += cov[a::ss, b::ss]
            lum += covshade[a::ss, b::ss]
    alpha /= ss * ss
    lum /= ss * ss
    return y0, y1, x0, x1, alpha, lum


def _draw_object(img, obj: SceneObject, width, height, top, left, ss) -> None:
    """Composite ``obj`` into ``img``, the (bottom-top, right-left, 3) float box at (top, left)."""
    h, w = img.shape[:2]
    cover = _object_cover(obj, width, height, top, left, h, w, ss)
    if cover is None:
        return
    y0, y1, x0, x1, alpha, lum = cover
    box = img[y0 - top : y1 - top, x0 - left : x1 - left]
    rgb = np.asarray(COLORS[obj.color], np.float64)
    box *= (1.0 - alpha)[..., None]
    box += lum[..., None] * rgb


def render_mask(scene: Scene, width: int, height: int, supersample: int = 2) -> np.ndarray:
    """The objects' silhouettes, white on black, antialiased like :func:`render`: (height, width, 3)
    uint8. The condition of the default model's ControlNet (``anysize train controlnet``): where the
    objects are and what shape, not their colour or pattern (the prompt says those)."""
    mask = np.zeros((height, width))
    for obj in scene.objects:
        cover = _object_cover(obj, width, height, 0, 0, height, width, int(supersample))
        if cover is not None:
            y0, y1, x0, x1, alpha, _ = cover
            box = mask[y0:y1, x0:x1]
            box += alpha * (1.0 - box)  # a later object over an earlier one, as render composites them
    gray = np.clip(np.rint(mask * 255), 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=2)


_BAND_PIXELS = 1 << 19  # pixels per row band: bounds memory at any size (~40 MB of temporaries)


def render_crop(
    scene: Scene, width: int, height: int, box: tuple[int, int, int, int], supersample: int = 2
) -> np.ndarray:
    """Pixels ``box = (top, left, bottom, right)`` of the ``width x height`` render, as (H, W, 3)
    uint8; identical to ``render(scene, width, height)[top:bottom, left:right]``."""
    for name, val in (("width", width), ("height", height), ("supersample", supersample)):
        if not isinstance(val, (int, np.integer)) or val < 1:
            raise ValueError(f"{name}={val!r}: must be a positive integer")
    top, left, bottom, right = (int(b) for b in box)
    if not (0 <= top < bottom <= height and 0 <= left < right <= width):
        raise ValueError(f"box={box!r}: must satisfy 0 <= top < bottom <= {height}, 0 <= left < right <= {width}")
    s = float(min(width, height))
    out = np.empty((bottom - top, right - left, 3), np.uint8)
    band = max(1, _BAND_PIXELS // (right - left))
    u = (np.arange(left, right, dtype=np.float64) + 0.5) / s
    for y0 in range(top, bottom, band):
        y1 = min(bottom, y0 + band)
        v = (np.arange(y0, y1, dtype=np.float64) + 0.5) / s
        img = _background(scene.background, scene.background_seed, u, v, 1.0 / s)
        for obj in scene.objects:
            _draw_object(img, obj, width, height, y0, left, int(supersample))
        out[y0 - top : y1 - top] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return out


def render(scene: Scene, width: int, height: int, supersample: int = 2) -> np.ndarray:
    """Render ``scene`` at ``width x height`` pixels: (height, width, 3) uint8, deterministic."""
    return render_crop(scene, width, height, (0, 0, height, width), supersample)


def object_phrase(obj: SceneObject) -> str:
    """One object as the caption names it alone: "a big striped red circle"."""
    return _phrase(1, obj.size, obj.pattern, obj.color, obj.shape)


def object_boxes(scene: Scene, width: int, height: int) -> list[tuple[float, float, float, float]]:
    """Pixel bounding boxes ``(top, left, bottom, right)`` of the objects' bounding squares."""
    s = min(width, height)
    return [
        (o.cy * height - o.r * s, o.cx * width - o.r * s, o.cy * height + o.r * s, o.cx * width + o.r * s)
        for o in scene.objects
    ]
