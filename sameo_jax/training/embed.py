"""Writing the on-disk embedding cache: the frozen image encoder over built splits.

`write_embeddings(config, out_dir, splits)` is the whole job of `embed.py`. Every process
encodes the unwritten shards of its share (shard k of a split belongs to process
k % process_count) on its own devices and writes them (`sameo_jax.data.embedding_store`).
Images reach the encoder the way the train step gives them: uint8, padded to
`config.data.image_pad_hw`, resized on the device (`preprocessing.resize_padded`). Running it
again finishes an interrupted cache and leaves a finished one as it is.
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sameo_jax.data import embedding_store
from sameo_jax.models.config import EfficientSamConfig
from sameo_jax.models.efficient_sam import EfficientSam
from sameo_jax.preprocessing import normalize_image, pad_image, resize_padded
from sameo_jax.training import input_pipeline

Encoder = Callable[[np.ndarray, np.ndarray], np.ndarray]


def local_encoder(model: EfficientSam, encoder_params: Any) -> tuple[Encoder, int]:
    """(encode, multiple): jitted `encode(images uint8 [B, P, Q, 3], image_hw int32 [B, 2])
    -> bfloat16 [B, E, E, D]` on this process's devices; B must divide by `multiple`."""
    devices = jax.local_devices()
    mesh = Mesh(np.asarray(devices), ("data",))
    rows = NamedSharding(mesh, PartitionSpec("data"))

    def local(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            x = x.addressable_data(0)
        return np.asarray(x)

    params = jax.device_put(jax.tree.map(local, encoder_params),
                            NamedSharding(mesh, PartitionSpec()))
    size = model.config.img_size

    @jax.jit
    def encode(params, images, image_hw):
        x = normalize_image(resize_padded(images, image_hw, size))
        emb = model.apply({"params": {"image_encoder": params}}, x, method=EfficientSam.encode)
        return emb.astype(jnp.bfloat16)

    def run(images: np.ndarray, image_hw: np.ndarray) -> np.ndarray:
        placed = jax.device_put((images, image_hw), rows)
        return np.asarray(encode(params, *placed))

    return run, len(devices)


def load_image(source: Any, index: int) -> tuple[np.ndarray, int]:
    """(image uint8 [H, W, 3], image_id) of a source's example, decoding only the image where
    the source can (`source.image(index)`)."""
    if hasattr(source, "image"):
        return source.image(index)
    example = source[index]
    return np.asarray(example["image"]), int(example["image_id"])


def decode_examples(source: Any, indices: Sequence[int], pad_hw: tuple[int, int], size: int,
                    pool: concurrent.futures.Executor) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """(padded image uint8 [P, Q, 3], image_hw int32 [2], image_id) of each example, decoded
    on the pool's threads."""

    def one(index: int):
        image, image_id = load_image(source, index)
        return (*pad_image(image, pad_hw, size), image_id)

    return list(pool.map(one, indices))


def encode_examples(examples: Sequence[tuple[np.ndarray, np.ndarray, int]], encode: Encoder,
                    batch_size: int) -> np.ndarray:
    """bfloat16 [n, E, E, D] of `decode_examples`' output, in batches of batch_size (the last
    one filled up by repeating its last image: one shape, one compilation)."""
    out = []
    for lo in range(0, len(examples), batch_size):
        chunk = list(examples[lo : lo + batch_size])
        n = len(chunk)
        chunk += [chunk[-1]] * (batch_size - n)
        out.append(encode(np.stack([c[0] for c in chunk]), np.stack([c[1] for c in chunk]))[:n])
    return np.concatenate(out)


def _ahead(items: Sequence[int], load: Callable[[int], Any]) -> Iterator[tuple[int, Any]]:
    """(k, load(k)) for each item, the next item's load running while this one is used."""
    with concurrent.futures.ThreadPoolExecutor(1) as ahead:
        future = ahead.submit(load, items[0]) if items else None
        for i, k in enumerate(items):
            value = future.result()
            if i + 1 < len(items):
                future = ahead.submit(load, items[i + 1])
            yield k, value


def write_embeddings(
    config: ml_collections.ConfigDict,
    model_cfg: EfficientSamConfig,
    params: Any,
    out_dir: str | os.PathLike,
    splits: Sequence[str],
    *,
    shard_size: int = 64,
    batch_size: int = 8,
    threads: int | None = None,
) -> dict[str, int]:
    """Writes this process's unwritten shards of every source of config.data.sources for each
    split; returns '<source>/<split>' -> examples this process wrote.

    params: the model's parameters (their 'image_encoder' is what is cached). threads: image
    decoding threads (default: the cores).
    """
    model = EfficientSam(model_cfg)
    encoder_params = params["image_encoder"]
    fingerprint = embedding_store.fingerprint(model_cfg, encoder_params)
    e = model_cfg.embedding_size
    store = embedding_store.EmbeddingStore.create(out_dir, fingerprint,
                                                  (e, e, model_cfg.embed_dim))
    encode, multiple = local_encoder(model, encoder_params)
    batch_size = -(-max(int(batch_size), 1) // multiple) * multiple
    pad_hw = input_pipeline.image_pad_hw(config, model_cfg)
    threads = threads or os.cpu_count() or 1
    written = {}
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for split in splits:
            for name, source in input_pipeline.open_sources(config, split).items():
                writer = store.writer(name, split, len(source), shard_size, repr(source))
                todo = writer.pending(jax.process_index(), jax.process_count())
                key = f"{name}/{split}"
                logging.info("%s: %d examples in %d shards; this process writes %d", key,
                             len(source), writer.layout.num_shards, len(todo))

                def load(k, source=source, writer=writer):
                    return decode_examples(source, writer.shard_examples(k), pad_hw,
                                           model_cfg.img_size, pool)

                count = 0
                for done, (k, examples) in enumerate(_ahead(todo, load), 1):
                    writer.write(k, encode_examples(examples, encode, batch_size),
                                 [ex[2] for ex in examples])
                    count += len(examples)
                    logging.info("%s: shard %d written (%d of %d)", key, k, done, len(todo))
                written[key] = count
    return written
