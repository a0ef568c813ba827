"""Synthetic radiographs as real DICOM files in every transfer syntax, and malformed instances, for tests.

The data sets themselves come from :func:`dicom_node.peers.synthetic_cr.make_cr_dataset`. ``write`` stores one in
any transfer syntax of :data:`dicom_node.imaging.pixels.SUPPORTED_TRANSFER_SYNTAXES` using, per syntax, the
encoder named in :data:`ENCODERS`: pydicom itself (uncompressed, deflated, RLE, JPEG-LS and JPEG 2000 through its
plugins), imagecodecs/OpenJPH (HTJ2K, which neither pydicom nor OpenJPEG can encode) and dcmtk (JPEG processes 1,
2/4 and 14, and big endian, which pydicom 3 cannot write correctly for OW pixel data). ``encoder_missing`` tells a
test which tool is absent so it can skip with the reason.
"""

from __future__ import annotations

import copy
import importlib.util
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
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
)

from dicom_node.peers.synthetic_cr import decimal_string

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
        ds.LossyImageCompressionRatio = decimal_string(round(arr.nbytes / len(codestream), 2))


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
