"""Shared test settings: where ../shared lives (env SAMEO_SHARED, default ../shared)."""

import os
import pathlib

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


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


@pytest.fixture(scope="session")
def benchmark_module():
    """Imports a script of benchmarks/ by name (the folder is not a package)."""
    import importlib
    import sys

    folder = str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks")

    def load(name: str):
        sys.path.insert(0, folder)
        try:
            return importlib.import_module(name)
        finally:
            sys.path.remove(folder)

    return load
