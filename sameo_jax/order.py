"""Occlusion order and depth layers from visible and amodal masks (numpy only).

    occ = occlusion_order(visible, amodal)    # [N, H, W] bool each
    occ.matrix   # [N, N] int8: +1 where row i occludes column j, -1 where j occludes i, 0
    occ.layers   # [N] int: 0 = nothing hides it, k = 1 + the deepest layer in front of it

The order matrix follows scene de-occlusion's `order_matrix` (Zhan et al., CVPR 2020):
`matrix[i, j] = 1` means i is above (in front of) j, `-1` that i is occluded by j, 0 that
neither hides the other; it is antisymmetric. A relation is read from the masks: i occludes
j where i's visible mask covers j's hidden region (amodal minus visible) by more than
`min_fraction` of j's amodal area (and at least one pixel). When each covers the other
(noisy masks), the larger covered area wins; equal areas give 0.

Layers come from the relations as a directed graph "front -> back". Masks of several objects
can disagree (A over B over C over A); such cycles are broken at their weakest relation: the
relations are taken from the strongest (largest covered area) to the weakest, ties in
(i, j) order, and one that would close a cycle is dropped. The result does not depend on
how the objects are numbered, apart from exact ties.
"""

from __future__ import annotations

import dataclasses

import numpy as np

DEFAULT_MIN_FRACTION = 0.01


@dataclasses.dataclass(frozen=True)
class OcclusionOrder:
    """Pairwise occlusion order of N objects and their depth layers."""

    matrix: np.ndarray  # [N, N] int8, +1 / -1 / 0 (see the module doc)
    covered: np.ndarray  # [N, N] int64: pixels of j's hidden region under i's visible mask
    layers: np.ndarray  # [N] int64, 0 = front
    dropped: tuple[tuple[int, int], ...]  # relations (front, back) left out to break cycles


def _flat(masks: np.ndarray, name: str) -> np.ndarray:
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"{name}: expected [N, H, W] masks, got shape {masks.shape}")
    return masks.reshape(len(masks), -1).astype(bool)


def covered_hidden(visible: np.ndarray, amodal: np.ndarray) -> np.ndarray:
    """[N, N] int64: pixels of object j's hidden region (amodal & ~visible) that object i's
    visible mask covers, for masks [N, H, W] bool (one matrix product). Visible masks are
    clipped to their amodal masks first."""
    if np.shape(visible) != np.shape(amodal):
        raise ValueError(f"visible {np.shape(visible)} and amodal {np.shape(amodal)} masks "
                         "differ in shape")
    v, a = _flat(visible, "visible"), _flat(amodal, "amodal")
    v &= a
    hidden = a & ~v
    # float32 sums are exact up to 2**24 pixels per image.
    counts = v.astype(np.float32) @ hidden.astype(np.float32).T
    return np.rint(counts).astype(np.int64)


def order_matrix(covered: np.ndarray, amodal_area: np.ndarray,
                 min_fraction: float = DEFAULT_MIN_FRACTION) -> np.ndarray:
    """Order matrix [N, N] int8 from `covered_hidden` counts and amodal areas [N]."""
    covered = np.asarray(covered, np.int64)
    area = np.asarray(amodal_area, np.float64).reshape(1, -1)
    occludes = (covered > 0) & (covered > min_fraction * area)
    np.fill_diagonal(occludes, False)
    front = occludes & (~occludes.T | (covered > covered.T))
    back = front.T
    return (front.astype(np.int8) - back.astype(np.int8))


def depth_layers(matrix: np.ndarray, strength: np.ndarray
                 ) -> tuple[np.ndarray, tuple[tuple[int, int], ...]]:
    """Layers [N] of an order matrix, cycles broken at their weakest relation.

    matrix: [N, N] int8 order matrix; strength: [N, N] weight of each relation i -> j (i in
    front). Returns (layers, dropped relations as (front, back) pairs).
    """
    matrix = np.asarray(matrix)
    n = len(matrix)
    fronts, backs = np.nonzero(matrix > 0)
    weights = np.asarray(strength, np.float64)[fronts, backs]
    # Strongest first; np.lexsort's last key is the primary one, so ties fall to (i, j).
    ranked = np.lexsort((backs, fronts, -weights))
    reach = np.eye(n, dtype=bool)  # reach[a, b]: a path a -> ... -> b exists (a == b too)
    kept = np.zeros((n, n), bool)
    dropped = []
    for k in ranked:
        i, j = int(fronts[k]), int(backs[k])
        if reach[j, i]:
            dropped.append((i, j))
            continue
        kept[i, j] = True
        reach |= np.outer(reach[:, i], reach[j, :])
    layers = np.zeros(n, np.int64)
    for _ in range(n):  # longest path from a front object; a DAG settles within n rounds
        deeper = np.where(kept, layers[:, None] + 1, 0).max(axis=0, initial=0)
        new = np.maximum(layers, deeper)
        if np.array_equal(new, layers):
            break
        layers = new
    return layers, tuple(dropped)


def occlusion_order(visible: np.ndarray, amodal: np.ndarray,
                    min_fraction: float = DEFAULT_MIN_FRACTION) -> OcclusionOrder:
    """Order matrix and depth layers of N objects from masks [N, H, W] bool (module doc).

    Visible masks are clipped to their amodal masks first.
    """
    if not 0.0 <= min_fraction < 1.0:
        raise ValueError(f"min_fraction must be in [0, 1), got {min_fraction}")
    covered = covered_hidden(visible, amodal)
    area = _flat(amodal, "amodal").sum(axis=1)
    matrix = order_matrix(covered, area, min_fraction)
    layers, dropped = depth_layers(matrix, covered)
    return OcclusionOrder(matrix=matrix, covered=covered, layers=layers, dropped=dropped)
