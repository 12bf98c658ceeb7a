"""sameo_jax.weights: the official URLs, and a download that never leaves a truncated file
or replaces one the user has (exercised with file:// URLs; no network needed)."""

import subprocess
import sys

import pytest

from sameo_jax import weights
from tests.conftest import REPO_ROOT


def test_official_urls_name_the_files_the_converter_reads():
    assert weights.file_name(weights.OFFICIAL_WEIGHTS["vitt"]) == "efficient_sam_vitt.pt"
    assert weights.file_name(weights.OFFICIAL_WEIGHTS["vits"]) == "efficient_sam_vits.pt.zip"
    for url in (*weights.OFFICIAL_WEIGHTS.values(), weights.SAMPLE_IMAGE):
        assert url.startswith("https://github.com/yformer/EfficientSAM/raw/main/")


def test_download_copies_the_file_and_keeps_an_existing_one(tmp_path, capsys):
    source = tmp_path / "source.bin"
    payload = bytes(range(256)) * 5000  # more than one read chunk
    source.write_bytes(payload)
    target = tmp_path / "out" / "model.pt"
    assert weights.download(source.as_uri(), target, progress=False) == target
    assert target.read_bytes() == payload
    assert not (tmp_path / "out" / "model.pt.part").exists()
    target.write_bytes(b"the user's own file")
    weights.download(source.as_uri(), target, progress=False)
    assert target.read_bytes() == b"the user's own file"
    assert "exists; using it" in capsys.readouterr().out


def test_failed_download_names_the_url_and_leaves_nothing(tmp_path):
    missing = (tmp_path / "missing.pt").as_uri()
    with pytest.raises(OSError, match="cannot download .*missing.pt.*without internet"):
        weights.download(missing, tmp_path / "w" / "x.pt", progress=False)
    assert list((tmp_path / "w").iterdir()) == []
    with pytest.raises(ValueError, match="no official weights for variant 'tiny'"):
        weights.official_weights("tiny", tmp_path)


def test_command_line_error_is_one_line(tmp_path):
    """Without internet (or with a bad URL) the command ends with one error: line."""
    cmd = [sys.executable, "-c",
           "import sys; from sameo_jax import weights; "
           f"weights.OFFICIAL_WEIGHTS['vitt'] = {(tmp_path / 'gone.pt').as_uri()!r}; "
           "weights.main(sys.argv[1:])", "vitt", str(tmp_path / "w")]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot download file://")
