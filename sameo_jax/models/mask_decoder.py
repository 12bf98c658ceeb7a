"""EfficientSAM mask decoder: tokens + image embedding -> mask logits and IoU predictions."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sameo_jax.models.config import EfficientSamConfig
from sameo_jax.models.layers import Mlp, gelu, rows_times_kernel
from sameo_jax.models.low_rank import LowRankTokens
from sameo_jax.models.two_way_transformer import TwoWayTransformer

GROUP_NORM_EPS = 1e-5


class Upsample2x(nn.Module):
    """Transposed convolution with kernel = stride = 2, kept in sub-pixel layout.

    [..., C] -> [..., 2, 2, F]: out[..., a, b, o] = bias[o] + sum_c x[..., c] kernel[a, b, c, o]
    is the output pixel (2i + a, 2j + b) of torch's ConvTranspose2d(k=2, s=2) at input pixel
    (i, j). The pixel shuffle is left to the caller (`shuffle_subpixels`), so large feature
    maps are never transposed.
    """

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array | LowRankTokens) -> jax.Array:
        """x [..., C] or LowRankTokens of [..., S, C] (-> [..., S, 2, 2, F])."""
        c = x.base.shape[-1] if isinstance(x, LowRankTokens) else x.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (2, 2, c, self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        f, dt = self.features, self.dtype
        w = kernel.astype(dt).transpose(2, 0, 1, 3).reshape(c, 4 * f)
        if isinstance(x, LowRankTokens):  # the bias goes into the pieces' small offset
            y = x.linear(w, jnp.tile(bias.astype(dt), 4)).dense()
        else:
            # Bias added over one merged sub-pixel axis: its gradient is a plain column sum.
            rows = rows_times_kernel(x.astype(dt).reshape(-1, c), w)
            y = (rows.reshape(-1, f) + bias.astype(dt)).reshape(*x.shape[:-1], 4 * f)
        return y.reshape(*y.shape[:-1], 2, 2, f)


def shuffle_subpixels(x: jax.Array) -> jax.Array:
    """[..., h, w, a1, b1, a2, b2] (two nested 2x upsamplings) -> [..., 4h, 4w], row
    4i + 2 a1 + a2 and column 4j + 2 b1 + b2."""
    *lead, h, w = x.shape[:-4]
    x = jnp.moveaxis(x, (-4, -2), (-5, -4))  # [..., h, a1, a2, w, b1, b2]
    x = x.reshape(*lead, h, 2, 2, w, 2, 2)
    return x.reshape(*lead, 4 * h, 4 * w)


class MaskDecoder(nn.Module):
    """sparse tokens [B, Q, P, D] + embeddings [B, E, E, D] -> logits [B, Q, M, 4E, 4E] and
    IoU [B, Q, M] for all M = num_multimask_outputs + 1 mask tokens (selection by caller).

    sparse_log_weight [P] (optional): log of how many identical prompt tokens each sparse
    token stands for. mask_ids (optional): the mask tokens to compute masks and IoUs for
    (then K = len(mask_ids) replaces M). The returned tokens [B, Q, T, D] are all 1 + M + P
    of them, or with `prompt_tokens=False` only the IoU token and the wanted mask tokens
    (all the outputs need; the others skip the final attention).
    """

    config: EfficientSamConfig

    @nn.compact
    def __call__(self, sparse: jax.Array, embeddings: jax.Array, dense_pe: jax.Array,
                 sparse_log_weight: jax.Array | None = None, prompt_tokens: bool = True,
                 mask_ids: tuple[int, ...] | None = None):
        cfg = self.config
        dt = cfg.compute_dtype
        d = cfg.embed_dim
        num_masks = cfg.num_multimask_outputs + 1
        ids = tuple(range(num_masks)) if mask_ids is None else tuple(mask_ids)
        b, q = sparse.shape[:2]
        e = embeddings.shape[1]
        normal = nn.initializers.normal(1.0)
        iou_token = self.param("iou_token", normal, (1, d))
        mask_tokens = self.param("mask_tokens", normal, (num_masks, d))
        out_tokens = jnp.concatenate([iou_token, mask_tokens], axis=0)
        tokens = jnp.concatenate(
            [jnp.broadcast_to(out_tokens, (b, q, 1 + num_masks, d)), sparse], axis=2
        ).astype(dt)
        # Image tokens are shared by the prompts of an image until the first image->token
        # update; the transformer broadcasts them instead of copying them per prompt.
        keys = embeddings.reshape(b, 1, e * e, d).astype(dt)
        key_pe = dense_pe.reshape(e * e, d).astype(dt)
        token_log_weight = None
        if sparse_log_weight is not None:
            token_log_weight = jnp.concatenate(
                [jnp.zeros(1 + num_masks, jnp.float32), sparse_log_weight])
        # The first transposed convolution may read the image tokens' factored form (shared
        # map + per-prompt low-rank sum of rank k, see low_rank.py): d + q k instead of q d
        # products per token for the q prompts of an image, so with enough prompts only.
        k = cfg.decoder_depth * cfg.decoder_heads * tokens.shape[-2]
        use_factored = cfg.factored_upscale and q * (d - k) > d
        tokens, keys, factored = TwoWayTransformer(
            d, cfg.decoder_depth, cfg.decoder_heads, cfg.decoder_mlp_dim,
            cfg.attention_downsample_rate, dt, name="transformer",
        )(tokens, keys, key_pe, token_log_weight,
          outputs=None if prompt_tokens else (0, *(1 + i for i in ids)),
          factored_keys=use_factored)
        iou_out = tokens[..., 0, :]
        mask_out = tokens[..., 1:1 + len(ids), :] if not prompt_tokens else jnp.take(
            tokens, np.asarray([1 + i for i in ids]), axis=-2)

        x = factored if use_factored else keys.reshape(b, q, e * e, d)
        x = Upsample2x(d // 4, dt, name="upscale_conv1")(x)  # [B, Q, E*E, 2, 2, d/4]
        x = x.reshape(b, q, e, e, *x.shape[-3:])
        x = nn.GroupNorm(num_groups=1, epsilon=GROUP_NORM_EPS, use_fast_variance=False,
                         dtype=dt, reduction_axes=(-5, -4, -3, -2, -1), name="upscale_norm")(x)
        x = gelu(x)
        x = gelu(Upsample2x(d // 8, dt, name="upscale_conv2")(x))  # [B, Q, E, E, 2, 2, 2, 2, d/8]

        hyper_in = jnp.stack(
            [Mlp((d, d), d // 8, dt, name=f"hypernet_{i}")(mask_out[..., j, :])
             for j, i in enumerate(ids)], axis=-2)  # [B, Q, K, d/8]
        # Channels-last product, then one transpose of the (8x smaller) mask logits.
        masks = jnp.einsum("bqhwijklc,bqmc->bqhwijklm", x, hyper_in)
        masks = shuffle_subpixels(jnp.moveaxis(masks, -1, 2))  # [B, Q, K, 4E, 4E]
        iou = Mlp((cfg.iou_head_hidden, cfg.iou_head_hidden), num_masks, dt,
                  name="iou_head")(iou_out)[..., np.asarray(ids)]
        return masks.astype(jnp.float32), iou.astype(jnp.float32), hyper_in, tokens
