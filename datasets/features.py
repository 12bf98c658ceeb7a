"""The one feature schema every builder writes, and TensorFlow-free encoders for it.

Images and masks are stored as encoded bytes (`tfds.features.Image` passes bytes through
unchanged and decodes them with PIL), so building and reading need no TensorFlow:
  image          JPEG/PNG bytes of the RGB image (original file bytes when already RGB)
  objects/amodal_mask, objects/visible_mask   1-bit PNG per instance ([H, W, 1] uint8 0/1)
  objects/order  the release's depth rank of each instance (1 = front, larger = further
                 back; 0 = the release gives none)
  objects/amodal_mask_pooled, objects/visible_mask_pooled   the same masks pooled to the
                 training target size (`sameo_jax.data.pooling.encode_pooled`, 256 x 256
                 over the whole image), so the loader decodes no PNG for them
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from sameo_jax import image_io
from sameo_jax.data.pooling import encode_pooled


def features() -> tfds.features.FeaturesDict:
    """The shared schema (see the module docstring)."""
    mask = tfds.features.Image(shape=(None, None, 1), encoding_format="png")
    pooled = tfds.features.Tensor(shape=(), dtype=np.object_)  # bytes
    return tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(shape=(None, None, 3)),
            "image_id": np.int64,
            "source": tfds.features.Text(),
            "objects": tfds.features.Sequence(
                {
                    "amodal_mask": mask,
                    "visible_mask": mask,
                    "amodal_bbox": tfds.features.Tensor(shape=(4,), dtype=np.float32),
                    "visible_bbox": tfds.features.Tensor(shape=(4,), dtype=np.float32),
                    "category_id": np.int64,
                    "occlusion_rate": np.float32,
                    "order": np.int64,
                    "amodal_mask_pooled": pooled,
                    "visible_mask_pooled": pooled,
                }
            ),
        }
    )


def encode_mask(mask: np.ndarray) -> bytes:
    """[H, W] bool -> 1-bit PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(mask, bool)).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def encode_image(image: np.ndarray) -> bytes:
    """[H, W, 3] uint8 -> PNG bytes (lossless)."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def read_image_bytes(data: bytes, name: str = "image") -> tuple[bytes, int, int]:
    """Validates encoded image bytes; returns (bytes to store, height, width).

    8-bit RGB JPEG/PNG files shown as stored are kept as they are (no recompression); anything
    else (grey, 16-bit, palette, CMYK, alpha, EXIF-turned, other formats) becomes RGB through
    `sameo_jax.image_io` and is stored as PNG. Raises image_io.ImageError (with a `reason`).
    """
    rgb, plain = image_io.decode(data, name)
    height, width = rgb.shape[:2]
    return (data if plain else encode_image(rgb)), height, width


def make_example(
    image: bytes,
    image_id: int,
    source: str,
    amodal_masks: np.ndarray,
    visible_masks: np.ndarray,
    amodal_bbox: np.ndarray,
    visible_bbox: np.ndarray,
    category_id: np.ndarray,
    occlusion_rate: np.ndarray,
    order: np.ndarray | None = None,
    amodal_pooled: list[bytes] | None = None,
    visible_pooled: list[bytes] | None = None,
) -> dict[str, Any]:
    """Schema example ready for TFDS: masks [N, H, W] bool (or lists of their encode_mask
    bytes, with their encode_pooled bytes as amodal_pooled / visible_pooled), boxes [N, 4]
    xyxy float32, order [N] int (None: all 0, unknown)."""
    n = len(np.asarray(category_id).reshape(-1))

    def pooled(masks: Any, given: list[bytes] | None, kind: str) -> list[bytes]:
        if given is not None:
            return list(given)
        if any(isinstance(m, bytes) for m in masks):
            raise ValueError(f"make_example: {kind} masks given as PNG bytes need their "
                             f"{kind}_pooled bytes")
        return [encode_pooled(m) for m in masks]

    order = np.zeros(n, np.int64) if order is None else np.asarray(order, np.int64).reshape(-1)
    return {
        "image": image,
        "image_id": int(image_id),
        "source": source,
        "objects": {
            "amodal_mask": [m if isinstance(m, bytes) else encode_mask(m) for m in amodal_masks],
            "visible_mask": [m if isinstance(m, bytes) else encode_mask(m)
                             for m in visible_masks],
            "amodal_bbox": np.asarray(amodal_bbox, np.float32).reshape(-1, 4),
            "visible_bbox": np.asarray(visible_bbox, np.float32).reshape(-1, 4),
            "category_id": np.asarray(category_id, np.int64).reshape(-1),
            "occlusion_rate": np.asarray(occlusion_rate, np.float32).reshape(-1),
            "order": order,
            "amodal_mask_pooled": pooled(amodal_masks, amodal_pooled, "amodal"),
            "visible_mask_pooled": pooled(visible_masks, visible_pooled, "visible"),
        },
    }
