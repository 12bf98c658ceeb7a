"""Box conventions: one place for them.

Outside `preprocessing.py`, boxes are always float xyxy in original image pixels:
`[x0, y0, x1, y1]` with x0 <= x1, y0 <= y1 (x right, y down). COCO files use xywh; convert at
the file boundary with the helpers here.
"""

from __future__ import annotations

import numpy as np


def xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    """[..., 4] xywh -> [..., 4] xyxy (float32)."""
    b = np.asarray(boxes, np.float32)
    return np.concatenate([b[..., :2], b[..., :2] + b[..., 2:4]], axis=-1)


def xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    """[..., 4] xyxy -> [..., 4] xywh (float32)."""
    b = np.asarray(boxes, np.float32)
    return np.concatenate([b[..., :2], b[..., 2:4] - b[..., :2]], axis=-1)


def box_from_mask(mask: np.ndarray) -> np.ndarray:
    """Tight xyxy box of a [H, W] bool mask, pixel-edge convention (a single pixel at (x, y)
    gives [x, y, x + 1, y + 1], as COCO's `toBbox`). Empty mask -> zeros."""
    m = np.asarray(mask, bool)
    ys = np.flatnonzero(m.any(axis=1))
    xs = np.flatnonzero(m.any(axis=0))
    if ys.size == 0:
        return np.zeros(4, np.float32)
    return np.array([xs[0], ys[0], xs[-1] + 1, ys[-1] + 1], np.float32)


def boxes_from_masks(masks: np.ndarray) -> np.ndarray:
    """[N, H, W] bool -> [N, 4] xyxy float32 (see `box_from_mask`)."""
    masks = np.asarray(masks, bool)
    if len(masks) == 0:
        return np.zeros((0, 4), np.float32)
    return np.stack([box_from_mask(m) for m in masks])


def validate_boxes(boxes: np.ndarray, where: str = "boxes") -> np.ndarray:
    """Checks [N, 4] xyxy boxes are finite with x0 <= x1 and y0 <= y1; returns float32.

    Raises ValueError naming `where`, the box index and its value. Boxes partly or wholly
    outside the image are allowed (the model accepts any coordinates).
    """
    b = np.asarray(boxes, np.float32)
    if b.ndim != 2 or b.shape[-1] != 4:
        raise ValueError(f"{where}: expected shape [N, 4] (x0, y0, x1, y1), got {b.shape}")
    bad = ~np.isfinite(b).all(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{where}[{i}] = {b[i].tolist()}: coordinates must be finite numbers")
    flipped = (b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1])
    if flipped.any():
        i = int(np.flatnonzero(flipped)[0])
        raise ValueError(
            f"{where}[{i}] = {b[i].tolist()}: need x0 <= x1 and y0 <= y1 (boxes are xyxy)"
        )
    return b
