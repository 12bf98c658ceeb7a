"""In-training evaluation: amodal IoU of predicted masks on held-out instances.

IoUs are measured at the model's low-res mask size L (the training targets' resolution),
for all valid instances and for the occluded ones (occlusion_rate >= `occluded_min`).
The modal baseline -- answering with the visible mask -- is reported next to the model.

Every process evaluates its own share of the instances on its own devices and keeps sums;
`combine` adds the sums of all processes, so the means are those of one process that saw
everything.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np


@dataclasses.dataclass
class IouTotals:
    """Sums over the instances seen so far (float64, on the host)."""

    num_instances: int = 0
    model_iou: float = 0.0
    num_occluded: int = 0
    model_iou_occluded: float = 0.0
    visible_iou_occluded: float = 0.0

    def add(self, model_iou: np.ndarray, visible_iou: np.ndarray, valid: np.ndarray,
            occluded: np.ndarray) -> None:
        """One batch: per-instance IoUs [B, N], `valid` and `occluded` bool [B, N]."""
        valid = np.asarray(valid, bool)
        occluded = np.asarray(occluded, bool) & valid
        model_iou = np.asarray(model_iou, np.float64)
        self.num_instances += int(valid.sum())
        self.model_iou += float(model_iou[valid].sum())
        self.num_occluded += int(occluded.sum())
        self.model_iou_occluded += float(model_iou[occluded].sum())
        self.visible_iou_occluded += float(np.asarray(visible_iou, np.float64)[occluded].sum())

    def metrics(self) -> dict[str, float]:
        """{'amodal_iou', 'amodal_iou_occluded', 'visible_iou_occluded', 'num_instances',
        'num_occluded'} (IoUs are means over instances; NaN when a subset is empty)."""

        def mean(total: float, n: int) -> float:
            return total / n if n else float("nan")

        return {
            "amodal_iou": mean(self.model_iou, self.num_instances),
            "amodal_iou_occluded": mean(self.model_iou_occluded, self.num_occluded),
            "visible_iou_occluded": mean(self.visible_iou_occluded, self.num_occluded),
            "num_instances": float(self.num_instances),
            "num_occluded": float(self.num_occluded),
        }


def combine(parts: Sequence[IouTotals]) -> IouTotals:
    """The totals of all processes (e.g. `IouTotals(**d)` of `allgather_objects(asdict(t))`)."""
    out = IouTotals()
    for part in parts:
        for field in dataclasses.fields(IouTotals):
            setattr(out, field.name, getattr(out, field.name) + getattr(part, field.name))
    return out


def amodal_iou_totals(
    eval_step: Callable[[Any, Any], dict[str, Any]],
    params: Any,
    batches: Iterable[tuple[Any, dict[str, np.ndarray]]],
    occluded_min: float,
) -> IouTotals:
    """Runs `eval_step(params, device_batch)` over (device_batch, host_batch) pairs; the host
    batch carries 'valid' [B, N] and 'occlusion_rate' [B, N] of the same rows."""
    totals = IouTotals()
    for device, host in batches:
        out = eval_step(params, device)
        totals.add(np.asarray(out["model_iou"]), np.asarray(out["visible_iou"]),
                   host["valid"], np.asarray(host["occlusion_rate"]) >= occluded_min)
    return totals
