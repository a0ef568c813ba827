"""Sending DICOM: deliver the node's DICOM objects (Secondary Capture, Parametric Map, Structured Report) from the
durable outbox to each destination by C-STORE.

Every object is stored in the outbox (channel ``dicom``, destination ``AE@host:port``) before any attempt, and
stays there until the destination accepts it. What each C-STORE status (PS3.4 Table B.2-1, PS3.7 Annex C) and
each association outcome (PS3.8 9.3.4 A-ASSOCIATE-RJ) means for an item is decided by the two tables below:
done, retry with exponential backoff, or park with the reason (shown by ``cxr-lens status``).

A destination with ``tls.enabled`` is reached over TLS (PS3.15 B.9): the PACS certificate is verified against
``tls.ca_file`` and, for mutual TLS, ours is presented. A TLS failure is a connection failure (retried).
"""

from __future__ import annotations

import enum
import logging
import ssl
from collections.abc import Iterable, Sequence
from io import BytesIO

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    Comprehensive3DSRStorage,
    ParametricMapStorage,
    SecondaryCaptureImageStorage,
)
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

from dicom_node.deliver.sender import Disposition, OutboxSender, Outcome
from dicom_node.ops.metrics import Metrics
from dicom_node.settings import DestinationSettings
from dicom_node.storage.backend import OutboxStore
from dicom_node.storage.outbox import OutboxItem
from dicom_node.storage.spool import uid_hash

logger = logging.getLogger(__name__)

CHANNEL = "dicom"
# What the node writes for one image. Every association proposes them all, so that an image's objects, queued one
# behind the other, share one association instead of opening one each.
RESULT_SOP_CLASSES: tuple[str, ...] = (SecondaryCaptureImageStorage, ParametricMapStorage, Comprehensive3DSRStorage)
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
#: What the log calls each object (by its Media Storage SOP Class UID); another SOP Class is a "DICOM object".
OBJECT_NAMES: dict[str, str] = {
    SecondaryCaptureImageStorage: "SC", ParametricMapStorage: "Parametric Map", Comprehensive3DSRStorage: "SR",
}
ABSTRACT_SYNTAX_NOT_SUPPORTED = 0x03  # A-ASSOCIATE-AC presentation context result (PS3.8 Table 9-18)


#: C-STORE response statuses we name explicitly (PS3.4 Table B.2-1; PS3.7 Annex C).
STORE_STATUS_DISPOSITION: dict[int, Disposition] = {
    0x0000: Disposition.DONE,  # Success
    0xB000: Disposition.DONE,  # Warning: coercion of data elements
    0xB006: Disposition.DONE,  # Warning: elements discarded
    0xB007: Disposition.DONE,  # Warning: data set does not match SOP Class
    0x0122: Disposition.PARK,  # Refused: SOP Class not supported
    0x0124: Disposition.PARK,  # Refused: not authorised
    0x0211: Disposition.PARK,  # Unrecognised operation
    0x0212: Disposition.PARK,  # Mistyped argument
    0x0110: Disposition.RETRY,  # Processing failure (the peer's trouble, often passing)
    0x0213: Disposition.RETRY,  # Resource limitation
}
#: Status ranges, checked after the exact codes above.
STORE_STATUS_RANGES: tuple[tuple[int, int, Disposition], ...] = (
    (0xA700, 0xA7FF, Disposition.RETRY),  # Refused: out of resources
    (0xA900, 0xA9FF, Disposition.PARK),  # Error: data set does not match SOP Class
    (0xC000, 0xCFFF, Disposition.PARK),  # Error: cannot understand
    (0xB000, 0xBFFF, Disposition.DONE),  # other warnings: stored
)


class AssociationOutcome(enum.StrEnum):
    CONNECTION_FAILED = "connection failed"
    REJECTED_TRANSIENT = "association rejected (transient)"
    REJECTED_PERMANENT = "association rejected (permanent)"
    ABORTED = "association aborted"
    NO_RESPONSE = "no response (timeout or abort)"
    NO_PRESENTATION_CONTEXT = "no presentation context accepted for the SOP Class / transfer syntax"
    PAYLOAD_UNREADABLE = "outbox payload is not a readable DICOM file"


ASSOCIATION_DISPOSITION: dict[AssociationOutcome, Disposition] = {
    AssociationOutcome.CONNECTION_FAILED: Disposition.RETRY,
    AssociationOutcome.REJECTED_TRANSIENT: Disposition.RETRY,
    AssociationOutcome.REJECTED_PERMANENT: Disposition.PARK,
    AssociationOutcome.ABORTED: Disposition.RETRY,
    AssociationOutcome.NO_RESPONSE: Disposition.RETRY,
    AssociationOutcome.NO_PRESENTATION_CONTEXT: Disposition.PARK,
    AssociationOutcome.PAYLOAD_UNREADABLE: Disposition.PARK,
}


def store_status_disposition(status: int) -> Disposition:
    """What a C-STORE response status means for the item; unknown statuses park (visible, not looping)."""
    if status in STORE_STATUS_DISPOSITION:
        return STORE_STATUS_DISPOSITION[status]
    for low, high, disposition in STORE_STATUS_RANGES:
        if low <= status <= high:
            return disposition
    return Disposition.PARK


def store_status_text(status: int, comment: str = "") -> str:
    """``0xA900 Failure: Data Set does not match SOP Class (comment)`` for logs and ``status``."""
    category, text = STORAGE_SERVICE_CLASS_STATUS.get(status, ("", ""))
    if not text:
        for low, high, disposition in STORE_STATUS_RANGES:
            if low <= status <= high:
                text = {0xA7: "Out of Resources", 0xA9: "Data Set does not match SOP Class",
                        0xC0: "Cannot understand", 0xB0: "Warning"}.get(low >> 8, disposition.value)
                break
    parts = [f"0x{status:04X}", f"{category}: {text}" if category else text or "unknown status"]
    if comment:
        parts.append(f"({comment[:64]})")
    return " ".join(p for p in parts if p)


def destination_key(dest: DestinationSettings) -> str:
    """The outbox destination string: ``AE@host:port``."""
    return f"{dest.ae_title}@{dest.host}:{dest.port}"


class DicomSender(OutboxSender):
    """Delivers DICOM objects (Part 10 bytes) from the outbox to every configured destination.

    Items of one destination leave in FIFO order (the outbox head blocks the ones behind it until it is done
    or parked). Due items share an association while the destination accepted a presentation context for each
    one's SOP Class and transfer syntax: the head's own, and ``sop_classes`` uncompressed.
    """

    channel = CHANNEL

    def __init__(
        self,
        outbox: OutboxStore,
        destinations: Iterable[DestinationSettings],
        *,
        ae_title: str,
        retry_initial_s: float = 1.0,
        retry_max_s: float = 300.0,
        timeout_s: float = 30.0,
        max_pdu: int = 1_048_576,
        metrics: Metrics | None = None,
        poll_s: float = 0.25,
        sop_classes: Iterable[str] = RESULT_SOP_CLASSES,
    ) -> None:
        super().__init__(outbox, retry_initial_s=retry_initial_s, retry_max_s=retry_max_s, metrics=metrics,
                         poll_s=poll_s)
        self._destinations = {destination_key(d): d for d in destinations}
        self.ae_title = ae_title
        self.timeout_s = timeout_s
        self.max_pdu = max_pdu
        self.sop_classes = tuple(UID(uid) for uid in sop_classes)
        self._names: dict[int, str] = {}  # outbox id -> what describe() calls the object read for sending
        # Built once: the files were checked when the settings loaded.
        self._tls: dict[str, ssl.SSLContext] = {
            key: d.tls.context() for key, d in self._destinations.items() if d.tls.enabled
        }

    def destinations(self) -> Sequence[str]:
        return tuple(self._destinations)

    def describe(self, item: OutboxItem) -> str:
        """``SC 12 (<hash>)``, ``Parametric Map 13 (...)`` or ``SR 14 (...)``: the object (as read for sending; a
        payload that could not be read is a "DICOM object"), its outbox id and the hash of its SOP Instance UID
        (never the UID: no PHI in logs)."""
        return f"{self._names.pop(item.id, 'DICOM object')} {item.id} ({uid_hash(item.dedup_key)})"

    def _read(self, item: OutboxItem) -> tuple[Dataset, tuple[UID, UID]]:
        """The object in ``item`` and its presentation context (SOP Class, transfer syntax); remembers its name for
        :meth:`describe`."""
        ds = dcmread(BytesIO(item.payload))
        sop_class = UID(ds.SOPClassUID)
        self._names[item.id] = OBJECT_NAMES.get(sop_class, "DICOM object")
        return ds, (sop_class, UID(ds.file_meta.TransferSyntaxUID))

    def enqueue(self, sc_dataset_bytes: bytes, dedup_key: str, *, source_received_at: float | None = None) -> list[int]:
        """Store one DICOM object for every destination; returns the outbox ids.

        When the same ``dedup_key`` was already delivered (a study sent to us again), the new object replaces it
        and is delivered again, unless that delivered twin was enqueued after ``source_received_at`` (when the
        source instance arrived): it then came from the same instance, by an interrupted attempt whose job is
        being processed again, and is not sent twice.
        """
        ids = [self._store(key, dedup_key, sc_dataset_bytes, resend=True, source_received_at=source_received_at)
               for key in self._destinations]
        if not ids:
            logger.warning("no DICOM destinations configured: DICOM object not queued")
        return ids

    def attempt(self, destination: str, item: OutboxItem, now: float | None) -> int:
        """C-STORE ``item`` and the due items behind it that the association can carry, over one association."""
        try:
            ds, context = self._read(item)
        except (InvalidDicomError, AttributeError, ValueError, EOFError, OSError):
            self.settle(destination, item, _association_outcome(AssociationOutcome.PAYLOAD_UNREADABLE), now)
            return 0
        assoc = self._associate(self._destinations[destination], *context)
        if not assoc.is_established:
            outcome, detail = _association_failure(assoc)
            self.settle(destination, item, _association_outcome(outcome, detail), now)
            return 1
        try:
            if not _carries(assoc, context):
                # The peer took the association for the other SOP Classes proposed alongside, not for this one.
                self.settle(destination, item, _association_outcome(AssociationOutcome.NO_PRESENTATION_CONTEXT), now)
                following = self._next_on(assoc, destination, now)
                if following is None:
                    return 1
                item, ds = following
            return self._send_run(assoc, destination, item, ds, now)
        finally:
            if assoc.is_established:
                assoc.release()

    def _send_run(
        self, assoc: Association, destination: str, item: OutboxItem, ds: Dataset, now: float | None
    ) -> int:
        """Send due items; stops at a retry, a dropped association or an item no accepted context can carry."""
        sent = 0
        current: OutboxItem | None = item
        while current is not None:
            sent += 1
            try:
                status = assoc.send_c_store(ds)
            except (RuntimeError, ValueError):  # the association dropped under us
                self.settle(destination, current, _association_outcome(AssociationOutcome.ABORTED), now)
                return sent
            if "Status" not in status:
                self.settle(destination, current, _association_outcome(AssociationOutcome.NO_RESPONSE), now)
                return sent
            code = int(status.Status)
            outcome = Outcome(
                store_status_disposition(code),
                store_status_text(code),
                # The ErrorComment is the peer's own text: outbox only.
                store_status_text(code, str(status.get("ErrorComment", ""))),
            )
            self.settle(destination, current, outcome, now)
            if outcome.disposition is Disposition.RETRY or not assoc.is_established:
                return sent
            following = self._next_on(assoc, destination, now)
            if following is None:
                return sent
            current, ds = following
        return sent

    def _next_on(
        self, assoc: Association, destination: str, now: float | None
    ) -> tuple[OutboxItem, Dataset] | None:
        """The next due item if ``assoc`` can carry it. An item of a SOP Class the peer refused outright in this
        association is parked on the way (asking again would get the same answer); None leaves the next item, if
        any, to ``run_once``: a new association for it, or the park of an unreadable payload."""
        while (current := self.due(destination, now)) is not None:
            try:
                ds, context = self._read(current)
            except (InvalidDicomError, AttributeError, ValueError, EOFError, OSError):
                return None
            if _carries(assoc, context):
                return current, ds
            if not _refused(assoc, context[0]):
                return None
            self.settle(destination, current, _association_outcome(AssociationOutcome.NO_PRESENTATION_CONTEXT), now)
        return None

    def _associate(self, dest: DestinationSettings, sop_class: UID, transfer_syntax: UID) -> Association:
        ae = AE(ae_title=self.ae_title)
        ae.acse_timeout = self.timeout_s
        ae.dimse_timeout = self.timeout_s
        ae.network_timeout = self.timeout_s
        ae.connection_timeout = self.timeout_s  # bounds the TCP connect and, with TLS, the handshake
        # The object's own transfer syntax first, then every SOP Class in each uncompressed syntax, one
        # presentation context per syntax: an acceptor picks one syntax per context, and pynetdicom's (like
        # other SCPs) prefers Implicit VR when offered both in one, so the objects (stored Explicit VR Little
        # Endian) were re-encoded element by element for every C-STORE: ~6 core-ms per object, measured. With a
        # context of its own the stored syntax is accepted wherever the peer supports it and sent as it is;
        # the others remain fallbacks (pynetdicom re-encodes). At most 1 + 2 x 3 contexts of PS3.8's 128.
        ae.add_requested_context(sop_class, [transfer_syntax])
        for each in (sop_class, *(other for other in self.sop_classes if other != sop_class)):
            for syntax in UNCOMPRESSED:
                if (each, syntax) != (sop_class, transfer_syntax):
                    ae.add_requested_context(each, [syntax])
        tls = self._tls.get(destination_key(dest))
        return ae.associate(
            dest.host, dest.port, ae_title=dest.ae_title, max_pdu=self.max_pdu,
            tls_args=(tls, dest.host) if tls is not None else None,
        )


def _carries(assoc: Association, context: tuple[UID, UID]) -> bool:
    """Whether ``assoc`` accepted a presentation context for this SOP Class that pynetdicom will send this transfer
    syntax in: the syntax itself or, for an uncompressed object, another uncompressed one of its endianness."""
    sop_class, transfer_syntax = context
    for cx in assoc.accepted_contexts:
        if cx.abstract_syntax != sop_class:
            continue
        accepted = UID(cx.transfer_syntax[0])
        if accepted == transfer_syntax:
            return True
        uncompressed = not (accepted.is_compressed or transfer_syntax.is_compressed)
        if uncompressed and accepted.is_little_endian == transfer_syntax.is_little_endian:
            return True
    return False


def _refused(assoc: Association, sop_class: UID) -> bool:
    """Whether the peer answered "abstract syntax not supported" (PS3.8 Table 9-18, result 3) for ``sop_class``
    and accepted no context for it."""
    if any(cx.abstract_syntax == sop_class for cx in assoc.accepted_contexts):
        return False
    return any(cx.abstract_syntax == sop_class and cx.result == ABSTRACT_SYNTAX_NOT_SUPPORTED
               for cx in assoc.rejected_contexts)


def _association_outcome(outcome: AssociationOutcome, detail: str = "") -> Outcome:
    # The detail adds only PS3.8's named reject source and reason, no text of the peer's own: it may be logged.
    text = detail or outcome.value
    return Outcome(ASSOCIATION_DISPOSITION[outcome], text, text)


def _association_failure(assoc: Association) -> tuple[AssociationOutcome, str]:
    """Classify an association that did not establish (PS3.8 9.3.4 result: 1 permanent, 2 transient)."""
    if assoc.is_rejected:
        rsp = assoc.acceptor.primitive
        result = getattr(rsp, "result", None)
        outcome = AssociationOutcome.REJECTED_PERMANENT if result == 0x01 else AssociationOutcome.REJECTED_TRANSIENT
        reason = getattr(rsp, "reason_str", "") or ""
        source = getattr(rsp, "source_str", "") or ""
        return outcome, f"{outcome.value}: {source} {reason}".strip()
    if assoc.acceptor.primitive is None:
        # No A-ASSOCIATE response at all: refused, unreachable, or closed before answering (pynetdicom flags
        # these as aborted too).
        return AssociationOutcome.CONNECTION_FAILED, AssociationOutcome.CONNECTION_FAILED.value
    if assoc.rejected_contexts and not assoc.accepted_contexts:
        return AssociationOutcome.NO_PRESENTATION_CONTEXT, AssociationOutcome.NO_PRESENTATION_CONTEXT.value
    return AssociationOutcome.ABORTED, AssociationOutcome.ABORTED.value
