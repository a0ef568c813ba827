"""Evidence per region and the trust verdict: synthetic heatmaps on known regions, and the alarm on two models.

The last test is the point of the feature: over held-out generated radiographs, the shortcut test model (its
label carried only by a burned-in token) is called suspect, the demo model (which looks at the opacity) is not.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pydicom
import pytest

from dicom_node.imaging.pixels import render_display
from explain.regions import BORDER, LUNGS, MARKERS, Regions, anatomy_regions
from explain.trust import (
    NO_LUNG_FIELDS,
    NO_PEAK,
    OK,
    ON_BORDER,
    ON_MARKER,
    OUTSIDE_LUNGS,
    SHARE_NAMES,
    SUSPECT,
    Evidence,
    TrustThresholds,
    evidence,
    verdict,
)
from models.synthetic import generate_anatomy, generate_shortcut
from tests.support.peers import sample

ALARM_CASES = 200


def _blob(shape: tuple[int, int], centre: tuple[float, float], sigma: float) -> np.ndarray:
    rr, cc = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float32)
    return np.exp(-((rr - centre[0]) ** 2 + (cc - centre[1]) ** 2) / (2 * sigma**2)).astype(np.float32)


@pytest.fixture(scope="module")
def marked():  # type: ignore[no-untyped-def]
    """A phantom with a laterality letter, and its regions."""
    cases = generate_anatomy(12, 77, markers=True)
    i = next(k for k in range(12) if anatomy_regions(cases.images[k]).markers.any())
    return cases, i, anatomy_regions(cases.images[i])


def test_shares_sum_to_one_and_dict_has_exactly_the_fields(marked) -> None:  # type: ignore[no-untyped-def]
    _, _, regions = marked
    rng = np.random.default_rng(3)
    for shape in ((32, 32), (8, 8), (7, 11), regions.shape):
        e = evidence(rng.random(shape).astype(np.float32), regions)
        assert abs(sum(e.shares().values()) - 1.0) < 1e-6
        d = e.as_dict()
        assert list(d) == [*SHARE_NAMES, "peak_region", "verdict", "reasons"]
        assert abs(sum(d[name] for name in SHARE_NAMES) - 1.0) < 1e-3
        assert all(isinstance(d[name], float) and round(d[name], 3) == d[name] for name in SHARE_NAMES)
        assert isinstance(d["reasons"], list) and d["verdict"] in (OK, SUSPECT, NO_LUNG_FIELDS)


def test_shares_follow_the_label_image(marked) -> None:  # type: ignore[no-untyped-def]
    _, _, regions = marked
    labels = regions.label_image()
    # A heatmap at the display size that is 1 on exactly one label's pixels puts all of its evidence there.
    for label, name in ((LUNGS, "lungs"), (BORDER, "border"), (MARKERS, "markers")):
        e = evidence((labels == label).astype(np.float32), regions)
        assert getattr(e, name) == pytest.approx(1.0, abs=1e-6), name
        assert e.peak_region == name
    # A uniform map: each share is the region's share of the image.
    e = evidence(np.ones((32, 32), np.float32), regions)
    assert e.markers == pytest.approx(float(np.mean(labels == MARKERS)), abs=1e-4)
    assert e.lungs == pytest.approx(float(np.mean(labels == LUNGS)), abs=1e-4)


def test_precedence_counts_a_marker_on_the_border_as_marker() -> None:
    shape = (40, 40)
    body = np.ones(shape, dtype=bool)
    lungs = np.zeros(shape, dtype=bool)
    lungs[10:30, 8:18] = True
    right = np.zeros(shape, dtype=bool)
    right[10:30, 22:32] = True
    border = np.zeros(shape, dtype=bool)
    border[:2], border[-2:], border[:, :2], border[:, -2:] = True, True, True, True
    markers = np.zeros(shape, dtype=bool)
    markers[0:6, 0:6] = True  # over the border band
    regions = Regions(body, lungs, right, border, markers, True, "ok")
    heat = np.zeros(shape, np.float32)
    heat[0:2, 0:6] = 1.0  # on the marker where it overlaps the border
    e = evidence(heat, regions)
    assert e.markers == pytest.approx(1.0) and e.border == 0.0
    assert e.verdict == SUSPECT and ON_MARKER in e.reasons and ON_BORDER not in e.reasons


def test_only_the_positive_part_counts(marked) -> None:  # type: ignore[no-untyped-def]
    _, _, regions = marked
    labels = regions.label_image()
    heat = np.where(labels == LUNGS, 1.0, -5.0).astype(np.float32)
    assert evidence(heat, regions).lungs == pytest.approx(1.0, abs=1e-6)


def test_a_map_on_the_marker_is_suspect(marked) -> None:  # type: ignore[no-untyped-def]
    cases, i, regions = marked
    marker = cases.markers[i][0]
    r0, c0, r1, c1 = marker.box
    heat = _blob(regions.shape, ((r0 + r1) / 2, (c0 + c1) / 2), 4.0)
    e = evidence(heat, regions)
    assert e.peak_region == "markers"
    assert e.verdict == SUSPECT and e.reasons[0] == ON_MARKER and OUTSIDE_LUNGS in e.reasons


def test_a_map_on_the_border_is_suspect(marked) -> None:  # type: ignore[no-untyped-def]
    _, _, regions = marked
    h, w = regions.shape
    heat = np.zeros(regions.shape, np.float32)
    heat[:, : max(1, w // 40)] = 1.0  # a strip along the left edge, inside the band
    heat[regions.markers] = 0.0
    e = evidence(heat, regions)
    assert e.border == pytest.approx(1.0, abs=1e-6) and e.peak_region == "border"
    assert e.verdict == SUSPECT and ON_BORDER in e.reasons and ON_MARKER not in e.reasons


def test_a_map_on_the_lungs_is_ok(marked) -> None:  # type: ignore[no-untyped-def]
    cases, i, regions = marked
    rows, cols = np.nonzero(cases.lung_masks[i] == 1)
    heat = _blob(regions.shape, (rows.mean(), cols.mean()), 8.0)
    e = evidence(heat, regions)
    assert e.lungs > 0.9 and e.peak_region == "lungs"
    assert (e.verdict, e.reasons) == (OK, ())
    # The same map at the Grad-CAM's 32x32 resolution, upsampled by evidence(): the same verdict.
    small = heat[:: regions.shape[0] // 32, :: regions.shape[1] // 32][:32, :32]
    assert evidence(small, regions).verdict == OK


def test_an_all_zero_map_spreads_evenly_and_raises_nothing(marked) -> None:  # type: ignore[no-untyped-def]
    _, _, regions = marked
    e = evidence(np.zeros((32, 32), np.float32), regions)
    assert e.no_evidence and e.peak_region == NO_PEAK
    assert (e.verdict, e.reasons) == (OK, ())
    labels = regions.label_image()
    assert e.lungs == pytest.approx(float(np.mean(labels == LUNGS)), abs=1e-6)
    assert abs(sum(e.as_dict()[n] for n in SHARE_NAMES) - 1.0) < 1e-3


def test_no_lung_fields_on_an_extremity() -> None:
    display = np.asarray(render_display(pydicom.dcmread(sample("RG3_UNCR.dcm")), max_long_side=512).pixels)
    regions = anatomy_regions(display)
    e = evidence(_blob(regions.shape, (250.0, 250.0), 30.0), regions)
    assert e.verdict == NO_LUNG_FIELDS and OUTSIDE_LUNGS not in e.reasons
    assert e.lungs == 0.0
    assert evidence(np.zeros((8, 8), np.float32), regions).verdict == NO_LUNG_FIELDS


def test_thresholds_decide_the_verdict(marked) -> None:  # type: ignore[no-untyped-def]
    _, _, regions = marked
    e = dataclasses.replace(evidence(np.ones((32, 32), np.float32), regions), markers=0.2, border=0.2, lungs=0.3)
    assert verdict(e, regions, TrustThresholds()) == (SUSPECT, (ON_MARKER,))
    strict = TrustThresholds(max_marker_share=0.5, max_border_share=0.1, min_lung_share=0.5)
    assert verdict(e, regions, strict) == (SUSPECT, (ON_BORDER, OUTSIDE_LUNGS))
    lenient = TrustThresholds(max_marker_share=1.0, max_border_share=1.0, min_lung_share=0.0)
    assert verdict(e, regions, lenient) == (OK, ())
    with pytest.raises(ValueError):
        TrustThresholds(min_lung_share=1.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        TrustThresholds().min_lung_share = 0.2  # type: ignore[misc]


def test_as_dict_rounds_to_shares_that_sum_to_one() -> None:
    e = Evidence(lungs=0.33334, body=0.33333, outside_body=0.33333, border=0.0, markers=0.0,
                 peak_region="lungs", verdict=OK, reasons=())
    d = e.as_dict()
    assert sum(d[n] for n in SHARE_NAMES) == pytest.approx(1.0, abs=1e-9)
    assert d == {"lungs": 0.334, "body": 0.333, "outside_body": 0.333, "border": 0.0, "markers": 0.0,
                 "peak_region": "lungs", "verdict": "ok", "reasons": []}


@pytest.mark.tf
def test_the_alarm_separates_the_shortcut_model_from_the_demo_model() -> None:
    from bench.trust import judge, positives, suspect_rate
    from models.loading import load_demo_model, load_shortcut_model

    shortcut = load_shortcut_model()
    assert "test" in shortcut.model_id and not shortcut.is_demo
    thresholds = TrustThresholds()
    # Held-out sets: the seeds each model's metrics.json names as held out, never trained on.
    shortcut_calls = positives(judge(shortcut, generate_shortcut(ALARM_CASES, 103), thresholds))
    demo_calls = positives(judge(load_demo_model(), generate_anatomy(ALARM_CASES, 3), thresholds))
    assert len(shortcut_calls) >= 0.3 * ALARM_CASES and len(demo_calls) >= 0.3 * ALARM_CASES
    assert suspect_rate(shortcut_calls) >= 0.90, f"shortcut model: {suspect_rate(shortcut_calls):.1%} suspect"
    assert suspect_rate(demo_calls) <= 0.05, f"demo model: {suspect_rate(demo_calls):.1%} suspect"
    # Suspect for the right reason: the evidence of the shortcut's calls lies on the token.
    on_marker = sum(ON_MARKER in j.evidence.reasons for j in shortcut_calls) / len(shortcut_calls)
    assert on_marker >= 0.90
