"""The procedural demo scenes (`sameo_jax.data.demo_scenes`) packed into TFDS.

Splits and sizes: `sameo_jax.data.sources.DEMO_SPLITS` (train 2000, validation 200, test 200
examples of 256 x 256; `--max_images` builds fewer). No download; `--manual_dir` is unused.
"""

from __future__ import annotations

import pathlib

from datasets import amodal_builder
from sameo_jax.data import sources


class Builder(amodal_builder.AmodalBuilder):
    """Procedural amodal scenes with dual (occluded / unoccluded) annotation."""

    SOURCE = "demo"
    RULES = ()

    def known_splits(self) -> list[str]:
        return list(sources.DEMO_SPLITS)

    def check_manual_files(self, manual_dir) -> None:
        return None

    def _split_generators(self, dl_manager):
        return {s: self._generate_examples(s, None) for s in self.selected_splits()}

    def _generate_examples(self, split: str, manual_dir: pathlib.Path | None):
        source = sources.demo_source(split)
        n = len(source) if self._max_images is None else min(self._max_images, len(source))
        stats = self.stats[split] = amodal_builder.BuildStats()
        for i in range(n):
            yield i, amodal_builder.schema_to_tfds(source[i], stats)
        self.info.metadata[split] = stats.as_dict()
