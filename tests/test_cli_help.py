"""What a newcomer sees of the command-line tools: --help lists each tool's variants and
examples, predict.py prints results and no library chatter, train.py ends with what to run
next."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO_ROOT

ABSL_INFO = re.compile(r"^I\d{4} ", re.MULTILINE)  # absl's INFO line prefix (I + month day)


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=timeout,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})


@pytest.mark.parametrize("cli, wanted", [
    ("train.py", ["demo (", "vitt, vits", "python train.py --config configs/sameo.py:demo",
                  "--config.init_checkpoint="]),
    ("evaluate.py", ["--split demo", "--detections detector.json", "--results results.json",
                     "cocoa_cls", "kins", "d2sa"]),
    ("predict.py", ["--variant (vitt, vits, tiny)", "efficient_sam_vits.pt.zip", "workdir_demo",
                    "photo.jpg \\\n      --prompts prompts.json"]),
])
def test_help_lists_variants_and_examples(cli, wanted):
    run = _run(cli, "--help")  # absl prints the help and exits with status 1
    assert run.returncode in (0, 1) and not run.stderr, run.stderr[-1000:]
    for text in wanted:
        assert text in run.stdout, (text, run.stdout[:1500])


def test_weights_help_lists_variants_and_examples():
    run = _run("-m", "sameo_jax.weights", "--help")
    assert run.returncode == 0
    for text in ("{vits,vitt}", "python -m sameo_jax.weights vitt weights",
                 "efficient_sam_vits.pt.zip", "Without internet"):
        assert text in run.stdout


def test_predict_prints_results_and_no_info_lines(tmp_path):
    import jax

    from sameo_jax.model_io import save_params
    from sameo_jax.models.config import model_config
    from sameo_jax.models.efficient_sam import param_shapes

    config = model_config("tiny")
    params = jax.tree.map(lambda s: np.full(s.shape, 0.01, s.dtype), param_shapes(config))
    ckpt = save_params(params, tmp_path / "ckpt", config)
    Image.fromarray(np.full((40, 60, 3), 90, np.uint8)).save(tmp_path / "photo.png")
    (tmp_path / "prompts.json").write_text(json.dumps([{"box": [5, 5, 30, 30]}]))
    run = _run("predict.py", "--checkpoint", str(ckpt), "--image", str(tmp_path / "photo.png"),
               "--prompts", str(tmp_path / "prompts.json"))
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith("query 0: predicted IoU [")
    assert not ABSL_INFO.search(run.stdout + run.stderr), (run.stdout + run.stderr)[:2000]


def test_train_py_says_where_the_checkpoint_is_and_what_to_run_next():
    sys.path.insert(0, str(REPO_ROOT))
    try:
        import train
        from configs.sameo import get_config
    finally:
        sys.path.remove(str(REPO_ROOT))

    text = train.next_steps(get_config("demo"), "workdir_demo", 1000)
    assert text.splitlines() == [
        "checkpoint: workdir_demo/checkpoints (step 1000)",
        "next:",
        "  python evaluate.py --split demo --checkpoint workdir_demo --visualize 8",
        "  python predict.py --checkpoint workdir_demo --image IMAGE --prompts PROMPTS.json "
        "--overlay out.png",
    ]
    config = get_config("vitt")
    config.data.sources, config.data.data_dir = ("kins", "cocoa"), "data"
    assert "python evaluate.py --split kins --data_dir data --checkpoint w " in train.next_steps(
        config, "w", 5)
