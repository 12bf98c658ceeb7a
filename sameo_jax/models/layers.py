"""Small building blocks shared by the EfficientSAM modules."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, as torch.nn.GELU(); flax/jax default to the tanh approximation."""
    return jax.nn.gelu(x, approximate=False)


def layer_norm(eps: float, dtype: Any, name: str | None = None) -> nn.LayerNorm:
    """LayerNorm over the last axis with torch's biased-variance formula."""
    return nn.LayerNorm(epsilon=eps, dtype=dtype, use_fast_variance=False, name=name)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, num_heads: int,
              query_chunk: int | None = None) -> jax.Array:
    """Multi-head attention on projected inputs.

    q [..., T, D], k [..., S, D], v [..., S, D] -> [..., T, D] (leading dims broadcast).
    Heads are contiguous chunks of D; logits are scaled by 1 / sqrt(D / num_heads);
    softmax over keys in float32. Heads are moved in front of the token axis before the two
    matmuls: XLA's CPU backend runs that layout about 1.5x faster than a head-inner einsum.

    query_chunk: when set and dividing T, queries are processed `query_chunk` at a time
    (`lax.map`), so each chunk's [H, chunk, S] logits stay in cache; rows of a softmax are
    independent, so the result is the same.
    """
    t = q.shape[-2]
    if query_chunk is not None and t > query_chunk and t % query_chunk == 0:
        chunks = jnp.moveaxis(q.reshape(*q.shape[:-2], t // query_chunk, query_chunk,
                                        q.shape[-1]), -3, 0)
        out = jax.lax.map(lambda qc: attention(qc, k, v, num_heads), chunks)
        return jnp.moveaxis(out, 0, -3).reshape(q.shape)
    d = q.shape[-1]
    hd = d // num_heads

    def heads(x: jax.Array) -> jax.Array:  # [..., S, D] -> [..., H, S, D/H]
        return jnp.swapaxes(x.reshape(*x.shape[:-1], num_heads, hd), -2, -3)

    logits = heads(q * (hd**-0.5)) @ jnp.swapaxes(heads(k), -1, -2)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    out = jnp.swapaxes(weights @ heads(v), -2, -3)  # [..., T, H, D/H]
    return out.reshape(*out.shape[:-2], d)


class Mlp(nn.Module):
    """Linear -> GELU -> ... -> Linear. Hidden layers are `layers_i`, the last one `fc`."""

    hidden_dims: tuple[int, ...]
    out_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i, width in enumerate(self.hidden_dims):
            x = gelu(nn.Dense(width, dtype=self.dtype, name=f"layers_{i}")(x))
        return nn.Dense(self.out_dim, dtype=self.dtype, name="fc")(x)
