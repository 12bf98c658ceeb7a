"""Mask conventions and COCO mask encodings (pycocotools), shared by data and evaluation."""

from __future__ import annotations

from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

MASK_THRESHOLD = 0.0  # a pixel is in the mask where the logit is >= this value


def logits_to_mask(logits: np.ndarray) -> np.ndarray:
    """Logits of any shape -> bool mask (logit >= MASK_THRESHOLD)."""
    return np.asarray(logits) >= MASK_THRESHOLD


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """[H, W] bool -> COCO RLE dict with `counts` as str (JSON-ready)."""
    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def coco_rle(seg: dict[str, Any]) -> dict[str, Any]:
    """A compressed RLE dict whose `counts` may be str (JSON) -> the form pycocotools takes."""
    counts = seg["counts"]
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    return {"size": list(seg["size"]), "counts": counts}


def decode_segmentation(seg: Any, height: int, width: int) -> np.ndarray:
    """COCO `segmentation` (polygon list, uncompressed or compressed RLE) -> [H, W] bool.

    Raises ValueError when an RLE's stored size disagrees with (height, width).
    """
    if isinstance(seg, list):
        if len(seg) == 0:
            return np.zeros((height, width), bool)
        rles = mask_utils.frPyObjects(seg, height, width)
        rle = mask_utils.merge(rles)
    elif isinstance(seg, dict):
        size = list(seg.get("size", []))
        if size != [height, width]:
            raise ValueError(f"RLE size {size} disagrees with image size {[height, width]}")
        if isinstance(seg.get("counts"), list):
            rle = mask_utils.frPyObjects(seg, height, width)
        else:
            rle = coco_rle(seg)
    else:
        raise ValueError(f"unsupported segmentation of type {type(seg).__name__}")
    return mask_utils.decode(rle).astype(bool)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two bool masks of the same shape (1.0 when both are empty)."""
    a = np.asarray(a, bool)
    b = np.asarray(b, bool)
    union = np.logical_or(a, b).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(a, b).sum() / union)
