"""Synthetic chest radiographs as real DICOM files, for tests.

``make_cr_dataset`` builds a CR Image Storage (PS3.3 A.2) or Digital X-Ray Image Storage - For Presentation
(PS3.3 A.26) instance in Explicit VR Little Endian with a procedural chest-like image: dark lungs, a bright
mediastinum and spine, faint ribs, a diaphragm, and direct exposure around the body.

``write`` stores a dataset in any transfer syntax of :data:`dicom_node.imaging.pixels.SUPPORTED_TRANSFER_SYNTAXES`
using, per syntax, the encoder named in :data:`ENCODERS`: pydicom itself (uncompressed, deflated, RLE, JPEG-LS
and JPEG 2000 through its plugins), imagecodecs/OpenJPH (HTJ2K, which neither pydicom nor OpenJPEG can encode)
and dcmtk (JPEG processes 1, 2/4 and 14, and big endian, which pydicom 3 cannot write correctly for OW pixel
data). ``encoder_missing`` tells a test which tool is absent so it can skip with the reason.
"""

from __future__ import annotations

import copy
import datetime
import importlib.util
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)

CR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")
DX_FOR_PRESENTATION_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1.1")

# Transfer syntax -> (encoder, options). "pydicom": Dataset.compress(uid, **options) or a plain save;
# "htj2k": imagecodecs.htj2k_encode(**options); "dcmtk": the command line, input and output appended.
ENCODERS: dict[UID, tuple[str, Any]] = {
    ImplicitVRLittleEndian: ("pydicom", {}),
    ExplicitVRLittleEndian: ("pydicom", {}),
    DeflatedExplicitVRLittleEndian: ("pydicom", {}),
    ExplicitVRBigEndian: ("dcmtk", ["dcmconv", "+tb"]),
    RLELossless: ("pydicom", {}),
    JPEGLSLossless: ("pydicom", {}),
    JPEGLSNearLossless: ("pydicom", {"jls_error": 3}),
    JPEG2000Lossless: ("pydicom", {}),
    JPEG2000: ("pydicom", {"j2k_cr": [15]}),
    # OpenJPH writes RPCL progression by default; the RPCL syntax also needs TLM markers (PS3.5 A.4.11).
    HTJ2KLossless: ("htj2k", {"reversible": True}),
    HTJ2KLosslessRPCL: ("htj2k", {"reversible": True, "tlm": True}),
    HTJ2K: ("htj2k", {"reversible": False, "level": 0.0005}),  # level is the quantisation step
    JPEGBaseline8Bit: ("dcmtk", ["dcmcjpeg", "+eb", "+q", "95"]),
    JPEGExtended12Bit: ("dcmtk", ["dcmcjpeg", "+ee", "+q", "95"]),
    JPEGLossless: ("dcmtk", ["dcmcjpeg", "+el", "+sv", "6"]),
    JPEGLosslessSV1: ("dcmtk", ["dcmcjpeg", "+e1"]),
}

LOSSY_TRANSFER_SYNTAXES: frozenset[UID] = frozenset(
    {JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSNearLossless, JPEG2000, HTJ2K}
)
# JPEG baseline carries 8-bit samples only (PS3.5 A.4.1); JPEG extended at most 12.
MAX_BITS_STORED: dict[UID, int] = {JPEGBaseline8Bit: 8, JPEGExtended12Bit: 12}

CHEST_CODE = ("51185008", "SCT", "Chest")


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
    window: tuple[float, float] | Sequence[tuple[float, float]] | None = None,
    voi_lut: tuple[int, int, Sequence[int]] | Sequence[tuple[int, int, Sequence[int]]] | None = None,
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
        ds.RescaleSlope = _ds_str(rescale[0])
        ds.RescaleIntercept = _ds_str(rescale[1])
        ds.RescaleType = "US"

    if window is not None:
        pairs = [window] if _is_pair(window) else list(window)  # type: ignore[list-item]
        ds.WindowCenter = [_ds_str(c) for c, _ in pairs]
        ds.WindowWidth = [_ds_str(w) for _, w in pairs]
        ds.WindowCenterWidthExplanation = [f"WINDOW{i + 1}" for i in range(len(pairs))]
    if voi_lut_function is not None:
        ds.VOILUTFunction = voi_lut_function
    if voi_lut is not None:
        luts = [voi_lut] if isinstance(voi_lut[0], int) else list(voi_lut)  # type: ignore[list-item]
        items = []
        for i, (first_mapped, bits, data) in enumerate(luts):  # type: ignore[misc]
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
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    ds["PixelData"].VR = "OB" if bits_allocated == 8 else "OW"
    return ds


def stored_values(ds: Dataset) -> np.ndarray:
    """The stored values of a dataset as a 2-D array (decoded with pydicom, the dataset left untouched)."""
    from pydicom.pixels import pixel_array

    return pixel_array(ds)


def encoder_missing(transfer_syntax: str) -> str | None:
    """Why ``write`` cannot produce ``transfer_syntax`` on this machine, or None when it can."""
    uid = UID(transfer_syntax)
    if uid not in ENCODERS:
        return f"no encoder configured for {uid} ({uid.name})"
    kind, options = ENCODERS[uid]
    if kind == "dcmtk" and shutil.which(options[0]) is None:
        return f"dcmtk's {options[0]} is not installed (Debian package dcmtk)"
    if kind == "htj2k" and importlib.util.find_spec("imagecodecs") is None:
        return "imagecodecs (OpenJPH) is not installed: the only HTJ2K encoder available to the tests"
    if kind == "pydicom" and uid.is_compressed:
        from pydicom.pixels import get_encoder

        encoder = get_encoder(uid)
        if not encoder.is_available:
            return f"pydicom cannot encode {uid.name}: {encoder.missing_dependencies}"
    return None


def write(ds: Dataset, path: str | Path, transfer_syntax: str = ExplicitVRLittleEndian) -> Path:
    """Write ``ds`` (uncompressed, Explicit VR Little Endian) to ``path`` in ``transfer_syntax``.

    The input dataset is never modified. Raises RuntimeError naming the missing tool when
    :func:`encoder_missing` says the syntax cannot be produced here.
    """
    uid = UID(transfer_syntax)
    path = Path(path)
    if (reason := encoder_missing(uid)) is not None:
        raise RuntimeError(reason)
    if ds.file_meta.TransferSyntaxUID != ExplicitVRLittleEndian:
        raise ValueError("write expects an uncompressed Explicit VR Little Endian dataset")
    if uid in MAX_BITS_STORED and ds.BitsStored > MAX_BITS_STORED[uid]:
        raise ValueError(f"{uid.name} carries at most {MAX_BITS_STORED[uid]} bits, not {ds.BitsStored}")
    kind, options = ENCODERS[uid]
    out = copy.deepcopy(ds)
    if kind == "pydicom":
        if uid.is_compressed:
            out.compress(uid, **options)
        else:
            out.file_meta.TransferSyntaxUID = uid
        out.save_as(path, enforce_file_format=True)
    elif kind == "htj2k":
        _encode_htj2k(out, uid, options)
        out.save_as(path, enforce_file_format=True)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            source = Path(tmp) / "source.dcm"
            out.save_as(source, enforce_file_format=True)
            subprocess.run([*options, str(source), str(path)], check=True, capture_output=True, timeout=120)
    return path


def encoded(ds: Dataset, transfer_syntax: str, directory: str | Path) -> Dataset:
    """Write ``ds`` in ``transfer_syntax`` under ``directory`` and read it back (what a node would receive)."""
    uid = UID(transfer_syntax)
    path = write(ds, Path(directory) / f"{uid}.dcm", uid)
    back = pydicom.dcmread(path)
    if back.file_meta.TransferSyntaxUID != uid:
        raise AssertionError(f"encoder wrote {back.file_meta.TransferSyntaxUID}, not {uid}")
    return back


def _encode_htj2k(ds: Dataset, uid: UID, options: dict[str, Any]) -> None:
    import imagecodecs

    arr = stored_values(ds)
    codestream = imagecodecs.htj2k_encode(arr, **options)
    ds.PixelData = encapsulate([codestream])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = uid
    if uid == HTJ2K:
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionMethod = "ISO_15444_15"
        ds.LossyImageCompressionRatio = _ds_str(round(arr.nbytes / len(codestream), 2))


def _is_pair(value: Any) -> bool:
    return len(value) == 2 and all(isinstance(v, (int, float)) for v in value)


def _ds_str(value: float) -> str:
    """A DS value (at most 16 characters, PS3.5 6.2)."""
    text = f"{value:.10g}"
    if len(text) > 16:
        raise ValueError(f"{value} does not fit a DS value")
    return text


# --- Malformed instances, written byte by byte -----------------------------------------------------------------
# pydicom validates what it writes (conftest raises on invalid values), so a hostile instance is assembled from
# raw Explicit VR Little Endian elements (PS3.5 7.1.2) around the elements pydicom encodes for the valid rest.

_LONG_LENGTH_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})
UNDEFINED_LENGTH = 0xFFFFFFFF
ITEM = 0xFFFEE000
ITEM_DELIMITER = 0xFFFEE00D
SEQUENCE_DELIMITER = 0xFFFEE0DD


def raw_element(tag: int, vr: str, value: bytes, *, length: int | None = None) -> bytes:
    """One Explicit VR Little Endian data element as given: no validation. An odd ``value`` is padded (NUL for
    UI and binary VRs, space for text); ``length`` overrides the length field (e.g. to lie about the value)."""
    if len(value) % 2:
        value += b"\x00" if vr in ("UI", "OB", "UN") else b" "
    size = len(value) if length is None else length
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr.encode("ascii")
    if vr in _LONG_LENGTH_VRS:
        return head + b"\x00\x00" + struct.pack("<I", size) + value
    return head + struct.pack("<H", size) + value


def _delimiter(tag: int, length: int = 0) -> bytes:
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, length)


def nested_sequences(depth: int, tag: int = 0x0040A730) -> bytes:
    """``depth`` undefined-length sequences, each in the one item of its parent (REFERENCE.md: pydicom cannot
    write this in reasonable memory, and reading it recurses once per level)."""
    head = (struct.pack("<HH", tag >> 16, tag & 0xFFFF) + b"SQ\x00\x00" + struct.pack("<I", UNDEFINED_LENGTH)
            + _delimiter(ITEM, UNDEFINED_LENGTH))
    tail = _delimiter(ITEM_DELIMITER) + _delimiter(SEQUENCE_DELIMITER)
    return head * depth + tail * depth


def encode_dataset(ds: Dataset, replace: dict[int, bytes | None] | None = None) -> bytes:
    """``ds`` (no file meta) as Explicit VR Little Endian bytes, element by element in tag order.

    ``replace`` maps a tag to the raw bytes written in its place (see :func:`raw_element`), to ``None`` to drop
    it, or adds a tag ``ds`` lacks. The file meta of ``ds`` is ignored: see :func:`part10`.
    """
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_data_element

    chunks: dict[int, bytes] = {}
    for elem in ds:
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        write_data_element(fp, elem, ds.get("SpecificCharacterSet") or "iso8859")
        chunks[int(elem.tag)] = fp.getvalue()
    for tag, raw in (replace or {}).items():
        if raw is None:
            chunks.pop(tag, None)
        else:
            chunks[tag] = raw
    return b"".join(chunks[tag] for tag in sorted(chunks))


def part10(data_set: bytes, *, sop_class_uid: str, sop_instance_uid: str,
           transfer_syntax: str = ExplicitVRLittleEndian) -> bytes:
    """A DICOM Part 10 file (PS3.10 7.1) around encoded data set bytes. The file meta is written by hand, so
    any UID string goes through; pynetdicom sends such a file as it is, taking the C-STORE request's UIDs from
    the file meta (``STORE_SEND_CHUNKED_DATASET``)."""
    meta = b"".join((
        raw_element(0x00020001, "OB", b"\x00\x01"),
        raw_element(0x00020002, "UI", sop_class_uid.encode("ascii", "replace")),
        raw_element(0x00020003, "UI", sop_instance_uid.encode("ascii", "replace")),
        raw_element(0x00020010, "UI", str(transfer_syntax).encode("ascii")),
        raw_element(0x00020012, "UI", PYDICOM_IMPLEMENTATION_UID.encode("ascii")),
    ))
    group_length = raw_element(0x00020000, "UL", struct.pack("<I", len(meta)))
    return b"\x00" * 128 + b"DICM" + group_length + meta + data_set
