"""The training loop's input: config.data -> sources -> `sameo_jax.data.pipeline` loaders.

Batches follow the training-batch schema (numpy, this process's share of the global batch);
see `sameo_jax.data.pipeline`. Training batches split each global batch among the processes;
evaluation splits the examples.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np

from sameo_jax.data import embedding_store, pipeline
from sameo_jax.data.sources import demo_source, open_source
from sameo_jax.models.config import EfficientSamConfig


def open_sources(config: ml_collections.ConfigDict, split: str) -> dict[str, Any]:
    """name -> random-access source of `split` for every name in config.data.sources.

    'demo' without a data_dir is the procedural data set (config.data.demo_*). A data set
    missing from data_dir raises the data module's error (it names the build command).
    """
    data = config.data
    if not data.sources:
        raise ValueError("config.data.sources is empty; name at least one data set")
    out = {}
    for name in data.sources:
        if name == "demo" and not data.data_dir:
            out[name] = _demo_source(config, split)
        else:
            out[name] = open_source(name, split, data.data_dir or None)
    return out


def _demo_source(config: ml_collections.ConfigDict, split: str):
    """The procedural data set's `split` with the scene parameters of config.data.demo_*:
    demo_train_examples for the training split, demo_eval_examples otherwise."""
    data = config.data
    n = data.demo_train_examples if split == data.train_split else data.demo_eval_examples
    return demo_source(split, n, data.demo_image_size,
                       occlusion_range=tuple(data.demo_occlusion_range),
                       object_size=tuple(data.demo_object_size), dual=data.demo_dual)


def _mixture(config: ml_collections.ConfigDict) -> str | dict[str, float]:
    """config.data.mixture: a rule name, or explicit weights in config.data.mixture_weights."""
    weights = tuple(config.data.mixture_weights)
    if not weights:
        return config.data.mixture
    if len(weights) != len(config.data.sources):
        raise ValueError(
            f"config.data.mixture_weights has {len(weights)} values for "
            f"{len(config.data.sources)} sources {tuple(config.data.sources)}"
        )
    return dict(zip(config.data.sources, weights, strict=True))


def per_process_batch(config: ml_collections.ConfigDict) -> int:
    """This process's rows of each global batch: config.batch_size // processes."""
    if config.batch_size % jax.process_count():
        raise ValueError(
            f"config.batch_size={config.batch_size} must divide by the {jax.process_count()} "
            "processes"
        )
    return config.batch_size // jax.process_count()


def num_workers(config: ml_collections.ConfigDict) -> int:
    """config.data.num_workers, or the cores this process may run on when it is < 0."""
    if config.data.num_workers >= 0:
        return config.data.num_workers
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def image_pad_hw(config: ml_collections.ConfigDict, model_cfg: EfficientSamConfig
                 ) -> tuple[int, int]:
    """(P, Q) that images are padded to for the step's resize: config.data.image_pad_hw, or
    the model frame (S, S) when it is empty."""
    pad = tuple(int(x) for x in config.data.image_pad_hw)
    if not pad:
        return model_cfg.img_size, model_cfg.img_size
    if len(pad) != 2 or min(pad) < model_cfg.img_size:
        raise ValueError(f"config.data.image_pad_hw={pad}: give (height, width), each at least "
                         f"the model frame {model_cfg.img_size}, or () for the model frame")
    return pad


def open_embeddings(config: ml_collections.ConfigDict, model_cfg: EfficientSamConfig,
                    encoder_params: Any) -> embedding_store.EmbeddingStore | None:
    """The on-disk embedding cache config.data.embedding_cache_dir (None when unset), refused
    (CacheError) when made with other encoder weights or preprocessing."""
    if not config.data.embedding_cache_dir:
        return None
    return embedding_store.EmbeddingStore(
        config.data.embedding_cache_dir, embedding_store.fingerprint(model_cfg, encoder_params))


def train_iterator(
    config: ml_collections.ConfigDict, model_cfg: EfficientSamConfig, start: int = 0,
    store: embedding_store.EmbeddingStore | None = None,
) -> Iterator:
    """Endless, shuffled, mixed training batches: this process's rows of each global batch.

    The global stream is one, drawn from config.seed, whatever the number of processes;
    `start` is the number of its examples already consumed (the position to resume from).
    With an embedding cache `store`, every training source must be in it: the batches carry
    embeddings and no image is decoded.
    """
    split = config.data.train_split
    sources = open_sources(config, split)
    embeddings = None if store is None else {
        name: store.reader(name, split, repr(source)) for name, source in sources.items()}
    return pipeline.make_train_loader(
        sources,
        batch_size=config.batch_size,
        image_size=model_cfg.img_size,
        mask_size=model_cfg.low_res_size,
        instances_per_image=config.instances_per_image,
        prompt_mode=config.prompt_mode,
        box_jitter=config.box_jitter,
        mixture=_mixture(config),
        seed=config.seed,
        start=start,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        worker_count=num_workers(config),
        image_pad_hw=image_pad_hw(config, model_cfg),
        embeddings=embeddings,
    )


def eval_passes(
    config: ml_collections.ConfigDict, model_cfg: EfficientSamConfig,
    store: embedding_store.EmbeddingStore | None = None,
) -> dict[str, Callable[[], Iterator[dict[str, np.ndarray]]]]:
    """name -> function giving one ordered pass over this process's share of that source's
    eval split (fixed `eval_prompt_mode` prompts), in batches of `per_process_batch` rows.

    Process p reads examples p, p + P, ...: together the processes cover the split once.
    A source whose eval split is in the embedding cache `store` is read from it.
    """
    limit = config.data.eval_examples or None
    split = config.data.eval_split

    def passes(name: str, source: Any) -> Callable[[], Iterator[dict[str, np.ndarray]]]:
        embeddings = None
        if store is not None and store.has_split(name, split):
            embeddings = store.reader(name, split, repr(source))

        def one_pass() -> Iterator[dict[str, np.ndarray]]:
            return pipeline.make_eval_loader(
                source,
                batch_size=per_process_batch(config),
                image_size=model_cfg.img_size,
                mask_size=model_cfg.low_res_size,
                instances_per_image=config.instances_per_image,
                prompt_mode=config.eval_prompt_mode,
                limit=limit,
                process_index=jax.process_index(),
                process_count=jax.process_count(),
                read_threads=num_workers(config),
                image_pad_hw=image_pad_hw(config, model_cfg),
                embeddings=embeddings,
            )

        return one_pass

    return {name: passes(name, s) for name, s in open_sources(config, split).items()}
