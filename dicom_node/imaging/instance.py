"""Reading a DICOM instance that is already in memory without copying its Pixel Data. Pure functions.

The header (every element before (7FE0,0010) Pixel Data, PS3.5 7.5 and A.4) is parsed by pydicom; the Pixel
Data value is returned as a view of the caller's buffer: a spooled file mapped in memory (:func:`read_file`) or
the data set of a C-STORE request as pynetdicom received it (:func:`read_data_set`). A radiograph is several
megabytes and only its header is ever needed as a :class:`~pydicom.dataset.Dataset`, so neither the SCP's
checks nor the worker's decoding copies the pixels. Elements after the Pixel Data (trailing padding, digital
signatures) are not read.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass

import pydicom
from pydicom import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag
from pydicom.uid import DeflatedExplicitVRLittleEndian
from typing_extensions import Buffer

PIXEL_DATA_TAG = 0x7FE00010
# VRs whose explicit-VR element header has 2 reserved bytes and a 4-byte length (PS3.5 Table 7.1-1).
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_UNDEFINED_LENGTH = 0xFFFFFFFF


@dataclass(frozen=True)
class Instance:
    """A data set's header and its Pixel Data value.

    ``header`` holds every element before (7FE0,0010) (and ``file_meta`` when read from a Part 10 file);
    ``pixel_data`` is the value as stored (native pixels, or the encapsulated items of PS3.5 A.4), a view of the
    buffer that was read, cut short where the buffer ends; None when there is no Pixel Data element.
    """

    header: Dataset
    pixel_data: memoryview | None


class BufferReader:
    """A read-only file object over a buffer: what pydicom's readers need (``read``, ``seek``, ``tell``)."""

    def __init__(self, buffer: Buffer) -> None:
        self._view = memoryview(buffer).cast("B")
        self._pos = 0

    def read(self, size: int | None = -1) -> bytes:
        end = len(self._view) if size is None or size < 0 else min(len(self._view), self._pos + size)
        start, self._pos = self._pos, max(self._pos, end)
        return bytes(self._view[start:end])

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos


def _before_pixel_data(tag: BaseTag, vr: str | None, length: int) -> bool:
    return int(tag) == PIXEL_DATA_TAG


def read_file(buffer: Buffer) -> Instance:
    """A DICOM Part 10 file (preamble, file meta, data set) read up to its Pixel Data.

    Raises what pydicom raises for a file it cannot read. A deflated data set (PS3.5 A.5) is inflated first, so
    its Pixel Data is a view of the inflated copy.
    """
    view = memoryview(buffer).cast("B")
    reader = BufferReader(view)
    header = pydicom.dcmread(reader, stop_before_pixels=True)
    # pydicom keeps the file object to read deferred values from; nothing is deferred here, and the header must
    # not keep the caller's buffer (a mapped file) alive, nor fail to pickle because of it.
    header.buffer, header.fileobj_type = None, None
    transfer_syntax = header.file_meta.get("TransferSyntaxUID")
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        full = pydicom.dcmread(BufferReader(view))
        pixel_data = full.get("PixelData")
        return Instance(header, None if pixel_data is None else memoryview(pixel_data))
    implicit = transfer_syntax is not None and transfer_syntax.is_implicit_VR
    little = transfer_syntax is None or transfer_syntax.is_little_endian
    return Instance(header, _pixel_value(view, reader.tell(), implicit_vr=implicit, little_endian=little))


def read_data_set(buffer: Buffer, *, implicit_vr: bool, little_endian: bool, deflated: bool = False) -> Instance:
    """A data set without file meta (a C-STORE request's), encoded as its presentation context says, read up to
    its Pixel Data. Raises what pydicom raises for a data set it cannot read, or ``zlib.error``."""
    view = memoryview(buffer).cast("B")
    if deflated:
        view = memoryview(zlib.decompress(view, -zlib.MAX_WBITS))
        implicit_vr, little_endian = False, True
    reader = BufferReader(view)
    header = read_dataset(reader, implicit_vr, little_endian, stop_when=_before_pixel_data)  # type: ignore[arg-type]
    return Instance(header, _pixel_value(view, reader.tell(), implicit_vr=implicit_vr, little_endian=little_endian))


def _pixel_value(view: memoryview, pos: int, *, implicit_vr: bool, little_endian: bool) -> memoryview | None:
    """The value of the Pixel Data element whose header starts at ``pos``, or None when none starts there."""
    order = "<" if little_endian else ">"
    if pos + 8 > len(view) or struct.unpack_from(f"{order}HH", view, pos) != (0x7FE0, 0x0010):
        return None
    if implicit_vr:
        length, start = struct.unpack_from(f"{order}I", view, pos + 4)[0], pos + 8
    elif bytes(view[pos + 4 : pos + 6]) in _LONG_VRS:
        if pos + 12 > len(view):
            return None
        length, start = struct.unpack_from(f"{order}I", view, pos + 8)[0], pos + 12
    else:
        length, start = struct.unpack_from(f"{order}H", view, pos + 6)[0], pos + 8
    if length == _UNDEFINED_LENGTH:
        return view[start : _sequence_end(view, start, order)]
    return view[start : start + length]


def _sequence_end(view: memoryview, pos: int, order: str) -> int:
    """Where the Sequence Delimitation Item (FFFE,E0DD) after the items starting at ``pos`` lies (PS3.5 A.4): the
    end of the value. Without one (a cut file, a foreign tag among the items) the value runs to the end of the
    buffer, and decoding names what is wrong with it."""
    while pos + 8 <= len(view):
        group, element, length = struct.unpack_from(f"{order}HHI", view, pos)
        if (group, element) == (0xFFFE, 0xE0DD):
            return pos
        if (group, element) != (0xFFFE, 0xE000) or length == _UNDEFINED_LENGTH:
            break
        pos += 8 + length
    return len(view)
