"""The jitted, sharded train and eval steps.

The batch is split over the mesh's 'data' axis (NamedSharding), the state is replicated and
donated. Gradients are taken with respect to the trainable subtree only, so no backward pass
runs through a frozen part (a frozen image encoder's forward is all it costs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sameo_jax import losses
from sameo_jax.masks import MASK_THRESHOLD
from sameo_jax.models.config import REMAT_POLICIES
from sameo_jax.models.efficient_sam import EfficientSam, best_candidate
from sameo_jax.preprocessing import boxes_to_prompts, normalize_image, resize_padded
from sameo_jax.training.optimizer import Params, merge_params, split_params
from sameo_jax.training.state import TrainState

Batch = dict[str, jax.Array]
TARGETS = ("amodal", "modal")


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over 'data', the rest replicated."""
    return NamedSharding(mesh, PartitionSpec("data"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def _target_masks(batch: Batch, target: str) -> jax.Array:
    if target not in TARGETS:
        raise ValueError(f"config.target={target!r}: expected one of {TARGETS}")
    return batch["amodal_masks"] if target == "amodal" else batch["visible_masks"]


def model_images(batch: Batch, size: int) -> jax.Array:
    """The batch's 'image' in the model frame, [B, size, size, 3] float32 in [0, 255]: resized
    here (`resize_padded`) when the batch carries 'pixels_hw', else already size x size."""
    if "pixels_hw" in batch:
        return resize_padded(batch["image"], batch["pixels_hw"], size)
    return batch["image"]


def _embeddings(model: EfficientSam, params: Params, batch: Batch, rngs=None) -> jax.Array:
    """[B, E, E, D] float32: the batch's cached 'embedding' if present (any float dtype),
    else its 'image' encoded."""
    if "embedding" in batch:
        return batch["embedding"].astype(jnp.float32)
    images = normalize_image(model_images(batch, model.config.img_size))
    return model.apply({"params": params}, images, method=EfficientSam.encode, rngs=rngs)


def batch_loss(model: EfficientSam, config: ml_collections.ConfigDict, params: Params,
               batch: Batch, rngs=None) -> losses.LossOutput:
    """The training loss of a batch (training-batch schema, see `make_train_step`): its
    embeddings (cached, or the image encoder's), the decoder's masks for its boxes, and
    config.loss against config.target's masks."""
    points, point_labels = boxes_to_prompts(batch["prompt_boxes"])
    emb = _embeddings(model, params, batch, rngs)
    logits, iou = model.apply(
        {"params": params}, emb, points, point_labels,
        multimask_output=config.mask_selection != "single", method=EfficientSam.decode,
        rngs=rngs,
    )
    return losses.sameo_loss(
        logits, iou, _target_masks(batch, config.target), batch["valid"],
        mask_selection=config.mask_selection,
        dice_weight=config.loss.dice_weight,
        focal_weight=config.loss.focal_weight,
        iou_weight=config.loss.iou_weight,
        focal_alpha=config.loss.focal_alpha if config.loss.focal_alpha >= 0 else None,
        focal_gamma=config.loss.focal_gamma,
    )


def make_train_step(
    model: EfficientSam,
    config: ml_collections.ConfigDict,
    labels: Params,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    mesh: Mesh,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """Returns jitted `train_step(state, batch) -> (new_state, metrics)`; `state` is donated.
    The decoder runs with `config.decoder_remat` (an `EfficientSamConfig.decoder_remat` policy).

    batch (training-batch schema): 'image' uint8 [B, S, S, 3] (or [B, P, Q, 3] padded, with
    'pixels_hw' int32 [B, 2]) or 'embedding' [B, E, E, D] (float32 or bfloat16),
    'prompt_boxes' [B, N, 4], 'amodal_masks' / 'visible_masks' bool [B, N, L, L], 'valid'.
    """
    # Dense first upscale: the factored form's backward (models/fast/low_rank.py) costs more
    # than its forward saves; the decoder's per-prompt maps recomputed in the backward pass
    # under config.decoder_remat. Compute-only choices: same parameters (BENCHMARKS.md).
    if config.decoder_remat not in REMAT_POLICIES:
        raise ValueError(f"config.decoder_remat={config.decoder_remat!r}: expected one of "
                         f"{REMAT_POLICIES}")
    model = model.clone(config=dataclasses.replace(
        model.config, factored_upscale=False, decoder_remat=config.decoder_remat))

    def train_step(state: TrainState, batch: Batch):
        # Per-step randomness for stochastic layers (dropout and the like), if the model has any.
        rngs = {"dropout": state.step_key()}
        trainable, frozen = split_params(state.params, labels)

        def loss_fn(trainable_params):
            out = batch_loss(model, config, merge_params(trainable_params, frozen), batch, rngs)
            return out.total, out

        (loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        # The optimizer sees the full tree; frozen leaves get zeros that `set_to_zero` ignores.
        full_grads = merge_params(grads, jax.tree.map(jnp.zeros_like, frozen))
        updates, opt_state = tx.update(full_grads, state.opt_state, state.params)
        trainable_updates, _ = split_params(updates, labels)
        # Frozen leaves are passed through untouched (not even `+ 0`).
        params = merge_params(optax.apply_updates(trainable, trainable_updates), frozen)
        metrics = {
            "loss": loss,
            "dice": out.dice,
            "focal": out.focal,
            "iou_l1": out.iou_l1,
            "train_iou": out.true_iou,
            "grad_norm": optax.global_norm(grads),
            "lr": schedule(state.step),
        }
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    return jax.jit(
        train_step,
        in_shardings=(replicated(mesh), batch_sharding(mesh)),
        out_shardings=(replicated(mesh), replicated(mesh)),
        donate_argnums=0,
    )


def make_eval_step(
    model: EfficientSam, config: ml_collections.ConfigDict, mesh: Mesh
) -> Callable[[Params, Batch], dict[str, jax.Array]]:
    """Returns jitted `eval_step(params, batch) -> per-instance metrics`, each [B, N]:
    'model_iou' (IoU of the predicted mask, best candidate by predicted IoU, with the amodal
    mask), 'visible_iou' (IoU of the visible mask with the amodal mask: the modal baseline)."""
    multimask = config.mask_selection != "single"

    def eval_step(params: Params, batch: Batch):
        emb = _embeddings(model, params, batch)
        points, point_labels = boxes_to_prompts(batch["prompt_boxes"])
        logits, pred_iou = model.apply(
            {"params": params}, emb, points, point_labels,
            multimask_output=multimask, method=EfficientSam.decode,
        )
        pred = best_candidate(logits, pred_iou)[0] >= MASK_THRESHOLD
        amodal = batch["amodal_masks"]
        return {
            "model_iou": losses.binary_mask_iou(pred, amodal),
            "visible_iou": losses.binary_mask_iou(batch["visible_masks"], amodal),
        }

    return jax.jit(
        eval_step,
        in_shardings=(replicated(mesh), batch_sharding(mesh)),
        out_shardings=replicated(mesh),  # small; every process reads all of it
    )
