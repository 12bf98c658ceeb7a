"""The optimizer: AdamW on the trainable parameters, exact zeros for the frozen ones.

Which parameters learn is declared in the config as `trainable`: regular expressions matched
(`re.match`, i.e. anchored at the start) against each parameter's '/'-joined path, e.g.
'mask_decoder/' (SAMEO: only the mask decoder learns) or '.*' (everything).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import ml_collections
import optax
from flax import traverse_util

Params = Any  # nested dict of arrays

TRAINABLE, FROZEN = "trainable", "frozen"


def trainable_labels(params: Params, patterns: Sequence[str]) -> Params:
    """Same tree as `params` with 'trainable' / 'frozen' leaves.

    Raises ValueError for an invalid pattern or one that matches no parameter (a typo would
    otherwise silently freeze everything).
    """
    if isinstance(patterns, str):
        patterns = (patterns,)
    compiled = []
    for p in patterns:
        try:
            compiled.append(re.compile(p))
        except re.error as e:
            raise ValueError(f"config.trainable: invalid pattern {p!r}: {e}") from None
    flat = traverse_util.flatten_dict(params)
    paths = {k: "/".join(k) for k in flat}
    for pattern, regex in zip(patterns, compiled, strict=True):
        if not any(regex.match(path) for path in paths.values()):
            tops = sorted({k[0] for k in flat})
            raise ValueError(
                f"config.trainable: pattern {pattern!r} matches no parameter "
                f"(paths look like '{tops[0]}/...'; top-level names: {tops})"
            )
    labels = {
        k: TRAINABLE if any(r.match(path) for r in compiled) else FROZEN
        for k, path in paths.items()
    }
    return traverse_util.unflatten_dict(labels)


def split_params(params: Params, labels: Params) -> tuple[Params, Params]:
    """params -> (trainable subtree, frozen subtree): nested dicts holding disjoint leaves."""
    flat = traverse_util.flatten_dict(params)
    flat_labels = traverse_util.flatten_dict(labels)
    trainable = {k: v for k, v in flat.items() if flat_labels[k] == TRAINABLE}
    frozen = {k: v for k, v in flat.items() if flat_labels[k] == FROZEN}
    return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def merge_params(trainable: Params, frozen: Params) -> Params:
    """Inverse of `split_params`."""
    flat = traverse_util.flatten_dict(trainable)
    flat.update(traverse_util.flatten_dict(frozen))
    return traverse_util.unflatten_dict(flat)


def count_params(params: Params) -> int:
    return sum(int(v.size) for v in traverse_util.flatten_dict(params).values())


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warmup over `warmup_steps`, then `lr_schedule` ('cosine' to 0 or 'constant')."""
    total, warmup = int(config.total_steps), int(config.warmup_steps)
    if config.lr_schedule == "constant":
        main = optax.constant_schedule(config.lr)
    elif config.lr_schedule == "cosine":
        main = optax.cosine_decay_schedule(config.lr, max(total - warmup, 1))
    else:
        raise ValueError(
            f"config.lr_schedule={config.lr_schedule!r}: expected 'cosine' or 'constant'"
        )
    if warmup <= 0:
        return main
    return optax.join_schedules(
        [optax.linear_schedule(0.0, config.lr, warmup), main], boundaries=[warmup]
    )


def make_optimizer(
    config: ml_collections.ConfigDict, labels: Params
) -> optax.GradientTransformation:
    """AdamW (+ global-norm clipping) on 'trainable' leaves; `set_to_zero` on 'frozen' ones.

    `optax.masked(adamw, mask)` alone would pass the raw gradients of masked-out leaves through
    as updates; `multi_transform` with `set_to_zero` really freezes them (and keeps no Adam
    moments for them).
    """
    parts = []
    if config.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
    parts.append(
        optax.adamw(learning_rate_schedule(config), b1=config.adam_b1, b2=config.adam_b2,
                    weight_decay=config.weight_decay)
    )
    return optax.multi_transform(
        {TRAINABLE: optax.chain(*parts), FROZEN: optax.set_to_zero()}, labels
    )
