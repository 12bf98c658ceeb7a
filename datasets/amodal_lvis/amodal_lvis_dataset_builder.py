"""Amodal-LVIS (SAMEO): synthetic occlusions of complete LVIS / COCO objects, with duals.

Synthesis is `sameo_jax.data.amodal_lvis.synthesize_from_coco` (deterministic per seed 0):
each image with complete objects gives its original (dual, unoccluded) example and one
example per complete object that could be occluded in range. Split sizes depend on the
synthesis, so none are checked.
"""

from __future__ import annotations

import pathlib

import tensorflow_datasets as tfds

from datasets import amodal_builder
from sameo_jax.data import amodal_lvis

_LAYOUTS = {
    "lvis": {
        "train": ("lvis_v1_train.json", "images"),
        "validation": ("lvis_v1_val.json", "images"),
    },
    "coco": {
        "train": ("annotations/instances_train2017.json", "train2017"),
        "validation": ("annotations/instances_val2017.json", "val2017"),
    },
}


class Builder(amodal_builder.AmodalBuilder):
    """Amodal-LVIS style synthetic amodal examples (dual annotation)."""

    SOURCE = amodal_lvis.SOURCE_NAME
    DOWNLOAD_PAGE = "https://www.lvisdataset.org/dataset"
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="lvis", description="LVIS v1 on COCO 2017 images"),
        tfds.core.BuilderConfig(name="coco", description="COCO 2017 instances"),
    ]
    SPLIT_FILES = {s: [f] for s, (f, _) in _LAYOUTS["lvis"].items()}
    IMAGE_DIRS = {s: [d] for s, (_, d) in _LAYOUTS["lvis"].items()}
    SEED = 0

    def split_files(self, split: str) -> list[str]:
        return [_LAYOUTS[self.builder_config.name][split][0]]

    def _split_generators(self, dl_manager):
        manual_dir = pathlib.Path(dl_manager.manual_dir)
        self.check_manual_files(manual_dir)
        return {s: self._generate_examples(s, manual_dir) for s in self.selected_splits()}

    def _generate_examples(self, split: str, manual_dir: pathlib.Path):
        file_name, image_dir = _LAYOUTS[self.builder_config.name][split]
        stats = self.stats[split] = amodal_builder.BuildStats()
        synthesis = amodal_lvis.SynthesisStats()
        examples = amodal_lvis.synthesize_from_coco(
            manual_dir / file_name, manual_dir / image_dir, seed=self.SEED, stats=synthesis
        )
        for example in examples:
            if self._max_images is not None and stats.images_written >= self._max_images:
                break
            yield int(example["image_id"]), amodal_builder.schema_to_tfds(example, stats)
        stats.images = synthesis.images + synthesis.images_skipped
        stats.instances = synthesis.instances
        stats.images_skipped["corrupt_image"] = synthesis.images_skipped
        stats.instances_bad_mask = synthesis.instances_bad_mask
        stats.notes.append("synthesis: " + ", ".join(synthesis.lines()))
        self.info.metadata[split] = stats.as_dict()
