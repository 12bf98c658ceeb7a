"""EfficientSAM's two-way transformer: prompt tokens and image tokens attend to each other.

The reference form (models/fast/ computes the same function faster, on the same parameters).
EfficientSAM's block differs from SAM's: from the second layer on the query positional encoding
is added to the residual stream itself, and the first layer's self-attention keeps its residual.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sameo_jax.models.layers import Mlp, layer_norm

DECODER_LN_EPS = 1e-5


class Attention(nn.Module):
    """Multi-head attention with q/k/v/out projections to and from `internal_dim` channels,
    split into `num_heads` contiguous heads."""

    internal_dim: int
    num_heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        """q [..., T, D], k and v [..., S, D] (leading dims broadcast) -> [..., T, D]."""
        d, c, h = q.shape[-1], self.internal_dim, self.num_heads

        def heads(x: jax.Array) -> jax.Array:  # [..., N, C] -> [..., H, N, C/H]
            return jnp.swapaxes(x.reshape(*x.shape[:-1], h, c // h), -2, -3)

        q = heads(nn.Dense(c, dtype=self.dtype, name="q_proj")(q))
        k = heads(nn.Dense(c, dtype=self.dtype, name="k_proj")(k))
        v = heads(nn.Dense(c, dtype=self.dtype, name="v_proj")(v))
        logits = q @ jnp.swapaxes(k, -1, -2) * (c // h) ** -0.5
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        out = jnp.swapaxes(weights @ v, -2, -3)  # [..., T, H, C/H]
        return nn.Dense(d, dtype=self.dtype, name="out_proj")(out.reshape(*out.shape[:-2], c))


class TwoWayBlock(nn.Module):
    """One layer: token self-attention, token->image attention, MLP, image->token attention;
    each added to its residual and layer-normalised (post-norm)."""

    num_heads: int
    mlp_dim: int
    downsample_rate: int
    add_query_pe: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, queries, keys, query_pe, key_pe):
        """queries, query_pe [..., T, D]; keys [..., S, D]; key_pe [S, D] -> (queries, keys)."""
        d, h, dt = queries.shape[-1], self.num_heads, self.dtype
        cross = d // self.downsample_rate
        if self.add_query_pe:  # layers after the first: into the residual stream itself
            queries = queries + query_pe
        attn = Attention(d, h, dt, name="self_attn")(queries, queries, queries)
        queries = layer_norm(DECODER_LN_EPS, dt, "norm1")(queries + attn)
        attn = Attention(cross, h, dt, name="cross_attn_token_to_image")(
            queries + query_pe, keys + key_pe, keys)
        queries = layer_norm(DECODER_LN_EPS, dt, "norm2")(queries + attn)
        mlp = Mlp((self.mlp_dim,), d, dt, name="mlp")(queries)
        queries = layer_norm(DECODER_LN_EPS, dt, "norm3")(queries + mlp)
        attn = Attention(cross, h, dt, name="cross_attn_image_to_token")(
            keys + key_pe, queries + query_pe, queries)
        keys = layer_norm(DECODER_LN_EPS, dt, "norm4")(keys + attn)
        return queries, keys


class TwoWayTransformer(nn.Module):
    """`depth` two-way blocks, then a final token->image attention.

    queries [..., T, D] prompt-side tokens (also their positional encoding), keys [..., S, D]
    image tokens, key_pe [S, D] -> (queries [..., T, D], keys [..., S, D]).
    remat_policy: a jax.checkpoint policy: each block is recomputed in the backward pass,
    keeping only what the policy saves (None: no recomputation).
    """

    depth: int
    num_heads: int
    mlp_dim: int
    downsample_rate: int = 2
    dtype: Any = jnp.float32
    remat_policy: Callable | None = None

    @nn.compact
    def __call__(self, queries, keys, key_pe):
        query_pe = queries
        block = TwoWayBlock  # the same parameter names with or without remat
        if self.remat_policy is not None:
            block = nn.remat(TwoWayBlock, policy=self.remat_policy)
        for i in range(self.depth):
            queries, keys = block(
                self.num_heads, self.mlp_dim, self.downsample_rate, add_query_pe=i > 0,
                dtype=self.dtype, name=f"layers_{i}")(queries, keys, query_pe, key_pe)
        cross = queries.shape[-1] // self.downsample_rate
        attn = Attention(cross, self.num_heads, self.dtype, name="final_attn_token_to_image")(
            queries + query_pe, keys + key_pe, keys)
        queries = layer_norm(DECODER_LN_EPS, self.dtype, "norm_final_attn")(queries + attn)
        return queries, keys
