"""EfficientSAM assembled: `encode` once per image, `decode` for any number of prompts."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sameo_jax.models.config import VARIANTS, EfficientSamConfig, model_config
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


def best_candidate(logits: jax.Array, iou: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The candidate with the highest predicted IoU: logits [..., K, L, L], iou [..., K] ->
    ([..., L, L], [...]) (the official example's choice among the 3 multimask outputs)."""
    best = jnp.argmax(iou, axis=-1)
    picked = jnp.take_along_axis(logits, best[..., None, None, None], axis=-3)[..., 0, :, :]
    return picked, jnp.take_along_axis(iou, best[..., None], axis=-1)[..., 0]


def _repeat_last(x: jax.Array, copies: int) -> jax.Array:
    """[..., N, D] -> [..., N - 1 + copies, D], the last row repeated."""
    last = jnp.broadcast_to(x[..., -1:, :], (*x.shape[:-2], copies, x.shape[-1]))
    return jnp.concatenate([x[..., :-1, :], last], axis=-2)


class EfficientSam(nn.Module):
    """EfficientSAM. Parameters: {'image_encoder', 'prompt_encoder', 'mask_decoder'}."""

    config: EfficientSamConfig

    def setup(self):
        self.image_encoder = ImageEncoder(self.config)
        self.prompt_encoder = PromptEncoder(self.config)
        self.mask_decoder = MaskDecoder(self.config)

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
        # The padding points are identical tokens and stay identical through the decoder, so
        # they run as one token weighted by their count (see two_way_transformer) and are
        # copied back afterwards: a box prompt has 8 tokens to carry instead of 11.
        given, total = points.shape[-2], self.config.max_num_points
        copies = total - given
        log_weight = None
        if copies > 1:
            points, labels = pad_prompts(points, labels, given + 1)
            log_weight = jnp.zeros(given + 1, jnp.float32).at[-1].set(np.log(copies))
        else:
            points, labels = pad_prompts(points, labels, total)
        sparse = self.prompt_encoder(points, labels)
        dense_pe = self.prompt_encoder.dense_pe()
        logits, iou, hyper_in, tokens = self._run_mask_decoder(sparse, embeddings, dense_pe,
                                                               log_weight, prompt_tokens,
                                                               mask_ids)
        if copies > 1:
            sparse = _repeat_last(sparse, copies)
            if prompt_tokens:
                tokens = _repeat_last(tokens, copies)
        return {"logits": logits, "iou": iou, "sparse": sparse, "tokens": tokens,
                "hyper_in": hyper_in}

    def _run_mask_decoder(self, sparse, embeddings, dense_pe, log_weight, prompt_tokens,
                          mask_ids):
        """The mask decoder on all prompts, `config.decoder_prompt_chunk` prompts of one image
        at a time (a loop over chunks: rows of different prompts never interact)."""
        b, q = sparse.shape[:2]
        chunk = self.config.decoder_prompt_chunk
        if self.is_initializing() or not chunk or q <= chunk or q % chunk:
            return self.mask_decoder(sparse, embeddings, dense_pe, log_weight, prompt_tokens,
                                     mask_ids)
        n = q // chunk
        variables = self.mask_decoder.variables
        decoder = MaskDecoder(self.config, parent=None)  # applied inside the loop

        def run(args):
            image, sparse_chunk = args
            return decoder.apply(variables, sparse_chunk, embeddings[image][None], dense_pe,
                                 log_weight, prompt_tokens, mask_ids)

        images = jnp.repeat(jnp.arange(b), n)
        chunks = sparse.reshape(b * n, 1, chunk, *sparse.shape[2:])
        outs = jax.lax.map(run, (images, chunks))
        return tuple(x.reshape(b, q, *x.shape[3:]) for x in outs)

    def decode(self, embeddings: jax.Array, points: jax.Array, labels: jax.Array,
               multimask_output: bool = True) -> tuple[jax.Array, jax.Array]:
        """Masks for prompts.

        embeddings [B, E, E, D]; points [B, Q, P, 2] (x, y) in the model-input frame, P <= 6;
        labels [B, Q, P] int (1 positive, 0 negative, 2/3 box corners, -1 padding).
        Returns low-res logits [B, Q, K, L, L] and raw IoU predictions [B, Q, K], with K = 3
        (multimask) or 1.
        """
        if self.is_initializing():  # every mask token's parameters
            out = self.decode_all(embeddings, points, labels)
            return select_masks(out["logits"], out["iou"], multimask_output)
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
        # Dummy inputs made inside the traced function: this cached function may first be
        # built under another trace (param_shapes' eval_shape), which must not leak into it.
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
