"""The Secondary Capture that carries the heatmap over the radiograph back to the PACS (highdicom ``SCImage``).

Pure: takes the source dataset, the rendered overlay and the result; returns a new dataset. Identity is
deterministic: the SOP Instance UID derives from (source SOP Instance UID, model id, model version, method),
so a re-sent image replaces its overlay instead of adding a second one, and the series UID from the source
series with the same keys, so one source series gets one overlay series.
"""

from __future__ import annotations

import functools
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

import dicom_node.outputs.iod_lookups  # noqa: F401  (highdicom's IOD lookups cached per process: see there)
from dicom_node.errors import CxrLensError
from dicom_node.outputs.results import (
    AI_DISCLAIMER,
    NODE_MANUFACTURER,
    NODE_MODEL_NAME,
    InferenceResult,
)

SC_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
OVERLAY_SERIES_NUMBER = 9901


@functools.cache  # reading the installed distribution's metadata costs ~1 ms, and each output asks
def software_version() -> str:
    try:
        return version("cxr-lens")
    except PackageNotFoundError:  # running from a source tree that was not installed
        return "0+unknown"


def overlay_uids(source: Dataset, result: InferenceResult) -> tuple[str, str]:
    """(Series Instance UID, SOP Instance UID) of the overlay for ``source``: stable across re-sends."""
    keys = [result.model_id, result.model_version, result.method]
    series_uid = generate_uid(entropy_srcs=["cxr-lens overlay series", str(source.SeriesInstanceUID), *keys])
    sop_uid = generate_uid(entropy_srcs=["cxr-lens overlay instance", str(source.SOPInstanceUID), *keys])
    return series_uid, sop_uid


class SecondaryCaptureError(CxrLensError):
    """The source's header cannot make a valid Secondary Capture (an attribute the SC copies is invalid)."""


def series_description(result: InferenceResult) -> str:
    text = f"AI {result.method} overlay - {result.model_id} {result.model_version}"
    if result.model_label:
        text += " " + result.model_label.split()[0]  # DEMO or TEST
    return text[:64]  # LO: at most 64 characters


def _instance_number(source: Dataset) -> int:
    """The source's Instance Number, or 1 when it has none or an invalid one (pydicom keeps an invalid IS as text)."""
    try:
        return int(source.get("InstanceNumber") or 1)
    except (TypeError, ValueError):
        return 1


def _sc_image(
    source: Dataset, overlay_rgb: np.ndarray, series_uid: str, sop_uid: str, orientation: Any
) -> hd.sc.SCImage:
    """highdicom's SC of the overlay, with Patient and Study copied from ``source``."""
    return hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=overlay_rgb,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=series_uid,
        series_number=OVERLAY_SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=_instance_number(source),
        manufacturer=NODE_MANUFACTURER,
        # highdicom insists on an orientation for PATIENT; the attribute is Type 2 in the General Image
        # module, so when the source has none we write it empty below rather than invent one.
        patient_orientation=tuple(orientation) if orientation and len(orientation) == 2 else ("L", "F"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )


def build_secondary_capture(source: Dataset, overlay_rgb: np.ndarray, result: InferenceResult) -> Dataset:
    """An RGB Secondary Capture Image of ``overlay_rgb`` in the source's study, referencing the source image."""
    if overlay_rgb.ndim != 3 or overlay_rgb.shape[2] != 3 or overlay_rgb.dtype != np.uint8:
        raise ValueError("overlay_rgb must be an HxWx3 uint8 array")
    series_uid, sop_uid = overlay_uids(source, result)
    orientation = source.get("PatientOrientation")
    try:
        sc = _sc_image(source, overlay_rgb, series_uid, sop_uid, orientation)
    except (ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
        # highdicom's and pydicom's messages quote the offending value, which may be patient data: type only.
        raise SecondaryCaptureError(f"the source header cannot be copied into an SC ({type(exc).__name__})") from exc
    if not (orientation and len(orientation) == 2):
        sc.PatientOrientation = ""  # type: ignore[assignment]  # pydicom types it as a list; empty is ""
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = "YES"
    sc.ConversionType = "WSD"  # workstation: a rendered derived image, not a digitised film
    sc.ManufacturerModelName = NODE_MODEL_NAME
    sc.SoftwareVersions = [software_version(), f"{result.model_id} {result.model_version}"[:64]]  # type: ignore[assignment]
    sc.SeriesDescription = series_description(result)
    derivation = (
        f"{result.method} heatmap over the source radiograph; predicted {result.label} "
        f"p={result.probability:.3f}; model {result.model_text}"
    )
    sc.DerivationDescription = derivation[:1024]
    comments = [AI_DISCLAIMER] + ([result.model_label] if result.model_label else [])
    if result.no_evidence:
        comments.append("NO EVIDENCE: the heatmap is empty for the predicted class")
    if result.trust_warning:
        comments.append(result.trust_warning)
    sc.ImageComments = "; ".join(comments)
    for keyword in ("BodyPartExamined", "Laterality"):  # General Series attributes viewers filter on
        if keyword in source and keyword not in sc:
            setattr(sc, keyword, source[keyword].value)
    if source.get("LossyImageCompression") == "01":
        # The overlay is made from lossy-compressed pixels: say so (PS3.3 C.7.6.1.1.5).
        sc.LossyImageCompression = "01"
        for keyword in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
            if keyword in source:
                setattr(sc, keyword, source[keyword].value)
    ref = Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = Sequence([ref])
    return sc
