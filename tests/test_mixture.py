"""Data set mixture: weight formulas, empirical proportions, per-data-set order."""

import math
import pickle

import grain
import numpy as np
import pytest

from sameo_jax.data import mixture


def test_weight_rules():
    sizes = {"a": 100, "b": 1_000_000, "c": 1}
    w = mixture.mixture_weights(sizes)
    logs = [math.log(101), math.log(1_000_001), math.log(2)]
    for name, expected in zip(sizes, logs, strict=True):
        assert w[name] == pytest.approx(expected / sum(logs))
    w = mixture.mixture_weights(sizes, "proportional")
    assert w["b"] == pytest.approx(1_000_000 / 1_000_101)
    assert mixture.mixture_weights(sizes, "uniform") == pytest.approx(
        {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})
    assert mixture.mixture_weights(sizes, {"a": 1, "b": 3, "c": 0}) == pytest.approx(
        {"a": 0.25, "b": 0.75, "c": 0.0})


def test_weight_errors():
    with pytest.raises(ValueError, match="unknown rule 'log'"):
        mixture.mixture_weights({"a": 3}, "log")
    with pytest.raises(ValueError, match="'a' is empty"):
        mixture.mixture_weights({"a": 0})
    with pytest.raises(ValueError, match="explicit weights name"):
        mixture.mixture_weights({"a": 3, "b": 4}, {"a": 1.0})
    with pytest.raises(ValueError, match="no data sets"):
        mixture.mixture_weights({})


def test_block_counts():
    counts = mixture.block_counts([0.5, 0.3, 0.2], 10)
    assert counts.tolist() == [5, 3, 2]
    counts = mixture.block_counts([0.999, 0.0005, 0.0005], 100)
    assert counts.tolist() == [98, 1, 1] and counts.sum() == 100  # every data set present
    counts = mixture.block_counts([1 / 3] * 3, 100)
    assert sorted(counts.tolist()) == [33, 33, 34]


def test_empirical_mixture_matches_weights():
    w = mixture.mixture_weights({"small": 200, "mid": 20_000, "big": 2_000_000})
    weights = list(w.values())
    selection = mixture.MixtureSelection(weights, seed=11, block_size=1024)
    total = 30_000  # not a whole number of blocks
    picks = np.array([selection[i] for i in range(total)])
    freq = np.bincount(picks[:, 0], minlength=3) / total
    sigma = np.sqrt(np.array(weights) * (1 - np.array(weights)) / total)
    assert np.all(np.abs(freq - weights) < 4 * sigma + 1 / 1024)
    # Each data set is read in its own order: positions 0, 1, 2, ... without gaps.
    for d in range(3):
        positions = picks[picks[:, 0] == d, 1]
        np.testing.assert_array_equal(positions, np.arange(len(positions)))
    # Batches are random mixtures, not a fixed pattern.
    per_batch = [np.bincount(picks[b : b + 16, 0], minlength=3)[0] for b in range(0, 4096, 16)]
    assert len(set(per_batch)) > 3
    np.testing.assert_allclose(np.mean(per_batch) / 16, weights[0], atol=0.03)


def test_selection_is_deterministic_and_picklable():
    a = mixture.MixtureSelection([0.6, 0.4], seed=3, block_size=64)
    b = pickle.loads(pickle.dumps(a))
    assert [a[i] for i in range(200)] == [b[i] for i in range(200)]
    c = mixture.MixtureSelection([0.6, 0.4], seed=4, block_size=64)
    assert [a[i] for i in range(200)] != [c[i] for i in range(200)]
    # Order-free: index 150 alone gives the same answer.
    assert mixture.MixtureSelection([0.6, 0.4], seed=3, block_size=64)[150] == a[150]


def test_mix_datasets_with_grain():
    ds = mixture.mix_datasets(
        [grain.MapDataset.range(5).repeat(), grain.MapDataset.range(100, 103).repeat()],
        [0.5, 0.5], seed=0, block_size=16)
    values = [ds[i] for i in range(64)]
    small = [v for v in values if v < 100]
    big = [v for v in values if v >= 100]
    assert len(small) == len(big) == 32
    assert small[:10] == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]
    assert big[:6] == [100, 101, 102, 100, 101, 102]
    with pytest.raises(ValueError, match="2 data sets but 1 weights"):
        mixture.mix_datasets([grain.MapDataset.range(2)] * 2, [1.0], seed=0)
