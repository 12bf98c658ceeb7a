"""Predictor: encode an image once, then masks for any number of box / point prompts.

    predictor = Predictor.from_checkpoint("efficient_sam_vitt.pt")
    predictor.set_image(image)                       # [H, W, 3] uint8 RGB
    out = predictor.predict(boxes=[[x0, y0, x1, y1], ...], best_only=True)
    out.masks  # [Q, 1, H, W] bool amodal masks at the original resolution

With a second mask decoder for visible masks (the original EfficientSAM decoder, which reads
the same image embedding because SAMEO keeps EfficientSAM's encoders):

    predictor = Predictor.from_checkpoint("workdir_sameo", visible_checkpoint="auto")
    predictor.set_image(image)                       # one encoder call
    both = predictor.predict_amodal_visible(boxes=...)
    both.amodal, both.visible, both.hidden           # [Q, H, W] bool each

Prompt counts are padded up to a few fixed sizes (`prompt_buckets`), so a new number of
prompts reuses a compiled decoder instead of compiling a new one. More prompts than the largest
bucket are decoded in chunks of that size, and masks are upsampled a few prompts at a time
(`UPSAMPLE_BYTES` of working memory), so memory beyond the outputs stays bounded.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
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


@dataclasses.dataclass(frozen=True)
class AmodalVisible:
    """For Q prompts, the best candidate of each decoder (highest predicted IoU)."""

    amodal: np.ndarray  # [Q, H, W] bool, the SAMEO decoder's masks
    visible: np.ndarray  # [Q, H, W] bool, the visible decoder's masks
    amodal_iou: np.ndarray  # [Q] float32 predicted IoU
    visible_iou: np.ndarray  # [Q] float32 predicted IoU

    @property
    def hidden(self) -> np.ndarray:
        """[Q, H, W] bool: the amodal mask minus the visible one."""
        return self.amodal & ~self.visible


DECODERS = ("amodal", "visible")
# The image encoder is the part the two decoders must share; each keeps its prompt encoder.
VISIBLE_PARTS = ("prompt_encoder", "mask_decoder")


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
                 visible_params: Any | None = None,
                 prompt_buckets: Sequence[int] = DEFAULT_PROMPT_BUCKETS,
                 devices: Sequence[jax.Device] | None = None):
        """visible_params: the params of a model for visible masks with the same image encoder
        (e.g. the EfficientSAM checkpoint SAMEO was trained from); its prompt encoder and mask
        decoder answer `predict(..., decoder='visible')`."""
        self.config = config
        self.model = EfficientSam(config)
        self.mesh = Mesh(np.asarray(devices or jax.devices()), ("data",))
        self._replicated = NamedSharding(self.mesh, PartitionSpec())
        self._batch_sharding = NamedSharding(self.mesh, PartitionSpec("data"))
        self.params = jax.device_put(params, self._replicated)
        self.visible_params = None
        if visible_params is not None:
            _check_same_encoder(params, visible_params)
            parts = jax.device_put({k: visible_params[k] for k in VISIBLE_PARTS},
                                   self._replicated)
            self.visible_params = {**self.params, **parts}
        # Why there is no visible decoder, for the error of a call that needs one.
        self.no_visible_reason = "no visible decoder was given"
        self.prompt_buckets = tuple(sorted(prompt_buckets))
        self._encode = jax.jit(
            lambda p, x: self.model.apply({"params": p}, x, method=EfficientSam.encode))
        self._decode = jax.jit(self._decode_fn, static_argnames=("multimask", "best_only"))
        self._upsample = jax.jit(_upsample_masks, static_argnums=1)
        self._embedding: jax.Array | None = None
        self._image_hw: tuple[int, int] | None = None

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, variant: str | None = None,
                        visible_checkpoint: str | os.PathLike | None = None,
                        **kwargs: Any) -> Predictor:
        """Loads an official .pt / .npz or an orbax checkpoint (see sameo_jax.model_io).

        visible_checkpoint: a checkpoint whose mask decoder gives visible masks (its image
        encoder must equal this one's), or "auto": the `init_checkpoint` a training workdir
        `path` started from, when there is a usable one; else the predictor has no visible
        decoder and `no_visible_reason` says why.
        """
        from sameo_jax.model_io import CheckpointError, load_model, training_init_checkpoint

        config, params = load_model(path, variant)
        auto = visible_checkpoint == "auto"
        reason = None
        if auto:
            visible_checkpoint = training_init_checkpoint(path)
            if visible_checkpoint is None:
                reason = (f"{path} is not a training workdir that started from a checkpoint "
                          "(give --visible_checkpoint: the EfficientSAM weights it was "
                          "fine-tuned from)")
            elif not pathlib.Path(visible_checkpoint).exists():
                reason = (f"{path} started from init_checkpoint {visible_checkpoint}, which "
                          "does not exist here (give its path as --visible_checkpoint)")
                visible_checkpoint = None
        visible_params = None
        if visible_checkpoint is not None:
            try:
                visible_params = _visible_params(path, config, params, visible_checkpoint)
            except CheckpointError as exc:
                if not auto:
                    raise
                reason = str(exc)
        predictor = cls(config, params, visible_params=visible_params, **kwargs)
        if reason is not None:
            predictor.no_visible_reason = reason
        return predictor

    @property
    def has_visible(self) -> bool:
        """Whether a visible-mask decoder is loaded."""
        return self.visible_params is not None

    def require_visible(self, what: str) -> None:
        """Raises ValueError saying that `what` needs visible masks, when there is no visible
        decoder."""
        if not self.has_visible:
            raise ValueError(f"{what} needs visible masks: {self.no_visible_reason}")

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
                return_masks: bool = True, decoder: str = "amodal") -> Prediction:
        """Masks for Q prompts on the current image: one jitted decoder call per chunk of at
        most the largest bucket of prompts, the outputs filled chunk by chunk.

        boxes [Q, 4] xyxy and/or points [Q, N, 2] + point_labels [Q, N], original pixels.
        multimask: 3 candidates per prompt (else the single-mask output); best_only: keep the
        candidate with the highest predicted IoU. decoder: 'amodal' (the model's own) or
        'visible' (the visible decoder). Returns a `Prediction`.
        """
        if decoder not in DECODERS:
            raise ValueError(f"decoder {decoder!r}: choose one of {DECODERS}")
        if decoder == "visible":
            self.require_visible("decoder='visible'")
        params = self.params if decoder == "amodal" else self.visible_params
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
                params, self._embedding, _pad_rows(pts[start:start + n], qb, -1.0)[None],
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

    def predict_amodal_visible(self, boxes: Any = None, points: Any = None,
                               point_labels: Any = None, *, multimask: bool = True
                               ) -> AmodalVisible:
        """Amodal and visible masks for the same Q prompts from the current image's one
        embedding: each decoder's best candidate (by its predicted IoU; the single-mask output
        when `multimask` is False). Needs a visible decoder."""
        self.require_visible("predict_amodal_visible")
        outs = [self.predict(boxes, points, point_labels, multimask=multimask, best_only=True,
                             decoder=d) for d in DECODERS]
        return AmodalVisible(amodal=outs[0].masks[:, 0], visible=outs[1].masks[:, 0],
                             amodal_iou=outs[0].iou[:, 0], visible_iou=outs[1].iou[:, 0])


def _pad_rows(x: np.ndarray, rows: int, value: float) -> np.ndarray:
    """x [n, ...] padded with `value` to [rows, ...]."""
    if len(x) == rows:
        return x
    return np.concatenate([x, np.full((rows - len(x),) + x.shape[1:], value, x.dtype)])


def _visible_params(path: Any, config: EfficientSamConfig, params: Any,
                    visible_checkpoint: Any) -> Any:
    """Loads the visible model's params; CheckpointError unless it is the same model with the
    same image encoder as `path`'s."""
    from sameo_jax.model_io import CheckpointError, load_model

    visible_config, visible_params = load_model(visible_checkpoint)
    if visible_config.structure() != config.structure():
        raise CheckpointError(f"{visible_checkpoint} holds a different model than {path}")
    try:
        _check_same_encoder(params, visible_params)
    except ValueError as exc:
        raise CheckpointError(f"{visible_checkpoint} and {path}: {exc}") from None
    return visible_params


def _check_same_encoder(params: Any, visible_params: Any) -> None:
    """Raises ValueError unless both models have the same image encoder, bit for bit."""
    a, b = params.get("image_encoder"), visible_params.get("image_encoder")
    if a is None or b is None:
        raise ValueError("both param trees need an 'image_encoder'")
    la, ta = jax.tree_util.tree_flatten_with_path(a)
    lb, tb = jax.tree_util.tree_flatten_with_path(b)
    if ta != tb:
        raise ValueError("the two models' image encoders differ in structure")
    for (path, x), (_, y) in zip(la, lb, strict=True):
        if np.shape(x) != np.shape(y) or not np.array_equal(np.asarray(x), np.asarray(y)):
            name = "/".join(str(getattr(k, "key", k)) for k in path)
            raise ValueError(
                f"the image encoders differ (image_encoder/{name}): one encoder pass cannot "
                "serve both decoders")


def _upsample_masks(logits: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
    """[..., L, L] logits -> [..., H, W] bool masks (PyTorch bicubic, then threshold)."""
    return pp.upsample_logits(logits, out_hw) >= MASK_THRESHOLD
