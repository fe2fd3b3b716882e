"""FGSynth: a built-in, procedurally generated fine-grained image dataset (numpy only, deterministic by seed).

Every image shows the same kind of object ("birds" or "cars") with the same layout and the same nuisance
factors drawn at random for every image: position, scale, rotation, mirror, body colours, background texture,
lighting and sensor noise. Classes differ *only* in one small part of the object (at most 10 % of its area):
the part's shape, its two-colour pattern and, past 40 classes, where on the object it sits. The part's two
colours are drawn at random per image from one distribution shared by all classes, so global colour
statistics carry no class information; a model has to find the part and read its shape and pattern.
Class `k` is numbered so that neighbouring classes form confusable groups: within a group of five, classes
share shape and placement and differ in the pattern alone. Numbering is mixed radix, pattern fastest: pattern
`k % 5`, shape `(k // 5) % 8`, placement `k // 40`, so classes 0–39 share the first placement and 200 classes
exist per variant. `first_class=F` draws classes F … F+K−1 instead of 0 … K−1 (labels still run 0 … K−1, names
keep the global number): a set of classes disjoint from the default ones, e.g. for pretraining a backbone that
never saw the evaluated classes. Classes 0 … K−1 are drawn exactly as before whatever `first_class` allows.

Difficulty (default: birds, 20 classes, 150 train / 50 test per class, 32 px): the `cpu-small` FD² teacher
(ConvNet-BN of three blocks, width 32, CAL, 20 epochs with AdamW at batch 16) reaches about 75 % test accuracy
(77 % on seed 0), a plain-CE teacher with the same schedule about 70 %. Global colour histograms stay at chance.
The `Nuisance` defaults are calibrated so that this teacher finds the part within a couple of minutes on two CPU
cores; stronger nuisance (e.g. `Nuisance(scale=(0.30, 0.35), shift=0.05, rotation_deg=10, part_angle_deg=10)`)
makes the part much slower to find.

Shapes are signed distance functions evaluated on every pixel, so edges are anti-aliased analytically without
supersampling, and all images of a chunk are drawn at once with array operations.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

Variant = Literal["birds", "cars"]
VARIANTS: tuple[str, ...] = ("birds", "cars")

PATTERNS: tuple[str, ...] = ("solid", "front", "top", "quarters", "stripes")
SHAPES: dict[str, tuple[str, ...]] = {
    "birds": ("disc", "bar", "spike", "ring", "cross", "pair", "stack", "triangle"),
    "cars": ("bar", "disc", "pair", "spike", "ring", "stack", "cross", "triangle"),
}
PLACEMENTS: dict[str, tuple[str, ...]] = {
    "birds": ("crest", "throat", "nape", "cheek", "tail"),
    "cars": ("headlight", "door", "roof", "taillight", "hood"),
}
MAX_CLASSES = len(PATTERNS) * len(SHAPES["birds"]) * len(PLACEMENTS["birds"])
MIN_IMAGE_SIZE = 16
_CHUNK = 512


@dataclass(frozen=True)
class ClassRecipe:
    """What tells one class apart: the part's shape, its pattern and its placement on the object."""

    name: str
    shape: str
    pattern: str
    placement: str

    @property
    def key(self) -> str:
        return f"{self.placement}/{self.shape}/{self.pattern}"


@dataclass
class FGSynthSplit:
    """Images `[N, S, S, 3]` uint8, labels `[N]` int64, and (when asked for) the rendering masks in [0, 1]."""

    images: np.ndarray
    labels: np.ndarray
    object_masks: np.ndarray | None = None
    part_masks: np.ndarray | None = None


@dataclass
class FGSynthData:
    """A generated dataset: class names, recipes and the train and test splits."""

    classes: list[str]
    recipes: list[ClassRecipe]
    train: FGSynthSplit
    test: FGSynthSplit
    variant: str
    seed: int
    image_size: int
    params: dict[str, object] = field(default_factory=dict)

    @property
    def train_images(self) -> np.ndarray:
        return self.train.images

    @property
    def train_labels(self) -> np.ndarray:
        return self.train.labels

    @property
    def test_images(self) -> np.ndarray:
        return self.test.images

    @property
    def test_labels(self) -> np.ndarray:
        return self.test.labels


def class_recipes(num_classes: int, variant: str = "birds", first_class: int = 0) -> list[ClassRecipe]:
    """Recipes of classes `first_class` … `first_class + num_classes − 1`: pattern varies fastest, then shape,
    then placement (mixed radix). Names carry the global number, zero-padded so they sort in label order."""
    _check_variant(variant)
    if not 2 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"num_classes must be in [2, {MAX_CLASSES}]")
    if not 0 <= first_class <= MAX_CLASSES - num_classes:
        raise ValueError(f"first_class must be in [0, {MAX_CLASSES - num_classes}] for {num_classes} classes "
                         f"(at most {MAX_CLASSES} classes exist)")
    shapes, placements = SHAPES[variant], PLACEMENTS[variant]
    width = len(str(first_class + num_classes - 1))
    recipes = []
    for k in range(first_class, first_class + num_classes):
        pattern = PATTERNS[k % len(PATTERNS)]
        shape = shapes[(k // len(PATTERNS)) % len(shapes)]
        placement = placements[k // (len(PATTERNS) * len(shapes))]
        name = f"{k:0{width}d}_{placement}_{shape}_{pattern}"
        recipes.append(ClassRecipe(name, shape, pattern, placement))
    return recipes


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown fgsynth variant {variant!r}; choose one of {', '.join(VARIANTS)}")


# ---------------------------------------------------------------- signed distances (negative inside, in units)

def _sd_box(u: np.ndarray, v: np.ndarray, hx: float, hy: float, r: float = 0.0) -> np.ndarray:
    qx = np.abs(u) - (hx - r)
    qy = np.abs(v) - (hy - r)
    outside = np.hypot(np.maximum(qx, 0.0), np.maximum(qy, 0.0))
    return outside + np.minimum(np.maximum(qx, qy), 0.0) - r


def _sd_ellipse(u: np.ndarray, v: np.ndarray, a: float, b: float) -> np.ndarray:
    """First-order distance to an ellipse: exact enough for one-pixel anti-aliasing."""
    k = np.hypot(u / a, v / b)
    return (k - 1.0) * min(a, b)


def _sd_disc(u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    return np.hypot(u, v) - r


def _sd_triangle(u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Equilateral triangle pointing up (Inigo Quilez's exact formula)."""
    k = np.sqrt(3.0)
    px = np.abs(u) - r
    py = v + r / k
    fold = px + k * py > 0
    px, py = np.where(fold, (px - k * py) / 2, px), np.where(fold, (-k * px - py) / 2, py)
    px = px - np.clip(px, -2 * r, 0.0)
    return -np.hypot(px, py) * np.sign(py)


# Shapes are told apart by their coarse silhouette (round, long, upright, crossed, holed, doubled), because a
# part covers only a few dozen pixels at 32 px: finer outlines (square vs disc) would not survive.
_UNIT_SHAPES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "disc": lambda u, v: _sd_disc(u, v, 1.0),
    "bar": lambda u, v: _sd_box(u, v, 1.6, 0.5, 0.15),
    "spike": lambda u, v: _sd_box(u, v, 0.5, 1.6, 0.15),
    "cross": lambda u, v: np.minimum(_sd_box(u, v, 1.4, 0.4), _sd_box(u, v, 0.4, 1.4)),
    "ring": lambda u, v: np.abs(np.hypot(u, v) - 1.0) - 0.38,
    "pair": lambda u, v: np.minimum(_sd_disc(u - 1.0, v, 0.62), _sd_disc(u + 1.0, v, 0.62)),
    "stack": lambda u, v: np.minimum(_sd_disc(u, v - 1.0, 0.62), _sd_disc(u, v + 1.0, 0.62)),
    "triangle": lambda u, v: _sd_triangle(u, v + 0.3, 1.5),
}


@cache
def _shape_geometry(shape: str) -> tuple[float, float, float]:
    """(scale, half width, half height): the scale gives every shape the area of the unit disc, so size never
    reveals the class; the half extents (after scaling) let patterns split each shape's own box."""
    grid = np.linspace(-2.5, 2.5, 501)
    u, v = np.meshgrid(grid, grid)
    inside = _UNIT_SHAPES[shape](u, v) < 0
    scale = float(np.sqrt(inside.mean() * 25.0 / np.pi))
    return scale, float(np.abs(u[inside]).max() / scale), float(np.abs(v[inside]).max() / scale)


def _part_sdf(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Equal-area shape (area pi) in part units."""
    c = _shape_geometry(shape)[0]
    return _UNIT_SHAPES[shape](u * c, v * c) / c


def _pattern_weight(shape: str, pattern: str, u: np.ndarray, v: np.ndarray, px: np.ndarray) -> np.ndarray:
    """Weight of the second part colour. Patterns split the shape's own box, so each stays distinct when its
    two colours swap; `px` converts part units to pixels for soft (anti-aliased) edges."""
    _, hu, hv = _shape_geometry(shape)
    if pattern == "solid":
        return np.zeros_like(u)
    if pattern == "front":
        edge = -u
    elif pattern == "top":
        edge = -v
    elif pattern == "quarters":
        edge = -np.sign(u * v) * np.minimum(np.abs(u), np.abs(v))
    elif pattern == "stripes":
        k = 3 * np.pi / (2 * hu)
        edge = -np.sin(k * (u + hu)) / k
    else:
        raise ValueError(f"unknown pattern {pattern!r}")
    return np.clip(0.5 - edge * px, 0.0, 1.0)


# ---------------------------------------------------------------- nuisance and object geometry

@dataclass(frozen=True)
class Nuisance:
    """Ranges of the factors drawn independently of the class for every image (the defaults are FGSynth).

    Sizes are shares of the image side, so an image looks the same at any resolution.
    """

    scale: tuple[float, float] = (0.33, 0.35)  # pixels per object unit (an object is about 2.8 units long)
    shift: float = 0.02  # largest offset of the object's centre from the image centre
    rotation_deg: float = 4.0  # largest in-plane rotation (cars turn at most half as much)
    part_area: float = 0.095  # class part's area as a share of the object's (never above 0.1)
    part_angle_deg: float = 4.0  # the part's own wobble around its place on the object
    gain: tuple[float, float] = (0.7, 1.2)  # global brightness
    gradient: float = 0.25  # strength of a linear light falloff across the image
    noise: float = 0.02  # largest standard deviation of Gaussian pixel noise, in [0, 1] units
    texture: float = 0.3  # largest weight of the striped wave in the background texture

    def __post_init__(self) -> None:
        if not 0 < self.part_area <= 0.1:
            raise ValueError("part_area must be in (0, 0.1]: the class part stays small")


def _bird_layers(u: np.ndarray, v: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "tail": _sd_ellipse(u + 1.0, v - 0.05, 0.42, 0.16),
        "body": _sd_ellipse(u, v, 0.95, 0.6),
        "wing": _sd_ellipse(u + 0.15, v - 0.08, 0.58, 0.3),
        "head": _sd_disc(u - 0.9, v - 0.45, 0.42),
        "eye": _sd_disc(u - 1.02, v - 0.52, 0.07),
    }


def _car_layers(u: np.ndarray, v: np.ndarray) -> dict[str, np.ndarray]:
    wheels = np.minimum(_sd_disc(u - 0.72, v + 0.34, 0.27), _sd_disc(u + 0.72, v + 0.34, 0.27))
    hubs = np.minimum(_sd_disc(u - 0.72, v + 0.34, 0.1), _sd_disc(u + 0.72, v + 0.34, 0.1))
    return {
        "cabin": _sd_box(u + 0.1, v - 0.45, 0.62, 0.3, 0.18),
        "window": _sd_box(u + 0.1, v - 0.47, 0.5, 0.2, 0.1),
        "body": _sd_box(u, v, 1.25, 0.3, 0.12),
        "wheels": wheels,
        "hubs": hubs,
    }


@dataclass(frozen=True)
class _Body:
    """One object kind: its layers, the layers forming its silhouette, its centre and the part placements."""

    layers: Callable[[np.ndarray, np.ndarray], dict[str, np.ndarray]]
    silhouette: tuple[str, ...]
    centre: tuple[float, float]  # object point put at the drawn image position (middle of its extent)
    placements: dict[str, tuple[float, float]]
    rotation_share: float


_BODIES: dict[str, _Body] = {
    "birds": _Body(
        _bird_layers, ("tail", "body", "head"), (0.0, 0.3),
        {"crest": (0.9, 0.95), "throat": (1.02, 0.02), "nape": (0.5, 0.78), "cheek": (1.0, 0.38),
         "tail": (-1.2, 0.1)},
        1.0,
    ),
    "cars": _Body(
        _car_layers, ("cabin", "body", "wheels"), (0.0, 0.15),
        {"headlight": (1.12, 0.06), "door": (0.05, 0.0), "roof": (-0.1, 0.72), "taillight": (-1.14, 0.06),
         "hood": (0.78, 0.3)},
        0.5,
    ),
}


@cache
def _object_area(variant: str) -> float:
    """Area of the object's silhouette in object units squared, measured once on a fine grid."""
    body = _BODIES[variant]
    grid = np.linspace(-2.0, 2.0, 401)
    u, v = np.meshgrid(grid, grid)
    layers = body.layers(u, v)
    inside = np.min([layers[name] for name in body.silhouette], axis=0) < 0
    return float(inside.mean() * 16.0)


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV in [0, 1] to RGB `[..., 3]`."""
    i = (np.floor(h * 6.0) % 6).astype(np.int64)
    f = h * 6.0 - np.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = np.stack([
        np.stack([v, t, p], -1), np.stack([q, v, p], -1), np.stack([p, v, t], -1),
        np.stack([p, q, v], -1), np.stack([t, p, v], -1), np.stack([v, p, q], -1),
    ])
    return np.take_along_axis(table, i[None, ..., None].repeat(3, -1), 0)[0]


def _random_colours(
    rng: np.random.Generator, n: int, s_range: tuple[float, float] = (0.15, 0.95),
    v_range: tuple[float, float] = (0.2, 0.95),
) -> np.ndarray:
    return _hsv_to_rgb(rng.random(n), rng.uniform(*s_range, n), rng.uniform(*v_range, n)).astype(np.float32)


def _draw_factors(rng: np.random.Generator, n: int, body: _Body, nz: Nuisance) -> dict[str, np.ndarray]:
    """Per-image random factors of one split: small arrays, drawn before any pixel, independent of class."""
    u = rng.uniform
    rotation = nz.rotation_deg * body.rotation_share
    d: dict[str, np.ndarray] = {
        "scale": u(*nz.scale, n),
        "cx": 0.5 + u(-nz.shift, nz.shift, n),
        "cy": 0.5 + u(-nz.shift, nz.shift, n),
        "angle": np.deg2rad(u(-rotation, rotation, n)),
        "mirror": np.where(rng.random(n) < 0.5, -1.0, 1.0),
        "part_angle": np.deg2rad(u(-nz.part_angle_deg, nz.part_angle_deg, n)),
        "part_area": u(0.9, 1.0, n) * nz.part_area,
        "body_rgb": _random_colours(rng, n),
        "head_mix": u(0.0, 0.6, n),
        "head_rgb": _random_colours(rng, n),
        "wing_rgb": _random_colours(rng, n, v_range=(0.1, 0.9)),
        "wing_stripe": u(0.0, 1.0, n) * (rng.random(n) < 0.5),
        "wing_freq": u(5.0, 12.0, n),
        "wing_phase": u(0, 2 * np.pi, n),
        "bg_a": _random_colours(rng, n, v_range=(0.15, 1.0)),
        "bg_b": _random_colours(rng, n, v_range=(0.15, 1.0)),
        "bg_grid": rng.random((n, 6, 6)).astype(np.float32),
        "bg_freq": u(5.0, 28.0, n),
        "bg_dir": u(0, np.pi, n),
        "bg_phase": u(0, 2 * np.pi, n),
        "bg_wave": u(0.0, nz.texture, n),
        "horizon": u(0.55, 0.8, n),
        "gain": u(*nz.gain, n),
        "gradient": u(0.0, nz.gradient, n),
        "light_dir": u(0, 2 * np.pi, n),
        "cast": u(0.9, 1.1, (n, 3)),
        "noise": u(0.0, nz.noise, n),
    }
    # Two part colours on opposite sides of mid-brightness, so the part's pattern always shows.
    light_first = rng.random(n) < 0.5
    dark = _random_colours(rng, n, v_range=(0.05, 0.4))
    light = _random_colours(rng, n, s_range=(0.0, 0.8), v_range=(0.7, 1.0))
    d["part_a"] = np.where(light_first[:, None], light, dark)
    d["part_b"] = np.where(light_first[:, None], dark, light)
    return d


def _interp_matrix(size: int, cells: int) -> np.ndarray:
    """Bilinear upsampling of `cells` control points to `size` pixels, as a matrix."""
    pos = (np.arange(size) + 0.5) / size * (cells - 1)
    lo = np.clip(np.floor(pos).astype(int), 0, cells - 2)
    frac = pos - lo
    m = np.zeros((size, cells), dtype=np.float32)
    m[np.arange(size), lo] = 1 - frac
    m[np.arange(size), lo + 1] = frac
    return m


def _coverage(sd_units: np.ndarray, px_per_unit: np.ndarray) -> np.ndarray:
    """Pixel coverage of a shape from its signed distance (half-pixel linear ramp)."""
    return np.clip(0.5 - sd_units * px_per_unit, 0.0, 1.0).astype(np.float32)


def _over(img: np.ndarray, alpha: np.ndarray, colour: np.ndarray | float) -> np.ndarray:
    a = alpha[..., None]
    return img * (1 - a) + colour * a


def _render_chunk(
    variant: str, recipes: list[ClassRecipe], labels: np.ndarray, d: dict[str, np.ndarray], size: int,
    noise_rng: np.random.Generator, with_masks: bool,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    n = len(labels)
    col = lambda key: d[key][:, None, None, :].astype(np.float32)  # noqa: E731 - [n,1,1,3] colour
    sca = lambda key: d[key][:, None, None].astype(np.float32)  # noqa: E731 - [n,1,1] scalar
    grid = (np.arange(size, dtype=np.float32) + 0.5) / size
    ys, xs = np.meshgrid(grid, grid, indexing="ij")  # image coordinates in [0, 1]

    # background: bilinear blotches plus a soft wave mixing two colours; cars add a road below a horizon
    interp = _interp_matrix(size, 6)
    blotch = np.einsum("ij,njk,lk->nil", interp, d["bg_grid"], interp, optimize=True)
    phase = sca("bg_freq") * (xs * np.cos(sca("bg_dir")) + ys * np.sin(sca("bg_dir"))) + sca("bg_phase")
    texture = np.clip((1 - sca("bg_wave")) * blotch + sca("bg_wave") * (0.5 + 0.5 * np.sin(phase)), 0, 1)
    img = col("bg_a") * (1 - texture[..., None]) + col("bg_b") * texture[..., None]
    if variant == "cars":
        road = np.clip((ys - sca("horizon")) * size + 0.5, 0, 1)[..., None]
        img = img * (1 - road) + (0.25 + 0.4 * col("bg_b") * texture[..., None]) * road

    # object frame: u forward (mirrored), v up, in object units; `px` = pixels per object unit
    body_spec = _BODIES[variant]
    px = sca("scale") * size
    dx, dy = (xs - sca("cx")) * size, (ys - sca("cy")) * size
    cos, sin = np.cos(sca("angle")), np.sin(sca("angle"))
    u = (dx * cos + dy * sin) * sca("mirror") / px + body_spec.centre[0]
    v = (dx * sin - dy * cos) / px + body_spec.centre[1]
    sd = body_spec.layers(u, v)
    alpha = {name: _coverage(value, px) for name, value in sd.items()}
    body_rgb = col("body_rgb")
    if variant == "birds":
        stripes = sca("wing_stripe") * (0.5 + 0.5 * np.sin(sca("wing_freq") * u + sca("wing_phase")))
        wing_rgb = col("wing_rgb") * (1 - 0.7 * stripes[..., None])
        mix = sca("head_mix")[..., None]
        img = _over(img, alpha["tail"], body_rgb * 0.8)
        img = _over(img, alpha["body"], body_rgb)
        img = _over(img, alpha["wing"], wing_rgb)
        img = _over(img, alpha["head"], body_rgb * (1 - mix) + col("head_rgb") * mix)
        img = _over(img, alpha["eye"], 0.05)
    else:
        img = _over(img, alpha["cabin"], body_rgb)
        img = _over(img, alpha["window"], 0.15 + 0.35 * col("wing_rgb"))
        img = _over(img, alpha["body"], body_rgb)
        img = _over(img, alpha["wheels"], 0.06)
        img = _over(img, alpha["hubs"], 0.5 + 0.3 * col("head_rgb"))

    # the class part: an equal-area shape covering `part_area` of the object, at its placement, same frame
    radius = np.sqrt(d["part_area"] * _object_area(variant) / np.pi).astype(np.float32)[:, None, None]
    part_alpha = np.zeros((n, size, size), dtype=np.float32)
    part_colour = np.zeros((n, size, size, 3), dtype=np.float32)
    keys = np.array([recipes[k].key for k in labels])
    pa, pb = col("part_a"), col("part_b")
    pcos, psin = np.cos(sca("part_angle")), np.sin(sca("part_angle"))
    for key in sorted(set(keys.tolist())):
        idx = np.flatnonzero(keys == key)
        placement, shape, pattern = key.split("/")
        ox, oy = body_spec.placements[placement]
        ru, rv = u[idx] - ox, v[idx] - oy
        pu = (ru * pcos[idx] + rv * psin[idx]) / radius[idx]
        pv = (-ru * psin[idx] + rv * pcos[idx]) / radius[idx]
        px_part = px[idx] * radius[idx]
        part_alpha[idx] = _coverage(_part_sdf(shape, pu, pv), px_part)
        w = _pattern_weight(shape, pattern, pu, pv, px_part)[..., None]
        part_colour[idx] = pa[idx] * (1 - w) + pb[idx] * w
    img = img * (1 - part_alpha[..., None]) + part_colour * part_alpha[..., None]

    # lighting (gain, linear falloff, colour cast) and sensor noise
    lx = (xs - 0.5) * np.cos(sca("light_dir")) + (ys - 0.5) * np.sin(sca("light_dir"))
    light = sca("gain") * (1 + sca("gradient") * lx)
    img = img * light[..., None] * d["cast"][:, None, None, :].astype(np.float32)
    img = img + noise_rng.standard_normal(img.shape, dtype=np.float32) * sca("noise")[..., None]
    images = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    if not with_masks:
        return images, None, None
    silhouette = [alpha[name] for name in body_spec.silhouette]
    obj = 1 - np.prod([1 - layer for layer in [*silhouette, part_alpha]], axis=0)
    return images, obj.astype(np.float32), part_alpha


def render(
    labels: np.ndarray,
    num_classes: int,
    image_size: int = 32,
    seed: int = 0,
    variant: str = "birds",
    stream: int = 0,
    nuisance: Nuisance | None = None,
    with_masks: bool = False,
    first_class: int = 0,
) -> FGSynthSplit:
    """Draw one image per label (label `j` shows class `first_class + j`). The nuisance factors of image `i`
    depend on (seed, variant, stream, number of images, i) and never on the labels or `first_class`: the same
    call with other labels changes the class parts only."""
    _check_variant(variant)
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE}")
    recipes = class_recipes(num_classes, variant, first_class)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError("labels must be in [0, num_classes)")
    nuisance = nuisance or Nuisance()
    size, n = image_size, len(labels)
    root = np.random.SeedSequence([int(seed), VARIANTS.index(variant), 0x46_44_32, int(stream)])
    factor_seq, noise_seq = root.spawn(2)
    draws = _draw_factors(np.random.default_rng(factor_seq), n, _BODIES[variant], nuisance)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    object_masks = np.empty((n, size, size), dtype=np.float32) if with_masks else None
    part_masks = np.empty((n, size, size), dtype=np.float32) if with_masks else None
    chunk = max(16, _CHUNK * 32 * 32 // (size * size))
    for start, chunk_seq in zip(range(0, n, chunk), noise_seq.spawn(max(1, -(-n // chunk))), strict=False):
        sl = slice(start, min(n, start + chunk))
        values = {key: value[sl] for key, value in draws.items()}
        imgs, obj, part = _render_chunk(
            variant, recipes, labels[sl], values, size, np.random.default_rng(chunk_seq), with_masks
        )
        images[sl] = imgs
        if object_masks is not None and part_masks is not None:
            object_masks[sl], part_masks[sl] = obj, part
    return FGSynthSplit(images, labels, object_masks, part_masks)


def generate(
    num_classes: int = 20,
    image_size: int = 32,
    train_per_class: int = 150,
    test_per_class: int = 50,
    seed: int = 0,
    variant: str = "birds",
    with_masks: bool = False,
    nuisance: Nuisance | None = None,
    first_class: int = 0,
) -> FGSynthData:
    """Generate FGSynth (see the module docstring); the same arguments always give the same arrays.

    Labels are sorted (class 0 first). `with_masks` also returns per-image object and class-part coverage
    masks (to check the part's share); `nuisance` changes the ranges of the class-independent factors;
    `first_class` shifts the drawn classes to `first_class` … `first_class + num_classes − 1` (labels stay
    0 … num_classes − 1). Use another `seed` as well when the images must not share their nuisance draws
    (pose, colours, background) with a set of the same size.
    """
    if train_per_class < 1 or test_per_class < 0:
        raise ValueError("train_per_class must be >= 1 and test_per_class >= 0")
    recipes = class_recipes(num_classes, variant, first_class)
    common = {"num_classes": num_classes, "image_size": image_size, "seed": seed, "variant": variant,
              "nuisance": nuisance, "with_masks": with_masks, "first_class": first_class}
    classes = np.arange(num_classes, dtype=np.int64)
    train = render(np.repeat(classes, train_per_class), stream=0, **common)
    test = render(np.repeat(classes, test_per_class), stream=1, **common)
    params = {"num_classes": num_classes, "image_size": image_size, "train_per_class": train_per_class,
              "test_per_class": test_per_class, "seed": seed, "variant": variant, "first_class": first_class}
    return FGSynthData([r.name for r in recipes], recipes, train, test, variant, seed, image_size, params)


# ---------------------------------------------------------------- writers

def _png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _members(data: FGSynthData):
    for split_name, split in (("train", data.train), ("test", data.test)):
        counters: dict[int, int] = {}
        for image, label in zip(split.images, split.labels, strict=True):
            index = counters.get(int(label), 0)
            counters[int(label)] = index + 1
            yield f"{split_name}/{data.classes[int(label)]}/{index:05d}.png", image


def write_imagefolder(data: FGSynthData, out: str | Path) -> Path:
    """Write `out/train/<class>/*.png` and `out/test/<class>/*.png`; `out` must not exist or be empty.

    Written beside `out` first and renamed into place, so an interrupted write leaves no partial tree."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        for name, image in _members(data):
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(_png_bytes(image))
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def write_zip(data: FGSynthData, out: str | Path) -> Path:
    """Write the ImageFolder tree into one zip file (PNG members are stored, not recompressed)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp_name, "w", compression=zipfile.ZIP_STORED) as zf:
            for name, image in _members(data):
                zf.writestr(name, _png_bytes(image))
        os.replace(tmp_name, out)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return out


def write_fgsynth(out: str | Path, fmt: Literal["folder", "zip"] = "folder", **generate_kwargs: object) -> Path:
    """Generate FGSynth and write it as an ImageFolder tree or a zip of one (what `fd2 data fgsynth` runs)."""
    data = generate(**generate_kwargs)  # type: ignore[arg-type]
    if fmt == "folder":
        return write_imagefolder(data, out)
    if fmt == "zip":
        return write_zip(data, out)
    raise ValueError(f"fmt must be 'folder' or 'zip', not {fmt!r}")
