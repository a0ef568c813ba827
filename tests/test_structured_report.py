"""The TID 1500 Structured Report: highdicom-built, judged by dciodvfy, PixelMed's SR validator and dcmtk's
dsrdump, read back by highdicom."""

from __future__ import annotations

import contextlib
import copy
import pickle
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dicom_node.outputs import structured_report
from dicom_node.outputs.parametric_map import build_parametric_map
from dicom_node.outputs.results import InferenceResult
from dicom_node.outputs.secondary_capture import build_secondary_capture
from dicom_node.outputs.structured_report import (
    COMPREHENSIVE_3D_SR_STORAGE,
    DEMO_LABEL_CODES,
    LUNG_SHARE,
    PRIVATE_SCHEME,
    PROCEDURE_REPORTED,
    TRUST_REASON,
    TRUST_VERDICT,
    InstanceReference,
    StructuredReportError,
    build_structured_report,
    structured_report_uids,
)
from tests.support.dicom_tools import (
    dciodvfy_errors,
    dsrdump,
    pixelmed_sr_errors,
    requires_dciodvfy,
    requires_dsrdump,
    requires_pixelmed,
)
from tests.support.outputs import SOURCE_KINDS, inference_result, part10_bytes, source_radiograph

EVIDENCE = {
    "lungs": 0.31,
    "body": 0.12,
    "outside_body": 0.02,
    "border": 0.53,
    "markers": 0.02,
    "peak_region": "border",
    "verdict": "suspect",
    "reasons": ["evidence_on_border", "evidence_outside_lungs"],
}


@pytest.fixture(scope="module")
def rg1() -> pydicom.Dataset:
    return source_radiograph("rg1")


def _outputs(source: pydicom.Dataset, result: InferenceResult) -> tuple[InstanceReference, InstanceReference]:
    """References to a real Secondary Capture and Parametric Map of ``source``."""
    sc = build_secondary_capture(source, np.zeros((16, 16, 3), np.uint8), result)
    pm = build_parametric_map(source, np.ones((7, 7), np.float32), result)
    return InstanceReference.of(sc), InstanceReference.of(pm)


def _report(source: pydicom.Dataset, result: InferenceResult, **kw: object) -> pydicom.Dataset:
    sc, pm = _outputs(source, result)
    return build_structured_report(source, result, secondary_capture=sc, parametric_map=pm, **kw)  # type: ignore[arg-type]


def _group(sr: pydicom.Dataset) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    parsed = hd.sr.Comprehensive3DSR.from_dataset(sr)
    groups = parsed.content.get_image_measurement_groups()
    assert len(groups) == 1
    return groups[0]


def _images(group: hd.sr.MeasurementsAndQualitativeEvaluations) -> dict[str, tuple[str, str]]:
    """Concept name meaning -> (SOP Class, SOP Instance) of the group's IMAGE items."""
    items = hd.sr.utils.find_content_items(group[0], value_type=hd.sr.ValueTypeValues.IMAGE)
    return {
        item.name.meaning: (
            item.ReferencedSOPSequence[0].ReferencedSOPClassUID,
            item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID,
        )
        for item in items
    }


def _same(code: hd.sr.CodedConcept, expected: Code) -> bool:
    return (code.value, code.scheme_designator) == (expected.value, expected.scheme_designator)


def test_report_in_the_source_study_labelled_as_a_demo(rg1: pydicom.Dataset) -> None:
    sr = _report(rg1, inference_result())
    assert sr.SOPClassUID == COMPREHENSIVE_3D_SR_STORAGE and sr.Modality == "SR"
    for keyword in ("PatientName", "PatientID", "StudyInstanceUID", "AccessionNumber", "StudyDate"):
        assert str(sr[keyword].value) == str(rg1[keyword].value), keyword
    assert sr.SeriesInstanceUID != rg1.SeriesInstanceUID
    assert (sr.CompletionFlag, sr.PreliminaryFlag, sr.VerificationFlag) == ("COMPLETE", "PRELIMINARY", "UNVERIFIED")
    assert sr.Manufacturer == "CXR Lens" and "DEMO" in sr.SeriesDescription
    observers = hd.sr.Comprehensive3DSR.from_dataset(sr).content.get_observer_contexts()
    assert len(observers) == 1 and _same(observers[0].observer_type, codes.DCM.Device)
    device = observers[0].observer_identifying_attributes
    assert device.name == "CXR Lens" and "DEMO MODEL" in device.model_name
    assert "cxr-lens-demo-cnn 1.0.0" in device.model_name
    assert [item.CodingSchemeDesignator for item in sr.CodingSchemeIdentificationSequence] == [PRIVATE_SCHEME]


def test_group_holds_the_finding_probabilities_algorithm_and_site(rg1: pydicom.Dataset) -> None:
    result = inference_result(probabilities={"no_finding": 0.125, "focal_opacity": 0.875})
    group = _group(_report(rg1, result))
    assert _same(group.finding_type, DEMO_LABEL_CODES["focal_opacity"])
    assert [_same(site.value, codes.SCT.Lung) for site in group.finding_sites] == [True]
    probabilities = {m.name.meaning: m.value for m in group.get_measurements()}
    assert probabilities == {
        DEMO_LABEL_CODES["no_finding"].meaning: 0.125,
        DEMO_LABEL_CODES["focal_opacity"].meaning: 0.875,
    }
    assert all(m.unit.value == "{probability}" for m in group.get_measurements())
    names = {item.name.meaning: item.value for item in group[0].ContentSequence if item.ValueType == "TEXT"}
    assert names["Algorithm Name"] == "cxr-lens-demo-cnn" and names["Algorithm Version"] == "1.0.0"
    assert "Algorithm Manufacturer" not in names  # belongs to another template's code
    assert names["Tracking Identifier"] and group.tracking_uid
    [explanation] = group.get_qualitative_evaluations(codes.DCM.VisualExplanation)
    assert _same(explanation.value, codes.DCM.GradientWeightedClassActivation)


def test_procedure_reported_is_a_cid_100_imaging_procedure(rg1: pydicom.Dataset) -> None:
    sr = _report(rg1, inference_result())
    procedures = [item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "121058"]
    assert [
        (p.ConceptCodeSequence[0].CodeValue, p.ConceptCodeSequence[0].CodingSchemeDesignator) for p in procedures
    ] == [(PROCEDURE_REPORTED.value, PROCEDURE_REPORTED.scheme_designator)]


def test_references_the_source_overlay_and_map(rg1: pydicom.Dataset) -> None:
    result = inference_result()
    sc, pm = _outputs(rg1, result)
    sr = build_structured_report(rg1, result, secondary_capture=sc, parametric_map=pm)
    group = _group(sr)
    assert [(s.referenced_sop_instance_uid) for s in group.source_images] == [rg1.SOPInstanceUID]
    images = _images(group)
    assert images["Best illustration of finding"] == (sc.sop_class_uid, sc.sop_instance_uid)
    assert images["Gradient-weighted class activation"] == (pm.sop_class_uid, pm.sop_instance_uid)
    evidence = hd.sr.Comprehensive3DSR.from_dataset(sr).get_evidence()
    assert {(study, series, sop) for study, series, sop, _ in evidence} == {
        (rg1.StudyInstanceUID, rg1.SeriesInstanceUID, rg1.SOPInstanceUID),
        (rg1.StudyInstanceUID, sc.series_instance_uid, sc.sop_instance_uid),
        (rg1.StudyInstanceUID, pm.series_instance_uid, pm.sop_instance_uid),
    }


def test_only_the_outputs_given_are_referenced(rg1: pydicom.Dataset) -> None:
    sr = build_structured_report(rg1, inference_result())
    assert set(_images(_group(sr))) == {"Source of Measurement"}
    assert len(sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence) == 1


def test_trust_evidence_adds_lung_share_verdict_and_reasons(rg1: pydicom.Dataset) -> None:
    without = _group(_report(rg1, inference_result()))
    assert without.get_measurements(LUNG_SHARE) == [] and without.get_qualitative_evaluations(TRUST_VERDICT) == []
    group = _group(_report(rg1, inference_result(), evidence=EVIDENCE))
    [share] = group.get_measurements(LUNG_SHARE)
    assert share.value == pytest.approx(EVIDENCE["lungs"])
    [verdict] = group.get_qualitative_evaluations(TRUST_VERDICT)
    assert verdict.value.value == "suspect"
    reasons = [r.value.meaning for r in group.get_qualitative_evaluations(TRUST_REASON)]
    assert reasons == ["Explanation on the image border", "Explanation outside the lung fields"]


def test_label_codes_from_config_win_and_unknown_labels_get_private_codes(rg1: pydicom.Dataset) -> None:
    configured = {"focal_opacity": Code("123456789", "SCT", "Configured finding")}
    result = inference_result(probabilities={"focal_opacity": 0.7, "no_finding": 0.2, "rib_fracture": 0.1})
    group = _group(_report(rg1, result, label_codes=configured))
    assert _same(group.finding_type, configured["focal_opacity"])
    codes_by_meaning = {m.name.meaning: m.name for m in group.get_measurements()}
    assert _same(codes_by_meaning["Configured finding"], configured["focal_opacity"])
    assert _same(codes_by_meaning["No finding (model class)"], DEMO_LABEL_CODES["no_finding"])
    assert _same(codes_by_meaning["Rib fracture"], Code("rib_fracture", PRIVATE_SCHEME, "Rib fracture"))


def test_other_cam_methods_are_class_activation_named_in_the_parameters(rg1: pydicom.Dataset) -> None:
    group = _group(_report(rg1, inference_result(method="layercam")))
    [explanation] = group.get_qualitative_evaluations(codes.DCM.VisualExplanation)
    assert _same(explanation.value, codes.DCM.ClassActivation)
    parameters = [i.value for i in group[0].ContentSequence if i.name.meaning == "Algorithm Parameters"]
    assert parameters == ["explanation method: layercam"]
    assert "Class activation" in _images(group)


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("rg1", {"Patient Orientation Row": "L", "Patient Orientation Column": "F"}),
        ("cr_without_orientation", {}),
        ("cr_monochrome1_empty_orientation", {}),
        (
            "dx_with_imager_spacing",
            {
                "Patient Orientation Row": "L",
                "Patient Orientation Column": "F",
                "Horizontal Pixel Spacing": 0.143,
                "Vertical Pixel Spacing": 0.15,
            },
        ),
    ],
)
def test_image_library_describes_only_what_the_source_states(kind: str, expected: dict[str, object]) -> None:
    sr = build_structured_report(source_radiograph(kind), inference_result())
    library = hd.sr.Comprehensive3DSR.from_dataset(sr).content[0].ContentSequence
    [entry] = hd.sr.utils.find_content_items(library[-2], value_type=hd.sr.ValueTypeValues.IMAGE, recursive=True)
    projection = {
        "Patient Orientation Row",
        "Patient Orientation Column",
        "Horizontal Pixel Spacing",
        "Vertical Pixel Spacing",
    }
    found = {d.name.meaning: d.value for d in entry.ContentSequence if d.name.meaning in projection}
    assert found == pytest.approx(expected)
    assert {d.name.meaning for d in entry.ContentSequence} >= {"Modality", "Pixel Data Rows", "Pixel Data Columns"}


def test_uids_are_deterministic_and_keyed(rg1: pydicom.Dataset) -> None:
    a = structured_report_uids(rg1, inference_result())
    assert a == structured_report_uids(rg1, inference_result(label="no_finding", class_index=0))
    assert a[1] != structured_report_uids(rg1, inference_result(method="layercam"))[1]
    assert a[1] != structured_report_uids(rg1, inference_result(model_version="1.0.1"))[1]
    other = copy.deepcopy(rg1)
    other.SOPInstanceUID = "1.2.3.4"
    assert structured_report_uids(other, inference_result())[0] == a[0]
    assert structured_report_uids(other, inference_result())[1] != a[1]
    assert build_structured_report(rg1, inference_result()).SOPInstanceUID == a[1]


def test_source_is_not_mutated(rg1: pydicom.Dataset) -> None:
    before = rg1.to_json_dict(bulk_data_threshold=1, bulk_data_element_handler=lambda _: "")
    _report(rg1, inference_result(), evidence=EVIDENCE)
    assert rg1.to_json_dict(bulk_data_threshold=1, bulk_data_element_handler=lambda _: "") == before


# The elements highdicom stamps with the time of building: the only ones two builds of one report may differ in.
_BUILD_TIMES = {"InstanceCreationDate", "InstanceCreationTime", "ContentDate", "ContentTime", "ContributionDateTime"}


def _stamped_like(report: pydicom.Dataset, reference: pydicom.Dataset) -> None:
    """Give ``report`` the build times of ``reference``, at every depth (same tree shape required)."""
    for element in reference:
        if element.VR == "SQ":
            for ours, theirs in zip(report[element.tag].value, element.value, strict=True):
                _stamped_like(ours, theirs)
        elif element.keyword in _BUILD_TIMES:
            report[element.tag].value = element.value


@pytest.mark.parametrize("kind", SOURCE_KINDS)
def test_handing_the_tree_over_to_highdicom_writes_the_report_it_writes_from_a_copy(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """highdicom deep-copies the content tree it is given; ours is handed over instead (a quarter of the report's
    cost). The file must be the same, byte for byte, as from highdicom's own copy."""
    src = source_radiograph(kind)
    result = inference_result()
    sc, pm = _outputs(src, result)
    build = lambda: build_structured_report(  # noqa: E731
        src, result, secondary_capture=sc, parametric_map=pm, evidence=EVIDENCE
    )
    handed_over = build()
    # Handed over for the constructor only: the report's tree copies, pickles and is freed like any other.
    root = handed_over.content[0]
    assert "__deepcopy__" not in vars(root)
    assert copy.deepcopy(handed_over).content[0] is not root
    assert pickle.loads(pickle.dumps(handed_over)).SOPInstanceUID == handed_over.SOPInstanceUID
    monkeypatch.setattr(structured_report, "_handed_over", contextlib.nullcontext)
    copied = build()
    _stamped_like(handed_over, copied)
    assert part10_bytes(handed_over) == part10_bytes(copied)
    assert len(hd.sr.Comprehensive3DSR.from_dataset(handed_over).content.get_image_measurement_groups()) == 1


def test_a_header_that_cannot_be_copied_is_a_named_error() -> None:
    src = source_radiograph("cr_without_orientation")
    del src.PatientID
    with pytest.raises(StructuredReportError):
        build_structured_report(src, inference_result())


@requires_dciodvfy
@requires_pixelmed
@requires_dsrdump
@pytest.mark.slow
@pytest.mark.parametrize("kind", SOURCE_KINDS)
def test_written_report_validates_dumps_and_reads_back(kind: str, tmp_path: Path) -> None:
    src = source_radiograph(kind)
    result = inference_result(probabilities={"no_finding": 0.375, "focal_opacity": 0.625})
    sc, pm = _outputs(src, result)
    path = tmp_path / "sr.dcm"
    build_structured_report(src, result, secondary_capture=sc, parametric_map=pm, evidence=EVIDENCE).save_as(
        path, enforce_file_format=True
    )
    assert dciodvfy_errors(path) == []
    assert pixelmed_sr_errors(path) == []
    dump = dsrdump(path)
    assert dump.returncode == 0, dump.stderr
    for line in (
        '<CONTAINER:(,,"Imaging Measurement Report")',
        'CODE:(,,"Finding")=(focal_opacity,99CXRL,',
        'NUM:(,,"Focal opacity (model class)")="0.625"',
        'IMAGE:(,,"Best illustration of finding")',
    ):
        assert line in dump.stdout, line

    back = hd.sr.srread(path)
    assert isinstance(back, hd.sr.Comprehensive3DSR)
    [group] = back.content.get_image_measurement_groups()
    assert group.finding_type.meaning == "Focal opacity (model class)"
    probabilities = {m.name.value: m.value for m in group.get_measurements() if m.unit.value == "{probability}"}
    assert probabilities == result.probabilities
    images = _images(group)
    assert images["Source of Measurement"] == (src.SOPClassUID, src.SOPInstanceUID)
    assert images["Best illustration of finding"][1] == sc.sop_instance_uid
    assert images["Gradient-weighted class activation"][1] == pm.sop_instance_uid


@requires_pixelmed
@pytest.mark.slow
def test_pixelmed_flags_a_procedure_outside_cid_100(rg1: pydicom.Dataset, tmp_path: Path) -> None:
    """The judge can fail: LOINC "XR Chest 2V" (the ORU's procedure) is not in CID 100."""
    sr = build_structured_report(rg1, inference_result())
    [procedure] = [item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "121058"]
    concept = procedure.ConceptCodeSequence[0]
    concept.CodeValue, concept.CodingSchemeDesignator, concept.CodeMeaning = "36643-5", "LN", "XR Chest 2V"
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    errors = pixelmed_sr_errors(path)
    assert any("not found in context group 100" in line for line in errors), errors
