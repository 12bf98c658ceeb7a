"""Amodal-LVIS synthesis (SAMEO, build time): occlusion of complete objects, dual annotation.

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
2. Synthetic occlusion: each complete object (the target) is paired with a random complete
   object of another image of the same shard (the occluder). The occluder is cut out by its
   mask, resized with its aspect ratio kept so that sqrt(occluder area) / sqrt(target area)
   is uniform in `occluder_scale` (sizes normalised), and placed by box with
   `sameo_jax.data.occluders.place_occluder` so the hidden fraction of the target lands in
   `occlusion_range` (a curriculum passes a different range per call, e.g.
   `curriculum_range`). The occluder
   never covers the image's other complete objects. Annotations: target amodal = its full
   mask, visible = what the occluder leaves; occluder and the other complete objects are
   unoccluded (amodal = visible). Instances that are not complete are not annotated, since
   their amodal shape is unknown.
3. Dual annotation: the original image, with all its complete objects unoccluded, is emitted
   too (before its synthesized versions), so every occluded object also appears unoccluded.

Shards: the source is cut into blocks of `shard_size` consecutive images (in id order) and
occluders come from the other images of the same block, so a shard is made from its own
images alone (`synthesize_shard`): each image is read and decoded once, its complete objects'
cut-outs are kept for later occluder draws (never the whole image), and shards run in any
order, process or host with the same result. Deterministic per seed: the occluder and
placement of target k of image i come from the random stream (seed, i, k), i the index in
the whole source.

Stored form (`datasets/amodal_lvis`; `ImageExamples` before encoding). An example keeps its
source image as the image file's own bytes and the occluder as a small patch:
    image               the source file's bytes (JPEG / PNG as released; other modes as PNG)
    objects/...         the schema's per-instance fields (1-bit PNG masks at the image size,
                        and each pooled to 256 x 256);
                        a synthesized example lists the image's complete objects, then the
                        occluder
    occluders           0 (dual) or 1 patch: `pixels` PNG [h, w, 3] (zero outside the mask),
                        `mask` 1-bit PNG [h, w, 1], `top_left` int32 [2] (row, column)
The example's pixels are the decoded image with each patch's masked pixels written at
top_left (`sameo_jax.data.occluders.paste_occluders`); `sameo_jax.data.sources` does this
when it reads a record, so the training pipeline sees plain schema examples.

Public API:
    SynthesisConfig, SynthesisStats, InstanceImage, ImageExamples
    CocoInstanceSource(annotation_file, image_dir)     # random-access, [i] -> InstanceImage
    DemoInstanceSource(num_images, image_size, seed)   # modal view of the demo scenes
    complete_by_geometry(masks, *, border_margin, min_area) -> bool [N]
    complete_by_model(image, masks, predict_amodal, *, iou_threshold, min_area) -> bool [N]
    synthesize_shard(items, *, seed, config, predict_amodal, stats) -> Iterator[ImageExamples]
    shard_ranges(num_images, shard_size) -> [(start, stop), ...]
    synthesize(source, *, seed, config, predict_amodal, stats) -> Iterator[example]
    synthesize_from_coco(annotation_file, image_dir, *, seed, config, ...) -> Iterator[example]
    curriculum_range(progress, start, end) -> (lo, hi)

Preview: `python -m datasets.amodal_lvis.synthesis --preview out.png [--source demo |
--source ANNOTATIONS.json --image_dir DIR] [--num 6] [--seed 0] [--min_area 1024]
[--overwrite]`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import os
import pathlib
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
from PIL import Image

from sameo_jax import image_io
from sameo_jax.boxes import box_from_mask, boxes_from_masks
from sameo_jax.data import schema
from sameo_jax.data.occluders import OccluderPatch, paste_occluders, place_occluder
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
    shard_size: int = 256  # images per shard; occluders come from the same shard

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
        if self.shard_size < 2:
            raise ValueError(f"shard_size must be >= 2 (occluders come from other images of "
                             f"the shard), got {self.shard_size}")


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

    def add(self, other: SynthesisStats) -> None:
        """Adds the counts of another run (e.g. of another shard)."""
        for field in dataclasses.fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))


@dataclasses.dataclass
class InstanceImage:
    """One image of an instance source: modal masks only (what COCO / LVIS provide)."""

    image: np.ndarray  # [H, W, 3] uint8
    image_id: int
    masks: np.ndarray  # [N, H, W] bool modal masks
    category_ids: np.ndarray  # [N] int64
    encoded: bytes | None = None  # the file's bytes when they decode to `image` as they are


# ----------------------------------------------------------------------------- sources


class CocoInstanceSource:
    """COCO / LVIS instance annotations as a random-access source of `InstanceImage`.

    annotation_file: COCO-format JSON (`images`, `annotations` with `segmentation` polygons
    or RLE; LVIS files work too: an image without `file_name` uses its `coco_url` basename).
    image_dir: folder holding the image files. Crowd annotations (`iscrowd` = 1) are ignored.
    Images are in increasing `id` order. An unreadable image gives `None` (with a warning);
    an undecodable segmentation is skipped with a warning (see `bad_masks`). `shard(start,
    stop)` is the same source cut to those images (small to send to a worker process).
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

    def shard(self, start: int, stop: int) -> CocoInstanceSource:
        """The images [start, stop) (in id order) and only their annotations."""
        part = copy.copy(self)
        part._images = self._images[start:stop]
        part._anns = {im[0]: self._anns[im[0]] for im in part._images}
        part.bad_masks = 0
        return part

    def __getitem__(self, index: int) -> InstanceImage | None:
        image_id, name, height, width = self._images[index]
        try:  # the image's folder only (no absolute path, '..' or symlink out); any PIL mode
            file = image_io.path_inside(self.image_dir, name)
            data = image_io.read_file_bytes(file)
            image, plain = image_io.decode(data, str(file))
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
        return InstanceImage(image, image_id, masks_arr, np.asarray(categories, np.int64),
                             data if plain else None)


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


# ----------------------------------------------------------------------------- shards


def _resize_cut_out(pixels: np.ndarray, mask: np.ndarray, scale: float
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Resizes an object's box crop by `scale` (aspect kept).

    pixels [h, w, 3] uint8, mask [h, w] bool -> the same at the new size (bilinear, mask
    thresholded at 0.5).
    """
    h = max(1, int(round(mask.shape[0] * scale)))
    w = max(1, int(round(mask.shape[1] * scale)))
    if (h, w) != mask.shape:
        pixels = np.asarray(Image.fromarray(pixels).resize((w, h), Image.BILINEAR))
        weight = Image.fromarray(mask.astype(np.float32)).resize((w, h), Image.BILINEAR)
        mask = np.asarray(weight) >= 0.5
    return pixels, mask


@dataclasses.dataclass(frozen=True)
class Occlusion:
    """One synthesized example: complete object `target` hidden by `patch`."""

    target: int  # row of ImageExamples.masks
    image_id: int  # the example's id
    patch: OccluderPatch
    category_id: int  # the occluder's


@dataclasses.dataclass
class ImageExamples:
    """One source image's examples in stored form (see the module docstring).

    masks [K, H, W] bool are the image's complete objects: the dual example (when `dual`)
    shows them unoccluded, each `Occlusion` hides one of them under its patch.
    """

    index: int  # position in the whole source
    image_id: int
    encoded: bytes | None  # the image file's bytes
    image: np.ndarray | None  # [H, W, 3] uint8, kept only where there are no bytes
    masks: np.ndarray
    category_ids: np.ndarray  # [K] int64
    dual: bool
    occlusions: list[Occlusion]

    def pixels(self) -> np.ndarray:
        """The source image [H, W, 3] uint8 (decoded from `encoded` when not kept)."""
        if self.image is not None:
            return self.image
        return image_io.decode_rgb(self.encoded, f"image {self.image_id}")

    def occluded(self, occlusion: Occlusion) -> tuple[np.ndarray, np.ndarray]:
        """(occluder mask, target's visible mask), both [H, W] bool, of one occlusion."""
        full = occlusion.patch.full_mask(self.masks.shape[1:])
        return full, self.masks[occlusion.target] & ~full

    def schema_examples(self, image: np.ndarray | None = None) -> Iterator[dict[str, Any]]:
        """The examples in the project schema (numpy; image = `pixels()` unless given)."""
        image = self.pixels() if image is None else image
        cats = [int(c) for c in self.category_ids]
        full = list(self.masks)
        if self.dual:
            yield schema.example(SOURCE_NAME, image, self.image_id, full, full, cats)
        for occ in self.occlusions:
            occluder, target_visible = self.occluded(occ)
            visible = list(full)
            visible[occ.target] = target_visible
            yield schema.example(SOURCE_NAME, paste_occluders(image, [occ.patch]), occ.image_id,
                           full + [occluder], visible + [occluder], cats + [occ.category_id])


@dataclasses.dataclass
class _Complete:
    """An image's complete objects as a shard keeps them: cut-outs at their boxes."""

    index: int
    image_id: int
    hw: tuple[int, int]
    encoded: bytes | None
    image: np.ndarray | None  # kept only where there are no bytes
    instances: list[int]  # instance indices in the source image
    boxes: list[tuple[int, int, int, int]]  # x0, y0, x1, y1 (x1, y1 exclusive)
    masks: list[np.ndarray]  # [y1 - y0, x1 - x0] bool
    pixels: list[np.ndarray]  # [y1 - y0, x1 - x0, 3] uint8
    areas: list[int]
    category_ids: list[int]

    def full_masks(self) -> np.ndarray:
        out = np.zeros((len(self.masks), *self.hw), bool)
        for k, ((x0, y0, x1, y1), mask) in enumerate(zip(self.boxes, self.masks, strict=True)):
            out[k, y0:y1, x0:x1] = mask
        return out


def _cut_complete(index: int, item: InstanceImage, flags: np.ndarray,
                  encode_image: Callable[[np.ndarray], bytes] | None) -> _Complete:
    encoded = item.encoded
    if encoded is None and encode_image is not None:
        encoded = encode_image(item.image)
    out = _Complete(index, int(item.image_id), item.image.shape[:2], encoded,
                    item.image if encoded is None else None, [], [], [], [], [], [])
    for k in np.flatnonzero(flags):
        x0, y0, x1, y1 = (int(v) for v in box_from_mask(item.masks[k]))
        out.instances.append(int(k))
        out.boxes.append((x0, y0, x1, y1))
        out.masks.append(item.masks[k, y0:y1, x0:x1].copy())
        out.pixels.append(item.image[y0:y1, x0:x1].copy())
        out.areas.append(int(out.masks[-1].sum()))
        out.category_ids.append(int(item.category_ids[k]))
    return out


def _occlude(target: np.ndarray, target_area: int, avoid: np.ndarray | None,
             occluder: _Complete, m: int, config: SynthesisConfig, rng: np.random.Generator,
             ) -> OccluderPatch | None:
    """Cuts out object m of `occluder`, sizes it to the target ([H, W] bool) and places it;
    None when no placement works."""
    height, width = target.shape
    mask, pixels = occluder.masks[m], occluder.pixels[m]
    ratio = math.sqrt(target_area / max(occluder.areas[m], 1))
    scale = ratio * rng.uniform(*config.occluder_scale)
    scale = min(scale, height / max(mask.shape[0], 1), width / max(mask.shape[1], 1))
    pixels, local = _resize_cut_out(pixels, mask, scale)
    if not local.any():
        return None
    placed = place_occluder(target, local, config.occlusion_range, rng, avoid=avoid,
                            tries=config.placement_tries)
    if placed is None:
        return None
    top, left, _ = placed
    return OccluderPatch(np.where(local[..., None], pixels, 0).astype(np.uint8), local, top,
                         left)


def _complete_flags(item: InstanceImage, config: SynthesisConfig,
                    predict_amodal: PredictAmodal | None) -> np.ndarray:
    if predict_amodal is None:
        return complete_by_geometry(item.masks, border_margin=config.border_margin,
                                    min_area=config.min_area)
    return complete_by_model(item.image, item.masks, predict_amodal,
                             iou_threshold=config.model_iou_threshold, min_area=config.min_area)


def shard_ranges(num_images: int, shard_size: int) -> list[tuple[int, int]]:
    """[(start, stop), ...] blocks of `shard_size` consecutive images covering the source."""
    return [(s, min(s + shard_size, num_images)) for s in range(0, num_images, shard_size)]


def synthesize_shard(
    items: Iterable[tuple[int, InstanceImage | None]],
    *,
    seed: int = 0,
    config: SynthesisConfig = SynthesisConfig(),
    predict_amodal: PredictAmodal | None = None,
    stats: SynthesisStats | None = None,
    encode_image: Callable[[np.ndarray], bytes] | None = None,
) -> Iterator[ImageExamples]:
    """Synthesizes one shard: yields an `ImageExamples` per image with complete objects.

    items: the shard's (index in the whole source, InstanceImage or None for an unreadable
      image), in source order; each is used once (completeness, cut-outs) and its pixels are
      not kept when it has file bytes (`encoded`, or made by `encode_image`).
    Per image: the dual example when `config.dual`, then one occlusion per complete object
    that could be occluded in range (`image_id` = SYNTHETIC_ID_STRIDE * (1 + instance index)
    + original id), the occluder drawn from the other images of the shard.
    """
    stats = stats if stats is not None else SynthesisStats()
    shard = []
    for index, item in items:  # pass 1: completeness and cut-outs (the occluder pool)
        if item is None:
            stats.images_skipped += 1
            continue
        stats.images += 1
        stats.instances += len(item.masks)
        flags = _complete_flags(item, config, predict_amodal)
        stats.complete += int(flags.sum())
        if flags.any():
            shard.append(_cut_complete(index, item, flags, encode_image))
    pool = [(j, m) for j, c in enumerate(shard) for m in range(len(c.instances))]
    for j, c in enumerate(shard):  # pass 2: dual + occlusions, from masks and cut-outs only
        masks = c.full_masks()
        stats.dual_examples += int(config.dual)
        occlusions = []
        if len(pool) == len(c.instances):  # no complete object in any other image
            stats.placement_failed += len(c.instances)
        covered = masks.sum(axis=0, dtype=np.int32)
        for k, instance in enumerate(c.instances if len(pool) > len(c.instances) else ()):
            rng = np.random.default_rng([seed, c.index, instance])
            avoid = (covered - masks[k]) > 0 if len(masks) > 1 else None
            patch = None
            for _ in range(config.occluder_tries):
                o, m = j, -1
                while o == j:  # uniform over the other images' complete objects
                    o, m = pool[int(rng.integers(len(pool)))]
                patch = _occlude(masks[k], c.areas[k], avoid, shard[o], m, config, rng)
                if patch is not None:
                    break
            if patch is None:
                stats.placement_failed += 1
                continue
            stats.occluded_examples += 1
            occlusions.append(Occlusion(k, SYNTHETIC_ID_STRIDE * (1 + instance) + c.image_id,
                                        patch, shard[o].category_ids[m]))
        yield ImageExamples(c.index, c.image_id, c.encoded, c.image, masks,
                            np.asarray(c.category_ids, np.int64), config.dual, occlusions)


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
    Shard by shard (`config.shard_size` images), per image with complete objects in source
    order: the dual example, then its synthesized ones (see `synthesize_shard`), each image's
    pixels composed in memory exactly as a reader of the stored form composes them.
    Deterministic per seed. stats: optional SynthesisStats filled in as the generator runs.
    """
    stats = stats if stats is not None else SynthesisStats()
    for start, stop in shard_ranges(len(source), config.shard_size):
        items = ((i, source[i]) for i in range(start, stop))
        for record in synthesize_shard(items, seed=seed, config=config,
                                       predict_amodal=predict_amodal, stats=stats):
            yield from record.schema_examples()


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
        prog="python -m datasets.amodal_lvis.synthesis",
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
