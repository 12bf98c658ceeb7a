"""EfficientSAM assembled: `encode` once per image, `decode` for any number of prompts."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sameo_jax.models.config import VARIANTS, EfficientSamConfig, model_config
from sameo_jax.models.fast import mask_decoder as fast
from sameo_jax.models.image_encoder import ImageEncoder
from sameo_jax.models.mask_decoder import MaskDecoder
from sameo_jax.models.prompt_encoder import PromptEncoder
from sameo_jax.preprocessing import pad_prompts

__all__ = [
    "VARIANTS", "EfficientSam", "EfficientSamConfig", "best_candidate", "init_params",
    "model_config", "param_shapes",
]


def select_masks(logits: jax.Array, iou: jax.Array, multimask_output: bool):
    """All mask-token outputs [..., M, L, L] / [..., M] -> the official selection:
    tokens 1..M-1 when `multimask_output`, else token 0 alone."""
    if multimask_output:
        return logits[..., 1:, :, :], iou[..., 1:]
    return logits[..., :1, :, :], iou[..., :1]


def select_outputs(outputs: tuple[jax.Array, ...], mask_ids: tuple[int, ...],
                   prompt_tokens: bool = True) -> tuple[jax.Array, ...]:
    """The mask decoder's (logits, iou, hyper_in, tokens) for all M mask tokens -> those of
    `mask_ids`; with `prompt_tokens=False` the tokens too are only the IoU token and those."""
    logits, iou, hyper_in, tokens = outputs
    ids = np.asarray(mask_ids)
    if not prompt_tokens:
        tokens = jnp.take(tokens, np.asarray([0, *(1 + ids)]), axis=-2)
    return logits[..., ids, :, :], iou[..., ids], hyper_in[..., ids, :], tokens


def best_candidate(logits: jax.Array, iou: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The candidate with the highest predicted IoU: logits [..., K, L, L], iou [..., K] ->
    ([..., L, L], [...]) (the official example's choice among the 3 multimask outputs)."""
    best = jnp.argmax(iou, axis=-1)
    picked = jnp.take_along_axis(logits, best[..., None, None, None], axis=-3)[..., 0, :, :]
    return picked, jnp.take_along_axis(iou, best[..., None], axis=-1)[..., 0]


class EfficientSam(nn.Module):
    """EfficientSAM. Parameters: {'image_encoder', 'prompt_encoder', 'mask_decoder'}."""

    config: EfficientSamConfig

    def setup(self):
        self.image_encoder = ImageEncoder(self.config)
        self.prompt_encoder = PromptEncoder(self.config)
        # Either decoder reads the same parameters ('mask_decoder/...').
        fast_decoder = self.config.decoder_impl == "fast"
        self.mask_decoder = (fast.MaskDecoder if fast_decoder else MaskDecoder)(self.config)

    def encode(self, images: jax.Array) -> jax.Array:
        """[B, S, S, 3] float32 normalised images -> [B, E, E, D] image embeddings."""
        return self.image_encoder(images)

    def decode_all(self, embeddings: jax.Array, points: jax.Array, labels: jax.Array,
                   prompt_tokens: bool = True, mask_ids: tuple[int, ...] | None = None,
                   ) -> dict[str, jax.Array]:
        """Like `decode`, but returns every mask token's output and the intermediates:
        {'logits' [B, Q, M, L, L], 'iou' [B, Q, M], 'sparse' [B, Q, 6, D],
         'tokens' [B, Q, T, D], 'hyper_in' [B, Q, M, D/8]} with M = multimask outputs + 1.
        The decoder's output tokens are T = 1 + M + 6, or only the 1 + M that the masks and
        IoUs come from with `prompt_tokens=False` (the others then skip the last attention).
        mask_ids: compute only these mask tokens' outputs (M becomes len(mask_ids))."""
        if points.ndim != 4 or points.shape[-1] != 2 or labels.shape != points.shape[:-1]:
            raise ValueError(
                f"decode expects points [B, Q, P, 2] and labels [B, Q, P]; got "
                f"{points.shape} and {labels.shape}")
        num_masks = self.config.num_multimask_outputs + 1
        if mask_ids is not None and (not mask_ids or any(
                not 0 <= i < num_masks for i in mask_ids)):
            raise ValueError(f"decode_all: mask_ids={mask_ids!r}; expected mask token indices "
                             f"in 0..{num_masks - 1}")
        given = points.shape[-2]
        points, labels = pad_prompts(points, labels, self.config.max_num_points)
        sparse = self.prompt_encoder(points, labels)
        dense_pe = self.prompt_encoder.dense_pe()
        ids = tuple(range(num_masks)) if mask_ids is None else tuple(mask_ids)
        if self.config.decoder_impl == "fast":
            logits, iou, hyper_in, tokens = self.mask_decoder(
                sparse, embeddings, dense_pe, padding=points.shape[-2] - given,
                prompt_tokens=prompt_tokens, mask_ids=ids)
        else:
            logits, iou, hyper_in, tokens = select_outputs(
                self.mask_decoder(sparse, embeddings, dense_pe), ids, prompt_tokens)
        return {"logits": logits, "iou": iou, "sparse": sparse, "tokens": tokens,
                "hyper_in": hyper_in}

    def decode(self, embeddings: jax.Array, points: jax.Array, labels: jax.Array,
               multimask_output: bool = True) -> tuple[jax.Array, jax.Array]:
        """Masks for prompts.

        embeddings [B, E, E, D]; points [B, Q, P, 2] (x, y) in the model-input frame, P <= 6;
        labels [B, Q, P] int (1 positive, 0 negative, 2/3 box corners, -1 padding).
        Returns low-res logits [B, Q, K, L, L] and raw IoU predictions [B, Q, K], with K = 3
        (multimask) or 1.
        """
        # Only the selected mask tokens are decoded (the official selection, see select_masks).
        num_masks = self.config.num_multimask_outputs + 1
        ids = tuple(range(1, num_masks)) if multimask_output else (0,)
        out = self.decode_all(embeddings, points, labels, prompt_tokens=False, mask_ids=ids)
        return out["logits"], out["iou"]

    def __call__(self, images: jax.Array, points: jax.Array, labels: jax.Array,
                 multimask_output: bool = True) -> tuple[jax.Array, jax.Array]:
        return self.decode(self.encode(images), points, labels, multimask_output)


@functools.lru_cache(maxsize=8)
def _compiled_init(config: EfficientSamConfig):
    s = config.img_size

    def init(key):
        # Inputs made inside: a first build under param_shapes' eval_shape must not leak in.
        images = jnp.zeros((1, s, s, 3), jnp.float32)
        points = jnp.zeros((1, 1, 2, 2), jnp.float32)
        labels = jnp.zeros((1, 1, 2), jnp.int32)
        return EfficientSam(config).init(key, images, points, labels)["params"]

    # One compiled call (cached per config) instead of running the model op by op.
    return jax.jit(init)


def init_params(config: EfficientSamConfig, key: jax.Array) -> dict[str, Any]:
    """Randomly initialised parameters of `config`'s model (float32)."""
    return _compiled_init(config)(key)


def param_shapes(config: EfficientSamConfig) -> dict[str, Any]:
    """Parameter shapes/dtypes of `config`'s model without allocating them."""
    return jax.eval_shape(lambda k: init_params(config, k), jax.random.key(0))
