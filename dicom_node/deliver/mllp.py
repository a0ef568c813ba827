"""MLLP transport (HL7 v2.5.1 Appendix C, "MLLP release 1"): framing, one send with its ACK, and ACK building.

Every outcome of a send maps to a :class:`~dicom_node.deliver.sender.Disposition` (the policy every channel
shares) through the one table :data:`DISPOSITIONS`: the original- and enhanced-mode ACK codes (MSA-1) and the
transport failures that leave no ACK at all.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from dicom_node.deliver.sender import Disposition
from dicom_node.errors import DeliveryError
from dicom_node.outputs.oru import (
    ENCODING_CHARACTERS,
    HL7_VERSION,
    datetime_to_ts,
    escape,
    new_message_control_id,
)

logger = logging.getLogger(__name__)

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\x0d"
ENCODING = "utf-8"  # ASCII messages are unchanged; MSH-18 says UNICODE UTF-8 when anything else is in them
MAX_ACK_BYTES = 1 << 20


# Outcomes without an MSA-1: named here so that they live in the same table as the ACK codes.
TIMEOUT = "TIMEOUT"
CONNECTION_FAILED = "CONNECTION_FAILED"
MALFORMED_ACK = "MALFORMED_ACK"

DISPOSITIONS: Mapping[str, Disposition] = {
    "AA": Disposition.DONE,  # application accept
    "CA": Disposition.DONE,  # commit accept (enhanced mode)
    "AR": Disposition.RETRY,  # application reject: receiver problem (down, busy), not the message
    "CR": Disposition.RETRY,  # commit reject
    "AE": Disposition.PARK,  # application error: the message itself was not acceptable
    "CE": Disposition.PARK,  # commit error
    TIMEOUT: Disposition.RETRY,
    CONNECTION_FAILED: Disposition.RETRY,
    MALFORMED_ACK: Disposition.RETRY,
}


class MLLPError(DeliveryError):
    """A send that produced no usable ACK; ``outcome`` is a key of :data:`DISPOSITIONS`."""

    def __init__(self, outcome: str, detail: str) -> None:
        super().__init__(f"{outcome}: {detail}")
        self.outcome = outcome

    @property
    def disposition(self) -> Disposition:
        return DISPOSITIONS[self.outcome]


class FramingError(MLLPError):
    """Bytes that are not one MLLP block."""

    def __init__(self, detail: str) -> None:
        super().__init__(MALFORMED_ACK, detail)


@dataclass(frozen=True)
class Ack:
    """The part of an ACK the sender acts on."""

    code: str  # MSA-1
    text: str  # MSA-3, else the ERR segment's message text
    control_id: str  # MSA-2: the MSH-10 being acknowledged

    @property
    def disposition(self) -> Disposition:
        return DISPOSITIONS[self.code]


def frame(message: str | bytes) -> bytes:
    """Wrap one message in an MLLP block (``<VT> message <FS><CR>``)."""
    data = message.encode(ENCODING) if isinstance(message, str) else message
    return START_BLOCK + data + END_BLOCK


def unframe(block: bytes) -> bytes:
    """The message inside one MLLP block; raises :class:`FramingError` if ``block`` is not exactly one."""
    if not block.startswith(START_BLOCK) or not block.endswith(END_BLOCK):
        raise FramingError("not an MLLP block")
    data = block[len(START_BLOCK) : -len(END_BLOCK)]
    if START_BLOCK in data or END_BLOCK in data:
        raise FramingError("more than one MLLP block")
    return data


def unescape(value: str) -> str:
    """Undo the delimiter escape sequences (v2.5.1 section 2.7.4); other sequences are left as they are."""
    table = {"F": "|", "S": "^", "T": "&", "R": "~", "E": "\\"}
    out: list[str] = []
    i = 0
    while i < len(value):
        if value[i] == "\\" and i + 2 < len(value) and value[i + 2] == "\\" and value[i + 1] in table:
            out.append(table[value[i + 1]])
            i += 3
        else:
            out.append(value[i])
            i += 1
    return "".join(out)


def _segments(message: str) -> dict[str, list[list[str]]]:
    """Segments by id, each split into fields (index = field number; MSH-1 is the separator itself)."""
    lines = [line for line in message.replace("\n", "\r").split("\r") if line]
    if not lines or not lines[0].startswith("MSH") or len(lines[0]) < 8:
        raise ValueError("no MSH segment")
    sep = lines[0][3]
    out: dict[str, list[list[str]]] = {}
    for line in lines:
        fields = line.split(sep)
        if fields[0] == "MSH":
            fields.insert(1, sep)
        out.setdefault(fields[0], []).append(fields)
    return out


def _field(fields: list[str], n: int) -> str:
    return fields[n] if n < len(fields) else ""


def _component(value: str, n: int) -> str:
    parts = value.split("~")[0].split("^")
    return parts[n - 1] if n <= len(parts) else ""


def message_control_id(message: str) -> str:
    """MSH-10 of a message ("" when it has no readable MSH)."""
    try:
        return unescape(_component(_field(_segments(message)["MSH"][0], 10), 1))
    except ValueError:
        return ""


def parse_ack(data: bytes) -> Ack:
    """Read MSA-1/2/3 (and the ERR text) from an ACK; raises :class:`FramingError` for anything else."""
    try:
        segments = _segments(data.decode(ENCODING, errors="replace"))
    except ValueError as exc:
        raise FramingError(str(exc)) from None
    if "MSA" not in segments:
        raise FramingError("no MSA segment")
    msa = segments["MSA"][0]
    code = _field(msa, 1).strip().upper()
    if code not in ("AA", "AE", "AR", "CA", "CE", "CR"):
        raise FramingError(f"MSA-1 {code[:8]!r} is not an acknowledgment code")
    text = _field(msa, 3)
    for err in segments.get("ERR", []):
        if text:
            break
        # v2.5: ERR-8 user message, else ERR-3.2 error code text; v2.3: ERR-1.4.2, the code text in the ELD
        eld_code = _component(_field(err, 1), 4).split("&")
        text = _field(err, 8) or _component(_field(err, 3), 2) or (eld_code[1] if len(eld_code) > 1 else "")
    return Ack(code=code, text=unescape(text), control_id=unescape(_component(_field(msa, 2), 1)))


def _read_block(sock: socket.socket, deadline: float) -> bytes:
    buffer = bytearray()
    while True:
        end = buffer.find(END_BLOCK)
        if end >= 0:
            start = buffer.find(START_BLOCK)
            if start < 0 or start > end:
                raise FramingError("ACK without a start block")
            return bytes(buffer[start : end + len(END_BLOCK)])
        if len(buffer) > MAX_ACK_BYTES:
            raise FramingError("ACK longer than 1 MiB")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no ACK")
        sock.settimeout(remaining)
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("receiver closed the connection before the ACK")
        buffer += chunk


def send_message(
    host: str, port: int, message: str, *, timeout_s: float, ssl_context: ssl.SSLContext | None = None
) -> Ack:
    """Send one message on a fresh connection and wait for its ACK; ``timeout_s`` bounds the whole exchange.

    With ``ssl_context`` (see :func:`dicom_node.tls.client_context`) the message goes over TLS; the receiver's
    certificate is checked against ``host``. A TLS failure is ``CONNECTION_FAILED``.

    Returns the :class:`Ack` (whatever its code). Raises :class:`MLLPError` (outcome ``TIMEOUT``,
    ``CONNECTION_FAILED`` or ``MALFORMED_ACK``) when there is no usable ACK, including one that acknowledges a
    different MSH-10.
    """
    control_id = message_control_id(message)
    deadline = time.monotonic() + timeout_s
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as raw:
            sock: socket.socket = (
                ssl_context.wrap_socket(raw, server_hostname=host) if ssl_context is not None else raw
            )
            with sock:
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                sock.sendall(frame(message))
                ack = parse_ack(unframe(_read_block(sock, deadline)))
    except TimeoutError as exc:
        raise MLLPError(TIMEOUT, f"no ACK within {timeout_s:g} s") from exc
    except (ssl.SSLError, OSError) as exc:  # refused, reset, unreachable, TLS failure
        raise MLLPError(CONNECTION_FAILED, f"{type(exc).__name__}: {exc}") from exc
    if ack.control_id != control_id:
        raise MLLPError(MALFORMED_ACK, f"ACK for {ack.control_id[:20]!r}, sent {control_id}")
    logger.debug("HL7 %s -> %s:%d acknowledged %s", control_id, host, port, ack.code)
    return ack


def build_ack(message: str, code: str, text: str = "", *, now: datetime | None = None) -> str:
    """An original-mode ACK for ``message`` (MSA-2 = its MSH-10), sender and receiver swapped.

    An unreadable message (no MSH) is answered ``AR`` with an empty MSA-2. A code other than AA/CA carries an
    ERR segment with ``text`` (ERR-3 207 "Application internal error", ERR-4 E, ERR-8 the text).
    """
    if code not in ("AA", "AE", "AR", "CA", "CE", "CR"):
        raise ValueError(f"{code!r} is not an acknowledgment code")
    try:
        msh = _segments(message)["MSH"][0]
    except ValueError:
        msh, code, text = ["MSH", "|", ENCODING_CHARACTERS], "AR", text or "no MSH segment"
    stamp = datetime_to_ts(now or datetime.now().astimezone())
    trigger = _component(_field(msh, 9), 2)
    lines = [
        "|".join(
            [
                "MSH",
                ENCODING_CHARACTERS,
                _field(msh, 5),
                _field(msh, 6),
                _field(msh, 3),
                _field(msh, 4),
                stamp,
                "",
                f"ACK^{trigger}^ACK" if trigger else "ACK",
                new_message_control_id(),
                _field(msh, 11) or "P",
                _field(msh, 12) or HL7_VERSION,
            ]
        ),
        "|".join(["MSA", code, _field(msh, 10), escape(text)]).rstrip("|"),
    ]
    if code not in ("AA", "CA"):
        lines.append(f"ERR|||207^Application internal error^HL70357|E||||{escape(text)}".rstrip("|"))
    return "\r".join(lines) + "\r"
