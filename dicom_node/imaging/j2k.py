"""Reduced-resolution decoding of JPEG 2000 and HTJ2K codestreams (glymur over OpenJPEG).

A JPEG 2000 codestream is a wavelet pyramid (ISO 15444-1 Annex F): its resolution level ``r`` is the image
downsampled by ``2**r`` and can be decoded without the code-blocks of the finer levels, so a 1955x1841 chest
radiograph needed at about 500 pixels costs a sixteenth of a full decode. pylibjpeg-openjpeg (pydicom's
decoder) always decodes level 0; glymur exposes OpenJPEG's ``reduce`` and is the maintained library for it.

glymur reads files, not buffers, so the frame's codestream is written to a temporary file first, straight from
its fragments (a few milliseconds for a few MB, no fsync). Anything unusual (no libopenjp2, more than one
component, a signedness or precision that disagrees with the DICOM header, a decoder error) returns ``None`` and
the caller decodes in full through pydicom, which knows every correction that DICOM's JPEG 2000 files need.
"""

from __future__ import annotations

import logging
import math
import os
import struct
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from typing_extensions import Buffer

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_glymur: Any = None
_available: bool | None = None


@dataclass(frozen=True)
class CodestreamHeader:
    """What the main header says (ISO 15444-1 A.5.1 SIZ, A.6.1 COD, A.6.2 COC)."""

    rows: int
    columns: int
    components: int
    precision: int
    signed: bool
    levels: int  # decomposition levels of the component (the smallest, if a COC lowers it)


def parse_header(codestream: Buffer) -> CodestreamHeader | None:
    """The SIZ and COD/COC facts of a codestream's main header, or None when they are not all there."""
    codestream = memoryview(codestream).cast("B")
    if bytes(codestream[:4]) != b"\xff\x4f\xff\x51":
        return None
    pos = 2
    size: tuple[int, int, int, int, bool] | None = None
    levels: list[int] = []
    end = len(codestream)
    while pos + 4 <= end:
        marker, length = struct.unpack_from(">HH", codestream, pos)
        if marker == 0xFF90 or length < 2 or pos + 2 + length > end:  # SOT: the main header is over
            break
        body = codestream[pos + 4 : pos + 2 + length]
        if marker == 0xFF51 and len(body) >= 39:  # SIZ
            x_size, y_size, x_offset, y_offset = struct.unpack_from(">IIII", body, 2)
            components = struct.unpack_from(">H", body, 34)[0]
            ssiz = body[36]
            size = (y_size - y_offset, x_size - x_offset, components, (ssiz & 0x7F) + 1, bool(ssiz & 0x80))
        elif marker == 0xFF52 and len(body) >= 6:  # COD: Scod, progression, layers(2), MCT, then SPcod
            levels.append(body[5])
        elif marker == 0xFF53 and size is not None:  # COC: component index is 1 or 2 bytes, then Scoc, SPcoc
            offset = 1 if size[2] < 257 else 2
            if len(body) > offset + 1:
                levels.append(body[offset + 1])
        pos += 2 + length
    if size is None or not levels:
        return None
    rows, columns, components, precision, signed = size
    return CodestreamHeader(rows, columns, components, precision, signed, min(levels))


def choose_level(header: CodestreamHeader, long_side: int, min_shape: tuple[int, int]) -> int:
    """The coarsest resolution level that still serves both needs, or 0.

    ``long_side``: the long side the caller will show (the overlay cap); a level may fall short of it by up
    to a factor sqrt(2) (the nearest level in log scale: the cap is a maximum, so a slightly smaller image
    honours it). ``min_shape``: (rows, columns) that a level must reach in full (the model's input), never
    approximated.
    """
    best = 0
    for level in range(1, header.levels + 1):
        rows = math.ceil(header.rows / 2**level)
        columns = math.ceil(header.columns / 2**level)
        if rows < min_shape[0] or columns < min_shape[1]:
            break
        if max(rows, columns) * math.sqrt(2) < min(long_side, max(header.rows, header.columns)):
            break
        best = level
    return best


def available() -> bool:
    """Whether glymur and an OpenJPEG library it can load are installed (checked once)."""
    global _glymur, _available
    with _lock:
        if _available is None:
            try:
                import glymur  # warns (once) when it finds no OpenJPEG library
                from glymur.lib import openjp2

                _available = openjp2.OPENJP2 is not None
                _glymur = glymur if _available else None
            except Exception:  # noqa: BLE001 (ImportError, or its warning raised as an error)
                _available = False
            if not _available:
                logger.info("reduced-resolution JPEG 2000 decoding unavailable (glymur or libopenjp2 missing): "
                            "JPEG 2000 images are decoded in full")
        return _available


def decode_reduced(
    codestream: Buffer | Sequence[Buffer], level: int, *, signed: bool, bits_stored: int, bits_allocated: int
) -> np.ndarray | None:
    """Resolution level ``level`` of a single-component codestream as a 2-D array, or None (decode in full).

    ``codestream``: its bytes, or its parts in order (the fragments of a frame, PS3.5 A.4), written out as they
    are; the main header must lie in the first part.

    ``signed``, ``bits_stored`` and ``bits_allocated`` come from the DICOM header. A codestream whose
    signedness disagrees, or a signed one whose precision differs from Bits Stored, needs the corrections
    pydicom applies (PS3.5 8.2.4 notes), so it is left to the full decode. An unsigned codestream with a
    precision above Bits Stored (encoders that write 16 for 12-bit data) holds the same values.
    """
    parts: Sequence[Buffer] = codestream if isinstance(codestream, list | tuple) else [codestream]  # type: ignore[list-item]
    header = parse_header(parts[0]) if parts else None
    if header is None or header.components != 1 or not 1 <= level <= header.levels:
        return None
    if header.signed != signed or header.precision > bits_allocated:
        return None
    if signed and header.precision != bits_stored:
        return None
    if not available():
        return None
    glymur = _glymur
    fd, path = tempfile.mkstemp(suffix=".j2k", prefix="cxr-lens-")
    try:
        with os.fdopen(fd, "wb") as out:
            out.writelines(parts)
        # No warnings.catch_warnings here: it changes the filters of the whole process, not of this thread.
        step = 2**level
        array = glymur.Jp2k(path)[::step, ::step]
    except Exception as exc:  # noqa: BLE001 (any failure here only means "decode in full")
        logger.debug("reduced JPEG 2000 decode failed (%s); decoding in full", type(exc).__name__)
        return None
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
    expected = (math.ceil(header.rows / 2**level), math.ceil(header.columns / 2**level))
    if array.ndim != 2 or array.shape != expected:
        return None
    return array
