"""A bad command line ends train.py with one `error:` line naming the flag, file or key (and
the closest valid key), before any training starts."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("args, wanted", [
    (["--config=configs/sameo.py:demo", "--config.lrr=1"],
     "--config.lrr: no such key in the config; did you mean --config.lr?"),
    (["--config=configs/sameo.py:demo", "--config.data.sourcs=('demo',)"],
     "--config.data.sourcs: no such key in the config; did you mean --config.data.sources?"),
    (["--config=configs/sameo.py:vitx"], "unknown config variant 'vitx'"),
    (["--config=no_such_config.py"], "--config: [Errno 2] No such file or directory"),
    (["--config=configs/sameo.py:demo", "--config.total_steps=1.5"],
     "--config.total_steps=1.5"),
])
def test_bad_command_line_is_one_error_line(tmp_path, args, wanted):
    done = subprocess.run(
        [sys.executable, "train.py", *args, f"--workdir={tmp_path / 'w'}"], cwd=ROOT,
        capture_output=True, text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-1500:]
    assert wanted in lines[0]
    assert not (tmp_path / "w").exists()
