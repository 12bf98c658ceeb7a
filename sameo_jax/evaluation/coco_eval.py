"""COCO mask AP of amodal predictions: ground truth built in memory, COCOeval('segm') wrapper.

Ground truth comes from schema examples (see the data contract): each instance's amodal mask
is its COCO `segmentation` (RLE), with `area` = amodal mask area, `bbox` from the mask,
`iscrowd` = 0 and its `category_id`. Two extra fields ride along for the occlusion breakdown:
`visible_segmentation` (RLE) and `occlusion_rate`, plus `instance_index` (position in the
example's objects), which pairs a GT-prompted prediction with its instance, and `order` (the
release's depth rank, 1 = front; 0 = none).
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from sameo_jax import boxes as box_lib
from sameo_jax import masks as mask_lib

# Data sets without classes (COCOA) store category_id 0; COCO files give such instances 1.
NO_CLASS = 0


def coco_category(category_id: int, class_agnostic: bool = False) -> int:
    """The category id written to COCO GT/results: 1 in class-agnostic runs and for instances
    without a class (NO_CLASS), else the data set's id."""
    category_id = int(category_id)
    return 1 if class_agnostic or category_id == NO_CLASS else category_id


# Names of COCOeval.stats[0:9], in order (pycocotools fractions in [0, 1], -1 = undefined).
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100")


class GroundTruthBuilder:
    """Collects schema examples one by one into an in-memory COCO ground truth.

    `add(example)` encodes the amodal and visible masks as RLE right away, so the decoded
    examples need not stay in memory. Categories go through `coco_category` (with
    `class_agnostic` every instance gets 1); `has_classes` says whether any instance had a
    class of its own.
    """

    def __init__(self, class_agnostic: bool = False):
        self.class_agnostic = class_agnostic
        self.images: list[dict[str, Any]] = []
        self.annotations: list[dict[str, Any]] = []
        self.image_sizes: dict[int, tuple[int, int]] = {}
        self.num_empty_skipped = 0
        self.has_classes = False

    def add(self, example: Mapping[str, Any]) -> int:
        """Adds one schema example; returns its image_id. Instances whose amodal mask is empty
        cannot be matched by any prediction and are skipped (counted in `num_empty_skipped`)."""
        image = np.asarray(example["image"])
        if image.ndim != 3:
            raise ValueError(f"example image: expected [H, W, 3], got shape {image.shape}")
        h, w = int(image.shape[0]), int(image.shape[1])
        image_id = int(example["image_id"])
        if image_id in self.image_sizes:
            raise ValueError(f"duplicate image_id {image_id} in the evaluated examples")
        self.image_sizes[image_id] = (h, w)
        self.images.append({"id": image_id, "height": h, "width": w})
        objects = example["objects"]
        amodal = np.asarray(objects["amodal_mask"], bool).reshape(-1, h, w)
        visible = np.asarray(objects["visible_mask"], bool).reshape(-1, h, w)
        cats = np.asarray(objects["category_id"]).reshape(-1)
        rates = np.asarray(objects["occlusion_rate"], np.float32).reshape(-1)
        order = objects.get("order")
        order = np.zeros(len(cats), np.int64) if order is None else np.asarray(order).reshape(-1)
        if not (len(amodal) == len(visible) == len(cats) == len(rates) == len(order)):
            raise ValueError(
                f"image_id {image_id}: objects disagree in length (amodal {len(amodal)}, "
                f"visible {len(visible)}, category_id {len(cats)}, occlusion_rate {len(rates)}, "
                f"order {len(order)})"
            )
        for i in range(len(amodal)):
            area = int(amodal[i].sum())
            if area == 0:
                self.num_empty_skipped += 1
                continue
            box = box_lib.xyxy_to_xywh(box_lib.box_from_mask(amodal[i]))
            self.has_classes |= int(cats[i]) != NO_CLASS
            self.annotations.append(
                {
                    "id": len(self.annotations) + 1,
                    "image_id": image_id,
                    "category_id": coco_category(cats[i], self.class_agnostic),
                    "segmentation": mask_lib.encode_rle(amodal[i]),
                    "area": area,
                    "bbox": [float(v) for v in box],
                    "iscrowd": 0,
                    "visible_segmentation": mask_lib.encode_rle(visible[i]),
                    "occlusion_rate": float(rates[i]),
                    "instance_index": i,
                    "order": int(order[i]),
                }
            )
        return image_id

    def category_ids(self) -> list[int]:
        return sorted({a["category_id"] for a in self.annotations}) or [1]

    def build(self) -> COCO:
        """The ground truth as a pycocotools COCO object (built without file I/O)."""
        return make_coco(self.images, self.annotations, self.category_ids())


def make_coco(
    images: Sequence[Mapping[str, Any]],
    annotations: Sequence[Mapping[str, Any]],
    category_ids: Iterable[int],
) -> COCO:
    """A COCO object from in-memory images/annotations (pycocotools' index, no printing)."""
    coco = COCO()
    coco.dataset = {
        "images": [dict(im) for im in images],
        "annotations": [dict(a) for a in annotations],
        "categories": [{"id": int(c), "name": str(c)} for c in category_ids],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def ground_truth_from_examples(
    examples: Iterable[Mapping[str, Any]], class_agnostic: bool = False
) -> COCO:
    """Schema examples -> COCO ground truth (see GroundTruthBuilder)."""
    builder = GroundTruthBuilder(class_agnostic)
    for ex in examples:
        builder.add(ex)
    return builder.build()


def results_to_coco(coco_gt: COCO, results: Sequence[Mapping[str, Any]]) -> COCO:
    """Segmentation results -> COCO detections object over `coco_gt`'s images.

    Unlike `COCO.loadRes`, `area` is always the mask area (loadRes takes the box area when a
    result carries a `bbox`), the input dicts are not modified, and an empty list is allowed.
    Results must already be checked (see coco_results.parse_results).
    """
    anns = []
    for i, r in enumerate(results):
        rle = r["segmentation"]
        rle_b = {"size": rle["size"], "counts": rle["counts"]}
        ann = copy.copy(dict(r))
        ann["segmentation"] = rle_b
        ann["area"] = float(mask_utils.area(rle_b))
        ann["bbox"] = [float(v) for v in mask_utils.toBbox(rle_b)]
        ann["id"] = i + 1
        ann["iscrowd"] = 0
        anns.append(ann)
    return make_coco(coco_gt.dataset["images"], anns, coco_gt.getCatIds())


class _COCOevalWithIgnore(COCOeval):
    """COCOeval that also ignores the GT annotations whose ids are in `ignore_ids` (as COCO
    ignores GT outside an area range: detections matched to them count neither way), and can
    reuse the mask IoUs of an earlier run on the same GT and detections."""

    def __init__(self, *args, ignore_ids: Iterable[int] = (), ious: dict | None = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.ignore_ids = set(ignore_ids)
        self.cached_ious = ious

    def computeIoU(self, imgId, catId):  # noqa: N802 (pycocotools' name)
        if self.cached_ious is not None:
            return self.cached_ious[imgId, catId]
        return super().computeIoU(imgId, catId)

    def _prepare(self):
        super()._prepare()
        if self.ignore_ids:
            for gts in self._gts.values():
                for g in gts:
                    if g["id"] in self.ignore_ids:
                        g["ignore"] = 1


def run_cocoeval(
    coco_gt: COCO,
    coco_dt: COCO,
    class_agnostic: bool = False,
    ignore_gt_ids: Iterable[int] = (),
    ious: dict | None = None,
) -> COCOeval:
    """Runs COCOeval(iouType='segm') quietly (evaluate + accumulate + summarize).

    `ignore_gt_ids`: GT annotations to ignore; `ious`: `.ious` of an earlier run with the
    same GT, detections and class_agnostic setting (skips recomputing the mask IoUs).
    """
    ev = _COCOevalWithIgnore(coco_gt, coco_dt, iouType="segm", ignore_ids=ignore_gt_ids,
                             ious=ious)
    ev.params.imgIds = sorted(coco_gt.getImgIds())
    ev.params.useCats = 0 if class_agnostic else 1
    if class_agnostic:
        # useCats=0 still gathers GT and detections through params.catIds: list every id seen.
        seen = {a["category_id"] for a in coco_gt.dataset["annotations"]}
        seen |= {a["category_id"] for a in coco_dt.dataset["annotations"]}
        ev.params.catIds = sorted(seen | set(coco_gt.getCatIds()))
    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def stats_to_metrics(stats: Sequence[float]) -> dict[str, float]:
    """COCOeval.stats -> {'AP': ..., ..., 'AR100': ...} (fractions; -1 where undefined)."""
    return {name: float(stats[i]) for i, name in enumerate(METRIC_NAMES)}


def ap_at(ev: COCOeval, iou: float | None = None) -> float:
    """AP over all areas with 100 detections, averaged over IoU thresholds (or at one), from an
    accumulated COCOeval; -1 when no ground truth counts."""
    precision = ev.eval["precision"]  # [T, R, K, A, M]
    if iou is not None:
        t = np.flatnonzero(np.isclose(ev.params.iouThrs, iou))
        precision = precision[t]
    p = precision[..., 0, -1]
    p = p[p > -1]
    return float(p.mean()) if p.size else -1.0


def coco_metrics(
    coco_gt: COCO, results: Sequence[Mapping[str, Any]], class_agnostic: bool = False
) -> dict[str, float]:
    """AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100 of segmentation results on `coco_gt`."""
    ev = run_cocoeval(coco_gt, results_to_coco(coco_gt, results), class_agnostic)
    return stats_to_metrics(ev.stats)
