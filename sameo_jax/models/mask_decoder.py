"""EfficientSAM mask decoder: prompt tokens + image embedding -> mask logits and IoU predictions.

The reference form (models/fast/ computes the same function faster, on the same parameters).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sameo_jax.models.config import EfficientSamConfig
from sameo_jax.models.layers import Mlp, gelu
from sameo_jax.models.two_way_transformer import TwoWayTransformer

GROUP_NORM_EPS = 1e-5


class ConvTranspose2x2(nn.Module):
    """torch's ConvTranspose2d(kernel_size=2, stride=2): [..., H, W, C] -> [..., 2H, 2W, F],
    out[2i + a, 2j + b] = x[i, j] @ kernel[a, b] + bias."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        *lead, h, w, c = x.shape
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (2, 2, c, self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        y = jnp.einsum("...ijc,abcf->...iajbf", x.astype(self.dtype), kernel.astype(self.dtype))
        return y.reshape(*lead, 2 * h, 2 * w, self.features) + bias.astype(self.dtype)


class MaskDecoder(nn.Module):
    """sparse prompt tokens [B, Q, P, D] + embeddings [B, E, E, D] + dense_pe [E, E, D] ->
    (logits [B, Q, M, 4E, 4E], iou [B, Q, M], hyper_in [B, Q, M, D/8], tokens [B, Q, 1+M+P, D])
    for all M = num_multimask_outputs + 1 mask tokens (the caller selects among them).
    """

    config: EfficientSamConfig

    @nn.compact
    def __call__(self, sparse: jax.Array, embeddings: jax.Array, dense_pe: jax.Array):
        cfg = self.config
        dt, d, m = cfg.compute_dtype, cfg.embed_dim, cfg.num_multimask_outputs + 1
        b, q = sparse.shape[:2]
        e = embeddings.shape[1]
        iou_token = self.param("iou_token", nn.initializers.normal(1.0), (1, d))
        mask_tokens = self.param("mask_tokens", nn.initializers.normal(1.0), (m, d))
        # Tokens per prompt: [iou, mask_0..mask_{M-1}, prompt tokens].
        out_tokens = jnp.broadcast_to(jnp.concatenate([iou_token, mask_tokens]), (b, q, 1 + m, d))
        tokens = jnp.concatenate([out_tokens, sparse], axis=2).astype(dt)
        # Every prompt of an image reads the same image tokens (broadcast over Q).
        keys = embeddings.reshape(b, 1, e * e, d).astype(dt)
        tokens, keys = TwoWayTransformer(
            cfg.decoder_depth, cfg.decoder_heads, cfg.decoder_mlp_dim,
            cfg.attention_downsample_rate, dt, cfg.remat_policy, name="transformer",
        )(tokens, keys, dense_pe.reshape(e * e, d).astype(dt))

        x = ConvTranspose2x2(d // 4, dt, name="upscale_conv1")(keys.reshape(b, q, e, e, d))
        x = nn.GroupNorm(num_groups=1, epsilon=GROUP_NORM_EPS, use_fast_variance=False,
                         dtype=dt, reduction_axes=(-3, -2, -1), name="upscale_norm")(x)
        x = gelu(ConvTranspose2x2(d // 8, dt, name="upscale_conv2")(gelu(x)))  # [B, Q, 4E, 4E, D/8]
        hyper_in = jnp.stack([Mlp((d, d), d // 8, dt, name=f"hypernet_{i}")(tokens[..., 1 + i, :])
                              for i in range(m)], axis=-2)  # [B, Q, M, D/8]
        masks = jnp.einsum("bqhwc,bqmc->bqmhw", x, hyper_in)
        iou_hidden = (cfg.iou_head_hidden, cfg.iou_head_hidden)
        iou = Mlp(iou_hidden, m, dt, name="iou_head")(tokens[..., 0, :])
        return masks.astype(jnp.float32), iou.astype(jnp.float32), hyper_in, tokens
