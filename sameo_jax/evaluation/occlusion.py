"""Occlusion breakdown: AP and mean amodal IoU per occlusion level, invisible-region IoU.

Levels by a ground-truth instance's occlusion rate r (1 - visible area / amodal area, or the
release's value): `none` r = 0, `partial` 0 < r <= 0.25, `heavy` r > 0.25.

- AP per level: COCOeval with the other levels' GT instances ignored (a prediction matched to
  an ignored instance counts neither as TP nor FP, as COCO does for area ranges; unmatched
  predictions are false positives in every level).
- Mean amodal IoU: every GT instance is paired with one prediction: the one made from its own
  prompt when results carry `gt_instance` (GT-prompt runs), else the prediction of the same
  image (and category, unless class-agnostic) with the highest mask IoU. No prediction -> 0.
- Invisible-region IoU of an occluded instance (amodal minus visible not empty):
  IoU(pred \\ visible GT, amodal GT \\ visible GT), averaged over occluded instances.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from sameo_jax import masks as mask_lib
from sameo_jax.evaluation import coco_eval

LEVELS = ("none", "partial", "heavy")
PARTIAL_MAX = 0.25
# Rates at or below this count as not occluded (1 - visible/amodal can be off by float error).
NONE_EPS = 1e-6


def occlusion_level(rate: float) -> str:
    """Occlusion rate in [0, 1] -> 'none' | 'partial' | 'heavy'."""
    if rate <= NONE_EPS:
        return "none"
    return "partial" if rate <= PARTIAL_MAX else "heavy"


def _rle(seg: Mapping[str, Any]) -> dict[str, Any]:
    counts = seg["counts"]
    return {"size": list(seg["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def _decode(seg: Mapping[str, Any]) -> np.ndarray:
    return mask_utils.decode(_rle(seg)).astype(bool)


def pair_predictions(
    coco_gt: COCO, results: Sequence[Mapping[str, Any]], class_agnostic: bool = False
) -> dict[int, Mapping[str, Any] | None]:
    """GT annotation id -> the prediction paired with it (see module doc), or None."""
    by_image: dict[int, list[Mapping[str, Any]]] = collections.defaultdict(list)
    for r in results:
        by_image[int(r["image_id"])].append(r)
    pairs: dict[int, Mapping[str, Any] | None] = {}
    for image_id in coco_gt.getImgIds():
        gts = coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=[image_id]))
        preds = by_image.get(image_id, [])
        own: dict[int, Mapping[str, Any]] = {}
        for r in preds:
            if "gt_instance" in r:
                k = int(r["gt_instance"])
                if k not in own or r["score"] > own[k]["score"]:
                    own[k] = r
        others = [r for r in preds if "gt_instance" not in r]
        ious = None
        if others and gts:
            ious = mask_utils.iou(
                [_rle(g["segmentation"]) for g in gts],
                [_rle(r["segmentation"]) for r in others],
                [0] * len(others),
            )
            ious = np.asarray(ious).reshape(len(gts), len(others))
        for gi, g in enumerate(gts):
            if g["instance_index"] in own:
                pairs[g["id"]] = own[g["instance_index"]]
                continue
            best, best_iou = None, -1.0
            if ious is not None:
                for pi, r in enumerate(others):
                    if not class_agnostic and r["category_id"] != g["category_id"]:
                        continue
                    if ious[gi, pi] > best_iou:
                        best, best_iou = r, float(ious[gi, pi])
            pairs[g["id"]] = best
    return pairs


def instance_ious(
    coco_gt: COCO, results: Sequence[Mapping[str, Any]], class_agnostic: bool = False
) -> list[dict[str, Any]]:
    """Per GT instance: {'ann_id', 'level', 'occlusion_rate', 'amodal_iou', 'invisible_iou'}
    (`invisible_iou` is None for instances with no invisible region)."""
    pairs = pair_predictions(coco_gt, results, class_agnostic)
    rows = []
    for ann in coco_gt.loadAnns(coco_gt.getAnnIds()):
        amodal = _decode(ann["segmentation"])
        visible = _decode(ann["visible_segmentation"]) & amodal
        pred_seg = pairs.get(ann["id"])
        pred = np.zeros_like(amodal) if pred_seg is None else _decode(pred_seg["segmentation"])
        invisible_gt = amodal & ~visible
        invisible_iou = None
        if invisible_gt.any():
            invisible_iou = mask_lib.mask_iou(pred & ~visible, invisible_gt)
        rate = float(ann["occlusion_rate"])
        rows.append(
            {
                "ann_id": ann["id"],
                "level": occlusion_level(rate),
                "occlusion_rate": rate,
                "amodal_iou": mask_lib.mask_iou(pred, amodal),
                "invisible_iou": invisible_iou,
            }
        )
    return rows


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def occlusion_breakdown(
    coco_gt: COCO, results: Sequence[Mapping[str, Any]], class_agnostic: bool = False
) -> dict[str, dict[str, Any]]:
    """{'none'|'partial'|'heavy'|'all': {'num_instances', 'AP', 'AP50', 'mIoU',
    'invisible_mIoU'}}; values are fractions, None where a level has no instance (AP and
    AP50 are not given for 'all': see the overall metrics)."""
    rows = instance_ious(coco_gt, results, class_agnostic)
    coco_dt = coco_eval.results_to_coco(coco_gt, results)
    out: dict[str, dict[str, Any]] = {}
    for level in (*LEVELS, "all"):
        chosen = [r for r in rows if level == "all" or r["level"] == level]
        invisible = [r["invisible_iou"] for r in chosen if r["invisible_iou"] is not None]
        entry: dict[str, Any] = {
            "num_instances": len(chosen),
            "mIoU": _mean([r["amodal_iou"] for r in chosen]),
            "invisible_mIoU": _mean(invisible),
        }
        if level != "all":
            entry["AP"] = entry["AP50"] = None
            if chosen:
                keep = {r["ann_id"] for r in chosen}
                ignore = [r["ann_id"] for r in rows if r["ann_id"] not in keep]
                ev = coco_eval.run_cocoeval(coco_gt, coco_dt, class_agnostic, ignore)
                entry["AP"] = coco_eval.ap_at(ev)
                entry["AP50"] = coco_eval.ap_at(ev, 0.5)
        out[level] = entry
    return out
