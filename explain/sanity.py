"""The model-randomisation sanity check (Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018).

A method whose maps stay the same when the model's weights are re-initialised shows the input (its edges), not
what the model learnt. The check compares the trained model's maps with those of a copy of the same architecture
with freshly initialised weights by Spearman rank correlation: low means the maps depend on the learnt weights.
Keras is imported only by the functions that clone a model; the correlation itself is numpy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two equally sized arrays (ties get their average rank, as SciPy's
    ``spearmanr`` does); NaN when either is constant."""
    x, y = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"the arrays differ in size: {x.size} and {y.size}")
    rx, ry = _average_ranks(x), _average_ranks(y)
    rx -= rx.mean()
    ry -= ry.mean()
    denominator = float(np.sqrt((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum() / denominator) if denominator > 0.0 else float("nan")


def _average_ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    # Runs of equal values share the mean of the ranks they span (1-based).
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], ordered.size]
    mean_rank = (starts + ends + 1) / 2.0
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def randomisation_correlation(trained: Sequence[np.ndarray], randomised: Sequence[np.ndarray]) -> tuple[float, int]:
    """Mean per-image Spearman rank correlation between two sets of maps, and over how many images.

    Pairs where either map is constant (e.g. all zero after the ReLU) carry no ranking and are left out; the
    count says how many pairs were compared, so a check cannot pass on empty maps alone.
    """
    values = [spearman(a, b) for a, b in zip(trained, randomised, strict=True) if np.ptp(a) > 0 and np.ptp(b) > 0]
    return (float(np.mean(values)) if values else float("nan")), len(values)


def randomised_copy(network: Any, seed: int = 0) -> Any:
    """The same architecture with freshly initialised weights (Keras 3 or tf_keras, whichever built it)."""
    if type(network).__module__.startswith("tf_keras"):
        import tf_keras

        tf_keras.utils.set_random_seed(seed)
        return tf_keras.models.clone_model(network)
    import keras

    keras.utils.set_random_seed(seed)
    return keras.models.clone_model(network)


def randomisation_check(
    model: Any,
    images: np.ndarray,
    class_index: Sequence[int],
    *,
    method: str = "gradcam",
    target_layer: str | None = None,
    seeds: Sequence[int] = (1,),
) -> tuple[float, int]:
    """Correlate ``model``'s maps of ``images`` (preprocessed, as for :func:`explain.explain`) for ``class_index``
    with those of one re-initialised copy per seed: (mean Spearman correlation, pairs compared)."""
    from explain.engine import explain

    network = getattr(model, "network", model)
    if target_layer is None:
        target_layer = getattr(model, "target_layer", None)
    layer = None if target_layer in (None, "auto") else target_layer
    trained = explain(network, images, method=method, class_index=list(class_index), target_layer=layer).heatmaps
    totals, pairs = 0.0, 0
    for seed in seeds:
        copy = randomised_copy(network, seed)
        randomised = explain(copy, images, method=method, class_index=list(class_index), target_layer=layer).heatmaps
        rho, n = randomisation_correlation(list(trained), list(randomised))
        if n:
            totals += rho * n
            pairs += n
    return (totals / pairs if pairs else float("nan")), pairs
