"""Frozen-encoder embedding cache: each image is encoded once, then reused.

Valid only while the image encoder does not train (checked by the caller). Embeddings live in
host memory as float32 numpy arrays keyed by (namespace, image_key), the namespace naming the
stream the keys index (e.g. ('eval', source, split)): E*E*D*4 bytes per image (4 MiB for
ViT-T/S at 1024 px, 64 KiB for the tiny demo model).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sameo_jax.models.efficient_sam import EfficientSam
from sameo_jax.preprocessing import normalize_image, resize_padded


class EmbeddingCache:
    """Maps a host-local batch to its image embeddings [B, E, E, D], encoding only misses.

    The encoder runs on this process's devices only (a local mesh), so processes of a
    multi-host job never wait on each other's cache misses.
    """

    def __init__(self, model: EfficientSam, encoder_params: Any):
        devices = jax.local_devices()
        self._mesh = Mesh(np.asarray(devices), ("data",))
        self._images_sharding = NamedSharding(self._mesh, PartitionSpec("data"))
        local = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), encoder_params)
        self._params = jax.device_put(local, NamedSharding(self._mesh, PartitionSpec()))
        self._store: dict[Hashable, np.ndarray] = {}
        self.hits = 0
        self.misses = 0

        def encode(params, images, pixels_hw):
            if pixels_hw is not None:  # padded: resized as in the step
                images = resize_padded(images, pixels_hw, model.config.img_size)
            return model.apply(
                {"params": {"image_encoder": params}}, normalize_image(images),
                method=EfficientSam.encode,
            )

        self._encode = jax.jit(encode, out_shardings=self._images_sharding)

    def __len__(self) -> int:
        return len(self._store)

    def embeddings(self, batch: dict[str, np.ndarray], namespace: Hashable) -> np.ndarray:
        """batch: host-local 'image' uint8 [B, S, S, 3] (or padded, with 'pixels_hw' [B, 2]),
        'image_key' int [B] (unique within
        `namespace`: one source's split, or a mixed stream's global keys) -> float32
        [B, E, E, D]."""
        keys = [(namespace, int(k)) for k in np.asarray(batch["image_key"]).reshape(-1)]
        missing = [i for i, k in enumerate(keys) if k not in self._store]
        if missing:
            # Encode the whole batch (one fixed shape, one compilation) and keep the misses.
            images, pixels_hw = jax.device_put(
                (np.asarray(batch["image"]), batch.get("pixels_hw")), self._images_sharding)
            emb = np.asarray(self._encode(self._params, images, pixels_hw), np.float32)
            for i in missing:
                self._store[keys[i]] = emb[i]
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        return np.stack([self._store[k] for k in keys])
