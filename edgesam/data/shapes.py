"""Object templates of the embedded benchmark: multi-part objects as coloured polygons.

Each template is drawn in a unit frame (x, y in [-0.5, 0.5], y pointing down) as a list
of parts, back to front. A part is a polygon with a palette of base colours and a
texture, chosen so that neighbouring parts differ strongly in colour or texture.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

Texture = Literal["solid", "stripes", "checker", "dots", "noise"]
RGB = tuple[int, int, int]


@dataclass(frozen=True)
class Part:
    name: str
    polygon: np.ndarray  # (K, 2) xy vertices in the unit frame
    colors: tuple[RGB, ...]  # one is drawn per instance, then jittered
    texture: Texture = "solid"


@dataclass(frozen=True)
class Template:
    name: str
    parts: tuple[Part, ...]  # back to front


def rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], dtype=np.float64)


def ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 32) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


def blossom(cx: float, cy: float, r: float, petals: int = 6, n: int = 72) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    radius = r * (0.7 + 0.3 * np.cos(petals * t))
    return np.stack([cx + radius * np.cos(t), cy + radius * np.sin(t)], axis=1)


def poly(*xy: tuple[float, float]) -> np.ndarray:
    return np.array(xy, dtype=np.float64)


WHITE: RGB = (240, 242, 248)
BLACK: RGB = (25, 25, 30)
BROWN: RGB = (110, 65, 30)
GREEN: RGB = (40, 150, 50)
SKY: RGB = (150, 215, 245)
VIVID: tuple[RGB, ...] = ((220, 30, 40), (30, 80, 220), (250, 200, 20), (160, 40, 190), (250, 120, 20))

TEMPLATES: tuple[Template, ...] = (
    Template("snowman", (
        Part("body", ellipse(0, 0.22, 0.28, 0.27), (WHITE,), "dots"),
        Part("head", ellipse(0, -0.17, 0.17, 0.16), ((250, 235, 200),), "solid"),
        Part("hat", poly((-0.12, -0.5), (0.12, -0.5), (0.12, -0.33), (0.2, -0.33), (0.2, -0.27),
                         (-0.2, -0.27), (-0.2, -0.33), (-0.12, -0.33)), (BLACK, (120, 20, 30)), "solid"),
    )),
    Template("house", (
        Part("walls", rect(-0.4, -0.05, 0.4, 0.5), ((190, 60, 40), (230, 200, 120)), "stripes"),
        Part("roof", poly((-0.5, 0.0), (0.0, -0.5), (0.5, 0.0)), ((60, 70, 90), (30, 100, 60)), "checker"),
        Part("door", rect(-0.08, 0.2, 0.08, 0.5), (BROWN,), "solid"),
        Part("window", rect(0.17, 0.08, 0.33, 0.24), (SKY,), "solid"),
    )),
    Template("tree", (
        Part("trunk", rect(-0.07, 0.1, 0.07, 0.5), (BROWN,), "stripes"),
        Part("crown", ellipse(0, -0.15, 0.38, 0.35), (GREEN, (20, 110, 60)), "dots"),
    )),
    Template("car", (
        Part("body", poly((-0.5, 0.15), (-0.5, -0.05), (-0.3, -0.05), (-0.18, -0.25), (0.2, -0.25),
                          (0.32, -0.05), (0.5, -0.05), (0.5, 0.15)), VIVID, "solid"),
        Part("window", poly((-0.24, -0.07), (-0.15, -0.21), (0.17, -0.21), (0.25, -0.07)), (SKY,), "solid"),
        Part("rear wheel", ellipse(-0.3, 0.15, 0.12, 0.12), (BLACK,), "checker"),
        Part("front wheel", ellipse(0.3, 0.15, 0.12, 0.12), (BLACK,), "checker"),
    )),
    Template("lamp", (
        Part("pole", rect(-0.03, -0.2, 0.03, 0.42), ((190, 190, 200),), "solid"),
        Part("base", poly((-0.22, 0.5), (-0.12, 0.38), (0.12, 0.38), (0.22, 0.5)), ((50, 50, 60),), "noise"),
        Part("shade", poly((-0.3, -0.12), (-0.15, -0.5), (0.15, -0.5), (0.3, -0.12)), ((250, 220, 60), (240, 120, 170)), "stripes"),
    )),
    Template("flower", (
        Part("stem", rect(-0.03, -0.05, 0.03, 0.5), (GREEN,), "solid"),
        Part("leaf", poly((0.02, 0.32), (0.22, 0.12), (0.34, 0.14), (0.06, 0.38)), ((20, 100, 30),), "stripes"),
        Part("petals", blossom(0, -0.2, 0.3), ((240, 90, 170), (170, 70, 230), (250, 250, 250)), "solid"),
        Part("center", ellipse(0, -0.2, 0.09, 0.09), ((250, 210, 0),), "dots"),
    )),
    Template("fish", (
        Part("tail", poly((0.22, 0.0), (0.5, -0.22), (0.5, 0.22)), ((200, 40, 30), (30, 60, 160)), "stripes"),
        Part("body", ellipse(-0.07, 0.0, 0.36, 0.2), ((250, 140, 20), (60, 170, 220)), "stripes"),
        Part("eye", ellipse(-0.27, -0.05, 0.06, 0.06), (BLACK,), "solid"),
    )),
    Template("sailboat", (
        Part("mast", rect(-0.08, -0.5, -0.04, 0.22), ((100, 100, 110),), "solid"),
        Part("sail", poly((-0.03, -0.45), (-0.03, 0.15), (0.42, 0.15)), (WHITE, (245, 230, 180)), "stripes"),
        Part("flag", poly((-0.08, -0.5), (-0.32, -0.43), (-0.08, -0.36)), ((220, 30, 40), (30, 80, 220)), "solid"),
        Part("hull", poly((-0.5, 0.2), (0.5, 0.2), (0.35, 0.45), (-0.35, 0.45)), (BROWN, (40, 40, 120)), "checker"),
    )),
)

CATEGORIES = tuple(t.name for t in TEMPLATES)


def texture_fill(texture: Texture, color: np.ndarray, shape: tuple[int, int], period: float,
                 rng: np.random.Generator) -> np.ndarray:
    """(h, w, 3) float patch of `color` with `texture` in a contrasting shade, period in pixels."""
    h, w = shape
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    second = np.where(color.mean() > 110, color * 0.45, np.minimum(color * 0.5 + 130, 255))
    if texture == "stripes":
        angle = rng.uniform(0, np.pi)
        pattern = ((x * np.cos(angle) + y * np.sin(angle)) / period) % 2 < 1
    elif texture == "checker":
        pattern = ((x // period + y // period) % 2) == 0
    elif texture == "dots":
        cell = period * 1.5
        pattern = ((x % cell) - cell / 2) ** 2 + ((y % cell) - cell / 2) ** 2 < (cell / 4) ** 2
    else:
        pattern = np.zeros((h, w), dtype=bool)
    patch = np.where(pattern[..., None], second, color).astype(np.float32)
    sigma = 18.0 if texture == "noise" else 5.0
    return patch + rng.normal(0, sigma, (h, w, 1)).astype(np.float32)
