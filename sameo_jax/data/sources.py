"""Random-access sources of schema examples: built TFDS data sets and the demo scenes.

`open_source(name, split, data_dir)` returns an object with `len()` and `[i]` giving
examples in the project's schema as numpy (see `datasets/features.py` for the stored form):

    {'image': uint8 [H, W, 3], 'image_id': int64, 'source': str,
     'objects': {'amodal_mask': bool [N, H, W], 'visible_mask': bool [N, H, W],
                 'amodal_bbox': float32 [N, 4], 'visible_bbox': float32 [N, 4],
                 'category_id': int64 [N], 'occlusion_rate': float32 [N],
                 'order': int64 [N] (depth rank, 1 = front; 0 = unknown)}}

Built data is read with `tfds.data_source` machinery (array_record, no TensorFlow).
'demo' with no data_dir is the procedural `DemoSource` and needs no build.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import numpy as np

# split -> (seed, number of examples) of the in-memory demo data set.
DEMO_SPLITS = {"train": (0, 2000), "validation": (1, 200), "test": (2, 200)}
DEMO_IMAGE_SIZE = 256


def demo_source(split: str, num_examples: int | None = None, image_size: int = DEMO_IMAGE_SIZE):
    """The procedural demo split (`DEMO_SPLITS` gives seed and default size)."""
    from sameo_jax.data.demo_scenes import DemoSource

    if split not in DEMO_SPLITS:
        raise ValueError(f"demo: unknown split {split!r}; known: {sorted(DEMO_SPLITS)}")
    seed, size = DEMO_SPLITS[split]
    return DemoSource(size if num_examples is None else num_examples, image_size, seed)


def _build_command(name: str, data_dir: str, split: str | None = None) -> str:
    base, _, config = name.partition("/")
    target = f"{base}/{config}" if config else base
    cmd = f"python -m datasets.build {target} --manual_dir <release folder> --data_dir {data_dir}"
    return cmd + (f" --split {split}" if split else "")


def _version_dir(root: pathlib.Path, name: str, data_dir: str) -> pathlib.Path:
    """data_dir/name[/config]/<newest version> holding dataset_info.json."""
    path = root / name
    if path.is_dir() and "/" not in name:
        # Builders with configs nest one more level; take the first config with a build.
        if not any((v / "dataset_info.json").is_file() for v in path.iterdir() if v.is_dir()):
            configs = sorted(c for c in path.iterdir() if c.is_dir())
            path = next((c for c in configs if any(c.glob("*/dataset_info.json"))), path)
    versions = sorted(
        (v for v in path.glob("*/dataset_info.json")),
        key=lambda p: tuple(int(x) for x in p.parent.name.split(".") if x.isdigit()),
    )
    if not versions:
        raise FileNotFoundError(
            f"no built data set {name!r} in {data_dir}; build it with: "
            f"{_build_command(name, data_dir)}"
        )
    return versions[-1].parent


class TfdsSource:
    """A built split read through `tfds` array_record data sources, decoded to the schema."""

    def __init__(self, path: str | os.PathLike, split: str):
        import tensorflow_datasets as tfds

        self.path = pathlib.Path(path)
        self.split = split
        builder = tfds.builder_from_directory(str(self.path))
        self.name = builder.info.full_name
        if split not in builder.info.splits:
            raise ValueError(
                f"split {split!r} not built for {self.name} in {self.path} "
                f"(has: {', '.join(builder.info.splits)})"
            )
        self._source = builder.as_data_source(split=split)

    def __len__(self) -> int:
        return len(self._source)

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, split={self.split!r}, len={len(self)})"

    def __getitem__(self, index: int) -> dict[str, Any]:
        return to_schema(self._source[int(index)])


def to_schema(record: dict[str, Any]) -> dict[str, Any]:
    """A decoded TFDS record (lists of per-instance arrays) -> schema example (numpy)."""
    image = np.asarray(record["image"], np.uint8)
    if "occluders" in record:  # Amodal-LVIS stores the source image and the occluder apart
        from sameo_jax.data import amodal_lvis

        image = amodal_lvis.paste_occluders(
            image, amodal_lvis.stored_patches(record["occluders"]))
    h, w = image.shape[:2]
    obj = record["objects"]

    def masks(key: str) -> np.ndarray:
        items = [np.asarray(m).reshape(h, w) for m in obj[key]]
        return np.stack(items).astype(bool) if items else np.zeros((0, h, w), bool)

    source = record["source"]
    n = len(np.asarray(obj["category_id"]).reshape(-1))
    # Builds made before the schema had `order` read as "unknown".
    order = np.asarray(obj["order"], np.int64).reshape(-1) if "order" in obj else None
    return {
        "image": image,
        "image_id": np.int64(record["image_id"]),
        "source": source.decode() if isinstance(source, bytes) else str(source),
        "objects": {
            "amodal_mask": masks("amodal_mask"),
            "visible_mask": masks("visible_mask"),
            "amodal_bbox": np.asarray(obj["amodal_bbox"], np.float32).reshape(-1, 4),
            "visible_bbox": np.asarray(obj["visible_bbox"], np.float32).reshape(-1, 4),
            "category_id": np.asarray(obj["category_id"], np.int64).reshape(-1),
            "occlusion_rate": np.asarray(obj["occlusion_rate"], np.float32).reshape(-1),
            "order": np.zeros(n, np.int64) if order is None else order,
        },
    }


def default_data_dir() -> str:
    """$TFDS_DATA_DIR, else ~/tensorflow_datasets (TFDS's own default)."""
    return os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))


def open_source(name: str, split: str = "train", data_dir: str | None = None):
    """Random-access source of schema examples for a data set split.

    name: a built data set ('cocoa', 'kins', 'kins/update_2020', ...) or 'demo'.
    data_dir: the `--data_dir` the build wrote to (default $TFDS_DATA_DIR or
      ~/tensorflow_datasets). 'demo' with data_dir None is the in-memory procedural source.
    Raises FileNotFoundError with the build command when the data set is not built there.
    """
    if name == "demo" and data_dir is None:
        return demo_source(split)
    data_dir = os.path.expanduser(data_dir or default_data_dir())
    path = _version_dir(pathlib.Path(data_dir), name, data_dir)
    try:
        return TfdsSource(path, split)
    except ValueError as e:
        raise ValueError(f"{e}; build it with: {_build_command(name, data_dir, split)}") from None
