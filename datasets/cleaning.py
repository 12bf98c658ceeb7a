"""SAMEO's data cleaning as explicit filters with config thresholds.

Every rule looks at a table of instances from one image and returns a keep flag per instance.
`apply_rules` runs a list of named rules in order and reports, for every dropped instance, the
first rule that dropped it, so a build can print how many instances each rule removed.

Instance table (numpy, N instances):
  'name'           str [N]      category / region name as the release spells it ('' if none)
  'is_stuff'       bool [N]     COCOA `isStuff`
  'amodal_area'    int64 [N]    pixels in the amodal mask
  'visible_area'   int64 [N]    pixels in the visible mask
  'occlusion_rate' float32 [N]  1 - visible / amodal (or the release's value)
  'image_area'     int64 [N]    H * W of the image

Rules (names used by builders and in the build summary):
  'empty_amodal'  amodal mask has no pixel (cannot be a target).
  'stuff'         COCOA regions marked `isStuff` (sky, grass, ...): not objects.
  'architectural' classes such as wall / floor / ceiling (DYCE, MP3D-Amodal): a name matches
                  when any of its words (split on non-letters) is in `architectural_classes`.
  'tiny_visible'  visible_area / amodal_area < `min_visible_fraction`: almost fully hidden,
                  no box prompt can point at it.
  'walt_occupancy' amodal_area / image_area < `walt_min_occupancy` (tiny far-away objects).
  'walt_occlusion' occlusion_rate > `walt_max_occlusion`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import ml_collections
import numpy as np

InstanceTable = dict[str, np.ndarray]


def default_config() -> ml_collections.ConfigDict:
    """Cleaning thresholds (one place for them; builders record the values they used)."""
    return ml_collections.ConfigDict(
        {
            "architectural_classes": ("wall", "floor", "ceiling", "ground", "roof"),
            "min_visible_fraction": 0.05,
            "walt_min_occupancy": 0.0005,
            "walt_max_occlusion": 0.9,
        }
    )


def _words(name: str) -> set[str]:
    return set(re.split(r"[^a-z]+", name.lower())) - {""}


def drop_empty_amodal(t: InstanceTable, cfg: ml_collections.ConfigDict) -> np.ndarray:
    return np.asarray(t["amodal_area"]) > 0


def drop_stuff(t: InstanceTable, cfg: ml_collections.ConfigDict) -> np.ndarray:
    return ~np.asarray(t["is_stuff"], bool)


def drop_architectural(t: InstanceTable, cfg: ml_collections.ConfigDict) -> np.ndarray:
    classes = {c.lower() for c in cfg.architectural_classes}
    return np.array([not (_words(str(n)) & classes) for n in t["name"]], bool)


def drop_tiny_visible(t: InstanceTable, cfg: ml_collections.ConfigDict) -> np.ndarray:
    amodal = np.maximum(np.asarray(t["amodal_area"], np.float64), 1.0)
    return np.asarray(t["visible_area"], np.float64) / amodal >= cfg.min_visible_fraction


def drop_walt_occupancy(t: InstanceTable, cfg: ml_collections.ConfigDict) -> np.ndarray:
    image = np.maximum(np.asarray(t["image_area"], np.float64), 1.0)
    return np.asarray(t["amodal_area"], np.float64) / image >= cfg.walt_min_occupancy


def drop_walt_occlusion(t: InstanceTable, cfg: ml_collections.ConfigDict) -> np.ndarray:
    return np.asarray(t["occlusion_rate"], np.float64) <= cfg.walt_max_occlusion


RULES: dict[str, Callable[[InstanceTable, ml_collections.ConfigDict], np.ndarray]] = {
    "empty_amodal": drop_empty_amodal,
    "stuff": drop_stuff,
    "architectural": drop_architectural,
    "tiny_visible": drop_tiny_visible,
    "walt_occupancy": drop_walt_occupancy,
    "walt_occlusion": drop_walt_occlusion,
}


def apply_rules(
    table: InstanceTable, rules: Sequence[str], cfg: ml_collections.ConfigDict | None = None
) -> tuple[np.ndarray, list[str | None]]:
    """Runs `rules` in order on an instance table.

    Returns (keep bool [N], reasons): reasons[i] is None for kept instances, else the name of
    the first rule that dropped instance i.
    """
    cfg = default_config() if cfg is None else cfg
    n = len(table["amodal_area"])
    keep = np.ones(n, bool)
    reasons: list[str | None] = [None] * n
    for rule in rules:
        if rule not in RULES:
            raise ValueError(f"unknown cleaning rule {rule!r}; known: {sorted(RULES)}")
        if n == 0:
            continue
        passed = np.asarray(RULES[rule](table, cfg), bool)
        for i in np.flatnonzero(keep & ~passed):
            reasons[i] = rule
        keep &= passed
    return keep, reasons


def make_table(
    amodal_masks: np.ndarray,
    visible_masks: np.ndarray,
    *,
    names: Sequence[str] | None = None,
    is_stuff: Sequence[bool] | None = None,
    occlusion_rate: Sequence[float] | None = None,
) -> InstanceTable:
    """Builds an instance table from [N, H, W] bool masks (+ optional release fields).

    occlusion_rate defaults to 1 - visible_area / amodal_area (0 for an empty amodal mask).
    """
    amodal = np.asarray(amodal_masks, bool)
    visible = np.asarray(visible_masks, bool)
    n = amodal.shape[0]
    amodal_area = amodal.sum(axis=(1, 2)).astype(np.int64)
    visible_area = visible.sum(axis=(1, 2)).astype(np.int64)
    if occlusion_rate is None:
        occlusion_rate = occlusion_from_areas(amodal_area, visible_area)
    image_area = int(np.prod(amodal.shape[1:])) if n else 0
    return {
        "name": np.array(list(names) if names is not None else [""] * n, dtype=object),
        "is_stuff": np.array(list(is_stuff) if is_stuff is not None else [False] * n, bool),
        "amodal_area": amodal_area,
        "visible_area": visible_area,
        "occlusion_rate": np.asarray(occlusion_rate, np.float32).reshape(n),
        "image_area": np.full(n, image_area, np.int64),
    }


def occlusion_from_areas(amodal_area: np.ndarray, visible_area: np.ndarray) -> np.ndarray:
    """1 - visible / amodal per instance, float32, clipped to [0, 1]; 0 where amodal is empty."""
    a = np.asarray(amodal_area, np.float64)
    v = np.asarray(visible_area, np.float64)
    rate = np.where(a > 0, 1.0 - v / np.maximum(a, 1.0), 0.0)
    return np.clip(rate, 0.0, 1.0).astype(np.float32)
