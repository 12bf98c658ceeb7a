"""EfficientSAM image encoder: plain ViT with global attention and a convolutional neck."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sameo_jax.models.config import EfficientSamConfig
from sameo_jax.models.layers import attention, gelu, layer_norm
from sameo_jax.preprocessing import cubic_resize_matrix

ENCODER_LN_EPS = 1e-6


def resize_pos_embed(pos_embed: jax.Array, grid: int, out_size: int) -> jax.Array:
    """[1, 1 + grid^2, C] pretraining position embedding -> [out, out, C].

    Drops the cls entry and resizes with PyTorch bicubic (A = -0.75), as the original.
    """
    c = pos_embed.shape[-1]
    table = pos_embed[0, 1:].reshape(grid, grid, c).astype(jnp.float32)
    r = jnp.asarray(cubic_resize_matrix(grid, out_size).astype(np.float32))
    table = jnp.einsum("Hh,hwc->Hwc", r, table, precision="highest")
    return jnp.einsum("Ww,Hwc->HWc", r, table, precision="highest")


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    width: int
    num_heads: int
    mlp_ratio: float
    dtype: Any = jnp.float32
    query_chunk: int | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = layer_norm(ENCODER_LN_EPS, self.dtype, "norm1")(x)
        qkv = nn.Dense(3 * self.width, dtype=self.dtype, name="qkv")(h)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        h = attention(q, k, v, self.num_heads, query_chunk=self.query_chunk)
        x = x + nn.Dense(self.width, dtype=self.dtype, name="proj")(h)
        h = layer_norm(ENCODER_LN_EPS, self.dtype, "norm2")(x)
        h = gelu(nn.Dense(int(self.width * self.mlp_ratio), dtype=self.dtype, name="fc1")(h))
        return x + nn.Dense(self.width, dtype=self.dtype, name="fc2")(h)


class ImageEncoder(nn.Module):
    """[B, S, S, 3] normalised images -> [B, S/16, S/16, embed_dim] image embeddings."""

    config: EfficientSamConfig

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        cfg = self.config
        dtype = cfg.compute_dtype
        if images.shape[-3:] != (cfg.img_size, cfg.img_size, 3):
            raise ValueError(
                f"image encoder expects [B, {cfg.img_size}, {cfg.img_size}, 3], got {images.shape}"
            )
        p = cfg.patch_size
        x = nn.Conv(cfg.encoder_width, (p, p), strides=(p, p), padding="VALID", dtype=dtype,
                    name="patch_embed")(images.astype(dtype))
        pos_embed = self.param(
            "pos_embed", nn.initializers.normal(0.02),
            (1, 1 + cfg.pos_embed_grid**2, cfg.encoder_width),
        )
        x = x + resize_pos_embed(pos_embed, cfg.pos_embed_grid, cfg.embedding_size).astype(dtype)
        b, gh, gw, c = x.shape
        x = x.reshape(b, gh * gw, c)
        for i in range(cfg.encoder_depth):
            x = EncoderBlock(cfg.encoder_width, cfg.encoder_heads, cfg.mlp_ratio, dtype,
                             cfg.encoder_attention_chunk or None, name=f"blocks_{i}")(x)
        x = x.reshape(b, gh, gw, c)
        x = nn.Dense(cfg.embed_dim, use_bias=False, dtype=dtype, name="neck_conv1")(x)
        x = layer_norm(ENCODER_LN_EPS, dtype, "neck_norm1")(x)
        x = nn.Conv(cfg.embed_dim, (3, 3), padding="SAME", use_bias=False, dtype=dtype,
                    name="neck_conv2")(x)
        return layer_norm(ENCODER_LN_EPS, dtype, "neck_norm2")(x)
