"""A sending modality: C-STOREs over one association or several at once, and one that re-sends until Success.

Every C-STORE is reported as a :class:`StoreReply` (status, round trip), a refused association or a dropped
connection included, so that nothing goes missing silently.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pydicom import Dataset
from pynetdicom import AE

NODE_AE = "CXRLENS"
#: Orthanc's default DicomScuTimeout: how long a PACS waits for a C-STORE response before it gives up.
SCU_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class StoreReply:
    """One C-STORE as the sender saw it: the status (None: no response) and the round trip in seconds."""

    sop_instance_uid: str
    status: int | None
    seconds: float
    sender: int = 0
    note: str = ""


def send_images(port: int, datasets: Sequence[Dataset], *, sender: int = 0, pause_s: float = 0.0,
                on_reply: Callable[[StoreReply], None] | None = None) -> list[StoreReply]:
    """Send ``datasets`` over one association, in order; stops at the first C-STORE without a response.

    A refused or unreachable association yields one reply per dataset with status None and a note, so nothing
    goes missing silently.
    """
    if not datasets:
        return []

    def unsent(note: str) -> list[StoreReply]:
        return [StoreReply(str(ds.SOPInstanceUID), None, 0.0, sender, note) for ds in datasets]

    ae = AE(ae_title=f"MODALITY{sender}")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = SCU_TIMEOUT_S * 3
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(sop_class, sorted({str(ds.file_meta.TransferSyntaxUID) for ds in datasets}))
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError as exc:
        return unsent(f"cannot connect: {type(exc).__name__}")
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE, max_pdu=1_048_576)
    # pynetdicom 3.0 leaves the socket open when the peer drops the connection (the node is SIGKILLed): keep
    # a handle to close it ourselves once the association has ended.
    raw_socket = getattr(assoc.dul.socket, "socket", None)
    if not assoc.is_established:
        _close_after(assoc, raw_socket)
        return unsent("association " + ("rejected" if assoc.is_rejected else "aborted or timed out"))
    replies: list[StoreReply] = []
    try:
        for ds in datasets:
            t = time.perf_counter()
            try:
                rsp = assoc.send_c_store(ds)
            except (RuntimeError, ValueError):  # the association dropped under us
                rsp = Dataset()
            status = int(rsp.Status) if "Status" in rsp else None
            reply = StoreReply(str(ds.SOPInstanceUID), status, time.perf_counter() - t, sender,
                               "" if status is not None else "no response")
            replies.append(reply)
            if on_reply is not None:
                on_reply(reply)
            if status is None or not assoc.is_established:
                break
            if pause_s:
                time.sleep(pause_s)
    finally:
        if assoc.is_established:
            assoc.release()
        _close_after(assoc, raw_socket)
    return replies


def _close_after(assoc: Any, raw_socket: socket.socket | None) -> None:
    if assoc.ident is not None:  # a connection that failed never started the association's thread
        assoc.join(SCU_TIMEOUT_S)  # its thread, and with it the DUL's, has ended
    if raw_socket is not None:
        raw_socket.close()


def send_concurrently(port: int, streams: Sequence[Sequence[Dataset]]) -> list[StoreReply]:
    """One association per stream, all at once; returns every reply."""
    results: list[list[StoreReply]] = [[] for _ in streams]

    def run(i: int) -> None:
        results[i] = send_images(port, streams[i], sender=i)

    threads = [threading.Thread(target=run, args=(i,), name=f"modality-{i}") for i in range(len(streams))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [r for rs in results for r in rs]


#: A hook run by a peer at the moment a test wants to act on (e.g. SIGKILL the node); it returns True once it
#: acted, which disarms it.
Hook = Callable[[], bool]


class RetryingModality:
    """A modality (or a PACS forwarding) that re-sends each image until it got a Success for it.

    Runs in a thread; each round opens an association and sends what is still unacknowledged, so the images in
    flight when the node died are sent again once it is back (PS3.4 B.2.2: only a Success hands them over).
    More images can be added while it runs. ``after_ack`` runs after each Success, in the sending thread.
    """

    def __init__(self, port: int, *, pause_s: float = 0.0, retry_s: float = 0.3) -> None:
        self.port = port
        self.pending: dict[str, Dataset] = {}
        self.replies: list[StoreReply] = []
        self.pause_s = pause_s
        self.retry_s = retry_s
        self.after_ack: Hook | None = None
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._more = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="retrying-modality", daemon=True)

    @property
    def acknowledged(self) -> int:
        with self._lock:
            return sum(1 for r in self.replies if r.status == 0x0000)

    @property
    def done(self) -> bool:
        with self._lock:
            return not self.pending

    @property
    def finished(self) -> bool:
        """Everything added was acknowledged, or the sending thread died (see :attr:`error`)."""
        return self.done or self.error is not None

    def add(self, datasets: Sequence[Dataset]) -> None:
        with self._lock:
            self.pending.update((str(ds.SOPInstanceUID), ds) for ds in datasets)
        self._more.set()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._more.set()
        self._thread.join(60)

    def _record(self, reply: StoreReply) -> None:
        with self._lock:
            self.replies.append(reply)
            if reply.status == 0x0000:
                self.pending.pop(reply.sop_instance_uid, None)
        hook = self.after_ack  # read once: the test may disarm it meanwhile
        if reply.status == 0x0000 and hook is not None and hook():
            self.after_ack = None

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                with self._lock:
                    todo = list(self.pending.values())
                if todo:
                    send_images(self.port, todo, pause_s=self.pause_s, on_reply=self._record)
                    self._stop.wait(self.retry_s)
                else:
                    self._more.wait(self.retry_s)
                    self._more.clear()
        except BaseException as exc:  # recorded so that a scenario ends instead of waiting; re-raised to be seen
            self.error = exc
            raise
