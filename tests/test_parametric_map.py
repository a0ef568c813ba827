"""The Grad-CAM Parametric Map: highdicom-built, validated by dciodvfy, read back by highdicom and pydicom."""

from __future__ import annotations

import copy
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from highdicom.pm.sop import pmread
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

from dicom_node.outputs.parametric_map import (
    MAP_LEVELS,
    NOMINAL_PIXEL_SPACING_MM,
    PARAMETRIC_MAP_STORAGE,
    ParametricMapError,
    build_parametric_map,
    map_grid,
    parametric_map_uids,
    pixel_spacing_mm,
)
from tests.support.dicom_tools import dciodvfy_errors, requires_dciodvfy
from tests.support.outputs import SOURCE_KINDS, inference_result, source_radiograph

# Sizes of the synthetic sources: none square, and the hot-cell test places its cell on the 80 x 96 one.
_SHAPES = {"cr_without_orientation": (96, 80), "cr_monochrome1_empty_orientation": (90, 100),
           "dx_with_imager_spacing": (80, 96)}


def _heatmap(seed: int = 0) -> np.ndarray:
    """A raw (unnormalised) 7x7 class activation map, as the model's last convolution gives it."""
    return np.random.default_rng(seed).random((7, 7)).astype(np.float32) * 3.5


@pytest.fixture(scope="module")
def rg1() -> pydicom.Dataset:
    return source_radiograph("rg1")


def _source(kind: str) -> pydicom.Dataset:
    return source_radiograph(kind, *_SHAPES.get(kind, ()))


def _real_world(pm: pydicom.Dataset) -> np.ndarray:
    mapping = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    return pm.pixel_array.astype(np.float64) * float(mapping.RealWorldValueSlope) + float(
        mapping.RealWorldValueIntercept
    )


def test_map_lies_on_the_source_grid_in_the_source_study(rg1: pydicom.Dataset) -> None:
    pm = build_parametric_map(rg1, _heatmap(), inference_result())
    assert pm.SOPClassUID == PARAMETRIC_MAP_STORAGE
    assert (pm.Rows, pm.Columns, pm.NumberOfFrames) == (rg1.Rows, rg1.Columns, 1)
    assert (pm.BitsAllocated, pm.PixelRepresentation) == (16, 0)
    for keyword in ("PatientName", "PatientID", "StudyInstanceUID", "AccessionNumber", "StudyDate"):
        assert str(pm[keyword].value) == str(rg1[keyword].value), keyword
    assert pm.SeriesInstanceUID != rg1.SeriesInstanceUID
    assert pm.Manufacturer == "CXR Lens"
    assert "DEMO" in pm.SeriesDescription and "DEMO MODEL" in pm.ImageComments
    assert "NOT FOR DIAGNOSTIC USE" in pm.ImageComments
    assert pm.ContentQualification == "RESEARCH"
    assert pm.Laterality == ""
    refs = [(r.ReferencedSOPClassUID, r.ReferencedSOPInstanceUID) for r in pm.SourceImageSequence]
    assert refs == [(rg1.SOPClassUID, rg1.SOPInstanceUID)]


def test_real_world_mapping_is_class_activation_scaled_by_the_maximum(rg1: pydicom.Dataset) -> None:
    pm = build_parametric_map(rg1, _heatmap(), inference_result())
    mapping = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    quantity = mapping.QuantityDefinitionSequence[0].ConceptCodeSequence[0]
    assert (quantity.CodeValue, quantity.CodingSchemeDesignator) == (
        codes.DCM.ClassActivation.value,
        codes.DCM.ClassActivation.scheme_designator,
    )
    assert (mapping.RealWorldValueFirstValueMapped, mapping.RealWorldValueLastValueMapped) == (0, MAP_LEVELS)
    values = _real_world(pm)
    assert values.min() >= 0.0 and values.max() == pytest.approx(1.0)


def test_raw_and_normalised_heatmaps_give_the_same_map(rg1: pydicom.Dataset) -> None:
    raw = _heatmap(3)
    a = build_parametric_map(rg1, raw, inference_result()).pixel_array.astype(int)
    b = build_parametric_map(rg1, raw / raw.max(), inference_result()).pixel_array.astype(int)
    assert np.abs(a - b).max() <= 1  # float32 rounding at a level's edge, nothing more
    assert a.max() == b.max() == MAP_LEVELS


def test_the_hot_cell_lands_where_it_lies_on_the_source() -> None:
    src = _source("dx_with_imager_spacing")  # 80 x 96
    heat = np.zeros((8, 8), np.float32)
    heat[2, 5] = 2.0  # rows 20..30, columns 60..72 of the source
    levels = build_parametric_map(src, heat, inference_result()).pixel_array
    row, col = np.unravel_index(int(np.argmax(levels)), levels.shape)
    assert 20 <= row < 30 and 60 <= col < 72
    assert levels.max() == MAP_LEVELS and levels[0, 0] == 0 and levels[-1, -1] == 0


def test_a_ramp_stays_monotone_across_columns() -> None:
    src = _source("cr_without_orientation")
    ramp = np.tile(np.linspace(0.0, 5.0, 6, dtype=np.float32), (4, 1))
    levels = build_parametric_map(src, ramp, inference_result()).pixel_array.astype(int)
    assert np.all(np.diff(levels, axis=1) >= 0)
    assert levels[:, 0].max() == 0 and levels[:, -1].min() == MAP_LEVELS


def test_no_evidence_is_an_empty_map(rg1: pydicom.Dataset) -> None:
    pm = build_parametric_map(rg1, _heatmap(), inference_result(no_evidence=True, heatmap_max=0.0))
    assert not pm.pixel_array.any()
    assert "NO EVIDENCE" in pm.ImageComments


def test_own_frame_of_reference_at_a_nominal_plane(rg1: pydicom.Dataset) -> None:
    pm = build_parametric_map(rg1, _heatmap(), inference_result())
    assert "FrameOfReferenceUID" not in rg1
    assert pm.FrameOfReferenceUID == parametric_map_uids(rg1, inference_result())[2]
    shared = pm.SharedFunctionalGroupsSequence[0]
    assert [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    position = pm.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0].ImagePositionPatient
    assert [float(v) for v in position] == [0, 0, 0]
    # RG1's Pixel Spacing is 0\0 and it has no Imager Pixel Spacing: the documented nominal value.
    spacing = [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing]
    assert spacing == [NOMINAL_PIXEL_SPACING_MM, NOMINAL_PIXEL_SPACING_MM]


def test_pixel_spacing_comes_from_imager_pixel_spacing() -> None:
    src = _source("dx_with_imager_spacing")
    assert pixel_spacing_mm(src) == (0.15, 0.143)
    pm = build_parametric_map(src, _heatmap(), inference_result())
    spacing = pm.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    assert [float(v) for v in spacing] == [0.15, 0.143]


def test_uids_are_deterministic_and_keyed(rg1: pydicom.Dataset) -> None:
    a = parametric_map_uids(rg1, inference_result())
    assert a == parametric_map_uids(rg1, inference_result(label="no_finding", class_index=0))
    assert a[1] != parametric_map_uids(rg1, inference_result(method="layercam"))[1]
    assert a[1] != parametric_map_uids(rg1, inference_result(model_version="1.0.1"))[1]
    other = copy.deepcopy(rg1)
    other.SOPInstanceUID = "1.2.3.4"
    b = parametric_map_uids(other, inference_result())
    assert b[0] == a[0] and b[1] != a[1] and b[2] != a[2]  # one series per source series; own plane per image
    assert len(set(a)) == 3 and all(len(u) <= 64 for u in a)
    assert build_parametric_map(rg1, _heatmap(), inference_result()).SOPInstanceUID == a[1]


def test_source_is_not_mutated(rg1: pydicom.Dataset) -> None:
    before = rg1.to_json_dict(bulk_data_threshold=1, bulk_data_element_handler=lambda _: "")
    build_parametric_map(rg1, _heatmap(), inference_result())
    assert rg1.to_json_dict(bulk_data_threshold=1, bulk_data_element_handler=lambda _: "") == before


@pytest.mark.parametrize("bad", [np.zeros((2, 2, 2)), np.zeros((0, 3)), np.full((3, 3), np.nan)])
def test_rejects_bad_heatmaps(rg1: pydicom.Dataset, bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="heatmap"):
        build_parametric_map(rg1, bad, inference_result())


def test_a_header_that_cannot_be_copied_is_a_named_error() -> None:
    src = _source("cr_without_orientation")
    del src.StudyInstanceUID
    with pytest.raises(ParametricMapError):
        build_parametric_map(src, _heatmap(), inference_result())


def test_map_grid_is_the_smallest_whole_factor() -> None:
    assert map_grid(1955, 1841, 0) == (1955, 1841, 1)
    assert map_grid(1955, 1841, 512) == (489, 461, 4)  # RG1: 1955 / 512 = 3.8 -> blocks of 4 x 4
    assert map_grid(1955, 1841, 489) == (489, 461, 4) and map_grid(1955, 1841, 488) == (391, 369, 5)
    assert map_grid(96, 80, 96) == (96, 80, 1) and map_grid(96, 80, 40) == (32, 27, 3)
    with pytest.raises(ValueError):
        map_grid(96, 80, -1)


def test_a_coarse_map_is_the_source_grid_map_at_its_block_centres(rg1: pydicom.Dataset) -> None:
    heat = _heatmap(5)
    full = build_parametric_map(rg1, heat, inference_result()).pixel_array.astype(int)
    # RG1 at most 700 px long: blocks of 3 x 3 (1955 -> 652 rows, the last block one row short), centred on
    # source pixels 1, 4, 7, ...: the coarse map samples the same surface there (to a level: each is scaled by
    # its own maximum).
    coarse = build_parametric_map(rg1, heat, inference_result(), max_long_side=700)
    assert (coarse.Rows, coarse.Columns) == (652, 614)
    np.testing.assert_allclose(coarse.pixel_array.astype(int), full[1::3, 1::3], atol=1)


def test_a_coarse_map_states_its_blocks_in_its_geometry() -> None:
    src = _source("dx_with_imager_spacing")  # 80 x 96, Imager Pixel Spacing 0.15 \ 0.143
    pm = build_parametric_map(src, _heatmap(), inference_result(), max_long_side=40)
    assert (pm.Rows, pm.Columns) == (27, 32)  # blocks of 3 x 3
    shared = pm.SharedFunctionalGroupsSequence[0]
    assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == pytest.approx([0.45, 0.429])
    # The first block's centre is source pixel (1, 1): one source spacing along each axis from the origin.
    position = pm.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0].ImagePositionPatient
    assert [float(v) for v in position] == pytest.approx([0.143, 0.15, 0.0])
    empty = build_parametric_map(src, _heatmap(), inference_result(no_evidence=True, heatmap_max=0.0),
                                 max_long_side=40)
    assert empty.pixel_array.shape == (27, 32) and not empty.pixel_array.any()


@requires_dciodvfy
@pytest.mark.parametrize("max_long_side", [0, 64])  # 64: blocks of 2 x 2
@pytest.mark.parametrize("transfer_syntax", [ExplicitVRLittleEndian, JPEG2000Lossless])
@pytest.mark.parametrize("kind", SOURCE_KINDS)
def test_written_map_validates_and_reads_back(kind: str, transfer_syntax: str, max_long_side: int,
                                              tmp_path: Path) -> None:
    src = _source(kind)
    heat = _heatmap(7)
    pm = build_parametric_map(src, heat, inference_result(), transfer_syntax_uid=transfer_syntax,
                              max_long_side=max_long_side)
    expected = _real_world(pm) if transfer_syntax == ExplicitVRLittleEndian else None
    path = tmp_path / "pm.dcm"
    pm.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []

    back = pmread(path)
    assert isinstance(back, hd.pm.ParametricMap)
    assert back.file_meta.TransferSyntaxUID == transfer_syntax
    assert back.get_source_image_uids() == [(src.StudyInstanceUID, src.SeriesInstanceUID, src.SOPInstanceUID)]
    values = back.get_frame(1, apply_real_world_transform=True)
    assert values.shape == map_grid(src.Rows, src.Columns, max_long_side)[:2]
    assert values.max() == pytest.approx(1.0) and values.min() >= 0.0
    if expected is not None:
        np.testing.assert_allclose(values, expected)
    # The same map whichever syntax carries it: lossless compression changes nothing.
    reference = build_parametric_map(src, heat, inference_result(), max_long_side=max_long_side).pixel_array
    np.testing.assert_array_equal(pydicom.dcmread(path).pixel_array, reference)
