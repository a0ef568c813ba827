"""Malformed and hostile input against a running node (issue #6): each case ends in a named C-STORE status, or in
a job recorded as failed / ineligible with its reason; never in a crash, a partial output or a dead node.

One node (the demo model, our DICOM sink as the PACS, our MLLP sink as the RIS) serves every case in turn, over
the network: data sets go through pynetdicom's C-STORE byte for byte (the Part 10 file is sent as it is, so
invalid UIDs and values reach the wire), stream-level cases through a raw socket. After each case the test
checks that nothing was spooled or delivered that should not be, that no temporary file is left behind, and
that the node still answers C-ECHO.
"""

from __future__ import annotations

import re
import socket
import sqlite3
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    generate_uid,
)
from pynetdicom import AE, _config
from pynetdicom.sop_class import ComputedRadiographyImageStorage, Verification  # type: ignore[attr-defined]

from dicom_node.peers.dicom_sink import DicomSink
from dicom_node.peers.hl7_sink import HL7Sink
from dicom_node.peers.node_process import wait_until as _wait_until
from dicom_node.peers.synthetic_cr import make_cr_dataset
from dicom_node.receive.scp import QUEUE_FULL_COMMENT, StorageSCP, StoreStatus
from dicom_node.settings import DestinationSettings, NodeSettings, load_settings
from dicom_node.storage.jobs import JobQueue, JobState, jobs_path
from dicom_node.storage.spool import Spool
from tests.support.synthetic_dicom import (
    encode_dataset,
    encoded,
    encoder_missing,
    nested_sequences,
    part10,
    raw_element,
)

pytestmark = [
    # pydicom warns about each invalid value it converts and goes on; the node does the same in production. Under
    # pytest a warning raises in every thread (filterwarnings = error), which would turn these into other
    # outcomes (an aborted association, 0xC210) than a deployed node gives.
    pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning"),
    pytest.mark.filterwarnings("ignore:The value length .* exceeds the maximum length:UserWarning"),
]

NODE_AE = "CXRLENS"
MAX_PIXELS = 1_000_000  # pixels.max_pixels of the node under test: one case sends an image just above it
SETTLE_S = 60.0

PIXEL_DATA = 0x7FE00010
ROWS, COLUMNS, BITS_ALLOCATED, NUMBER_OF_FRAMES = 0x00280010, 0x00280011, 0x00280100, 0x00280008


# --- what is sent -------------------------------------------------------------------------------------------


def _cr(**kwargs: Any) -> Dataset:
    return make_cr_dataset(rows=kwargs.pop("rows", 64), cols=kwargs.pop("cols", 60), **kwargs)


def _us(tag: int, value: int) -> bytes:
    return raw_element(tag, "US", struct.pack("<H", value))


def _file(ds: Dataset, replace: dict[int, bytes | None] | None = None, *, sop_class: str | None = None,
          transfer_syntax: str = ExplicitVRLittleEndian, data_set: bytes | None = None) -> bytes:
    """A Part 10 file of ``ds`` (or of ``data_set`` bytes); the C-STORE request's UIDs come from its file meta."""
    return part10(
        encode_dataset(ds, replace) if data_set is None else data_set,
        sop_class_uid=sop_class or str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        transfer_syntax=transfer_syntax,
    )


def truncated_in_pixel_data() -> bytes:
    data = encode_dataset(_cr())
    return _file(_cr(), data_set=data[: len(data) - 2000])


def truncated_in_element_header() -> bytes:
    data = encode_dataset(_cr())
    return _file(_cr(), data_set=data[: data.index(struct.pack("<HH", 0x7FE0, 0x0010)) + 5])


def truncated_in_sequence() -> bytes:
    ds = _cr()
    item = raw_element(0x00081150, "UI", str(CTImageStorage).encode())
    sequence = (struct.pack("<HH", 0x0008, 0x1140) + b"SQ\x00\x00" + struct.pack("<I", 0xFFFFFFFF)
                + struct.pack("<HHI", 0xFFFE, 0xE000, 200) + item)  # the item claims 200 bytes and ends here
    return _file(ds, data_set=encode_dataset(ds, {0x00081140: sequence, PIXEL_DATA: None}))


def empty_data_set() -> bytes:
    return _file(_cr(), data_set=b"")


def deflated_garbage() -> bytes:
    return _file(_cr(), data_set=b"this is not a deflate stream" * 10, transfer_syntax=DeflatedExplicitVRLittleEndian)


def deflated_valid() -> bytes:
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    data = compressor.compress(encode_dataset(_cr())) + compressor.flush()
    return _file(_cr(), data_set=data, transfer_syntax=DeflatedExplicitVRLittleEndian)


def without(tag: int) -> Callable[[], bytes]:
    return lambda: _file(_cr(), {tag: None})


def with_elements(replace: dict[int, bytes | None]) -> Callable[[], bytes]:
    """A CR whose elements in ``replace`` (tag -> raw bytes) are written as given."""
    return lambda: _file(_cr(), replace)


def empty_pixel_data() -> bytes:
    return _file(_cr(), {PIXEL_DATA: raw_element(PIXEL_DATA, "OW", b"")})


def all_zero_image() -> bytes:
    return _file(_cr(pixels=np.zeros((64, 60), dtype=np.uint16)))


def over_max_pixels() -> bytes:
    side = int(MAX_PIXELS**0.5) + 1
    return _file(make_cr_dataset(pixels=np.full((side, side), 100, dtype=np.uint16)))


def rgb_colour() -> bytes:
    ds = _cr()
    rgb = np.zeros((64, 60, 3), dtype=np.uint8)
    rgb[..., 0] = 200
    replace = {
        0x00280002: _us(0x00280002, 3),
        0x00280004: raw_element(0x00280004, "CS", b"RGB"),
        0x00280006: _us(0x00280006, 0),  # Planar Configuration: colour-by-pixel
        BITS_ALLOCATED: _us(BITS_ALLOCATED, 8),
        0x00280101: _us(0x00280101, 8),
        0x00280102: _us(0x00280102, 7),
        PIXEL_DATA: raw_element(PIXEL_DATA, "OB", rgb.tobytes()),
    }
    return _file(ds, replace)


def multi_frame() -> bytes:
    frames = np.stack([np.full((64, 60), 1000, dtype=np.uint16), np.full((64, 60), 2000, dtype=np.uint16)])
    return _file(_cr(), {NUMBER_OF_FRAMES: raw_element(NUMBER_OF_FRAMES, "IS", b"2"),
                         PIXEL_DATA: raw_element(PIXEL_DATA, "OW", frames.tobytes())})


def nested_300() -> bytes:
    ds = _cr()
    return _file(ds, {0x0040A730: nested_sequences(300)})


def _j2k(tmp: Path) -> Dataset:
    if (reason := encoder_missing(JPEG2000Lossless)) is not None:
        pytest.skip(reason)
    return encoded(_cr(), JPEG2000Lossless, tmp)


def _patched_siz(ds: Dataset, rows: int, columns: int) -> bytes:
    """The encapsulated Pixel Data of ``ds`` with its SIZ marker segment claiming ``rows`` x ``columns``."""
    data = bytearray(ds.PixelData)
    siz = data.index(b"\xff\x4f\xff\x51") + 4  # SOC, then SIZ: Lsiz(2) Rsiz(2) Xsiz(4) Ysiz(4) XOsiz YOsiz ...
    struct.pack_into(">II", data, siz + 4, columns, rows)
    return bytes(data)


def j2k_bomb(header_too: bool) -> Callable[[Path], bytes]:
    """A 64x60 JPEG 2000 image whose codestream claims 60000x60000 (and whose header does too, if asked)."""
    def build(tmp: Path) -> bytes:
        ds = _j2k(tmp)
        pixel_data = _patched_siz(ds, 60000, 60000)
        replace = {PIXEL_DATA: _encapsulated(pixel_data)}
        if header_too:
            replace |= {ROWS: _us(ROWS, 60000), COLUMNS: _us(COLUMNS, 60000)}
        return _file(ds, replace, transfer_syntax=JPEG2000Lossless)
    return build


def j2k_noise(tmp: Path) -> bytes:
    """A JPEG 2000 instance whose codestream is SOC followed by noise (no SIZ marker segment to check)."""
    ds = _j2k(tmp)
    noise = np.random.default_rng(6).integers(0, 0xFF, 1024, dtype=np.uint8).tobytes()  # 0xFF never: no marker
    return _file(ds, {PIXEL_DATA: _encapsulated(b"\xff\x4f" + noise)}, transfer_syntax=JPEG2000Lossless)


def j2k_siz_origin_beyond_size(tmp: Path) -> bytes:
    """SOC + a SIZ marker segment of counting bytes: the image origin lies beyond the image size."""
    ds = _j2k(tmp)
    codestream = b"\xff\x4f\xff\x51" + bytes(range(256)) * 4
    return _file(ds, {PIXEL_DATA: _encapsulated(codestream)}, transfer_syntax=JPEG2000Lossless)


def _fragments(codestream: bytes) -> bytes:
    """Basic Offset Table (empty) + one fragment + sequence delimiter (PS3.5 A.4)."""
    if len(codestream) % 2:
        codestream += b"\x00"
    return (struct.pack("<HHI", 0xFFFE, 0xE000, 0) + struct.pack("<HHI", 0xFFFE, 0xE000, len(codestream))
            + codestream + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))


def _encapsulated(value: bytes) -> bytes:
    """Pixel Data (7FE0,0010) OB of undefined length holding a codestream, or the items of pydicom's encapsulated
    Pixel Data value (which leaves out the sequence delimiter)."""
    if value.startswith(struct.pack("<HH", 0xFFFE, 0xE000)):
        value += struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    else:
        value = _fragments(value)
    return struct.pack("<HH", 0x7FE0, 0x0010) + b"OB\x00\x00" + struct.pack("<I", 0xFFFFFFFF) + value


def sop_class_in_data_set(sop_class: str) -> Callable[[], bytes]:
    """The data set says ``sop_class``; the C-STORE request says CR."""
    def build() -> bytes:
        ds = _cr()
        return _file(ds, {0x00080016: raw_element(0x00080016, "UI", sop_class.encode())},
                     sop_class=ComputedRadiographyImageStorage)
    return build


def bad_uid(tag: int, uid: str) -> Callable[[], bytes]:
    """A CR whose data set carries ``uid`` at ``tag``; the request's Affected SOP Instance UID stays valid."""
    return lambda: _file(_cr(), {tag: raw_element(tag, "UI", uid.encode("ascii"))})


def patient_name(value: bytes, charset: bytes | None) -> Callable[[], bytes]:
    def build() -> bytes:
        ds = _cr()
        charset_element = None if charset is None else raw_element(0x00080005, "CS", charset)
        return _file(ds, {0x00080005: charset_element, 0x00100010: raw_element(0x00100010, "PN", value)})
    return build


def ct_modality() -> bytes:
    return _file(_cr(), {0x00080060: raw_element(0x00080060, "CS", b"CT")})


# --- raw association, PS3.8 9.3 ------------------------------------------------------------------------------


def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def _pdu(pdu_type: int, value: bytes, *, length: int | None = None) -> bytes:
    return struct.pack(">BBI", pdu_type, 0, len(value) if length is None else length) + value


def associate_rq(sop_class: str = ComputedRadiographyImageStorage) -> bytes:
    """A-ASSOCIATE-RQ proposing ``sop_class`` in Explicit VR Little Endian as presentation context 1."""
    context = b"\x01\x00\x00\x00" + _item(0x30, sop_class.encode()) + _item(0x40, ExplicitVRLittleEndian.encode())
    user = _item(0x51, struct.pack(">I", 16384)) + _item(0x52, b"1.2.826.0.1.3680043.9.3811.0")
    body = (struct.pack(">HH", 1, 0) + NODE_AE.ljust(16).encode() + b"RAWSCU".ljust(16) + bytes(32)
            + _item(0x10, b"1.2.840.10008.3.1.1.1") + _item(0x20, context) + _item(0x50, user))
    return _pdu(0x01, body)


def _implicit(tag: int, value: bytes) -> bytes:
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


def c_store_rq(sop_instance_uid: str) -> bytes:
    """A C-STORE-RQ command set (PS3.7 9.3.1.1), Implicit VR Little Endian, announcing a data set."""
    def ui(uid: str) -> bytes:
        raw = uid.encode()
        return raw + b"\x00" * (len(raw) % 2)
    elements = (_implicit(0x00000002, ui(ComputedRadiographyImageStorage)) + _implicit(0x00000100, b"\x01\x00")
                + _implicit(0x00000110, b"\x07\x00") + _implicit(0x00000700, b"\x00\x00")
                + _implicit(0x00000800, b"\x00\x00") + _implicit(0x00001000, ui(sop_instance_uid)))
    return _implicit(0x00000000, struct.pack("<I", len(elements))) + elements


def p_data(fragment: bytes, *, command: bool, last: bool) -> bytes:
    control = (0x01 if command else 0x00) | (0x02 if last else 0x00)
    return _pdu(0x04, struct.pack(">IBB", len(fragment) + 2, 1, control) + fragment)


A_ABORT = _pdu(0x07, b"\x00\x00\x00\x00")
A_RELEASE_RQ = _pdu(0x05, b"\x00\x00\x00\x00")


class RawPeer:
    """A socket speaking just enough of the Upper Layer protocol to misbehave on purpose."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)

    def associate(self) -> None:
        self.sock.sendall(associate_rq())
        pdu_type, body = self.read_pdu()
        assert pdu_type == 0x02, f"expected A-ASSOCIATE-AC, got PDU type 0x{pdu_type:02X}"
        # The one presentation context item (0x21) must be accepted (result 0).
        index = body.index(b"\x21\x00", 68)
        assert body[index + 6] == 0, "presentation context not accepted"

    def c_store(self, sop_instance_uid: str, data_set: bytes) -> tuple[int, str]:
        """Send one C-STORE-RQ and its data set; return the response's (Status, Error Comment)."""
        self.sock.sendall(p_data(c_store_rq(sop_instance_uid), command=True, last=True))
        self.sock.sendall(p_data(data_set, command=False, last=True))
        pdu_type, body = self.read_pdu()
        assert pdu_type == 0x04, f"expected P-DATA-TF with the C-STORE-RSP, got PDU type 0x{pdu_type:02X}"
        command = _implicit_elements(body[6:])  # PDV item length (4), context ID (1), control header (1)
        status = struct.unpack("<H", command[0x00000900])[0]
        comment = command.get(0x00000902, b"").decode("ascii").rstrip(" \0")
        self.sock.sendall(A_RELEASE_RQ)
        self.read_pdu()
        return status, comment

    def read_pdu(self) -> tuple[int, bytes]:
        head = self._read(6)
        if len(head) < 6:
            return 0, b""
        pdu_type, _, length = struct.unpack(">BBI", head)
        return pdu_type, self._read(length)

    def _read(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                break
            data += chunk
        return data

    def close(self) -> None:
        self.sock.close()


def _implicit_elements(data: bytes) -> dict[int, bytes]:
    """Tag -> value of an Implicit VR Little Endian command set."""
    out, pos = {}, 0
    while pos + 8 <= len(data):
        group, element, length = struct.unpack_from("<HHI", data, pos)
        out[(group << 16) | element] = data[pos + 8: pos + 8 + length]
        pos += 8 + length
    return out


def raw_c_store(request_uid: str) -> Callable[[int], tuple[int, str]]:
    """A C-STORE whose request carries ``request_uid`` (the data set's own UIDs are valid)."""
    def send(port: int) -> tuple[int, str]:
        peer = RawPeer(port)
        try:
            peer.associate()
            return peer.c_store(request_uid, encode_dataset(_cr()))
        finally:
            peer.close()
    return send


def stream_truncated_associate_rq(port: int) -> None:
    peer = RawPeer(port)
    rq = associate_rq()
    peer.sock.sendall(rq[: len(rq) // 2])
    peer.close()


def stream_not_dicom(port: int) -> None:
    peer = RawPeer(port)
    peer.sock.sendall(b"GET / HTTP/1.1\r\nHost: cxr-lens\r\n\r\n")
    peer.sock.settimeout(5)
    peer.read_pdu()  # an A-ABORT or a closed connection
    peer.close()


def stream_half_p_data(port: int) -> None:
    peer = RawPeer(port)
    peer.associate()
    uid = generate_uid()
    data = encode_dataset(_cr(sop_uid=uid))
    peer.sock.sendall(p_data(c_store_rq(uid), command=True, last=True))
    pdu = p_data(data, command=False, last=True)
    peer.sock.sendall(pdu[: len(pdu) // 2])
    peer.close()


def stream_p_data_claims_4_gib(port: int) -> None:
    peer = RawPeer(port)
    peer.associate()
    uid = generate_uid()
    peer.sock.sendall(p_data(c_store_rq(uid), command=True, last=True))
    peer.sock.sendall(_pdu(0x04, struct.pack(">IBB", 1000, 1, 0x02) + bytes(998), length=0xFFFFFFFF))
    peer.close()


def stream_abort_mid_data_set(port: int) -> None:
    peer = RawPeer(port)
    peer.associate()
    uid = generate_uid()
    data = encode_dataset(_cr(sop_uid=uid))
    peer.sock.sendall(p_data(c_store_rq(uid), command=True, last=True))
    peer.sock.sendall(p_data(data[: len(data) // 2], command=False, last=False))
    peer.sock.sendall(A_ABORT)
    peer.close()


def stream_command_uid_over_64(port: int) -> None:
    """A C-STORE-RQ whose Affected SOP Instance UID has 70 characters (pynetdicom's SCU refuses to send one)."""
    peer = RawPeer(port)
    peer.associate()
    uid = "1.2.3." + "4" * 64
    peer.sock.sendall(p_data(c_store_rq(uid), command=True, last=True))
    peer.sock.sendall(p_data(encode_dataset(_cr()), command=False, last=True))
    pdu_type, _ = peer.read_pdu()
    peer.close()
    # pynetdicom cannot decode such a command (PS3.5 9.1 caps a UID at 64 characters) and aborts the association.
    assert pdu_type == 0x07, f"expected A-ABORT, got PDU type 0x{pdu_type:02X}"


# --- the cases --------------------------------------------------------------------------------------------------

UID_WITH_TRAVERSAL = "1.2.826.0.1.3680043.8.498/../../../etc/passwd"
UID_65 = "1.2.826.0.1.3680043.8.498." + "1" * 39
UID_80 = "1.2.826.0.1.3680043.8.498." + "1" * 54


@dataclass(frozen=True)
class Case:
    """One malformed input and the outcome it must end in.

    ``send`` is a Part 10 file whose data set goes out byte for byte (``needs_tmp``: built with a scratch
    directory), or a function of the node's port that speaks the protocol itself and returns the C-STORE
    response's (Status, Error Comment), or None when the stream never completes a C-STORE.

    ``status`` is the C-STORE status the sender must get (None: no response at all). With a failure status,
    ``reason`` must match the Error Comment; with Success, ``job`` is the state the job must end in, and
    ``reason`` matches its reason (failed) or its rule (ineligible).
    """

    id: str
    send: Callable[..., Any]
    status: StoreStatus | None
    job: JobState | None = None
    reason: str = ""
    stream: bool = False
    needs_tmp: bool = False
    patient_name: str | None = None  # a processed case: the name the SC and the ORU must carry


C210, A900, OK = (StoreStatus.ERROR_CANNOT_UNDERSTAND, StoreStatus.ERROR_DATASET_DOES_NOT_MATCH_SOP_CLASS,
                  StoreStatus.SUCCESS)
FAILED, INELIGIBLE, DONE = JobState.FAILED, JobState.INELIGIBLE, JobState.DONE
UNPARSEABLE = "^Cannot understand: data set could not be parsed$"


def _stream(id: str, send: Callable[[int], Any], status: StoreStatus | None = None, reason: str = "") -> Case:
    return Case(id, send, status, reason=reason, stream=True)


CASES = [
    # Streams that never complete a C-STORE: no response, nothing stored.
    _stream("stream-truncated-associate-rq", stream_truncated_associate_rq),
    _stream("stream-not-dicom", stream_not_dicom),
    _stream("stream-half-p-data-then-disconnect", stream_half_p_data),
    _stream("stream-p-data-claims-4-gib", stream_p_data_claims_4_gib),
    _stream("stream-a-abort-mid-data-set", stream_abort_mid_data_set),
    _stream("stream-request-uid-over-64-chars-aborted", stream_command_uid_over_64),
    # Data sets that do not parse: 0xC210, nothing spooled.
    Case("truncated-in-sequence-item", truncated_in_sequence, C210, reason=UNPARSEABLE),
    Case("nested-sequences-300-deep", nested_300, C210, reason=UNPARSEABLE),
    Case("deflate-stream-corrupt", deflated_garbage, C210, reason=UNPARSEABLE),
    Case("empty-data-set", empty_data_set, C210, reason=UNPARSEABLE),
    Case("invalid-vr", with_elements({0x00181000: raw_element(0x00181000, "ZZ", b"SERIAL")}), C210,
         reason=UNPARSEABLE),
    Case("us-length-field-3-misaligns-the-stream",
         with_elements({ROWS: raw_element(ROWS, "US", b"\x40\x00\x00", length=3)}), C210, reason=UNPARSEABLE),
    # UIDs that are not UIDs: 0xC210 naming the attribute, before they reach a file, the SC or the ORU.
    Case("missing-sop-instance-uid", without(0x00080018), C210, reason="SOPInstanceUID$"),
    Case("missing-study-instance-uid", without(0x0020000D), C210, reason="StudyInstanceUID$"),
    Case("uid-with-path-traversal-in-data-set", bad_uid(0x00080018, UID_WITH_TRAVERSAL), C210,
         reason="^Missing or invalid UID: SOPInstanceUID$"),
    _stream("uid-with-path-traversal-in-request", raw_c_store(UID_WITH_TRAVERSAL), C210,
            reason="^Missing or invalid UID: AffectedSOPInstanceUID$"),
    Case("sop-instance-uid-65-chars", bad_uid(0x00080018, UID_65), C210, reason="SOPInstanceUID$"),
    Case("study-instance-uid-80-chars", bad_uid(0x0020000D, UID_80), C210, reason="StudyInstanceUID$"),
    Case("series-instance-uid-with-letters", bad_uid(0x0020000E, "1.2.840.ABC.1"), C210,
         reason="SeriesInstanceUID$"),
    # The data set contradicts the request.
    Case("sop-class-dx-in-data-set-cr-in-request", sop_class_in_data_set(DigitalXRayImageStorageForPresentation),
         A900, reason="differs from request"),
    Case("sop-class-ct-in-data-set-cr-in-request", sop_class_in_data_set(CTImageStorage), A900,
         reason="differs from request"),
    # Stored, then judged: ineligible by the rules, or failed with a named error before any output.
    Case("rgb-colour", rgb_colour, OK, INELIGIBLE, reason="^photometric$"),
    Case("modality-ct-in-a-cr", ct_modality, OK, INELIGIBLE, reason="^modality$"),
    Case("multi-frame", multi_frame, OK, FAILED, reason="^MultiFrameError"),
    Case("missing-pixel-data", without(PIXEL_DATA), OK, FAILED, reason="^MissingPixelDataError"),
    Case("empty-pixel-data", empty_pixel_data, OK, FAILED, reason="^MissingPixelDataError"),
    # pydicom stops quietly where the data ends: a cut file is a shorter data set, judged like any other.
    Case("truncated-in-pixel-data", truncated_in_pixel_data, OK, FAILED, reason="^DecodeError.*less than expected"),
    Case("truncated-in-pixel-data-header", truncated_in_element_header, OK, FAILED,
         reason="^MissingPixelDataError"),
    Case("rows-exceed-pixel-data-length", with_elements({ROWS: _us(ROWS, 128)}), OK, FAILED,
         reason="^DecodeError"),
    Case("bits-allocated-32-contradicts-length", with_elements({BITS_ALLOCATED: _us(BITS_ALLOCATED, 32)}),
         OK, FAILED, reason="^DecodeError"),
    Case("rows-with-two-values", with_elements({ROWS: raw_element(ROWS, "US", struct.pack("<HH", 64, 64))}),
         OK, FAILED, reason="^DecodeError.*Rows"),
    Case("dimensions-65535-x-65535", with_elements({ROWS: _us(ROWS, 65535), COLUMNS: _us(COLUMNS, 65535)}),
         OK, FAILED, reason="^ImageTooLargeError.*65535x65535"),
    Case("rows-zero", with_elements({ROWS: _us(ROWS, 0)}), OK, FAILED, reason="^ImageTooLargeError.*empty"),
    Case("above-configured-max-pixels", over_max_pixels, OK, FAILED,
         reason=f"^ImageTooLargeError.*maximum {MAX_PIXELS}"),
    Case("j2k-bomb-codestream-claims-60000-squared", j2k_bomb(header_too=False), OK, FAILED,
         reason="^ImageTooLargeError: the codestream", needs_tmp=True),
    Case("j2k-bomb-header-and-codestream-claim-60000-squared", j2k_bomb(header_too=True), OK, FAILED,
         reason="^ImageTooLargeError: the header", needs_tmp=True),
    Case("j2k-codestream-is-noise", j2k_noise, OK, FAILED, reason="^DecodeError", needs_tmp=True),
    Case("j2k-siz-origin-beyond-size", j2k_siz_origin_beyond_size, OK, FAILED,
         reason="^ImageTooLargeError: the codestream gives an empty image", needs_tmp=True),
    Case("all-zero-image", all_zero_image, OK, FAILED, reason="^AllZeroDecodeError"),
    # Invalid values the node does not rely on are kept as they came: processed.
    Case("instance-number-not-a-number", with_elements({0x00200013: raw_element(0x00200013, "IS", b"ONE")}),
         OK, DONE),
    # Unusual but valid: processed, the name intact in the SC and the ORU.
    Case("patient-name-utf8-with-charset", patient_name("Ærøskøbing^Zoë=山田^太郎".encode(), b"ISO_IR 192"), OK,
         DONE, patient_name="Ærøskøbing^Zoë=山田^太郎"),
    Case("patient-name-latin1-with-charset", patient_name("Müller^Jürgen".encode("latin-1"), b"ISO_IR 100"), OK,
         DONE, patient_name="Müller^Jürgen"),
    Case("patient-name-non-ascii-without-charset", patient_name("Müller^Jürgen".encode(), None), OK, DONE),
    Case("deflated-explicit-vr-little-endian", deflated_valid, OK, DONE),
]


# --- the node ------------------------------------------------------------------------------------------------


@dataclass
class NodeUnderTest:
    node: Any
    pacs: DicomSink
    ris: HL7Sink
    spool_dir: Path

    @property
    def port(self) -> int:
        return int(self.node.scp_port)

    def last_job_id(self) -> int:
        with sqlite3.connect(f"file:{jobs_path(self.spool_dir)}?mode=ro", uri=True) as db:
            return int(db.execute("SELECT COALESCE(MAX(id), 0) FROM jobs").fetchone()[0])

    def spool_files(self) -> list[Path]:
        return sorted(p for p in (self.spool_dir / "instances").rglob("*") if p.is_file())

    def outbox_total(self) -> int:
        return sum(self.node.dicom_sender.outbox.counts().values())

    def hl7_files(self) -> list[Path]:
        return sorted(self.ris.out_dir.glob("*.hl7"))


@pytest.fixture(scope="module")
def under_test(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeUnderTest]:
    from dicom_node.node import compose

    root = tmp_path_factory.mktemp("malformed")
    pacs = DicomSink(root / "pacs", ae_title="PACS")
    pacs.start()
    ris = HL7Sink("127.0.0.1", 0, root / "hl7")
    ris.start()
    spool_dir = root / "spool"
    settings = load_settings(None, [
        "node.host='127.0.0.1'", "node.port=0", "node.http_port=0", "node.free_disk_floor_mb=0",
        f"node.spool_dir='{spool_dir}'", "worker.batch_wait_ms=0", f"pixels.max_pixels={MAX_PIXELS}",
        f"hl7.port={ris.port}", "hl7.retry_initial_s=0.1", "node.retry_initial_s=0.1",
    ]).model_copy(update={"destinations": (DestinationSettings(ae_title="PACS", host="127.0.0.1", port=pacs.port),)})
    node = compose(settings)
    node.start()
    try:
        yield NodeUnderTest(node, pacs, ris, spool_dir)
    finally:
        node.stop()
        node.dicom_sender.outbox.close()
        pacs.stop()
        ris.stop()


def _file_meta(part10_file: bytes) -> dict[int, str]:
    """Tag -> text of the (Explicit VR Little Endian) file meta elements of a Part 10 file, read without pydicom,
    which would warn about (and under pytest, raise on) the invalid UIDs some cases carry."""
    out, pos = {}, 132
    while pos + 8 <= len(part10_file):
        group, element = struct.unpack_from("<HH", part10_file, pos)
        if group != 0x0002:
            break
        vr = part10_file[pos + 4: pos + 6]
        if vr in (b"OB", b"UN", b"SQ", b"UT"):
            length, pos = struct.unpack_from("<I", part10_file, pos + 8)[0], pos + 12
        else:
            length, pos = struct.unpack_from("<H", part10_file, pos + 6)[0], pos + 8
        out[(group << 16) | element] = part10_file[pos: pos + length].decode("ascii", "replace").rstrip(" \0")
        pos += length
    return out


def c_store_file(port: int, path: Path) -> Dataset:
    """C-STORE the data set of a Part 10 file exactly as it is in the file (pynetdicom does not decode it)."""
    meta = _file_meta(path.read_bytes())
    ae = AE(ae_title="MALFORMED")
    ae.add_requested_context(meta[0x00020002], meta[0x00020010])
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
    assert assoc.is_established
    chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        return assoc.send_c_store(path)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
        assoc.release()


def c_echo(port: int) -> int:
    ae = AE(ae_title="MALFORMED")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
    assert assoc.is_established, "the node no longer accepts associations"
    try:
        return int(assoc.send_c_echo().Status)
    finally:
        assoc.release()


def wait_until(predicate: Callable[[], bool], timeout: float = SETTLE_S) -> bool:
    return _wait_until(predicate, timeout, poll_s=0.02)


def send(case: Case, port: int, tmp_path: Path) -> tuple[StoreStatus | None, str]:
    """Send the case; returns the C-STORE response's status and Error Comment (None: no response)."""
    if case.stream:
        answer = case.send(port)
        return (None, "") if answer is None else (StoreStatus(answer[0]), answer[1])
    path = tmp_path / "sent.dcm"
    path.write_bytes(case.send(tmp_path) if case.needs_tmp else case.send())
    rsp = c_store_file(port, path)
    return StoreStatus(int(rsp.Status)), str(rsp.get("ErrorComment", ""))


@pytest.mark.tf  # the node runs the demo model
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_malformed_input(case: Case, under_test: NodeUnderTest, tmp_path: Path) -> None:
    t = under_test
    last_job, spooled = t.last_job_id(), t.spool_files()
    outbox, sc_count, oru_count = t.outbox_total(), len(t.pacs.received), len(t.hl7_files())

    status, comment = send(case, t.port, tmp_path)

    assert status == case.status, comment
    if status != StoreStatus.SUCCESS:
        if status is not None:
            assert re.search(case.reason, comment), comment
        assert c_echo(t.port) == 0x0000
        assert t.last_job_id() == last_job, "a refused or broken transfer left a job"
        assert t.spool_files() == spooled, "a refused or broken transfer left a file in the spool"
        return

    job_id = last_job + 1
    assert t.last_job_id() == job_id
    queue = t.node.queue
    assert wait_until(lambda: queue.get(job_id).state in (DONE, FAILED, INELIGIBLE))
    job = queue.get(job_id)
    assert job is not None and job.state == case.job, f"{job and job.state}: {job and job.rule} {job and job.reason}"
    files = t.spool_files()  # complete, content-addressed instances only: no temporary leftovers
    assert len(files) == len(spooled) + 1 and all(p.suffix == ".dcm" and len(p.stem) == 64 for p in files), files
    if case.job == DONE:
        # The Secondary Capture, the Parametric Map and the Structured Report (the default [outputs]).
        assert wait_until(lambda: len(t.pacs.received) == sc_count + 3 and len(t.hl7_files()) == oru_count + 1)
        objects = [pydicom.dcmread(r.path) for r in t.pacs.received[-3:]]
        oru = t.hl7_files()[-1].read_bytes().decode("utf-8")
        if case.patient_name is not None:
            assert [ds.PatientName for ds in objects] == [case.patient_name] * 3
            family, given = case.patient_name.split("=")[0].split("^")
            assert f"|{family}^{given}|" in oru
    else:
        text = job.rule if case.job == INELIGIBLE else job.reason
        assert text and re.search(case.reason, text), text
        assert t.outbox_total() == outbox, "a failed or ineligible job produced output"
        assert len(t.pacs.received) == sc_count and len(t.hl7_files()) == oru_count
    assert c_echo(t.port) == 0x0000


# --- hostile load: the queue bound -----------------------------------------------------------------------------


def _store(port: int, ds: Dataset) -> Dataset:
    ae = AE(ae_title="FLOOD")
    ae.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
    assert assoc.is_established
    try:
        return assoc.send_c_store(ds)
    finally:
        assoc.release()


def test_queue_bound_answers_out_of_resources_and_spools_nothing(tmp_path: Path) -> None:
    """node.max_queued_jobs: with that many jobs pending, C-STORE answers 0xA700 and stores nothing; once the
    worker has taken one, the next instance is accepted again."""
    settings = NodeSettings(ae_title=NODE_AE, host="127.0.0.1", port=0, free_disk_floor_mb=0, spool_dir=tmp_path,
                            max_queued_jobs=2)
    spool, queue = Spool(tmp_path), JobQueue(jobs_path(tmp_path))
    scp = StorageSCP(settings, spool, queue)  # no worker: jobs stay pending
    scp.start()
    try:
        assert [int(_store(scp.port, _cr(seed=i)).Status) for i in range(2)] == [0x0000, 0x0000]
        refused = _store(scp.port, _cr(seed=2))
        assert refused.Status == StoreStatus.REFUSED_OUT_OF_RESOURCES == 0xA700
        assert refused.ErrorComment == QUEUE_FULL_COMMENT
        assert queue.pending_count() == 2
        assert len([p for p in spool.instances.rglob("*") if p.is_file()]) == 2
        queue.claim_batch(1)  # the worker takes one job: room for one more
        assert int(_store(scp.port, _cr(seed=2)).Status) == 0x0000
        assert int(_store(scp.port, _cr(seed=3)).Status) == 0xA700
    finally:
        scp.stop()
        queue.close()
