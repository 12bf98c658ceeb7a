"""D2SA: MVTec D2S amodal (Follmann et al. 2019), 60 grocery classes, COCO-style instances.

Split sizes of the full release (images): train 2000, validation 3600; train_augmented is
not checked.
"""

from __future__ import annotations

import pathlib

from datasets import amodal_builder, release_formats


class Builder(amodal_builder.AmodalBuilder):
    """D2SA amodal instances (60 classes)."""

    SOURCE = "d2sa"
    DOWNLOAD_PAGE = "https://www.mvtec.com/company/research/datasets/mvtec-d2s"
    SPLIT_FILES = {
        "train": ["D2S_amodal_training_rot0.json"],
        "train_augmented": ["D2S_amodal_augmented.json"],
        "validation": ["D2S_amodal_validation.json"],
    }
    IMAGE_DIRS = {s: ("images", "augmented_images") for s in SPLIT_FILES}
    SPLIT_SIZES = {"train": 2000, "validation": 3600}
    RULES = ("empty_amodal", "tiny_visible")

    def read_split(self, split: str, manual_dir: pathlib.Path,
                   stats: amodal_builder.BuildStats) -> list[amodal_builder.RawImage]:
        path = manual_dir / self.SPLIT_FILES[split][0]
        return release_formats.read_coco_instances(path, release_formats.COCOA_CLS_KEYS, stats)
