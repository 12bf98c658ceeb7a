"""SAMEO training: build data, model and optimizer, run the jitted step, evaluate, checkpoint.

`train_and_evaluate(config, workdir)` is the whole job; `train.py` only parses flags.
Running it again with the same workdir resumes from the latest checkpoint there, on any
number of devices and processes. With several processes (config.distributed), each one runs
this same function; process 0 alone logs, shows progress and writes metrics.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import pathlib
import time
from collections.abc import Callable, Hashable
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh
from tqdm import tqdm

from sameo_jax import distributed
from sameo_jax.data import pipeline
from sameo_jax.model_io import RANDOM_INIT, load_model
from sameo_jax.models.config import model_config
from sameo_jax.models.efficient_sam import (
    EfficientSam,
    EfficientSamConfig,
    init_params,
    param_shapes,
)
from sameo_jax.training import input_pipeline
from sameo_jax.training.checkpointing import TrainCheckpointer, has_checkpoint
from sameo_jax.training.embedding_cache import EmbeddingCache
from sameo_jax.training.held_out_iou import IouTotals, amodal_iou_totals, combine
from sameo_jax.training.metrics import MetricsWriter, resident_memory_gb
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

# Dispatched steps whose results are not read yet: the host prepares the next batch while
# the devices run these, and never runs further ahead (bounded memory, honest progress).
MAX_STEPS_IN_FLIGHT = 2
PREFETCH_BATCHES = 2  # training batches placed on the devices ahead of the step


def build_model_config(config: ml_collections.ConfigDict) -> EfficientSamConfig:
    """config.model.variant + config.model.overrides -> EfficientSamConfig."""
    overrides = config.model.overrides.to_dict()
    try:
        return model_config(config.model.variant, **overrides)
    except TypeError as e:
        raise ValueError(f"config.model.overrides: {e}") from None


def check_start(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> None:
    """Refuses, before any work, a run with nothing to start from: no config.init_checkpoint
    and no checkpoint in `workdir` to resume (random weights need init_checkpoint='random')."""
    if config.init_checkpoint or has_checkpoint(workdir):
        return
    from sameo_jax.weights import OFFICIAL_WEIGHTS, file_name

    variant = config.model.variant
    if variant in OFFICIAL_WEIGHTS:
        weights = f"weights/{file_name(OFFICIAL_WEIGHTS[variant])}"
        get = (f"download it with `python -m sameo_jax.weights {variant} weights`, then pass "
               f"--config.init_checkpoint={weights} (or a directory converted with "
               "`python -m sameo_jax.model_io`)")
    else:
        get = "pass --config.init_checkpoint=PATH (an official checkpoint or a converted one)"
    raise ValueError(
        f"config.init_checkpoint is not set: the {variant} config fine-tunes pretrained "
        f"EfficientSAM, so {get}; or train the small demo model with --config "
        f"configs/sameo.py:demo; --config.init_checkpoint={RANDOM_INIT} starts from random "
        "weights"
    )


def initialize_distributed(config: ml_collections.ConfigDict) -> None:
    """jax.distributed from config.coordinator_address / num_processes / process_id (unset:
    JAX's cluster auto-detection), when config.distributed."""
    if config.distributed:
        distributed.initialize(config.coordinator_address, config.num_processes,
                               config.process_id)
        if not distributed.is_primary():
            logging.set_verbosity(logging.WARNING)  # process 0 alone reports progress


@functools.cache
def _random_init(mesh: Mesh) -> Callable[..., Any]:
    # Jitted, with an RBG key: compiling the default threefry init takes several times
    # longer on CPU than the whole train step.
    return jax.jit(init_params, static_argnums=0, out_shardings=replicated(mesh))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Host arrays (the same on every process) -> arrays replicated over `mesh`."""
    sharding = replicated(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_callback(np.shape(x), sharding, lambda _: np.asarray(x)),
        tree,
    )


def initial_params(
    config: ml_collections.ConfigDict, model_cfg: EfficientSamConfig, mesh: Mesh | None = None
) -> Any:
    """Params from config.init_checkpoint (or random ones for 'random'), replicated over
    `mesh` (default: all devices)."""
    mesh = make_mesh() if mesh is None else mesh
    if config.init_checkpoint == RANDOM_INIT:
        return _random_init(mesh)(model_cfg, jax.random.key(config.seed, impl="rbg"))
    if not config.init_checkpoint:
        raise ValueError("config.init_checkpoint is not set")
    path = pathlib.Path(config.init_checkpoint)
    if not path.exists():
        raise FileNotFoundError(
            f"config.init_checkpoint: {path} does not exist (give an official EfficientSAM "
            f".pt/.npz file, a training workdir, or '{RANDOM_INIT}')"
        )
    loaded_cfg, params = load_model(path)
    # Compute-only fields (dtype, chunk sizes, fast paths) may differ; the parameters fit
    # whenever the structures agree.
    if loaded_cfg.structure() != model_cfg.structure():
        now, then = (dataclasses.asdict(c.structure()) for c in (model_cfg, loaded_cfg))
        diff = {k: (v, then[k]) for k, v in now.items() if then[k] != v}
        raise ValueError(
            f"config.init_checkpoint: {path} holds another model (field: (config, "
            f"checkpoint) = {diff}); set config.model to match"
        )
    return replicate(params, mesh)


def make_mesh() -> Mesh:
    """All devices (of all processes) on one 'data' axis."""
    return Mesh(np.asarray(jax.devices()), ("data",))


def local_mesh() -> Mesh:
    """This process's devices on one 'data' axis (work that needs no other process)."""
    return Mesh(np.asarray(jax.local_devices()), ("data",))


def _check_config(config: ml_collections.ConfigDict, labels: Any) -> None:
    n = jax.device_count()
    if config.batch_size % n:
        raise ValueError(
            f"config.batch_size={config.batch_size} must be a multiple of the {n} devices"
        )
    input_pipeline.per_process_batch(config)
    cached = [k for k, on in (("cache_embeddings", config.cache_embeddings),
                              ("data.embedding_cache_dir", config.data.embedding_cache_dir)) if on]
    if cached and TRAINABLE in jax.tree.leaves(labels["image_encoder"]):
        raise ValueError(
            f"config.{cached[0]} needs a frozen image encoder, but "
            f"config.trainable={tuple(config.trainable)} trains parts of it"
        )


def _info(msg: str, *args: Any) -> None:
    if distributed.is_primary():
        logging.info(msg, *args)


class _DevicePlacer:
    """Host batch (numpy, this process's rows) -> arrays split over the mesh's 'data' axis.

    With an embedding cache, the images are replaced by their cached embeddings. On a mesh
    of this process's devices only (`local_mesh`), the rows are the whole batch.
    """

    KEYS = ("image", "pixels_hw", "embedding", "prompt_boxes", "amodal_masks",
            "visible_masks", "valid")

    def __init__(self, mesh: Mesh, cache: EmbeddingCache | None):
        self.sharding = batch_sharding(mesh)
        self.cache = cache

    def __call__(self, batch: dict[str, np.ndarray], namespace: Hashable) -> dict[str, Any]:
        host = {k: np.asarray(batch[k]) for k in self.KEYS if k in batch}
        if self.cache is not None and "embedding" not in host:
            host["embedding"] = self.cache.embeddings(batch, namespace)
            host.pop("image")
            host.pop("pixels_hw", None)
        return pipeline.to_global_batch(host, self.sharding)


class _StepsInFlight:
    """Dispatched train steps whose metrics are not read yet, at most `limit` of them.

    Reading a step's metrics waits for it; `on_done(step, metrics)` then sees host floats.
    Raises FloatingPointError at the first step whose loss is not finite.
    """

    def __init__(self, limit: int, on_done: Callable[[int, dict[str, float]], None]):
        self.limit = limit
        self.on_done = on_done
        self.items: collections.deque = collections.deque()

    def add(self, step: int, metrics: dict[str, jax.Array]) -> None:
        self.items.append((step, metrics))
        while len(self.items) > self.limit:
            self._retire()

    def drain(self) -> None:
        while self.items:
            self._retire()

    def _retire(self) -> None:
        step, metrics = self.items.popleft()
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not np.isfinite(values["loss"]):
            raise FloatingPointError(f"loss is {values['loss']} at step {step}")
        self.on_done(step, values)


class _Reporter:
    """Completed steps -> progress bar and, every `log_every`, the mean metrics of the steps
    since the last record plus completed steps/s and the process's resident memory."""

    def __init__(self, config: ml_collections.ConfigDict, writer: MetricsWriter, start: int):
        self.config = config
        self.writer = writer
        self.window: list[dict[str, float]] = []
        self.tick = (time.perf_counter(), start)
        self.bar = tqdm(total=config.total_steps, initial=start, desc="train", unit="step",
                        disable=not config.progress_bar or not distributed.is_primary())

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        self.bar.update(1)
        self.window.append(metrics)
        if step % self.config.log_every and step != self.config.total_steps:
            return
        mean = {k: float(np.mean([m[k] for m in self.window])) for k in self.window[0]}
        self.window = []
        now = time.perf_counter()
        steps_per_s = (step - self.tick[1]) / max(now - self.tick[0], 1e-9)
        self.tick = (now, step)
        mean.update(steps_per_s=steps_per_s,
                    examples_per_s=steps_per_s * self.config.batch_size,
                    host_memory_gb=resident_memory_gb())
        self.writer.write(step, mean)
        self.bar.set_postfix(loss=f"{mean['loss']:.4f}", iou=f"{mean['train_iou']:.3f}")

    def close(self) -> None:
        self.bar.close()


def _local_copy(params: Any, mesh: Mesh) -> Any:
    """Replicated global arrays -> the same values replicated over this process's `mesh`."""
    sharding = replicated(mesh)
    return jax.tree.map(lambda x: jax.device_put(x.addressable_data(0), sharding), params)


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str | pathlib.Path
) -> TrainState:
    """Trains SAMEO per `config`, writing checkpoints and metrics under `workdir`.

    Returns the final train state. Raises FloatingPointError (naming the step and the last
    good checkpoint) when the loss stops being finite.
    """
    check_start(config, workdir)
    initialize_distributed(config)
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = make_mesh()

    # What trains is known from the shapes alone: check the config before any real work.
    model_cfg = build_model_config(config)
    model = EfficientSam(model_cfg)
    labels = trainable_labels(param_shapes(model_cfg), config.trainable)
    _check_config(config, labels)
    schedule = learning_rate_schedule(config)
    tx = make_optimizer(config, labels)
    input_pipeline.image_pad_hw(config, model_cfg)
    input_pipeline.open_sources(config, config.data.eval_split)  # missing data stops here

    # Parameters, optimizer, state -- or all of it from the workdir's latest checkpoint, if
    # there is one (then the initial parameters are never built).
    checkpointer = TrainCheckpointer(
        workdir, config.max_to_keep, async_save=config.async_checkpoints
    )
    if checkpointer.latest_step() is not None:
        abstract = jax.eval_shape(
            lambda p: TrainState.create(p, tx, config.seed), param_shapes(model_cfg))
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated(mesh)), abstract
        )
        state = checkpointer.restore_newest_good(abstract, model_cfg)
        examples = checkpointer.examples(int(state.step))
        _info("resumed from step %d in %s", int(state.step), checkpointer.directory)
    else:
        params = initial_params(config, model_cfg, mesh)
        state = jax.jit(lambda p: TrainState.create(p, tx, config.seed),
                        out_shardings=replicated(mesh))(params)
        del params
        examples = 0
    trainable, frozen = split_params(param_shapes(model_cfg), labels)
    _info("%d parameters train, %d are frozen", count_params(trainable), count_params(frozen))
    start_step = int(state.step)
    # Embeddings from disk (refused when made with other weights), else the encoder runs.
    store = input_pipeline.open_embeddings(config, model_cfg, state.params["image_encoder"])
    train_iter = input_pipeline.train_iterator(config, model_cfg, start=examples, store=store)
    eval_sets = input_pipeline.eval_passes(config, model_cfg, store)

    eval_mesh = local_mesh()
    cache = None
    if config.cache_embeddings:
        cache = EmbeddingCache(model, state.params["image_encoder"])
    place = _DevicePlacer(mesh, cache)
    place_eval = _DevicePlacer(eval_mesh, cache)
    train_namespace = ("train", config.data.train_split)
    train_step = make_train_step(model, config, labels, tx, schedule, mesh)
    eval_step = make_eval_step(model, config, eval_mesh)
    writer = MetricsWriter(workdir, resume_step=start_step)

    def evaluate(step: int) -> dict[str, dict[str, float]]:
        # Each process evaluates its share on its own devices; the sums are added up.
        params = _local_copy(state.params, eval_mesh)
        results = {}
        for name, one_pass in eval_sets.items():
            namespace = ("eval", name, config.data.eval_split)
            batches = pipeline.DevicePrefetch(
                one_pass(), lambda b, namespace=namespace: (place_eval(b, namespace), b))
            try:
                mine = amodal_iou_totals(eval_step, params, batches, config.eval_occluded_min)
            finally:
                batches.close()
            parts = distributed.allgather_objects(dataclasses.asdict(mine))
            results[name] = combine([IouTotals(**p) for p in parts]).metrics()
            writer.write(step, {f"eval/{name}/{k}": v for k, v in results[name].items()})
            _info("step %d eval on %s: %s", step, name, results[name])
        return results

    reporter = _Reporter(config, writer, start_step)
    in_flight = _StepsInFlight(MAX_STEPS_IN_FLIGHT, reporter)
    # The next batches are read and sent to the devices while a step runs.
    train_batches = pipeline.DevicePrefetch(train_iter, lambda b: place(b, train_namespace),
                                            size=PREFETCH_BATCHES)
    try:
        for step in range(start_step + 1, config.total_steps + 1):
            batch = next(train_batches)
            examples += config.batch_size
            state, metrics = train_step(state, batch)
            in_flight.add(step, metrics)
            last = step == config.total_steps
            if step % config.checkpoint_every == 0 or last:
                in_flight.drain()  # also the NaN check: nothing non-finite is ever saved
                checkpointer.save(state, model_cfg, config, examples)
            if config.eval_every >= 0 and (
                (config.eval_every and step % config.eval_every == 0) or last
            ):
                in_flight.drain()
                evaluate(step)
        in_flight.drain()
        if start_step >= config.total_steps and config.eval_every >= 0:
            evaluate(start_step)
    except FloatingPointError as e:
        checkpointer.wait()
        good = checkpointer.good_step  # saved by this run or verified on restore
        if good is None:
            raise FloatingPointError(f"{e}; stopping. No verified checkpoint yet") from None
        raise FloatingPointError(f"{e}; stopping. Last good checkpoint: step {good} in "
                                 f"{checkpointer.directory}") from None
    finally:
        train_batches.close()
        if hasattr(train_iter, "close"):
            train_iter.close()  # stops grain's worker processes
        reporter.close()
        checkpointer.close()
        writer.close()
    return state
