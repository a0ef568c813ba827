"""The model-randomisation sanity check's statistics: Spearman's rank correlation as SciPy computes it, ties and
constant maps included; the check itself on the demo model lives in tests/test_explain_quality.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import spearmanr

from explain.sanity import randomisation_correlation, spearman


@pytest.mark.parametrize("seed", range(20))
def test_spearman_equals_scipy_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    # Maps after a ReLU: many exact zeros, and values rounded so that other ties occur too.
    a = np.maximum(rng.normal(size=(12, 12)), 0.0).round(1)
    b = np.maximum(0.5 * a + rng.normal(size=(12, 12)), 0.0).round(1)
    assert spearman(a, b) == pytest.approx(float(spearmanr(a.ravel(), b.ravel()).statistic), abs=1e-12)


def test_spearman_of_monotone_maps_is_one_and_of_reversed_maps_minus_one() -> None:
    a = np.arange(64, dtype=np.float32).reshape(8, 8)
    assert spearman(a, a ** 3) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)


def test_spearman_of_a_constant_map_is_nan_and_sizes_must_match() -> None:
    assert math.isnan(spearman(np.zeros((4, 4)), np.arange(16.0)))
    with pytest.raises(ValueError, match="differ in size"):
        spearman(np.zeros(4), np.zeros(5))


def test_randomisation_correlation_leaves_out_constant_pairs_and_counts_the_rest() -> None:
    rng = np.random.default_rng(1)
    maps = [rng.random((6, 6)) for _ in range(3)]
    rho, pairs = randomisation_correlation([*maps, np.zeros((6, 6))], [*maps, rng.random((6, 6))])
    assert (rho, pairs) == (pytest.approx(1.0), 3)
    rho, pairs = randomisation_correlation([np.zeros((6, 6))], [np.ones((6, 6))])
    assert math.isnan(rho) and pairs == 0
