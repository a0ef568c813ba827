"""Receiving: a Storage SCP that spools each instance durably, queues a job and answers within milliseconds.

The C-STORE handler runs inside the association's thread (pynetdicom), and PACS senders wait only a few seconds
for the answer (Orthanc: ``DicomScuTimeout`` 10 s), so the handler never renders or infers: it checks the
header parses and its UIDs are UIDs, checks the queue bound and free disk, writes the received bytes as they
came (no transcoding), records a job and answers. Statuses are those of the Storage Service Class, PS3.4 Annex
B.2.3, and PS3.7 Annex C.

The data set is read where pynetdicom assembled it: the header (everything before the Pixel Data) is parsed, and
the spool file is written from the encoded file meta and that same buffer, so the pixels of a radiograph are
never copied in this process.
"""

from __future__ import annotations

import enum
import logging
import re
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from io import BytesIO
from typing import Any, cast

from pydicom import Dataset
from pydicom.uid import UID
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.events import Event
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
    Verification,
)

from dicom_node.imaging.instance import read_data_set
from dicom_node.imaging.pixels import SUPPORTED_TRANSFER_SYNTAXES
from dicom_node.ops.metrics import Metrics
from dicom_node.receive.acceptor import (
    AcceptPolicy,
    GuardedAssociationServer,
    start_server,
    warn_if_open,
)
from dicom_node.settings import NodeSettings
from dicom_node.storage.backend import JobStore
from dicom_node.storage.spool import Spool, uid_hash

LOG = logging.getLogger(__name__)

#: Storage SOP classes we accept (PS3.4 B.5). Anything else is refused at association negotiation.
STORAGE_SOP_CLASSES: tuple[UID, ...] = (
    ComputedRadiographyImageStorage,  # 1.2.840.10008.5.1.4.1.1.1
    DigitalXRayImageStorageForPresentation,  # 1.2.840.10008.5.1.4.1.1.1.1
    DigitalXRayImageStorageForProcessing,  # 1.2.840.10008.5.1.4.1.1.1.1.1
    SecondaryCaptureImageStorage,  # 1.2.840.10008.5.1.4.1.1.7 (digitised films arrive as SC)
)

#: UIDs of the data set that the node copies into its outputs: each must be a UID (see ``_check_uids``).
_CHECKED_UIDS: tuple[tuple[str, int], ...] = (
    ("SOPInstanceUID", 0x00080018),
    ("StudyInstanceUID", 0x0020000D),
    ("SeriesInstanceUID", 0x0020000E),
)
_UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")

#: Eligibility check on the header: ``(eligible, rule, reason)``.
RulesCheck = Callable[[Dataset], tuple[bool, str | None, str]]


class StoreStatus(enum.IntEnum):
    """Every C-STORE response status this SCP emits (PS3.4 Table B.2-1, PS3.7 Annex C)."""

    SUCCESS = 0x0000
    REFUSED_SOP_CLASS_NOT_SUPPORTED = 0x0122
    REFUSED_OUT_OF_RESOURCES = 0xA700
    ERROR_DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    ERROR_CANNOT_UNDERSTAND = 0xC210


#: Error Comment (0000,0902) sent with each failure status; LO, at most 64 characters.
STORE_STATUS_COMMENT: dict[StoreStatus, str] = {
    StoreStatus.SUCCESS: "",
    StoreStatus.REFUSED_SOP_CLASS_NOT_SUPPORTED: "SOP Class not supported by CXR Lens",
    StoreStatus.REFUSED_OUT_OF_RESOURCES: "Out of resources: spool storage unavailable, retry later",
    StoreStatus.ERROR_DATASET_DOES_NOT_MATCH_SOP_CLASS: "SOP Class UID in data set differs from request",
    StoreStatus.ERROR_CANNOT_UNDERSTAND: "Cannot understand: data set could not be parsed",
}
QUEUE_FULL_COMMENT = "Out of resources: job queue full, retry later"


@dataclass(frozen=True)
class _StoreDeps:
    spool: Spool
    queue: JobStore
    rules_check: RulesCheck | None
    free_disk_floor_bytes: int
    metrics: Metrics | None
    # Pending jobs above which C-STORE answers 0xA700 before spooling. Checked, then spooled, without a lock:
    # concurrent associations can overshoot it by at most one instance each.
    max_queued_jobs: int | None = None


def _answer(status: StoreStatus, deps: _StoreDeps, started: float, comment: str | None = None) -> Dataset:
    """The C-STORE response; ``comment`` replaces the status's default Error Comment (LO: at most 64 chars)."""
    rsp = Dataset()
    rsp.Status = int(status)
    if comment := (comment or STORE_STATUS_COMMENT[status]):
        rsp.ErrorComment = comment[:64]
    if deps.metrics is not None:
        deps.metrics.cstore_status.labels(status=f"0x{int(status):04X}").inc()
        deps.metrics.cstore_seconds.observe(time.perf_counter() - started)
    return rsp


def _is_uid(value: str) -> bool:
    # PS3.5 9.1: digit components separated by dots, at most 64 characters. Leading zeros in a component are
    # tolerated (some modalities write them, and such a value is copied as it came); nothing else is: the value
    # goes into the Secondary Capture, the ORU and the spool's file meta.
    return 0 < len(value) <= 64 and _UID_RE.fullmatch(value) is not None


def _invalid_uid(event: Event, ds: Dataset) -> str | None:
    """The Error Comment naming the first of the request's and the data set's instance, study and series UIDs
    that is missing or not a UID, else None. Reads the raw bytes, before pydicom converts them (and, for an
    invalid value, warns and logs it)."""
    if not _is_uid(str(cast(C_STORE, event.request).AffectedSOPInstanceUID or "")):
        return "Missing or invalid UID: AffectedSOPInstanceUID"
    for keyword, tag in _CHECKED_UIDS:
        elem = ds.get_item(tag)
        value = None if elem is None else elem.value
        text = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value or "")
        if not _is_uid(text.rstrip("\0 ")):
            return f"Missing or invalid UID: {keyword}"
    return None


def _parse_header(event: Event, data_set: memoryview) -> tuple[Dataset, str | None]:
    """Decode the received data set's header (everything before the Pixel Data) fully (pydicom defers parsing);
    raises on anything malformed.

    Also returns :func:`_invalid_uid`'s verdict: a UID that could reach a file name or an output as a path
    (``../``), or make the Secondary Capture invalid, is refused with 0xC210 and a comment naming it.
    """
    syntax = event.context.transfer_syntax
    ds = read_data_set(data_set, implicit_vr=syntax.is_implicit_VR, little_endian=syntax.is_little_endian,
                       deflated=syntax.is_deflated).header
    invalid_uid = _invalid_uid(event, ds)
    for _ in ds.iterall():
        pass
    if "SOPClassUID" not in ds:
        raise ValueError("SOP Class UID missing")
    return ds, invalid_uid


def handle_store(event: Event, deps: _StoreDeps) -> Dataset:
    """``evt.EVT_C_STORE``: spool + job, then answer (PS3.4 B.2.2). Never raises: failures map to a status."""
    started = time.perf_counter()
    if deps.metrics is not None:
        deps.metrics.received.inc()
    calling_ae = str(event.assoc.requestor.ae_title).strip()
    sop_class = str(event.request.AffectedSOPClassUID)
    if sop_class not in STORAGE_SOP_CLASSES:
        LOG.warning("C-STORE from %s: SOP Class %s not supported", calling_ae, sop_class)
        return _answer(StoreStatus.REFUSED_SOP_CLASS_NOT_SUPPORTED, deps, started)

    data_set = cast(BytesIO, cast(C_STORE, event.request).DataSet).getbuffer()  # as received, not copied
    try:
        ds, invalid_uid = _parse_header(event, data_set)
    except Exception as exc:  # noqa: BLE001 (any decoder failure is "cannot understand", answered, not raised)
        LOG.warning("C-STORE from %s: data set not parseable (%s)", calling_ae, type(exc).__name__)
        return _answer(StoreStatus.ERROR_CANNOT_UNDERSTAND, deps, started)
    if str(ds.SOPClassUID) != sop_class:
        LOG.warning("C-STORE from %s: SOP Class UID in data set differs from the request", calling_ae)
        return _answer(StoreStatus.ERROR_DATASET_DOES_NOT_MATCH_SOP_CLASS, deps, started)
    if invalid_uid is not None:
        LOG.warning("C-STORE from %s: refused, %s", calling_ae, invalid_uid)
        return _answer(StoreStatus.ERROR_CANNOT_UNDERSTAND, deps, started, invalid_uid)
    instance = uid_hash(str(ds.SOPInstanceUID))

    # A Part 10 file (preamble, prefix, file meta) around the data set as received: no decode/re-encode, no copy.
    data = (b"\x00" * 128 + b"DICM" + encode_file_meta(event.file_meta), data_set)
    try:
        if deps.max_queued_jobs is not None and (pending := deps.queue.pending_count()) >= deps.max_queued_jobs:
            LOG.warning("C-STORE from %s: refused, %d jobs pending (node.max_queued_jobs)", calling_ae, pending)
            return _answer(StoreStatus.REFUSED_OUT_OF_RESOURCES, deps, started, QUEUE_FULL_COMMENT)
        free = shutil.disk_usage(deps.spool.dir).free
        if free - sum(len(part) for part in data) < deps.free_disk_floor_bytes:
            LOG.error(
                "C-STORE from %s: refused, free disk %d MiB below floor %d MiB",
                calling_ae, free >> 20, deps.free_disk_floor_bytes >> 20,
            )
            return _answer(StoreStatus.REFUSED_OUT_OF_RESOURCES, deps, started)
        key = deps.spool.write(data)
        job_id, is_new = deps.queue.add(key, calling_ae=calling_ae, uid_hash=instance)
    except (OSError, sqlite3.Error) as exc:
        LOG.error("C-STORE from %s: spool or queue write failed (%s)", calling_ae, type(exc).__name__)
        return _answer(StoreStatus.REFUSED_OUT_OF_RESOURCES, deps, started)

    if not is_new:
        if deps.metrics is not None:
            deps.metrics.duplicates.inc()
        LOG.info("C-STORE from %s: instance %s already received (job %d, spool %s)", calling_ae, instance, job_id,
                 key[:12])
        return _answer(StoreStatus.SUCCESS, deps, started)

    if deps.metrics is not None:
        deps.metrics.stored.inc()
    if deps.rules_check is not None:
        _check_eligibility(ds, job_id, deps)
    LOG.info("C-STORE from %s: instance %s stored as job %d (spool %s)", calling_ae, instance, job_id, key[:12])
    return _answer(StoreStatus.SUCCESS, deps, started)


def _check_eligibility(ds: Dataset, job_id: int, deps: _StoreDeps) -> None:
    assert deps.rules_check is not None
    try:
        eligible, rule, reason = deps.rules_check(ds)
    except Exception as exc:  # noqa: BLE001 (the instance is already stored; record why the job cannot proceed)
        LOG.error("job %d: eligibility check raised %s", job_id, type(exc).__name__)
        deps.queue.fail(job_id, f"eligibility check raised {type(exc).__name__}")
        return
    if not eligible:
        deps.queue.mark_ineligible(job_id, rule, reason)
        if deps.metrics is not None:
            deps.metrics.ineligible.labels(rule=rule or "").inc()
        LOG.info("job %d: not eligible (rule %s)", job_id, rule)


def handle_echo(event: Event) -> int:
    """``evt.EVT_C_ECHO``: Verification (PS3.4 Annex A) always succeeds."""
    return 0x0000


class StorageSCP:
    """Storage SCP on ``settings.host:settings.port`` (``port=0``: a free one, see :attr:`port`)."""

    def __init__(
        self,
        settings: NodeSettings,
        spool: Spool,
        queue: JobStore,
        *,
        rules_check: RulesCheck | None = None,
        metrics: Metrics | None = None,
        transfer_syntaxes: Iterable[str] = SUPPORTED_TRANSFER_SYNTAXES,
        require_called_aet: bool = True,
    ) -> None:
        self.settings = settings
        self._deps = _StoreDeps(spool, queue, rules_check, settings.free_disk_floor_mb * 1024 * 1024, metrics,
                                settings.max_queued_jobs)
        ae = AE(ae_title=settings.ae_title)
        ae.maximum_associations = settings.max_associations
        ae.maximum_pdu_size = settings.max_pdu
        # Peers must call us by our AE title, and call from an allowed one (string matches only: pair them with
        # node.allowed_networks). A refused calling AE title gets A-ASSOCIATE-RJ (1, 1, 3); see acceptor.py.
        ae.require_called_aet = require_called_aet
        ae.require_calling_aet = list(settings.allowed_calling_aets)
        ae.add_supported_context(Verification)
        syntaxes = [UID(ts) for ts in transfer_syntaxes]
        for sop_class in STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class, syntaxes)
        self._ae = ae
        self._policy = AcceptPolicy(
            name=f"Storage SCP {settings.ae_title}",
            allowed_networks=settings.allowed_networks,
            tls_context=settings.tls.context() if settings.tls.enabled else None,
            handshake_timeout_s=settings.tls.handshake_timeout_s,
            max_associate_rq_bytes=settings.max_associate_rq_bytes,
            metrics=metrics,
        )
        self._server: GuardedAssociationServer | None = None
        self._lock = threading.Lock()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the SCP is not running")
        return int(self._server.server_address[1])

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def active_associations(self) -> int:
        """Associations open now, including ones still negotiating (each holds a ``max_associations`` slot)."""
        server = self._server
        return 0 if server is None else len(server.active_associations)

    def start(self) -> None:
        with self._lock:
            if self._server is not None:
                return
            handlers: list[Any] = [
                (evt.EVT_C_STORE, handle_store, [self._deps]),
                (evt.EVT_C_ECHO, handle_echo),
            ]
            self._server = start_server(self._ae, (self.settings.host, self.settings.port), self._policy, handlers)
        warn_if_open(self._policy.name, self.settings.allowed_calling_aets, self.settings.allowed_networks)
        LOG.info("Storage SCP %s listening on %s:%d%s", self.settings.ae_title, self.settings.host, self.port,
                 " (TLS)" if self._policy.tls_context is not None else "")

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop accepting associations, let open ones finish for up to ``grace_s``, then abort the rest."""
        with self._lock:
            server, self._server = self._server, None
        if server is None:
            return
        active = list(server.active_associations)
        server.shutdown()
        deadline = time.monotonic() + grace_s
        for assoc in active:
            assoc.join(max(0.0, deadline - time.monotonic()))
            if assoc.is_alive():
                assoc.abort()
        LOG.info("Storage SCP %s stopped", self.settings.ae_title)
