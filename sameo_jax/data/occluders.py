"""Synthetic occluders at run time: where to put one, and pasting stored patches into images.

The Amodal-LVIS build (`datasets/amodal_lvis/synthesis.py`) stores each synthetic occlusion
as a small patch (`OccluderPatch`); reading a record pastes it back (`paste_occluders`). The
procedural demo scenes place their objects with `place_occluder` too.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def place_occluder(
    target: np.ndarray,
    occluder: np.ndarray,
    occlusion_range: tuple[float, float],
    rng: np.random.Generator,
    *,
    avoid: np.ndarray | None = None,
    tries: int = 8,
) -> tuple[int, int, float] | None:
    """Positions an occluder by its box so it hides a chosen fraction of a target object.

    target: [H, W] bool full (amodal) mask of the object to occlude, in the image frame.
    occluder: [h, w] bool mask of the occluder cropped to its box (h <= H, w <= W).
    occlusion_range: (lo, hi); the covered fraction |target & occluder| / |target| must land
      in [lo, hi]. A goal fraction is drawn uniformly from the range and a random direction;
      the occluder's box centre slides from the target's box centre outwards along that
      direction and a bisection finds the distance where the covered fraction crosses the
      goal (the fraction falls as the boxes separate). The occluder always lies fully inside
      the image.
    avoid: optional [H, W] bool of pixels the occluder must not cover (other objects).
    Returns (top, left, fraction) or None when `tries` directions all fail.
    """
    lo, hi = occlusion_range
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"occlusion_range must satisfy 0 <= lo <= hi <= 1, got {occlusion_range}")
    height, width = target.shape
    h, w = occluder.shape
    if h > height or w > width or h == 0 or w == 0:
        return None
    ys = np.flatnonzero(target.any(axis=1))
    xs = np.flatnonzero(target.any(axis=0))
    if ys.size == 0:
        return None
    area = float(np.count_nonzero(target))

    def fraction(top: int, left: int) -> float:
        return np.count_nonzero(target[top : top + h, left : left + w] & occluder) / area

    cy, cx = (ys[0] + ys[-1] + 1) / 2.0, (xs[0] + xs[-1] + 1) / 2.0
    reach = 0.5 * (math.hypot(ys[-1] + 1 - ys[0], xs[-1] + 1 - xs[0]) + math.hypot(h, w))

    def corner(dist: float, dy: float, dx: float) -> tuple[int, int]:
        top = int(round(cy + dist * dy - h / 2.0))
        left = int(round(cx + dist * dx - w / 2.0))
        return min(max(top, 0), height - h), min(max(left, 0), width - w)

    def accept(top: int, left: int) -> tuple[int, int, float] | None:
        frac = fraction(top, left)
        if not lo <= frac <= hi:
            return None
        if avoid is not None and np.any(avoid[top : top + h, left : left + w] & occluder):
            return None
        return top, left, frac

    for _ in range(tries):
        goal = rng.uniform(lo, hi)
        angle = rng.uniform(0.0, 2.0 * math.pi)
        dy, dx = math.sin(angle), math.cos(angle)
        near, far = 0.0, reach
        if fraction(*corner(near, dy, dx)) < goal:
            continue  # even centred, this occluder cannot hide enough
        for _ in range(12):
            mid = 0.5 * (near + far)
            if fraction(*corner(mid, dy, dx)) >= goal:
                near = mid
            else:
                far = mid
        for dist in (near, far):
            found = accept(*corner(dist, dy, dx))
            if found is not None:
                return found
    return None


@dataclasses.dataclass(frozen=True)
class OccluderPatch:
    """An occluder pasted into an image: the stored form of one synthetic occlusion."""

    pixels: np.ndarray  # [h, w, 3] uint8, zero outside `mask`
    mask: np.ndarray  # [h, w] bool
    top: int  # row of the patch's top-left corner in the image
    left: int  # column of that corner

    def full_mask(self, hw: tuple[int, int]) -> np.ndarray:
        """The occluder's mask in the [H, W] image frame."""
        out = np.zeros(hw, bool)
        h, w = self.mask.shape
        out[self.top : self.top + h, self.left : self.left + w] = self.mask
        return out


def paste_occluders(image: np.ndarray, patches: Sequence[OccluderPatch]) -> np.ndarray:
    """The read-time composition: a copy of image [H, W, 3] uint8 with each patch's masked
    pixels written at its place. Raises ValueError for a patch that does not fit the image."""
    out = np.array(image, np.uint8)
    height, width = out.shape[:2]
    for k, p in enumerate(patches):
        h, w = p.mask.shape
        if (np.shape(p.pixels) != (h, w, 3) or not 0 <= p.top <= height - h
                or not 0 <= p.left <= width - w):
            raise ValueError(
                f"occluder patch {k}: pixels {np.shape(p.pixels)}, mask {p.mask.shape} at row "
                f"{p.top}, column {p.left} does not fit the {height}x{width} image")
        region = out[p.top : p.top + h, p.left : p.left + w]
        region[p.mask] = p.pixels[p.mask]
    return out


def stored_patches(occluders: dict[str, Any]) -> list[OccluderPatch]:
    """A record's decoded `occluders` feature ('pixels' [h, w, 3], 'mask' [h, w, 1] per
    patch, 'top_left' [P, 2]) -> OccluderPatch list. Raises ValueError when they disagree."""
    pixels, masks = list(occluders["pixels"]), list(occluders["mask"])
    corners = np.asarray(occluders["top_left"], np.int64).reshape(-1, 2)
    if not len(pixels) == len(masks) == len(corners):
        raise ValueError(f"occluders: {len(pixels)} pixel patches, {len(masks)} masks and "
                         f"{len(corners)} corners")
    out = []
    for k, (pix, mask, (top, left)) in enumerate(zip(pixels, masks, corners, strict=True)):
        mask = np.asarray(mask)
        if mask.ndim == 3 and mask.shape[-1] == 1:
            mask = mask[..., 0]
        if mask.ndim != 2:
            raise ValueError(f"occluder patch {k}: mask of shape {mask.shape}, expected [h, w]")
        out.append(OccluderPatch(np.asarray(pix, np.uint8), mask.astype(bool), int(top),
                                 int(left)))
    return out
