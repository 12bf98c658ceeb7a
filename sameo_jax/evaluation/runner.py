"""Runs the predictor over a split: box prompts -> amodal masks -> COCO results.

All prompts of an image share one encoder pass; images are encoded in batches with
`Predictor.encode` (which spreads a batch over all devices). Every prediction gives two
results that share one mask: scored by the prompt's detector score alone (`det`), and by the
refined score det_score * predicted IoU (`refined`). GT prompts have detector score 1.
With `with_visible`, the predictor's visible decoder runs on the same embedding and prompts,
and each result also carries `visible_segmentation` (for occlusion order).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import tqdm

from sameo_jax import boxes as box_lib
from sameo_jax import masks as mask_lib
from sameo_jax.evaluation import coco_eval, coco_results

PROMPT_KINDS = ("gt_amodal", "gt_modal")
CANDIDATES = ("best", "single")
SCORE_KINDS = ("det", "refined")


@dataclasses.dataclass(frozen=True)
class ImagePrompts:
    """The box prompts of one image.

    boxes [Q, 4] float32 xyxy (original pixels), category_ids [Q] int, det_scores [Q] float,
    gt_instance [Q] int (index of the GT instance a prompt came from; -1 for detections).
    """

    boxes: np.ndarray
    category_ids: np.ndarray
    det_scores: np.ndarray
    gt_instance: np.ndarray

    def __len__(self) -> int:
        return int(self.boxes.shape[0])


def gt_prompts(example: Mapping[str, Any], kind: str, class_agnostic: bool = False
               ) -> ImagePrompts:
    """Oracle prompts: every GT instance's amodal (`gt_amodal`) or visible (`gt_modal`) box.

    Instances with an empty amodal mask are left out (the ground truth skips them too).
    """
    if kind not in PROMPT_KINDS:
        raise ValueError(f"unknown prompt kind {kind!r}; choose one of {PROMPT_KINDS}")
    objects = example["objects"]
    key = "amodal_bbox" if kind == "gt_amodal" else "visible_bbox"
    boxes = np.asarray(objects[key], np.float32).reshape(-1, 4)
    amodal = np.asarray(objects["amodal_mask"], bool)
    keep = np.flatnonzero(amodal.reshape(len(amodal), -1).any(axis=1))
    boxes = box_lib.validate_boxes(boxes[keep], f"image_id {int(example['image_id'])} {key}")
    cats = np.array([coco_eval.coco_category(c, class_agnostic)
                     for c in np.asarray(objects["category_id"]).reshape(-1)[keep]], np.int64)
    return ImagePrompts(boxes, cats, np.ones(len(keep), np.float32), keep.astype(np.int64))


def detection_prompts(detections: Sequence[coco_results.Detection], max_per_image: int = 100
                      ) -> ImagePrompts:
    """Prompts from one image's detections: the `max_per_image` highest-scoring ones."""
    order = sorted(range(len(detections)), key=lambda i: -detections[i].score)[:max_per_image]
    chosen = [detections[i] for i in order]
    return ImagePrompts(
        boxes=np.stack([d.box for d in chosen]).astype(np.float32).reshape(-1, 4),
        category_ids=np.array([d.category_id for d in chosen], np.int64),
        det_scores=np.array([d.score for d in chosen], np.float32),
        gt_instance=np.full(len(chosen), -1, np.int64),
    )


def refined_scores(det_scores: np.ndarray, predicted_iou: np.ndarray) -> np.ndarray:
    """det_score * predicted IoU, the IoU clipped to [0, 1] (the IoU head is unbounded)."""
    return np.asarray(det_scores, np.float32) * np.clip(np.asarray(predicted_iou, np.float32),
                                                       0.0, 1.0)


def image_results(
    image_id: int,
    prompts: ImagePrompts,
    masks: np.ndarray,
    predicted_iou: np.ndarray,
    visible_masks: np.ndarray | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """One image's predictions -> {'det': results, 'refined': results} (same masks).

    masks: [Q, H, W] bool; predicted_iou: [Q] float; visible_masks: optional [Q, H, W] bool,
    written as `visible_segmentation`.
    """
    refined = refined_scores(prompts.det_scores, predicted_iou)
    out: dict[str, list[dict[str, Any]]] = {k: [] for k in SCORE_KINDS}
    for q in range(len(prompts)):
        extra = {"predicted_iou": round(float(predicted_iou[q]), 5)}
        if prompts.gt_instance[q] >= 0:
            extra["gt_instance"] = int(prompts.gt_instance[q])
        if visible_masks is not None:
            extra["visible_segmentation"] = mask_lib.encode_rle(visible_masks[q])
        det = coco_results.mask_result(
            image_id, int(prompts.category_ids[q]), masks[q], float(prompts.det_scores[q]),
            **extra,
        )
        out["det"].append(det)
        out["refined"].append({**det, "score": float(refined[q])})
    return out


def predict_masks(predictor, image: np.ndarray, embedding, prompts: ImagePrompts,
                  candidate: str = "best", chunk: int = 64, decoder: str = "amodal"
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Amodal (or, with decoder='visible', visible) masks for one image's prompts:
    ([Q, H, W] bool, [Q] predicted IoU).

    `candidate`: 'best' = best of the 3 multimask outputs by predicted IoU; 'single' = the
    single-mask output. Prompts go through the decoder `chunk` at a time.
    """
    if candidate not in CANDIDATES:
        raise ValueError(f"unknown candidate {candidate!r}; choose one of {CANDIDATES}")
    predictor.set_image(image, embedding=embedding)
    masks, ious = [], []
    for start in range(0, len(prompts), chunk):
        out = predictor.predict(
            boxes=prompts.boxes[start : start + chunk],
            multimask=candidate == "best",
            best_only=True,
            decoder=decoder,
        )
        masks.append(np.asarray(out.masks)[:, 0])
        ious.append(np.asarray(out.iou)[:, 0])
    h, w = np.asarray(image).shape[:2]
    if not masks:
        return np.zeros((0, h, w), bool), np.zeros((0,), np.float32)
    return np.concatenate(masks).astype(bool), np.concatenate(ious).astype(np.float32)


def run_split(
    predictor,
    source,
    indices: Iterable[int],
    prompts_for: Callable[[Mapping[str, Any]], ImagePrompts | None],
    candidate: str = "best",
    batch_size: int = 8,
    on_example: Callable[[Mapping[str, Any]], None] | None = None,
    progress: bool = True,
    with_visible: bool = False,
) -> dict[str, list[dict[str, Any]]]:
    """Predicts amodal masks for every prompt of the chosen examples of `source`.

    Args:
      predictor: a `sameo_jax.predictor.Predictor`.
      source: random-access source of schema examples (`source[i]`).
      indices: which examples to run, in order.
      prompts_for: example -> its prompts (None or empty: the image is not encoded).
      candidate: 'best' | 'single' (see `predict_masks`).
      batch_size: images per encoder call (spread over all devices by the predictor).
      on_example: called with every example read (e.g. to build the ground truth).
      progress: show a tqdm bar.
      with_visible: also run the predictor's visible decoder (same embedding, same prompts).

    Returns:
      {'det': results, 'refined': results}: COCO segmentation results (RLE counts as str).
    """
    if candidate not in CANDIDATES:
        raise ValueError(f"unknown candidate {candidate!r}; choose one of {CANDIDATES}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    indices = list(indices)
    results: dict[str, list[dict[str, Any]]] = {k: [] for k in SCORE_KINDS}
    pending: list[tuple[Mapping[str, Any], ImagePrompts]] = []

    def flush() -> None:
        if not pending:
            return
        embeddings = predictor.encode([np.asarray(ex["image"]) for ex, _ in pending])
        for j, (ex, prompts) in enumerate(pending):
            masks, ious = predict_masks(predictor, ex["image"], embeddings[j], prompts, candidate)
            visible = None
            if with_visible:
                visible = predict_masks(predictor, ex["image"], embeddings[j], prompts,
                                        candidate, decoder="visible")[0]
            for kind, rs in image_results(int(ex["image_id"]), prompts, masks, ious,
                                          visible).items():
                results[kind].extend(rs)
        pending.clear()

    bar = tqdm.tqdm(indices, desc="evaluating", unit="img", disable=not progress)
    for index in bar:
        example = source[index]
        if on_example is not None:
            on_example(example)
        prompts = prompts_for(example)
        if prompts is None or len(prompts) == 0:
            continue
        pending.append((example, prompts))
        if len(pending) >= batch_size:
            flush()
    flush()
    bar.close()
    return results


class DetectionPrompts:
    """Serves a detector file's boxes image by image, checking and counting as it goes.

    Structure (keys, boxes, scores) is checked when the file is read; visible-mask sizes when
    each image is read (its size is known then); detections of images never read are counted
    by `finish()`, which raises when no detection was usable.
    """

    def __init__(self, path: str, max_per_image: int = 100, limited: bool = False):
        entries = coco_results.read_json_list(path)
        self.detections, self.report = coco_results.parse_detections(entries, path)
        self.pending = coco_results.group_by_image(self.detections)
        self.max_per_image = max_per_image
        self.limited = limited  # only part of the split is evaluated (--max_images)
        self.num_run = 0

    def __call__(self, example: Mapping[str, Any]) -> ImagePrompts | None:
        image_id = int(example["image_id"])
        hw = tuple(np.asarray(example["image"]).shape[:2])
        chosen = []
        for det in self.pending.pop(image_id, []):
            if det.segmentation is not None:
                problem = coco_results.check_segmentation(det.segmentation, hw)
                if problem is not None:
                    self.report.skip(det.index, *problem)
                    continue
            chosen.append(det)
        if len(chosen) > self.max_per_image:
            ranked = sorted(chosen, key=lambda d: -d.score)
            for det in ranked[self.max_per_image :]:
                self.report.skip(
                    det.index, f"a score rank > {self.max_per_image} in its image",
                    f"image_id {image_id}, score {det.score:g}",
                )
        if not chosen:
            return None
        prompts = detection_prompts(chosen, self.max_per_image)
        self.num_run += len(prompts)
        return prompts

    def share(self) -> dict[str, Any]:
        """What this process learnt (JSON-able), for `merge` on another process."""
        return {"problems": dict(self.report.problems), "examples": self.report.examples,
                "num_run": self.num_run}

    def merge(self, shares: Sequence[Mapping[str, Any]], read_elsewhere: Iterable[int]) -> None:
        """Adds what other processes learnt from their images (`share()` of each), and drops
        the images they read (`read_elsewhere`, their image ids) from those never read."""
        for share in shares:
            for problem, count in share["problems"].items():
                self.report.problems[problem] += count
                self.report.examples.setdefault(problem, share["examples"][problem])
            self.num_run += share["num_run"]
        for image_id in read_elsewhere:
            self.pending.pop(int(image_id), None)

    def finish(self) -> coco_results.EntryReport:
        """Counts the detections of images that were never read; returns the report."""
        problem = "an image outside --max_images" if self.limited else "an unknown image_id"
        for image_id, rest in self.pending.items():
            for det in rest:
                self.report.skip(det.index, problem, f"image_id {image_id}")
        self.pending = {}
        self.report.kept = self.num_run
        if self.num_run == 0:
            raise ValueError(f"no usable detections: {self.report.summary()}")
        return self.report
