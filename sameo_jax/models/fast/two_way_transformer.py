"""The two-way transformer of models/two_way_transformer.py, reassociated for speed.

Same parameters, same function (tests/test_decoder_fast_paths.py holds it to the reference).
A prompt has T <= 11 tokens against S = 4096 image tokens, and from the first image->token
update on every prompt has its own copy of the image tokens. Projecting those copies is most
of the decoder's work, so the cross attentions reassociate the products: the few token-side
vectors are carried through the projection kernels (`Attention.tokens_to_image`,
`Attention.image_to_tokens`), S x D x (heads x T) per product instead of S x D x C. Where the
image tokens are still shared by all prompts of an image, projecting them once is cheaper and
is what runs; the choice is made from the shapes.

Identical tokens (the padding points of a prompt) may be passed once with a log-multiplicity
`token_log_weight`: a softmax over n equal keys is the softmax over one key whose logit is
raised by log n, and equal queries give equal outputs. The transformer can also carry the
output image tokens in factored form (`LowRankTokens`, low_rank.py).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sameo_jax.models.fast.low_rank import LowRankTokens
from sameo_jax.models.layers import Mlp, attention, layer_norm, softmax_matmul
from sameo_jax.models.two_way_transformer import DECODER_LN_EPS


class Linear(nn.Module):
    """x @ kernel + bias with nn.Dense's parameters ({'kernel' [in, out], 'bias' [out]}); the
    weights are also handed out unapplied (`weights()`) for reassociated products."""

    in_features: int
    features: int
    dtype: Any = jnp.float32

    def setup(self):
        self.kernel = self.param("kernel", nn.initializers.lecun_normal(),
                                 (self.in_features, self.features))
        self.bias = self.param("bias", nn.initializers.zeros, (self.features,))

    def weights(self) -> tuple[jax.Array, jax.Array]:
        """(kernel [in, out], bias [out]) in the compute dtype."""
        return self.kernel.astype(self.dtype), self.bias.astype(self.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel, bias = self.weights()
        return x.astype(self.dtype) @ kernel + bias


def _split_heads(x: jax.Array, num_heads: int) -> jax.Array:
    """[..., N, C] -> [..., H, N, C/H] (heads are contiguous chunks of C)."""
    return jnp.swapaxes(x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads), -2, -3)


def _num_pairs(tokens: jax.Array, image: jax.Array) -> tuple[int, int]:
    """(distinct image-token sets, prompts) for tokens [..., T, D] and image [..., S, D]."""
    lead = jnp.broadcast_shapes(tokens.shape[:-2], image.shape[:-2])
    return math.prod(image.shape[:-2]), math.prod(lead)


class Attention(nn.Module):
    """Multi-head attention with q/k/v/out projections (nn.Dense parameter layout); internal
    width `internal_dim`, split into `num_heads` heads."""

    embed_dim: int
    internal_dim: int
    num_heads: int
    dtype: Any = jnp.float32

    def setup(self):
        d, c, dt = self.embed_dim, self.internal_dim, self.dtype
        self.q_proj = Linear(d, c, dt)
        self.k_proj = Linear(d, c, dt)
        self.v_proj = Linear(d, c, dt)
        self.out_proj = Linear(c, d, dt)

    @property
    def head_dim(self) -> int:
        return self.internal_dim // self.num_heads

    def _head_kernel(self, proj: Linear) -> tuple[jax.Array, jax.Array]:
        """An input projection's kernel as [D, H, C/H] and bias as [H, C/H]."""
        kernel, bias = proj.weights()
        return (kernel.reshape(kernel.shape[0], self.num_heads, self.head_dim),
                bias.reshape(self.num_heads, self.head_dim))

    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array,
                 key_bias: jax.Array | None = None) -> jax.Array:
        """q [..., T, D], k/v [..., S, D] -> [..., T, D]; key_bias [..., S] is added to logits."""
        out = attention(self.q_proj(q), self.k_proj(k), self.v_proj(v), self.num_heads,
                        key_bias=key_bias)
        return self.out_proj(out)

    def tokens_to_image(self, tokens: jax.Array, image_k: jax.Array, image_v: jax.Array,
                        ) -> jax.Array:
        """Tokens [..., T, D] attend to image tokens (keys image_k, values image_v
        [..., S, D]; leading dims broadcast) -> [..., T, D]. Equals `self(tokens, image_k,
        image_v)`."""
        h, c, d = self.num_heads, self.internal_dim, self.embed_dim
        t, s = tokens.shape[-2], image_k.shape[-2]
        images, prompts = _num_pairs(tokens, image_k)
        project_image = 2 * images * s * d * c + 2 * prompts * t * s * c
        carry_tokens = 2 * prompts * h * t * s * d
        if project_image <= carry_tokens:
            return self(tokens, image_k, image_v)
        # q . (W_k^T x_s + b_k) = (W_k q) . x_s + const over s: the key bias drops from softmax.
        q = _split_heads(self.q_proj(tokens) * self.head_dim**-0.5, h)  # [..., H, T, C/H]
        wk, _ = self._head_kernel(self.k_proj)
        qk = jnp.einsum("...htc,dhc->...htd", q, wk)
        qk = qk.reshape(*qk.shape[:-3], h * t, d)
        # Logits [..., S, H*T] read the image tokens in their own layout (no transposed copy).
        logits = image_k.astype(qk.dtype) @ jnp.swapaxes(qk, -1, -2)
        # Weights sum to 1: sum_s w_s (W_v^T x_s + b_v) = W_v^T (sum_s w_s x_s) + b_v.
        mixed = softmax_matmul(logits, image_v.astype(qk.dtype), keys_first=True)
        mixed = mixed.reshape(*mixed.shape[:-2], h, t, d)
        wv, bv = self._head_kernel(self.v_proj)
        out = jnp.einsum("...htd,dhc->...thc", mixed, wv) + bv
        return self.out_proj(out.reshape(*out.shape[:-2], c))

    def image_to_tokens(self, image_q: jax.Array, tokens_k: jax.Array, tokens_v: jax.Array,
                        key_bias: jax.Array | None = None) -> jax.Array:
        """Image tokens [..., S, D] attend to tokens (keys tokens_k, values tokens_v
        [..., T, D]; leading dims broadcast) -> [..., S, D]; key_bias [..., T] is added to the
        logits. Equals `self(image_q, tokens_k, tokens_v, key_bias)`."""
        weights, values, bias = self.image_to_tokens_factors(image_q, tokens_k, tokens_v,
                                                             key_bias)
        return weights @ values + bias

    def image_to_tokens_factors(self, image_q: jax.Array, tokens_k: jax.Array,
                                tokens_v: jax.Array, key_bias: jax.Array | None = None,
                                ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """`image_to_tokens` as (weights [..., S, H*T], values [..., H*T, D], bias [D]) with
        output weights @ values + bias: the attention weights of every head and token, and
        each token's value carried through its head's slice of the output projection."""
        h, c, d = self.num_heads, self.internal_dim, self.embed_dim
        t, s = tokens_k.shape[-2], image_q.shape[-2]
        k = _split_heads(self.k_proj(tokens_k) * self.head_dim**-0.5, h)  # [..., H, T, C/H]
        v = _split_heads(self.v_proj(tokens_v), h)
        images, prompts = _num_pairs(tokens_k, image_q)
        if images * s * d * c + prompts * s * t * c <= prompts * h * t * s * d:
            q = _split_heads(self.q_proj(image_q), h)  # [..., H, S, C/H]
            logits = jnp.swapaxes(q @ jnp.swapaxes(k, -1, -2), -2, -3)  # [..., S, H, T]
        else:
            # q[s, h] . k[h, t] = x_s . (W_q,h k[h, t]) + b_q,h . k[h, t]
            wq, bq = self._head_kernel(self.q_proj)
            qk = jnp.einsum("dhc,...htc->...dht", wq, k)
            qk = qk.reshape(*qk.shape[:-2], h * t)
            logits = image_q.astype(qk.dtype) @ qk + jnp.einsum(
                "hc,...htc->...ht", bq, k).reshape(*k.shape[:-3], 1, h * t)
            logits = logits.reshape(*logits.shape[:-1], h, t)
        if key_bias is not None:
            logits = logits + key_bias[..., None, None, :].astype(logits.dtype)
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        # Values carried through the output projection: [..., H, T, D], one matmul per prompt.
        wo, bo = self.out_proj.weights()
        values = jnp.einsum("...htc,hcd->...htd", v, wo.reshape(h, self.head_dim, d))
        values = values.reshape(*values.shape[:-3], h * t, d)
        return weights.reshape(*weights.shape[:-2], h * t), values, bo


class TwoWayBlock(nn.Module):
    """One layer: token self-attention, token->image, MLP, image->token attention."""

    embed_dim: int
    num_heads: int
    mlp_dim: int
    downsample_rate: int
    add_query_pe: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, queries, keys, query_pe, key_pe, token_log_weight=None, factored=None):
        """Returns (queries, keys, factored): `factored` (a LowRankTokens equal to the input
        keys, or None) is carried through this layer's update of the keys."""
        d, h, dt = self.embed_dim, self.num_heads, self.dtype
        cross_dim = d // self.downsample_rate
        if self.add_query_pe:
            queries = queries + query_pe
        attn = Attention(d, d, h, dt, name="self_attn")(queries, queries, queries,
                                                         token_log_weight)
        queries = layer_norm(DECODER_LN_EPS, dt, "norm1")(queries + attn)
        attn = Attention(d, cross_dim, h, dt, name="cross_attn_token_to_image").tokens_to_image(
            queries + query_pe, keys + key_pe, keys)
        queries = layer_norm(DECODER_LN_EPS, dt, "norm2")(queries + attn)
        mlp = Mlp((self.mlp_dim,), d, dt, name="mlp")(queries)
        queries = layer_norm(DECODER_LN_EPS, dt, "norm3")(queries + mlp)
        mix, rows, offset = Attention(
            d, cross_dim, h, dt, name="cross_attn_image_to_token").image_to_tokens_factors(
            keys + key_pe, queries + query_pe, queries, token_log_weight)
        norm = layer_norm(DECODER_LN_EPS, dt, "norm4")
        keys, rstd = norm(keys + (mix @ rows + offset), return_rstd=True)
        if factored is not None:
            p = norm.variables["params"]
            factored = factored.add(mix, rows, offset).layer_norm(
                rstd, p["scale"].astype(dt), p["bias"].astype(dt))
        return queries, keys, factored


class TwoWayTransformer(nn.Module):
    """queries [..., T, D] tokens, keys [..., S, D] image tokens (leading dims broadcast:
    keys may be shared by all prompts of an image), key_pe [S, D]; token_log_weight [T]
    (optional): log of how many identical tokens each token stands for; outputs (optional):
    indices of the tokens to return (the others skip the final attention).

    Returns (queries [..., len(outputs) or T, D], keys [..., S, D], factored): with
    `factored_keys=True`, `factored` is the output keys as a `LowRankTokens` (for linear maps
    that are cheaper on its pieces), else None.
    """

    embed_dim: int
    depth: int
    num_heads: int
    mlp_dim: int
    downsample_rate: int = 2
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, queries, keys, key_pe, token_log_weight=None, outputs=None,
                 factored_keys=False):
        query_pe = queries
        factored = LowRankTokens.of(keys) if factored_keys else None
        for i in range(self.depth):
            queries, keys, factored = TwoWayBlock(
                self.embed_dim, self.num_heads, self.mlp_dim, self.downsample_rate,
                add_query_pe=i > 0, dtype=self.dtype, name=f"layers_{i}",
            )(queries, keys, query_pe, key_pe, token_log_weight, factored)
        # The final attention updates each token on its own: unwanted tokens skip it.
        if outputs is not None:
            queries, query_pe = (jnp.take(x, np.asarray(outputs), axis=-2)
                                 for x in (queries, query_pe))
        attn = Attention(self.embed_dim, self.embed_dim // self.downsample_rate, self.num_heads,
                         self.dtype, name="final_attn_token_to_image").tokens_to_image(
            queries + query_pe, keys + key_pe, keys)
        queries = layer_norm(DECODER_LN_EPS, self.dtype, "norm_final_attn")(queries + attn)
        return queries, keys, factored
