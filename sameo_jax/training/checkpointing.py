"""Training checkpoints: an orbax CheckpointManager in WORKDIR/checkpoints.

Each saved step holds these items (the layout `sameo_jax.model_io.load_model` reads):
  params        the full model params (same tree as `init_params`), StandardSave
  model_config  JSON of dataclasses.asdict(EfficientSamConfig)
  opt_state     the optimizer state, StandardSave
  train         {'step': int32, 'rng': uint32 [2]}, StandardSave
  config        JSON of the training config (for the record)
  data          JSON {'examples': the number of training examples consumed}: the position
                in the global data stream, whatever the number of processes

The arrays are stored whole (not per device), so a checkpoint written under one mesh restores
under any other: `restore` places them as its abstract target says.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from sameo_jax.model_io import item_handlers
from sameo_jax.models.config import EfficientSamConfig
from sameo_jax.training.state import TrainState

CHECKPOINT_SUBDIR = "checkpoints"


def has_checkpoint(workdir: str | pathlib.Path) -> bool:
    """Whether WORKDIR/checkpoints holds a finished step (a file-system look: no JAX)."""
    directory = pathlib.Path(workdir) / CHECKPOINT_SUBDIR
    return directory.is_dir() and any(p.is_dir() and p.name.isdigit() for p in directory.iterdir())


class TrainCheckpointer:
    """Periodic saves (keeping `max_to_keep`) and resume from the latest step."""

    def __init__(self, workdir: str | pathlib.Path, max_to_keep: int, *, async_save: bool = True):
        self.directory = pathlib.Path(workdir).absolute() / CHECKPOINT_SUBDIR
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
        items = {
            "params": ocp.args.StandardSave(state.params),
            "opt_state": ocp.args.StandardSave(state.opt_state),
            "train": ocp.args.StandardSave({"step": state.step, "rng": state.rng}),
            "model_config": ocp.args.JsonSave(dataclasses.asdict(model_config)),
            "config": ocp.args.JsonSave(json.loads(config.to_json_best_effort())),
        }
        if examples is not None:
            items["data"] = ocp.args.JsonSave({"examples": int(examples)})
        self.manager.save(int(state.step), args=ocp.args.Composite(**items), force=True)

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

    def restore(
        self,
        abstract_state: TrainState,
        model_config: EfficientSamConfig,
        step: int | None = None,
    ) -> TrainState:
        """Restores the latest (or given) step into arrays shaped and sharded like
        `abstract_state` (any mesh). Raises ValueError when the checkpoint was written for a
        model of another structure."""
        step = self._step(step)
        saved_config = self._json(step, "model_config")
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
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return TrainState(
            step=restored.train["step"],
            params=restored.params,
            opt_state=restored.opt_state,
            rng=restored.train["rng"],
        )

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
