"""EfficientSAM model configuration: one definition, named variants."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

DECODER_IMPLS = ("fast", "reference")
# Rematerialisation policies of the decoder's backward pass, by name ("" : none).
REMAT_POLICIES = ("", "nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable",
                  "everything_saveable")


@dataclasses.dataclass(frozen=True)
class EfficientSamConfig:
    """Sizes of an EfficientSAM model. `vitt` / `vits` are the official ones."""

    img_size: int = 1024
    patch_size: int = 16
    encoder_width: int = 192
    encoder_depth: int = 12
    encoder_heads: int = 3
    mlp_ratio: float = 4.0
    pos_embed_grid: int = 14  # pretraining grid (224 px / 16), resized to the token grid
    embed_dim: int = 256  # neck output and decoder width
    decoder_depth: int = 2
    decoder_heads: int = 8
    decoder_mlp_dim: int = 2048
    attention_downsample_rate: int = 2  # cross attentions use embed_dim // 2 inside
    num_multimask_outputs: int = 3
    iou_head_hidden: int = 256
    max_num_points: int = 6
    dtype: str = "float32"  # compute dtype; parameters stay float32
    # Encoder attention queries per chunk (0: all at once): same result, logits stay in cache.
    encoder_attention_chunk: int = 256
    # Mask decoder: "fast" (models/fast/) or "reference" (the paper's form); same parameters.
    decoder_impl: str = "fast"
    # Fast decoder: prompts of an image per chunk (0: all at once), so their tokens stay in cache.
    decoder_prompt_chunk: int = 4
    # Fast decoder: first upscale on factored tokens when that is less work (not in training).
    factored_upscale: bool = True
    # Decoder backward: recompute the per-prompt maps under this jax.checkpoint policy ("" :
    # keep them). Fast: per loop step of a chunk (or all) of an image's prompts; reference:
    # per two-way block.
    decoder_remat: str = ""

    def __post_init__(self):
        if self.decoder_impl not in DECODER_IMPLS:
            raise ValueError(f"EfficientSamConfig.decoder_impl={self.decoder_impl!r}; expected "
                             f"one of {DECODER_IMPLS}")
        if self.decoder_remat not in REMAT_POLICIES:
            raise ValueError(f"EfficientSamConfig.decoder_remat={self.decoder_remat!r}; "
                             f"expected one of {REMAT_POLICIES}")

    @property
    def remat_policy(self) -> Any:
        """The jax.checkpoint policy of `decoder_remat` (None when off)."""
        return getattr(jax.checkpoint_policies, self.decoder_remat, None)

    @property
    def embedding_size(self) -> int:
        """Side of the image-embedding grid (64 for 1024 px)."""
        return self.img_size // self.patch_size

    @property
    def low_res_size(self) -> int:
        """Side of the low-res mask logits (256 for 1024 px)."""
        return 4 * self.embedding_size

    @property
    def compute_dtype(self) -> Any:
        return jnp.dtype(self.dtype)

    def structure(self) -> EfficientSamConfig:
        """The config with compute-only fields (dtype, chunking, decoder implementation, remat) at
        their defaults: two configs with equal structure have interchangeable parameters."""
        defaults = {f.name: f.default for f in dataclasses.fields(EfficientSamConfig)}
        return dataclasses.replace(
            self, **{k: defaults[k] for k in ("dtype", "encoder_attention_chunk", "decoder_impl",
                                                "decoder_prompt_chunk", "factored_upscale",
                                                "decoder_remat")})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EfficientSamConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown EfficientSamConfig fields: {unknown}")
        return cls(**values)


_VARIANTS = {
    "vitt": EfficientSamConfig(encoder_width=192, encoder_heads=3),
    "vits": EfficientSamConfig(encoder_width=384, encoder_heads=6),
    # A small model for CPU demos and tests: 256 px input, 16x16 embedding, 64x64 masks.
    "tiny": EfficientSamConfig(
        img_size=256, encoder_width=64, encoder_depth=2, encoder_heads=2, embed_dim=64,
        decoder_depth=2, decoder_heads=4, decoder_mlp_dim=256, iou_head_hidden=64,
    ),
}

VARIANTS = tuple(_VARIANTS)


def model_config(variant: str, **overrides: Any) -> EfficientSamConfig:
    """The config of a named variant ('vitt', 'vits', 'tiny'), with optional field overrides."""
    if variant not in _VARIANTS:
        raise ValueError(f"unknown model variant {variant!r}; choose one of {VARIANTS}")
    return dataclasses.replace(_VARIANTS[variant], **overrides)
