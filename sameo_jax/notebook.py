"""Notebook helpers: pictures inline, training with a live loss curve.

Used by notebooks/*.ipynb; needs IPython (any Jupyter kernel or Colab) and matplotlib.
"""

from __future__ import annotations

import concurrent.futures
import glob
import io
import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from sameo_jax import visualize
from sameo_jax.evaluation import pictures
from sameo_jax.training.checkpointing import CHECKPOINT_SUBDIR
from sameo_jax.training.metrics import METRICS_FILE


def show(image: np.ndarray) -> None:
    """Displays an [H, W, 3] uint8 picture as a PNG output of the running cell; pictures
    under 256 pixels are enlarged by a whole factor, so that they can be read."""
    from IPython.display import display
    from PIL import Image

    image = np.asarray(image, np.uint8)
    factor = pictures.enlarge_factor(*image.shape[:2])
    display(Image.fromarray(visualize.upscale(image, factor)))


def show_files(pattern: str, limit: int = 4) -> list[str]:
    """Displays the first `limit` PNG files matching a glob pattern; returns their paths."""
    from IPython.display import Image, display

    paths = sorted(glob.glob(pattern))[:limit]
    for path in paths:
        print(path)
        display(Image(filename=path))
    return paths


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of WORKDIR/metrics.jsonl (one dict per logged step; [] before the first)."""
    path = pathlib.Path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written right now
            break
    return records


def curves_png(records: Sequence[dict[str, Any]], title: str = "") -> bytes:
    """PNG of the training curves: loss terms by step, and the evaluation IoUs where logged."""
    from matplotlib.figure import Figure

    evals = sorted({k for r in records for k in r if k.startswith("eval/") and "iou" in k})
    fig = Figure(figsize=(10 if evals else 6, 3.6), layout="constrained")
    axes = fig.subplots(1, 2 if evals else 1, squeeze=False)[0]
    for key, style in (("loss", "-"), ("dice", ":"), ("focal", ":")):
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), float)]
        if points:
            axes[0].plot(*zip(*points, strict=True), style, label=key)
    axes[0].set(xlabel="step", ylabel="loss", title=title or "training loss")
    for key in evals:
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), float)]
        axes[1].plot(*zip(*points, strict=True), "o-", label=key[len("eval/"):])
    if evals:
        axes[1].set(xlabel="step", ylabel="IoU", title="held-out amodal IoU")
    for ax in axes:
        ax.xaxis.get_major_locator().set_params(integer=True)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    return buffer.getvalue()


def latest_checkpoint_step(workdir: str | os.PathLike) -> int | None:
    """The step of the newest training checkpoint in WORKDIR (None when there is none)."""
    from sameo_jax.training.checkpointing import TrainCheckpointer

    if not (pathlib.Path(workdir) / CHECKPOINT_SUBDIR).is_dir():
        return None
    checkpointer = TrainCheckpointer(workdir, max_to_keep=1)
    try:
        return checkpointer.latest_step()
    finally:
        checkpointer.close()


def train_live(config, workdir: str | os.PathLike, refresh_s: float = 10.0):
    """`train_and_evaluate(config, workdir)` with the loss curve redrawn every `refresh_s`
    seconds below the cell. Resumes from WORKDIR's latest checkpoint like train.py.
    Returns the final train state."""
    from IPython.display import Image, display

    from sameo_jax.training.loop import train_and_evaluate

    start = latest_checkpoint_step(workdir)
    print(f"resuming from step {start} in {workdir}" if start is not None
          else f"starting from step 0 in {workdir}")
    records = read_metrics(workdir)
    handle = display(Image(data=curves_png(records)), display_id=True)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        job = pool.submit(train_and_evaluate, config, workdir)
        while concurrent.futures.wait([job], timeout=refresh_s).not_done:
            if len(new := read_metrics(workdir)) != len(records):  # redraw only what changed
                records = new
                handle.update(Image(data=curves_png(records)))
        state = job.result()  # re-raises what training raised
    handle.update(Image(data=curves_png(read_metrics(workdir))))
    print(f"step {int(state.step)}; checkpoints in {pathlib.Path(workdir) / CHECKPOINT_SUBDIR}")
    return state
