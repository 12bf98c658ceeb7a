"""The Colab notebooks run top to bottom in SMOKE mode (CPU, the synthetic official-format
weights, the tiny model, a handful of steps), and are committed without outputs.

Running them takes a few CPU minutes (ViT-T compiled and run on 4 photos, the tiny model's
training step compiled), so those tests carry the `notebooks` marker: the default run
leaves them out and CI runs them in a call of their own:

  python -m pytest -q -m notebooks tests/test_notebooks.py
"""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO_ROOT

NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("*.ipynb"))


def _outputs(nb, output_type: str | None = None):
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if output_type is None or out["output_type"] == output_type:
                yield out


def _printed(nb) -> str:
    return "".join(out["text"] for out in _outputs(nb, "stream") if out["name"] == "stdout")


def _pictures(nb) -> list[np.ndarray]:
    pngs = [out["data"]["image/png"] for out in _outputs(nb) if "image/png" in out.get("data", {})]
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(p))).convert("RGB")) for p in pngs]


def test_both_notebooks_exist():
    assert [p.name for p in NOTEBOOKS] == ["finetune_tpu.ipynb", "quickstart.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_without_outputs(path):
    nb = json.loads(path.read_text())  # plain JSON: this test needs no notebook packages
    assert nb["nbformat"] == 4
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code
    sources = ["".join(c["source"]) for c in code]
    for cell, source in zip(code, sources, strict=True):
        assert cell["outputs"] == [] and cell["execution_count"] is None, source[:60]
    # The parameter cell of the smoke mode, and Colab-only steps guarded by it.
    assert 'SMOKE = os.environ.get("SAMEO_SMOKE") == "1"' in "\n".join(sources)
    for colab_only in ("google.colab import", "!pip install"):
        for source in sources:
            if colab_only in source:
                assert "not SMOKE" in source, source[:80]


@pytest.fixture(scope="module")
def executed(tmp_path_factory, shared_dir):
    """Each notebook executed once in SMOKE mode, by name (module scope: the tests share it)."""
    import os

    import nbformat
    from nbclient import NotebookClient

    work = tmp_path_factory.mktemp("notebooks")
    env = {"SAMEO_SMOKE": "1", "SAMEO_WORK": str(work), "SAMEO_SHARED": str(shared_dir),
           "JAX_PLATFORMS": "cpu"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    runs = {}
    try:
        for path in NOTEBOOKS:
            nb = nbformat.read(path, as_version=4)
            NotebookClient(nb, timeout=600, kernel_name="python3",
                           resources={"metadata": {"path": str(REPO_ROOT)}}).execute()
            runs[path.stem] = nb
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return runs


@pytest.mark.notebooks
@pytest.mark.parametrize("name", ["quickstart", "finetune_tpu"])
def test_notebook_runs_in_smoke_mode(executed, name):
    """Ran without error (nbclient raises on any failing cell), drew pictures, printed AP."""
    nb = executed[name]
    assert not list(_outputs(nb, "error"))
    pictures = _pictures(nb)
    assert len(pictures) >= 3
    assert all(p.shape[0] >= 100 and p.shape[1] >= 100 and p.std() > 5 for p in pictures)
    printed = _printed(nb)
    aps = [float(v) for v in re.findall(r"\bAP (\d+\.\d) \(refined score\)", printed)]
    assert len(aps) == 1 and 0.0 <= aps[0] <= 100.0, printed[-2000:]


@pytest.mark.notebooks
def test_quickstart_reads_detections_and_times_the_model(executed):
    printed = _printed(executed["quickstart"])
    assert "detections.json: using 3 of 3 entries" in printed
    timing = re.search(r"cpu: image encoder (\d+) ms per photo; .* (\d+) ms for 16 boxes", printed)
    assert timing and int(timing[1]) > 0 and int(timing[2]) > 0, printed[-2000:]


@pytest.mark.notebooks
def test_finetune_resumes_from_its_checkpoint(executed):
    printed = _printed(executed["finetune_tpu"])
    assert "starting from step 0" in printed
    assert "resuming from step 6" in printed and "step 9;" in printed, printed[-2000:]
