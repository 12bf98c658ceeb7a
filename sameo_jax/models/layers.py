"""Small building blocks shared by the EfficientSAM modules."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, x * (1 + erf(x / sqrt 2)) / 2, the formula of torch.nn.GELU().

    flax/jax default to the tanh approximation; jax's exact form goes through erfc, which
    XLA's CPU backend evaluates more slowly than erf.
    """
    return 0.5 * x * (1.0 + jax.lax.erf(x * np.asarray(np.sqrt(0.5), x.dtype)))


class LayerNorm(nn.Module):
    """LayerNorm over the last axis with torch's formula (biased variance of the centred
    input; statistics in float32) and nn.LayerNorm's parameters {'scale', 'bias'}."""

    epsilon: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, return_rstd: bool = False):
        """x [..., D] -> normalised x, and with `return_rstd` also 1 / sqrt(var + eps) [...]
        (float32; the fast decoder's factored tokens use it)."""
        d = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (d,))
        bias = self.param("bias", nn.initializers.zeros, (d,))
        x = x.astype(jnp.float32)
        centred = x - x.mean(axis=-1, keepdims=True)
        rstd = jax.lax.rsqrt(jnp.square(centred).mean(axis=-1) + self.epsilon)
        y = (centred * (rstd[..., None] * scale) + bias).astype(self.dtype)
        return (y, rstd) if return_rstd else y


def layer_norm(eps: float, dtype: Any, name: str | None = None) -> LayerNorm:
    """LayerNorm over the last axis with torch's biased-variance formula."""
    return LayerNorm(epsilon=eps, dtype=dtype, name=name)


def softmax_matmul(logits: jax.Array, values: jax.Array, keys_first: bool = False,
                   ) -> jax.Array:
    """softmax(logits) @ values: logits [..., T, S], values [..., S, C] -> [..., T, C].

    keys_first: logits come as [..., S, T] (softmax over S, the second-last axis), the layout
    of a product that reads many keys in their own [..., S, D] layout.
    The softmax runs in float32 and is normalised after the product: dividing the [T, C]
    result by the row sums saves a pass over the [T, S] weights (the same function, rounded
    differently in the last bits).
    """
    axis = -2 if keys_first else -1
    logits = logits.astype(jnp.float32)
    exp = jnp.exp(logits - jax.lax.stop_gradient(logits.max(axis=axis, keepdims=True)))
    sums = exp.sum(axis=axis, keepdims=True)
    exp = exp.astype(values.dtype)
    if keys_first:
        out = jnp.einsum("...st,...sc->...tc", exp, values)
        sums = jnp.swapaxes(sums, -1, -2)
    else:
        out = exp @ values
    return (out.astype(jnp.float32) / sums).astype(values.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, num_heads: int,
              query_chunk: int | None = None, key_bias: jax.Array | None = None) -> jax.Array:
    """Multi-head attention on projected inputs.

    q [..., T, D], k [..., S, D], v [..., S, D] -> [..., T, D] (leading dims broadcast).
    Heads are contiguous chunks of D; logits are scaled by 1 / sqrt(D / num_heads);
    softmax over keys in float32 (`softmax_matmul`). Heads are moved in front of the token
    axis before the two matmuls: XLA's CPU backend runs that layout faster than a head-inner
    einsum.

    query_chunk: when set and dividing T, queries are processed `query_chunk` at a time
    (`lax.map`), so each chunk's [H, chunk, S] logits stay in cache; rows of a softmax are
    independent, so the result is the same.
    key_bias: [..., S], added to every head's logits (e.g. the log-multiplicity of a key
    that stands for several identical ones).
    """
    t = q.shape[-2]
    if query_chunk is not None and t > query_chunk and t % query_chunk == 0:
        chunks = jnp.moveaxis(q.reshape(*q.shape[:-2], t // query_chunk, query_chunk,
                                        q.shape[-1]), -3, 0)
        out = jax.lax.map(lambda qc: attention(qc, k, v, num_heads, key_bias=key_bias), chunks)
        return jnp.moveaxis(out, 0, -3).reshape(q.shape)
    d = q.shape[-1]
    hd = d // num_heads

    def heads(x: jax.Array) -> jax.Array:  # [..., S, D] -> [..., H, S, D/H]
        return jnp.swapaxes(x.reshape(*x.shape[:-1], num_heads, hd), -2, -3)

    logits = heads(q * (hd**-0.5)) @ jnp.swapaxes(heads(k), -1, -2)
    if key_bias is not None:
        logits = logits + key_bias[..., None, None, :].astype(logits.dtype)
    out = jnp.swapaxes(softmax_matmul(logits, heads(v)), -2, -3)  # [..., T, H, D/H]
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
