"""The package's public face: a few names, imported on first use."""

import subprocess
import sys

import pytest

import sameo_jax
from tests.conftest import REPO_ROOT


def test_import_does_not_start_jax():
    code = "import sys, sameo_jax; assert 'jax' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)


def test_public_names_are_the_library_objects():
    from sameo_jax.checkpoint import load_model
    from sameo_jax.models.config import model_config
    from sameo_jax.models.efficient_sam import EfficientSam
    from sameo_jax.predictor import Predictor

    assert sameo_jax.EfficientSam is EfficientSam
    assert sameo_jax.model_config is model_config
    assert sameo_jax.Predictor is Predictor
    assert sameo_jax.load_model is load_model
    assert set(sameo_jax.__all__) <= set(dir(sameo_jax))
    assert sameo_jax.model_config("vitt").encoder_width == 192


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'Sam'"):
        sameo_jax.Sam  # noqa: B018
