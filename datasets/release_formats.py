"""Readers for the annotation layouts of the public amodal releases -> `RawImage` lists.

Two layouts cover COCOA, COCOA-cls, D2SA and KINS:
- COCOA original (`read_cocoa_regions`): `images` + one `annotations` record per image whose
  `regions` list holds the instances (flat amodal polygon `segmentation`, `name`, `isStuff`,
  `occlude_rate`, `order` (depth rank, 1 = front), and `visible_mask` / `invisible_mask` RLE
  only for occluded regions).
- COCO style with amodal keys (`read_coco_instances`): one record per instance; the key names
  differ per release and are given by `InstanceKeys`.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
from typing import Any

from datasets.amodal_builder import RawImage, RawInstance


def load_json(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a release JSON; one-line ValueError naming the file when it is not valid JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object at the top level")
    return data


def _require(data: dict, key: str, path: Any) -> Any:
    if key not in data:
        raise ValueError(f"{path}: missing top-level key {key!r} (is this the right file?)")
    return data[key]


def _image_entries(data: dict, path: Any) -> dict[int, dict]:
    images = {}
    for im in _require(data, "images", path):
        for k in ("id", "file_name"):
            if k not in im:
                raise ValueError(f"{path}: an entry of 'images' has no {k!r}: {str(im)[:120]}")
        images[int(im["id"])] = im
    return images


def _order(value: Any, where: str) -> int:
    """A release's depth rank: a positive integer, or 0 when absent."""
    if value is None:
        return 0
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value != int(value) or value < 1:
        raise ValueError(f"{where}: order {value!r} is not a positive integer (1 = front)")
    return int(value)


def _raw_image(im: dict, instances: list[RawInstance]) -> RawImage:
    h, w = im.get("height"), im.get("width")
    return RawImage(
        image_id=int(im["id"]),
        file_name=str(im["file_name"]),
        height=None if h is None else int(h),
        width=None if w is None else int(w),
        instances=instances,
    )


def read_cocoa_regions(path: str | os.PathLike) -> list[RawImage]:
    """COCOA original release (`COCO_amodal_*2014.json`) -> images in `images` order."""
    data = load_json(path)
    images = _image_entries(data, path)
    regions: dict[int, list[RawInstance]] = collections.defaultdict(list)
    for rec in _require(data, "annotations", path):
        if "regions" not in rec:
            raise ValueError(
                f"{path}: annotation {rec.get('id')} has no 'regions' list; this is not the "
                "COCOA original layout (COCO-style files go to cocoa_cls)"
            )
        image_id = int(rec["image_id"])
        if image_id not in images:
            raise ValueError(f"{path}: annotation for unknown image_id {image_id}")
        for k, r in enumerate(rec["regions"]):
            regions[image_id].append(
                RawInstance(
                    amodal_seg=r.get("segmentation"),
                    visible_seg=r.get("visible_mask"),
                    invisible_seg=r.get("invisible_mask"),
                    category_id=0,
                    name=str(r.get("name", "")),
                    is_stuff=bool(r.get("isStuff", 0)),
                    occlusion_rate=(
                        None if r.get("occlude_rate") is None else float(r["occlude_rate"])
                    ),
                    order=_order(r.get("order"), f"{path}: image_id {image_id} region {k}"),
                )
            )
    return [_raw_image(im, regions.get(i, [])) for i, im in images.items()]


@dataclasses.dataclass(frozen=True)
class InstanceKeys:
    """Key names of one COCO-style amodal release (None: the release has no such field)."""

    amodal_seg: str = "segmentation"
    visible_seg: str | None = "visible_mask"
    amodal_bbox: str | None = "bbox"
    visible_bbox: str | None = None
    occlusion_rate: str | None = "occlude_rate"
    order: str | None = "order"  # depth rank, 1 = front (read where a record has it)


COCOA_CLS_KEYS = InstanceKeys()
KINS_KEYS = InstanceKeys(
    amodal_seg="segmentation", visible_seg="inmodal_seg", amodal_bbox="bbox",
    visible_bbox="inmodal_bbox", occlusion_rate=None,
)
KINS_2020_KEYS = InstanceKeys(
    amodal_seg="a_segm", visible_seg="i_segm", amodal_bbox="a_bbox", visible_bbox="i_bbox",
    occlusion_rate=None,
)


def read_coco_instances(path: str | os.PathLike, keys: InstanceKeys) -> list[RawImage]:
    """COCO-style amodal release (one record per instance) -> images in `images` order.

    A record without the visible key is taken as unoccluded (visible = amodal).
    """
    data = load_json(path)
    images = _image_entries(data, path)
    names = {int(c["id"]): str(c.get("name", "")) for c in data.get("categories", [])}
    per_image: dict[int, list[RawInstance]] = collections.defaultdict(list)
    for ann in _require(data, "annotations", path):
        if keys.amodal_seg not in ann:
            raise ValueError(
                f"{path}: annotation {ann.get('id')} has no {keys.amodal_seg!r} "
                f"(keys: {sorted(ann)[:12]})"
            )
        image_id = int(ann["image_id"])
        if image_id not in images:
            raise ValueError(f"{path}: annotation {ann.get('id')} has unknown image_id {image_id}")
        cat = int(ann.get("category_id", 0))
        get = ann.get
        occ = get(keys.occlusion_rate) if keys.occlusion_rate else None
        per_image[image_id].append(
            RawInstance(
                amodal_seg=ann[keys.amodal_seg],
                visible_seg=get(keys.visible_seg) if keys.visible_seg else None,
                category_id=cat,
                name=names.get(cat, ""),
                occlusion_rate=None if occ is None else float(occ),
                amodal_bbox_xywh=get(keys.amodal_bbox) if keys.amodal_bbox else None,
                visible_bbox_xywh=get(keys.visible_bbox) if keys.visible_bbox else None,
                order=_order(get(keys.order) if keys.order else None,
                             f"{path}: annotation {ann.get('id')}"),
            )
        )
    return [_raw_image(im, per_image.get(i, [])) for i, im in images.items()]
