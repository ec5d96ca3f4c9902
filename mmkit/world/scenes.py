"""Procedural scenes of the reference world, each with its exact truth.

A scene is a pure function of ``(world_seed, index, size)``: an RGB image of 1 to 6 flat-coloured objects on a
muted, textured background, plus every object's category, colour, visible mask and box. Category statistics are
COCO-like on purpose: a Zipf-like prior makes some categories far more common than others, and co-occurrence
groups (pairs such as cup + key) make one member's partner present most of the time. A model trained on the world
therefore learns language priors strong enough to hallucinate an absent partner, which is what the hallucination
methods and POPE's adversarial split measure.

Drawing is done per object into a small PIL mask at image resolution, so masks and pixels agree exactly; a scene
at 336 x 336 takes a few milliseconds on one CPU core.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

CATEGORIES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "heart", "cross", "ring", "diamond", "arrow", "moon",
    "hexagon", "car", "tree", "house", "cup", "key", "umbrella", "fish", "bell", "boat",
)

# Saturated, well separated colours; backgrounds are muted mid-greys, so no object colour equals a background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35),
    "green": (40, 170, 60),
    "blue": (35, 75, 225),
    "yellow": (240, 215, 30),
    "orange": (250, 135, 20),
    "purple": (135, 45, 185),
    "pink": (250, 125, 195),
    "cyan": (35, 215, 225),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}

# Co-occurrence groups: when one member is sampled, its partner is added with probability PARTNER_PROB.
GROUPS: tuple[tuple[str, str], ...] = (
    ("tree", "house"), ("cup", "key"), ("fish", "boat"), ("star", "moon"),
    ("umbrella", "bell"), ("heart", "ring"), ("car", "arrow"),
)
PARTNER_PROB = 0.65
PARTNER: dict[str, str] = {a: b for a, b in GROUPS} | {b: a for a, b in GROUPS}

# Zipf-like prior: weight 1 / rank ** ZIPF_EXPONENT over this popularity order (most common first). The order
# mixes group members and loners so that both popular and rare categories have partners.
POPULARITY_ORDER: tuple[str, ...] = (
    "circle", "cup", "tree", "square", "key", "house", "star", "triangle", "fish", "moon",
    "car", "boat", "heart", "diamond", "umbrella", "arrow", "ring", "cross", "bell", "hexagon",
)
ZIPF_EXPONENT = 1.0

# Each category has a typical colour used with this probability (else a uniform colour): a mild attribute prior.
TYPICAL_COLOUR_PROB = 0.35
TYPICAL_COLOUR: dict[str, str] = {
    "circle": "red", "square": "blue", "triangle": "yellow", "star": "yellow", "heart": "red", "cross": "white",
    "ring": "orange", "diamond": "cyan", "arrow": "black", "moon": "white", "hexagon": "purple", "car": "red",
    "tree": "green", "house": "orange", "cup": "white", "key": "yellow", "umbrella": "blue", "fish": "orange",
    "bell": "yellow", "boat": "white",
}

# Number of objects sampled per scene, 1..6.
COUNT_WEIGHTS = (0.13, 0.2, 0.22, 0.2, 0.15, 0.1)
MAX_OBJECTS = len(COUNT_WEIGHTS)
# Probability that a sampled object comes with an extra instance of the same category (counting questions).
DUPLICATE_PROB = 0.15

BASE_SIZE = 336
# Longest side of an object at 336 px: small objects (hard) with SMALL_PROB, else log-uniform in the normal range.
SMALL_PROB = 0.2
SMALL_RANGE = (16.0, 30.0)
NORMAL_RANGE = (30.0, 105.0)
# No object's box is thinner than this (at 336 px), so even a small key stays a key rather than a line.
MIN_SIDE = 9
# An object must keep this fraction of its drawn pixels visible after occlusion, and this many pixels at 336 px.
MIN_VISIBLE_FRACTION = 0.5
MIN_VISIBLE_PIXELS = 60
PLACEMENT_TRIES = 10
COLOUR_JITTER = 12
# Objects whose short side reaches this many pixels (at 336 px) get a rim of their colour times RIM_SHADE.
RIM_MIN_SIDE = 24
RIM_SHADE = 0.7
# Background channel values stay in this range: far from black and white objects, and low in saturation.
BACKGROUND_RANGE = (70.0, 190.0)
# Names of the background kinds drawn by `_background`, in the order of its `kind` draw.
BACKGROUND_PATTERNS = ("plain", "shaded", "striped", "checkered", "mottled")
# Lightness names of a background by its mean grey level (0..255): below the first bound "dark", below the second
# "medium", else "light".
BACKGROUND_TONES = ("dark", "medium", "light")
BACKGROUND_TONE_BOUNDS = (112.0, 148.0)
# Amplitude of the fine pixel noise over the whole image, so objects are not perfectly flat.
PIXEL_NOISE = 4.0

# The statistics below are estimated from this many category samples (a fixed stream, cached).
_STATS_SAMPLES = 40000
_STATS_SEED = 20240601


@dataclass(frozen=True)
class WorldObject:
    """One visible object: category, colour name, box (x0, y0, x1, y1; x1/y1 exclusive) and mask of the visible
    pixels after occlusion, and the visible area in pixels."""

    category: str
    colour: str
    box: tuple[int, int, int, int]
    mask: np.ndarray = field(compare=False, repr=False)
    area: int = 0


@dataclass(frozen=True)
class Scene:
    """A generated scene: the RGB image and its objects in drawing order (later objects occlude earlier ones)."""

    world_seed: int
    index: int
    image: Image.Image = field(compare=False, repr=False)
    objects: tuple[WorldObject, ...] = ()
    # The background's truth: its pattern (one of BACKGROUND_PATTERNS) and its lightness (one of
    # BACKGROUND_TONES, from the mean grey level of the background before objects are drawn).
    background: str = "plain"
    background_tone: str = "medium"

    @property
    def size(self) -> int:
        return self.image.size[0]

    def categories(self) -> set[str]:
        """The set of categories present in the scene."""
        return {o.category for o in self.objects}

    def count(self, category: str) -> int:
        """Number of instances of `category` in the scene."""
        return sum(o.category == category for o in self.objects)

    def owner_map(self) -> np.ndarray:
        """(H, W) int array: index of the object owning each pixel, -1 for background."""
        h, w = self.image.size[1], self.image.size[0]
        owner = np.full((h, w), -1, dtype=np.int16)
        for i, obj in enumerate(self.objects):
            owner[obj.mask] = i
        return owner

    def patch_labels(self, grid: int, min_fraction: float = 0.25) -> dict[str, np.ndarray]:
        """Dense labels for a `grid` x `grid` patch layout.

        Each cell gets the object with the most visible pixels in it, if that object covers at least
        `min_fraction` of the cell, else background; a plain majority would erase small objects, which are the
        ones a vision tower most needs to learn. Returns {"category": (grid, grid) int64, 0 = background,
        1 + CATEGORIES.index; "colour": same layout, 1 + index in COLOURS}.
        """
        h, w = self.image.size[1], self.image.size[0]
        if grid <= 0 or h % grid or w % grid:
            raise ValueError(f"grid must be a positive divisor of the image size {w}x{h}, got {grid}")
        ch, cw = h // grid, w // grid
        n = len(self.objects)
        owner = self.owner_map().astype(np.int64) + 1  # 0 = background, 1..n objects
        cells = owner.reshape(grid, ch, grid, cw).transpose(0, 2, 1, 3).reshape(grid * grid, ch * cw)
        offsets = np.arange(grid * grid)[:, None] * (n + 1)
        counts = np.bincount((cells + offsets).ravel(), minlength=grid * grid * (n + 1)).reshape(grid * grid, n + 1)
        objects_counts = counts[:, 1:]
        category = np.zeros(grid * grid, dtype=np.int64)
        colour = np.zeros(grid * grid, dtype=np.int64)
        if n:
            best = objects_counts.argmax(axis=1)
            keep = objects_counts[np.arange(grid * grid), best] >= min_fraction * ch * cw
            cat_ids = np.array([1 + CATEGORIES.index(o.category) for o in self.objects])
            col_names = list(COLOURS)
            col_ids = np.array([1 + col_names.index(o.colour) for o in self.objects])
            category[keep] = cat_ids[best[keep]]
            colour[keep] = col_ids[best[keep]]
        return {"category": category.reshape(grid, grid), "colour": colour.reshape(grid, grid)}


# ---------------------------------------------------------------------------------------------------------------
# Silhouettes. Each function draws fill 255 on an "L" image of size (w, h); coordinates are given in [0, 1] and
# scaled, so every shape keeps its proportions at any size. Fill 0 cuts holes (windows, the ring's hole) that
# show the background, and the mask records that exactly.


def _pts(w: int, h: int, pts: list[tuple[float, float]]) -> list[tuple[float, float]]:
    return [(x * (w - 1), y * (h - 1)) for x, y in pts]


def _box(w: int, h: int, x0: float, y0: float, x1: float, y1: float) -> tuple[float, float, float, float]:
    return (x0 * (w - 1), y0 * (h - 1), x1 * (w - 1), y1 * (h - 1))


def _regular(n: int, r_out: float, r_in: float | None = None, rot: float = -math.pi / 2) -> list[tuple[float, float]]:
    """A regular polygon (or a star when r_in is given) centred in the unit square."""
    pts = []
    k = 2 * n if r_in is not None else n
    for i in range(k):
        r = r_out if (r_in is None or i % 2 == 0) else r_in
        a = rot + 2 * math.pi * i / k
        pts.append((0.5 + r * math.cos(a), 0.5 + r * math.sin(a)))
    return pts


def _circle(d: ImageDraw.ImageDraw, w: int, h: int) -> None:
    d.ellipse(_box(w, h, 0, 0, 1, 1), fill=255)


def _square(d: ImageDraw.ImageDraw, w: int, h: int) -> None:
    d.rectangle(_box(w, h, 0, 0, 1, 1), fill=255)


def _triangle(d: ImageDraw.ImageDraw, w: int, h: int) -> None:
    d.polygon(_pts(w, h, [(0.5, 0), (1, 1), (0, 1)]), fill=255)


def _star(d: ImageDraw.ImageDraw, w: int, h: int) -> None:
    pts = [(x, (y - 0.5) * 1.05 + 0.55) for x, y in _regular(5, 0.5, 0.2)]
    d.polygon(_pts(w, h, pts), fill=255)


def _heart(d: ImageDraw.ImageDraw, w: int, h: int) -> None:
    d.ellipse(_box(w, h, 0, 0, 0.54, 0.52), fill=255)
    d.ellipse(_box(w, h, 0.46, 0, 1, 0.52), fill=255)
    d.polygon(_pts(w, h, [(0.0, 0.27), (1.0, 0.27), (0.5, 1)]), fill=255)


def _cross(d: ImageDraw.ImageDraw, w: int, h: int) -> None:
    d.rectangle(_box(w, h, 0.34, 0, 0.66, 1), fill=255)
    d.rectangle(_box(w, h, 0, 0.34, 1, 0.66), fill=255)


def _ring(d: ImageDraw.ImageDraw, w: int, h: int) -> None:
    d.ellipse(_box(w, h, 0, 0, 1, 1), fill=255)
    d.ellipse(_box(w, h, 0.27, 0.27, 0.73, 0.73), fill=0)


def _diamond(d: ImageDraw.ImageDraw, w: int, h: int) -> None:
    d.polygon(_pts(w, h, [(0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5)]), fill=255)


def _arrow(d: ImageDraw.ImageDraw, w: int, h: int) -> None:
    d.polygon(_pts(w, h, [(0, 0.34), (0.55, 0.34), (0.55, 0), (1, 0.5), (0.55, 1), (0.55, 0.66), (0, 0.66)]), fill=255)


def _moon(d: ImageDraw.ImageDraw, w: int, h: int) -> None:
    d.ellipse(_box(w, h, 0, 0, 1, 1), fill=255)
    d.ellipse(_box(w, h, 0.32, -0.08, 1.25, 0.9), fill=0)


def _hexagon(d: ImageDraw.ImageDraw, w: int, h: int) -> None:
    d.polygon(_pts(w, h, _regular(6, 0.5, rot=0.0)), fill=255)


def _car(d: ImageDraw.ImageDraw, w: int, h: int) -> None:
    d.polygon(_pts(w, h, [(0.22, 0.4), (0.32, 0.04), (0.7, 0.04), (0.82, 0.4)]), fill=255)
    d.rectangle(_box(w, h, 0, 0.38, 1, 0.78), fill=255)
    d.polygon(_pts(w, h, [(0.3, 0.38), (0.37, 0.14), (0.49, 0.14), (0.49, 0.38)]), fill=0)
    d.polygon(_pts(w, h, [(0.55, 0.38), (0.55, 0.14), (0.66, 0.14), (0.74, 0.38)]), fill=0)
    for x0 in (0.08, 0.64):
        d.ellipse(_box(w, h, x0 - 0.02, 0.54, x0 + 0.3, 1), fill=0)
        d.ellipse(_box(w, h, x0, 0.58, x0 + 0.28, 1), fill=255)


def _tree(d: ImageDraw.ImageDraw, w: int, h: int) -> None:
    d.rectangle(_box(w, h, 0.4, 0.72, 0.6, 1), fill=255)
    d.polygon(_pts(w, h, [(0.5, 0), (0.8, 0.3), (0.2, 0.3)]), fill=255)
    d.polygon(_pts(w, h, [(0.5, 0.15), (0.9, 0.52), (0.1, 0.52)]), fill=255)
    d.polygon(_pts(w, h, [(0.5, 0.33), (1, 0.76), (0, 0.76)]), fill=255)


def _house(d: ImageDraw.ImageDraw, w: int, h: int) -> None:
    d.polygon(_pts(w, h, [(0.5, 0), (1, 0.45), (0, 0.45)]), fill=255)
    d.rectangle(_box(w, h, 0.12, 0.44, 0.88, 1), fill=255)
    d.rectangle(_box(w, h, 0.42, 0.66, 0.6, 1), fill=0)
    d.rectangle(_box(w, h, 0.2, 0.55, 0.34, 0.7), fill=0)
    d.rectangle(_box(w, h, 0.7, 0.1, 0.8, 0.3), fill=255)  # chimney


def _cup(d: ImageDraw.ImageDraw, w: int, h: int) -> None:
    d.ellipse(_box(w, h, 0.52, 0.22, 1, 0.74), fill=255)
    d.ellipse(_box(w, h, 0.66, 0.35, 0.88, 0.61), fill=0)
    d.polygon(_pts(w, h, [(0, 0.08), (0.76, 0.08), (0.66, 1), (0.1, 1)]), fill=255)


def _key(d: ImageDraw.ImageDraw, w: int, h: int) -> None:
    d.ellipse(_box(w, h, 0, 0.1, 0.38, 0.9), fill=255)
    d.ellipse(_box(w, h, 0.1, 0.34, 0.28, 0.66), fill=0)
    d.rectangle(_box(w, h, 0.36, 0.38, 1, 0.6), fill=255)
    d.rectangle(_box(w, h, 0.72, 0.6, 0.8, 0.88), fill=255)
    d.rectangle(_box(w, h, 0.88, 0.6, 0.96, 0.8), fill=255)


def _umbrella(d: ImageDraw.ImageDraw, w: int, h: int) -> None:
    d.pieslice(_box(w, h, 0, 0, 1, 0.9), 180, 360, fill=255)
    for i in range(4):  # scalloped lower edge of the canopy
        d.ellipse(_box(w, h, i * 0.25, 0.38, i * 0.25 + 0.25, 0.52), fill=0)
    d.rectangle(_box(w, h, 0.46, 0.3, 0.54, 0.9), fill=255)
    d.arc(_box(w, h, 0.26, 0.76, 0.54, 1), 0, 180, fill=255, width=max(1, round(0.08 * w)))


def _fish(d: ImageDraw.ImageDraw, w: int, h: int) -> None:
    d.polygon(_pts(w, h, [(0, 0.08), (0.38, 0.5), (0, 0.92)]), fill=255)
    d.ellipse(_box(w, h, 0.22, 0.12, 1, 0.88), fill=255)
    d.ellipse(_box(w, h, 0.74, 0.3, 0.84, 0.46), fill=0)


def _bell(d: ImageDraw.ImageDraw, w: int, h: int) -> None:
    d.ellipse(_box(w, h, 0.43, 0, 0.57, 0.14), fill=255)
    d.ellipse(_box(w, h, 0.2, 0.08, 0.8, 0.6), fill=255)
    d.polygon(_pts(w, h, [(0.2, 0.34), (0.8, 0.34), (0.9, 0.72), (1, 0.84), (0, 0.84), (0.1, 0.72)]), fill=255)
    d.ellipse(_box(w, h, 0.38, 0.8, 0.62, 1), fill=255)


def _boat(d: ImageDraw.ImageDraw, w: int, h: int) -> None:
    d.polygon(_pts(w, h, [(0, 0.66), (1, 0.66), (0.82, 1), (0.18, 1)]), fill=255)
    d.rectangle(_box(w, h, 0.44, 0, 0.5, 0.66), fill=255)
    d.polygon(_pts(w, h, [(0.56, 0.04), (0.56, 0.58), (0.95, 0.58)]), fill=255)
    d.polygon(_pts(w, h, [(0.38, 0.14), (0.38, 0.58), (0.1, 0.58)]), fill=255)


_DRAW: dict[str, Callable[[ImageDraw.ImageDraw, int, int], None]] = {
    "circle": _circle, "square": _square, "triangle": _triangle, "star": _star, "heart": _heart,
    "cross": _cross, "ring": _ring, "diamond": _diamond, "arrow": _arrow, "moon": _moon, "hexagon": _hexagon,
    "car": _car, "tree": _tree, "house": _house, "cup": _cup, "key": _key, "umbrella": _umbrella,
    "fish": _fish, "bell": _bell, "boat": _boat,
}
# Width / height of each silhouette's box; the longest side gets the sampled size.
_ASPECT: dict[str, float] = {
    "circle": 1.0, "square": 1.0, "triangle": 1.1, "star": 1.0, "heart": 1.05, "cross": 1.0, "ring": 1.0,
    "diamond": 0.7, "arrow": 1.7, "moon": 1.0, "hexagon": 1.12, "car": 1.7, "tree": 0.75, "house": 0.95,
    "cup": 1.1, "key": 2.2, "umbrella": 1.0, "fish": 1.6, "bell": 0.95, "boat": 1.1,
}
# Asymmetric silhouettes are mirrored at random, so direction is no cue to the category.
_MIRROR = frozenset({"arrow", "moon", "car", "cup", "key", "fish", "boat"})
# Mild random stretch (log-scale), small enough that proportions still identify the silhouette.
_ASPECT_JITTER = 0.12

assert set(_DRAW) == set(CATEGORIES) == set(_ASPECT) == set(TYPICAL_COLOUR) == set(POPULARITY_ORDER)


def _silhouette(category: str, w: int, h: int, mirror: bool) -> np.ndarray:
    img = Image.new("L", (w, h), 0)
    _DRAW[category](ImageDraw.Draw(img), w, h)
    if mirror:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(img) > 127


# ---------------------------------------------------------------------------------------------------------------
# Category sampling and the world's statistics.


@functools.lru_cache(maxsize=1)
def _category_prior() -> np.ndarray:
    weights = np.zeros(len(CATEGORIES))
    for rank, cat in enumerate(POPULARITY_ORDER):
        weights[CATEGORIES.index(cat)] = 1.0 / (rank + 1) ** ZIPF_EXPONENT
    return weights / weights.sum()


def _sample_categories(rng: np.random.Generator) -> list[str]:
    """The categories (with repeats for multiple instances) of one scene, before placement."""
    prior = _category_prior()
    target = 1 + int(rng.choice(MAX_OBJECTS, p=COUNT_WEIGHTS))
    cats: list[str] = []
    while len(cats) < target:
        cat = CATEGORIES[int(rng.choice(len(CATEGORIES), p=prior))]
        partner = PARTNER.get(cat)
        add_partner = partner is not None and partner not in cats and rng.random() < PARTNER_PROB
        if add_partner and len(cats) + 2 > MAX_OBJECTS:
            continue  # no room for the pair: resample rather than break the group statistics
        cats.append(cat)
        if add_partner:
            cats.append(partner)
        if len(cats) < MAX_OBJECTS and rng.random() < DUPLICATE_PROB:
            cats.append(cat)
    return cats


@functools.lru_cache(maxsize=1)
def _stats() -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    rng = np.random.default_rng(_STATS_SEED)
    present = np.zeros((_STATS_SAMPLES, len(CATEGORIES)), dtype=bool)
    for i in range(_STATS_SAMPLES):
        for cat in _sample_categories(rng):
            present[i, CATEGORIES.index(cat)] = True
    freq = present.mean(axis=0)
    joint = present.T.astype(np.float64) @ present.astype(np.float64)
    counts = present.sum(axis=0).astype(np.float64)
    frequencies = {c: float(freq[i]) for i, c in enumerate(CATEGORIES)}
    co = {
        a: {b: float(joint[i, j] / max(counts[i], 1.0)) for j, b in enumerate(CATEGORIES) if b != a}
        for i, a in enumerate(CATEGORIES)
    }
    return frequencies, co


def category_frequencies() -> dict[str, float]:
    """The world's prior over categories: P(category present in a scene), estimated once from a fixed stream of
    the scene sampler and cached. Values do not sum to 1 (a scene holds several categories)."""
    return dict(_stats()[0])


def cooccurrence() -> dict[str, dict[str, float]]:
    """P(b present | a present) for every pair a != b, as `cooccurrence()[a][b]`, estimated once (cached)."""
    return {a: dict(row) for a, row in _stats()[1].items()}


# ---------------------------------------------------------------------------------------------------------------
# Backgrounds: muted mid-grey tones with texture, never close to an object colour.


@functools.lru_cache(maxsize=1)
def _noise_bank() -> tuple[np.ndarray, np.ndarray]:
    """Fixed fine noise and smooth (blobby) noise fields, both zero-mean unit-scale, cropped at random offsets."""
    rng = np.random.default_rng(7)
    fine = rng.standard_normal((1024, 1024)).astype(np.float32)
    coarse = rng.standard_normal((32, 32)).astype(np.float32)
    smooth = np.asarray(Image.fromarray(coarse, mode="F").resize((1024, 1024), Image.Resampling.BICUBIC))
    smooth = smooth / (smooth.std() + 1e-6)
    return fine, smooth.astype(np.float32)


def _crop(field_: np.ndarray, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    reps = (math.ceil(h / field_.shape[0]), math.ceil(w / field_.shape[1]))
    if reps != (1, 1):
        field_ = np.tile(field_, reps)
    y = int(rng.integers(0, field_.shape[0] - h + 1))
    x = int(rng.integers(0, field_.shape[1] - w + 1))
    return field_[y : y + h, x : x + w]


def _muted(rng: np.random.Generator) -> np.ndarray:
    grey = rng.uniform(85, 170)
    return np.clip(grey + rng.uniform(-18, 18, size=3), *BACKGROUND_RANGE)


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
    """The background image and its pattern name (an entry of BACKGROUND_PATTERNS)."""
    kind = int(rng.integers(0, len(BACKGROUND_PATTERNS)))
    a = _muted(rng)
    # The second tone differs mostly in lightness, so textures stay grey rather than turning into colours.
    b = np.clip(a + rng.uniform(-32, 32) + rng.uniform(-8, 8, size=3), *BACKGROUND_RANGE)
    if kind == 0:  # plain
        img = np.broadcast_to(a, (size, size, 3)).astype(np.float32)
    elif kind == 1:  # gradient along a random direction
        angle = rng.uniform(0, 2 * math.pi)
        t = np.linspace(-0.5, 0.5, size, dtype=np.float32)
        proj = math.cos(angle) * t[None, :] + math.sin(angle) * t[:, None] + 0.5
        img = a + (b - a) * np.clip(proj, 0, 1)[..., None]
    elif kind == 2:  # stripes
        period = rng.uniform(10, 40) * size / BASE_SIZE
        angle = rng.choice([0.0, math.pi / 2, math.pi / 4, -math.pi / 4])
        idx = np.arange(size, dtype=np.float32)
        proj = math.cos(angle) * idx[None, :] + math.sin(angle) * idx[:, None]
        on = (np.floor(proj / period).astype(np.int64) % 2).astype(bool)
        img = np.where(on[..., None], b, a).astype(np.float32)
    elif kind == 3:  # checker
        cell = max(4, int(rng.uniform(14, 48) * size / BASE_SIZE))
        idx = np.arange(size) // cell
        on = ((idx[None, :] + idx[:, None]) % 2).astype(bool)
        img = np.where(on[..., None], b, a).astype(np.float32)
    else:  # smooth noise
        smooth = _crop(_noise_bank()[1], rng, size, size)
        img = a + smooth[..., None] * (b - a) * 0.35
    return np.asarray(img, dtype=np.float32), BACKGROUND_PATTERNS[kind]


def _tone(background: np.ndarray) -> str:
    grey = float(background.mean())
    for name, bound in zip(BACKGROUND_TONES, BACKGROUND_TONE_BOUNDS):
        if grey < bound:
            return name
    return BACKGROUND_TONES[-1]


# ---------------------------------------------------------------------------------------------------------------
# Scene generation.


def _scene_rng(world_seed: int, index: int) -> np.random.Generator:
    if world_seed < 0 or index < 0:
        raise ValueError(f"world_seed and index must be >= 0, got {world_seed}, {index}")
    return np.random.default_rng(np.random.SeedSequence([world_seed, index, 0x5CE7E]))


def _pick_colour(rng: np.random.Generator, category: str) -> str:
    if rng.random() < TYPICAL_COLOUR_PROB:
        return TYPICAL_COLOUR[category]
    names = list(COLOURS)
    return names[int(rng.integers(0, len(names)))]


def generate_scene(world_seed: int, index: int, size: int = BASE_SIZE) -> Scene:
    """Generate scene `index` of world `world_seed` as a `size` x `size` RGB image with its exact truth.

    A pure function of its arguments. Objects that cannot be placed keeping every object at least
    MIN_VISIBLE_FRACTION visible are dropped, so every object in the truth is clearly visible.
    """
    if size < 64:
        raise ValueError(f"size must be at least 64 pixels, got {size}")
    rng = _scene_rng(world_seed, index)
    scale = size / BASE_SIZE
    cats = _sample_categories(rng)
    cats = [cats[i] for i in rng.permutation(len(cats))]
    img, pattern = _background(rng, size)
    tone = _tone(img)
    owner = np.full((size, size), -1, dtype=np.int16)
    placed: list[tuple[str, str, int]] = []  # category, colour, drawn area
    visible: list[int] = []  # pixels of each placed object still visible
    min_pixels = MIN_VISIBLE_PIXELS * scale * scale
    for cat in cats:
        colour = _pick_colour(rng, cat)
        small = rng.random() < SMALL_PROB
        lo, hi = SMALL_RANGE if small else NORMAL_RANGE
        longest = math.exp(rng.uniform(math.log(lo), math.log(hi))) * scale
        aspect = _ASPECT[cat] * math.exp(rng.uniform(-_ASPECT_JITTER, _ASPECT_JITTER))
        mirror = cat in _MIRROR and rng.random() < 0.5
        for attempt in range(PLACEMENT_TRIES):
            if attempt >= PLACEMENT_TRIES // 2:
                longest *= 0.85  # crowded scene: shrink before giving up
            w = max(6, round(longest if aspect >= 1 else longest * aspect))
            h = max(6, round(longest / aspect if aspect >= 1 else longest))
            short = min(w, h)
            if short < MIN_SIDE * scale:  # too thin to read: grow to the minimum short side
                w, h = round(w * MIN_SIDE * scale / short), round(h * MIN_SIDE * scale / short)
            w, h = min(w, size - 4), min(h, size - 4)
            x = int(rng.integers(2, size - w - 1))
            y = int(rng.integers(2, size - h - 1))
            m = _silhouette(cat, w, h, mirror)
            region = owner[y : y + h, x : x + w]
            covered = np.bincount(region[m].astype(np.int64) + 1, minlength=len(placed) + 1)[1:]
            ok = all(
                visible[j] - covered[j] >= max(MIN_VISIBLE_FRACTION * placed[j][2], min_pixels)
                for j in np.flatnonzero(covered)
            )
            if ok:
                break
        else:
            continue  # could not place without hiding another object: drop it
        region[m] = len(placed)
        rgb = np.array(COLOURS[colour], dtype=np.float32) + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, size=3)
        sub = img[y : y + h, x : x + w]
        sub[m] = rgb
        if min(w, h) >= RIM_MIN_SIDE * scale:
            # A darker rim keeps touching objects of the same colour apart; small objects get none, since on
            # them it would cover most pixels and hide the colour.
            inner = np.zeros_like(m)
            inner[1:-1, 1:-1] = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
            sub[m & ~inner] = rgb * RIM_SHADE
        for j in np.flatnonzero(covered):
            visible[j] -= int(covered[j])
        placed.append((cat, colour, int(m.sum())))
        visible.append(int(m.sum()))
    img += _crop(_noise_bank()[0], rng, size, size)[..., None] * PIXEL_NOISE
    image = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="RGB")
    objects = []
    for i, (cat, colour, _) in enumerate(placed):
        mask = owner == i
        ys, xs = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
        mask.flags.writeable = False
        box = (int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1)
        objects.append(WorldObject(category=cat, colour=colour, box=box, mask=mask, area=int(mask.sum())))
    return Scene(world_seed=world_seed, index=index, image=image, objects=tuple(objects), background=pattern,
                 background_tone=tone)


def iter_scenes(world_seed: int, n: int, start: int = 0, size: int = BASE_SIZE) -> Iterator[Scene]:
    """Scenes `start` .. `start + n - 1` of world `world_seed`."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    for index in range(start, start + n):
        yield generate_scene(world_seed, index, size)
