"""Random-access sources of schema examples: built TFDS data sets and the demo scenes.

`open_source(name, split, data_dir)` returns an object with `len()` and `[i]` giving
examples in the project's schema as numpy (`sameo_jax.data.schema`; `datasets/features.py`
is the stored form).

Built data is read with `tfds.data_source` machinery (array_record, no TensorFlow).
'demo' with no data_dir is the procedural `DemoSource` and needs no build.
"""

from __future__ import annotations

import io
import os
import pathlib
from typing import Any

import numpy as np

from sameo_jax.data.occluders import paste_occluders, stored_patches
from sameo_jax.data.pooling import mask_box, pool_mask_crop, read_pooled, stored_size

# split -> (seed, number of examples) of the in-memory demo data set.
DEMO_SPLITS = {"train": (0, 2000), "validation": (1, 200), "test": (2, 200)}
DEMO_IMAGE_SIZE = 256


def demo_source(split: str, num_examples: int | None = None,
                image_size: int = DEMO_IMAGE_SIZE, **scene: Any):
    """The procedural demo split (`DEMO_SPLITS` gives seed and default size); `scene` goes to
    `DemoSource` (occlusion_range, object_size, dual)."""
    from sameo_jax.data.demo_scenes import DemoSource

    if split not in DEMO_SPLITS:
        raise ValueError(f"demo: unknown split {split!r}; known: {sorted(DEMO_SPLITS)}")
    seed, size = DEMO_SPLITS[split]
    return DemoSource(size if num_examples is None else num_examples, image_size, seed,
                      **scene)


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
    """A built split read through `tfds` array_record data sources, decoded to the schema.

    `[i]` decodes the whole example; `record(i)` decodes only what is asked of it (`Record`)
    and `image(i)` only the image.
    """

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
        self._raw = builder.as_data_source(
            split=split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
        self._features = builder.info.features
        self._parser = None

    def __len__(self) -> int:
        return len(self._source)

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, split={self.split!r}, len={len(self)})"

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_parser": None}  # rebuilt on first use in a worker

    def __getitem__(self, index: int) -> dict[str, Any]:
        return to_schema(self._source[int(index)])

    def record(self, index: int) -> Record:
        """Example `index` with its image and masks left encoded until asked for."""
        if self._parser is None:
            from tensorflow_datasets.core import example_parser

            self._parser = example_parser.ExampleParserNp(self._features.get_serialized_info())
        parsed = self._parser.parse_example(self._raw[int(index)])
        return Record(parsed, self._features, f"{self.name} {self.split} example {index}")

    def image(self, index: int) -> tuple[np.ndarray, int]:
        """(image uint8 [H, W, 3], image_id) of example `index`, no mask decoded."""
        record = self.record(index)
        return record.image(), record.image_id


class Record:
    """One stored example, decoded on demand: `objects` holds the per-instance boxes and
    numbers (schema keys other than the masks), `image()` decodes the image and
    `masks(kind, indices)` the chosen instances' masks only.

    Raises ValueError naming the example for masks that do not fit the image.
    """

    def __init__(self, parsed: dict[str, Any], features: Any, where: str):
        self.where = where
        self._parsed = parsed
        self._features = features
        obj = parsed["objects"]
        self.image_id = int(parsed["image_id"])
        source = parsed["source"]
        self.source = source.decode() if isinstance(source, bytes) else str(source)
        n = len(np.asarray(obj["category_id"]).reshape(-1))
        self.num_instances = n
        self.objects = {
            "amodal_bbox": np.asarray(obj["amodal_bbox"], np.float32).reshape(-1, 4),
            "visible_bbox": np.asarray(obj["visible_bbox"], np.float32).reshape(-1, 4),
            "category_id": np.asarray(obj["category_id"], np.int64).reshape(-1),
            "occlusion_rate": np.asarray(obj["occlusion_rate"], np.float32).reshape(-1),
            "order": (np.asarray(obj["order"], np.int64).reshape(-1) if "order" in obj
                      else np.zeros(n, np.int64)),
        }
        # Builds before 1.2.0 have no pooled masks: theirs are pooled from the PNGs.
        keys = ("amodal_mask", "visible_mask", "amodal_mask_pooled", "visible_mask_pooled")
        for key in keys[: 4 if keys[2] in obj else 2]:
            if len(obj[key]) != n:
                raise ValueError(f"{where}: {len(obj[key])} {key}s for {n} instances")
        self._hw: tuple[int, int] | None = None

    def usable(self) -> np.ndarray:
        """Instances whose amodal box has an area (the builders drop empty masks; a mask
        found empty when decoded makes its row invalid in the pipeline)."""
        box = self.objects["amodal_bbox"]
        return np.flatnonzero((box[:, 2] > box[:, 0]) & (box[:, 3] > box[:, 1]))

    def image_hw(self) -> tuple[int, int]:
        """(H, W) from the image file's header (nothing decoded)."""
        if self._hw is None:
            from PIL import Image

            try:
                with Image.open(io.BytesIO(self._parsed["image"])) as im:
                    w, h = im.size
            except (OSError, ValueError) as e:
                raise ValueError(f"{self.where}: unreadable image ({e})") from None
            self._hw = (h, w)
        return self._hw

    def image(self) -> np.ndarray:
        """The image, uint8 [H, W, 3] (an Amodal-LVIS record's occluder pasted in)."""
        image = np.asarray(self._features["image"].decode_example_np(self._parsed["image"]),
                           np.uint8)
        if "occluders" in self._parsed:
            occluders = self._features["occluders"].decode_example_np(self._parsed["occluders"])
            image = paste_occluders(image, stored_patches(occluders))
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"{self.where}: image of shape {image.shape}, expected [H, W, 3]")
        self._hw = image.shape[:2]
        return image

    def _decoded_mask(self, kind: str, i: int) -> Any:
        """Mask `i` of `kind` as a loaded PIL image of the image's size."""
        from PIL import Image

        h, w = self.image_hw()
        data = self._parsed["objects"][f"{kind}_mask"][int(i)]
        try:
            im = Image.open(io.BytesIO(data))
            im.load()
        except (OSError, ValueError) as e:
            raise ValueError(f"{self.where}: unreadable {kind} mask {int(i)} ({e})") from None
        if im.size != (w, h) or len(im.getbands()) != 1:
            raise ValueError(f"{self.where}: {kind} mask {int(i)} is {im.size[1]}x{im.size[0]}"
                             f"x{len(im.getbands())}, the image {h}x{w} (one channel)")
        return im

    def masks(self, kind: str, indices: Any) -> np.ndarray:
        """bool [k, H, W]: the `kind` ('amodal' | 'visible') masks of instances `indices`."""
        h, w = self.image_hw()
        out = np.zeros((len(indices), h, w), bool)
        for row, i in enumerate(indices):
            out[row] = _nonzero(self._decoded_mask(kind, i))
        return out

    def pooled_masks(self, kind: str, indices: Any, size: int, out: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
        """(the masks of instances `indices` pooled to [k, size, size] bool, as
        `pooling.downsample_masks`, and whether each has a pixel [k]): read from the stored
        pooled masks when they were pooled to `size`, else decoded and pooled over each
        mask's bounding box only. `out`: an all-False [k, size, size] array to write into."""
        if out is None:
            out = np.zeros((len(indices), size, size), bool)
        nonempty = np.zeros(len(indices), bool)
        stored = self._parsed["objects"].get(f"{kind}_mask_pooled")
        for row, i in enumerate(indices):
            data = None if stored is None else stored[int(i)]
            try:
                if data is not None and stored_size(data) in (None, size):
                    nonempty[row] = read_pooled(data, out[row])
                    continue
            except ValueError as e:
                raise ValueError(f"{self.where}: {kind} mask {int(i)}: {e}") from None
            nonempty[row] = self._pool_png(kind, i, size, out[row])
        return out, nonempty

    def _pool_png(self, kind: str, i: int, size: int, out: np.ndarray) -> bool:
        """Pools the PNG of mask `i` of `kind` into `out` [size, size]; whether it has a pixel."""
        hw = self.image_hw()
        im = self._decoded_mask(kind, i)
        if im.mode in ("1", "L"):  # getbbox: the box of the nonzero pixels
            box = im.getbbox()
            crop = None if box is None else _nonzero(im.crop(box))
        else:
            mask = _nonzero(im)
            box = mask_box(mask)
            crop = None if box is None else mask[box[1] : box[3], box[0] : box[2]]
        if box is not None:
            out[...] = pool_mask_crop(crop, box, hw, size)
        return box is not None


def _nonzero(im: Any) -> np.ndarray:
    """A decoded one-channel mask image -> [H, W] bool (its nonzero pixels)."""
    mask = np.asarray(im)
    return mask if im.mode == "1" else mask != 0


def to_schema(record: dict[str, Any]) -> dict[str, Any]:
    """A decoded TFDS record (lists of per-instance arrays) -> schema example (numpy)."""
    image = np.asarray(record["image"], np.uint8)
    if "occluders" in record:  # Amodal-LVIS stores the source image and the occluder apart
        image = paste_occluders(image, stored_patches(record["occluders"]))
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
