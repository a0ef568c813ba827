"""The Grad-CAM heatmap as a Parametric Map (highdicom ``ParametricMap``, PS3.3 A.75), for IHE AI Results viewers.

Pure: takes the source dataset, the heatmap and the result; returns a new dataset. The map lies on the source's
pixel grid (Rows x Columns), stored as unsigned integers in 16 bits (dciodvfy's Parametric Map Image module
accepts no other integer depth) with a real-world value mapping whose quantity is DCM "Class activation"
(130402) and whose values are the map scaled by its own maximum, as the overlay shows it.

A projection radiograph has no Frame of Reference, but the Parametric Map IOD requires one, with plane position,
orientation and a non-zero pixel spacing. The map gets a Frame of Reference of its own: the map's own image
plane, at a nominal position and orientation, claiming no relation to any other object. Pixel spacing comes from
the source's Imager Pixel Spacing, else its Pixel Spacing, else :data:`NOMINAL_PIXEL_SPACING_MM`.

Identity is deterministic like the overlay's: the SOP Instance UID and Frame of Reference UID derive from
(source SOP Instance UID, model id, model version, method), the series UID from the source series with the same
keys, so a re-sent image replaces its map.
"""

from __future__ import annotations

import copy

import cv2
import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless, generate_uid

from dicom_node.errors import CxrLensError
from dicom_node.outputs.results import AI_DISCLAIMER, NODE_MANUFACTURER, NODE_MODEL_NAME, InferenceResult
from dicom_node.outputs.secondary_capture import _instance_number, software_version

PARAMETRIC_MAP_STORAGE = "1.2.840.10008.5.1.4.1.1.30"
PARAMETRIC_MAP_SERIES_NUMBER = 9902
# Stored values 0..MAP_LEVELS in 16-bit words: 8-bit precision is all a heatmap conveys (the overlay has no more).
MAP_LEVELS = 255
# Explicit VR Little Endian is what every archive takes (the sender proposes only the object's own syntax); the
# lossless compressions shrink a smooth map many times over for peers known to accept them.
TRANSFER_SYNTAXES = (ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless)
# Used when the source states no spacing (RG1's Pixel Spacing is 0\0): one pixel = 1 mm in the map's own plane,
# a placeholder for the required attribute, not a measurement.
NOMINAL_PIXEL_SPACING_MM = 1.0
_NOMINAL_POSITION = (0.0, 0.0, 0.0)
_NOMINAL_ORIENTATION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)  # rows along +x, columns along +y of the map's own frame
_PIXEL_DATA_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # Pixel Data, Float and Double Float Pixel Data


class ParametricMapError(CxrLensError):
    """The source's header or the heatmap cannot make a valid Parametric Map."""


def parametric_map_uids(source: Dataset, result: InferenceResult) -> tuple[str, str, str]:
    """(Series Instance UID, SOP Instance UID, Frame of Reference UID) of the map for ``source``: stable."""
    keys = [result.model_id, result.model_version, result.method]
    series_uid = generate_uid(entropy_srcs=["cxr-lens parametric map series", str(source.SeriesInstanceUID), *keys])
    sop_uid = generate_uid(entropy_srcs=["cxr-lens parametric map instance", str(source.SOPInstanceUID), *keys])
    frame_uid = generate_uid(entropy_srcs=["cxr-lens parametric map frame", str(source.SOPInstanceUID), *keys])
    return series_uid, sop_uid, frame_uid


def pixel_spacing_mm(source: Dataset) -> tuple[float, float]:
    """(row, column) spacing for the map: Imager Pixel Spacing, else Pixel Spacing, else the nominal value."""
    for keyword in ("ImagerPixelSpacing", "PixelSpacing"):
        value = source.get(keyword)
        try:
            spacing = (float(value[0]), float(value[1])) if value is not None and len(value) == 2 else None
        except (TypeError, ValueError):  # pydicom keeps an invalid DS as text
            spacing = None
        if spacing is not None and all(np.isfinite(spacing)) and min(spacing) > 0:
            return spacing
    return (NOMINAL_PIXEL_SPACING_MM, NOMINAL_PIXEL_SPACING_MM)


def map_levels(heatmap: np.ndarray, rows: int, columns: int, *, no_evidence: bool) -> np.ndarray:
    """The heatmap resized to rows x columns, scaled by its maximum and quantised to 0..MAP_LEVELS (uint16).

    ``heatmap`` may be raw or already in [0, 1]: scaling by the maximum leaves a normalised map as it is and
    matches what the overlay shows. Negative values (none after Grad-CAM's ReLU) count as no evidence.
    """
    array = np.asarray(heatmap, dtype=np.float32)
    if array.ndim != 2 or array.size == 0:
        raise ValueError(f"heatmap must be a non-empty 2-D (h, w) array, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError("heatmap contains NaN or infinite values")
    if no_evidence:
        return np.zeros((rows, columns), np.uint16)
    resized = cv2.resize(np.clip(array, 0.0, None), (columns, rows), interpolation=cv2.INTER_LINEAR)
    peak = float(resized.max())
    if peak <= 0.0:
        return np.zeros((rows, columns), np.uint16)
    return np.rint(resized * (MAP_LEVELS / peak)).astype(np.uint16)


def series_description(result: InferenceResult) -> str:
    text = f"AI {result.method} class activation map - {result.model_id} {result.model_version}"
    if result.model_label:
        text += " " + result.model_label.split()[0]  # DEMO or TEST
    return text[:64]  # LO


def _geometry_source(source: Dataset, frame_uid: str, spacing: tuple[float, float]) -> Dataset:
    """A header-only copy of ``source`` placed in the map's own frame of reference (see the module docstring).

    highdicom 0.28.2 builds a Parametric Map of a source without a Frame of Reference with an empty dimension
    index and then fails its own check ("Unexpected mismatch between dimension index values"), and it takes
    pixel spacing only from Pixel Spacing. So it is handed this copy, which carries by hand what a CR/DX lacks:
    our Frame of Reference UID, the nominal Image Position/Orientation (Patient), the spacing and an empty Slice
    Thickness. Its SOP Class/Instance UIDs are the source's, so the map's references point at the real image.
    """
    header = Dataset()
    for element in source:
        if element.tag not in _PIXEL_DATA_TAGS:
            header.add(copy.deepcopy(element))
    header.FrameOfReferenceUID = frame_uid
    header.PositionReferenceIndicator = ""
    header.ImagePositionPatient = list(_NOMINAL_POSITION)
    header.ImageOrientationPatient = list(_NOMINAL_ORIENTATION)
    header.PixelSpacing = list(spacing)
    header.SliceThickness = None
    return header


def build_parametric_map(
    source: Dataset,
    heatmap: np.ndarray,
    result: InferenceResult,
    *,
    transfer_syntax_uid: str = ExplicitVRLittleEndian,
) -> Dataset:
    """A Parametric Map of ``heatmap`` (any (h, w) size; raw or in [0, 1]) on the source's pixel grid.

    The map is in the source's study, in its own series, and references the source image (Derivation Image
    and Source Image sequences). ``transfer_syntax_uid`` is one of :data:`TRANSFER_SYNTAXES`.
    """
    if transfer_syntax_uid not in TRANSFER_SYNTAXES:
        raise ValueError(f"transfer_syntax_uid must be one of {', '.join(TRANSFER_SYNTAXES)}")
    rows, columns = int(source.Rows), int(source.Columns)
    stored = map_levels(heatmap, rows, columns, no_evidence=result.no_evidence)
    series_uid, sop_uid, frame_uid = parametric_map_uids(source, result)
    spacing = pixel_spacing_mm(source)
    mapping = hd.pm.RealWorldValueMapping(
        lut_label=result.method.upper()[:16],
        lut_explanation=f"{result.method} map for {result.label}, scaled by its maximum"[:64],
        unit=codes.UCUM.NoUnits,
        value_range=(0, MAP_LEVELS),
        slope=1.0 / MAP_LEVELS,
        intercept=0.0,
        quantity_definition=codes.DCM.ClassActivation,
    )
    try:
        pm = hd.pm.ParametricMap(
            source_images=[_geometry_source(source, frame_uid, spacing)],
            pixel_array=stored,
            series_instance_uid=series_uid,
            series_number=PARAMETRIC_MAP_SERIES_NUMBER,
            sop_instance_uid=sop_uid,
            instance_number=_instance_number(source),
            manufacturer=NODE_MANUFACTURER,
            manufacturer_model_name=NODE_MODEL_NAME,
            software_versions=[software_version(), f"{result.model_id} {result.model_version}"[:64]],  # type: ignore[arg-type]
            device_serial_number="0",  # software: no serial number, and the attribute is Type 1 here
            contains_recognizable_visual_features=False,
            real_world_value_mappings=[mapping],
            voi_lut_transformations=[hd.VOILUTTransformation(window_center=MAP_LEVELS / 2, window_width=MAP_LEVELS)],
            content_label="CLASSACTIVATION",
            content_description=series_description(result),
            content_qualification=hd.ContentQualificationValues.RESEARCH,
            plane_positions=[hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT, _NOMINAL_POSITION)],
            plane_orientation=hd.PlaneOrientationSequence(hd.CoordinateSystemNames.PATIENT, _NOMINAL_ORIENTATION),
            pixel_measures=hd.PixelMeasuresSequence(pixel_spacing=spacing, slice_thickness=None),
        )
    except (ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
        # highdicom's and pydicom's messages quote the offending value, which may be patient data: type only.
        raise ParametricMapError(f"the source header cannot make a Parametric Map ({type(exc).__name__})") from exc
    pm.SeriesDescription = series_description(result)
    # General Series Laterality is Type 2C for the map; a chest as a whole has none unless the source says so.
    pm.Laterality = source.get("Laterality", "")
    comments = [AI_DISCLAIMER] + ([result.model_label] if result.model_label else [])
    if result.no_evidence:
        comments.append("NO EVIDENCE: the heatmap is empty for the predicted class")
    if result.trust_warning:
        comments.append(result.trust_warning)
    pm.ImageComments = "; ".join(comments)
    if transfer_syntax_uid != ExplicitVRLittleEndian:
        pm.compress(transfer_syntax_uid)  # pydicom's encoders: several times faster than highdicom's per-frame path
    return pm
