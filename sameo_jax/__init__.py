"""sameo-jax: SAMEO amodal instance segmentation (EfficientSAM in JAX/Flax).

    import sameo_jax
    predictor = sameo_jax.Predictor.from_checkpoint("efficient_sam_vitt.pt")
    predictor.set_image(image)                           # [H, W, 3] uint8 RGB
    masks = predictor.predict(boxes=[[x0, y0, x1, y1]], best_only=True).masks

    config, params = sameo_jax.load_model("efficient_sam_vitt.pt")   # or an orbax directory
    model = sameo_jax.EfficientSam(config)               # or sameo_jax.model_config("vitt")

The names below are imported on first use, so `import sameo_jax` does not start JAX.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "EfficientSam": "sameo_jax.models.efficient_sam",
    "model_config": "sameo_jax.models.config",
    "Predictor": "sameo_jax.predictor",
    "load_model": "sameo_jax.model_io",
}

__all__ = ["EfficientSam", "Predictor", "__version__", "load_model", "model_config"]

if TYPE_CHECKING:
    from sameo_jax.model_io import load_model
    from sameo_jax.models.config import model_config
    from sameo_jax.models.efficient_sam import EfficientSam
    from sameo_jax.predictor import Predictor


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sameo_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
