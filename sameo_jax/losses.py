"""SAMEO training losses: Dice + Focal (gamma 2) + w * L1(predicted IoU, true IoU).

Shapes used throughout (B images, N instances per image, K mask candidates, L low-res size):
  logits    [B, N, K, L, L] float   mask logits from the decoder
  pred_iou  [B, N, K] float         raw IoU predictions from the decoder's IoU head
  target    [B, N, L, L] bool       target mask (amodal for SAMEO)
  valid     [B, N] bool             False for padding instances; they contribute exactly nothing

Choices (documented here, configurable in `configs/sameo.py`):
  * Focal loss uses optax's sigmoid focal loss, gamma 2, averaged over the pixels of each mask.
    `alpha` defaults to 0.25 (RetinaNet / SAM practice: it down-weights the foreground term);
    pass `alpha=None` (config: a negative `focal_alpha`) to disable the class weighting.
  * Dice is the soft Dice on sigmoid probabilities with +1 smoothing (SAM practice).
  * The true IoU is that of the thresholded mask (logit >= masks.MASK_THRESHOLD) with the
    target; it is a constant for the gradient (stop_gradient). An empty prediction on an empty
    target has IoU 1.
  * Multimask selection (`mask_selection`): 'min_loss' (SAM practice) trains, for each
    instance, the candidate whose Dice + Focal is lowest -- the selection itself carries no
    gradient; 'first' always trains candidate 0; 'single' expects K == 1 (the decoder run with
    multimask_output=False). The IoU head is trained on all K candidates in every mode, since
    at inference it ranks all of them.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from sameo_jax.masks import MASK_THRESHOLD

MASK_SELECTIONS = ("min_loss", "first", "single")


def dice_loss(logits: jax.Array, target: jax.Array, smooth: float = 1.0) -> jax.Array:
    """Soft Dice loss per mask: [..., L, L] logits, [..., L, L] bool -> [...].

    1 - (2 * sum(p * t) + smooth) / (sum(p) + sum(t) + smooth), p = sigmoid(logits).
    """
    p = jax.nn.sigmoid(logits.astype(jnp.float32))
    t = target.astype(jnp.float32)
    inter = jnp.sum(p * t, axis=(-2, -1))
    total = jnp.sum(p, axis=(-2, -1)) + jnp.sum(t, axis=(-2, -1))
    return 1.0 - (2.0 * inter + smooth) / (total + smooth)


def focal_loss(
    logits: jax.Array, target: jax.Array, alpha: float | None = 0.25, gamma: float = 2.0
) -> jax.Array:
    """Sigmoid focal loss averaged over the pixels of each mask: [..., L, L] -> [...]."""
    per_pixel = optax.sigmoid_focal_loss(
        logits.astype(jnp.float32), target.astype(jnp.float32), alpha=alpha, gamma=gamma
    )
    return jnp.mean(per_pixel, axis=(-2, -1))


def binary_mask_iou(a: jax.Array, b: jax.Array) -> jax.Array:
    """IoU of two bool masks: [..., L, L] -> [...] float32; both empty -> 1.0."""
    a, b = a.astype(bool), b.astype(bool)
    inter = jnp.sum(a & b, axis=(-2, -1)).astype(jnp.float32)
    union = jnp.sum(a | b, axis=(-2, -1)).astype(jnp.float32)
    return jnp.where(union > 0, inter / jnp.maximum(union, 1.0), 1.0)


def mask_iou_of_logits(logits: jax.Array, target: jax.Array) -> jax.Array:
    """IoU of the thresholded logits with the target: [..., L, L] -> [...] (no gradient)."""
    return jax.lax.stop_gradient(binary_mask_iou(logits >= MASK_THRESHOLD, target))


class LossOutput(NamedTuple):
    """Scalar total loss and its parts (each a mean over valid instances)."""

    total: jax.Array
    dice: jax.Array
    focal: jax.Array
    iou_l1: jax.Array
    true_iou: jax.Array  # IoU of the trained candidate with the target (a metric)
    selected: jax.Array  # [B, N] int32 index of the trained candidate


def _masked_mean(values: jax.Array, valid: jax.Array) -> jax.Array:
    """Mean of `values` over entries where `valid`; 0 when nothing is valid.

    Uses `where` (not multiplication) so a NaN in a padding entry cannot leak in.
    """
    valid = jnp.broadcast_to(valid, values.shape)
    total = jnp.sum(jnp.where(valid, values, 0.0))
    return total / jnp.maximum(jnp.sum(valid.astype(jnp.float32)), 1.0)


def sameo_loss(
    logits: jax.Array,
    pred_iou: jax.Array,
    target: jax.Array,
    valid: jax.Array,
    *,
    mask_selection: str = "min_loss",
    dice_weight: float = 1.0,
    focal_weight: float = 1.0,
    iou_weight: float = 0.05,
    focal_alpha: float | None = 0.25,
    focal_gamma: float = 2.0,
) -> LossOutput:
    """The SAMEO loss for a batch of instances (shapes in the module docstring)."""
    if mask_selection not in MASK_SELECTIONS:
        raise ValueError(f"mask_selection={mask_selection!r}: expected one of {MASK_SELECTIONS}")
    if logits.ndim != 5 or pred_iou.shape != logits.shape[:3]:
        raise ValueError(
            f"logits {logits.shape} / pred_iou {pred_iou.shape}: expected [B, N, K, L, L] / "
            "[B, N, K]"
        )
    if target.shape != logits.shape[:2] + logits.shape[3:] or valid.shape != logits.shape[:2]:
        raise ValueError(
            f"target {target.shape} / valid {valid.shape} do not match logits {logits.shape}"
        )
    num_candidates = logits.shape[2]
    if mask_selection == "single" and num_candidates != 1:
        raise ValueError(
            f"mask_selection='single' needs one mask candidate, got K={num_candidates}"
        )

    target_k = target[:, :, None]  # [B, N, 1, L, L]
    dice = dice_loss(logits, target_k)  # [B, N, K]
    focal = focal_loss(logits, target_k, alpha=focal_alpha, gamma=focal_gamma)
    true_iou = mask_iou_of_logits(logits, target_k)  # [B, N, K]
    iou_l1 = jnp.abs(pred_iou.astype(jnp.float32) - true_iou)  # [B, N, K]

    mask_loss = dice_weight * dice + focal_weight * focal  # [B, N, K]
    if mask_selection == "min_loss":
        selected = jnp.argmin(jax.lax.stop_gradient(mask_loss), axis=-1)
    else:
        selected = jnp.zeros(mask_loss.shape[:2], jnp.int32)
    selected = selected.astype(jnp.int32)

    def pick(x: jax.Array) -> jax.Array:
        return jnp.take_along_axis(x, selected[..., None], axis=-1)[..., 0]

    dice_sel = _masked_mean(pick(dice), valid)
    focal_sel = _masked_mean(pick(focal), valid)
    iou_l1_all = _masked_mean(jnp.mean(iou_l1, axis=-1), valid)
    total = dice_weight * dice_sel + focal_weight * focal_sel + iou_weight * iou_l1_all
    return LossOutput(
        total=total,
        dice=dice_sel,
        focal=focal_sel,
        iou_l1=iou_l1_all,
        true_iou=_masked_mean(pick(true_iou), valid),
        selected=selected,
    )
