"""Predictor: encode an image once, then masks for any number of box / point prompts.

    predictor = Predictor.from_checkpoint("efficient_sam_vitt.pt")
    predictor.set_image(image)                       # [H, W, 3] uint8 RGB
    out = predictor.predict(boxes=[[x0, y0, x1, y1], ...], best_only=True)
    out.masks  # [Q, 1, H, W] bool amodal masks at the original resolution

Prompt counts are padded up to a few fixed sizes (`prompt_buckets`), so a new number of
prompts reuses a compiled decoder instead of compiling a new one. More prompts than the largest
bucket are decoded in chunks of that size, and masks are upsampled a few prompts at a time
(`UPSAMPLE_BYTES` of working memory), so memory beyond the outputs stays bounded.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sameo_jax import preprocessing as pp
from sameo_jax.boxes import validate_boxes
from sameo_jax.masks import MASK_THRESHOLD
from sameo_jax.models.efficient_sam import EfficientSam, EfficientSamConfig, best_candidate

DEFAULT_PROMPT_BUCKETS = (1, 4, 16, 64, 256)
UPSAMPLE_BYTES = 256 << 20  # working memory of one call that upsamples masks


@dataclasses.dataclass(frozen=True)
class Prediction:
    """Outputs for Q prompts with K candidates each (K = 3 multimask, 1 single / best)."""

    masks: np.ndarray | None  # [Q, K, H, W] bool at the original image size
    low_res_logits: np.ndarray  # [Q, K, L, L] float32
    iou: np.ndarray  # [Q, K] float32 predicted IoU (raw head output)


def check_image(image: Any, where: str = "image") -> np.ndarray:
    """Checks an RGB image: [H, W, 3] uint8, non-empty. Returns it as a numpy array."""
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{where}: expected an RGB image [H, W, 3], got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(f"{where}: expected uint8 pixels (0-255), got dtype {arr.dtype}")
    return arr


def build_prompts(boxes: Any = None, points: Any = None, point_labels: Any = None,
                  max_points: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Boxes and/or points per query -> points [Q, P, 2], labels [Q, P] (original pixels).

    boxes: [Q, 4] xyxy; points: [Q, N, 2] (x, y) with point_labels [Q, N] in {0, 1, 2, 3}
    (-1 marks padding). With both, each query's box comes first, then its points.
    """
    parts_p, parts_l = [], []
    if boxes is not None:
        b = validate_boxes(np.asarray(boxes, np.float32).reshape(-1, 4) if np.size(boxes)
                           else np.zeros((0, 4), np.float32))
        bp, bl = pp.boxes_to_prompts(b)
        parts_p.append(bp)
        parts_l.append(bl)
    if points is not None:
        p = np.asarray(points, np.float32)
        if point_labels is None:
            raise ValueError("points given without point_labels")
        lab = np.asarray(point_labels)
        if p.ndim != 3 or p.shape[-1] != 2 or lab.shape != p.shape[:-1]:
            raise ValueError(f"points must be [Q, N, 2] with labels [Q, N]; got {p.shape} and "
                             f"{lab.shape}")
        if not np.isfinite(p).all():
            q = int(np.flatnonzero(~np.isfinite(p).all(axis=(1, 2)))[0])
            raise ValueError(f"points[{q}] = {p[q].tolist()}: coordinates must be finite")
        ok = np.isin(lab, (*pp.VALID_LABELS, pp.PADDING_LABEL))
        if not ok.all():
            q, n = map(int, np.argwhere(~ok)[0])
            raise ValueError(f"point_labels[{q}][{n}] = {lab[q, n]}: labels must be 0 "
                             "(negative), 1 (positive), 2/3 (box corners) or -1 (padding)")
        parts_p.append(p)
        parts_l.append(lab.astype(np.int32))
    if not parts_p:
        raise ValueError("no prompts: give boxes and/or points")
    if len(parts_p) == 2 and len(parts_p[0]) != len(parts_p[1]):
        raise ValueError(f"{len(parts_p[0])} boxes but {len(parts_p[1])} point queries; "
                         "with both, give one box and one point set per query")
    pts = np.concatenate(parts_p, axis=1)
    labels = np.concatenate(parts_l, axis=1)
    if len(pts) == 0:
        raise ValueError("empty prompt list: give at least one box or point query")
    if pts.shape[1] > max_points:
        raise ValueError(f"a query has {pts.shape[1]} points (a box counts as 2); the model "
                         f"takes at most {max_points}")
    return pts, labels


def bucket_size(n: int, buckets: Sequence[int]) -> int:
    """Smallest bucket >= n; past the largest, the next multiple of the largest."""
    for b in buckets:
        if n <= b:
            return b
    top = buckets[-1]
    return int(math.ceil(n / top) * top)


class Predictor:
    """Batched, jitted EfficientSAM inference on one image at a time (or many encodings)."""

    def __init__(self, config: EfficientSamConfig, params: Any, *,
                 prompt_buckets: Sequence[int] = DEFAULT_PROMPT_BUCKETS,
                 devices: Sequence[jax.Device] | None = None):
        self.config = config
        self.model = EfficientSam(config)
        self.mesh = Mesh(np.asarray(devices or jax.devices()), ("data",))
        self._replicated = NamedSharding(self.mesh, PartitionSpec())
        self._batch_sharding = NamedSharding(self.mesh, PartitionSpec("data"))
        self.params = jax.device_put(params, self._replicated)
        self.prompt_buckets = tuple(sorted(prompt_buckets))
        self._encode = jax.jit(
            lambda p, x: self.model.apply({"params": p}, x, method=EfficientSam.encode))
        self._decode = jax.jit(self._decode_fn, static_argnames=("multimask", "best_only"))
        self._upsample = jax.jit(_upsample_masks, static_argnums=1)
        self._embedding: jax.Array | None = None
        self._image_hw: tuple[int, int] | None = None

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, variant: str | None = None,
                        **kwargs: Any) -> Predictor:
        """Loads an official .pt / .npz or an orbax checkpoint (see sameo_jax.checkpoint)."""
        from sameo_jax.checkpoint import load_model

        config, params = load_model(path, variant)
        return cls(config, params, **kwargs)

    # -- image side ---------------------------------------------------------------------
    def encode(self, images: Sequence[np.ndarray]) -> jax.Array:
        """Image embeddings [N, E, E, D] of N RGB uint8 images (any sizes), in one batched
        call sharded over the devices."""
        if len(images) == 0:
            raise ValueError("encode: no images")
        size = self.config.img_size
        batch = np.stack([pp.preprocess_image(check_image(im, f"images[{i}]"), size)
                          for i, im in enumerate(images)])
        n = len(batch)
        n_dev = self.mesh.devices.size
        padded = int(math.ceil(n / n_dev) * n_dev)
        if padded != n:
            batch = np.concatenate([batch, np.zeros((padded - n,) + batch.shape[1:],
                                                    batch.dtype)])
        x = jax.device_put(batch, self._batch_sharding)
        return self._encode(self.params, x)[:n]

    def set_image(self, image: np.ndarray, embedding: jax.Array | None = None) -> None:
        """Encodes `image` ([H, W, 3] uint8) for the following `predict` calls.

        embedding: [E, E, D] or [1, E, E, D] from `encode`, to skip the encoder.
        """
        image = check_image(image)
        if embedding is None:
            embedding = self.encode([image])
        emb = jnp.asarray(embedding)
        e, d = self.config.embedding_size, self.config.embed_dim
        emb = emb.reshape((1,) + emb.shape[-3:])
        if emb.shape != (1, e, e, d):
            raise ValueError(f"embedding has shape {emb.shape}, expected [1, {e}, {e}, {d}]")
        self._embedding = emb
        self._image_hw = image.shape[:2]

    @property
    def image_hw(self) -> tuple[int, int]:
        if self._image_hw is None:
            raise RuntimeError("no image set: call set_image(image) first")
        return self._image_hw

    # -- prompt side --------------------------------------------------------------------
    def _decode_fn(self, params, embedding, points, labels, *, multimask: bool,
                   best_only: bool):
        logits, iou = self.model.apply({"params": params}, embedding, points, labels,
                                       multimask_output=multimask, method=EfficientSam.decode)
        logits, iou = logits[0], iou[0]  # [Q, K, L, L], [Q, K]
        if best_only and multimask:
            logits, iou = best_candidate(logits, iou)
            logits, iou = logits[:, None], iou[:, None]
        return logits, iou

    def predict(self, boxes: Any = None, points: Any = None, point_labels: Any = None, *,
                multimask: bool = True, best_only: bool = False,
                return_masks: bool = True) -> Prediction:
        """Masks for Q prompts on the current image: one jitted decoder call per chunk of at
        most the largest bucket of prompts, the outputs filled chunk by chunk.

        boxes [Q, 4] xyxy and/or points [Q, N, 2] + point_labels [Q, N], original pixels.
        multimask: 3 candidates per prompt (else the single-mask output); best_only: keep the
        candidate with the highest predicted IoU. Returns a `Prediction`.
        """
        h, w = self.image_hw
        pts, labels = build_prompts(boxes, points, point_labels, self.config.max_num_points)
        q = len(pts)
        out_logits = out_iou = masks = None
        # Padding to the model's 6 points is left to the model, which runs the padding
        # points of a prompt as one weighted token (8 decoder tokens for a box, not 11).
        pts = pp.rescale_points(pts, (h, w), self.config.img_size)
        chunk = self.prompt_buckets[-1]
        for start in range(0, q, chunk):
            n = min(chunk, q - start)
            qb = bucket_size(n, self.prompt_buckets)
            logits, iou = self._decode(
                self.params, self._embedding, _pad_rows(pts[start:start + n], qb, -1.0)[None],
                _pad_rows(labels[start:start + n], qb, pp.PADDING_LABEL)[None],
                multimask=multimask, best_only=best_only)
            if out_logits is None:  # [Q, K, L, L], [Q, K] and [Q, K, H, W], filled by chunks
                out_logits = np.empty((q,) + logits.shape[1:], np.float32)
                out_iou = np.empty((q,) + iou.shape[1:], np.float32)
                if return_masks:
                    masks = np.empty((q, logits.shape[1], h, w), bool)
            out_logits[start:start + n] = np.asarray(logits[:n])
            out_iou[start:start + n] = np.asarray(iou[:n])
            if masks is not None:
                self._upsample_into(masks[start:start + n], logits, (h, w))
        return Prediction(masks=masks, low_res_logits=out_logits, iou=out_iou)

    def _upsample_into(self, masks: np.ndarray, logits: jax.Array,
                       out_hw: tuple[int, int]) -> None:
        """Fills masks [n, K, H, W] from the first n of logits [qb, K, L, L], a bucket-sized
        group of prompts per call so that one call's memory stays near `UPSAMPLE_BYTES`."""
        n, k = masks.shape[:2]
        h, w = out_hw
        per_prompt = k * (h * logits.shape[-1] * 4 + h * w * 5)  # float32 passes + bool mask
        fits = max(1, UPSAMPLE_BYTES // per_prompt)
        rows = max([b for b in self.prompt_buckets if b <= fits], default=fits)
        rows = min(rows, logits.shape[0])
        for start in range(0, n, rows):
            piece = logits[start:start + rows]
            if piece.shape[0] < rows:  # only with buckets that are not multiples of each other
                piece = jnp.concatenate(
                    [piece, jnp.zeros((rows - piece.shape[0],) + piece.shape[1:], piece.dtype)])
            take = min(rows, n - start)
            masks[start:start + take] = np.asarray(self._upsample(piece, out_hw))[:take]


def _pad_rows(x: np.ndarray, rows: int, value: float) -> np.ndarray:
    """x [n, ...] padded with `value` to [rows, ...]."""
    if len(x) == rows:
        return x
    return np.concatenate([x, np.full((rows - len(x),) + x.shape[1:], value, x.dtype)])


def _upsample_masks(logits: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
    """[..., L, L] logits -> [..., H, W] bool masks (PyTorch bicubic, then threshold)."""
    return pp.upsample_logits(logits, out_hw) >= MASK_THRESHOLD
