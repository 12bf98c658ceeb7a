"""Training checkpoints: an orbax CheckpointManager in WORKDIR/checkpoints.

Each saved step holds these items (the layout `sameo_jax.model_io.load_model` reads):
  params        the full model params (same tree as `init_params`), StandardSave
  model_config  JSON of dataclasses.asdict(EfficientSamConfig)
  opt_state     the optimizer state, StandardSave
  train         {'step': int32, 'rng': uint32 [2]}, StandardSave
  config        JSON of the training config (for the record)
  data          JSON {'examples': the number of training examples consumed}: the position
                in the global data stream, whatever the number of processes
  checksums     JSON {'crc32': {item/leaf path: CRC-32 of the array's bytes}, 'json': {item:
                CRC-32 of its canonical JSON}}, verified on every restore

A restore that finds the latest step damaged (checksum mismatch, missing or unreadable
files) says so on one `warning:` line, moves that step aside to checkpoints/damaged/ and
falls back to the newest good step; when no step is good it raises DamagedCheckpointError
and leaves every step where it is.

The arrays are stored whole (not per device), so a checkpoint written under one mesh restores
under any other: `restore` places them as its abstract target says.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import pathlib
import sys
import zlib
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from sameo_jax import distributed
from sameo_jax.model_io import (
    CHECKSUM_ITEM,
    TRAIN_ARRAY_ITEMS,
    array_checksums,
    checksum_failure,
    item_handlers,
    silence_abandoned_reads,
)
from sameo_jax.models.config import EfficientSamConfig
from sameo_jax.training.state import TrainState

CHECKPOINT_SUBDIR = "checkpoints"
DAMAGED_SUBDIR = "damaged"  # under CHECKPOINT_SUBDIR: damaged steps moved out of the way
CHECKED_JSON_ITEMS = ("model_config", "data")


class DamagedCheckpointError(ValueError):
    """A checkpoint step whose files are missing, unreadable or fail their checksums."""


def _host_bytes(x: Any) -> np.ndarray:
    """An array's full value on this host (replicated arrays: this process's copy)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def json_checksum(value: Any) -> str:
    """CRC-32 (hex) of a JSON value in canonical form (sorted keys, no spaces)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return f"{zlib.crc32(text.encode()):08x}"


def _canonical(value: Any) -> Any:
    return json.loads(json.dumps(value))  # tuples -> lists, as the JSON item reads back


def has_checkpoint(workdir: str | pathlib.Path) -> bool:
    """Whether WORKDIR/checkpoints holds a finished step (a file-system look: no JAX)."""
    directory = pathlib.Path(workdir) / CHECKPOINT_SUBDIR
    return directory.is_dir() and any(p.is_dir() and p.name.isdigit() for p in directory.iterdir())


class TrainCheckpointer:
    """Periodic saves (keeping `max_to_keep`) and resume from the latest step."""

    def __init__(self, workdir: str | pathlib.Path, max_to_keep: int, *, async_save: bool = True):
        self.directory = pathlib.Path(workdir).absolute() / CHECKPOINT_SUBDIR
        # The newest step known to be good: saved by this run, or restored and verified.
        self.good_step: int | None = None
        self.manager = ocp.CheckpointManager(
            self.directory,
            item_handlers=item_handlers(),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save
            ),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(
        self,
        state: TrainState,
        model_config: EfficientSamConfig,
        config: ml_collections.ConfigDict,
        examples: int | None = None,
    ) -> None:
        """Saves `state` under its step (asynchronously; `wait()` before reading it back).

        examples: the training examples consumed so far (the data stream's position).
        """
        arrays = {"params": state.params, "opt_state": state.opt_state,
                  "train": {"step": state.step, "rng": state.rng}}
        json_items = {"model_config": _canonical(dataclasses.asdict(model_config)),
                      "config": json.loads(config.to_json_best_effort())}
        if examples is not None:
            json_items["data"] = {"examples": int(examples)}
        checksums = {"crc32": array_checksums(arrays, _host_bytes),
                     "json": {k: json_checksum(v) for k, v in json_items.items()
                              if k in CHECKED_JSON_ITEMS}}
        items = {k: ocp.args.StandardSave(v) for k, v in arrays.items()}
        items.update({k: ocp.args.JsonSave(v) for k, v in json_items.items()})
        items[CHECKSUM_ITEM] = ocp.args.JsonSave(checksums)
        self.manager.save(int(state.step), args=ocp.args.Composite(**items), force=True)
        self.good_step = int(state.step)

    def _step(self, step: int | None) -> int:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        return step

    def _json(self, step: int, name: str) -> Any:
        if not (self.directory / str(step) / name).exists():
            return None
        return self.manager.restore(step, args=ocp.args.Composite(
            **{name: ocp.args.JsonRestore()}))[name]

    def _damaged(self, step: int, reason: str) -> DamagedCheckpointError:
        return DamagedCheckpointError(
            f"checkpoint step {step} at {self.directory / str(step)} is damaged ({reason})")

    def _read(self, step: int, read: Callable[[], Any]) -> Any:
        """read(), any failure of the files turned into DamagedCheckpointError."""
        unsilence = silence_abandoned_reads()
        try:
            value = read()
        except DamagedCheckpointError:
            raise
        except Exception as e:  # orbax, tensorstore and json name no common error type
            gc.collect()
            while e.__cause__ is not None:  # orbax wraps the tensorstore error naming the file
                e = e.__cause__
            message = " ".join(str(e).split())[:300]
            raise self._damaged(step, f"{type(e).__name__}: {message}") from None
        unsilence()
        return value

    def _checked_json(self, step: int, name: str, checksums: dict | None) -> Any:
        value = self._read(step, lambda: self._json(step, name))
        want = (checksums or {}).get("json", {}).get(name)
        if want is not None and (value is None or json_checksum(value) != want):
            raise self._damaged(step, f"the {name} item fails its checksum" if value is not None
                                else f"the {name} item is missing")
        return value

    def restore(
        self,
        abstract_state: TrainState,
        model_config: EfficientSamConfig,
        step: int | None = None,
    ) -> TrainState:
        """Restores the latest (or given) step into arrays shaped and sharded like
        `abstract_state` (any mesh) and verifies them against the step's checksums.

        Raises DamagedCheckpointError (naming the step and its path) when the step's files
        are missing, unreadable or fail their checksums, and ValueError when the checkpoint
        was written for a model of another structure.
        """
        step = self._step(step)
        checksums = self._read(step, lambda: self._json(step, CHECKSUM_ITEM))
        if checksums is not None and not isinstance(checksums.get("crc32"), dict):
            raise self._damaged(step, f"the {CHECKSUM_ITEM} item is malformed")
        saved_config = self._checked_json(step, "model_config", checksums)
        self._checked_json(step, "data", checksums)
        # Fields that only change how the model computes (dtype, chunking, factoring) may
        # differ, and fields a newer version added take their defaults: the parameters are
        # interchangeable whenever the structures agree.
        try:
            saved = EfficientSamConfig.from_dict(dict(saved_config or {})).structure()
        except (TypeError, ValueError) as e:
            raise ValueError(f"{self.directory}: step {step} has an unreadable model config "
                             f"({e}); use a fresh --workdir") from None
        if saved != model_config.structure():
            now, then = (dataclasses.asdict(c) for c in (model_config.structure(), saved))
            diff = {k: (v, then[k]) for k, v in now.items() if then[k] != v}
            raise ValueError(
                f"{self.directory}: step {step} was trained with a different model config "
                f"(field: (now, saved) = {diff}); use a fresh --workdir"
            )
        items = {
            "params": ocp.args.StandardRestore(abstract_state.params),
            "opt_state": ocp.args.StandardRestore(abstract_state.opt_state),
            "train": ocp.args.StandardRestore(
                {"step": abstract_state.step, "rng": abstract_state.rng}
            ),
        }
        restored = self._read(step, lambda: self.manager.restore(
            step, args=ocp.args.Composite(**items)))
        if checksums is not None:
            got = array_checksums({k: restored[k] for k in TRAIN_ARRAY_ITEMS}, _host_bytes)
            failure = checksum_failure(got, checksums["crc32"])
            if failure:
                raise self._damaged(step, failure)
            self.good_step = max(step, self.good_step or 0)
        return TrainState(
            step=restored.train["step"],
            params=restored.params,
            opt_state=restored.opt_state,
            rng=restored.train["rng"],
        )

    def restore_newest_good(
        self, abstract_state: TrainState, model_config: EfficientSamConfig
    ) -> TrainState:
        """`restore` of the newest step that is not damaged.

        Each damaged newer step is reported on one `warning:` line (process 0) and, once a
        good step is found, moved to checkpoints/damaged/STEP (kept for the user; later saves
        of that step number then cannot clash with it). Raises DamagedCheckpointError when
        every step is damaged, moving nothing.
        """
        damaged: list[tuple[int, str]] = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                state = self.restore(abstract_state, model_config, step)
                error = None
            except DamagedCheckpointError as e:
                error = str(e)
            # Every process reads the same files; all fall back together if any saw damage.
            errors = [e for e in distributed.allgather_objects(error) if e is not None]
            if errors:
                damaged.append((step, errors[0]))
                continue
            moved = self._move_aside([s for s, _ in damaged])
            for (_, error), target in zip(damaged, moved, strict=True):
                _warn(f"warning: {error}; falling back to step {step} (the damaged step is "
                      f"kept in {target})")
            return state
        if not damaged:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if len(damaged) == 1:
            raise DamagedCheckpointError(f"{damaged[0][1]}; there is no older checkpoint to "
                                         "fall back to (nothing was removed)")
        raise DamagedCheckpointError(
            f"every checkpoint in {self.directory} is damaged; the newest: {damaged[0][1]} "
            "(nothing was removed)")

    def _move_aside(self, steps: list[int]) -> list[pathlib.Path]:
        """Moves damaged steps to checkpoints/damaged/STEP[.N] (process 0; the others wait),
        then every process re-reads the step list. Returns the new places."""
        if not steps:
            return []
        aside = self.directory / DAMAGED_SUBDIR
        targets = []
        for step in steps:
            target, n = aside / str(step), 0
            while target.exists() or target in targets:
                n += 1
                target = aside / f"{step}.{n}"
            targets.append(target)
        if distributed.is_primary():
            aside.mkdir(exist_ok=True)
            for step, target in zip(steps, targets, strict=True):
                (self.directory / str(step)).rename(target)
        distributed.allgather_objects(None)  # the others wait for the moves
        self.manager.reload()
        return targets

    def examples(self, step: int | None = None) -> int:
        """The training examples consumed up to the latest (or given) step. A checkpoint from
        before the position was stored counts step x its config's batch_size (one batch a
        step)."""
        step = self._step(step)
        data = self._json(step, "data")
        if data is not None:
            return int(data["examples"])
        saved = self._json(step, "config") or {}
        if "batch_size" not in saved:
            raise ValueError(f"{self.directory}: step {step} stores no data position and no "
                             "config; use a fresh --workdir")
        return step * int(saved["batch_size"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any) -> Any:
    """Shape/dtype/sharding skeleton of a pytree of arrays (restore target)."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree,
    )


def _warn(line: str) -> None:
    """One line on stderr, from process 0 only."""
    if distributed.is_primary():
        print(line, file=sys.stderr, flush=True)
