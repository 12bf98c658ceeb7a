"""Amodal-LVIS synthesis (SAMEO): synthetic occlusion of complete objects, dual annotation.

From any COCO/LVIS-format instance source (modal masks only) this makes amodal training data:

1. Complete-object collection (`complete_by_geometry`, `complete_by_model`): keep instances
   judged unoccluded.
   - With a model, as the paper does: `predict_amodal(image, box) -> [H, W] bool` (any
     amodal predictor, passed in as a plain function; box = the instance's modal box, xyxy
     original pixels) predicts the full shape; an instance is complete when the IoU of that
     prediction with its ground-truth modal mask is >= `model_iou_threshold` (nothing of it
     is hidden, so the full shape equals the visible one).
   - Without a model, geometric rules: the mask keeps at least `border_margin` pixels from
     the image border (not cut by the frame) and its box overlaps no other instance's box
     (nothing in front of it). Both paths also drop masks smaller than `min_area` pixels.
2. Synthetic occlusion (`synthesize_occlusion`): each complete object (the target) is paired
   with a random complete object from another image (the occluder). The occluder is cut out
   by its mask, resized with its aspect ratio kept so that sqrt(occluder area) / sqrt(target
   area) is uniform in `occluder_scale` (sizes normalised), and placed by box with
   `place_occluder` so the hidden fraction of the target lands in `occlusion_range` (a
   curriculum passes a different range per call, e.g. `curriculum_range`). The occluder
   never covers the image's other complete objects. Annotations: target amodal = its full
   mask, visible = what the occluder leaves; occluder and the other complete objects are
   unoccluded (amodal = visible). Instances that are not complete are not annotated, since
   their amodal shape is unknown.
3. Dual annotation: the original image, with all its complete objects unoccluded, is emitted
   too (before its synthesized versions), so every occluded object also appears unoccluded.

Deterministic per seed: the occluder and placement of target k of image i come from the
random stream (seed, i, k), independent of iteration order.

Public API:
    SynthesisConfig, SynthesisStats, InstanceImage
    CocoInstanceSource(annotation_file, image_dir)     # random-access, [i] -> InstanceImage
    DemoInstanceSource(num_images, image_size, seed)   # modal view of the demo scenes
    complete_by_geometry(masks, *, border_margin, min_area) -> bool [N]
    complete_by_model(image, masks, predict_amodal, *, iou_threshold, min_area) -> bool [N]
    place_occluder(target, occluder, occlusion_range, rng, *, avoid, tries)
    synthesize(source, *, seed, config, predict_amodal, stats) -> Iterator[example]
    synthesize_from_coco(annotation_file, image_dir, *, seed, config, ...) -> Iterator[example]
    curriculum_range(progress, start, end) -> (lo, hi)

Preview: `python -m sameo_jax.data.amodal_lvis --preview out.png [--source demo |
--source ANNOTATIONS.json --image_dir DIR] [--num 6] [--seed 0] [--min_area 1024]
[--overwrite]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import pathlib
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from PIL import Image

from sameo_jax import image_io
from sameo_jax.boxes import box_from_mask, boxes_from_masks
from sameo_jax.masks import decode_segmentation, mask_iou

log = logging.getLogger(__name__)

SOURCE_NAME = "amodal_lvis"
# Synthesized example ids: SYNTHETIC_ID_STRIDE * (1 + instance index) + original image id
# (unique while original ids stay below the stride, as in COCO and LVIS).
SYNTHETIC_ID_STRIDE = 10**9

PredictAmodal = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class SynthesisConfig:
    """Knobs of the synthesis (defaults follow the description in the module docstring)."""

    occlusion_range: tuple[float, float] = (0.1, 0.6)  # hidden fraction of each target
    occluder_scale: tuple[float, float] = (0.7, 1.2)  # sqrt-area ratio occluder / target
    min_area: int = 32 * 32  # smaller instances are never used (pixels)
    border_margin: int = 2  # geometric rule: pixels to keep from the image border
    model_iou_threshold: float = 0.9  # model rule: IoU(predicted amodal, GT modal) >= this
    occluder_tries: int = 4  # occluders tried per target before giving up
    placement_tries: int = 8  # directions tried per occluder
    dual: bool = True  # also emit each original image with its complete objects

    def __post_init__(self):
        lo, hi = self.occlusion_range
        if not 0.0 < lo <= hi < 1.0:
            raise ValueError(
                f"occlusion_range must satisfy 0 < lo <= hi < 1, got {self.occlusion_range}")
        if not 0.0 < self.occluder_scale[0] <= self.occluder_scale[1]:
            raise ValueError(f"occluder_scale must be 0 < lo <= hi, got {self.occluder_scale}")
        if not 0.0 < self.model_iou_threshold <= 1.0:
            raise ValueError(
                f"model_iou_threshold must be in (0, 1], got {self.model_iou_threshold}")


@dataclasses.dataclass
class SynthesisStats:
    """Counts of one synthesis run (what was read, kept, made and given up)."""

    images: int = 0
    images_skipped: int = 0  # unreadable images (warned)
    instances: int = 0
    instances_bad_mask: int = 0  # undecodable segmentations (warned)
    complete: int = 0
    dual_examples: int = 0
    occluded_examples: int = 0
    placement_failed: int = 0  # targets for which no occluder could be placed in range

    def lines(self) -> list[str]:
        return [f"{k}: {v}" for k, v in dataclasses.asdict(self).items()]


@dataclasses.dataclass
class InstanceImage:
    """One image of an instance source: modal masks only (what COCO / LVIS provide)."""

    image: np.ndarray  # [H, W, 3] uint8
    image_id: int
    masks: np.ndarray  # [N, H, W] bool modal masks
    category_ids: np.ndarray  # [N] int64


# ----------------------------------------------------------------------------- sources


class CocoInstanceSource:
    """COCO / LVIS instance annotations as a random-access source of `InstanceImage`.

    annotation_file: COCO-format JSON (`images`, `annotations` with `segmentation` polygons
    or RLE; LVIS files work too: an image without `file_name` uses its `coco_url` basename).
    image_dir: folder holding the image files. Crowd annotations (`iscrowd` = 1) are ignored.
    Images are in increasing `id` order. An unreadable image gives `None` (with a warning);
    an undecodable segmentation is skipped with a warning (see `bad_masks`).
    """

    def __init__(self, annotation_file: str | os.PathLike, image_dir: str | os.PathLike):
        path = pathlib.Path(annotation_file)
        if not path.is_file():
            raise FileNotFoundError(f"annotation file not found: {path}")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        for key in ("images", "annotations"):
            if not isinstance(data, dict) or not isinstance(data.get(key), list):
                raise ValueError(f"{path}: missing list field {key!r} (not COCO format)")
        self.path = path
        self.image_dir = pathlib.Path(image_dir)
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.image_dir}")
        self._images = []
        for k, im in enumerate(data["images"]):
            for field in ("id", "height", "width"):
                if field not in im:
                    raise ValueError(f"{path}: images[{k}] has no field {field!r}")
            name = im.get("file_name") or os.path.basename(str(im.get("coco_url", "")))
            if not name:
                raise ValueError(f"{path}: images[{k}] has neither 'file_name' nor 'coco_url'")
            self._images.append((int(im["id"]), name, int(im["height"]), int(im["width"])))
        self._images.sort()
        known = {im[0] for im in self._images}
        if len(known) != len(self._images):  # annotations could not be told apart
            ids = [im[0] for im in self._images]
            dup = next(i for i, j in zip(ids, ids[1:], strict=False) if i == j)
            raise ValueError(f"{path}: image id {dup} is listed more than once")
        self._anns: dict[int, list[dict[str, Any]]] = {i: [] for i in known}
        for k, ann in enumerate(data["annotations"]):
            for field in ("image_id", "segmentation", "category_id"):
                if field not in ann:
                    raise ValueError(f"{path}: annotations[{k}] has no field {field!r}")
            if ann.get("iscrowd", 0):
                continue
            if int(ann["image_id"]) not in known:
                raise ValueError(
                    f"{path}: annotations[{k}] refers to unknown image_id {ann['image_id']}")
            self._anns[int(ann["image_id"])].append(ann)
        self.bad_masks = 0

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index: int) -> InstanceImage | None:
        image_id, name, height, width = self._images[index]
        try:  # the image's folder only (no absolute path, '..' or symlink out); any PIL mode
            file = image_io.path_inside(self.image_dir, name)
            image = image_io.read_rgb(file)
        except image_io.ImageError as e:
            log.warning("skipping unreadable image: %s", e)
            return None
        if image.shape[:2] != (height, width):
            log.warning("skipping %s: size %s disagrees with the annotation's %s", file,
                        image.shape[:2], (height, width))
            return None
        masks, categories = [], []
        for ann in self._anns[image_id]:
            try:
                mask = decode_segmentation(ann["segmentation"], height, width)
            except (ValueError, TypeError, KeyError) as e:
                log.warning("%s: skipping annotation %s of image %d: %s", self.path,
                            ann.get("id", "?"), image_id, e)
                self.bad_masks += 1
                continue
            masks.append(mask)
            categories.append(int(ann["category_id"]))
        masks_arr = np.stack(masks) if masks else np.zeros((0, height, width), bool)
        return InstanceImage(image, image_id, masks_arr, np.asarray(categories, np.int64))


class DemoInstanceSource:
    """The procedural demo scenes seen as a COCO-like source: modal masks only.

    Used for previews and tests; the amodal truth of the scenes is dropped on purpose, so the
    synthesis has to find complete objects on its own.
    """

    def __init__(self, num_images: int, image_size: int = 256, seed: int = 0):
        from sameo_jax.data.demo_scenes import DemoSource

        self._scenes = DemoSource(num_images, image_size, seed)

    def __len__(self) -> int:
        return len(self._scenes)

    def __getitem__(self, index: int) -> InstanceImage:
        ex = self._scenes[index]
        o = ex["objects"]
        return InstanceImage(ex["image"], int(ex["image_id"]), o["visible_mask"],
                             o["category_id"])


# ----------------------------------------------------------------------------- complete objects


def complete_by_geometry(masks: np.ndarray, *, border_margin: int = 2,
                         min_area: int = 0) -> np.ndarray:
    """Geometric completeness rule. masks: [N, H, W] bool modal masks -> [N] bool.

    Complete = area >= min_area, the mask keeps >= border_margin pixels from every image
    border, and its box overlaps (positive-area intersection) no other instance's box.
    """
    masks = np.asarray(masks, bool)
    n, height, width = masks.shape
    boxes = boxes_from_masks(masks)
    area = masks.reshape(n, -1).sum(axis=1)
    m = border_margin
    inside = ((boxes[:, 0] >= m) & (boxes[:, 1] >= m) & (boxes[:, 2] <= width - m)
              & (boxes[:, 3] <= height - m))
    ix = np.minimum(boxes[:, None, 2], boxes[None, :, 2]) - np.maximum(boxes[:, None, 0],
                                                                       boxes[None, :, 0])
    iy = np.minimum(boxes[:, None, 3], boxes[None, :, 3]) - np.maximum(boxes[:, None, 1],
                                                                       boxes[None, :, 1])
    overlap = (ix > 0) & (iy > 0)
    np.fill_diagonal(overlap, False)
    overlap &= (area > 0)[None, :]  # empty masks have no box to overlap with
    return (area >= max(min_area, 1)) & inside & ~overlap.any(axis=1)


def complete_by_model(image: np.ndarray, masks: np.ndarray, predict_amodal: PredictAmodal, *,
                      iou_threshold: float = 0.9, min_area: int = 0) -> np.ndarray:
    """Model completeness rule (SAMEO's). image: [H, W, 3] uint8, masks: [N, H, W] bool.

    For each instance, predict_amodal(image, modal box [4] xyxy) -> [H, W] bool; the instance
    is complete when IoU(prediction, modal mask) >= iou_threshold and area >= min_area.
    Returns [N] bool.
    """
    masks = np.asarray(masks, bool)
    out = np.zeros(len(masks), bool)
    for k, mask in enumerate(masks):
        area = int(mask.sum())
        if area < max(min_area, 1):
            continue
        pred = np.asarray(predict_amodal(image, box_from_mask(mask)))
        if pred.shape != mask.shape:
            raise ValueError(f"predict_amodal returned shape {pred.shape}; expected the image's "
                             f"[H, W] = {mask.shape}")
        out[k] = mask_iou(pred.astype(bool), mask) >= iou_threshold
    return out


# ----------------------------------------------------------------------------- occlusion


def curriculum_range(progress: float, start: tuple[float, float] = (0.05, 0.3),
                     end: tuple[float, float] = (0.3, 0.7)) -> tuple[float, float]:
    """Occlusion range for a curriculum: linear from `start` (progress 0) to `end` (1)."""
    t = min(max(float(progress), 0.0), 1.0)
    return (start[0] + t * (end[0] - start[0]), start[1] + t * (end[1] - start[1]))


def occlusion_fraction(target: np.ndarray, occluder: np.ndarray, top: int, left: int) -> float:
    """Fraction of `target` ([H, W] bool, image frame) covered by `occluder` ([h, w] bool)
    pasted with its top-left corner at (top, left); the occluder must lie inside the image."""
    h, w = occluder.shape
    area = int(target.sum())
    if area == 0:
        return 0.0
    covered = np.count_nonzero(target[top : top + h, left : left + w] & occluder)
    return covered / area


def place_occluder(
    target: np.ndarray,
    occluder: np.ndarray,
    occlusion_range: tuple[float, float],
    rng: np.random.Generator,
    *,
    avoid: np.ndarray | None = None,
    tries: int = 8,
) -> tuple[int, int, float] | None:
    """Positions an occluder by its box so it hides a chosen fraction of a target object.

    target: [H, W] bool full (amodal) mask of the object to occlude, in the image frame.
    occluder: [h, w] bool mask of the occluder cropped to its box (h <= H, w <= W).
    occlusion_range: (lo, hi); the covered fraction |target & occluder| / |target| must land
      in [lo, hi]. A goal fraction is drawn uniformly from the range and a random direction;
      the occluder's box centre slides from the target's box centre outwards along that
      direction and a bisection finds the distance where the covered fraction crosses the
      goal (the fraction falls as the boxes separate). The occluder always lies fully inside
      the image.
    avoid: optional [H, W] bool of pixels the occluder must not cover (other objects).
    Returns (top, left, fraction) or None when `tries` directions all fail.
    """
    lo, hi = occlusion_range
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"occlusion_range must satisfy 0 <= lo <= hi <= 1, got {occlusion_range}")
    height, width = target.shape
    h, w = occluder.shape
    if h > height or w > width or h == 0 or w == 0:
        return None
    ys = np.flatnonzero(target.any(axis=1))
    xs = np.flatnonzero(target.any(axis=0))
    if ys.size == 0:
        return None
    area = float(np.count_nonzero(target))

    def fraction(top: int, left: int) -> float:
        return np.count_nonzero(target[top : top + h, left : left + w] & occluder) / area

    cy, cx = (ys[0] + ys[-1] + 1) / 2.0, (xs[0] + xs[-1] + 1) / 2.0
    reach = 0.5 * (math.hypot(ys[-1] + 1 - ys[0], xs[-1] + 1 - xs[0]) + math.hypot(h, w))

    def corner(dist: float, dy: float, dx: float) -> tuple[int, int]:
        top = int(round(cy + dist * dy - h / 2.0))
        left = int(round(cx + dist * dx - w / 2.0))
        return min(max(top, 0), height - h), min(max(left, 0), width - w)

    def accept(top: int, left: int) -> tuple[int, int, float] | None:
        frac = fraction(top, left)
        if not lo <= frac <= hi:
            return None
        if avoid is not None and np.any(avoid[top : top + h, left : left + w] & occluder):
            return None
        return top, left, frac

    for _ in range(tries):
        goal = rng.uniform(lo, hi)
        angle = rng.uniform(0.0, 2.0 * math.pi)
        dy, dx = math.sin(angle), math.cos(angle)
        near, far = 0.0, reach
        if fraction(*corner(near, dy, dx)) < goal:
            continue  # even centred, this occluder cannot hide enough
        for _ in range(12):
            mid = 0.5 * (near + far)
            if fraction(*corner(mid, dy, dx)) >= goal:
                near = mid
            else:
                far = mid
        for dist in (near, far):
            found = accept(*corner(dist, dy, dx))
            if found is not None:
                return found
    return None


def _cut_out(image: np.ndarray, mask: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Crops an object to its box and resizes it by `scale` (aspect kept).

    Returns pixels [h, w, 3] uint8 and mask [h, w] bool (bilinear, mask thresholded at 0.5).
    """
    x0, y0, x1, y1 = (int(v) for v in box_from_mask(mask))
    pixels, local = image[y0:y1, x0:x1], mask[y0:y1, x0:x1]
    h = max(1, int(round(local.shape[0] * scale)))
    w = max(1, int(round(local.shape[1] * scale)))
    if (h, w) != local.shape:
        pixels = np.asarray(Image.fromarray(pixels).resize((w, h), Image.BILINEAR))
        weight = Image.fromarray(local.astype(np.float32)).resize((w, h), Image.BILINEAR)
        local = np.asarray(weight) >= 0.5
    return pixels, local


def synthesize_occlusion(
    target_image: InstanceImage,
    target: int,
    complete: np.ndarray,
    occluder_image: InstanceImage,
    occluder: int,
    config: SynthesisConfig,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, int, int] | None:
    """Pastes one occluder over one complete target; returns None if no placement works.

    target_image / occluder_image: the two images; target / occluder: instance indices.
    complete: [N] bool complete flags of target_image's instances (the occluder avoids the
    other complete ones). Returns (image [H, W, 3] uint8 with the occluder pasted, the
    occluder's mask in that image [H, W] bool, top, left).
    """
    height, width = target_image.image.shape[:2]
    t_mask = target_image.masks[target]
    o_mask = occluder_image.masks[occluder]
    ratio = math.sqrt(t_mask.sum() / max(int(o_mask.sum()), 1))
    x0, y0, x1, y1 = box_from_mask(o_mask)
    scale = ratio * rng.uniform(*config.occluder_scale)
    scale = min(scale, height / max(y1 - y0, 1.0), width / max(x1 - x0, 1.0))
    pixels, local = _cut_out(occluder_image.image, o_mask, scale)
    if not local.any():
        return None
    others = complete.copy()
    others[target] = False
    avoid = target_image.masks[others].any(axis=0) if others.any() else None
    placed = place_occluder(t_mask, local, config.occlusion_range, rng, avoid=avoid,
                            tries=config.placement_tries)
    if placed is None:
        return None
    top, left, _ = placed
    h, w = local.shape
    image = target_image.image.copy()
    image[top : top + h, left : left + w][local] = pixels[local]
    full = np.zeros((height, width), bool)
    full[top : top + h, left : left + w] = local
    return image, full, top, left


def _example(image: np.ndarray, image_id: int, amodal: list[np.ndarray],
             visible: list[np.ndarray], categories: list[int]) -> dict[str, Any]:
    height, width = image.shape[:2]
    a = np.stack(amodal) if amodal else np.zeros((0, height, width), bool)
    v = np.stack(visible) if visible else np.zeros((0, height, width), bool)
    area_a = a.reshape(len(a), -1).sum(axis=1).astype(np.float32)
    area_v = v.reshape(len(v), -1).sum(axis=1).astype(np.float32)
    return {
        "image": image,
        "image_id": np.int64(image_id),
        "source": SOURCE_NAME,
        "objects": {
            "amodal_mask": a,
            "visible_mask": v,
            "amodal_bbox": boxes_from_masks(a),
            "visible_bbox": boxes_from_masks(v),
            "category_id": np.asarray(categories, np.int64),
            "occlusion_rate": (1.0 - area_v / np.maximum(area_a, 1.0)).astype(np.float32),
        },
    }


def _complete_flags(item: InstanceImage, config: SynthesisConfig,
                    predict_amodal: PredictAmodal | None) -> np.ndarray:
    if predict_amodal is None:
        return complete_by_geometry(item.masks, border_margin=config.border_margin,
                                    min_area=config.min_area)
    return complete_by_model(item.image, item.masks, predict_amodal,
                             iou_threshold=config.model_iou_threshold, min_area=config.min_area)


def synthesize(
    source: Sequence[InstanceImage | None],
    *,
    seed: int = 0,
    config: SynthesisConfig = SynthesisConfig(),
    predict_amodal: PredictAmodal | None = None,
    stats: SynthesisStats | None = None,
) -> Iterator[dict[str, Any]]:
    """Yields Amodal-LVIS examples (project schema, numpy) from an instance source.

    source: random-access (`len`, `[i]` -> InstanceImage, or None for an unreadable image).
    Per image with complete objects, in source order: the dual example (original image, its
    complete objects unoccluded; `image_id` = the original id) when `config.dual`, then one
    synthesized example per complete object that could be occluded in range (`image_id` =
    SYNTHETIC_ID_STRIDE * (1 + instance index) + original id). Deterministic per seed.
    stats: optional SynthesisStats filled in as the generator runs.
    """
    stats = stats if stats is not None else SynthesisStats()
    # Pass 1: complete objects of every image (the occluder pool).
    flags: list[np.ndarray | None] = []
    for i in range(len(source)):
        item = source[i]
        if item is None:
            stats.images_skipped += 1
            flags.append(None)
            continue
        stats.images += 1
        stats.instances += len(item.masks)
        flags.append(_complete_flags(item, config, predict_amodal))
        stats.complete += int(flags[-1].sum())
    pool = [(i, int(k)) for i, f in enumerate(flags) if f is not None for k in np.flatnonzero(f)]

    # Pass 2: dual + occluded examples.
    for i, f in enumerate(flags):
        if f is None or not f.any():
            continue
        item = source[i]
        complete_idx = [int(k) for k in np.flatnonzero(f)]
        cats = [int(item.category_ids[k]) for k in complete_idx]
        full = [item.masks[k] for k in complete_idx]
        if config.dual:
            stats.dual_examples += 1
            yield _example(item.image, item.image_id, full, full, cats)
        if len(pool) == len(complete_idx):  # no complete object in any other image
            stats.placement_failed += len(complete_idx)
            continue
        for k in complete_idx:
            rng = np.random.default_rng([seed, i, k])
            result = None
            for _ in range(config.occluder_tries):
                j, m = i, -1
                while j == i:  # uniform over the other images' complete objects
                    j, m = pool[int(rng.integers(len(pool)))]
                other = source[j]
                result = synthesize_occlusion(item, k, f, other, m, config, rng)
                if result is not None:
                    break
            if result is None:
                stats.placement_failed += 1
                continue
            image, occluder_mask, _, _ = result
            visible = [mask & ~occluder_mask if kk == k else mask
                       for kk, mask in zip(complete_idx, full, strict=True)]
            stats.occluded_examples += 1
            yield _example(
                image, SYNTHETIC_ID_STRIDE * (1 + k) + item.image_id,
                full + [occluder_mask], visible + [occluder_mask],
                cats + [int(other.category_ids[m])],
            )


def synthesize_from_coco(
    annotation_file: str | os.PathLike,
    image_dir: str | os.PathLike,
    *,
    seed: int = 0,
    config: SynthesisConfig = SynthesisConfig(),
    predict_amodal: PredictAmodal | None = None,
    stats: SynthesisStats | None = None,
) -> Iterator[dict[str, Any]]:
    """`synthesize` over a COCO / LVIS annotation file and its image folder (for builders).

    Yields schema examples; their `image_id`s are unique and make good record keys.
    """
    source = CocoInstanceSource(annotation_file, image_dir)
    stats = stats if stats is not None else SynthesisStats()
    yield from synthesize(source, seed=seed, config=config, predict_amodal=predict_amodal,
                          stats=stats)
    stats.instances_bad_mask += source.bad_masks


# ----------------------------------------------------------------------------- preview


def _resize_masks(masks: np.ndarray, wh: tuple[int, int]) -> np.ndarray:
    """[N, H, W] bool -> [N, h, w] bool (nearest), wh = (w, h)."""
    if len(masks) == 0:
        return np.zeros((0, wh[1], wh[0]), bool)
    return np.stack([np.asarray(Image.fromarray(m).resize(wh, Image.NEAREST)) for m in masks])


def preview_grid(examples: Sequence[dict[str, Any]], size: int = 192) -> np.ndarray:
    """One row per example: image | visible masks | amodal masks with occlusion rates.

    Returns [rows * (size + title), 3 * size + gaps, 3] uint8.
    """
    from sameo_jax.visualize import hstack_panels, overlay_masks

    rows = []
    for ex in examples:
        o = ex["objects"]
        h, w = ex["image"].shape[:2]
        s = size / max(h, w)
        hw = (max(1, round(w * s)), max(1, round(h * s)))
        image = np.asarray(Image.fromarray(ex["image"]).resize(hw, Image.BILINEAR))
        vis, amo = _resize_masks(o["visible_mask"], hw), _resize_masks(o["amodal_mask"], hw)
        texts = [f"{r:.2f}" for r in o["occlusion_rate"]]
        kind = "synthetic" if ex["image_id"] >= SYNTHETIC_ID_STRIDE else "dual (original)"
        rows.append(hstack_panels(
            [image, overlay_masks(image, vis, o["visible_bbox"] * s),
             overlay_masks(image, amo, o["amodal_bbox"] * s, texts)],
            titles=[f"id {int(ex['image_id'])} {kind}", "visible", "amodal + occlusion rate"],
        ))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0))) for r in rows]
    return np.concatenate(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sameo_jax.data.amodal_lvis",
        description="Amodal-LVIS synthesis preview: writes a PNG grid of examples.")
    parser.add_argument("--preview", required=True, help="output PNG path")
    parser.add_argument("--source", default="demo",
                        help="'demo' (procedural scenes) or a COCO/LVIS annotation JSON file")
    parser.add_argument("--image_dir", default=None, help="image folder of a JSON source")
    parser.add_argument("--num", type=int, default=6, help="number of rows (examples)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min_area", type=int, default=SynthesisConfig.min_area,
                        help="smallest complete object used (pixels)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing PNG")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.preview)
    if out.exists() and not args.overwrite:
        parser.error(f"{out} exists; pass --overwrite to replace it")
    if args.num < 1:
        parser.error(f"--num must be >= 1, got {args.num}")
    if args.source == "demo":
        # Odd demo indices are the unoccluded duals: clean complete objects to start from.
        source = DemoInstanceSource(4 * args.num + 8, seed=args.seed)
    else:
        if args.image_dir is None:
            parser.error("--image_dir is required with a JSON --source")
        try:
            source = CocoInstanceSource(args.source, args.image_dir)
        except (FileNotFoundError, ValueError) as e:
            parser.error(str(e))
    stats = SynthesisStats()
    examples = []
    config = SynthesisConfig(min_area=args.min_area)
    for ex in synthesize(source, seed=args.seed, config=config, stats=stats):
        examples.append(ex)
        if len(examples) >= args.num:
            break
    if not examples:
        print("no examples: the source has no complete objects that could be occluded",
              file=sys.stderr)
        return 1
    from sameo_jax.visualize import save_png

    save_png(out, preview_grid(examples))
    print(f"wrote {out} ({len(examples)} examples)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
