"""Pairwise occlusion-order accuracy of predicted masks, beside two heuristic baselines.

Pairs: in every image, the ground-truth instance pairs whose amodal masks overlap and whose
order the ground-truth masks define (`sameo_jax.order`: one's visible mask covers the other's
hidden region). Overlapping pairs without a defined order (the overlap is hidden by a third
object, or covered less than the threshold) are counted, not scored.

Answers, each from the visible masks of the predictions paired with the two instances (the
pairing of `occlusion.pair_predictions`; results must carry `visible_segmentation`):
- model: `sameo_jax.order.occlusion_order` of the predicted visible and amodal masks;
- area: the object with the larger visible area is behind (scene de-occlusion's rule on
  COCOA, Zhan et al. CVPR 2020);
- y_axis: the object whose visible mask reaches lower in the image is in front (the ground
  contact cue; equal bottom rows fall to the lower centroid).
An answer of "no order", a tie, or a pair without two distinct paired predictions
(`unanswered`) counts as wrong.
Per occlusion level, a pair belongs to the level of the instance behind.

Where the release gives depth ranks (`order`, 1 = front), the share of pairs on which they
agree with the masks' order is reported too.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pycocotools.coco import COCO

from sameo_jax import masks as mask_lib
from sameo_jax import order as order_lib
from sameo_jax.evaluation import occlusion

BASELINES = ("area", "y_axis")
ANSWERS = ("model", *BASELINES)


def _decode(seg: Mapping[str, Any]) -> np.ndarray:
    return mask_lib.decode_segmentation(seg, *seg["size"])


def _sign(x: np.ndarray) -> np.ndarray:
    return np.sign(x).astype(np.int8)


def area_order(visible: np.ndarray) -> np.ndarray:
    """[N, N] int8 order matrix of the area heuristic (larger visible area behind; equal 0)."""
    area = np.asarray(visible, bool).reshape(len(visible), -1).sum(axis=1)
    return _sign(area[None, :] - area[:, None])


def y_axis_order(visible: np.ndarray) -> np.ndarray:
    """[N, N] int8 order matrix of the y-axis heuristic: the lower bottom edge is in front,
    equal bottom rows go to the lower centroid row; empty masks are highest."""
    visible = np.asarray(visible, bool)
    rows = visible.any(axis=2)  # [N, H]
    h = visible.shape[1]
    index = np.arange(h)
    bottom = np.where(rows.any(axis=1), (rows * index).max(axis=1, initial=0), -1)
    counts = visible.sum(axis=2)  # pixels per row, [N, H]
    total = counts.sum(axis=1)
    centroid = np.where(total > 0, (counts @ index) / np.maximum(total, 1), -1.0)
    by_bottom = _sign(bottom[:, None] - bottom[None, :])
    by_centroid = _sign(centroid[:, None] - centroid[None, :])
    return np.where(by_bottom != 0, by_bottom, by_centroid).astype(np.int8)


class _Tally:
    """Correct answers per answer kind over counted pairs."""

    def __init__(self):
        self.pairs = 0
        self.correct = collections.Counter()

    def add(self, truth: int, answers: Mapping[str, int]) -> None:
        self.pairs += 1
        for kind, value in answers.items():
            self.correct[kind] += int(value == truth)

    def as_dict(self) -> dict[str, Any]:
        def acc(kind):
            return self.correct[kind] / self.pairs if self.pairs else None

        return {"pairs": self.pairs, "accuracy": acc("model"),
                "baselines": {k: acc(k) for k in BASELINES}}


def order_accuracy(
    coco_gt: COCO,
    results: Sequence[Mapping[str, Any]],
    class_agnostic: bool = False,
    min_fraction: float = order_lib.DEFAULT_MIN_FRACTION,
) -> dict[str, Any]:
    """Pairwise order accuracy of `results` on `coco_gt` (see the module doc).

    Returns {'pairs', 'accuracy', 'baselines': {'area', 'y_axis'}, 'levels': {level: same
    three}, 'unanswered' (pairs without two distinct paired predictions),
    'overlapping_without_order', 'release_order': {'pairs', 'agreement'} (None without
    ranks), 'results_without_visible', 'min_fraction'}; accuracies are fractions, None
    without pairs.
    """
    with_visible = [r for r in results if "visible_segmentation" in r]
    pairs_of = occlusion.pair_predictions(coco_gt, with_visible, class_agnostic)
    total, unanswered, unordered = _Tally(), 0, 0
    levels: dict[str, _Tally] = collections.defaultdict(_Tally)
    release = collections.Counter()
    for image_id in coco_gt.getImgIds():
        anns = coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=[image_id]))
        if len(anns) < 2:
            continue
        amodal = np.stack([_decode(a["segmentation"]) for a in anns])
        visible = np.stack([_decode(a["visible_segmentation"]) for a in anns]) & amodal
        truth = order_lib.occlusion_order(visible, amodal, min_fraction).matrix
        flat = amodal.reshape(len(anns), -1).astype(np.float32)
        overlap = (flat @ flat.T) > 0
        upper = np.triu(np.ones_like(overlap), k=1)
        unordered += int((overlap & upper & (truth == 0)).sum())
        ii, jj = np.nonzero(upper & (truth != 0))
        if ii.size == 0:
            continue
        answers = _answers([pairs_of.get(a["id"]) for a in anns], min_fraction)
        for i, j in zip(ii.tolist(), jj.tolist(), strict=True):
            t = int(truth[i, j])
            pi, pj = pairs_of.get(anns[i]["id"]), pairs_of.get(anns[j]["id"])
            unanswered += int(pi is None or pj is None or pi is pj)
            got = {k: int(m[i, j]) for k, m in answers.items()}
            total.add(t, got)
            back = anns[j] if t > 0 else anns[i]
            levels[occlusion.occlusion_level(float(back["occlusion_rate"]))].add(t, got)
            ranks = int(anns[i].get("order", 0)), int(anns[j].get("order", 0))
            if min(ranks) > 0 and ranks[0] != ranks[1]:
                release["pairs"] += 1
                release["agree"] += int((1 if ranks[0] < ranks[1] else -1) == t)
    out = total.as_dict()
    out["levels"] = {lv: levels[lv].as_dict() for lv in occlusion.LEVELS if lv in levels}
    out["unanswered"] = unanswered
    out["overlapping_without_order"] = unordered
    out["release_order"] = (
        {"pairs": release["pairs"], "agreement": release["agree"] / release["pairs"]}
        if release["pairs"] else None)
    out["results_without_visible"] = len(results) - len(with_visible)
    out["min_fraction"] = min_fraction
    return out


def _answers(preds: Sequence[Mapping[str, Any] | None], min_fraction: float
             ) -> dict[str, np.ndarray]:
    """Order matrices [N, N] of each answer kind from the N instances' paired predictions;
    rows and columns of instances without a prediction are 0."""
    n = len(preds)
    have = np.array([p is not None for p in preds])
    out = {k: np.zeros((n, n), np.int8) for k in ANSWERS}
    if have.sum() < 2:
        return out
    chosen = [p for p in preds if p is not None]
    amodal = np.stack([_decode(p["segmentation"]) for p in chosen])
    visible = np.stack([_decode(p["visible_segmentation"]) for p in chosen])
    idx = np.flatnonzero(have)
    cell = np.ix_(idx, idx)
    out["model"][cell] = order_lib.occlusion_order(visible, amodal, min_fraction).matrix
    out["area"][cell] = area_order(visible)
    out["y_axis"][cell] = y_axis_order(visible)
    return out
