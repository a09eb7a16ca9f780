"""Recover the objects of an image of the :mod:`anysize.train.scenes` domain, and score them.

``detect_objects`` finds the saturated objects on the muted background and names their colour and
shape; ``score`` compares them with the scene's (or the caption's) objects: whether the multiset of
``(shape, colour)`` matches exactly, recall, precision, the duplicate rate (extra copies of a
captioned object: the failure of square-trained models at wide ratios) and the number of objects
the frame cuts.

Pipeline
--------
1. Images with a shorter side of 320 px or more are area-averaged down by an integer factor to a
   shorter side of 160..319 px first: the smallest object is ~0.26 of the shorter side, so it stays
   >= 40 px across, and the cost stays small at any resolution.
2. HSV per pixel; a pixel belongs to an object when saturation >= 0.4 and value >= 0.2 (scene
   backgrounds stay below 0.27 saturation, object colours are >= 0.76, patterns only darken them).
3. Connected components (4-connectivity) of that mask. scipy is not a dependency of anysize (and
   not installed), so labelling is done here on run-lengths: runs of each row are linked to
   overlapping runs of the row above with ``searchsorted``, then merged by a vectorised union-find
   (hooking to the smaller root plus pointer jumping). That is O(number of runs) numpy work.
4. Colour: vote of the component's pixels' hues (weighted by saturation) to the nearest of the six
   scene colours. All saturated pixels are labelled together and then voted, instead of labelling
   per hue class, because anti-aliased edges mixed with the background drift in hue (a red edge on
   grass reads orange) and would form spurious rings.
5. Shape: template fit. A soft coverage ``alpha`` (from saturation) gives the component's centroid
   and second moments; for every candidate shape a template with the same centroid and the same
   second moments along x and y is rasterised with the renderer's own signed-distance functions, and
   the shape whose template overlaps best (soft IoU) wins. Moments and IoU use all of the object,
   so this holds from ~8 px objects (soft edges carry the sub-pixel information) to 1000 px ones,
   and tolerates objects stretched by a model (x and y scales are fitted separately), better than
   corner counting or fill ratios, which quantisation disturbs at small sizes.
"""

from __future__ import annotations

import colorsys
import math
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .scenes import COLORS, SHAPES, SIZES, Scene, SceneObject, parse_caption, shape_sdf

SAT_MIN = 0.4
VALUE_MIN = 0.2
BG_SAT = 0.12  # typical background saturation; alpha = 0 there
WORK_SIZE = 160  # images with a shorter side >= 2 * WORK_SIZE are area-reduced by an integer factor
MIN_AREA_FRAC = 0.005  # of shorter side squared (~1/7 of the smallest object's area)
SIZE_THRESHOLD = math.sqrt(SIZES["small"] * SIZES["large"])


@dataclass(frozen=True)
class Detection:
    """One detected object. ``cx``, ``cy`` normalised to the frame; ``area`` is the fraction of the
    frame it covers; ``r`` its fitted half-extent / shorter side (as ``SceneObject.r``); ``size``
    "small" or "large" from ``r``; ``shape_score`` the template IoU of the chosen shape."""

    shape: str
    color: str
    cx: float
    cy: float
    area: float
    touches_border: bool
    r: float = 0.0
    size: str = ""
    shape_score: float = 0.0

    @property
    def key(self) -> tuple[str, str]:
        return (self.shape, self.color)


# ----------------------------------------------------------------------------------------------
# Connected components without scipy
# ----------------------------------------------------------------------------------------------


def label_components(mask: np.ndarray, connectivity: int = 4) -> tuple[np.ndarray, int]:
    """Label the connected True regions of a 2-D bool mask: (int32 labels with 0 = background, n)."""
    mask = np.asarray(mask, bool)
    H, W = mask.shape
    labels = np.zeros(H * W, np.int32)
    if not mask.any():
        return labels.reshape(H, W), 0
    padded = np.zeros((H, W + 2), np.int8)
    padded[:, 1:-1] = mask
    d = np.diff(padded, axis=1)
    row, start = np.nonzero(d == 1)
    _, end = np.nonzero(d == -1)  # exclusive; same row-major order as the starts
    n = row.size
    stride = W + 2
    skey = row * stride + start
    ekey = row * stride + end
    # Runs of the previous row that overlap run j (8-connectivity also accepts diagonal contact).
    grow = 1 if connectivity == 8 else 0
    lo = (row - 1) * stride + start - grow
    hi = (row - 1) * stride + end + grow
    i0 = np.searchsorted(ekey, lo, side="right")
    i1 = np.searchsorted(skey, hi, side="left")
    cnt = np.where(row > 0, np.maximum(i1 - i0, 0), 0)
    a = np.repeat(np.arange(n), cnt)
    b = np.repeat(i0, cnt) + (np.arange(cnt.sum()) - np.repeat(np.cumsum(cnt) - cnt, cnt))
    parent = np.arange(n)
    while a.size:
        pa, pb = parent[a], parent[b]
        if np.array_equal(pa, pb):
            break
        m = np.minimum(pa, pb)
        np.minimum.at(parent, pa, m)
        np.minimum.at(parent, pb, m)
        while True:  # pointer jumping to the roots
            nxt = parent[parent]
            if np.array_equal(nxt, parent):
                break
            parent = nxt
    _, comp = np.unique(parent, return_inverse=True)
    length = end - start
    flat = row * W + start
    pix = np.repeat(flat - (np.cumsum(length) - length), length) + np.arange(length.sum())
    labels[pix] = np.repeat(comp.astype(np.int32) + 1, length)
    return labels.reshape(H, W), int(comp.max()) + 1


# ----------------------------------------------------------------------------------------------
# Colour
# ----------------------------------------------------------------------------------------------

_COLOR_NAMES = tuple(COLORS)
_COLOR_HUES = np.array([colorsys.rgb_to_hsv(*(c / 255 for c in COLORS[k]))[0] * 360 for k in _COLOR_NAMES])


def _hsv(img: np.ndarray):
    rgb = img.astype(np.float32) / 255.0
    mx = rgb.max(axis=2)
    mn = rgb.min(axis=2)
    c = mx - mn
    sat = np.where(mx > 0, c / np.maximum(mx, 1e-6), 0.0)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    cc = np.maximum(c, 1e-6)
    hue = np.where(
        mx == r, np.mod((g - b) / cc, 6.0), np.where(mx == g, (b - r) / cc + 2.0, (r - g) / cc + 4.0)
    ) * 60.0
    return hue, sat, mx


def _color_class(hue: np.ndarray) -> np.ndarray:
    d = np.abs(hue[..., None] - _COLOR_HUES)
    d = np.minimum(d, 360.0 - d)
    return np.argmin(d, axis=-1)


# ----------------------------------------------------------------------------------------------
# Shape
# ----------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _shape_moments() -> dict[str, tuple[float, float, float]]:
    """Per unit shape: (centroid y, std x, std y) of its area."""
    g = (np.arange(800) + 0.5) / 400 - 1.0
    x, y = g[None, :], g[:, None]
    out = {}
    for s in SHAPES:
        m = (shape_sdf(s, x, y) < 0).astype(np.float64)
        a = m.sum()
        my = (m * y).sum() / a
        sx = math.sqrt((m * x * x).sum() / a)
        sy = math.sqrt((m * (y - my) ** 2).sum() / a)
        out[s] = (my, sx, sy)
    return out


def _coverage(shape, xs, ys, cx, cy, rx, ry, ss):
    """Soft coverage of a template at pixel centres xs (1, W), ys (H, 1) (pixel units)."""
    offs = (np.arange(ss) + 0.5) / ss - 0.5
    scale = math.sqrt(rx * ry)
    acc = 0.0
    for oy in offs:
        for ox in offs:
            sd = shape_sdf(shape, (xs + ox - cx) / rx, (ys + oy - cy) / ry) * scale
            acc = acc + np.clip(0.5 - sd * ss, 0.0, 1.0)
    return acc / (ss * ss)


def _classify_shape(alpha: np.ndarray, x0: int, y0: int):
    """Best shape for the soft mask ``alpha`` whose top-left pixel is (x0, y0): (shape, iou, cx,
    cy, r_px) with the centroid in pixel coordinates."""
    H, W = alpha.shape
    xs = np.arange(W, dtype=np.float64)[None, :] + 0.5
    ys = np.arange(H, dtype=np.float64)[:, None] + 0.5
    m = alpha.sum()
    mx = (alpha * xs).sum() / m
    my = (alpha * ys).sum() / m
    sx = math.sqrt(max((alpha * (xs - mx) ** 2).sum() / m, 1e-6))
    sy = math.sqrt(max((alpha * (ys - my) ** 2).sum() / m, 1e-6))
    ss = 3 if min(H, W) < 24 else 1  # sub-samples matter only while edges are a large share
    best = ("circle", -1.0, 1.0)
    for shape, (cy_s, sx_s, sy_s) in _shape_moments().items():
        rx, ry = sx / sx_s, sy / sy_s
        t = _coverage(shape, xs, ys, mx, my - cy_s * ry, rx, ry, ss)
        iou = float(np.minimum(t, alpha).sum() / max(np.maximum(t, alpha).sum(), 1e-9))
        if iou > best[1]:
            best = (shape, iou, math.sqrt(rx * ry))
    return best[0], best[1], mx + x0, my + y0, best[2]


# ----------------------------------------------------------------------------------------------
# Detection
# ----------------------------------------------------------------------------------------------


def _area_reduce(img: np.ndarray, k: int) -> np.ndarray:
    H, W = (img.shape[0] // k) * k, (img.shape[1] // k) * k
    x = img[:H, :W].astype(np.float32).reshape(H // k, k, W // k, k, 3).mean(axis=(1, 3))
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def detect_objects(image: np.ndarray, *, min_area_frac: float = MIN_AREA_FRAC) -> list[Detection]:
    """Objects in an (H, W, 3) uint8 RGB image of the scene domain, in raster order of their
    first pixel. Components smaller than ``min_area_frac * min(H, W)**2`` are dropped as noise."""
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] < 3:
        raise ValueError(f"image of shape {img.shape}: expected (H, W, 3)")
    img = img[..., :3]
    if img.dtype != np.uint8:
        img = np.clip(np.rint(img.astype(np.float64) * (255.0 if img.max() <= 1.0 else 1.0)), 0, 255)
        img = img.astype(np.uint8)
    H0, W0 = img.shape[:2]
    k = max(1, min(H0, W0) // WORK_SIZE)
    if k > 1:
        img = _area_reduce(img, k)
    H, W = img.shape[:2]
    short = min(H, W)
    hue, sat, val = _hsv(img)
    mask = (sat >= SAT_MIN) & (val >= VALUE_MIN)
    labels, n = label_components(mask)
    if n == 0:
        return []
    flat = labels.ravel()
    area = np.bincount(flat, minlength=n + 1)
    cls = _color_class(hue)
    votes = np.zeros((n + 1, len(_COLOR_NAMES)))
    np.add.at(votes, (flat, cls.ravel()), sat.ravel())
    rr, cc = np.nonzero(labels)
    lab = labels[rr, cc]
    top = np.full(n + 1, H)
    left = np.full(n + 1, W)
    bottom = np.zeros(n + 1, int)
    right = np.zeros(n + 1, int)
    np.minimum.at(top, lab, rr)
    np.minimum.at(left, lab, cc)
    np.maximum.at(bottom, lab, rr + 1)
    np.maximum.at(right, lab, cc + 1)
    min_area = max(3.0, min_area_frac * short * short)
    out = []
    for i in range(1, n + 1):
        if area[i] < min_area:
            continue
        t, l, b, r = top[i], left[i], bottom[i], right[i]
        touches = bool(t == 0 or l == 0 or b == H or r == W)
        # Soft coverage in the component's box grown by one pixel, other components excluded.
        t1, l1, b1, r1 = max(t - 1, 0), max(l - 1, 0), min(b + 1, H), min(r + 1, W)
        own = labels[t1:b1, l1:r1] == i
        grown = own.copy()
        grown[1:] |= own[:-1]
        grown[:-1] |= own[1:]
        grown[:, 1:] |= own[:, :-1]
        grown[:, :-1] |= own[:, 1:]
        grown &= (labels[t1:b1, l1:r1] == 0) | own
        s_patch = sat[t1:b1, l1:r1]
        s_obj = max(float(np.percentile(s_patch[own], 75)), BG_SAT + 0.2)
        alpha = np.clip((s_patch - BG_SAT) / (s_obj - BG_SAT), 0.0, 1.0) * grown
        shape, iou, px, py, r_px = _classify_shape(alpha, l1, t1)
        r_rel = r_px / short
        out.append(
            Detection(
                shape=shape,
                color=_COLOR_NAMES[int(np.argmax(votes[i]))],
                cx=float(px / W),
                cy=float(py / H),
                area=float(alpha.sum() / (H * W)),
                touches_border=touches,
                r=float(r_rel),
                size="large" if r_rel > SIZE_THRESHOLD else "small",
                shape_score=iou,
            )
        )
    return out


# ----------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------


def _expected_keys(expected) -> list[tuple[str, str]]:
    """(shape, colour) list from a Scene, a caption, SceneObjects or (shape, colour) pairs."""
    if isinstance(expected, Scene):
        expected = expected.objects
    if isinstance(expected, str):
        items, _ = parse_caption(expected)
        return [(it["shape"], it["color"]) for it in items for _ in range(it["count"])]
    keys = []
    for o in expected:
        if isinstance(o, (SceneObject, Detection)):
            keys.append(o.key)
        elif isinstance(o, dict):
            keys.append((o["shape"], o["color"]))
        else:
            keys.append((o[0], o[1]))
    return keys


def score(detections, scene_objects) -> dict:
    """Compare detections with the expected objects (a Scene, its objects, a caption string, or
    (shape, colour) pairs). Matching is on the (shape, colour) multiset.

    Returns ``exact`` (multisets equal), ``color_exact`` (the colour multiset equal, shapes ignored:
    composition of a model that has not yet learned sharp shapes), ``count_exact`` (same number of
    objects), ``recall``,
    ``precision`` (1.0 when nothing was detected: no false positives), ``duplicates`` (detections of
    a captioned (shape, colour) beyond its captioned count) and ``duplicate_rate`` (duplicates / number
    of captioned objects), ``extras`` (detections of a (shape, colour) the caption lacks), ``missing``,
    ``cut`` (detections touching the frame) and ``cut_rate`` (cut / detections, 0.0 if none),
    ``n_expected`` and ``n_detected``.
    """
    exp = Counter(_expected_keys(scene_objects))
    det = Counter(d.key if isinstance(d, (Detection, SceneObject)) else (d[0], d[1]) for d in detections)
    n_exp, n_det = sum(exp.values()), sum(det.values())
    matched = sum(min(c, det[k]) for k, c in exp.items())
    duplicates = sum(max(det[k] - c, 0) for k, c in exp.items())
    extras = sum(c for k, c in det.items() if k not in exp)
    cut = sum(1 for d in detections if getattr(d, "touches_border", False))
    return {
        "exact": exp == det,
        "color_exact": Counter(c for _, c in exp.elements()) == Counter(c for _, c in det.elements()),
        "count_exact": n_exp == n_det,
        "recall": matched / n_exp if n_exp else 1.0,
        "precision": matched / n_det if n_det else 1.0,
        "duplicates": duplicates,
        "duplicate_rate": duplicates / n_exp if n_exp else float(duplicates > 0),
        "extras": extras,
        "missing": n_exp - matched,
        "cut": cut,
        "cut_rate": cut / n_det if n_det else 0.0,
        "n_expected": n_exp,
        "n_detected": n_det,
    }


def evaluate_image(image: np.ndarray, scene) -> dict:
    """``score(detect_objects(image), scene)``; ``scene`` may be a Scene or a caption string."""
    return score(detect_objects(image), scene)


def aggregate(scores) -> dict:
    """Means of every numeric entry over a list of ``score`` dicts (booleans as rates), plus ``n``."""
    scores = list(scores)
    out: dict = {"n": len(scores)}
    if not scores:
        return out
    for key in scores[0]:
        vals = [float(s[key]) for s in scores if key in s]
        out[key] = float(np.mean(vals)) if vals else float("nan")
    return out
