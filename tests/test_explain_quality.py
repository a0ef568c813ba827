"""The heatmap is honest: it points at the finding, and it depends on what the model learned."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.tf, pytest.mark.slow]

from bench.localisation import (  # noqa: E402
    heatmaps,
    pointing_game,
    positive_cases,
    randomisation_correlation,
    randomised_copy,
)
from models.loading import load_demo_model  # noqa: E402


@pytest.fixture(scope="module")
def cases():  # type: ignore[no-untyped-def]
    return positive_cases(200)


@pytest.fixture(scope="module")
def network():  # type: ignore[no-untyped-def]
    return load_demo_model().network


@pytest.fixture(scope="module")
def gradcam_maps(network, cases):  # type: ignore[no-untyped-def]
    return heatmaps(network, cases, "gradcam")


def test_pointing_game_gradcam_at_least_95_percent(gradcam_maps, cases) -> None:  # type: ignore[no-untyped-def]
    assert pointing_game(gradcam_maps, cases) >= 0.95


def test_pointing_game_fails_for_a_map_that_ignores_the_finding(gradcam_maps, cases) -> None:  # type: ignore[no-untyped-def]
    # The metric itself can fail: maps flipped left-right point into the other lung.
    assert pointing_game(gradcam_maps[:, :, ::-1], cases) < 0.2


def test_randomised_model_gives_uncorrelated_maps(network) -> None:  # type: ignore[no-untyped-def]
    subset = positive_cases(60)
    trained = heatmaps(network, subset, "gradcam")
    compared = 0
    for seed in (1, 2, 3):
        rho, pairs = randomisation_correlation(trained, heatmaps(randomised_copy(network, seed), subset, "gradcam"))
        if pairs:
            assert rho < 0.5, f"seed {seed}: rank correlation {rho:.3f} with a re-initialised model"
        compared += pairs
    assert compared >= 60  # enough non-empty maps were compared for the check to mean something
    assert randomisation_correlation(trained, trained) == (pytest.approx(1.0), len(subset.labels))
