"""COCO results files: writing amodal predictions, reading and checking detector/results files.

A COCO *results* file is a JSON list of dicts. Detector files (the prompts SAMEO refines) need
`image_id`, `category_id`, `bbox` (xywh, pixels) and `score`, and may carry a visible-mask
`segmentation`. Segmentation results files (what SAMEO writes, what `--results` scores) need
`image_id`, `category_id`, `segmentation` (RLE) and `score`, and may carry the visible mask
of the same object as `visible_segmentation` (for occlusion order).

Malformed entries never reach pycocotools: they are skipped, counted per problem in an
`EntryReport`, and reported in one line each. A file with no usable entry is an error.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from sameo_jax import boxes as box_lib
from sameo_jax import masks as mask_lib


@dataclasses.dataclass(frozen=True)
class Detection:
    """One detector output, validated: box in xyxy original-image pixels."""

    image_id: int
    category_id: int
    box: np.ndarray  # [4] float32 xyxy
    score: float
    segmentation: Any = None  # optional visible mask, COCO segmentation as read
    index: int = -1  # position in the file


@dataclasses.dataclass
class EntryReport:
    """Counts of kept and skipped entries of one file, with one example per problem."""

    name: str
    total: int = 0
    kept: int = 0
    problems: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: dict[str, str] = dataclasses.field(default_factory=dict)

    def skip(self, index: int, problem: str, detail: str) -> None:
        """Records that entry `index` was skipped because of `problem`."""
        self.problems[problem] += 1
        self.examples.setdefault(problem, f"entry {index}: {detail}")

    @property
    def skipped(self) -> int:
        return sum(self.problems.values())

    def summary(self) -> str:
        """One line: how many entries were used and why the others were skipped."""
        line = f"{self.name}: using {self.kept} of {self.total} entries"
        if self.problems:
            parts = [
                f"{n} with {p} (first: {self.examples[p]})"
                for p, n in sorted(self.problems.items(), key=lambda kv: -kv[1])
            ]
            line += "; skipped " + "; ".join(parts)
        return line

    def as_dict(self) -> dict[str, Any]:
        return {"total": self.total, "kept": self.kept, "skipped": dict(self.problems)}


# ----------------------------------------------------------------------------- writing


def mask_result(
    image_id: int,
    category_id: int,
    mask: np.ndarray,
    score: float,
    **extra: Any,
) -> dict[str, Any]:
    """One segmentation result: [H, W] bool mask -> COCO result dict (RLE counts as str,
    `bbox` xywh of the mask). `extra` keys (e.g. `gt_instance`) are kept; COCO tools ignore them.
    """
    mask = np.asarray(mask, bool)
    box = box_lib.xyxy_to_xywh(box_lib.box_from_mask(mask))
    result = {
        "image_id": int(image_id),
        "category_id": int(category_id),
        "segmentation": mask_lib.encode_rle(mask),
        "bbox": [round(float(v), 2) for v in box],
        "score": float(score),
    }
    result.update(extra)
    return result


def check_writable(path: str | os.PathLike, overwrite: bool) -> None:
    """Raises FileExistsError when `path` exists and `overwrite` is False."""
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{os.fspath(path)} exists; pass --overwrite to replace it")


def write_json(path: str | os.PathLike, obj: Any, overwrite: bool = False) -> None:
    """Writes `obj` as JSON, refusing to replace an existing file unless `overwrite`."""
    check_writable(path, overwrite)
    parent = os.path.dirname(os.fspath(path))
    if parent:
        os.makedirs(parent, exist_ok=True)
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- reading


def read_json_list(path: str | os.PathLike) -> list[Any]:
    """Reads a COCO results/detections file: a non-empty JSON list. Clear ValueError otherwise."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise ValueError(f"{path}: not valid JSON (nested too deeply)") from None
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        data = data["annotations"]  # tolerate a COCO-style {"annotations": [...]} wrapper
    if not isinstance(data, list):
        raise ValueError(
            f"{path}: expected a JSON list of result objects, got {type(data).__name__}"
        )
    if not data:
        raise ValueError(f"{path}: the file contains an empty list (no detections)")
    return data


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _as_finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _check_common(
    entry: Any,
    index: int,
    required: Sequence[str],
    image_sizes: Mapping[int, tuple[int, int]] | None,
    category_ids: Iterable[int] | None,
    report: EntryReport,
    unknown_image: str = "an unknown image_id",
) -> tuple[int, int, float] | None:
    """Checks the keys shared by detections and results; returns (image_id, category, score)."""
    if not isinstance(entry, dict):
        report.skip(index, "an entry that is not an object", type(entry).__name__)
        return None
    missing = [k for k in required if k not in entry]
    if missing:
        report.skip(index, f"missing key '{missing[0]}'", f"keys {sorted(entry)}")
        return None
    image_id = _as_int(entry["image_id"])
    if image_id is None:
        report.skip(index, "a non-integer image_id", repr(entry["image_id"]))
        return None
    if image_sizes is not None and image_id not in image_sizes:
        report.skip(index, unknown_image, f"image_id {image_id}")
        return None
    category_id = _as_int(entry["category_id"])
    if category_id is None:
        report.skip(index, "a non-integer category_id", repr(entry["category_id"]))
        return None
    if category_ids is not None and category_id not in category_ids:
        report.skip(index, "an unknown category_id", f"category_id {category_id}")
        return None
    score = _as_finite(entry["score"])
    if score is None:
        report.skip(index, "a missing or non-finite score", repr(entry["score"]))
        return None
    return image_id, category_id, score


def check_segmentation(seg: Any, hw: tuple[int, int] | None) -> tuple[str, str] | None:
    """(problem, detail) saying why a COCO segmentation is unusable on an image of size `hw` =
    (H, W) (None: what needs no size), or None when it is fine. Problems are counted per
    class (`masks.BadSegmentation.reason`), e.g. 'a bad segmentation (RLE counts do not sum
    to H*W)'."""
    try:
        mask_lib.check_segmentation(seg, hw)
    except mask_lib.BadSegmentation as e:
        return f"a bad segmentation ({e.reason})", e.detail
    return None


def parse_detections(
    entries: Sequence[Any],
    name: str,
    image_sizes: Mapping[int, tuple[int, int]] | None = None,
    category_ids: Iterable[int] | None = None,
) -> tuple[list[Detection], EntryReport]:
    """Checks detector entries (image_id, category_id, bbox xywh, score[, segmentation]).

    Args:
      entries: the JSON list as read.
      name: file name used in messages.
      image_sizes: image_id -> (H, W) of the evaluated images; None skips the image checks.
      category_ids: allowed category ids; None accepts any integer.

    Returns:
      (detections with xyxy boxes, report). Raises ValueError when nothing is usable.
    """
    report = EntryReport(name, total=len(entries))
    cats = None if category_ids is None else set(category_ids)
    out = []
    for i, entry in enumerate(entries):
        common = _check_common(
            entry, i, ("image_id", "category_id", "bbox", "score"), image_sizes, cats, report
        )
        if common is None:
            continue
        image_id, category_id, score = common
        bbox = entry["bbox"]
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
            report.skip(i, "a bbox that is not 4 numbers", repr(bbox))
            continue
        values = [_as_finite(v) for v in bbox]
        if any(v is None for v in values):
            report.skip(i, "a non-finite bbox", repr(bbox))
            continue
        if values[2] < 0 or values[3] < 0:
            report.skip(i, "a negative bbox width/height", repr(bbox))
            continue
        if values[2] == 0 or values[3] == 0:
            report.skip(i, "an empty bbox (zero width/height)", repr(bbox))
            continue
        seg = entry.get("segmentation")
        if seg is not None:
            hw = None if image_sizes is None else image_sizes[image_id]
            problem = check_segmentation(seg, hw)
            if problem is not None:
                report.skip(i, *problem)
                continue
        box = box_lib.xywh_to_xyxy(np.asarray(values, np.float32))
        out.append(Detection(image_id, category_id, box, score, seg, i))
    report.kept = len(out)
    if not out:
        raise ValueError(f"no usable detections: {report.summary()}")
    return out, report


def parse_results(
    entries: Sequence[Any],
    name: str,
    image_sizes: Mapping[int, tuple[int, int]],
    category_ids: Iterable[int] | None = None,
    unknown_image: str = "an unknown image_id",
) -> tuple[list[dict[str, Any]], EntryReport]:
    """Checks segmentation results (image_id, category_id, segmentation RLE/polygons, score)
    against the evaluated images (`image_sizes`: image_id -> (H, W); results of other images
    are counted under `unknown_image`). Returns (clean result dicts with RLE counts as str,
    report); raises ValueError when nothing is usable."""
    report = EntryReport(name, total=len(entries))
    cats = None if category_ids is None else set(category_ids)
    out = []
    for i, entry in enumerate(entries):
        common = _check_common(
            entry, i, ("image_id", "category_id", "segmentation", "score"), image_sizes, cats,
            report, unknown_image,
        )
        if common is None:
            continue
        image_id, category_id, score = common
        hw = image_sizes[image_id]
        seg = entry["segmentation"]
        problem = check_segmentation(seg, hw)
        if problem is not None:
            report.skip(i, *problem)
            continue
        if isinstance(seg, dict) and isinstance(seg["counts"], str):
            rle = {"size": [int(v) for v in seg["size"]], "counts": seg["counts"]}
        else:  # polygons or uncompressed RLE: normalise to compressed RLE
            rle = mask_lib.encode_rle(mask_lib.decode_segmentation(seg, *hw))
        result = {
            "image_id": image_id,
            "category_id": category_id,
            "segmentation": rle,
            "score": score,
        }
        gt_instance = _as_int(entry.get("gt_instance"))
        if gt_instance is not None:
            result["gt_instance"] = gt_instance
        visible = entry.get("visible_segmentation")
        if visible is not None:
            why = check_segmentation(visible, hw)
            if why is not None:
                report.skip(i, "a bad visible_segmentation", why)
                continue
            # Kept as compressed RLE, whatever form it came in.
            result["visible_segmentation"] = mask_lib.encode_rle(
                mask_lib.decode_segmentation(visible, *hw))
        out.append(result)
    report.kept = len(out)
    if not out:
        raise ValueError(f"no usable results: {report.summary()}")
    return out, report


def group_by_image(detections: Iterable[Detection]) -> dict[int, list[Detection]]:
    """image_id -> its detections in file order."""
    grouped: dict[int, list[Detection]] = collections.defaultdict(list)
    for det in detections:
        grouped[det.image_id].append(det)
    return dict(grouped)
