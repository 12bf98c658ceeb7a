"""grain input pipeline: schema examples -> fixed-shape training and evaluation batches.

API
    make_train_dataset(sources, *, batch_size, image_size, mask_size, instances_per_image,
                       prompt_mode="random", box_jitter=0.0, mixture="log_proportional",
                       seed=0, start=0, process_index=0, process_count=1, worker_count=0,
                       read_threads=0, image_pad_hw=None, embeddings=None, ...)
        -> grain.IterDataset
    make_train_loader(...same...) -> grain.DatasetIterator   # = iter(make_train_dataset(...))
    make_eval_loader(source, *, batch_size, image_size, mask_size, instances_per_image,
                     prompt_mode="modal", process_index=0, process_count=1,
                     image_pad_hw=None, embeddings=None, ...)
        -> Iterator[batch]   # one ordered pass (over this process's examples)
    to_global_batch(batch, sharding) -> pytree of jax.Array   # place a host batch on devices
    prepare_example(example, rng, *, image_size, mask_size, instances_per_image, ...)

Sources are anything random-access (`len`, `[i]` -> example in the project schema, or
`record(i)` -> `sources.Record`, decoded on demand): `sameo_jax.data.sources.open_source(...)`
for built TFDS data, or `DemoSource`.

Training batch (numpy, host-local; B = batch_size // process_count, S = image_size,
N = instances_per_image, L = mask_size), the image as one of three:
    'image'            uint8   [B, P, Q, 3]  with image_pad_hw = (P, Q): the image as stored,
    'pixels_hw'        int32   [B, 2]        in the top-left pixels_hw, zeros elsewhere; the
                                             jitted step resizes it to S
                                             (stack_rows / preprocessing.resize_padded)
    'image'            uint8   [B, S, S, 3]  with image_pad_hw None: preprocessing.resize_image
                                             on the host (bilinear, no antialias, aspect not
                                             kept), rounded to uint8
    'embedding'        bfloat16 [B, E, E, D] with `embeddings` (an on-disk cache,
                                             sameo_jax.data.embedding_store): no image decoded
and the rest:
    'image_key'        int32   [B]           offset of the source + index in it (offsets: the
                                             sizes of the sources before it, in dict order)
    'prompt_boxes'     float32 [B, N, 4]     xyxy in the S frame (x * S / W, y * S / H)
    'prompt_is_amodal' bool    [B, N]
    'amodal_masks'     bool    [B, N, L, L]
    'visible_masks'    bool    [B, N, L, L]
    'occlusion_rate'   float32 [B, N]
    'valid'            bool    [B, N]        padding rows are False (and all zeros)

Steps per example: pick the instances (all of them, or N at random when there are more;
instances with an empty amodal mask are never used), choose each prompt box (prompt_mode
"random": amodal box with probability `amodal_prompt_prob` = 0.5, else modal; "modal" /
"amodal": always that one; an instance with an empty visible mask always gets its amodal
box), optionally jitter it (`box_jitter` = std of each coordinate's noise as a fraction of
the box width / height, noise clipped to +-2 std, box clipped to the image), rescale it to
the S frame, and pad to N.

Only the chosen instances' masks are decoded where the source gives records
(`sources.TfdsSource.record`: built data sets); there, usable instances are those whose
amodal box has an area (the builders drop empty masks).

Target masks at L: each L x L cell is in the mask when at least half of its area is covered
("majority area pooling", computed exactly in integers over the mask's bounding box). The
L x L grid spans the whole original image, the same frame as the resized S x S input. An
instance whose amodal target vanishes at L (too small) is marked invalid. Built data sets
store every mask pooled at L = 256 (`pooling.encode_pooled`), read without decoding a PNG.

Mixing: one shuffled, repeated stream per source, mixed per element by
`sameo_jax.data.mixture` (`mixture` = "log_proportional" | "proportional" | "uniform" | a
mapping name -> weight). Batches are made before the iterator, so each of the
`read_threads` threads (0: synchronous) and `worker_count` processes builds whole batches.
From worker processes, masks cross as bits and images padded only to the batch's largest;
the consuming process unpacks and pads them (`unpack_masks`): the batches are the same.

Determinism and resuming: the training examples form one global stream, a pure function of
(seed, position in the stream), whatever the number of workers or processes; global batch k
is examples [start + k * batch_size, start + (k + 1) * batch_size) of it, and each process
prepares only its own contiguous share of those rows. So a run that has consumed `start`
examples resumes, on any number of processes and with any batch size, by building the
dataset with that `start`. Within one setup, `it.get_state()` is a small JSON-serialisable
dict and `it.set_state(state)` resumes exactly there (the state's layout depends on
worker_count: resume with the same worker_count). With orbax, save it beside the train state:
    Save = grain.checkpoint.CheckpointSave; Restore = grain.checkpoint.CheckpointRestore
    mgr.save(step, args=ocp.args.Composite(state=..., data=Save(it)))
    mgr.restore(step, args=ocp.args.Composite(state=..., data=Restore(it)))
(`grain.checkpoint.CheckpointHandler` writes the state as one JSON file per process.)
"""

from __future__ import annotations

import functools
import math
import queue
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np
from absl import flags, logging

from sameo_jax.data import mixture as mixture_lib
from sameo_jax.data.pooling import downsample_masks
from sameo_jax.preprocessing import rescale_points, resize_image_uint8

PROMPT_MODES = ("random", "modal", "amodal")
BATCH_KEYS = ("image", "image_key", "prompt_boxes", "prompt_is_amodal", "amodal_masks",
              "visible_masks", "occlusion_rate", "valid")
_MASK_KEYS = ("amodal_masks", "visible_masks")
_OBJECT_KEYS = ("amodal_mask", "visible_mask", "amodal_bbox", "visible_bbox", "occlusion_rate")


def _sub_seed(seed: int, *path: int) -> int:
    """A 32-bit seed derived from (seed, *path) (grain wants seeds in [0, 2**32))."""
    return int(np.random.SeedSequence([int(seed), *path]).generate_state(1)[0])


def _check_example(example: Any, where: str) -> None:
    if not isinstance(example, Mapping) or "image" not in example or "objects" not in example:
        raise ValueError(f"{where}: not a schema example (need 'image' and 'objects')")
    image = np.asarray(example["image"])
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"{where}: 'image' must be [H, W, 3], got shape {image.shape}")
    objects = example["objects"]
    for key in _OBJECT_KEYS:
        if key not in objects:
            raise ValueError(f"{where}: 'objects' has no field {key!r}")
    n = len(objects["amodal_bbox"])
    for key in ("amodal_mask", "visible_mask"):
        shape = np.shape(objects[key])
        if shape != (n, *image.shape[:2]):
            raise ValueError(f"{where}: objects[{key!r}] has shape {shape}, expected "
                             f"[{n}, {image.shape[0]}, {image.shape[1]}]")


def jitter_boxes(boxes: np.ndarray, scale: float, rng: np.random.Generator,
                 image_hw: tuple[int, int]) -> np.ndarray:
    """Adds Gaussian noise (std = scale * box side, clipped to 2 std) to [K, 4] xyxy boxes.

    The result is clipped to the image and kept ordered (x0 <= x1, y0 <= y1).
    """
    boxes = np.asarray(boxes, np.float32)
    if scale <= 0 or len(boxes) == 0:
        return boxes
    h, w = image_hw
    side = np.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]] * 2, axis=-1)
    noise = np.clip(rng.standard_normal(boxes.shape), -2.0, 2.0) * scale * side
    out = boxes + noise.astype(np.float32)
    out[:, 0::2] = np.clip(out[:, 0::2], 0, w)
    out[:, 1::2] = np.clip(out[:, 1::2], 0, h)
    x = np.sort(out[:, 0::2], axis=1)
    y = np.sort(out[:, 1::2], axis=1)
    return np.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], axis=-1).astype(np.float32)


class DecodedExample:
    """A schema example (every array decoded already) behind the interface of
    `sources.Record`: image_id, objects, image_hw(), image(), masks(kind, indices),
    pooled_masks(kind, indices, size), usable()."""

    def __init__(self, example: Mapping[str, Any], where: str = "example"):
        _check_example(example, where)
        self.example = example
        self.objects = example["objects"]
        self.image_id = int(example.get("image_id", -1))
        self.num_instances = len(self.objects["amodal_bbox"])

    def image_hw(self) -> tuple[int, int]:
        return tuple(np.shape(self.example["image"])[:2])

    def image(self) -> np.ndarray:
        return np.asarray(self.example["image"])

    def masks(self, kind: str, indices: Any) -> np.ndarray:
        return np.asarray(self.objects[f"{kind}_mask"], bool)[np.asarray(indices, np.int64)]

    def pooled_masks(self, kind: str, indices: Any, size: int, out: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
        """(`downsample_masks` of the masks [k, size, size] (written into `out` when given),
        whether each has a pixel [k])."""
        masks = self.masks(kind, indices)
        if out is None:
            out = np.empty((len(masks), size, size), bool)
        out[...] = downsample_masks(masks, size)
        return out, masks.reshape(len(masks), -1).any(axis=1)

    def usable(self) -> np.ndarray:
        """Instances with a non-empty amodal mask."""
        area = np.asarray(self.objects["amodal_mask"]).reshape(self.num_instances, -1)
        return np.flatnonzero(area.any(axis=1))


def as_record(example: Any, where: str = "example") -> Any:
    """A `sources.Record` (or anything with its interface) as it is; a schema dict wrapped
    in `DecodedExample`."""
    return example if hasattr(example, "masks") else DecodedExample(example, where)


def prepare_example(
    example: Any,
    rng: np.random.Generator | None,
    *,
    image_size: int,
    mask_size: int,
    instances_per_image: int,
    prompt_mode: str = "random",
    amodal_prompt_prob: float = 0.5,
    box_jitter: float = 0.0,
    image_key: int = 0,
    instances: Sequence[int] | None = None,
    image_pad_hw: tuple[int, int] | None = None,
    embedding: np.ndarray | None = None,
    image: bool = True,
) -> dict[str, np.ndarray]:
    """One example (a schema dict or a `sources.Record`) -> one row of the training batch
    (no B axis; see the module docstring for which image keys it gets; with image_pad_hw the
    row's image is as decoded, [h, w, 3], and `stack_rows` pads it).

    rng: randomness for instance subsampling, random prompts and jitter (None: none allowed).
    instances: explicit instance indices to use (at most N; the evaluation path); default:
    all usable instances, N of them at random when there are more. Only the used instances'
    masks are decoded, and the image only when there is no `embedding` and `image` is True
    (False: a row without image keys, whose embedding the caller adds).
    """
    record = as_record(example)
    h, w = record.image_hw()
    objects = record.objects
    n_max = instances_per_image
    if instances is None:
        chosen = record.usable()
        if len(chosen) > n_max:
            if rng is None:
                raise ValueError("more instances than instances_per_image and no rng")
            chosen = np.sort(rng.choice(chosen, n_max, replace=False))
    else:
        chosen = np.asarray(instances, np.int64)
        if len(chosen) > n_max:
            raise ValueError(f"{len(chosen)} instances given, instances_per_image={n_max}")
    k = len(chosen)

    amodal_boxes = np.asarray(objects["amodal_bbox"], np.float32)[chosen].reshape(k, 4)
    visible_boxes = np.asarray(objects["visible_bbox"], np.float32)[chosen].reshape(k, 4)
    # Targets pooled straight into the padded rows (padding rows stay all False).
    amodal_masks = np.zeros((n_max, mask_size, mask_size), bool)
    visible_masks = np.zeros((n_max, mask_size, mask_size), bool)
    _, has_visible = record.pooled_masks("visible", chosen, mask_size, out=visible_masks[:k])
    if prompt_mode == "random":
        if rng is None:
            raise ValueError("prompt_mode 'random' needs an rng")
        is_amodal = rng.random(k) < amodal_prompt_prob
    elif prompt_mode in ("modal", "amodal"):
        is_amodal = np.full(k, prompt_mode == "amodal")
    else:
        raise ValueError(f"prompt_mode must be one of {PROMPT_MODES}, got {prompt_mode!r}")
    is_amodal |= ~has_visible
    boxes = np.where(is_amodal[:, None], amodal_boxes, visible_boxes)
    if box_jitter > 0:
        if rng is None:
            raise ValueError("box_jitter needs an rng")
        boxes = jitter_boxes(boxes, box_jitter, rng, (h, w))
    boxes = rescale_points(boxes.reshape(k, 2, 2), (h, w), image_size).reshape(k, 4)

    record.pooled_masks("amodal", chosen, mask_size, out=amodal_masks[:k])
    valid = amodal_masks[:k].reshape(k, -1).any(axis=1)
    visible_masks[:k][~valid] = False  # an invalid row is all zeros

    def pad(x: np.ndarray, dtype) -> np.ndarray:
        out = np.zeros((n_max, *x.shape[1:]), dtype)
        out[:k] = x
        return out

    row = {}
    if embedding is not None:
        row["embedding"] = embedding
    elif image and image_pad_hw is not None:
        pixels = record.image()
        if h > image_pad_hw[0] or w > image_pad_hw[1]:
            logging.log_first_n(
                logging.WARNING, "a %dx%d image exceeds the image pad %s: such images are "
                "resized on the host (rounded to uint8); a larger pad (config.data."
                "image_pad_hw) keeps the resize exact", 1, h, w, tuple(image_pad_hw))
            pixels = resize_image_uint8(pixels, image_size)
        row["image"] = pixels  # padded to image_pad_hw when rows are stacked (stack_rows)
        row["pixels_hw"] = np.asarray(pixels.shape[:2], np.int32)
    elif image:
        row["image"] = resize_image_uint8(record.image(), image_size)
    return {
        **row,
        "image_key": np.int32(image_key),
        "prompt_boxes": pad(np.where(valid[:, None], boxes, 0.0), np.float32),
        "prompt_is_amodal": pad(is_amodal & valid, bool),
        "amodal_masks": amodal_masks,
        "visible_masks": visible_masks,
        "occlusion_rate": pad(
            np.where(valid, np.asarray(objects["occlusion_rate"], np.float32)[chosen], 0.0),
            np.float32),
        "valid": pad(valid, bool),
    }


def _load(source: Any, index: int, where: str) -> Any:
    """Example `index` of a source: its `record(index)` where it has one (decoded on demand),
    else `[index]` wrapped in `DecodedExample`."""
    if hasattr(source, "record"):
        return source.record(index)
    return DecodedExample(source[index], where)


def _check_cached(embeddings: Any, record: Any, index: int, where: str) -> None:
    """Checks that the cached embedding of example `index` was made of this image."""
    if record.image_id != embeddings.image_id(index):
        raise ValueError(
            f"{where}: image id {record.image_id}, but the embedding cache "
            f"{embeddings.directory} holds image id {embeddings.image_id(index)} there (made of "
            "other data; write the cache again with embed.py)")


def _check_embeddings(name: str, source: Any, embeddings: Any) -> None:
    if len(embeddings) != len(source):
        raise ValueError(f"embedding cache {embeddings.directory} holds {len(embeddings)} "
                         f"examples, source {name!r} has {len(source)}")


class _KeyedSources:
    """Global image keys <-> (source, index): key = offset of the source + index."""

    def __init__(self, sources: Mapping[str, Any], embeddings: Mapping[str, Any] | None = None):
        if not sources:
            raise ValueError("pipeline: no sources given")
        self.names = list(sources)
        self.sources = [sources[n] for n in self.names]
        self.embeddings = None
        if embeddings is not None:
            missing = [n for n in self.names if n not in embeddings]
            if missing:
                raise ValueError(f"pipeline: no cached embeddings for sources {missing}")
            self.embeddings = [embeddings[n] for n in self.names]
            for name, source, cached in zip(self.names, self.sources, self.embeddings,
                                            strict=True):
                _check_embeddings(name, source, cached)
        self.sizes = [len(s) for s in self.sources]
        for name, size in zip(self.names, self.sizes, strict=True):
            if size <= 0:
                raise ValueError(f"pipeline: source {name!r} is empty")
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        if self.offsets[-1] > np.iinfo(np.int32).max:
            raise ValueError("pipeline: more than 2**31 images in all; image_key is int32")

    def _locate(self, key: int) -> tuple[int, int]:
        """(source number, index in it) of a global image key."""
        d = int(np.searchsorted(self.offsets, key, side="right") - 1)
        return d, int(key - self.offsets[d])

    def load(self, key: int) -> tuple[int, Any]:
        """(key, the example as a record); its cached embedding, if any, checked to be of it."""
        d, index = self._locate(key)
        where = f"source {self.names[d]!r} example {index}"
        record = _load(self.sources[d], index, where)
        if self.embeddings is not None:
            _check_cached(self.embeddings[d], record, index, where)
        return int(key), record

    def add_embeddings(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The batch with 'embedding' bfloat16 [B, E, E, D] of its image keys, read straight
        into the batch (in the process that consumes it: no copy passes through workers)."""
        keys = np.asarray(batch["image_key"]).reshape(-1)
        first = self.embeddings[self._locate(int(keys[0]))[0]]
        out = np.empty((len(keys), *first.embedding_shape), first.dtype)
        for row, key in enumerate(keys):
            d, index = self._locate(int(key))
            self.embeddings[d].get(index, out=out[row])
        return {**batch, "embedding": out}


def make_train_dataset(
    sources: Mapping[str, Any],
    *,
    batch_size: int,
    image_size: int,
    mask_size: int,
    instances_per_image: int,
    prompt_mode: str = "random",
    amodal_prompt_prob: float = 0.5,
    box_jitter: float = 0.0,
    mixture: str | Mapping[str, float] = "log_proportional",
    seed: int = 0,
    start: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    worker_count: int = 0,
    worker_buffer_size: int = 2,
    read_threads: int = 0,
    prefetch_batches: int = 4,
    mixture_block_size: int = 1024,
    image_pad_hw: tuple[int, int] | None = None,
    embeddings: Mapping[str, Any] | None = None,
) -> grain.IterDataset:
    """Infinite, shuffled, mixed stream of training batches (see the module docstring).

    sources: name -> random-access source of schema examples. image_pad_hw: give the image
    padded to (P, Q) for the step to resize (None: resized here). embeddings: name ->
    `embedding_store.SplitReader` of that source, for every source: rows carry the cached
    embedding and no image. batch_size is the global batch;
    this process gets rows [process_index * b, (process_index + 1) * b) of each, b =
    batch_size // process_count. start: the global stream's first example (the number of
    examples consumed so far). Returns a grain IterDataset; `iter()` of it is a
    DatasetIterator with get_state / set_state.
    """
    if prompt_mode not in PROMPT_MODES:
        raise ValueError(f"prompt_mode must be one of {PROMPT_MODES}, got {prompt_mode!r}")
    for name, value in (("batch_size", batch_size), ("image_size", image_size),
                        ("mask_size", mask_size), ("instances_per_image", instances_per_image)):
        if int(value) <= 0:
            raise ValueError(f"pipeline: {name} must be positive, got {value}")
    if not 0.0 <= amodal_prompt_prob <= 1.0:
        raise ValueError(f"amodal_prompt_prob must be in [0, 1], got {amodal_prompt_prob}")
    if not (math.isfinite(box_jitter) and box_jitter >= 0):
        raise ValueError(f"box_jitter must be >= 0, got {box_jitter}")
    keyed = _KeyedSources(sources, embeddings)
    weights = mixture_lib.mixture_weights(dict(zip(keyed.names, keyed.sizes, strict=True)),
                                          mixture)
    streams = []
    for d, (offset, size) in enumerate(zip(keyed.offsets[:-1], keyed.sizes, strict=True)):
        keys = grain.MapDataset.range(int(offset), int(offset) + size)
        streams.append(keys.shuffle(seed=_sub_seed(seed, 1, d)).repeat())
    mixed = mixture_lib.mix_datasets(streams, [weights[n] for n in keyed.names],
                                     seed=_sub_seed(seed, 2), block_size=mixture_block_size)

    def prepare(item: tuple[int, Any], rng: np.random.Generator):
        key, record = item
        row = prepare_example(
            record, rng, image_size=image_size, mask_size=mask_size,
            instances_per_image=instances_per_image, prompt_mode=prompt_mode,
            amodal_prompt_prob=amodal_prompt_prob, box_jitter=box_jitter, image_key=key,
            image_pad_hw=image_pad_hw, image=keyed.embeddings is None)
        return pack_masks(row) if worker_count > 0 else row

    if not 0 <= process_index < process_count or batch_size % process_count:
        raise ValueError(f"pipeline: batch_size {batch_size} does not split among "
                         f"{process_count} processes (process {process_index})")
    if start < 0:
        raise ValueError(f"pipeline: start must be >= 0, got {start}")
    # Element i of the global stream is the same example with the same randomness whatever
    # the number of processes; each process reads only its own rows of every global batch.
    ds = mixed.map(keyed.load).random_map(prepare, seed=_sub_seed(seed, 3))
    # Through worker processes, images cross padded only to the batch's largest image.
    pad_in_workers = image_pad_hw if worker_count == 0 or image_pad_hw is None else "fit"
    ds = ds[start:].batch(batch_size // process_count, drop_remainder=True,
                          batch_fn=functools.partial(stack_rows, image_pad_hw=pad_in_workers))
    ds = ds[process_index::process_count]
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                                 prefetch_buffer_size=prefetch_batches))
    if worker_count > 0:
        # grain's worker processes read absl flags; outside an absl app (scripts, tests) they
        # are unparsed, which grain treats as an error, so the defaults are taken as parsed.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=worker_count, per_worker_buffer_size=worker_buffer_size))
        it_ds = it_ds.map(functools.partial(unpack_masks, mask_size=mask_size,
                                            image_pad_hw=image_pad_hw))
    if keyed.embeddings is not None:
        it_ds = it_ds.map(keyed.add_embeddings)
    return it_ds


def make_train_loader(sources: Mapping[str, Any], **kwargs) -> grain.DatasetIterator:
    """`iter(make_train_dataset(sources, **kwargs))`: batches with get_state / set_state."""
    return iter(make_train_dataset(sources, **kwargs))


def make_eval_loader(
    source: Any,
    *,
    batch_size: int,
    image_size: int,
    mask_size: int,
    instances_per_image: int,
    prompt_mode: str = "modal",
    image_key_offset: int = 0,
    limit: int | None = None,
    read_threads: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    image_pad_hw: tuple[int, int] | None = None,
    embeddings: Any = None,
) -> Iterator[dict[str, np.ndarray]]:
    """One pass over a source in order, no randomness; every usable instance exactly once.

    With several processes, process p reads examples p, p + P, p + 2P, ... (P =
    process_count); together they cover the source once, each in batches of `batch_size`.

    An image with more than N usable instances fills several consecutive rows (same image,
    next N instances). The last batch is completed with all-invalid rows. Batches carry
    BATCH_KEYS plus 'instance_index' int32 [B, N] (index in the example's objects; -1 for
    padding) and 'image_hw' int32 [B, 2] (original size). prompt_mode: "modal" | "amodal".
    limit: use only the first `limit` examples. image_pad_hw, embeddings (one SplitReader):
    as for `make_train_dataset`.
    """
    if prompt_mode not in ("modal", "amodal"):
        raise ValueError(f"eval prompt_mode must be 'modal' or 'amodal', got {prompt_mode!r}")
    n = len(source) if limit is None else min(int(limit), len(source))

    if embeddings is not None:
        _check_embeddings("eval", source, embeddings)

    def rows(index: int) -> list[dict[str, np.ndarray]]:
        where = f"eval source example {index}"
        record = _load(source, index, where)
        embedding = None
        if embeddings is not None:
            _check_cached(embeddings, record, index, where)
            embedding = embeddings.get(index)
        usable = record.usable()
        chunks = [usable[i : i + instances_per_image]
                  for i in range(0, len(usable), instances_per_image)] or [usable]
        out = []
        for chunk in chunks:
            row = prepare_example(
                record, None, image_size=image_size, mask_size=mask_size,
                instances_per_image=instances_per_image, prompt_mode=prompt_mode,
                image_key=image_key_offset + index, instances=chunk,
                image_pad_hw=image_pad_hw, embedding=embedding)
            ids = np.full(instances_per_image, -1, np.int32)
            ids[: len(chunk)] = chunk
            row["instance_index"] = np.where(row["valid"], ids, -1).astype(np.int32)
            row["image_hw"] = np.asarray(record.image_hw(), np.int32)
            out.append(row)
        return out

    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    ds = grain.MapDataset.range(process_index, n, process_count).map(rows).to_iter_dataset(
        grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=4))
    return _batched(iter(ds), batch_size, image_pad_hw)


def _batched(row_lists: Iterator[list[dict[str, np.ndarray]]], batch_size: int,
             image_pad_hw: tuple[int, int] | None) -> Iterator[dict[str, np.ndarray]]:
    pending: list[dict[str, np.ndarray]] = []
    for rows in row_lists:
        pending.extend(rows)
        while len(pending) >= batch_size:
            yield stack_rows(pending[:batch_size], image_pad_hw)
            pending = pending[batch_size:]
    if pending:
        filler = {k: np.zeros_like(v) for k, v in pending[0].items()}
        filler["instance_index"] = np.full_like(pending[0]["instance_index"], -1)
        filler["image_key"] = np.int32(-1)
        yield stack_rows(pending + [filler] * (batch_size - len(pending)), image_pad_hw)


def stack_rows(rows: Sequence[dict[str, np.ndarray]],
               image_pad_hw: tuple[int, int] | str | None = None) -> dict[str, np.ndarray]:
    """Rows of `prepare_example` -> one batch; with image_pad_hw (P, Q), each row's image
    goes to the top-left of a zero [B, P, Q, 3] array (one copy, no padded row image);
    "fit": P, Q are the largest image's."""
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0] if k != "image"}
    if "image" in rows[0]:
        if image_pad_hw is None:
            batch["image"] = np.stack([r["image"] for r in rows])
        else:
            if image_pad_hw == "fit":
                image_pad_hw = np.max([r["image"].shape[:2] for r in rows], axis=0)
            batch["image"] = np.zeros((len(rows), *image_pad_hw, 3), np.uint8)
            for out, r in zip(batch["image"], rows, strict=True):
                h, w = r["image"].shape[:2]
                out[:h, :w] = r["image"]
    return {k: batch[k] for k in rows[0]}


def pack_masks(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The masks as bits along their last axis (uint8 [..., ceil(L / 8)]): what crosses from
    grain's workers to the consumer, 8x less than bool."""
    return {**batch, **{k: np.packbits(batch[k], axis=-1) for k in _MASK_KEYS}}


def unpack_masks(batch: dict[str, np.ndarray], mask_size: int,
                 image_pad_hw: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """Inverse of `pack_masks`: bool [..., mask_size] masks; with image_pad_hw, the image
    padded from its batch's largest image (`stack_rows(..., "fit")`) to [B, P, Q, 3]."""
    out = {**batch, **{k: np.unpackbits(batch[k], axis=-1, count=mask_size).view(bool)
                       for k in _MASK_KEYS}}
    if image_pad_hw is not None and "image" in batch:
        image = batch["image"]
        out["image"] = np.zeros((len(image), *image_pad_hw, 3), np.uint8)
        out["image"][:, : image.shape[1], : image.shape[2]] = image
    return out


def to_global_batch(batch: Any, sharding: jax.sharding.Sharding) -> Any:
    """Host-local numpy batch (pytree, leading batch axis) -> global jax.Arrays.

    Uses `jax.make_array_from_process_local_data(sharding, x)` on every leaf, so on several
    hosts each passes its own slice of the global batch (e.g. a NamedSharding with
    PartitionSpec('data') over the mesh's data axis).
    """
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


class DevicePrefetch:
    """Iterator over `place(batch)` of each host batch, `size` of them placed ahead by a
    thread: the next batches are fetched and sent to the devices (asynchronously) while the
    current step runs. Errors in the thread are raised here, in order; `close()` stops it.
    """

    _END = object()

    def __init__(self, batches: Iterator[Any], place: Any, size: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=max(int(size), 1))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(batches, place), daemon=True,
                                        name="device-prefetch")
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self, batches: Iterator[Any], place: Any) -> None:
        try:
            for batch in batches:
                if not self._put((place(batch), None)):
                    return
            self._put((self._END, None))
        except BaseException as e:  # handed to the consumer, raised there
            self._put((None, e))

    def __iter__(self) -> DevicePrefetch:
        return self

    def __next__(self) -> Any:
        item, error = self._queue.get()
        if error is not None:
            self.close()
            raise error
        if item is self._END:
            raise StopIteration
        return item

    def close(self, timeout: float = 30.0) -> None:
        """Stops the thread, waiting up to `timeout` seconds for the batch it is fetching."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        while self._thread.is_alive() and time.monotonic() < deadline:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                self._thread.join(timeout=0.1)


def batch_spec(batch_size: int, image_size: int, mask_size: int,
               instances_per_image: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shapes and dtypes of a training batch, key -> (shape, dtype) (for jit tracing)."""
    b, s, n, size = batch_size, image_size, instances_per_image, mask_size
    return {
        "image": ((b, s, s, 3), np.dtype(np.uint8)),
        "image_key": ((b,), np.dtype(np.int32)),
        "prompt_boxes": ((b, n, 4), np.dtype(np.float32)),
        "prompt_is_amodal": ((b, n), np.dtype(bool)),
        "amodal_masks": ((b, n, size, size), np.dtype(bool)),
        "visible_masks": ((b, n, size, size), np.dtype(bool)),
        "occlusion_rate": ((b, n), np.dtype(np.float32)),
        "valid": ((b, n), np.dtype(bool)),
    }

