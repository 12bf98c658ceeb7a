"""Amodal-LVIS synthesis (SAMEO): synthetic occlusion of complete objects, with dual annotation.

(Core placement helpers; the COCO-format source and CLI follow below.)
"""

from __future__ import annotations

import math

import numpy as np


def occlusion_fraction(target: np.ndarray, occluder: np.ndarray, top: int, left: int) -> float:
    """Fraction of `target` ([H, W] bool, image frame) covered by `occluder` ([h, w] bool)
    pasted with its top-left corner at (top, left); the occluder must lie inside the image."""
    h, w = occluder.shape
    area = int(target.sum())
    if area == 0:
        return 0.0
    covered = np.count_nonzero(target[top : top + h, left : left + w] & occluder)
    return covered / area


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
