"""SAMEO training: build data, model and optimizer, run the jitted step, evaluate, checkpoint.

`train_and_evaluate(config, workdir)` is the whole job; `train.py` only parses flags.
Running it again with the same workdir resumes from the latest checkpoint there.
"""

from __future__ import annotations

import math
import pathlib
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh
from tqdm import tqdm

from sameo_jax.data import pipeline
from sameo_jax.models.config import model_config
from sameo_jax.models.efficient_sam import (
    EfficientSam,
    EfficientSamConfig,
    init_params,
    param_shapes,
)
from sameo_jax.training import input_pipeline
from sameo_jax.training.checkpointing import TrainCheckpointer
from sameo_jax.training.embedding_cache import EmbeddingCache
from sameo_jax.training.evaluate import evaluate_amodal_iou
from sameo_jax.training.metrics import MetricsWriter
from sameo_jax.training.optimizer import (
    TRAINABLE,
    count_params,
    learning_rate_schedule,
    make_optimizer,
    split_params,
    trainable_labels,
)
from sameo_jax.training.state import TrainState
from sameo_jax.training.step import batch_sharding, make_eval_step, make_train_step, replicated


def build_model_config(config: ml_collections.ConfigDict) -> EfficientSamConfig:
    """config.model.variant + config.model.overrides -> EfficientSamConfig."""
    overrides = config.model.overrides.to_dict()
    try:
        return model_config(config.model.variant, **overrides)
    except TypeError as e:
        raise ValueError(f"config.model.overrides: {e}") from None


# Compiled once per model config and process.
_random_init = jax.jit(init_params, static_argnums=0)


def initial_params(config: ml_collections.ConfigDict, model_cfg: EfficientSamConfig) -> Any:
    """Params from config.init_checkpoint, or random ones when it is ''."""
    if not config.init_checkpoint:
        # Jitted, with an RBG key: compiling the default threefry init takes several times
        # longer on CPU than the whole train step.
        return _random_init(model_cfg, jax.random.key(config.seed, impl="rbg"))
    from sameo_jax.checkpoint import load_model

    path = pathlib.Path(config.init_checkpoint)
    if not path.exists():
        raise FileNotFoundError(
            f"config.init_checkpoint: {path} does not exist (give an official EfficientSAM "
            ".pt/.npz file or a training workdir)"
        )
    loaded_cfg, params = load_model(path)
    if loaded_cfg != model_cfg:
        raise ValueError(
            f"config.init_checkpoint: {path} holds a {loaded_cfg} model but the config asks for "
            f"{model_cfg}; set config.model to match"
        )
    return params


def make_mesh() -> Mesh:
    """All devices (of all processes) on one 'data' axis."""
    return Mesh(np.asarray(jax.devices()), ("data",))


def _check_config(config: ml_collections.ConfigDict, labels: Any) -> None:
    n = jax.device_count()
    if config.batch_size % n:
        raise ValueError(
            f"config.batch_size={config.batch_size} must be a multiple of the {n} devices"
        )
    if config.cache_embeddings:
        encoder_labels = jax.tree.leaves(labels["image_encoder"])
        if TRAINABLE in encoder_labels:
            raise ValueError(
                "config.cache_embeddings=True needs a frozen image encoder, but "
                f"config.trainable={tuple(config.trainable)} trains parts of it"
            )


class _DevicePlacer:
    """Host batch (numpy, this process's share) -> global arrays sharded over 'data'.

    With an embedding cache, the images are replaced by their cached embeddings.
    """

    KEYS = ("image", "prompt_boxes", "amodal_masks", "visible_masks", "valid")

    def __init__(self, mesh: Mesh, cache: EmbeddingCache | None):
        self.sharding = batch_sharding(mesh)
        self.cache = cache

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        host = {k: np.asarray(batch[k]) for k in self.KEYS}
        if self.cache is not None:
            host["embedding"] = self.cache.embeddings(batch)
            del host["image"]
        return pipeline.to_global_batch(host, self.sharding)


class _PendingMetrics:
    """Per-step device metrics kept until the next flush, so the loop never blocks on them."""

    def __init__(self):
        self.items: list[tuple[int, dict[str, jax.Array]]] = []

    def add(self, step: int, metrics: dict[str, jax.Array]) -> None:
        self.items.append((step, metrics))

    def flush(self) -> tuple[int, dict[str, float]] | None:
        """Mean of the pending metrics (and the last step), or None if nothing is pending.

        Raises FloatingPointError at the first step whose loss is not finite.
        """
        if not self.items:
            return None
        steps = [s for s, _ in self.items]
        values = jax.device_get([m for _, m in self.items])
        self.items = []
        for step, m in zip(steps, values, strict=True):
            if not math.isfinite(float(m["loss"])):
                raise FloatingPointError(f"loss is {float(m['loss'])} at step {step}")
        mean = {k: float(np.mean([m[k] for m in values])) for k in values[0]}
        return steps[-1], mean


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str | pathlib.Path
) -> TrainState:
    """Trains SAMEO per `config`, writing checkpoints and metrics under `workdir`.

    Returns the final train state. Raises FloatingPointError (naming the step and the last
    good checkpoint) when the loss stops being finite.
    """
    if config.distributed:
        jax.distributed.initialize()
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = make_mesh()

    # Model and data.
    model_cfg = build_model_config(config)
    model = EfficientSam(model_cfg)
    train_iter = input_pipeline.train_iterator(config, model_cfg)
    eval_sets = input_pipeline.eval_passes(config, model_cfg)

    # Parameters, what trains, optimizer, state -- or all of it from the workdir's latest
    # checkpoint, if there is one (then the initial parameters are never built).
    checkpointer = TrainCheckpointer(
        workdir, config.max_to_keep, async_save=config.async_checkpoints
    )
    resuming = checkpointer.latest_step() is not None
    params = param_shapes(model_cfg) if resuming else initial_params(config, model_cfg)
    labels = trainable_labels(params, config.trainable)
    _check_config(config, labels)
    schedule = learning_rate_schedule(config)
    tx = make_optimizer(config, labels)
    trainable, frozen = split_params(params, labels)
    logging.info(
        "%d parameters train, %d are frozen", count_params(trainable), count_params(frozen)
    )
    if resuming:
        abstract = jax.eval_shape(lambda p: TrainState.create(p, tx, config.seed), params)
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated(mesh)), abstract
        )
        state = checkpointer.restore(abstract, model_cfg, train_iter)
        logging.info("resumed from step %d in %s", int(state.step), checkpointer.directory)
    else:
        state = jax.device_put(TrainState.create(params, tx, config.seed), replicated(mesh))
    start_step = int(state.step)

    cache = eval_cache = None
    if config.cache_embeddings:
        cache = EmbeddingCache(model, state.params["image_encoder"])
        eval_cache = EmbeddingCache(model, state.params["image_encoder"])
    place = _DevicePlacer(mesh, cache)
    place_eval = _DevicePlacer(mesh, eval_cache)
    train_step = make_train_step(model, config, labels, tx, schedule, mesh)
    eval_step = make_eval_step(model, config, mesh)
    writer = MetricsWriter(workdir)
    pending = _PendingMetrics()

    def evaluate(step: int) -> dict[str, dict[str, float]]:
        results = {}
        for name, one_pass in eval_sets.items():
            batches = ({"device": place_eval(b), "_host": b} for b in one_pass())
            results[name] = evaluate_amodal_iou(
                eval_step, state.params, batches, config.eval_occluded_min
            )
            writer.write(step, {f"eval/{name}/{k}": v for k, v in results[name].items()})
            logging.info("step %d eval on %s: %s", step, name, results[name])
        return results

    def log(tick: tuple[float, int]) -> tuple[float, int]:
        flushed = pending.flush()
        if flushed is None:
            return tick
        step, mean = flushed
        now = time.perf_counter()
        steps_per_s = (step - tick[1]) / max(now - tick[0], 1e-9)
        mean.update(steps_per_s=steps_per_s, examples_per_s=steps_per_s * config.batch_size)
        writer.write(step, mean)
        bar.set_postfix(loss=f"{mean['loss']:.4f}", iou=f"{mean['train_iou']:.3f}")
        return now, step

    bar = tqdm(total=config.total_steps, initial=start_step, desc="train", unit="step",
               disable=not config.progress_bar or jax.process_index() != 0)
    tick = (time.perf_counter(), start_step)
    try:
        for step in range(start_step + 1, config.total_steps + 1):
            batch = place(next(train_iter))
            state, metrics = train_step(state, batch)
            pending.add(step, metrics)
            bar.update(1)
            last = step == config.total_steps
            if step % config.log_every == 0 or step % config.checkpoint_every == 0 or last:
                tick = log(tick)  # also the NaN check: nothing non-finite is ever saved
            if step % config.checkpoint_every == 0 or last:
                checkpointer.save(state, model_cfg, config, train_iter)
            if config.eval_every >= 0 and (
                (config.eval_every and step % config.eval_every == 0) or last
            ):
                evaluate(step)
    except FloatingPointError as e:
        checkpointer.wait()
        good = checkpointer.latest_step()
        where = f"step {good} in {checkpointer.directory}" if good is not None else "none yet"
        raise FloatingPointError(f"{e}; stopping. Last good checkpoint: {where}") from None
    finally:
        bar.close()
        checkpointer.close()
        writer.close()
    if start_step >= config.total_steps and config.eval_every >= 0:
        evaluate(start_step)
    return state
