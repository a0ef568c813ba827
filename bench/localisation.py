"""Does the heatmap point at the finding? ``python -m bench.localisation [--cases N]``.

Two checks on the demo model with held-out synthetic cases whose finding positions are known:

* pointing game (Zhang et al. 2016): the hit rate of the heatmap's peak (upsampled to the image) inside the
  finding, for every method;
* model-randomisation sanity check (Adebayo et al. 2018): the Spearman rank correlation between the trained
  model's maps and those of the same architecture with re-initialised weights. A method that passes shows
  low correlation: its maps depend on what the model learned, not only on the input's edges.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from explain.sanity import randomisation_correlation, randomised_copy
from models.synthetic import SyntheticSet, generate

POINTING_SEED = 4242  # disjoint from the training (1), validation (2) and held-out accuracy (3) seeds
FINDING = 1  # index of "focal_opacity"


def positive_cases(n: int, seed: int = POINTING_SEED) -> SyntheticSet:
    return generate(n, seed, positive_fraction=1.0)


def heatmaps(network: object, cases: SyntheticSet, method: str, batch: int = 32) -> np.ndarray:
    """Maps for the finding class, upsampled to the image size."""
    from explain import explain
    from explain.render import upsample
    from models.train_demo import to_input

    x = to_input(cases.images)
    size = cases.images.shape[1:]
    maps = []
    for start in range(0, len(x), batch):
        e = explain(network, x[start:start + batch], method=method, class_index=FINDING)
        maps.extend(upsample(m, size) for m in e.heatmaps)
    return np.stack(maps)


def pointing_game(maps: np.ndarray, cases: SyntheticSet) -> float:
    hits = 0
    for i, m in enumerate(maps):
        peak = np.unravel_index(int(np.argmax(m)), m.shape)
        hits += bool(m.max() > 0 and cases.finding_mask(i)[peak])
    return hits / len(maps)


def main(argv: list[str] | None = None) -> int:
    from explain import METHODS, configure_device
    from models.loading import load_demo_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=200)
    args = parser.parse_args(argv)
    configure_device(mixed_precision=False)  # memory growth; maps in float32, as the figures were measured
    network = load_demo_model().network
    cases = positive_cases(args.cases)
    random_nets = [randomised_copy(network, seed) for seed in (1, 2, 3)]
    print(f"demo model, {args.cases} held-out synthetic cases with one focal opacity each (seed {POINTING_SEED})")
    print("spearman: trained vs re-initialised weights (3 seeds), over the pairs where both maps are not constant")
    print(f"{'method':<16}{'pointing game':>14}{'spearman vs randomised':>24}{'pairs':>8}{'s':>8}")
    for method in METHODS:
        t = time.perf_counter()
        maps = heatmaps(network, cases, method)
        checks = [randomisation_correlation(maps, heatmaps(r, cases, method)) for r in random_nets]
        rho, pairs = zip(*checks, strict=True)
        valid = [r for r, n in zip(rho, pairs, strict=True) if n]
        mean_rho = float(np.average(valid, weights=[n for n in pairs if n])) if valid else float("nan")
        print(f"{method:<16}{pointing_game(maps, cases):>14.3f}{mean_rho:>24.3f}{sum(pairs):>8d}"
              f"{time.perf_counter() - t:>8.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
