"""The training loop's input: config.data -> sources -> `sameo_jax.data.pipeline` loaders.

Batches follow the training-batch schema (numpy, this process's share of the global batch);
see `sameo_jax.data.pipeline`. Training batches split each global batch among the processes;
evaluation splits the examples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np

from sameo_jax.data import pipeline
from sameo_jax.data.demo_scenes import DemoSource
from sameo_jax.data.sources import DEMO_SPLITS, open_source
from sameo_jax.models.config import EfficientSamConfig


def open_sources(config: ml_collections.ConfigDict, split: str) -> dict[str, Any]:
    """name -> random-access source of `split` for every name in config.data.sources.

    'demo' without a data_dir is the procedural data set (`demo_source`). A data set
    missing from data_dir raises the data module's error (it names the build command).
    """
    data = config.data
    if not data.sources:
        raise ValueError("config.data.sources is empty; name at least one data set")
    out = {}
    for name in data.sources:
        if name == "demo" and not data.data_dir:
            out[name] = demo_source(config, split)
        else:
            out[name] = open_source(name, split, data.data_dir or None)
    return out


def demo_source(config: ml_collections.ConfigDict, split: str) -> DemoSource:
    """The procedural data set's `split` with the scene parameters of config.data.demo_*.

    The split's seed comes from `sameo_jax.data.sources.DEMO_SPLITS`; its size is
    config.data.demo_train_examples for the training split, demo_eval_examples otherwise.
    """
    data = config.data
    if split not in DEMO_SPLITS:
        raise ValueError(f"demo: unknown split {split!r}; known: {sorted(DEMO_SPLITS)}")
    n = data.demo_train_examples if split == data.train_split else data.demo_eval_examples
    return DemoSource(
        n, data.demo_image_size, DEMO_SPLITS[split][0],
        occlusion_range=tuple(data.demo_occlusion_range),
        object_size=tuple(data.demo_object_size),
        dual=data.demo_dual,
    )


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


def train_iterator(
    config: ml_collections.ConfigDict, model_cfg: EfficientSamConfig, start: int = 0
) -> Iterator:
    """Endless, shuffled, mixed training batches: this process's rows of each global batch.

    The global stream is one, drawn from config.seed, whatever the number of processes;
    `start` is the number of its examples already consumed (the position to resume from).
    """
    return pipeline.make_train_loader(
        open_sources(config, config.data.train_split),
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
        worker_count=config.data.num_workers,
    )


def eval_passes(
    config: ml_collections.ConfigDict, model_cfg: EfficientSamConfig
) -> dict[str, Callable[[], Iterator[dict[str, np.ndarray]]]]:
    """name -> function giving one ordered pass over this process's share of that source's
    eval split (fixed `eval_prompt_mode` prompts), in batches of `per_process_batch` rows.

    Process p reads examples p, p + P, ...: together the processes cover the split once.
    """
    limit = config.data.eval_examples or None

    def passes(source: Any) -> Callable[[], Iterator[dict[str, np.ndarray]]]:
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
            )

        return one_pass

    return {name: passes(s) for name, s in open_sources(config, config.data.eval_split).items()}
