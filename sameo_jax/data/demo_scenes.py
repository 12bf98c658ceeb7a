"""Procedural amodal scenes: the embedded data set that needs no download.

`DemoSource(num_examples, image_size=256, seed=0)` is a random-access source (`len`, `[i]`)
of examples in the project's schema (numpy):

    {'image': uint8 [S, S, 3], 'image_id': int64, 'source': 'demo',
     'objects': {'amodal_mask': bool [N, S, S], 'visible_mask': bool [N, S, S],
                 'amodal_bbox': float32 [N, 4], 'visible_bbox': float32 [N, 4] (xyxy px),
                 'category_id': int64 [N] (1-based shape kind, see SHAPE_KINDS),
                 'occlusion_rate': float32 [N],
                 'order': int64 [N] (depth rank: 1 = drawn last, in front of all)}}

How a scene is made (the Amodal-LVIS recipe on procedural objects):
- Complete objects are textured shapes of regular families (ellipse, triangle, rounded
  rectangle, regular polygon, star, ring, cross, smooth blob) with random size, aspect ratio
  and rotation, filled with a random two-colour texture (stripes, checks, dots, gradient or
  smooth noise). Texture says nothing about where an object ends; the shape family's
  regularity (symmetry, straight edges, constant curvature) is what lets a model complete
  a hidden part.
- Backgrounds are smooth two-colour gradients with low-frequency noise and pixel noise.
- Examples come in pairs (2p, 2p + 1) drawn from one random stream per (seed, p). Example 2p
  is the occluded scene: 1-2 target objects, each with an occluder (another complete object
  of normalised size, aspect kept) placed by box with
  `sameo_jax.data.occluders.place_occluder` so that the hidden fraction of the target lies
  in `occlusion_range`; occluders never touch other objects, and 0-1 free objects. Example
  2p + 1 is its dual: the same background and the same targets and free objects,
  unoccluded (occlusion rate 0). So every occluded object also appears unoccluded, and the
  model is not pushed to over-predict occlusion. `dual=False` makes every example an
  occluded scene.
- Every instance's amodal mask is its full shape (all shapes lie fully inside the image);
  its visible mask is what the instances above it leave; boxes come from
  `sameo_jax.boxes.box_from_mask`; occlusion_rate = 1 - visible area / amodal area; order
  is the rank in drawing order from the top (the COCOA convention, 1 = front), so of two
  overlapping objects the one with the smaller order hides the other.

Deterministic per (seed, index); nothing is cached between calls.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from sameo_jax.data import schema
from sameo_jax.data.occluders import place_occluder

SHAPE_KINDS = ("ellipse", "triangle", "rounded_rectangle", "polygon", "star", "ring", "cross",
               "blob")
SOURCE_NAME = "demo"


# ----------------------------------------------------------------------------- shapes


def _circle(n: int = 48) -> np.ndarray:
    t = np.linspace(0.0, 2.0 * math.pi, n, endpoint=False)
    return np.stack([np.cos(t), np.sin(t)], axis=-1)


def _regular(n: int, phase: float = 0.0) -> np.ndarray:
    t = phase + np.arange(n) * (2.0 * math.pi / n)
    return np.stack([np.cos(t), np.sin(t)], axis=-1)


def _rounded_rect(ratio: float, radius: float) -> np.ndarray:
    """Unit square [-1, 1]^2 with corners rounded by `radius` (fraction of the half side)."""
    r = radius
    pts = []
    for cx, cy, start in ((1 - r, 1 - r, 0.0), (-1 + r, 1 - r, 0.5 * math.pi),
                          (-1 + r, -1 + r, math.pi), (1 - r, -1 + r, 1.5 * math.pi)):
        t = start + np.linspace(0.0, 0.5 * math.pi, 7)
        pts.append(np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=-1))
    pts = np.concatenate(pts)
    return pts * np.array([1.0, ratio])


def _shape_polygons(
    kind: str, rng: np.random.Generator
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Unit-scale polygons of one shape: (filled, holes), each [V, 2] (x, y)."""
    if kind == "ellipse":
        return [_circle()], []
    if kind == "triangle":
        return [_regular(3, -0.5 * math.pi)], []
    if kind == "rounded_rectangle":
        return [_rounded_rect(rng.uniform(0.5, 1.0), rng.uniform(0.15, 0.45))], []
    if kind == "polygon":
        return [_regular(int(rng.choice([5, 6, 8])))], []
    if kind == "star":
        n = int(rng.integers(4, 8))
        outer = _regular(n, -0.5 * math.pi)
        inner = _regular(n, -0.5 * math.pi + math.pi / n) * rng.uniform(0.38, 0.55)
        return [np.stack([outer, inner], axis=1).reshape(-1, 2)], []
    if kind == "ring":
        return [_circle()], [_circle() * rng.uniform(0.45, 0.62)]
    if kind == "cross":
        a = rng.uniform(0.28, 0.42)
        pts = [(a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a), (-a, -a), (-a, -1), (a, -1),
               (a, -a), (1, -a), (1, a), (a, a)]
        return [np.array(pts, np.float64)], []
    if kind == "blob":
        t = np.linspace(0.0, 2.0 * math.pi, 64, endpoint=False)
        r = np.ones_like(t)
        for k in (2, 3, 4):
            r += rng.uniform(0.0, 0.18 / k * 2) * np.cos(k * t + rng.uniform(0, 2 * math.pi))
        return [np.stack([r * np.cos(t), r * np.sin(t)], axis=-1)], []
    raise ValueError(f"unknown shape kind {kind!r}; expected one of {SHAPE_KINDS}")


def shape_mask(kind: str, size: float, rng: np.random.Generator) -> np.ndarray:
    """Rasterises one random shape of a family, cropped to its tight box.

    kind: one of SHAPE_KINDS; size: the longer side of the result in pixels.
    Aspect ratio (0.6-1.0) and rotation are random. Returns [h, w] bool, max(h, w) ~ size.
    """
    fills, holes = _shape_polygons(kind, rng)
    aspect = rng.uniform(0.6, 1.0)
    angle = rng.uniform(0.0, 2.0 * math.pi)
    c, s = math.cos(angle), math.sin(angle)
    transform = np.array([[1.0, 0.0], [0.0, aspect]]) @ np.array([[c, -s], [s, c]]).T
    fills = [p @ transform for p in fills]
    holes = [p @ transform for p in holes]
    allpts = np.concatenate(fills)
    lo, hi = allpts.min(axis=0), allpts.max(axis=0)
    scale = (size - 1.0) / float((hi - lo).max())
    h = int(math.ceil((hi[1] - lo[1]) * scale)) + 2
    w = int(math.ceil((hi[0] - lo[0]) * scale)) + 2
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    for poly, value in [(p, 1) for p in fills] + [(p, 0) for p in holes]:
        xy = (poly - lo) * scale + 0.5
        draw.polygon([tuple(v) for v in xy.tolist()], fill=value)
    mask = np.asarray(canvas, np.uint8) > 0
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    return mask[ys[0] : ys[-1] + 1, xs[0] : xs[-1] + 1]


# ----------------------------------------------------------------------------- textures


def _smooth_noise(h: int, w: int, cells: int, rng: np.random.Generator) -> np.ndarray:
    """[h, w] float32 in [0, 1]: a random cells x cells grid upsampled bilinearly."""
    grid = (rng.random((cells, cells)) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(grid).resize((w, h), Image.BILINEAR), np.float32) / 255.0


def _random_colour(rng: np.random.Generator, saturation: tuple[float, float],
                   value: tuple[float, float]) -> np.ndarray:
    """A random RGB colour in [0, 255] from hue/saturation/value ranges."""
    hue = rng.uniform(0.0, 6.0)
    sat = rng.uniform(*saturation)
    val = rng.uniform(*value)
    k = (np.array([5.0, 3.0, 1.0]) + hue) % 6.0
    rgb = val - val * sat * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
    return (rgb * 255.0).astype(np.float32)


def object_texture(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """[3, h, w] float32 RGB (channels first): a two-colour pattern (stripes, checks, dots,
    gradient or smooth noise)."""
    c1 = _random_colour(rng, (0.45, 1.0), (0.55, 1.0))
    c2 = np.clip(c1 * rng.uniform(0.45, 0.8) + rng.uniform(-30, 30, 3), 0, 255)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0.0, math.pi)
    u = xx * math.cos(angle) + yy * math.sin(angle)
    period = rng.uniform(5.0, 14.0)
    pattern = int(rng.integers(5))
    if pattern == 0:  # stripes
        t = (np.sin(u * (2 * math.pi / period)) > 0).astype(np.float32)
    elif pattern == 1:  # checks
        v = -xx * math.sin(angle) + yy * math.cos(angle)
        t = ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    elif pattern == 2:  # dots
        v = -xx * math.sin(angle) + yy * math.cos(angle)
        t = ((np.sin(u * (2 * math.pi / period)) * np.sin(v * (2 * math.pi / period))) > 0.5)
        t = t.astype(np.float32)
    elif pattern == 3:  # gradient
        t = (u - u.min()) / max(float(u.max() - u.min()), 1.0)
    else:  # smooth noise
        t = _smooth_noise(h, w, 4, rng)
    return c1[:, None, None] + (c2 - c1)[:, None, None] * t[None]


def background_texture(size: int, rng: np.random.Generator) -> np.ndarray:
    """[3, size, size] float32 RGB (channels first): a muted two-colour gradient plus
    low-frequency noise."""
    c1 = _random_colour(rng, (0.0, 0.45), (0.2, 0.8))
    c2 = _random_colour(rng, (0.0, 0.45), (0.2, 0.8))
    angle = rng.uniform(0.0, 2.0 * math.pi)
    ramp = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    t = 0.3 + 0.3 * (ramp[None, :] * math.cos(angle) + ramp[:, None] * math.sin(angle))
    t += 0.4 * _smooth_noise(size, size, int(rng.integers(3, 9)), rng)
    return c1[:, None, None] + (c2 - c1)[:, None, None] * t[None]


# ----------------------------------------------------------------------------- scenes


class DemoSource:
    """Random-access source of procedural amodal scenes (see the module docstring).

    num_examples: len(source). image_size: S (square images). seed: the data set's seed.
    occlusion_range: hidden fraction of each occluded target. object_size: range of an
    object's longer side as a fraction of S. dual: pair each occluded scene with its
    unoccluded original (the Amodal-LVIS dual annotation).
    """

    def __init__(
        self,
        num_examples: int,
        image_size: int = 256,
        seed: int = 0,
        *,
        occlusion_range: tuple[float, float] = (0.15, 0.6),
        object_size: tuple[float, float] = (0.24, 0.38),
        dual: bool = True,
    ):
        if num_examples < 0:
            raise ValueError(f"num_examples must be >= 0, got {num_examples}")
        if image_size < 32:
            raise ValueError(f"image_size must be >= 32, got {image_size}")
        lo, hi = occlusion_range
        if not 0.0 < lo <= hi < 1.0:
            raise ValueError(
                f"occlusion_range must satisfy 0 < lo <= hi < 1, got {occlusion_range}"
            )
        if not 0.0 < object_size[0] <= object_size[1] <= 0.6:
            raise ValueError(f"object_size must satisfy 0 < lo <= hi <= 0.6, got {object_size}")
        self.num_examples = int(num_examples)
        self.image_size = int(image_size)
        self.seed = int(seed)
        self.occlusion_range = (float(lo), float(hi))
        self.object_size = (float(object_size[0]), float(object_size[1]))
        self.dual = bool(dual)

    def __len__(self) -> int:
        return self.num_examples

    def __repr__(self) -> str:
        return (f"DemoSource(num_examples={self.num_examples}, image_size={self.image_size}, "
                f"seed={self.seed}, occlusion_range={self.occlusion_range}, "
                f"object_size={self.object_size}, dual={self.dual})")

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if index < 0:
            index += self.num_examples
        if not 0 <= index < self.num_examples:
            raise IndexError(f"DemoSource index {index} out of range [0, {self.num_examples})")
        if self.dual:
            scene, occluded = index // 2, index % 2 == 0
        else:
            scene, occluded = index, True
        return self._render(index, scene, occluded)

    # -- internals

    def _random_object(self, rng: np.random.Generator, size: float) -> tuple[int, np.ndarray]:
        kind = int(rng.integers(len(SHAPE_KINDS)))
        return kind + 1, shape_mask(SHAPE_KINDS[kind], size, rng)

    def _free_spot(self, mask: np.ndarray, taken: np.ndarray, rng: np.random.Generator,
                   margin: int) -> tuple[int, int] | None:
        """Top-left for `mask` such that it keeps `margin` pixels from every taken pixel."""
        s = self.image_size
        h, w = mask.shape
        for _ in range(20):
            top = int(rng.integers(0, s - h + 1))
            left = int(rng.integers(0, s - w + 1))
            t0, l0 = max(top - margin, 0), max(left - margin, 0)
            if not taken[t0 : top + h + margin, l0 : left + w + margin].any():
                return top, left
        return None

    def _render(self, index: int, scene: int, occluded: bool) -> dict[str, Any]:
        s = self.image_size
        rng = np.random.default_rng([self.seed, scene])
        background = background_texture(s, rng)
        num_targets = int(rng.integers(1, 3))
        num_free = int(rng.integers(0, 2))
        lo, hi = self.object_size

        # Each layer: (category, full mask in image frame, texture or None, top, left, local mask)
        taken = np.zeros((s, s), bool)
        base: list[tuple[int, np.ndarray, int, int, np.ndarray]] = []
        targets: list[int] = []
        for k in range(num_targets + num_free):
            category, local = self._random_object(rng, rng.uniform(lo, hi) * s)
            spot = self._free_spot(local, taken, rng, margin=max(2, s // 64))
            if spot is None:
                continue
            full = _paste(local, spot, s)
            taken |= full
            base.append((category, full, spot[0], spot[1], local))
            if k < num_targets:
                targets.append(len(base) - 1)

        occluders: list[tuple[int, np.ndarray, int, int, np.ndarray]] = []
        for t in targets:
            target_full = base[t][1]
            target_size = max(base[t][4].shape)
            for _ in range(4):  # a few occluder candidates; give up (unoccluded) after that
                category, local = self._random_object(rng, target_size * rng.uniform(0.75, 1.15))
                avoid = taken & ~target_full
                placed = place_occluder(target_full, local, self.occlusion_range, rng,
                                        avoid=avoid, tries=6)
                if placed is not None:
                    top, left, _ = placed
                    full = _paste(local, (top, left), s)
                    taken |= full
                    occluders.append((category, full, top, left, local))
                    break

        # Textures are drawn for every layer in both twins so the dual shares its pixels.
        layers = base + occluders
        textures = [object_texture(*layer[4].shape, rng) for layer in layers]
        if not occluded:
            layers, textures = layers[: len(base)], textures[: len(base)]

        image = background
        for (_, _, top, left, local), tex in zip(layers, textures, strict=True):
            h, w = local.shape
            region = image[:, top : top + h, left : left + w]
            region[:, local] = tex[:, local]
        noise_rng = np.random.default_rng([self.seed, scene, 1])
        image += (noise_rng.random((s, s), dtype=np.float32) * 16.0 - 8.0)[None]
        image = np.clip(image, 0, 255, out=image).astype(np.uint8)
        image = np.ascontiguousarray(image.transpose(1, 2, 0))
        return _layered_example(image, index, [layer[0] for layer in layers],
                        [layer[1] for layer in layers])


def _paste(local: np.ndarray, spot: tuple[int, int], size: int) -> np.ndarray:
    full = np.zeros((size, size), bool)
    top, left = spot
    full[top : top + local.shape[0], left : left + local.shape[1]] = local
    return full


def _layered_example(image: np.ndarray, image_id: int, categories: list[int],
                     amodal: list[np.ndarray]) -> dict[str, Any]:
    """Schema example from bottom-to-top layers: visible = amodal minus all layers above."""
    n = len(amodal)
    visible = [np.asarray(m, bool).copy() for m in amodal]
    above = np.zeros(image.shape[:2], bool)
    for k in range(n - 1, -1, -1):
        visible[k] &= ~above
        above |= amodal[k]
    order = np.arange(n, 0, -1, dtype=np.int64)  # the last layer drawn is 1 (front)
    return schema.example(SOURCE_NAME, image, image_id, amodal, visible, categories, order)
