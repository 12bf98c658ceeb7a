"""Several processes, one job: starting `jax.distributed` and gathering host-side results.

    initialize(coordinator_address, num_processes, process_id)   # before any JAX computation
    allgather_objects(obj) -> [obj of process 0, obj of process 1, ...]   # JSON-able objects

With one process (`jax.process_count() == 1`) gathering returns `[obj]` and runs no collective.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import jax
import numpy as np
from jax._src import distributed as jax_distributed  # the coordination client (as orbax)
from jax.experimental import multihost_utils

# How long a gathering process waits for the others (they may finish their shares of an
# evaluation at different times).
GATHER_TIMEOUT_S = 3600
_gathers = itertools.count()


def initialize(coordinator_address: str = "", num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """`jax.distributed.initialize` with these settings; the empty ones ('' / None) are left
    to JAX's cluster auto-detection (Cloud TPU, SLURM, Open MPI, ...). On a CPU, arrays that
    span processes are reduced over gloo (TCP).

    Raises ValueError naming the settings when JAX cannot start (e.g. nothing detected).
    """
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address or None, num_processes, process_id)
    except (ValueError, RuntimeError, TypeError) as e:
        raise ValueError(
            f"jax.distributed.initialize failed: {e} (where no cluster is detected, give the "
            "coordinator_address HOST:PORT, num_processes and process_id of every process)"
        ) from None


def is_primary() -> bool:
    """Whether this is process 0, the one that logs, shows progress and writes reports."""
    return jax.process_index() == 0


def allgather_objects(obj: Any) -> list[Any]:
    """Every process's `obj` (JSON-serialisable; floats round-trip exactly), in process order.

    A collective: every process must call it, the same number of times.
    """
    if jax.process_count() == 1:
        return [obj]
    # Meet first on the coordination service, which waits as long as asked: the CPU
    # collectives (gloo) give up when the processes do not arrive within 30 s of each other.
    jax_distributed.global_state.client.wait_at_barrier(
        f"sameo_allgather_{next(_gathers)}", GATHER_TIMEOUT_S * 1000)
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.int32(data.size))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: data.size] = data
    rows = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(row[:n].tobytes()) for row, n in zip(rows, sizes, strict=True)]
