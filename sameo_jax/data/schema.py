"""The project's example schema, as numpy, and the one function that makes an example.

Every source (built TFDS data sets, the demo scenes, Amodal-LVIS synthesis) gives examples of
this form; `datasets/features.py` is its stored form:

    {'image': uint8 [H, W, 3], 'image_id': int64, 'source': str,
     'objects': {'amodal_mask': bool [N, H, W], 'visible_mask': bool [N, H, W],
                 'amodal_bbox': float32 [N, 4], 'visible_bbox': float32 [N, 4],
                 'category_id': int64 [N], 'occlusion_rate': float32 [N],
                 'order': int64 [N] (depth rank, 1 = front; 0 = unknown)}}
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from sameo_jax.boxes import boxes_from_masks


def _stack(masks: Sequence[np.ndarray] | np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    if len(masks) == 0:
        return np.zeros((0, *hw), bool)
    return np.stack([np.asarray(m, bool) for m in masks])


def example(source: str, image: np.ndarray, image_id: int,
            amodal: Sequence[np.ndarray] | np.ndarray,
            visible: Sequence[np.ndarray] | np.ndarray,
            categories: Sequence[int],
            order: Sequence[int] | None = None) -> dict[str, Any]:
    """A schema example from an image [H, W, 3] uint8 and N amodal / visible [H, W] bool masks;
    boxes and occlusion rates are derived from the masks, order None means unknown (0)."""
    hw = tuple(image.shape[:2])
    a, v = _stack(amodal, hw), _stack(visible, hw)
    n = len(a)
    if len(v) != n or len(categories) != n or (order is not None and len(order) != n):
        raise ValueError(f"{source} example {image_id}: {n} amodal masks, {len(v)} visible, "
                         f"{len(categories)} categories"
                         + ("" if order is None else f", {len(order)} order ranks"))
    area_a = a.reshape(n, -1).sum(axis=1).astype(np.float32)
    area_v = v.reshape(n, -1).sum(axis=1).astype(np.float32)
    return {
        "image": image,
        "image_id": np.int64(image_id),
        "source": source,
        "objects": {
            "amodal_mask": a,
            "visible_mask": v,
            "amodal_bbox": boxes_from_masks(a),
            "visible_bbox": boxes_from_masks(v),
            "category_id": np.asarray(categories, np.int64).reshape(n),
            "occlusion_rate": (1.0 - area_v / np.maximum(area_a, 1.0)).astype(np.float32),
            "order": (np.zeros(n, np.int64) if order is None
                      else np.asarray(order, np.int64).reshape(n)),
        },
    }
