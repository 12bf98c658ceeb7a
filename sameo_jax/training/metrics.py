"""Metrics to the workdir: TensorBoard event files (tensorboardX) and metrics.jsonl."""

from __future__ import annotations

import json
import math
import os
import pathlib
from collections.abc import Mapping

import jax
from tensorboardX import SummaryWriter

METRICS_FILE = "metrics.jsonl"


def resident_memory_gb() -> float:
    """This process's resident set size in GB (Linux /proc; NaN where that is missing)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, IndexError, ValueError):
        return float("nan")
    return pages * os.sysconf("SC_PAGE_SIZE") / 1e9


class MetricsWriter:
    """Writes scalars for a step to TensorBoard and as one JSON line {'step': ..., name: ...}.

    Only process 0 writes (multi-host); other processes get a writer that does nothing.
    """

    def __init__(self, workdir: str | pathlib.Path):
        self.enabled = jax.process_index() == 0
        self.path = pathlib.Path(workdir) / METRICS_FILE
        self._tb = SummaryWriter(logdir=str(workdir)) if self.enabled else None

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step)}
        for name, value in scalars.items():
            value = float(value)
            record[name] = value if math.isfinite(value) else str(value)
            self._tb.add_scalar(name, value, global_step=int(step))
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
