"""Scene sampling and rendering for the shapes world (OpenCV only).

A scene is 1..4 objects, each a (shape, colour, size) with an amodal box, drawn over a textured or gradient
background, then blurred and noised a little so that the images look more like photos than vector art.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "diamond", "cross")
PLURALS = {"cross": "crosses"}

# BGR base colours; every object jitters around its base so colour is a category, not one exact value.
COLOURS = {
    "red": (40, 40, 215),
    "green": (60, 170, 50),
    "blue": (215, 90, 35),
    "yellow": (40, 220, 235),
    "orange": (20, 130, 245),
    "purple": (160, 50, 130),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
SIZES = ("small", "large")
# object radius as a fraction of the image side, per size word
SIZE_RADIUS = {"small": (0.08, 0.11), "large": (0.16, 0.21)}
# the most of an object's box that the boxes drawn over it may cover (see sample_scene)
MAX_COVER = 0.35


@dataclass(frozen=True)
class SceneObject:
    """One object of a scene: its words and its amodal box (x1, y1, x2, y2) in pixels."""

    shape: str
    colour: str
    size: str
    cx: float
    cy: float
    radius: float
    angle: float
    box: tuple[float, float, float, float]


def plural(shape: str) -> str:
    return PLURALS.get(shape, shape + "s")


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """Vertices (N, 2) float of a regular outline for ``shape`` centred at (cx, cy) with circumradius r."""
    if shape == "square":
        base = np.deg2rad(45) + np.arange(4) * np.pi / 2
        radii = np.full(4, r)
    elif shape == "diamond":
        base = np.arange(4) * np.pi / 2
        radii = np.array([r, r * 0.72, r, r * 0.72])
    elif shape == "triangle":
        base = -np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        radii = np.full(3, r)
    elif shape == "hexagon":
        base = np.arange(6) * np.pi / 3
        radii = np.full(6, r)
    elif shape == "star":
        base = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
    elif shape == "cross":
        t = r * 0.36
        pts = np.array([(-t, -r), (t, -r), (t, -t), (r, -t), (r, t), (t, t), (t, r), (-t, r),
                        (-t, t), (-r, t), (-r, -t), (-t, -t)], dtype=np.float64)
        c, s = np.cos(angle), np.sin(angle)
        rot = pts @ np.array([[c, s], [-s, c]])
        return rot + np.array([cx, cy])
    else:
        raise ValueError(f"unknown shape {shape!r}")
    th = base + angle
    return np.stack([cx + radii * np.cos(th), cy + radii * np.sin(th)], axis=1)


def outline(obj_shape: str, cx: float, cy: float, r: float, angle: float) -> np.ndarray | None:
    """Polygon of the shape, or None for a circle."""
    return None if obj_shape == "circle" else _polygon(obj_shape, cx, cy, r, angle)


def _shape_box(shape: str, cx: float, cy: float, r: float, angle: float) -> tuple[float, float, float, float]:
    poly = outline(shape, cx, cy, r, angle)
    if poly is None:
        return (cx - r, cy - r, cx + r, cy + r)
    return (float(poly[:, 0].min()), float(poly[:, 1].min()), float(poly[:, 0].max()), float(poly[:, 1].max()))


def _intersection(a: tuple, b: tuple) -> float:
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def _area(a: tuple) -> float:
    return (a[2] - a[0]) * (a[3] - a[1])


def _iou(a: tuple, b: tuple) -> float:
    inter = _intersection(a, b)
    area = _area(a) + _area(b) - inter
    return inter / area if area > 0 else 0.0


def sample_scene(rng: np.random.Generator, size: int, max_objects: int = 4,
                 max_overlap: float = 0.15, max_cover: float = MAX_COVER) -> list[SceneObject]:
    """Sample 1..max_objects objects fully inside the image whose boxes overlap at most ``max_overlap`` IoU.

    Objects are drawn in order, later ones on top, so only mild occlusion is allowed: the boxes of the objects
    drawn over an object cover at most ``max_cover`` of its box (the sum of their intersections, an upper bound
    of what they hide). IoU alone does not bound this: a small object under a large one has a small IoU however
    much of it is hidden, and a caption would then name an object the photo does not show. A placement that
    fails 60 times ends the scene early.
    """
    n = int(rng.integers(1, max_objects + 1))
    objects: list[SceneObject] = []
    covered: list[float] = []  # per placed object: box area under the boxes drawn after it
    for _ in range(n):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        size_word = SIZES[int(rng.integers(len(SIZES)))]
        lo, hi = SIZE_RADIUS[size_word]
        for _try in range(60):
            r = float(rng.uniform(lo, hi)) * size
            if shape in ("square", "cross"):
                angle = float(np.deg2rad(rng.uniform(-10, 10)))
            elif shape == "diamond":
                angle = float(np.deg2rad(rng.uniform(-8, 8)))
            elif shape == "triangle":
                angle = float(np.deg2rad(rng.uniform(-12, 12)))
            else:
                angle = float(rng.uniform(0, 2 * np.pi))
            margin = r + 2
            cx = float(rng.uniform(margin, size - margin))
            cy = float(rng.uniform(margin, size - margin))
            box = _shape_box(shape, cx, cy, r, angle)
            under = [_intersection(o.box, box) for o in objects]
            if all(_iou(box, o.box) <= max_overlap for o in objects) and all(
                    c + u <= max_cover * _area(o.box) for o, c, u in zip(objects, covered, under)):
                objects.append(SceneObject(shape, colour, size_word, cx, cy, r, angle, box))
                covered = [c + u for c, u in zip(covered, under)] + [0.0]
                break
    return objects


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A muted gradient or texture, float32 (size, size, 3) in 0..255."""
    c1 = rng.uniform(70, 185, size=3)
    c2 = np.clip(c1 + rng.uniform(-45, 45, size=3), 50, 205)
    # desaturate towards grey so no background reads as one of the object colours
    c1 = 0.55 * c1 + 0.45 * c1.mean()
    c2 = 0.55 * c2 + 0.45 * c2.mean()
    kind = int(rng.integers(4))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    theta = rng.uniform(0, 2 * np.pi)
    t = np.clip(0.5 + (np.cos(theta) * (xx - 0.5) + np.sin(theta) * (yy - 0.5)), 0, 1)
    img = c1[None, None, :] * (1 - t[..., None]) + c2[None, None, :] * t[..., None]
    if kind == 1:  # low-frequency blotches
        k = int(rng.integers(3, 7))
        blot = cv2.resize(rng.normal(0, 1, (k, k)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
        img += 14 * blot[..., None]
    elif kind == 2:  # soft stripes
        freq = rng.uniform(3, 9)
        img += 10 * np.sin(2 * np.pi * freq * (np.cos(theta) * yy + np.sin(theta) * xx))[..., None]
    elif kind == 3:  # fine grain, like fabric or paper
        grain = cv2.GaussianBlur(rng.normal(0, 1, (size, size)).astype(np.float32), (0, 0), 1.2)
        img += 18 * grain[..., None]
    return img.astype(np.float32)


def render_scene(rng: np.random.Generator, size: int, objects: list[SceneObject]) -> np.ndarray:
    """Draw ``objects`` (in order, later ones on top) on a sampled background; BGR uint8 (size, size, 3)."""
    img = _background(rng, size)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for o in objects:
        mask = np.zeros((size, size), np.uint8)
        poly = outline(o.shape, o.cx, o.cy, o.radius, o.angle)
        shift = 4  # sub-pixel precision for anti-aliased edges
        if poly is None:
            cv2.circle(mask, (int(round(o.cx * 16)), int(round(o.cy * 16))), int(round(o.radius * 16)), 255,
                       -1, cv2.LINE_AA, shift)
        else:
            cv2.fillPoly(mask, [np.round(poly * 16).astype(np.int32)], 255, cv2.LINE_AA, shift)
        alpha = mask.astype(np.float32)[..., None] / 255.0
        base = np.array(COLOURS[o.colour], np.float32) + rng.uniform(-18, 18, size=3).astype(np.float32)
        # soft directional shading across the object, as if lit from one side
        light = rng.uniform(0, 2 * np.pi)
        shade = 1.0 + 0.12 * ((np.cos(light) * (xx - o.cx) + np.sin(light) * (yy - o.cy)) / max(o.radius, 1.0))
        fill = np.clip(base[None, None, :] * np.clip(shade, 0.8, 1.2)[..., None], 0, 255)
        img = img * (1 - alpha) + fill * alpha
    sigma = float(rng.uniform(0.3, 0.9))
    img = cv2.GaussianBlur(img, (0, 0), sigma)
    img += rng.normal(0, rng.uniform(2.0, 6.0), img.shape).astype(np.float32)
    img *= float(rng.uniform(0.9, 1.1))
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)
