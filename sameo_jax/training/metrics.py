"""Metrics to the workdir: TensorBoard event files (tensorboardX) and metrics.jsonl.

metrics.jsonl only ever holds whole lines: a write that fails part way (a full disk) is cut
back, and a run that resumes from step N first drops what follows step N (the records of
steps it is about to repeat, and a partial last line a crash may have left).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from collections.abc import Mapping

import jax
from absl import logging
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


def read_records(path: str | pathlib.Path) -> tuple[list[dict], int]:
    """The records of a metrics.jsonl and the number of lines that are not one (a partial
    last line, garbage); a last line without its newline counts as partial."""
    records, bad = [], 0
    lines = pathlib.Path(path).read_bytes().split(b"\n")
    bad += lines.pop() != b""  # what follows the last newline
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:  # also UnicodeDecodeError
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        else:
            bad += 1
    return records, bad


class MetricsWriter:
    """Writes scalars for a step to TensorBoard and as one JSON line {'step': ..., name: ...}.

    resume_step: the step the run starts after; records of later steps are removed from an
    existing metrics.jsonl (they are about to be written again), as are lines that do not
    parse. Only process 0 writes (multi-host); other processes get a writer that does nothing.
    """

    def __init__(self, workdir: str | pathlib.Path, resume_step: int = 0):
        self.enabled = jax.process_index() == 0
        self.path = pathlib.Path(workdir) / METRICS_FILE
        self._tb = SummaryWriter(logdir=str(workdir)) if self.enabled else None
        # (step, metric names) of the records in the file: a record is never there twice.
        self._written: set[tuple[int, frozenset[str]]] = set()
        if self.enabled and self.path.exists():
            self._keep(lambda r: r["step"] <= resume_step)

    def _keep(self, keep) -> None:
        """Rewrites metrics.jsonl (atomically) with the parseable records `keep` accepts; a
        file that needs no change is left as it is."""
        records, bad = read_records(self.path)
        kept = [r for r in records if keep(r)]
        if bad or len(kept) != len(records):
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, self.path)
            if bad:
                logging.warning("%s: dropped %d line(s) that were not whole records",
                                self.path, bad)
        self._written = {_kind(r) for r in kept}

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step)}
        for name, value in scalars.items():
            value = float(value)
            record[name] = value if math.isfinite(value) else str(value)
            self._tb.add_scalar(name, value, global_step=int(step))
        if _kind(record) in self._written:  # e.g. the evaluation of the step resumed from
            self._keep(lambda r: _kind(r) != _kind(record))
        self._append(json.dumps(record) + "\n")
        self._written.add(_kind(record))

    def _append(self, line: str) -> None:
        """Appends one whole line: a write that fails part way is cut back."""
        data = line.encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            try:
                while data:
                    data = data[os.write(fd, data):]
            except OSError:
                os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _kind(record: Mapping) -> tuple[int, frozenset[str]]:
    return int(record["step"]), frozenset(record)
