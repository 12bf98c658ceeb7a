"""In-training evaluation: amodal IoU of predicted masks on held-out instances.

IoUs are measured at the model's low-res mask size L (the training targets' resolution),
for all valid instances and for the occluded ones (occlusion_rate >= `occluded_min`).
The modal baseline -- answering with the visible mask -- is reported next to the model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np


def evaluate_amodal_iou(
    eval_step: Callable[[Any, Any], dict[str, Any]],
    params: Any,
    batches: Iterable[Any],
    occluded_min: float,
) -> dict[str, float]:
    """Runs `eval_step(params, batch)` over device-ready batches; each batch also carries the
    host arrays 'valid' [B, N] and 'occlusion_rate' [B, N] under key '_host'.

    Returns {'amodal_iou', 'amodal_iou_occluded', 'visible_iou_occluded', 'num_instances',
    'num_occluded'} (IoUs are means over instances; NaN when a subset is empty).
    """
    model_iou, visible_iou, occluded = [], [], []
    for batch in batches:
        host = batch["_host"]
        out = eval_step(params, batch["device"])
        valid = np.asarray(host["valid"], bool)
        model_iou.append(np.asarray(out["model_iou"])[valid])
        visible_iou.append(np.asarray(out["visible_iou"])[valid])
        occluded.append(np.asarray(host["occlusion_rate"])[valid] >= occluded_min)
    model_iou = np.concatenate(model_iou) if model_iou else np.zeros(0)
    visible_iou = np.concatenate(visible_iou) if visible_iou else np.zeros(0)
    occluded = np.concatenate(occluded) if occluded else np.zeros(0, bool)

    def mean(x: np.ndarray) -> float:
        return float(x.mean()) if x.size else float("nan")

    return {
        "amodal_iou": mean(model_iou),
        "amodal_iou_occluded": mean(model_iou[occluded]),
        "visible_iou_occluded": mean(visible_iou[occluded]),
        "num_instances": float(model_iou.size),
        "num_occluded": float(occluded.sum()),
    }
