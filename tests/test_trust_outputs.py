"""Explanation trust wired into every output of one image: result.json's evidence, the regions' label image, the
Secondary Capture's legend and alert, the ORU's OBX and NTE, the SR, and the test model's labelling. No
framework: the explanation is a stand-in whose map lies where the test puts it (on the lungs or on a marker)."""

from __future__ import annotations

import cv2
import hl7
import numpy as np
import pytest
from pydicom import Dataset

from dicom_node.commands import result_record
from dicom_node.outputs.results import TEST_LABEL
from dicom_node.peers.synthetic_cr import make_cr_dataset
from dicom_node.process.processor import ModelResult, Prepared, Processed, Processor
from dicom_node.process.rules import load_rules
from dicom_node.settings import Settings, load_settings
from explain.regions import BORDER, LUNGS, MARKERS
from explain.trust import SHARE_NAMES, TrustThresholds
from models.synthetic import AnatomySet, generate_anatomy
from tests.support.outputs import StandInExplanation, StandInModel

MAP_SIZE = 32
ALERT_RED = (200, 0, 0)


@pytest.fixture(scope="module")
def phantom() -> AnatomySet:
    """A generated chest with burned-in markers, and the generator's own lung and marker masks."""
    cases = generate_anatomy(8, 2024, markers=True)
    i = next(i for i in range(8) if cases.marker_masks[i].any())
    return AnatomySet(cases.images[i:i + 1], cases.labels[i:i + 1], cases.centers[i:i + 1], cases.radii[i:i + 1],
                      cases.lung_masks[i:i + 1], cases.body_masks[i:i + 1], cases.marker_masks[i:i + 1],
                      cases.markers[i:i + 1])


def _map_on(mask: np.ndarray) -> np.ndarray:
    """A heatmap at the model's resolution that lies on ``mask`` (the image's size)."""
    heat = cv2.resize(mask.astype(np.float32), (MAP_SIZE, MAP_SIZE), interpolation=cv2.INTER_AREA)
    return (heat / heat.max()).astype(np.float32)


def _processor(*overrides: str, model: StandInModel | None = None) -> Processor:
    settings = load_settings(None, list(overrides))
    return Processor(settings, model or StandInModel(), load_rules(None))  # type: ignore[arg-type]


def _source(phantom: AnatomySet) -> Dataset:
    return make_cr_dataset(pixels=phantom.images[0], bits_stored=8)


def _processed(processor: Processor, source: Dataset, heatmap: np.ndarray) -> Processed:
    item = processor.prepare(source)
    assert isinstance(item, Prepared)
    explanation = StandInExplanation(heatmap[np.newaxis], np.array([[0.1, 0.9]], np.float32))
    return processor.build_outputs(item, ModelResult(explanation, 0, 1.0))


def _alert_rows(overlay: np.ndarray) -> int:
    """Rows of the overlay that are the alert strip's red across the whole width (text aside)."""
    red = np.all(overlay == np.array(ALERT_RED, np.uint8), axis=2)
    return int((red.mean(axis=1) > 0.5).sum())


def test_evidence_on_the_lungs_is_ok_and_reaches_every_output(phantom: AnatomySet) -> None:
    source = _source(phantom)
    out = _processed(_processor(), source, _map_on(phantom.lung_masks[0] > 0))
    evidence = out.result.evidence
    assert evidence is not None
    # result.json's object, exactly: five shares summing to 1, the peak's region, the verdict and its reasons.
    record = result_record("x.dcm", out)
    assert list(record["evidence"]) == [*SHARE_NAMES, "peak_region", "verdict", "reasons"]
    assert sum(record["evidence"][name] for name in SHARE_NAMES) == pytest.approx(1.0, abs=1e-3)
    assert (record["evidence"]["verdict"], record["evidence"]["reasons"]) == ("ok", [])
    assert record["evidence"]["lungs"] > 0.5 and record["evidence"]["peak_region"] == "lungs"
    # The regions at the display size, labelled 0-4; the legend says the lung share, and nothing is red.
    assert out.regions is not None and out.regions.dtype == np.uint8
    item = _processor().prepare(source)
    assert isinstance(item, Prepared) and out.regions.shape == item.display.shape
    assert set(np.unique(out.regions)) <= {0, 1, 2, 3, 4} and {LUNGS, BORDER, MARKERS} <= set(np.unique(out.regions))
    assert _alert_rows(out.overlay) == 0
    msg = hl7.parse(out.oru_message)
    obx = {str(s[3][0][0]): s for s in msg.segments("OBX")}
    assert float(str(obx["lung_share"][5])) == pytest.approx(evidence["lungs"])
    assert str(obx["trust_verdict"][5]) == "ok^Explanation on the lung fields^99CXRL"
    assert not any(str(nte[3]).startswith("CHECK") for nte in msg.segments("NTE"))
    assert "trust" in out.result.timings_ms


def test_evidence_on_a_marker_is_suspect_and_cannot_be_missed(phantom: AnatomySet) -> None:
    source = _source(phantom)
    out = _processed(_processor(), source, _map_on(phantom.marker_masks[0] > 0))
    evidence = out.result.evidence
    assert evidence is not None and evidence["verdict"] == "suspect"
    assert "evidence_on_marker" in evidence["reasons"]
    warning = out.result.trust_warning
    assert warning.startswith("CHECK: ") and f"markers {100 * evidence['markers']:.0f}%" in warning
    # The SC's pixels: a red strip across the width between the radiograph and the legend.
    sc = out.secondary_capture
    assert sc is not None
    pixels = sc.pixel_array
    display_rows = out.regions.shape[0] if out.regions is not None else 0
    strip = _alert_rows(pixels)
    assert strip >= 10
    red_rows = np.flatnonzero(np.all(pixels == np.array(ALERT_RED, np.uint8), axis=2).mean(axis=1) > 0.5)
    assert red_rows.min() >= display_rows  # below the radiograph, never over it
    assert warning in str(sc.ImageComments)
    # The ORU: the verdict, the lung share, and the warning as a note.
    msg = hl7.parse(out.oru_message)
    notes = [msg.unescape(str(nte[3])) for nte in msg.segments("NTE")]
    assert notes[-1] == warning
    verdict = next(s for s in msg.segments("OBX") if str(s[3][0][0]) == "trust_verdict")
    assert str(verdict[5]) == "suspect^Explanation suspect^99CXRL"
    # The SR carries the same verdict and reason.
    sr = out.structured_report
    assert sr is not None
    meanings = _code_meanings(sr)
    assert "Explanation suspect" in meanings and "Explanation on a burned-in marker" in meanings


def _code_meanings(dataset: Dataset) -> set[str]:
    found: set[str] = set()
    for element in dataset.iterall():
        if element.keyword == "CodeMeaning":
            found.add(str(element.value))
    return found


def test_thresholds_come_from_the_trust_section(phantom: AnatomySet) -> None:
    source = _source(phantom)
    heat = _map_on(phantom.marker_masks[0] > 0)
    lenient = _processed(_processor("trust.max_marker_share=1.0", "trust.min_lung_share=0.0",
                                    "trust.max_border_share=1.0"), source, heat)
    assert lenient.result.evidence is not None and lenient.result.evidence["verdict"] == "ok"
    wide = _processed(_processor("trust.border_fraction=0.2"), source, _map_on(phantom.lung_masks[0] > 0))
    narrow = _processed(_processor(), source, _map_on(phantom.lung_masks[0] > 0))
    assert wide.regions is not None and narrow.regions is not None
    assert (wide.regions == BORDER).sum() > 2 * (narrow.regions == BORDER).sum()


def test_trust_off_leaves_every_output_without_it(phantom: AnatomySet) -> None:
    out = _processed(_processor("trust.enabled=false"), _source(phantom), _map_on(phantom.marker_masks[0] > 0))
    assert out.result.evidence is None and out.regions is None
    assert "evidence" not in result_record("x.dcm", out)
    assert "lung_share" not in out.oru_message and "trust_verdict" not in out.oru_message
    assert _alert_rows(out.overlay) == 0 and "trust" not in out.result.timings_ms


def test_the_test_model_says_so_wherever_the_demo_model_says_demo(phantom: AnatomySet) -> None:
    model = StandInModel(model_id="cxr-lens-shortcut-test-cnn", is_demo=False)
    out = _processed(_processor("model.path='builtin:shortcut'", "model.id='cxr-lens-shortcut-test-cnn'",
                                model=model), _source(phantom), _map_on(phantom.marker_masks[0] > 0))
    assert out.result.is_test and out.result.model_label == TEST_LABEL
    sc = out.secondary_capture
    assert sc is not None and TEST_LABEL in str(sc.ImageComments) and sc.SeriesDescription.endswith(" TEST")
    assert TEST_LABEL in out.oru_message and "DEMO" not in out.oru_message
    record = result_record("x.dcm", out)
    assert record["disclaimer"].endswith(TEST_LABEL)
    # The legend's model line and warning band say it too (the legend text is drawn; its lines are checked).
    assert TEST_LABEL in out.result.model_text


def test_trust_settings_are_the_thresholds_defaults() -> None:
    settings = Settings().trust
    thresholds = TrustThresholds()
    assert {k: getattr(settings, k) for k in ("max_marker_share", "max_border_share", "min_lung_share")} == {
        k: getattr(thresholds, k) for k in ("max_marker_share", "max_border_share", "min_lung_share")}
    from explain.regions import DEFAULT_BORDER_FRACTION

    assert settings.border_fraction == DEFAULT_BORDER_FRACTION and settings.enabled


@pytest.mark.parametrize(("key", "value"), [("min_lung_share", "1.5"), ("border_fraction", "0.5"),
                                            ("max_marker_share", "-0.1")])
def test_bad_thresholds_name_the_key(key: str, value: str) -> None:
    from dicom_node.errors import ConfigError

    with pytest.raises(ConfigError, match=rf"trust\.{key}"):
        load_settings(None, [f"trust.{key}={value}"])
