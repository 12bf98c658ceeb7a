"""Many devices and processes: the same training and evaluation numbers as one process, and
checkpoints that move between meshes.

Runs (micro model, 8 steps, evaluation and checkpoints at steps 4 and 8):
  one     1 process, 1 device (this test process), 10 steps
  two     2 processes of 1 device on 127.0.0.1 (jax.distributed over gloo)
  eight   1 process, 8 fake devices
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from PIL import Image

from sameo_jax.evaluation.evaluator import EvalOptions, evaluate
from sameo_jax.model_io import load_model, save_params
from sameo_jax.training import loop
from tests.conftest import random_params, xla_flags
from tests.test_training import micro_config, read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS, MORE_STEPS, EVERY = 8, 10, 4
TIMEOUT = 600

DRIVER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {repo!r})
    from tests.test_distributed import run_config
    from sameo_jax.training import loop
    loop.train_and_evaluate(run_config({steps}, **{extra!r}), {workdir!r})
""")


def run_config(steps: int, **extra):
    """The runs' config: global batch 8, a log record per step, eval and checkpoints every
    EVERY steps."""
    c = micro_config(**{"total_steps": steps, "eval_every": EVERY, "checkpoint_every": EVERY,
                        **extra})
    c.data.demo_eval_examples = 12
    return c


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], devices: int = 1) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
               XLA_FLAGS=xla_flags(f"--xla_force_host_platform_device_count={devices}"))
    return subprocess.Popen([sys.executable, *args], env=env, cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def finish(procs: list[subprocess.Popen]) -> list[str]:
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=TIMEOUT)[0])
    finally:
        for p in procs:
            p.kill()
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    return outs


def train_processes(workdir: pathlib.Path, n: int, **more) -> list[subprocess.Popen]:
    extra = {"distributed": True, "coordinator_address": f"127.0.0.1:{free_port()}",
             "num_processes": n, **more}
    return [start(["-c", DRIVER.format(repo=str(REPO), steps=STEPS, workdir=str(workdir),
                                       extra={**extra, "process_id": i})]) for i in range(n)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Workdirs of the three runs, trained side by side from the same saved random weights
    (each process reads them, as a fine-tuning run reads EfficientSAM's)."""
    root = tmp_path_factory.mktemp("runs")
    dirs = {name: root / name for name in ("one", "two", "eight")}
    model_cfg = loop.build_model_config(run_config(STEPS))
    init = {"init_checkpoint": str(save_params(random_params(model_cfg), root / "init",
                                               model_cfg))}
    procs = train_processes(dirs["two"], 2, **init)
    code = DRIVER.format(repo=str(REPO), steps=STEPS, workdir=str(dirs["eight"]), extra=init)
    procs.append(start(["-c", code], devices=8))
    try:
        loop.train_and_evaluate(run_config(MORE_STEPS, **init), dirs["one"])
    finally:
        finish(procs)
    return dirs


def split(records: list[dict]) -> tuple[dict[int, float], dict[int, dict]]:
    """metrics.jsonl -> ({step: loss}, {step: eval metrics})."""
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    evals = {r["step"]: {k: v for k, v in r.items() if k.startswith("eval/")}
             for r in records if any(k.startswith("eval/") for k in r)}
    return losses, evals


def test_processes_split_one_global_stream():
    """Each global batch is cut among the processes; a start position (in examples) resumes
    the same stream under any process count and batch size; eval splits the examples."""
    from sameo_jax.data import pipeline
    from sameo_jax.data.demo_scenes import DemoSource

    sources = {"a": DemoSource(10, 64, 1), "b": DemoSource(5, 64, 2)}
    args = dict(image_size=32, mask_size=8, instances_per_image=2, mixture="uniform", seed=3)

    def batches(count, batch_size=6, start=0, process_count=1, process_index=0):
        it = pipeline.make_train_loader(sources, batch_size=batch_size, start=start,
                                        process_count=process_count,
                                        process_index=process_index, **args)
        return [next(it) for _ in range(count)]

    whole = batches(4)
    parts = [batches(4, process_count=3, process_index=i) for i in range(3)]
    for k, batch in enumerate(whole):
        for key in batch:
            np.testing.assert_array_equal(
                np.concatenate([part[k][key] for part in parts]), batch[key], err_msg=key)
    # 12 examples consumed as 2 batches of 6 = 4 batches of 3 on 3 processes; then go on.
    later = batches(1, batch_size=3, start=12)[0]
    for key in later:
        np.testing.assert_array_equal(later[key], whole[2][key][:3], err_msg=key)
    with pytest.raises(ValueError, match="does not split among 4 processes"):
        batches(1, process_count=4)

    source = DemoSource(7, 64, 4)
    kw = dict(batch_size=2, image_size=32, mask_size=8, instances_per_image=2)
    keys = [k for p in range(2)
            for b in pipeline.make_eval_loader(source, process_index=p, process_count=2, **kw)
            for k in b["image_key"] if k >= 0]
    assert sorted(set(keys)) == list(range(7))


@pytest.mark.parametrize("name", ["two", "eight"])
def test_losses_and_eval_equal_one_process(runs, name):
    one_losses, one_evals = split(read_metrics(runs["one"]))
    losses, evals = split(read_metrics(runs[name]))
    assert sorted(losses) == list(range(1, STEPS + 1))  # process 0 alone wrote, once a step
    np.testing.assert_allclose([losses[s] for s in sorted(losses)],
                               [one_losses[s] for s in sorted(losses)], rtol=1e-5)
    assert sorted(evals) == [EVERY, STEPS]
    for step in (EVERY, STEPS):
        assert evals[step].keys() == one_evals[step].keys()
        assert evals[step]["eval/demo/num_instances"] == one_evals[step]["eval/demo/num_instances"]
        for key, value in evals[step].items():
            np.testing.assert_allclose(value, one_evals[step][key], rtol=1e-6, err_msg=key)


@pytest.mark.parametrize("name", ["two", "eight"])
def test_checkpoint_resumes_on_one_device_where_the_data_left_off(runs, name, tmp_path):
    """The run's last checkpoint continues on 1 process / 1 device as if it were the
    one-process run: the data stream's global position carries over."""
    workdir = tmp_path / name
    shutil.copytree(runs[name] / "checkpoints" / str(STEPS),
                    workdir / "checkpoints" / str(STEPS))
    loop.train_and_evaluate(run_config(MORE_STEPS, eval_every=-1, async_checkpoints=False),
                            workdir)
    one_losses, _ = split(read_metrics(runs["one"]))
    resumed, _ = split(read_metrics(workdir))
    assert sorted(resumed) == list(range(STEPS + 1, MORE_STEPS + 1))
    np.testing.assert_allclose([resumed[s] for s in sorted(resumed)],
                               [one_losses[s] for s in sorted(resumed)], rtol=1e-5)


def test_predict_reads_checkpoints_of_other_meshes(runs, tmp_path):
    """predict.py (1 device) reads the 2-process and the 8-device checkpoints, and gives the
    same masks and scores from both (the runs agree up to float32 rounding)."""
    rng = np.random.default_rng(0)
    image = tmp_path / "image.png"
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), np.uint8)).save(image)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"box": [4, 6, 40, 30]}, {"box": [20, 10, 60, 44]}]))
    procs = [start(["predict.py", "--checkpoint", str(runs[name]), "--image", str(image),
                    "--prompts", str(prompts), "--save_npz", str(tmp_path / f"{name}.npz")])
             for name in ("two", "eight")]
    for out in finish(procs):
        assert "query 1: predicted IoU" in out, out[-2000:]
    two, eight = (np.load(tmp_path / f"{name}.npz") for name in ("two", "eight"))
    np.testing.assert_allclose(two["iou"], eight["iou"], rtol=1e-4, atol=1e-5)
    assert np.mean(two["masks"] == eight["masks"]) > 0.999
    cfg_two, params_two = load_model(runs["two"])
    cfg_eight, params_eight = load_model(runs["eight"])
    assert cfg_two == cfg_eight == loop.build_model_config(run_config(STEPS))
    assert jax.tree.structure(params_two) == jax.tree.structure(params_eight)


def test_evaluate_py_on_two_processes_equals_one(runs, tmp_path):
    """evaluate.py split over 2 processes prints and writes what one process does."""
    port = free_port()
    out_two = tmp_path / "two"
    procs = [start(["evaluate.py", "--split", "demo", "--checkpoint", str(runs["one"]),
                    "--max_images", "7", "--batch_size", "2", "--out_dir", str(out_two),
                    "--json", str(out_two / "metrics.json"), "--distributed",
                    f"--coordinator_address=127.0.0.1:{port}", "--num_processes", "2",
                    "--process_id", str(i)]) for i in range(2)]
    outs = finish(procs)
    assert "AP50" in outs[0] and "AP50" not in outs[1]  # process 0 alone reports
    one = evaluate(EvalOptions(split="demo", checkpoint=str(runs["one"]), max_images=7,
                               batch_size=2, out_dir=str(tmp_path / "one"), progress=False))
    two = json.loads((out_two / "metrics.json").read_text())
    assert two["num_images"] == one["num_images"] == 7
    assert two["num_instances"] == one["num_instances"]

    def close(a, b, where):
        if isinstance(a, dict):
            assert a.keys() == b.keys(), where
            for k in a:
                close(a[k], b[k], f"{where}/{k}")
        elif isinstance(a, float | int) and a is not None:
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9, err_msg=where)
        else:
            assert a == b, where

    close(two["scores"], json.loads(json.dumps(one["scores"])), "scores")
    for kind in ("det", "refined"):
        [a] = out_two.glob(f"*_{kind}.json")
        [b] = (tmp_path / "one").glob(f"*_{kind}.json")
        ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
        assert [(r["image_id"], r["gt_instance"]) for r in ra] == [
            (r["image_id"], r["gt_instance"]) for r in rb]
