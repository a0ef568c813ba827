"""Does the trust alarm separate a model that looks at the lungs from one that looks at the snow?
``python -m bench.trust [--cases N]``.

Explains held-out generated radiographs with two models and tabulates the verdicts by reason:

* the shortcut TEST model (``builtin:shortcut``) on its own held-out set, where the label is carried only by a
  burned-in token outside the lungs: its "focal_opacity" calls should be ``suspect``;
* the demo model (``builtin:demo``) on its own held-out set (seed 3, never trained on): they should be ``ok``;
* the demo model on the same phantoms with random laterality letters, labels and rulers burned in, which it
  never saw in training (a bright letter can pass for a bright opacity; when its evidence then lies on the
  letter, the alarm is right to fire).

It prints the share percentiles that the defaults of :class:`explain.trust.TrustThresholds` are set between,
and the added cost per image of regions + evidence at the node's default overlay size. ``--regions-png``
writes RG1's regions (pydicom-data) colour-mapped over the radiograph, for a look by eye.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from explain.regions import anatomy_regions, label_overlay
from explain.trust import REASONS, SUSPECT, VERDICTS, Evidence, TrustThresholds, evidence
from models.synthetic import AnatomySet, generate_anatomy, generate_shortcut

DEMO_HELD_OUT_SEED = 3  # models.train_demo.HELD_OUT_SEED
SHORTCUT_HELD_OUT_SEED = 103  # models.train_shortcut.HELD_OUT_SEED
FINDING = 1  # index of "focal_opacity"


@dataclass(frozen=True)
class Judged:
    """One explained case: the predicted class and the evidence of its map."""

    predicted: int
    evidence: Evidence


def judge(model: object, cases: AnatomySet, thresholds: TrustThresholds, batch: int = 32) -> list[Judged]:
    """Predict, explain the predicted class and judge the evidence of every case."""
    from explain import explain
    from models.train_demo import to_input

    judged: list[Judged] = []
    for start in range(0, len(cases.images), batch):
        images = cases.images[start:start + batch]
        result = explain(model, to_input(images))
        for image, predicted, heatmap in zip(images, result.class_index, result.heatmaps, strict=True):
            judged.append(Judged(int(predicted), evidence(heatmap, anatomy_regions(image), thresholds)))
    return judged


def verdict_table(judged: Sequence[Judged]) -> dict[str, int]:
    """Counts: cases, each verdict, and each reason (a case can have several reasons)."""
    counts: Counter[str] = Counter({"cases": len(judged)})
    for item in judged:
        counts[item.evidence.verdict] += 1
        counts.update(item.evidence.reasons)
    return {key: counts[key] for key in ("cases", *VERDICTS, *REASONS)}


def suspect_rate(judged: Sequence[Judged]) -> float:
    return sum(j.evidence.verdict == SUSPECT for j in judged) / max(1, len(judged))


def positives(judged: Sequence[Judged]) -> list[Judged]:
    return [j for j in judged if j.predicted == FINDING]


def _percentiles(judged: Sequence[Judged], name: str) -> str:
    values = np.array([getattr(j.evidence, name) for j in judged])
    if values.size == 0:
        return "-"
    p = np.percentile(values, [0, 5, 50, 95, 100])
    return " ".join(f"{v:.3f}" for v in p)


def cost_per_image(display: np.ndarray, heatmap_shape: tuple[int, int], repeats: int) -> float:
    """Median milliseconds of anatomy_regions + evidence for one display image and a random heatmap."""
    rng = np.random.default_rng(0)
    heatmap = rng.random(heatmap_shape).astype(np.float32)
    thresholds = TrustThresholds()
    evidence(heatmap, anatomy_regions(display), thresholds)  # first call outside the timing
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        evidence(heatmap, anatomy_regions(display), thresholds)
        times.append(time.perf_counter() - started)
    return 1e3 * float(np.median(times))


def _rg1_display(long_side: int) -> np.ndarray | None:
    import pydicom
    from pydicom.data import get_testdata_file

    from dicom_node.imaging.pixels import render_display

    path = get_testdata_file("RG1_UNCR.dcm")
    if path is None:
        return None
    return np.asarray(render_display(pydicom.dcmread(path), max_long_side=long_side).pixels)


def main(argv: list[str] | None = None) -> int:
    from dicom_node.settings import PixelSettings
    from models.loading import load_demo_model, load_shortcut_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=400, help="held-out cases per data set")
    parser.add_argument("--repeats", type=int, default=200, help="timed calls for the cost per image")
    parser.add_argument("--regions-png", type=Path, default=Path("/tmp/rg1_regions.png"))
    args = parser.parse_args(argv)
    thresholds = TrustThresholds()
    print(f"thresholds: {thresholds}")
    runs = {
        "shortcut model, shortcut held-out": (load_shortcut_model(), generate_shortcut(args.cases,
                                                                                        SHORTCUT_HELD_OUT_SEED)),
        "demo model, demo held-out": (load_demo_model(), generate_anatomy(args.cases, DEMO_HELD_OUT_SEED)),
        "demo model, demo held-out + markers": (load_demo_model(), generate_anatomy(args.cases, DEMO_HELD_OUT_SEED,
                                                                                      markers=True)),
    }
    header = f"{'run':<38}{'predictions':<13}" + "".join(f"{k:>24}" for k in ("cases", *VERDICTS, *REASONS))
    tables = []
    for name, (model, cases) in runs.items():
        started = time.perf_counter()
        judged = judge(model, cases, thresholds)
        seconds = time.perf_counter() - started
        tables.append((name, judged, seconds))
    print("\nverdicts by reason (a case may have several reasons)")
    print(header)
    for name, judged, _ in tables:
        for label, subset in (("focal_opacity", positives(judged)),
                              ("no_finding", [j for j in judged if j.predicted != FINDING])):
            row = verdict_table(subset)
            print(f"{name:<38}{label:<13}" + "".join(f"{row[k]:>24}" for k in row))
    print("\nsuspect rate of the focal_opacity calls")
    for name, judged, seconds in tables:
        print(f"  {name:<38}{100 * suspect_rate(positives(judged)):6.1f}%   ({seconds:.1f} s for {len(judged)} cases)")
    print("\nshares of the focal_opacity calls: min p5 p50 p95 max")
    for name, judged, _ in tables:
        for share in ("lungs", "markers", "border"):
            print(f"  {name:<38}{share:<9}{_percentiles(positives(judged), share)}")

    long_side = int(PixelSettings.model_fields["overlay_max_long_side"].default)
    print(f"\nadded cost per image, regions + evidence (32x32 map), display long side {long_side}:")
    rg1 = _rg1_display(long_side)
    phantom = cv2.resize(generate_anatomy(1, 7, markers=True).images[0], (long_side, long_side),
                         interpolation=cv2.INTER_LINEAR)
    for name, display in (("RG1 (pydicom-data)", rg1), ("generated phantom", phantom)):
        if display is None:
            print(f"  {name}: not available (pip install pydicom-data)")
            continue
        ms = cost_per_image(display, (32, 32), args.repeats)
        print(f"  {name:<22}{display.shape[0]}x{display.shape[1]}  {ms:.2f} ms (median of {args.repeats})")
    if rg1 is not None:
        regions = anatomy_regions(rg1)
        args.regions_png.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(args.regions_png), cv2.cvtColor(label_overlay(rg1, regions.label_image()), cv2.COLOR_RGB2BGR))
        print(f"\nRG1 regions ({regions.lung_finding}; lungs {regions.lungs.mean():.1%} of the image) written to "
              f"{args.regions_png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
