"""The Grad-CAM heatmap as a Parametric Map (highdicom ``ParametricMap``, PS3.3 A.75), for IHE AI Results viewers.

Pure: takes the source dataset, the heatmap and the result; returns a new dataset. The map lies on the source's
pixel grid (Rows x Columns), or on that grid coarsened by a whole factor (:func:`map_grid`: each map pixel is a
block of f x f source pixels, the pixel spacing f times the source's), stored as unsigned integers in 16 bits
(dciodvfy's Parametric Map Image module accepts no other integer depth) with a real-world value mapping whose
quantity is DCM "Class activation" (130402) and whose values are the map scaled by its own maximum, as the overlay
shows it.

Why a coarser grid is the node's default (``outputs.parametric_map_max_long_side``, 512): a class activation map
holds no more detail than the model's last convolution (7 x 7 to 16 x 16 cells; the node's overlay is 512 px), but
on a 2,000 px radiograph's own grid it is a 7 MB object that the node hashes, stores, reads and sends for each
image: measured, most of the node's CPU per image (``bench.pipeline``). 0 keeps the source's grid.

A projection radiograph has no Frame of Reference, but the Parametric Map IOD requires one, with plane position,
orientation and a non-zero pixel spacing. The map gets a Frame of Reference of its own: the map's own image
plane, at a nominal position and orientation, claiming no relation to any other object. Pixel spacing comes from
the source's Imager Pixel Spacing, else its Pixel Spacing, else :data:`NOMINAL_PIXEL_SPACING_MM` (times the grid
factor). In that plane the source's first pixel would lie at the origin: the map's first pixel, the centre of a
block of f x f source pixels, lies (f - 1) / 2 source pixels along each axis from it.

Identity is deterministic like the overlay's: the SOP Instance UID and Frame of Reference UID derive from
(source SOP Instance UID, model id, model version, method), the series UID from the source series with the same
keys, so a re-sent image replaces its map.
"""

from __future__ import annotations

import copy

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless, generate_uid

import dicom_node.outputs.iod_lookups  # noqa: F401  (highdicom's IOD lookups cached per process: see there)
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


def map_grid(rows: int, columns: int, max_long_side: int) -> tuple[int, int, int]:
    """(map rows, map columns, factor f) for a source of rows x columns: the smallest whole f that brings the
    longer side to at most ``max_long_side`` (0: f = 1, the source's grid); the map covers the whole source,
    its last row and column blocks cut by the source's edge."""
    if max_long_side < 0:
        raise ValueError(f"max_long_side must be >= 0, got {max_long_side}")
    factor = max(1, _blocks(max(rows, columns), max_long_side)) if max_long_side else 1
    return _blocks(rows, factor), _blocks(columns, factor), factor


def _blocks(pixels: int, factor: int) -> int:
    """How many blocks of ``factor`` pixels cover ``pixels`` (the last one cut by the edge)."""
    return -(-pixels // factor)


def map_levels(
    heatmap: np.ndarray, rows: int, columns: int, *, no_evidence: bool, factor: int = 1
) -> np.ndarray:
    """The heatmap sampled on a grid over a rows x columns source, scaled by its maximum and quantised to
    0..MAP_LEVELS (uint16).

    The grid is the source's (``factor`` 1: the heatmap resized to rows x columns) or its f x f blocks (their
    centres sampled: ``map_grid``'s shape). ``heatmap`` may be raw or already in [0, 1]: scaling by the maximum
    leaves a normalised map as it is and matches what the overlay shows. Negative values (none after Grad-CAM's
    ReLU) count as no evidence.
    """
    array = np.asarray(heatmap, dtype=np.float32)
    if array.ndim != 2 or array.size == 0:
        raise ValueError(f"heatmap must be a non-empty 2-D (h, w) array, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError("heatmap contains NaN or infinite values")
    out_rows, out_columns = _blocks(rows, factor), _blocks(columns, factor)
    if no_evidence:
        return np.zeros((out_rows, out_columns), np.uint16)
    # Separable linear interpolation (cv2.resize's half-pixel convention, edges clamped), evaluated exactly at each
    # map pixel's centre: cv2.warpAffine would place a coarse grid's samples only to 1/32 of a heatmap cell. Two
    # gathers rather than two weight matrices: numpy's matmul wakes OpenBLAS threads that then spin for ~0.1 s,
    # measured as ~70 core-ms per image in the node (bench.pipeline, "other" threads).
    low, high, frac = _linear_samples(out_rows, rows, array.shape[0], factor)
    clipped = np.clip(array, 0.0, None)
    by_rows = clipped[low] * (1.0 - frac)[:, None] + clipped[high] * frac[:, None]
    low, high, frac = _linear_samples(out_columns, columns, array.shape[1], factor)
    resized = by_rows[:, low] * (1.0 - frac) + by_rows[:, high] * frac
    peak = float(resized.max())
    if peak <= 0.0:
        return np.zeros((out_rows, out_columns), np.uint16)
    return np.rint(resized * (MAP_LEVELS / peak)).astype(np.uint16)


def _linear_samples(
    n_out: int, n_source: int, n_cells: int, factor: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(low cell, high cell, weight of high) sampling n_cells heatmap cells spread over n_source source pixels
    at the centres of n_out blocks of ``factor`` source pixels (block x centred on factor*x + (factor-1)/2)."""
    centre = factor * np.arange(n_out, dtype=np.float64) + (factor - 1) / 2
    cell = np.clip((centre + 0.5) * (n_cells / n_source) - 0.5, 0.0, n_cells - 1)
    low = np.floor(cell).astype(np.intp)
    return low, np.minimum(low + 1, n_cells - 1), (cell - low).astype(np.float32)


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
    max_long_side: int = 0,
) -> Dataset:
    """A Parametric Map of ``heatmap`` (any (h, w) size; raw or in [0, 1]) on the source's pixel grid, or with
    ``max_long_side`` > 0 on its f x f blocks (:func:`map_grid`).

    The map is in the source's study, in its own series, and references the source image (Derivation Image
    and Source Image sequences). ``transfer_syntax_uid`` is one of :data:`TRANSFER_SYNTAXES`.
    """
    if transfer_syntax_uid not in TRANSFER_SYNTAXES:
        raise ValueError(f"transfer_syntax_uid must be one of {', '.join(TRANSFER_SYNTAXES)}")
    rows, columns = int(source.Rows), int(source.Columns)
    factor = map_grid(rows, columns, max_long_side)[2]
    stored = map_levels(heatmap, rows, columns, no_evidence=result.no_evidence, factor=factor)
    series_uid, sop_uid, frame_uid = parametric_map_uids(source, result)
    source_spacing = pixel_spacing_mm(source)
    spacing = (source_spacing[0] * factor, source_spacing[1] * factor)
    # The first map pixel's centre, from the source's first pixel's (the origin): +x along a row, +y down a column.
    first = ((factor - 1) / 2 * source_spacing[1], (factor - 1) / 2 * source_spacing[0], 0.0)
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
            source_images=[_geometry_source(source, frame_uid, source_spacing)],
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
            plane_positions=[hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT, first)],
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
