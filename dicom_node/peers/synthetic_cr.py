"""Synthetic chest radiographs as DICOM data sets: what a test modality sends to the node.

``make_cr_dataset`` builds a CR Image Storage (PS3.3 A.2) or Digital X-Ray Image Storage - For Presentation
(PS3.3 A.26) instance in Explicit VR Little Endian with a procedural chest-like image: dark lungs, a bright
mediastinum and spine, faint ribs, a diaphragm, and direct exposure around the body. ``chest_images`` makes many
distinct ones cheaply (the load and crash benchmarks and their tests).
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Any, cast

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, generate_uid

CR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")
DX_FOR_PRESENTATION_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1.1")

CHEST_CODE = ("51185008", "SCT", "Chest")
WindowPair = tuple[float, float]  # (center, width)
VoiLut = tuple[int, int, Sequence[int]]  # (first mapped value, bits per entry, LUT data)


def chest_pattern(rows: int, cols: int, *, seed: int = 0) -> np.ndarray:
    """Return a float64 attenuation map in 0..1 (1 = most attenuating, displayed white in MONOCHROME2).

    Lungs are the two dark ellipses around columns 0.28*cols and 0.72*cols, the mediastinum/spine the bright
    vertical band in the centre; outside the body is direct exposure (near 0).
    """
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float64)
    y = 2.0 * yy / max(rows - 1, 1) - 1.0
    x = 2.0 * xx / max(cols - 1, 1) - 1.0
    att = np.full((rows, cols), 0.05)
    body = (x / 0.92) ** 2 + (y / 1.08) ** 2 < 1.0
    att[body] = 0.55
    lungs = np.zeros_like(body)
    for cx in (-0.44, 0.44):
        lungs |= ((x - cx) / 0.3) ** 2 + ((y + 0.05) / 0.62) ** 2 < 1.0
    att[lungs & body] = 0.2
    ribs = lungs & body & (np.sin(y * 26.0 + 2.5 * np.abs(x)) > 0.75)
    att[ribs] += 0.1
    att[body & (y > 0.62)] = 0.62
    att[body & (np.abs(x) < 0.14)] = 0.85
    rng = np.random.default_rng(seed)
    att += rng.normal(0.0, 0.01, size=att.shape)
    return np.clip(att, 0.0, 1.0)


def make_cr_dataset(
    *,
    rows: int = 512,
    cols: int = 480,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    modality: str = "CR",
    body_part: str = "CHEST",
    view_position: str = "PA",
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY"),
    window: WindowPair | Sequence[WindowPair] | None = None,
    voi_lut: VoiLut | Sequence[VoiLut] | None = None,
    voi_lut_function: str | None = None,
    rescale: tuple[float, float] | None = None,
    patient_name: str = "Doe^Jane",
    patient_id: str = "PID-1",
    accession: str = "ACC-1",
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    seed: int = 0,
    pixels: np.ndarray | None = None,
) -> Dataset:
    """Return a file-meta-complete CR (``modality="CR"``) or DX For Presentation (``"DX"``) dataset.

    ``window`` is one (center, width) pair or several (PS3.3 C.11.2.1.2: multiple values are alternative
    views). ``voi_lut`` is one (first_mapped_value, bits_per_entry, lut_data) triple or several, written as VOI
    LUT Sequence items (PS3.3 C.11.2.1.1). ``rescale`` is (slope, intercept) (PS3.3 C.11.1.1.2); a DX image
    always carries one (Type 1 in PS3.3 C.8.11.3), (1, 0) when not given. ``pixels`` overrides the procedural
    image with stored values (its shape sets Rows/Columns). MONOCHROME1 stores the mirrored values of the
    MONOCHROME2 image so that both display alike.
    """
    if modality not in ("CR", "DX"):
        raise ValueError(f"modality must be CR or DX, not {modality!r}")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"photometric must be MONOCHROME1 or MONOCHROME2, not {photometric!r}")
    if not 1 <= bits_stored <= 16:
        raise ValueError(f"bits_stored must lie in 1..16, not {bits_stored}")
    bits_allocated = 8 if bits_stored <= 8 else 16
    max_value = 2**bits_stored - 1
    if pixels is None:
        stored = np.rint(chest_pattern(rows, cols, seed=seed) * max_value).astype(np.int64)
        if photometric == "MONOCHROME1":
            stored = max_value - stored
    else:
        stored = np.asarray(pixels)
        if stored.ndim != 2 or stored.dtype.kind not in "ui":
            raise ValueError("pixels must be a 2-D integer array")
        if stored.size and (stored.min() < 0 or stored.max() > max_value):
            raise ValueError(f"pixels must lie in 0..{max_value} for bits_stored={bits_stored}")
        rows, cols = stored.shape
    dtype = np.uint8 if bits_allocated == 8 else np.uint16

    sop_class = CR_IMAGE_STORAGE if modality == "CR" else DX_FOR_PRESENTATION_STORAGE
    sop_uid = sop_uid or generate_uid()
    now = datetime.datetime(2024, 5, 17, 9, 30, 0)

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = list(image_type)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.AccessionNumber = accession
    ds.Modality = modality
    ds.Manufacturer = "CXR Lens test suite"
    ds.ReferringPhysicianName = ""
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.BodyPartExamined = body_part
    ds.ViewPosition = view_position
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ["L", "F"] if view_position == "PA" else ["R", "F"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"

    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.ImageLaterality = "U"
        ds.DetectorType = "SCINTILLATOR"
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = -1 if photometric == "MONOCHROME1" else 1
        # PS3.3 C.8.11.3.1.2: INVERSE for MONOCHROME1, IDENTITY for MONOCHROME2.
        ds.PresentationLUTShape = "INVERSE" if photometric == "MONOCHROME1" else "IDENTITY"
        region = Dataset()
        region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = CHEST_CODE
        ds.AnatomicRegionSequence = DicomSequence([region])
        rescale = rescale or (1.0, 0.0)
    if rescale is not None:
        ds.RescaleSlope = decimal_string(rescale[0])
        ds.RescaleIntercept = decimal_string(rescale[1])
        ds.RescaleType = "US"

    if window is not None:
        pairs = [cast(WindowPair, window)] if _is_pair(window) else list(cast(Sequence[WindowPair], window))
        ds.WindowCenter = [decimal_string(c) for c, _ in pairs]
        ds.WindowWidth = [decimal_string(w) for _, w in pairs]
        ds.WindowCenterWidthExplanation = [f"WINDOW{i + 1}" for i in range(len(pairs))]
    if voi_lut_function is not None:
        ds.VOILUTFunction = voi_lut_function
    if voi_lut is not None:
        luts = [cast(VoiLut, voi_lut)] if isinstance(voi_lut[0], int) else list(cast(Sequence[VoiLut], voi_lut))
        items = []
        for i, (first_mapped, bits, data) in enumerate(luts):
            item = Dataset()
            entries = len(data)
            # PS3.3 C.11.2.1.1: 65536 entries are written as 0.
            item.LUTDescriptor = [entries if entries < 65536 else 0, first_mapped, bits]
            item.LUTExplanation = f"LUT{i + 1}"
            # 16 bits allocated per entry whatever the bits per entry (PS3.3 C.11.2.1.1); OW fits any length.
            item.LUTData = np.asarray(data, dtype="<u2").tobytes()
            item["LUTData"].VR = "OW"
            items.append(item)
        ds.VOILUTSequence = DicomSequence(items)

    ds.PixelData = stored.astype(dtype).tobytes()

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    ds["PixelData"].VR = "OB" if bits_allocated == 8 else "OW"
    return ds



def chest_images(n: int, *, rows: int = 512, cols: int = 512, tag: str = "LOAD") -> list[Dataset]:
    """``n`` CR chest radiographs, each its own study, series and SOP instance (distinct bytes, distinct jobs).

    The pixels are drawn once and shared: the CPU should go to the node, not to making test data.
    """
    stored = np.rint(chest_pattern(rows, cols) * 4095).astype(np.uint16)
    return [
        make_cr_dataset(pixels=stored, patient_id=f"{tag}-{i:05d}", accession=f"{tag}{i:05d}",
                        study_uid=generate_uid(), series_uid=generate_uid(), sop_uid=generate_uid())
        for i in range(n)
    ]


def _is_pair(value: Any) -> bool:
    return len(value) == 2 and all(isinstance(v, (int, float)) for v in value)


def decimal_string(value: float) -> str:
    """A DS value (at most 16 characters, PS3.5 6.2)."""
    text = f"{value:.10g}"
    if len(text) > 16:
        raise ValueError(f"{value} does not fit a DS value")
    return text
