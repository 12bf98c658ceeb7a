"""Shared test settings: where ../shared lives (env SAMEO_SHARED, default ../shared), one
JAX compilation cache for the session's processes, and XLA flags for small programs."""

import atexit
import os
import pathlib
import shutil
import tempfile

import numpy as np
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

# Many tests compile the same small programs, in this process and in the train.py /
# evaluate.py processes they start: a persistent cache, new for each session and removed
# after it, compiles each once. Set before JAX is imported; subprocesses inherit it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="sameo-tests-jax-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ.update(JAX_COMPILATION_CACHE_DIR=_cache,
                      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


# Test programs are small: LLVM's optimisations would cost more compile time than they save.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = " ".join(
        [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]).strip()


def xla_flags(*flags: str) -> str:
    """This session's XLA_FLAGS with `flags` added (for the processes tests start)."""
    return " ".join([os.environ.get("XLA_FLAGS", ""), *flags]).strip()


def shared_path() -> pathlib.Path:
    """The shared reference folder: $SAMEO_SHARED, else ../shared next to the repo."""
    value = os.environ.get("SAMEO_SHARED", "../shared")
    path = pathlib.Path(value)
    if not path.is_absolute():
        path = (REPO_ROOT / path).resolve()
    return path


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
    path = shared_path()
    if not (path / "reference").is_dir():
        pytest.fail(f"reference folder not found under {path}; set SAMEO_SHARED")
    return path


@pytest.fixture(scope="session")
def reference_dir(shared_dir) -> pathlib.Path:
    return shared_dir / "reference"


def _script_loader(folder_name: str):
    """Imports a script of `folder_name`/ by name (the folder is not a package)."""
    import importlib
    import sys

    folder = str(pathlib.Path(__file__).resolve().parents[1] / folder_name)

    def load(name: str):
        sys.path.insert(0, folder)
        try:
            return importlib.import_module(name)
        finally:
            sys.path.remove(folder)

    return load


@pytest.fixture(scope="session")
def benchmark_module():
    return _script_loader("benchmarks")


@pytest.fixture(scope="session")
def tool_module():
    return _script_loader("tools")


def random_params(config, seed=0):
    """Random params of `config`'s shapes, drawn in numpy (faster than tracing the init)."""
    import jax

    from sameo_jax.model_io import param_shapes

    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = str(path[-1])
        if "scale" in name:
            return np.ones(leaf.shape, leaf.dtype)
        if "bias" in name:
            return np.zeros(leaf.shape, leaf.dtype)
        return (rng.standard_normal(leaf.shape) * 0.05).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, param_shapes(config))


# The longest modules first: two pytest-xdist processes (by file) then end together.
_LONGEST_FIRST = ("test_distributed.py", "test_training.py", "test_train_step.py",
                  "test_damaged_checkpoints.py", "test_model_parity.py", "test_predictor.py")


def pytest_collection_modifyitems(items):
    rank = {name: k for k, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable within a module
