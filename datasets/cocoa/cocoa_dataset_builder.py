"""COCOA (COCO Amodal, Zhu et al. CVPR 2017), original release layout.

Split sizes of the full release (images): train 2500, validation 1323, test 1250.
Regions have no class (category_id 0); `isStuff` regions are removed.
"""

from __future__ import annotations

import pathlib

from datasets import amodal_builder, release_formats


class Builder(amodal_builder.AmodalBuilder):
    """COCOA amodal regions (stuff removed), class-agnostic (category_id 0)."""

    SOURCE = "cocoa"
    DOWNLOAD_PAGE = "https://github.com/Wakeupbuddy/amodalAPI"
    SPLIT_FILES = {
        "train": ["COCO_amodal_train2014.json"],
        "validation": ["COCO_amodal_val2014.json"],
        "test": ["COCO_amodal_test2014.json"],
    }
    IMAGE_DIRS = {s: ("train2014", "val2014", "test2014") for s in SPLIT_FILES}
    SPLIT_SIZES = {"train": 2500, "validation": 1323, "test": 1250}
    RULES = ("empty_amodal", "stuff", "tiny_visible")

    def read_split(self, split: str, manual_dir: pathlib.Path,
                   stats: amodal_builder.BuildStats) -> list[amodal_builder.RawImage]:
        return release_formats.read_cocoa_regions(manual_dir / self.SPLIT_FILES[split][0], stats)
