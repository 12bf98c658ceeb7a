"""Shared TFDS builder for amodal releases: release records -> cleaned schema examples.

A release reader turns annotation files into `RawImage`s (file name + per-instance COCO
segmentations); `AmodalBuilder` decodes masks, applies SAMEO's cleaning rules, counts what
each step removed (`BuildStats`) and writes array_record through TFDS. Bad images and bad
masks are skipped with a warning and counted, never dropped silently.
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import logging
import os
import pathlib
from collections.abc import Iterator, Sequence
from typing import Any

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from datasets import cleaning
from datasets import features as features_lib
from sameo_jax import boxes as boxes_lib
from sameo_jax import image_io
from sameo_jax import masks as masks_lib

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RawInstance:
    """One instance as the release gives it (segmentations in COCO polygon / RLE form)."""

    amodal_seg: Any
    visible_seg: Any = None  # None: visible = amodal minus `invisible_seg` (or = amodal)
    invisible_seg: Any = None
    category_id: int = 0
    name: str = ""
    is_stuff: bool = False
    occlusion_rate: float | None = None  # None: computed from the masks
    amodal_bbox_xywh: Sequence[float] | None = None  # None: derived from the amodal mask
    visible_bbox_xywh: Sequence[float] | None = None  # None: derived from the visible mask
    order: int = 0  # the release's depth rank (1 = front); 0: the release gives none


@dataclasses.dataclass
class RawImage:
    image_id: int
    file_name: str
    height: int | None
    width: int | None
    instances: list[RawInstance]


@dataclasses.dataclass
class BuildStats:
    """What a split build read, skipped (by reason), removed and wrote.

    Every instance read ends up in exactly one of: in skipped images, bad mask, bad entry
    (`instances_skipped`), removed by a rule, kept.
    """

    images: int = 0
    images_written: int = 0
    images_skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    instances: int = 0
    instances_in_skipped_images: int = 0
    instances_bad_mask: int = 0
    bad_masks: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    instances_skipped: collections.Counter = dataclasses.field(
        default_factory=collections.Counter)
    removed: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    kept: int = 0
    kept_occluded: int = 0
    notes: list[str] = dataclasses.field(default_factory=list)

    def skip_image(self, reason: str, instances: int, where: str, detail: str) -> None:
        """Counts (and warns about) an image read and skipped with its `instances`."""
        log.warning("%s: %s; image skipped", where, detail)
        self.images += 1
        self.images_skipped[reason] += 1
        self.count_in_skipped_image(instances)

    def count_in_skipped_image(self, instances: int) -> None:
        self.instances += instances
        self.instances_in_skipped_images += instances

    def skip_instances(self, reason: str, n: int, where: str, detail: str) -> None:
        """Counts (and warns about) `n` instances read and skipped for a bad entry."""
        log.warning("%s: %s; skipped", where, detail)
        self.instances += n
        self.instances_skipped[reason] += n

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for key in ("images_skipped", "bad_masks", "instances_skipped", "removed"):
            d[key] = dict(getattr(self, key))
        return d

    def lines(self) -> list[str]:
        out = [
            f"images read: {self.images}, written: {self.images_written}",
            *(f"  images skipped ({k}): {v}" for k, v in sorted(self.images_skipped.items())),
            f"instances read: {self.instances}",
            f"  in skipped images: {self.instances_in_skipped_images}",
            f"  skipped (bad mask): {self.instances_bad_mask}",
            *(f"    {k}: {v}" for k, v in sorted(self.bad_masks.items())),
            *(f"  skipped ({k}): {v}" for k, v in sorted(self.instances_skipped.items())),
            *(f"  removed by rule '{k}': {v}" for k, v in self.removed.items()),
            f"  kept: {self.kept} (occluded: {self.kept_occluded})",
            *(f"note: {n}" for n in self.notes),
        ]
        return out


def _as_polygons(seg: Any) -> Any:
    """COCOA regions store one polygon as a flat list; COCO expects a list of polygons."""
    if isinstance(seg, list) and seg and not isinstance(seg[0], list | dict):
        return [seg]
    return seg


def decode_instance(inst: RawInstance, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (amodal, visible) [H, W] bool. Raises masks.BadSegmentation (with a `reason`) for
    segmentations that cannot be decoded safely (see `sameo_jax.masks`)."""
    amodal = masks_lib.decode_segmentation(_as_polygons(inst.amodal_seg), height, width)
    if inst.visible_seg is not None:
        visible = masks_lib.decode_segmentation(_as_polygons(inst.visible_seg), height, width)
    elif inst.invisible_seg is not None:
        invisible = masks_lib.decode_segmentation(
            _as_polygons(inst.invisible_seg), height, width
        )
        visible = amodal & ~invisible
    else:
        visible = amodal.copy()
    return amodal, visible


def convert_image(
    raw: RawImage,
    image_bytes: bytes,
    *,
    source: str,
    rules: Sequence[str],
    cleaning_cfg: ml_collections.ConfigDict,
    stats: BuildStats,
) -> dict[str, Any] | None:
    """Release image record + image bytes -> schema example (None when nothing is left).

    Updates `stats`; every instance ends up counted as skipped, removed or kept.
    """
    where = f"image {raw.image_id} ({raw.file_name})"
    try:
        image, height, width = features_lib.read_image_bytes(image_bytes, where)
    except image_io.ImageError as e:
        log.warning("%s; skipped", e)
        stats.images_skipped[e.reason] += 1
        stats.instances_in_skipped_images += len(raw.instances)
        return None
    if (raw.height is not None and raw.height != height) or (
            raw.width is not None and raw.width != width):
        log.warning(
            "%s: annotation says %sx%s but the file is %sx%s (HxW); skipped",
            where, raw.height, raw.width, height, width,
        )
        stats.images_skipped["size_mismatch"] += 1
        stats.instances_in_skipped_images += len(raw.instances)
        return None

    decoded, used = [], []
    for k, inst in enumerate(raw.instances):
        try:
            decoded.append(decode_instance(inst, height, width))
            used.append(inst)
        except masks_lib.BadSegmentation as e:
            log.warning("%s: instance %d: %s; skipped", where, k, e)
            stats.instances_bad_mask += 1
            stats.bad_masks[e.reason] += 1
    n = len(used)
    amodal = np.stack([a for a, _ in decoded]) if n else np.zeros((0, height, width), bool)
    visible = np.stack([v for _, v in decoded]) if n else np.zeros((0, height, width), bool)
    computed = cleaning.occlusion_from_areas(amodal.sum(axis=(1, 2)), visible.sum(axis=(1, 2)))
    released = [i.occlusion_rate for i in used]
    occlusion = np.array(
        [c if r is None else r for r, c in zip(released, computed, strict=True)], np.float32
    )
    table = cleaning.make_table(
        amodal, visible, names=[i.name for i in used], is_stuff=[i.is_stuff for i in used],
        occlusion_rate=occlusion,
    )
    keep, reasons = cleaning.apply_rules(table, rules, cleaning_cfg)
    stats.removed.update(r for r in reasons if r is not None)
    stats.kept += int(keep.sum())
    stats.kept_occluded += int((keep & (table["visible_area"] < table["amodal_area"])).sum())
    if not keep.any():
        stats.images_skipped["no_instances_left"] += 1
        return None

    idx = np.flatnonzero(keep)
    amodal_boxes, visible_boxes = [], []
    for i in idx:
        inst = used[i]
        amodal_boxes.append(
            boxes_lib.box_from_mask(amodal[i]) if inst.amodal_bbox_xywh is None
            else boxes_lib.xywh_to_xyxy(inst.amodal_bbox_xywh)
        )
        visible_boxes.append(
            boxes_lib.box_from_mask(visible[i]) if inst.visible_bbox_xywh is None
            else boxes_lib.xywh_to_xyxy(inst.visible_bbox_xywh)
        )
    stats.images_written += 1
    return features_lib.make_example(
        image=image,
        image_id=raw.image_id,
        source=source,
        amodal_masks=amodal[idx],
        visible_masks=visible[idx],
        amodal_bbox=np.stack(amodal_boxes),
        visible_bbox=np.stack(visible_boxes),
        category_id=np.array([used[i].category_id for i in idx], np.int64),
        occlusion_rate=occlusion[idx],
        order=np.array([used[i].order for i in idx], np.int64),
    )


def schema_to_tfds(example: dict[str, Any], stats: BuildStats) -> dict[str, Any]:
    """In-memory schema example (numpy, see sameo_jax.data.sources) -> TFDS example."""
    obj = example["objects"]
    n = len(obj["category_id"])
    stats.images += 1
    stats.images_written += 1
    stats.instances += n
    stats.kept += n
    stats.kept_occluded += int((np.asarray(obj["occlusion_rate"]) > 0).sum())
    return features_lib.make_example(
        image=features_lib.encode_image(example["image"]),
        image_id=int(example["image_id"]),
        source=str(example["source"]),
        amodal_masks=obj["amodal_mask"],
        visible_masks=obj["visible_mask"],
        amodal_bbox=obj["amodal_bbox"],
        visible_bbox=obj["visible_bbox"],
        category_id=obj["category_id"],
        occlusion_rate=obj["occlusion_rate"],
        order=obj.get("order"),
    )


class AmodalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base for release builders. Subclasses set the class constants and `read_split`."""

    VERSION = tfds.core.Version("1.2.0")
    RELEASE_NOTES = {"1.0.0": "First release.",
                     "1.1.0": "objects/order: the release's depth rank (1 = front, 0 = none).",
                     "1.2.0": "objects/*_mask_pooled: the masks pooled to 256 x 256."}
    SOURCE: str = ""  # value of the `source` feature
    DOWNLOAD_PAGE: str = ""
    SPLIT_FILES: dict[str, Sequence[str]] = {}  # split -> annotation files in manual_dir
    IMAGE_DIRS: dict[str, Sequence[str]] = {}  # split -> image folders in manual_dir
    SPLIT_SIZES: dict[str, int] = {}  # split -> images in the full release
    RULES: Sequence[str] = ("empty_amodal", "tiny_visible")

    def __init__(
        self,
        *,
        splits: Sequence[str] | None = None,
        cleaning_cfg: ml_collections.ConfigDict | None = None,
        max_images: int | None = None,
        strict_sizes: bool = False,
        **kwargs: Any,
    ):
        self.MANUAL_DOWNLOAD_INSTRUCTIONS = self.manual_instructions()
        self._splits = list(splits) if splits else None
        self._cleaning_cfg = cleaning_cfg or cleaning.default_config()
        self._max_images = max_images
        self._strict_sizes = strict_sizes
        self._raw: dict[str, list[RawImage]] = {}
        self.stats: dict[str, BuildStats] = {}
        super().__init__(**kwargs)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        """The builder's source file. (TFDS's own lookup needs the `importlib_resources`
        backport for builders inside a package; the file path is all it needs.)"""
        return epath.Path(inspect.getfile(cls))

    # --- release description -------------------------------------------------------------

    @classmethod
    def manual_instructions(cls) -> str:
        files = sorted({f for fs in cls.SPLIT_FILES.values() for f in fs})
        return (
            f"Download from {cls.DOWNLOAD_PAGE} and place in manual_dir: {', '.join(files)} "
            f"(images under {sorted({d for ds in cls.IMAGE_DIRS.values() for d in ds})})."
        )

    def split_files(self, split: str) -> Sequence[str]:
        return self.SPLIT_FILES[split]

    def known_splits(self) -> list[str]:
        return list(self.SPLIT_FILES)

    def selected_splits(self) -> list[str]:
        known = self.known_splits()
        for s in self._splits or []:
            if s not in known:
                raise ValueError(f"{self.name}: unknown split {s!r}; known: {known}")
        return self._splits or known

    def check_manual_files(self, manual_dir: str | os.PathLike) -> None:
        """Raises FileNotFoundError naming the first missing release file and its page."""
        for split in self.selected_splits():
            for f in self.split_files(split):
                path = pathlib.Path(manual_dir) / f
                if not path.is_file():
                    raise FileNotFoundError(
                        f"{path}: missing release file {f!r} for {self.name} split {split!r}; "
                        f"download it from {self.DOWNLOAD_PAGE} "
                        f"(see datasets/{self.name}/README.md)"
                    )

    def read_split(self, split: str, manual_dir: pathlib.Path, stats: BuildStats
                   ) -> list[RawImage]:
        """The split's images; entries skipped while reading are counted in `stats`."""
        raise NotImplementedError

    # --- TFDS hooks ----------------------------------------------------------------------

    def feature_spec(self) -> tfds.features.FeaturesDict:
        """The features this builder writes (the shared schema; a builder may add some)."""
        return features_lib.features()

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(self.__doc__ or "").strip(),
            features=self.feature_spec(),
            homepage=self.DOWNLOAD_PAGE or None,
            metadata=tfds.core.MetadataDict(),
        )

    def _raw_split(self, split: str, manual_dir: pathlib.Path) -> list[RawImage]:
        if split not in self._raw:
            self.stats[split] = BuildStats()
            self._raw[split] = self.read_split(split, manual_dir, self.stats[split])
        return self._raw[split]

    def find_image(self, split: str, manual_dir: pathlib.Path, file_name: str) -> pathlib.Path:
        """First existing `manual_dir/<image dir>/file_name` (the first candidate if none).
        Raises image_io.ImageError (path_outside_folder) when the name leads out of an image
        folder (absolute, '..', a symlink out); the folders themselves may be links."""
        candidates = [image_io.path_inside(manual_dir / d, file_name)
                      for d in self.IMAGE_DIRS.get(split, ("",))]
        return next((p for p in candidates if p.is_file()), candidates[0])

    def _has_image(self, split: str, manual_dir: pathlib.Path, file_name: str) -> bool:
        try:
            return self.find_image(split, manual_dir, file_name).is_file()
        except image_io.ImageError:
            return False

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        manual_dir = pathlib.Path(dl_manager.manual_dir)
        self.check_manual_files(manual_dir)
        gens = {}
        for split in self.selected_splits():
            raws = self._raw_split(split, manual_dir)
            if raws and not any(
                self._has_image(split, manual_dir, r.file_name) for r in raws[:20]
            ):
                dirs = [str(manual_dir / d) for d in self.IMAGE_DIRS.get(split, ("",))]
                raise FileNotFoundError(
                    f"{self.name} split {split!r}: none of the first images "
                    f"(e.g. {raws[0].file_name!r}) found in {dirs}; download the images from "
                    f"{self.DOWNLOAD_PAGE} (see datasets/{self.name}/README.md)"
                )
            gens[split] = self._generate_examples(split, manual_dir)
        return gens

    def _generate_examples(self, split: str, manual_dir: pathlib.Path) -> Iterator[tuple]:
        raws = self._raw_split(split, manual_dir)
        stats = self.stats[split]
        listed = len(raws) + stats.images  # stats hold only the entries skipped while reading
        expected = self.SPLIT_SIZES.get(split)
        if expected is not None and listed != expected:
            msg = (
                f"{self.name} split {split!r}: the annotation files list {listed} images, "
                f"the full release has {expected}"
            )
            if self._strict_sizes:
                raise ValueError(msg)
            stats.notes.append(msg + " (partial or modified release)")
        if self._max_images is not None:
            raws = raws[: self._max_images]
        for i, raw in enumerate(raws):
            stats.images += 1
            stats.instances += len(raw.instances)
            try:
                data = image_io.read_file_bytes(
                    self.find_image(split, manual_dir, raw.file_name))
            except image_io.ImageError as e:
                log.warning("image %s: %s; skipped", raw.image_id, e)
                stats.images_skipped[e.reason] += 1
                stats.instances_in_skipped_images += len(raw.instances)
                continue
            example = convert_image(
                raw, data, source=self.SOURCE or self.name, rules=self.RULES,
                cleaning_cfg=self._cleaning_cfg, stats=stats,
            )
            if example is not None:
                yield i, example
        self.info.metadata[split] = stats.as_dict()
        self.info.metadata["cleaning"] = {
            "rules": list(self.RULES), **self._cleaning_cfg.to_dict()
        }
