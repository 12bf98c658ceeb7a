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
    from sameo_jax.model_io import load_model
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


def _imported_modules(path):
    import ast

    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


@pytest.mark.parametrize("folder, forbidden", [
    ("sameo_jax", ("datasets",)),  # run time never reaches into build-time code
    ("sameo_jax/data", ("sameo_jax.models", "sameo_jax.training", "sameo_jax.evaluation")),
    ("sameo_jax/models", ("sameo_jax.data", "sameo_jax.training", "sameo_jax.evaluation",
                          "sameo_jax.predictor", "sameo_jax.model_io")),
    ("sameo_jax/evaluation", ("sameo_jax.training",)),
])
def test_layering(folder, forbidden):
    bad = []
    for path in sorted((REPO_ROOT / folder).rglob("*.py")):
        for name in _imported_modules(path):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                bad.append(f"{path.relative_to(REPO_ROOT)} imports {name}")
    assert not bad, bad
