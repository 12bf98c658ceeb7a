"""COCOA-cls: COCOA with COCO's 80 classes, COCO-style instances (Follmann et al. 2019).

Split sizes of the full release (images): train 2476, validation 1223.
"""

from __future__ import annotations

import pathlib

from datasets import amodal_builder, release_formats


class Builder(amodal_builder.AmodalBuilder):
    """COCOA-cls amodal instances with COCO category ids."""

    SOURCE = "cocoa_cls"
    DOWNLOAD_PAGE = "https://github.com/UARK-AICV/AISFormer"
    SPLIT_FILES = {
        "train": ["COCO_amodal_train2014_with_classes.json"],
        "validation": ["COCO_amodal_val2014_with_classes.json"],
    }
    IMAGE_DIRS = {s: ("train2014", "val2014") for s in SPLIT_FILES}
    SPLIT_SIZES = {"train": 2476, "validation": 1223}
    RULES = ("empty_amodal", "tiny_visible")

    def read_split(self, split: str, manual_dir: pathlib.Path,
                   stats: amodal_builder.BuildStats) -> list[amodal_builder.RawImage]:
        path = manual_dir / self.SPLIT_FILES[split][0]
        return release_formats.read_coco_instances(path, release_formats.COCOA_CLS_KEYS, stats)
