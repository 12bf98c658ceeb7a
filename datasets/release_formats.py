"""Readers for the annotation layouts of the public amodal releases -> `RawImage` lists.

Two layouts cover COCOA, COCOA-cls, D2SA and KINS:
- COCOA original (`read_cocoa_regions`): `images` + one `annotations` record per image whose
  `regions` list holds the instances (flat amodal polygon `segmentation`, `name`, `isStuff`,
  `occlude_rate`, `order` (depth rank, 1 = front), and `visible_mask` / `invisible_mask` RLE
  only for occluded regions).
- COCO style with amodal keys (`read_coco_instances`): one record per instance; the key names
  differ per release and are given by `InstanceKeys`.

A file that is not a JSON object with `images` and `annotations` lists is an error naming the
file. Malformed entries are skipped and counted in `BuildStats` by reason: images with a
duplicate id (all copies: their annotations cannot be told apart), a `file_name` that is not a
plain relative path, or bad types; annotations of unknown images, with bad types, non-finite or
short boxes, or occlusion rates outside [0, 1]. Masks are checked when decoded.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import pathlib
from typing import Any

from datasets.amodal_builder import BuildStats, RawImage, RawInstance


class BadEntry(ValueError):
    """A release entry that cannot be used; `reason` names the problem class."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def load_json(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a release JSON; one-line ValueError naming the file when it is not valid JSON
    (truncated, not UTF-8, nested too deeply) or not an object."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise ValueError(f"{path}: not valid JSON (nested too deeply)") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object at the top level")
    return data


def _require_list(data: dict, key: str, path: Any) -> list:
    if key not in data:
        raise ValueError(f"{path}: missing top-level key {key!r} (is this the right file?)")
    if not isinstance(data[key], list):
        raise ValueError(f"{path}: top-level {key!r} is a {type(data[key]).__name__}, "
                         "not a list")
    return data[key]


# ----------------------------------------------------------------------------- field checks


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadEntry("bad_entry_type", f"{what} {str(value)[:40]!r} is not an integer")
    return value


def _finite(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadEntry("bad_entry_type", f"{what} {str(value)[:40]!r} is not a finite number")
    return float(value)


def _box(value: Any, what: str) -> list[float] | None:
    """A release box [x, y, w, h]: four finite numbers, w and h >= 0 (None: no box)."""
    if value is None:
        return None
    try:
        if not isinstance(value, list) or len(value) != 4:
            raise BadEntry("bad_box", "")
        box = [_finite(v, what) for v in value]
    except BadEntry:
        raise BadEntry("bad_box", f"{what} {str(value)[:60]} is not 4 finite numbers") from None
    if box[2] < 0 or box[3] < 0:
        raise BadEntry("bad_box", f"{what} {str(value)[:60]} has a negative width or height")
    return box


def _rate(value: Any, what: str) -> float | None:
    if value is None:
        return None
    rate = _finite(value, what)
    if not 0.0 <= rate <= 1.0:
        raise BadEntry("bad_occlusion_rate", f"{what} {rate} is outside [0, 1]")
    return rate


def check_file_name(value: Any) -> str:
    """A release `file_name`: a non-empty relative path without '..' (BadEntry otherwise)."""
    if not isinstance(value, str) or not value:
        raise BadEntry("bad_entry_type", f"file_name {str(value)[:60]!r} is not a file name")
    parts = value.replace("\\", "/").split("/")
    if (value.startswith(("/", "\\")) or "\0" in value or ".." in parts
            or pathlib.PureWindowsPath(value).drive):
        raise BadEntry("unsafe_file_name",
                       f"file_name {value[:80]!r} is not a relative path inside the release")
    return value


def _size(im: dict, key: str) -> int | None:
    value = im.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise BadEntry("bad_entry_type", f"{key} {str(value)[:40]!r} is not a positive integer")
    return value


# ----------------------------------------------------------------------------- images


def _image_entries(data: dict, path: Any, stats: BuildStats
                   ) -> tuple[dict[int, dict], set[int]]:
    """(id -> checked image entry, ids of skipped entries: their annotations are counted as
    instances in skipped images)."""
    by_id: dict[int, list[tuple[int, dict]]] = collections.defaultdict(list)
    skipped: set[int] = set()
    for k, im in enumerate(_require_list(data, "images", path)):
        where = f"{path}: images[{k}]"
        try:
            if not isinstance(im, dict):
                raise BadEntry("bad_entry_type", f"a {type(im).__name__}, not an object")
            for key in ("id", "file_name"):
                if key not in im:
                    raise BadEntry("bad_entry_type", f"no {key!r}")
            image_id = _int(im["id"], "id")
            try:
                image = {"id": image_id, "file_name": check_file_name(im["file_name"]),
                         "height": _size(im, "height"), "width": _size(im, "width")}
            except BadEntry:
                skipped.add(image_id)
                raise
        except BadEntry as e:
            stats.skip_image(e.reason, 0, where, str(e))
            continue
        by_id[image_id].append((k, image))
    images = {}
    for image_id, copies in by_id.items():
        if len(copies) == 1 and image_id not in skipped:
            images[image_id] = copies[0][1]
            continue
        skipped.add(image_id)
        for k, _ in copies:
            stats.skip_image("duplicate_image_id", 0, f"{path}: images[{k}]",
                             f"image id {image_id} is listed more than once")
    return images, skipped


def _order(value: Any, what: str) -> int:
    """A release's depth rank: a positive integer, or 0 when absent."""
    if value is None:
        return 0
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value != int(value) or value < 1:
        raise BadEntry("bad_order", f"{what} {str(value)[:40]!r} is not a positive integer "
                       "(1 = front)")
    return int(value)


def _raw_image(im: dict, instances: list[RawInstance]) -> RawImage:
    return RawImage(image_id=im["id"], file_name=im["file_name"], height=im["height"],
                    width=im["width"], instances=instances)


def _annotation_image(ann: Any, images: dict, skipped: set[int]) -> int | None:
    """The image id of an annotation record; None for an image skipped while reading."""
    if not isinstance(ann, dict):
        raise BadEntry("bad_entry_type", f"a {type(ann).__name__}, not an object")
    if "image_id" not in ann:
        raise BadEntry("bad_entry_type", "no 'image_id'")
    image_id = _int(ann["image_id"], "image_id")
    if image_id in skipped:
        return None
    if image_id not in images:
        raise BadEntry("unknown_image_id", f"image_id {image_id} is not in 'images'")
    return image_id


def read_cocoa_regions(path: str | os.PathLike, stats: BuildStats | None = None
                       ) -> list[RawImage]:
    """COCOA original release (`COCO_amodal_*2014.json`) -> images in `images` order."""
    stats = BuildStats() if stats is None else stats
    data = load_json(path)
    images, skipped = _image_entries(data, path, stats)
    regions: dict[int, list[RawInstance]] = collections.defaultdict(list)
    for k, rec in enumerate(_require_list(data, "annotations", path)):
        where = f"{path}: annotations[{k}]"
        if isinstance(rec, dict) and "image_id" in rec and "regions" not in rec:
            raise ValueError(
                f"{where} has no 'regions' list; this is not the COCOA original layout "
                "(COCO-style files go to cocoa_cls)"
            )
        recs = rec.get("regions") if isinstance(rec, dict) else None
        n = len(recs) if isinstance(recs, list) else 1
        try:
            image_id = _annotation_image(rec, images, skipped)
            if not isinstance(recs, list):
                raise BadEntry("bad_entry_type", "'regions' is not a list")
        except BadEntry as e:
            stats.skip_instances(e.reason, n, where, str(e))
            continue
        if image_id is None:
            stats.count_in_skipped_image(n)
            continue
        for j, r in enumerate(recs):
            try:
                if not isinstance(r, dict) or "segmentation" not in r:
                    raise BadEntry("bad_entry_type", "not an object with a 'segmentation'")
                name, stuff = r.get("name", ""), r.get("isStuff", 0)
                if not isinstance(name, str):
                    raise BadEntry("bad_entry_type", f"name {str(name)[:40]!r} is not a string")
                if stuff not in (0, 1):  # also False / True
                    raise BadEntry("bad_entry_type", f"isStuff {str(stuff)[:40]!r} is not 0/1")
                regions[image_id].append(
                    RawInstance(
                        amodal_seg=r["segmentation"],
                        visible_seg=r.get("visible_mask"),
                        invisible_seg=r.get("invisible_mask"),
                        category_id=0,
                        name=name,
                        is_stuff=bool(stuff),
                        occlusion_rate=_rate(r.get("occlude_rate"), "occlude_rate"),
                        order=_order(r.get("order"), "order"),
                    )
                )
            except BadEntry as e:
                stats.skip_instances(e.reason, 1, f"{where}.regions[{j}]", str(e))
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


def _category_names(data: dict, path: Any) -> dict[int, str]:
    names = {}
    categories = data.get("categories", [])
    if not isinstance(categories, list):
        raise ValueError(f"{path}: top-level 'categories' is not a list")
    for k, c in enumerate(categories):
        if not (isinstance(c, dict) and isinstance(c.get("id"), int)
                and not isinstance(c["id"], bool) and isinstance(c.get("name", ""), str)):
            raise ValueError(f"{path}: categories[{k}] is not {{'id': int, 'name': str}}: "
                             f"{str(c)[:80]}")
        names[c["id"]] = c.get("name", "")
    return names


def read_coco_instances(path: str | os.PathLike, keys: InstanceKeys,
                        stats: BuildStats | None = None) -> list[RawImage]:
    """COCO-style amodal release (one record per instance) -> images in `images` order.

    A record without the visible key is taken as unoccluded (visible = amodal).
    """
    stats = BuildStats() if stats is None else stats
    data = load_json(path)
    images, skipped = _image_entries(data, path, stats)
    names = _category_names(data, path)
    per_image: dict[int, list[RawInstance]] = collections.defaultdict(list)
    for k, ann in enumerate(_require_list(data, "annotations", path)):
        where = f"{path}: annotations[{k}]"
        try:
            image_id = _annotation_image(ann, images, skipped)
            if image_id is None:
                stats.count_in_skipped_image(1)
                continue
            if keys.amodal_seg not in ann:
                raise BadEntry("bad_entry_type", f"no {keys.amodal_seg!r}")
            cat = _int(ann.get("category_id", 0), "category_id")
            get = ann.get
            occ = get(keys.occlusion_rate) if keys.occlusion_rate else None
            per_image[image_id].append(
                RawInstance(
                    amodal_seg=ann[keys.amodal_seg],
                    visible_seg=get(keys.visible_seg) if keys.visible_seg else None,
                    category_id=cat,
                    name=names.get(cat, ""),
                    occlusion_rate=_rate(occ, keys.occlusion_rate),
                    amodal_bbox_xywh=_box(get(keys.amodal_bbox), keys.amodal_bbox)
                    if keys.amodal_bbox else None,
                    visible_bbox_xywh=_box(get(keys.visible_bbox), keys.visible_bbox)
                    if keys.visible_bbox else None,
                    order=_order(get(keys.order), keys.order) if keys.order else 0,
                )
            )
        except BadEntry as e:
            stats.skip_instances(e.reason, 1, where, str(e))
    return [_raw_image(im, per_image.get(i, [])) for i, im in images.items()]
