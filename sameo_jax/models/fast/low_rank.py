"""Image tokens as a map shared by all prompts of an image plus a per-prompt low-rank sum.

In the two-way transformer every prompt gets its own copy of the image tokens at its first
image->token update, but the copy differs from the shared embedding only by rank-(heads x
tokens) updates and by LayerNorms, which centre each token and scale it by a number. Written as

    x[..., s, :] = scale[..., s] * base[..., s, :]
                   + sum_j coef_j[..., s] * (mix_j[..., s, :] @ rows_j[..., :, :]) + offset

a linear map W costs one [S, D] x [D, out] product per image (on `base`) plus, per prompt, a
[S, k_j] x [k_j, out] product for each term (k = heads x tokens = 64 for a box prompt) instead
of [S, D] x [D, out]: (1/q + k/D) of the work for q prompts of an image, with k = 128 after
the decoder's two layers and D = 256 for the first transposed convolution (0.75 at the
decoder's chunks of 4 prompts). Only the order of the sums changes. The
per-token coefficients multiply the products' outputs, so the mixes (attention weights) are
used as they come: no scaled or concatenated copy of them is written.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


def _centre(x: jax.Array) -> jax.Array:
    return x - x.mean(axis=-1, keepdims=True)


def _times(coef: jax.Array | None, factor: jax.Array) -> jax.Array:
    return factor if coef is None else coef * factor


@flax.struct.dataclass
class Term:
    """coef[..., s] * (mix[..., s, :] @ rows) with mix [..., S, k] and rows [..., k, D], or
    coef[..., s] * rows with mix None and rows [..., D] (a rank-1 term). coef None means 1."""

    coef: jax.Array | None
    mix: jax.Array | None
    rows: jax.Array

    def value(self) -> jax.Array:
        """[..., S, D]"""
        x = self.rows[..., None, :] if self.mix is None else self.mix @ self.rows
        return x if self.coef is None else self.coef[..., None] * x


@flax.struct.dataclass
class LowRankTokens:
    """Tokens [..., S, D] as `scale * base + sum(terms) + offset` (leading dims broadcast).

    base [..., S, D] (typically shared by the prompts: leading dims of 1), scale [..., S] or
    None (1), terms: `Term`s, offset [D].
    """

    base: jax.Array
    scale: jax.Array | None
    terms: tuple[Term, ...]
    offset: jax.Array

    @classmethod
    def of(cls, x: jax.Array) -> LowRankTokens:
        """Plain tokens [..., S, D]."""
        return cls(x, None, (), jnp.zeros(x.shape[-1], x.dtype))

    def add(self, mix: jax.Array, rows: jax.Array, offset: jax.Array) -> LowRankTokens:
        """+ mix [..., S, k] @ rows [..., k, D] + offset [D]."""
        return self.replace(terms=(*self.terms, Term(None, mix, rows)),
                            offset=self.offset + offset)

    def layer_norm(self, rstd: jax.Array, gamma: jax.Array, beta: jax.Array) -> LowRankTokens:
        """LayerNorm over D given each token's 1 / sqrt(var + eps) (rstd [..., S]) and the
        affine gamma, beta [D]. The mean is linear, so it is taken out of each piece; the
        offset, now multiplied by rstd, becomes a rank-1 term."""
        rstd = rstd.astype(self.base.dtype)
        terms = tuple(Term(_times(t.coef, rstd), t.mix, _centre(t.rows) * gamma)
                      for t in self.terms)
        return LowRankTokens(
            base=_centre(self.base) * gamma, scale=_times(self.scale, rstd),
            terms=(*terms, Term(rstd, None, _centre(self.offset) * gamma)), offset=beta)

    def linear(self, kernel: jax.Array, bias: jax.Array) -> LowRankTokens:
        """x @ kernel [D, F] + bias [F], applied to the pieces."""
        return LowRankTokens(
            base=self.base @ kernel, scale=self.scale,
            terms=tuple(t.replace(rows=t.rows @ kernel) for t in self.terms),
            offset=self.offset @ kernel + bias)

    def dense(self) -> jax.Array:
        """The tokens themselves, [..., S, D]."""
        x = self.base if self.scale is None else self.scale[..., None] * self.base
        for t in self.terms:
            x = x + t.value()
        return x + self.offset
