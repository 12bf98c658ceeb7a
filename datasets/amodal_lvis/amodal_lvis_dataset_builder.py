"""Amodal-LVIS (SAMEO): synthetic occlusions of complete LVIS / COCO objects, with duals.

Synthesis is `datasets.amodal_lvis.synthesis` (seed 0; geometric completeness unless the builder
is given `predict_amodal`), which also describes the stored form (the source file's bytes
plus the occluder as a patch). The source is cut into shards of `shard_size` images; the
shards run in `workers` processes (default: all cores of the host), or on many hosts through
Apache Beam when `beam=True` and the build gets a Beam runner. The examples do not depend on
the number of workers. Split sizes depend on the synthesis, so none are checked.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import multiprocessing
import os
import pathlib
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from datasets import amodal_builder
from datasets import features as features_lib
from datasets.amodal_lvis import synthesis as amodal_lvis
from sameo_jax.boxes import boxes_from_masks
from sameo_jax.data.occluders import OccluderPatch
from sameo_jax.data.pooling import encode_pooled

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
_BEAM_NAMESPACE = "amodal_lvis"


def default_workers() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def occluder_features() -> tfds.features.Sequence:
    """The `occluders` feature: 0 (dual) or 1 patch per example (see `synthesis.py`)."""
    return tfds.features.Sequence({
        "pixels": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
        "mask": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
        "top_left": tfds.features.Tensor(shape=(2,), dtype=np.int32),
    })


def _occluders(patches: list[OccluderPatch]) -> dict[str, Any]:
    return {
        "pixels": [features_lib.encode_image(p.pixels) for p in patches],
        "mask": [features_lib.encode_mask(p.mask) for p in patches],
        "top_left": np.asarray([(p.top, p.left) for p in patches], np.int32).reshape(-1, 2),
    }


def _areas(masks: np.ndarray) -> np.ndarray:
    return masks.reshape(len(masks), -1).sum(axis=1).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class _StoredMask:
    """A mask's stored bytes: 1-bit PNG and pooled (`features.py`), each made once."""

    png: bytes
    pooled: bytes

    @classmethod
    def of(cls, mask: np.ndarray) -> _StoredMask:
        return cls(features_lib.encode_mask(mask), encode_pooled(mask))


def stored_examples(record: amodal_lvis.ImageExamples) -> Iterator[tuple[int, dict[str, Any]]]:
    """One image's examples in stored form, ready for TFDS: (key, example) pairs.

    Each complete object's mask is encoded once for all the image's examples; a synthesized
    example adds its occluder's mask, its target's visible mask and the patch.
    """
    masks = record.masks
    encoded = [_StoredMask.of(m) for m in masks]
    boxes = boxes_from_masks(masks)
    areas = _areas(masks)
    cats = np.asarray(record.category_ids, np.int64)

    def example(image_id, visible_masks, visible_boxes, visible_areas, occluder, patches):
        amodal_masks, amodal_boxes, amodal_areas, categories = encoded, boxes, areas, cats
        if occluder is not None:
            mask, box, area, category = occluder
            amodal_masks, visible_masks = amodal_masks + [mask], visible_masks + [mask]
            amodal_boxes, visible_boxes = (np.concatenate([b, box[None]])
                                           for b in (amodal_boxes, visible_boxes))
            amodal_areas, visible_areas = (np.append(a, area).astype(np.float32)
                                           for a in (amodal_areas, visible_areas))
            categories = np.append(categories, category)
        out = features_lib.make_example(
            image=record.encoded, image_id=image_id, source=amodal_lvis.SOURCE_NAME,
            amodal_masks=[m.png for m in amodal_masks],
            visible_masks=[m.png for m in visible_masks],
            amodal_pooled=[m.pooled for m in amodal_masks],
            visible_pooled=[m.pooled for m in visible_masks], amodal_bbox=amodal_boxes,
            visible_bbox=visible_boxes, category_id=categories,
            occlusion_rate=1.0 - visible_areas / np.maximum(amodal_areas, 1.0))
        out["occluders"] = _occluders(patches)
        return image_id, out

    if record.dual:
        yield example(record.image_id, encoded, boxes, areas, None, [])
    for occ in record.occlusions:
        occluder, visible = record.occluded(occ)
        k = occ.target
        pair = boxes_from_masks(np.stack([occluder, visible]))
        visible_masks = list(encoded)
        visible_masks[k] = _StoredMask.of(visible)
        visible_boxes, visible_areas = boxes.copy(), areas.copy()
        visible_boxes[k], visible_areas[k] = pair[1], np.float32(visible.sum())
        yield example(occ.image_id, visible_masks, visible_boxes, visible_areas,
                      (_StoredMask.of(occluder), pair[0], occluder.sum(),
                       occ.category_id), [occ.patch])


@dataclasses.dataclass(frozen=True)
class ShardJob:
    """Synthesizes and encodes one shard: (source cut to the shard, index of its first image)
    -> ([(key, example)], SynthesisStats). Picklable, for worker processes."""

    seed: int
    config: amodal_lvis.SynthesisConfig
    predict_amodal: amodal_lvis.PredictAmodal | None = None

    def __call__(self, task: tuple[amodal_lvis.CocoInstanceSource, int]
                 ) -> tuple[list[tuple[int, dict[str, Any]]], amodal_lvis.SynthesisStats]:
        source, start = task
        stats = amodal_lvis.SynthesisStats()
        items = ((start + j, source[j]) for j in range(len(source)))
        out = []
        for record in amodal_lvis.synthesize_shard(
                items, seed=self.seed, config=self.config, predict_amodal=self.predict_amodal,
                stats=stats, encode_image=features_lib.encode_image):
            out.extend(stored_examples(record))
        stats.instances_bad_mask += source.bad_masks
        return out, stats


def _log_like_parent(level: int, fmt: str | None) -> None:
    """A spawned worker's logging: the parent's root level and format, to stderr."""
    logging.basicConfig(level=level, format=fmt or logging.BASIC_FORMAT)


def run_shards(job: Callable, tasks: Iterable, workers: int) -> Iterator:
    """job(task) for each task, in task order: in this process when workers <= 1, else in
    `workers` fresh processes (spawned: nothing of this process's threads or memory is
    inherited) running at most 2 * workers tasks ahead of the reader. A worker that dies
    (e.g. killed for memory) is a ChildProcessError, not a hang."""
    if workers <= 1:
        yield from map(job, tasks)
        return
    root = logging.getLogger()
    fmt = getattr(root.handlers[0].formatter, "_fmt", None) if root.handlers else None
    pool = futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_log_like_parent,
                                       initargs=(root.level, fmt if isinstance(fmt, str) else None))
    pending = collections.deque()
    try:
        for task in tasks:
            pending.append(pool.submit(job, task))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except futures.BrokenExecutor as e:
        raise ChildProcessError(f"a synthesis worker process ended unexpectedly ({e}); "
                                "fewer --workers need less memory") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def written_counts(examples: list[tuple[int, dict[str, Any]]]) -> dict[str, int]:
    """What a list of stored examples adds to BuildStats: images_written, kept, kept_occluded."""
    rates = [np.asarray(ex["objects"]["occlusion_rate"]) for _, ex in examples]
    return {"images_written": len(examples), "kept": int(sum(len(r) for r in rates)),
            "kept_occluded": int(sum((r > 0).sum() for r in rates))}


@functools.lru_cache(maxsize=2)
def _source(annotation_file: str, image_dir: str) -> amodal_lvis.CocoInstanceSource:
    return amodal_lvis.CocoInstanceSource(annotation_file, image_dir)


@dataclasses.dataclass(frozen=True)
class BeamShardJob:
    """The Beam form of ShardJob: (start, stop) -> (key, example)s; each worker process reads
    the annotation file once and counts what it did in Beam counters named '<split>:<count>'."""

    annotation_file: str
    image_dir: str
    split: str
    job: ShardJob

    def __call__(self, shard: tuple[int, int]) -> Iterator[tuple[int, dict[str, Any]]]:
        import apache_beam as beam

        start, stop = shard
        examples, stats = self.job((_source(self.annotation_file, self.image_dir).shard(
            start, stop), start))
        counts = {**dataclasses.asdict(stats), **written_counts(examples)}
        for name, value in counts.items():
            beam.metrics.Metrics.counter(_BEAM_NAMESPACE, f"{self.split}:{name}").inc(value)
        yield from examples


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

    def __init__(self, *, workers: int | None = None,
                 predict_amodal: amodal_lvis.PredictAmodal | None = None,
                 synthesis: amodal_lvis.SynthesisConfig | None = None, beam: bool = False,
                 **kwargs: Any):
        """workers: processes for the shards (default: all cores); predict_amodal: the model
        completeness rule (picklable when workers > 1 or beam); beam: return Beam transforms
        (the build's DownloadConfig must name a beam_runner)."""
        self._workers = default_workers() if workers is None else workers
        self._predict_amodal = predict_amodal
        self._synthesis = synthesis or amodal_lvis.SynthesisConfig()
        self._beam = beam
        super().__init__(**kwargs)

    def feature_spec(self) -> tfds.features.FeaturesDict:
        shared = features_lib.features()
        return tfds.features.FeaturesDict(
            {**{key: shared[key] for key in shared.keys()}, "occluders": occluder_features()})

    def split_files(self, split: str) -> list[str]:
        return [_LAYOUTS[self.builder_config.name][split][0]]

    def _split_generators(self, dl_manager):
        manual_dir = pathlib.Path(dl_manager.manual_dir)
        self.check_manual_files(manual_dir)
        return {s: self._generate_examples(s, manual_dir) for s in self.selected_splits()}

    def _plan(self, split: str, manual_dir: pathlib.Path):
        """(annotation file, image folder, source, shard ranges, job) of a split."""
        file_name, image_dir = _LAYOUTS[self.builder_config.name][split]
        files = (manual_dir / file_name, manual_dir / image_dir)
        source = amodal_lvis.CocoInstanceSource(*files)
        n = len(source) if self._max_images is None else min(len(source), self._max_images)
        shards = amodal_lvis.shard_ranges(n, self._synthesis.shard_size)
        return files, source, shards, ShardJob(self.SEED, self._synthesis, self._predict_amodal)

    def _generate_examples(self, split: str, manual_dir: pathlib.Path):
        (annotation_file, image_dir), source, shards, job = self._plan(split, manual_dir)
        self.stats[split] = amodal_builder.BuildStats()
        if self._beam:
            import apache_beam as beam

            return beam.Create(shards) | beam.FlatMap(
                BeamShardJob(str(annotation_file), str(image_dir), split, job))
        return self._local_examples(split, source, shards, job)

    def _local_examples(self, split, source, shards, job) -> Iterator[tuple[int, dict]]:
        synthesis = amodal_lvis.SynthesisStats()
        written = collections.Counter()
        tasks = ((source.shard(start, stop), start) for start, stop in shards)
        for examples, stats in run_shards(job, tasks, self._workers):
            synthesis.add(stats)
            written.update(written_counts(examples))
            yield from examples
        if not written["images_written"]:
            raise ValueError(
                f"{self.name} split {split!r}: no examples (" + ", ".join(synthesis.lines())
                + "); a source needs complete objects in at least two images of a shard")
        self._record(split, dataclasses.asdict(synthesis), written)

    def _record(self, split: str, synthesis: dict[str, int], written: dict[str, int]) -> None:
        stats = self.stats[split]
        stats.images = synthesis["images"] + synthesis["images_skipped"]
        stats.instances = synthesis["instances"]
        stats.images_skipped["corrupt_image"] = synthesis["images_skipped"]
        stats.instances_bad_mask = synthesis["instances_bad_mask"]
        for name in ("images_written", "kept", "kept_occluded"):
            setattr(stats, name, written.get(name, 0))
        stats.notes.append("synthesis: " + ", ".join(f"{k}: {v}" for k, v in synthesis.items()))
        self.info.metadata[split] = stats.as_dict()

    def _process_pipeline_result(self, pipeline_result) -> None:
        """Beam: the per-split counts from the workers' counters."""
        import apache_beam as beam

        query = beam.metrics.MetricsFilter().with_namespace(_BEAM_NAMESPACE)
        totals: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for counter in pipeline_result.metrics().query(query)["counters"]:
            split, _, name = counter.key.metric.name.partition(":")
            totals[split][name] += counter.committed or counter.attempted or 0
        for split in self.stats:
            synthesis = {f.name: totals[split][f.name]
                         for f in dataclasses.fields(amodal_lvis.SynthesisStats)}
            self._record(split, synthesis, totals[split])
