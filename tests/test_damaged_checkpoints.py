"""Damaged training checkpoints and metrics files: a damaged latest step is named on one
`warning:` line and the run resumes from the newest good step with the losses of an
undamaged run; when every step is damaged, one `error:` line and nothing removed;
metrics.jsonl holds whole lines and no step twice after a resume.

Also the config of the train.py runs here: `--config tests/test_damaged_checkpoints.py`.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.test_training import micro_config, read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS, EVERY = 6, 2  # checkpoints at steps 2, 4 and 6
TIMEOUT_S = 300


def get_config(arg: str | None = None):
    """The micro model, a checkpoint every EVERY steps, all of them kept."""
    del arg
    return micro_config(total_steps=STEPS, checkpoint_every=EVERY, max_to_keep=10,
                        async_checkpoints=False)


def train(workdir, *flags):
    """train.py on the micro config, as a user runs it."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "train.py", "--config", "tests/test_damaged_checkpoints.py",
         "--workdir", str(workdir), *flags],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def undamaged(tmp_path_factory):
    """An uninterrupted run's workdir (checkpoints at 2, 4, 6)."""
    from sameo_jax.training import loop

    workdir = tmp_path_factory.mktemp("undamaged")
    loop.train_and_evaluate(get_config(), workdir)
    return workdir


def copy_run(src, dst):
    shutil.copytree(src / "checkpoints", dst / "checkpoints")
    shutil.copy(src / "metrics.jsonl", dst / "metrics.jsonl")
    return dst


def array_files(step_dir):
    return sorted(p for p in (step_dir / "params").rglob("d/*") if p.is_file())


def flip_bytes(path):
    raw = bytearray(path.read_bytes())
    for at in range(len(raw) // 3, len(raw), max(len(raw) // 8, 1)):
        raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))


DAMAGE = {
    "flipped": lambda d: [flip_bytes(p) for p in array_files(d)],
    "truncated": lambda d: [p.write_bytes(p.read_bytes()[:100]) for p in array_files(d)],
    "emptied": lambda d: [p.write_bytes(b"") for p in array_files(d)],
    "emptied_json": lambda d: (d / "model_config" / "metadata").write_bytes(b""),
    "edited_json": lambda d: (d / "data" / "metadata").write_text('{"examples": 8}'),
    "lost_item": lambda d: shutil.rmtree(d / "opt_state"),
}


def tree(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_flipped_latest_step_falls_back_with_the_undamaged_losses(undamaged, tmp_path):
    """Step 6 flipped, metrics.jsonl ending in a half line: one warning naming step 6 and
    its path, resume from step 4, the damaged step kept aside, steps 5-6 logged once with
    the losses of the undamaged run."""
    workdir = copy_run(undamaged, tmp_path / "wd")
    DAMAGE["flipped"](workdir / "checkpoints" / "6")
    damaged_files = tree(workdir / "checkpoints" / "6")
    with (workdir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 7, "loss": 0.')  # a crash mid-write
    result = train(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    step_dir = workdir.absolute() / "checkpoints" / "6"
    assert len(warnings) == 1, result.stderr[-3000:]
    assert warnings[0].startswith(f"warning: checkpoint step 6 at {step_dir} is damaged ("), \
        warnings[0]
    assert "falling back to step 4" in warnings[0]
    assert tree(workdir / "checkpoints" / "damaged" / "6") == damaged_files
    records = read_metrics(workdir)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    want = [r["loss"] for r in read_metrics(undamaged)]
    np.testing.assert_allclose([r["loss"] for r in records], want, rtol=1e-5)


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_step_is_named_and_the_previous_one_restored(undamaged, tmp_path, capsys,
                                                            damage):
    from sameo_jax.training import loop, optimizer
    from sameo_jax.training.checkpointing import TrainCheckpointer, abstract_like
    from sameo_jax.training.state import TrainState

    c = get_config()
    workdir = copy_run(undamaged, tmp_path)
    DAMAGE[damage](workdir / "checkpoints" / "6")
    model_cfg = loop.build_model_config(c)
    params = loop.initial_params(c, model_cfg)
    tx = optimizer.make_optimizer(c, optimizer.trainable_labels(params, c.trainable))
    ckpt = TrainCheckpointer(workdir, 10, async_save=False)
    try:
        state = ckpt.restore_newest_good(abstract_like(TrainState.create(params, tx, 0)),
                                         model_cfg)
        assert int(state.step) == 4 and ckpt.good_step == 4
        assert ckpt.latest_step() == 4 and ckpt.examples() == 4 * c.batch_size
    finally:
        ckpt.close()
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"warning: checkpoint step 6 at {workdir.absolute()}/checkpoints/6 "
                           "is damaged ("), line
    assert (workdir / "checkpoints" / "damaged" / "6").is_dir()


def test_every_step_damaged_is_one_error_and_nothing_removed(undamaged, tmp_path):
    workdir = copy_run(undamaged, tmp_path / "wd")
    for step in (2, 4, 6):
        DAMAGE["truncated" if step == 4 else "flipped"](workdir / "checkpoints" / str(step))
    before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    result = train(workdir)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("error: every checkpoint in "), \
        result.stderr[-3000:]
    assert f"checkpoint step 6 at {workdir.absolute()}/checkpoints/6 is damaged" in errors[0]
    after = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()
             and not p.name.startswith("events.out.tfevents")}
    assert after == before


# ----------------------------------------------------------------------------- metrics.jsonl


def lines(workdir):
    return (workdir / "metrics.jsonl").read_text().splitlines(keepends=True)


def test_metrics_resume_drops_later_steps_and_a_partial_line(tmp_path):
    from sameo_jax.training.metrics import MetricsWriter

    text = "".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in range(1, 9))
    (tmp_path / "metrics.jsonl").write_text(text + '{"step": 9, "lo')
    writer = MetricsWriter(tmp_path, resume_step=5)
    assert [json.loads(line)["step"] for line in lines(tmp_path)] == [1, 2, 3, 4, 5]
    writer.write(5, {"eval/demo/amodal_iou": 0.5})  # the restored step evaluated again ...
    writer.write(5, {"eval/demo/amodal_iou": 0.25})  # ... replaces, never repeats
    writer.write(6, {"loss": 0.6})
    writer.close()
    records = [json.loads(line) for line in lines(tmp_path)]
    assert records[4:] == [{"step": 5, "loss": 0.5}, {"step": 5, "eval/demo/amodal_iou": 0.25},
                           {"step": 6, "loss": 0.6}]
    assert all(line.endswith("\n") for line in lines(tmp_path))


def test_metrics_write_that_fails_part_way_leaves_whole_lines(tmp_path, monkeypatch):
    from sameo_jax.training import metrics

    writer = metrics.MetricsWriter(tmp_path)
    writer.write(1, {"loss": 1.0})
    real_write = os.write

    def disk_full(fd, data):
        if len(data) > 8:
            return real_write(fd, data[:8])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(metrics.os, "write", disk_full)
    with pytest.raises(OSError, match="No space left"):
        writer.write(2, {"loss": 2.0})
    monkeypatch.undo()
    writer.write(2, {"loss": 2.0})
    writer.close()
    assert [json.loads(line) for line in lines(tmp_path)] == [{"step": 1, "loss": 1.0},
                                                              {"step": 2, "loss": 2.0}]


@pytest.mark.parametrize("damage", ["flipped", "truncated"])
def test_readers_skip_a_damaged_latest_step(undamaged, tmp_path, capsys, damage):
    """predict.py / evaluate.py / init_checkpoint read params through load_model: a damaged
    newest step is named on stderr and the step before it is read."""
    import jax

    from sameo_jax.model_io import CheckpointError, load_model

    run = copy_run(undamaged, tmp_path / "run")
    DAMAGE[damage](run / "checkpoints" / str(STEPS))
    _, params = load_model(run)
    assert f"checkpoint step {STEPS} at {run / 'checkpoints' / str(STEPS)} is damaged" in (
        capsys.readouterr().err)
    before = copy_run(undamaged, tmp_path / "before")
    shutil.rmtree(before / "checkpoints" / str(STEPS))
    _, expected = load_model(before)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, expected)

    for step in range(EVERY, STEPS, EVERY):  # the newest is damaged already
        DAMAGE[damage](run / "checkpoints" / str(step))
    with pytest.raises(CheckpointError, match="every checkpoint step is damaged"):
        load_model(run)


def test_abandoned_reads_are_silenced_and_nothing_else(capsys, monkeypatch):
    """What orbax leaves behind when a restore fails (an asyncio task dropped with its
    exception, a reply to a closed loop) stays off stderr while the filter is on; other
    errors are printed, and the hooks are put back after a read that succeeded."""
    import asyncio
    import gc
    import logging
    import threading

    from sameo_jax import model_io
    from sameo_jax.model_io import silence_abandoned_reads

    # From Python's own hooks: an earlier failed restore in this process leaves the filter on.
    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)
    monkeypatch.setattr(threading, "excepthook", threading.__excepthook__)
    monkeypatch.setattr(logging.getLogger("asyncio"), "filters", [
        f for f in logging.getLogger("asyncio").filters if f is not model_io._drop_abandoned_tasks])
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logging.getLogger("asyncio").addHandler(handler)

    async def read():
        raise ValueError("damaged")

    def abandon_a_read():
        loop = asyncio.new_event_loop()
        task = loop.create_task(read())
        loop.run_until_complete(asyncio.sleep(0.01))
        loop.close()
        del task
        gc.collect()
        sys.excepthook(RuntimeError, RuntimeError("Event loop is closed"), None)

    try:
        hooks = sys.excepthook, sys.unraisablehook
        undo = silence_abandoned_reads()
        abandon_a_read()
        logging.getLogger("asyncio").error("another asyncio error")
        sys.excepthook(KeyError, KeyError("another error"), None)
        assert stream.getvalue() == "another asyncio error\n"
        assert "another error" in capsys.readouterr().err
        undo()
        assert (sys.excepthook, sys.unraisablehook) == hooks
        abandon_a_read()
        assert "exception was never retrieved" in stream.getvalue()
        assert "Event loop is closed" in capsys.readouterr().err
    finally:
        logging.getLogger("asyncio").removeHandler(handler)
