"""sameo-jax: SAMEO amodal instance segmentation (EfficientSAM in JAX/Flax)."""

__version__ = "0.1.0"
