"""KINS (Qi et al. CVPR 2019): amodal instances on KITTI object-detection images.

Configs: `original` (instances_{train,val}.json) and `update_2020` (update_{train,test}_2020.json).
Category ids {1, 2, 4, 5, 6, 7, 8}. Split sizes (images): train 7474, validation 7517
(KINS calls this split "val"/"test"; its images are KITTI's testing images).
"""

from __future__ import annotations

import pathlib

import tensorflow_datasets as tfds

from datasets import amodal_builder, release_formats

_FILES = {
    "original": {"train": ["instances_train.json"], "validation": ["instances_val.json"]},
    "update_2020": {
        "train": ["update_train_2020.json"], "validation": ["update_test_2020.json"],
    },
}
_KEYS = {
    "original": release_formats.KINS_KEYS,
    "update_2020": release_formats.KINS_2020_KEYS,
}


class Builder(amodal_builder.AmodalBuilder):
    """KINS amodal instances (KITTI images)."""

    SOURCE = "kins"
    DOWNLOAD_PAGE = "https://github.com/qqlu/Amodal-Instance-Segmentation-through-KINS-Dataset"
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="original", description="instances_{train,val}.json"),
        tfds.core.BuilderConfig(name="update_2020", description="update_{train,test}_2020.json"),
    ]
    SPLIT_FILES = _FILES["original"]
    IMAGE_DIRS = {"train": ("training/image_2",), "validation": ("testing/image_2",)}
    SPLIT_SIZES = {"train": 7474, "validation": 7517}
    RULES = ("empty_amodal", "tiny_visible")

    def split_files(self, split: str) -> list[str]:
        return _FILES[self.builder_config.name][split]

    def read_split(self, split: str, manual_dir: pathlib.Path,
                   stats: amodal_builder.BuildStats) -> list[amodal_builder.RawImage]:
        path = manual_dir / self.split_files(split)[0]
        return release_formats.read_coco_instances(path, _KEYS[self.builder_config.name], stats)
