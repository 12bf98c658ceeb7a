"""EfficientSAM's two-way transformer: prompt tokens and image tokens attend to each other.

Differs from SAM's block (see the reference spec): from the second layer on the query
positional encoding is added to the residual stream itself, and the first layer's
self-attention keeps its residual.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sameo_jax.models.layers import Mlp, attention, layer_norm

DECODER_LN_EPS = 1e-5


class Attention(nn.Module):
    """Attention with q/k/v/out projections; internal width `internal_dim`."""

    embed_dim: int
    internal_dim: int
    num_heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        dense = lambda n, name: nn.Dense(n, dtype=self.dtype, name=name)  # noqa: E731
        q = dense(self.internal_dim, "q_proj")(q)
        k = dense(self.internal_dim, "k_proj")(k)
        v = dense(self.internal_dim, "v_proj")(v)
        return dense(self.embed_dim, "out_proj")(attention(q, k, v, self.num_heads))


class TwoWayBlock(nn.Module):
    """One layer: token self-attention, token->image, MLP, image->token attention."""

    embed_dim: int
    num_heads: int
    mlp_dim: int
    downsample_rate: int
    add_query_pe: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, queries, keys, query_pe, key_pe):
        d, h, dt = self.embed_dim, self.num_heads, self.dtype
        cross_dim = d // self.downsample_rate
        if self.add_query_pe:
            queries = queries + query_pe
        attn = Attention(d, d, h, dt, name="self_attn")(queries, queries, queries)
        queries = layer_norm(DECODER_LN_EPS, dt, "norm1")(queries + attn)
        attn = Attention(d, cross_dim, h, dt, name="cross_attn_token_to_image")(
            queries + query_pe, keys + key_pe, keys)
        queries = layer_norm(DECODER_LN_EPS, dt, "norm2")(queries + attn)
        mlp = Mlp((self.mlp_dim,), d, dt, name="mlp")(queries)
        queries = layer_norm(DECODER_LN_EPS, dt, "norm3")(queries + mlp)
        attn = Attention(d, cross_dim, h, dt, name="cross_attn_image_to_token")(
            keys + key_pe, queries + query_pe, queries)
        keys = layer_norm(DECODER_LN_EPS, dt, "norm4")(keys + attn)
        return queries, keys


class TwoWayTransformer(nn.Module):
    """queries [..., T, D] tokens, keys [..., S, D] image tokens (leading dims broadcast:
    keys may be shared by all prompts of an image), key_pe [S, D].

    Returns (queries [..., T, D], keys [..., S, D]).
    """

    embed_dim: int
    depth: int
    num_heads: int
    mlp_dim: int
    downsample_rate: int = 2
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, queries, keys, key_pe):
        query_pe = queries
        for i in range(self.depth):
            queries, keys = TwoWayBlock(
                self.embed_dim, self.num_heads, self.mlp_dim, self.downsample_rate,
                add_query_pe=i > 0, dtype=self.dtype, name=f"layers_{i}",
            )(queries, keys, query_pe, key_pe)
        attn = Attention(self.embed_dim, self.embed_dim // self.downsample_rate, self.num_heads,
                         self.dtype, name="final_attn_token_to_image")(
            queries + query_pe, keys + key_pe, keys)
        queries = layer_norm(DECODER_LN_EPS, self.dtype, "norm_final_attn")(queries + attn)
        return queries, keys
