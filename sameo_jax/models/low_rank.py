"""Image tokens as a map shared by all prompts of an image plus a per-prompt low-rank sum.

In the two-way transformer every prompt gets its own copy of the image tokens at its first
image->token update, but the copy differs from the shared embedding only by rank-(heads x
tokens) updates and by LayerNorms, which centre and scale each token. Written as

    x[..., s, :] = scale[..., s] * base[..., s, :] + mix[..., s, :] @ rows[..., :, :] + offset

a linear map W then costs one [S, D] x [D, out] product per image (on `base`) plus a
[S, K] x [K, out] product per prompt, with K = 2 x (heads x tokens + 1) = 130 for a box
prompt after the decoder's two layers, instead of [S, D] x [D, out] per prompt. The mask
decoder's first transposed convolution (D = 256 -> 4 x 64 outputs per token) costs half as
much this way. Only the order of the sums changes.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


def _centre(x: jax.Array) -> jax.Array:
    return x - x.mean(axis=-1, keepdims=True)


def _concat(a: jax.Array | None, b: jax.Array, axis: int) -> jax.Array:
    """Concatenate along `axis` after broadcasting the leading dims (a may be None)."""
    if a is None:
        return b
    lead = jnp.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    a = jnp.broadcast_to(a, lead + a.shape[-2:])
    b = jnp.broadcast_to(b, lead + b.shape[-2:])
    return jnp.concatenate([a, b], axis=axis)


@flax.struct.dataclass
class LowRankTokens:
    """Tokens [..., S, D] as `scale * base + mix @ rows + offset` (leading dims broadcast).

    base [..., S, D] (typically shared: leading dims of 1), scale [..., S] or None (1),
    mix [..., S, K] and rows [..., K, D] or both None (K = 0), offset [..., D].
    """

    base: jax.Array
    scale: jax.Array | None
    mix: jax.Array | None
    rows: jax.Array | None
    offset: jax.Array

    @classmethod
    def of(cls, x: jax.Array) -> LowRankTokens:
        """Plain tokens [..., S, D]."""
        return cls(x, None, None, None, jnp.zeros(x.shape[-1], x.dtype))

    def add(self, mix: jax.Array, rows: jax.Array, offset: jax.Array) -> LowRankTokens:
        """+ mix [..., S, k] @ rows [..., k, D] + offset [..., D]."""
        return self.replace(mix=_concat(self.mix, mix, -1), rows=_concat(self.rows, rows, -2),
                            offset=self.offset + offset)

    def layer_norm(self, rstd: jax.Array, gamma: jax.Array, beta: jax.Array) -> LowRankTokens:
        """LayerNorm over D given each token's 1 / sqrt(var + eps) (rstd [..., S]) and the
        affine gamma, beta [D]. The mean is linear, so it is taken out of each piece; the
        offset, now multiplied by rstd, becomes one more rank-1 term."""
        rstd = rstd.astype(self.base.dtype)
        const = (_centre(self.offset) * gamma)[..., None, :]
        rows = const if self.rows is None else _concat(_centre(self.rows) * gamma, const, -2)
        mix = rstd[..., None] if self.mix is None else _concat(
            self.mix * rstd[..., None], rstd[..., None], -1)
        return LowRankTokens(
            base=_centre(self.base) * gamma,
            scale=rstd if self.scale is None else self.scale * rstd,
            mix=mix, rows=rows, offset=jnp.broadcast_to(beta, self.offset.shape))

    def linear(self, kernel: jax.Array, bias: jax.Array) -> LowRankTokens:
        """x @ kernel [D, F] + bias [F], applied to the pieces."""
        return LowRankTokens(
            base=self.base @ kernel, scale=self.scale, mix=self.mix,
            rows=None if self.rows is None else self.rows @ kernel,
            offset=self.offset @ kernel + bias)

    def dense(self) -> jax.Array:
        """The tokens themselves, [..., S, D]."""
        x = self.base if self.scale is None else self.scale[..., None] * self.base
        if self.mix is not None:
            x = x + self.mix @ self.rows
        return x + self.offset[..., None, :]
