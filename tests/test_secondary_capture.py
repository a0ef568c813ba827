"""The overlay Secondary Capture: highdicom-built, validated by dciodvfy, rendered by dcmtk, read back strictly."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom import config as pydicom_config
from pydicom.data import get_testdata_file

from dicom_node.outputs.results import InferenceResult
from dicom_node.outputs.secondary_capture import (
    SC_IMAGE_STORAGE,
    build_secondary_capture,
    overlay_uids,
)
from dicom_node.process.rules import evaluate
from tests.support.dicom_tools import (
    dciodvfy_errors,
    dcmj2pnm_png,
    requires_dciodvfy,
    requires_dcmtk,
)


def _result(**kw: object) -> InferenceResult:
    base = dict(label="focal_opacity", class_index=1, probabilities={"no_finding": 0.2, "focal_opacity": 0.8},
                method="gradcam", model_id="cxr-lens-demo-cnn", model_version="1.0.0", is_demo=True,
                heatmap_max=3.5, no_evidence=False)
    base.update(kw)
    return InferenceResult(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def rg1() -> pydicom.Dataset:
    return pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))


def _overlay(h: int = 300, w: int = 280) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_same_patient_and_study_new_series_and_references(rg1: pydicom.Dataset) -> None:
    sc = build_secondary_capture(rg1, _overlay(), _result())
    assert sc.SOPClassUID == SC_IMAGE_STORAGE
    for keyword in ("PatientName", "PatientID", "StudyInstanceUID", "AccessionNumber", "StudyDate"):
        assert str(sc[keyword].value) == str(rg1[keyword].value), keyword
    assert sc.SeriesInstanceUID != rg1.SeriesInstanceUID
    assert sc.SOPInstanceUID != rg1.SOPInstanceUID
    assert list(sc.ImageType) == ["DERIVED", "SECONDARY"]
    assert sc.BurnedInAnnotation == "YES"
    assert sc.Manufacturer == "CXR Lens"
    ref = sc.SourceImageSequence[0]
    assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (rg1.SOPClassUID, rg1.SOPInstanceUID)
    assert "gradcam" in sc.SeriesDescription and "cxr-lens-demo-cnn" in sc.SeriesDescription
    assert "DEMO" in sc.SeriesDescription and "DEMO MODEL" in sc.ImageComments
    assert "NOT FOR DIAGNOSTIC USE" in sc.ImageComments
    assert (sc.Rows, sc.Columns, sc.SamplesPerPixel, sc.PhotometricInterpretation) == (300, 280, 3, "RGB")
    np.testing.assert_array_equal(sc.pixel_array, _overlay())


def test_our_output_is_never_eligible_again(rg1: pydicom.Dataset) -> None:
    verdict = evaluate(build_secondary_capture(rg1, _overlay(), _result()))
    assert not verdict.eligible


def test_uids_are_deterministic_and_keyed(rg1: pydicom.Dataset) -> None:
    a = overlay_uids(rg1, _result())
    assert a == overlay_uids(rg1, _result(label="no_finding", class_index=0))  # same image, same model/method
    assert a[1] != overlay_uids(rg1, _result(method="layercam"))[1]
    assert a[1] != overlay_uids(rg1, _result(model_version="1.0.1"))[1]
    other = rg1.copy()
    other.SOPInstanceUID = "1.2.3.4"
    assert overlay_uids(other, _result())[0] == a[0]  # one overlay series per source series
    assert overlay_uids(other, _result())[1] != a[1]
    assert all(len(u) <= 64 for u in a)


def test_lossy_source_is_declared() -> None:
    src = pydicom.dcmread(get_testdata_file("RG1_J2KI.dcm"))
    sc = build_secondary_capture(src, _overlay(), _result())
    assert sc.LossyImageCompression == "01"


def test_source_is_not_mutated(rg1: pydicom.Dataset) -> None:
    before = rg1.to_json_dict(bulk_data_threshold=1, bulk_data_element_handler=lambda _: "")
    build_secondary_capture(rg1, _overlay(), _result())
    assert rg1.to_json_dict(bulk_data_threshold=1, bulk_data_element_handler=lambda _: "") == before


def test_rejects_non_rgb(rg1: pydicom.Dataset) -> None:
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        build_secondary_capture(rg1, np.zeros((10, 10), np.uint8), _result())


@requires_dciodvfy
@requires_dcmtk
@pytest.mark.parametrize("source_name", ["RG1_UNCR.dcm", "RG1_J2KI.dcm"])
def test_written_file_validates_renders_and_reads_back_strictly(source_name: str, tmp_path: Path) -> None:
    src = pydicom.dcmread(get_testdata_file(source_name))
    overlay = _overlay(211, 199)
    path = tmp_path / "sc.dcm"
    build_secondary_capture(src, overlay, _result()).save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    png = cv2.imread(str(dcmj2pnm_png(path, tmp_path / "sc.png")), cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(png[:, :, ::-1], overlay)
    old = pydicom_config.settings.reading_validation_mode
    pydicom_config.settings.reading_validation_mode = pydicom_config.RAISE
    try:
        back = pydicom.dcmread(path)
        back.decode()
        np.testing.assert_array_equal(back.pixel_array, overlay)
    finally:
        pydicom_config.settings.reading_validation_mode = old


def test_highdicom_iod_lookups_are_cached_and_answer_as_highdicom_does() -> None:
    import highdicom._standard_utils as standard_utils
    import highdicom.base
    import highdicom.sr.content

    from dicom_node.outputs import iod_lookups

    # Installed over highdicom's own function in the modules that call it while building our objects; were a
    # highdicom upgrade to change the function, install() would leave it alone and this would say so.
    assert iod_lookups.installed >= 3
    for module in (standard_utils, highdicom.base, highdicom.sr.content):
        assert module.is_attribute_in_iod is iod_lookups.is_attribute_in_iod
    original = iod_lookups._original
    cases = [
        ("PixelData", "1.2.840.10008.5.1.4.1.1.1", ["IconImageSequence"]),  # CR: an image
        ("PixelData", "1.2.840.10008.5.1.4.1.1.88.34", ["IconImageSequence"]),  # Comprehensive 3D SR: not one
        ("ContentDate", "1.2.840.10008.5.1.4.1.1.7", None),
        ("ContentDate", "1.2.840.10008.5.1.4.1.1.30", None),  # Parametric Map
        ("NumberOfFrames", "1.2.840.10008.5.1.4.1.1.1", None),
        ("NumberOfFrames", "1.2.840.10008.5.1.4.1.1.1.1", None),
    ]
    answers = {original(*case) for case in cases}
    assert answers == {True, False}  # the cases tell the answers apart
    for case in cases:
        assert iod_lookups.is_attribute_in_iod(*case) == original(*case)
        assert iod_lookups.is_attribute_in_iod(*case) == original(*case)  # and again, from the cache
    assert iod_lookups._cached.cache_info().hits >= len(cases)
    assert standard_utils.does_iod_have_pixel_data("1.2.840.10008.5.1.4.1.1.1") is True
