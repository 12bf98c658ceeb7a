"""Mixing several data sets into one training stream.

Weights (`mixture_weights`), with n_i the number of examples of data set i:

- "log_proportional" (default, SAMEO's choice): w_i = ln(1 + n_i) / sum_j ln(1 + n_j).
  The paper only says "log-proportional"; we use ln(1 + n) rather than ln(n) because the two
  agree to within 0.1 % of a weight for any real data set (n >= 1000) while ln(1 + n) stays
  positive for tiny sets (n = 1 gives ln 2 instead of 0). Big collections still dominate,
  but only logarithmically, so small high-quality sets are not drowned: sizes 100 and
  1,000,000 get weights 0.25 and 0.75 instead of 0.0001 and 0.9999.
- "proportional": w_i = n_i / sum_j n_j (every example equally likely: plain concatenation).
- "uniform": w_i = 1 / K (every data set equally likely).
- an explicit mapping name -> weight (normalised; all names must be given).

Sampling (`MixtureSelection`, a `grain` selection map): the global stream is cut into blocks
of `block_size` elements. Each block holds exactly c_i elements of data set i, with c the
largest-remainder rounding of block_size * w (at least 1 each), in an order that is a random
permutation drawn from (seed, block). So every element of a batch independently comes from
data set i with probability c_i / block_size ~ w_i, and the proportions are exact over each
block (no drift). The k-th element taken from data set i is position k of that data set's
own (shuffled, repeated) stream, so a data set's examples are all seen once per epoch of it.
Everything is a pure function of (seed, global index): deterministic, resumable from an
index, and safe across grain worker processes.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence

import grain
import numpy as np
from grain.transforms import DatasetSelectionMap

MIXTURE_RULES = ("log_proportional", "proportional", "uniform")


def mixture_weights(sizes: Mapping[str, int],
                    rule: str | Mapping[str, float] = "log_proportional") -> dict[str, float]:
    """Normalised sampling weight per data set (see the module docstring for the formulas).

    sizes: name -> number of examples (> 0). rule: one of MIXTURE_RULES or a mapping
    name -> non-negative weight covering exactly the names of `sizes`.
    """
    if not sizes:
        raise ValueError("mixture: no data sets given")
    for name, n in sizes.items():
        if int(n) <= 0:
            raise ValueError(f"mixture: data set {name!r} is empty (size {n})")
    names = list(sizes)
    if isinstance(rule, Mapping):
        if set(rule) != set(names):
            raise ValueError(
                f"mixture: explicit weights name {sorted(rule)}, data sets are {sorted(names)}")
        raw = [float(rule[k]) for k in names]
        if any(not math.isfinite(w) or w < 0 for w in raw) or sum(raw) <= 0:
            raise ValueError(f"mixture: weights must be finite, >= 0, not all 0; got {dict(rule)}")
    elif rule == "log_proportional":
        raw = [math.log1p(int(sizes[k])) for k in names]
    elif rule == "proportional":
        raw = [float(sizes[k]) for k in names]
    elif rule == "uniform":
        raw = [1.0] * len(names)
    else:
        raise ValueError(f"mixture: unknown rule {rule!r}; expected one of {MIXTURE_RULES} "
                         "or a mapping name -> weight")
    total = sum(raw)
    return {k: w / total for k, w in zip(names, raw, strict=True)}


def block_counts(weights: Sequence[float], block_size: int) -> np.ndarray:
    """Largest-remainder rounding of block_size * weights, every positive weight >= 1.

    Returns [K] int64 summing to block_size.
    """
    w = np.asarray(weights, np.float64)
    if w.ndim != 1 or len(w) == 0 or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"mixture: bad weights {list(weights)}")
    positive = w > 0
    if block_size < positive.sum():
        raise ValueError(f"mixture: block_size {block_size} < number of data sets {len(w)}")
    w = w / w.sum()
    exact = w * block_size
    counts = np.floor(exact).astype(np.int64)
    counts[positive & (counts == 0)] = 1
    while counts.sum() > block_size:  # the minimum of 1 overshot: take from the largest
        counts[np.argmax(counts)] -= 1
    remainder = exact - counts
    for k in np.argsort(-remainder, kind="stable")[: block_size - counts.sum()]:
        counts[k] += 1
    return counts


class MixtureSelection(DatasetSelectionMap):
    """grain selection map: global index -> (data set index, index within that data set).

    weights: [K] sampling weights; seed: mixing seed; block_size: see the module docstring.
    Infinite (len = sys.maxsize): the data sets must be repeated streams.
    """

    def __init__(self, weights: Sequence[float], seed: int, block_size: int = 1024):
        self.counts = block_counts(weights, block_size)
        self.block_size = int(block_size)
        self.seed = int(seed)
        self._labels = np.repeat(np.arange(len(self.counts)), self.counts)

    def __len__(self) -> int:
        return sys.maxsize

    def block(self, block: int) -> np.ndarray:
        """[block_size] data set index of every element of one block."""
        rng = np.random.default_rng([self.seed, int(block)])
        return rng.permutation(self._labels)

    def __getitem__(self, index: int) -> tuple[int, int]:
        block, offset = divmod(int(index), self.block_size)
        labels = self.block(block)
        dataset = int(labels[offset])
        rank = int(np.count_nonzero(labels[:offset] == dataset))
        return dataset, block * int(self.counts[dataset]) + rank

    def __repr__(self) -> str:
        return (f"MixtureSelection(counts={self.counts.tolist()}, seed={self.seed}, "
                f"block_size={self.block_size})")


def mix_datasets(datasets: Sequence[grain.MapDataset], weights: Sequence[float], *, seed: int,
                 block_size: int = 1024) -> grain.MapDataset:
    """Infinite mixture of infinite (repeated) MapDatasets, sampled per `MixtureSelection`."""
    if len(datasets) != len(weights):
        raise ValueError(f"mixture: {len(datasets)} data sets but {len(weights)} weights")
    selection = MixtureSelection(weights, seed, block_size)
    return grain.MapDataset.select_from_datasets(list(datasets), selection)
