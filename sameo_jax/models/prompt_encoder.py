"""EfficientSAM prompt encoder: points and box corners -> sparse tokens; dense positional
encoding of the embedding grid."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from sameo_jax.models.config import EfficientSamConfig
from sameo_jax.preprocessing import (
    BOX_BOTTOM_RIGHT_LABEL,
    BOX_TOP_LEFT_LABEL,
    PADDING_LABEL,
    POSITIVE_POINT_LABEL,
)


def random_fourier_pe(coords: jax.Array, gaussian_matrix: jax.Array) -> jax.Array:
    """[..., 2] coordinates in [0, 1] -> [..., 2 * F] features: concat(sin z, cos z),
    z = 2 pi (2 c - 1) @ G, G [2, F]."""
    z = (2.0 * coords - 1.0) @ gaussian_matrix.astype(jnp.float32)
    z = 2.0 * jnp.pi * z
    return jnp.concatenate([jnp.sin(z), jnp.cos(z)], axis=-1)


class PromptEncoder(nn.Module):
    """Sparse prompt tokens and the dense positional encoding, in float32."""

    config: EfficientSamConfig

    def setup(self):
        d = self.config.embed_dim
        normal = nn.initializers.normal(1.0)
        # A fixed random projection (a buffer in the original): frozen with the encoder.
        self.gaussian_matrix = self.param("gaussian_matrix", normal, (2, d // 2))
        self.invalid_points = self.param("invalid_points", normal, (1, d))
        self.point_embeddings = self.param("point_embeddings", normal, (1, d))
        self.bbox_top_left_embeddings = self.param("bbox_top_left_embeddings", normal, (1, d))
        self.bbox_bottom_right_embeddings = self.param(
            "bbox_bottom_right_embeddings", normal, (1, d))

    def __call__(self, points: jax.Array, labels: jax.Array) -> jax.Array:
        """points [..., P, 2] in the model-input frame, labels [..., P] -> [..., P, D].

        Every point keeps its positional encoding (padding points too, at (-1, -1)); labels
        add -1 invalid, 1 point, 2 box top-left, 3 box bottom-right embeddings; 0 (negative
        point) adds nothing.
        """
        size = float(self.config.img_size)
        coords = (points.astype(jnp.float32) + 0.5) / size
        pe = random_fourier_pe(coords, self.gaussian_matrix)
        lab = labels[..., None]
        pe = pe + jnp.where(lab == PADDING_LABEL, self.invalid_points, 0.0)
        pe = pe + jnp.where(lab == POSITIVE_POINT_LABEL, self.point_embeddings, 0.0)
        pe = pe + jnp.where(lab == BOX_TOP_LEFT_LABEL, self.bbox_top_left_embeddings, 0.0)
        return pe + jnp.where(lab == BOX_BOTTOM_RIGHT_LABEL, self.bbox_bottom_right_embeddings, 0.0)

    def dense_pe(self) -> jax.Array:
        """[E, E, D] positional encoding of the embedding grid (pixel centres)."""
        e = self.config.embedding_size
        centres = (jnp.arange(e, dtype=jnp.float32) + 0.5) / e
        grid = jnp.stack(jnp.meshgrid(centres, centres, indexing="xy"), axis=-1)  # [y, x, (x, y)]
        return random_fourier_pe(grid, self.gaussian_matrix)
