"""Occlusion breakdown: AP and mean amodal IoU per occlusion level, invisible-region IoU.

Levels by a ground-truth instance's occlusion rate r (1 - visible area / amodal area, or the
release's value): `none` r = 0, `partial` 0 < r <= 0.25, `heavy` r > 0.25.

- AP per level: COCOeval with the other levels' GT instances ignored, the way COCO treats
  area ranges: a prediction matched to an ignored instance counts neither as TP nor FP, and an
  unmatched prediction counts as FP only in the level of the GT instance it overlaps most
  (same category unless class-agnostic); one that overlaps no instance is FP in every level.
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


def _decode(seg: Mapping[str, Any]) -> np.ndarray:
    return mask_lib.decode_segmentation(seg, *seg["size"])


def _match_table(
    coco_gt: COCO, results: Sequence[Mapping[str, Any]], class_agnostic: bool
) -> tuple[dict[int, Mapping[str, Any] | None], list[int | None]]:
    """(GT annotation id -> its paired prediction or None, per result: id of the GT annotation
    it overlaps most or None). See the module doc for the pairing rule."""
    by_image: dict[int, list[int]] = collections.defaultdict(list)
    for k, r in enumerate(results):
        by_image[int(r["image_id"])].append(k)
    pairs: dict[int, Mapping[str, Any] | None] = {}
    nearest: list[int | None] = [None] * len(results)
    for image_id in coco_gt.getImgIds():
        gts = coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=[image_id]))
        preds = [results[k] for k in by_image.get(image_id, [])]
        ious = np.zeros((len(gts), len(preds)))
        if gts and preds:
            ious = np.asarray(mask_utils.iou(
                [mask_lib.coco_rle(g["segmentation"]) for g in gts],
                [mask_lib.coco_rle(r["segmentation"]) for r in preds],
                [0] * len(preds),
            )).reshape(len(gts), len(preds))
            if not class_agnostic:
                same = np.array([[g["category_id"] == r["category_id"] for r in preds]
                                 for g in gts])
                ious = np.where(same, ious, 0.0)
        for pi, k in enumerate(by_image.get(image_id, [])):
            if gts and ious[:, pi].max() > 0:
                nearest[k] = gts[int(ious[:, pi].argmax())]["id"]
        own: dict[int, int] = {}
        for pi, r in enumerate(preds):
            if "gt_instance" in r:
                i = int(r["gt_instance"])
                if i not in own or r["score"] > preds[own[i]]["score"]:
                    own[i] = pi
        untagged = np.array(["gt_instance" not in r for r in preds], bool)
        for gi, g in enumerate(gts):
            if g["instance_index"] in own:
                pairs[g["id"]] = preds[own[g["instance_index"]]]
            elif untagged.any():
                candidates = np.where(untagged, ious[gi], -1.0)
                best = int(candidates.argmax())
                pairs[g["id"]] = preds[best] if ious[gi, best] > 0 else None
            else:
                pairs[g["id"]] = None
    return pairs, nearest


def pair_predictions(
    coco_gt: COCO, results: Sequence[Mapping[str, Any]], class_agnostic: bool = False
) -> dict[int, Mapping[str, Any] | None]:
    """GT annotation id -> the prediction paired with it (see module doc), or None."""
    return _match_table(coco_gt, results, class_agnostic)[0]


def instance_ious(
    coco_gt: COCO, results: Sequence[Mapping[str, Any]], class_agnostic: bool = False
) -> list[dict[str, Any]]:
    """Per GT instance: {'ann_id', 'level', 'occlusion_rate', 'amodal_iou', 'invisible_iou'}
    (`invisible_iou` is None for instances with no invisible region)."""
    return _instance_rows(coco_gt, pair_predictions(coco_gt, results, class_agnostic))


def _instance_rows(coco_gt: COCO, pairs: Mapping[int, Mapping[str, Any] | None]
                   ) -> list[dict[str, Any]]:
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
    pairs, nearest = _match_table(coco_gt, results, class_agnostic)
    rows = _instance_rows(coco_gt, pairs)
    level_of = {r["ann_id"]: r["level"] for r in rows}
    result_level = [None if a is None else level_of[a] for a in nearest]
    out: dict[str, dict[str, Any]] = {}
    ious = None  # mask IoUs do not depend on which GT is ignored: compute them once
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
                coco_dt = coco_eval.results_to_coco(coco_gt, results)
                for k, lv in enumerate(result_level):
                    if lv is not None and lv != level:
                        # Outside the 'all' area range: ignored by COCOeval unless matched.
                        coco_dt.anns[k + 1]["area"] = -1.0
                ev = coco_eval.run_cocoeval(coco_gt, coco_dt, class_agnostic, ignore, ious)
                ious = ev.ious
                entry["AP"] = coco_eval.ap_at(ev)
                entry["AP50"] = coco_eval.ap_at(ev, 0.5)
        out[level] = entry
    return out
