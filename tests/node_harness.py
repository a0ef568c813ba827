"""A CXR Lens node as a black box under load, over time and under SIGKILL (tests/ and bench/ share this module).

The node runs as ``python -m dicom_node.cli serve --config FILE`` in a subprocess, so it can be SIGKILLed and its
memory read from ``/proc``. The PACS (a :class:`~dicom_node.peers.dicom_sink.DicomSink`) and the HL7 receiver (an
:class:`~dicom_node.peers.hl7_sink.HL7Sink`) run in the calling process and outlive the node's restarts. What the node
did is judged only from outside: the C-STORE statuses the modality got, what the two peers stored, and the counts
in the node's SQLite files (opened read-only).

Three scenarios, each returning a report with ``problems()`` (empty when the check holds) and ``table()``:
:func:`run_load` (concurrent associations while the model runs), :func:`run_memory` (RSS over a stream of
images) and :func:`run_crash` (SIGKILL at chosen moments, restart on the same spool, exactly-once at the peers).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node.deliver.mllp import message_control_id
from dicom_node.peers.dicom_sink import DicomSink
from dicom_node.peers.hl7_sink import HL7Sink
from tests.synthetic_dicom import chest_pattern, make_cr_dataset

ROOT = Path(__file__).resolve().parents[1]
NODE_AE = "CXRLENS"
PACS_AE = "PACS"
#: Orthanc's default DicomScuTimeout: how long a PACS waits for a C-STORE response before it gives up.
SCU_TIMEOUT_S = 10.0
_UID_TEXT = re.compile(r"[0-9]+(?:\.[0-9]+)+")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (here, not in tests.peers: the benchmarks import this module
    without pytest)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(condition: Callable[[], bool], timeout: float, poll_s: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(poll_s)
    return condition()


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (1..99), inclusive method; the value itself for a single sample."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[max(0, min(98, round(q) - 1))]


# --- synthetic radiographs ---------------------------------------------------------------------------------


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


def image_bytes(ds: Dataset) -> int:
    """Size of the pixel data as received (what a per-image leak of the input would retain at least)."""
    return len(ds.PixelData)


# --- the node as a subprocess ------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeLayout:
    """Ports and paths of one node under test; the spool survives restarts."""

    root: Path
    node_port: int
    pacs_port: int
    hl7_port: int

    @property
    def spool(self) -> Path:
        return self.root / "spool"

    @property
    def config(self) -> Path:
        return self.root / "node.toml"

    @property
    def log(self) -> Path:
        return self.root / "node.log"


def new_layout(root: Path, *, batch_size: int = 16, batch_wait_ms: int = 50, retry_initial_s: float = 0.2,
               retry_max_s: float = 1.0) -> NodeLayout:
    """Pick free ports and write the node's TOML configuration under ``root`` (default model: the demo)."""
    root.mkdir(parents=True, exist_ok=True)
    ports: set[int] = set()
    while len(ports) < 3:
        ports.add(free_port())
    node_port, pacs_port, hl7_port = sorted(ports)
    layout = NodeLayout(root, node_port, pacs_port, hl7_port)
    layout.config.write_text(f"""
[node]
host = "127.0.0.1"
port = {node_port}
http_port = 0
spool_dir = "{layout.spool}"
free_disk_floor_mb = 0
retry_initial_s = {retry_initial_s}
retry_max_s = {retry_max_s}
[worker]
batch_size = {batch_size}
batch_wait_ms = {batch_wait_ms}
[[destinations]]
ae_title = "{PACS_AE}"
host = "127.0.0.1"
port = {pacs_port}
[hl7]
host = "127.0.0.1"
port = {hl7_port}
retry_initial_s = {retry_initial_s}
retry_max_s = {retry_max_s}
""")
    return layout


class NodeProcess:
    """``cxr-lens serve`` in a subprocess: start, wait for C-ECHO, SIGKILL or SIGTERM, read its RSS."""

    def __init__(self, layout: NodeLayout) -> None:
        self.layout = layout
        self.proc: subprocess.Popen[bytes] | None = None
        self.lives = 0
        self._lock = threading.Lock()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, ready_timeout: float = 180.0) -> float:
        """Start the node and wait until it answers C-ECHO; returns the seconds that took."""
        t = time.monotonic()
        env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_LENS_")}
        with self.layout.log.open("ab") as out:
            out.write(f"\n=== life {self.lives + 1} ===\n".encode())
            out.flush()
            with self._lock:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(self.layout.config)],
                    cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                )
        self.lives += 1
        try:
            self._wait_echo(ready_timeout)
            self._wait_model_ready(t + ready_timeout)
        except BaseException:
            self.kill()
            raise
        return time.monotonic() - t

    def _wait_echo(self, timeout: float) -> None:
        ae = AE(ae_title="HARNESS")
        ae.add_requested_context(Verification)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"node exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:  # a plain connect first: pynetdicom 3.0.4 leaks the socket of a refused association (#979)
                socket.create_connection(("127.0.0.1", self.layout.node_port), timeout=1).close()
            except OSError:
                time.sleep(0.2)
                continue
            assoc = ae.associate("127.0.0.1", self.layout.node_port, ae_title=NODE_AE)
            if assoc.is_established:
                assoc.send_c_echo()
                assoc.release()
                return
            time.sleep(0.2)
        raise AssertionError("node did not answer C-ECHO:\n" + self.log_tail())

    def _wait_model_ready(self, deadline: float) -> None:
        """Until this life's log says the model warm-up is over (worker.warm_up): load must meet a running model."""
        marker = f"=== life {self.lives} ==="
        while time.monotonic() < deadline:
            text = self.layout.log.read_text(errors="replace")
            if "model warm-up " in text[text.rfind(marker):]:
                return
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"node exited with {self.proc.returncode}:\n{self.log_tail()}")
            time.sleep(0.1)
        raise AssertionError("node did not finish its model warm-up:\n" + self.log_tail())

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as when the power goes. Safe to call from any thread."""
        with self._lock:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(signal.SIGKILL)
                self.proc.wait(timeout=30)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait (graceful stop); SIGKILL if it does not end in ``timeout``. Returns the exit status."""
        with self._lock:
            if self.proc is None:
                return 0
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=30)
            return int(self.proc.returncode)

    def rss_mb(self) -> float:
        """Resident set size of the node process (``VmRSS`` in ``/proc/PID/status``), in MiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
        raise RuntimeError("no VmRSS line in /proc status")

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.layout.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def _count(db: Path, sql: str) -> list[tuple]:
    if not db.exists():
        return []
    # Read-only: the node owns these files; a reader must neither create nor checkpoint them.
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)) as conn:
        return conn.execute(sql).fetchall()


def job_counts(spool: Path) -> Counter[str]:
    """Jobs by state, as the node's queue file says (empty before the first start)."""
    return Counter(dict(_count(spool / "jobs.sqlite", "SELECT state, COUNT(*) FROM jobs GROUP BY state")))


def outbox_counts(spool: Path) -> Counter[tuple[str, str]]:
    """Outbox items by (channel, state)."""
    rows = _count(spool / "outbox.sqlite", "SELECT channel, state, COUNT(*) FROM outbox GROUP BY channel, state")
    return Counter({(c, s): n for c, s, n in rows})


# --- the sending modality ----------------------------------------------------------------------------------


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


# --- the peers ---------------------------------------------------------------------------------------------


class _Hooked:
    """A peer's hook, run after it stores an item and before its answer goes back; ``delay_s`` slows it down,
    so that the node's outbox queues up."""

    after_store: Hook | None = None
    delay_s: float = 0.0

    def _stored_then_hook(self, store: Callable[[], Any]) -> Any:
        if self.delay_s:
            time.sleep(self.delay_s)
        answer = store()
        hook = self.after_store  # read once: the test may disarm it meanwhile
        if hook is not None and hook():
            self.after_store = None
        return answer


class _PACS(_Hooked, DicomSink):
    """The DICOM sink, with the hook run after an SC is stored and before the status goes back."""

    def _handle_store(self, event: Event) -> int:
        return self._stored_then_hook(lambda: super(_PACS, self)._handle_store(event))


class _Receiver(_Hooked, HL7Sink):
    """The MLLP sink, with the hook run after a message is stored and before its ACK goes back."""

    def receive(self, data: bytes) -> str:
        return self._stored_then_hook(lambda: super(_Receiver, self).receive(data))


class Peers:
    """The PACS and the HL7 receiver on the layout's ports; they outlive the node's restarts."""

    def __init__(self, layout: NodeLayout) -> None:
        self.pacs = _PACS(layout.root / "pacs", ae_title=PACS_AE, port=layout.pacs_port)
        self.ris = _Receiver("127.0.0.1", layout.hl7_port, layout.root / "hl7")

    def start(self) -> None:
        self.pacs.start()
        self.ris.start()

    def stop(self) -> None:
        self.pacs.stop()
        self.ris.stop()

    @property
    def sc_distinct(self) -> int:
        """Distinct SC SOP Instance UIDs the PACS stored."""
        return len({r.sop_instance_uid for r in self.pacs.received})

    @property
    def oru_count(self) -> int:
        """ORU messages stored and acknowledged (re-deliveries included)."""
        return sum(1 for _ in self.ris.out_dir.glob("*.hl7"))


@dataclass
class Delivery:
    """What reached the peers, keyed by the source image's SOP Instance UID."""

    sc_deliveries: int = 0  # C-STOREs the PACS answered, re-deliveries included
    sc_uids_by_source: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    oru_messages: int = 0  # messages the HL7 receiver stored and acknowledged, re-deliveries included
    control_ids_by_sc: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    oru_unmatched: int = 0  # ORUs naming no SC the PACS stored

    @property
    def sc_distinct(self) -> int:
        return sum(len(uids) for uids in self.sc_uids_by_source.values())

    @property
    def sc_redeliveries(self) -> int:
        return self.sc_deliveries - self.sc_distinct

    @property
    def oru_distinct(self) -> int:
        return sum(len(ids) for ids in self.control_ids_by_sc.values())

    @property
    def oru_redeliveries(self) -> int:
        return self.oru_messages - self.oru_distinct - self.oru_unmatched

    def problems(self, sources: set[str]) -> list[str]:
        """Why delivery was not exactly-once for ``sources`` (empty when it was).

        Exactly-once as the peers see it: one SC SOP Instance UID per source image (a PACS keeps one instance
        per UID) and one ORU per SC by MSH-10 (a receiver discards a repeated MSH-10). Re-deliveries of the same
        UID or MSH-10 are at-least-once at work: counted, not failed.
        """
        out = []
        if missing := sources - set(self.sc_uids_by_source):
            out.append(f"{len(missing)} image(s) without an SC at the PACS")
        if extra := set(self.sc_uids_by_source) - sources:
            out.append(f"{len(extra)} SC(s) reference an image that was not sent")
        if several := [s for s, uids in self.sc_uids_by_source.items() if len(uids) > 1]:
            out.append(f"{len(several)} image(s) got more than one distinct SC")
        sc_uids = {u for s, uids in self.sc_uids_by_source.items() if s in sources for u in uids}
        if no_oru := [u for u in sc_uids if not self.control_ids_by_sc.get(u)]:
            out.append(f"{len(no_oru)} SC(s) without an acknowledged ORU")
        if several_oru := [u for u in sc_uids if len(self.control_ids_by_sc.get(u, ())) > 1]:
            out.append(f"{len(several_oru)} SC(s) with ORUs under more than one MSH-10")
        if self.oru_unmatched:
            out.append(f"{self.oru_unmatched} ORU(s) name no SC stored at the PACS")
        return out


def collect_delivery(peers: Peers) -> Delivery:
    """Read what the PACS and the HL7 receiver hold now."""
    d = Delivery()
    received = peers.pacs.received
    d.sc_deliveries = len(received)
    for item in {r.sop_instance_uid: r for r in received}.values():
        sc = pydicom.dcmread(item.path, stop_before_pixels=True)
        d.sc_uids_by_source[str(sc.SourceImageSequence[0].ReferencedSOPInstanceUID)].add(str(sc.SOPInstanceUID))
    stored = {u for uids in d.sc_uids_by_source.values() for u in uids}
    for path in sorted(peers.ris.out_dir.glob("*.hl7")):
        message = path.read_bytes().decode("utf-8", errors="replace")
        d.oru_messages += 1
        named = [uid for uid in _UID_TEXT.findall(message) if uid in stored]
        if named:
            d.control_ids_by_sc[named[0]][message_control_id(message)] += 1
        else:
            d.oru_unmatched += 1
    return d


# --- one node with its peers -------------------------------------------------------------------------------


class NodeUnderTest:
    """A layout, its peers and its node process; remembers every image the node acknowledged."""

    def __init__(self, root: Path, *, batch_size: int = 16, batch_wait_ms: int = 50) -> None:
        self.layout = new_layout(root, batch_size=batch_size, batch_wait_ms=batch_wait_ms)
        self.peers = Peers(self.layout)
        self.node = NodeProcess(self.layout)
        self.sources: set[str] = set()

    def __enter__(self) -> NodeUnderTest:
        self.peers.start()
        try:
            self.node.start()
        except BaseException:
            self.peers.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.node.stop()
        finally:
            self.peers.stop()

    @property
    def port(self) -> int:
        return self.layout.node_port

    def note(self, replies: Sequence[StoreReply]) -> None:
        self.sources.update(r.sop_instance_uid for r in replies if r.status == 0x0000)

    def settled(self) -> bool:
        """Every acknowledged image has a final job and nothing waits in the outbox: no more output can come."""
        jobs = job_counts(self.layout.spool)
        box = outbox_counts(self.layout.spool)
        final = jobs["done"] + jobs["failed"] + jobs["ineligible"]
        return final >= len(self.sources) and jobs["pending"] + jobs["processing"] == 0 and (
            box["dicom", "pending"] + box["hl7", "pending"] == 0)

    def wait_settled(self, timeout: float) -> bool:
        return wait_until(self.settled, timeout, poll_s=0.1)

    def final_problems(self, delivery: Delivery) -> list[str]:
        """Exactly-once problems plus jobs that did not end ``done`` and outbox items parked."""
        out = delivery.problems(self.sources)
        jobs = job_counts(self.layout.spool)
        if jobs["failed"] or jobs["ineligible"]:
            out.append(f"jobs failed {jobs['failed']}, ineligible {jobs['ineligible']} (all images are eligible)")
        box = outbox_counts(self.layout.spool)
        if parked := box["dicom", "parked"] + box["hl7", "parked"]:
            out.append(f"{parked} outbox item(s) parked")
        return out


def _table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(c) for c in header]] + [[f"{c:.1f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(cells[0], widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells[1:]]
    return "\n".join(lines)


def _delivery_rows(d: Delivery, n: int) -> list[tuple[str, object]]:
    return [("images acknowledged", n), ("SC C-STOREs at the PACS", d.sc_deliveries),
            ("distinct SC SOP Instance UIDs", d.sc_distinct), ("SC re-deliveries (same UID)", d.sc_redeliveries),
            ("ORUs acknowledged", d.oru_messages), ("distinct ORU MSH-10s", d.oru_distinct),
            ("ORU re-deliveries (same MSH-10)", d.oru_redeliveries)]


# --- scenario: concurrent associations while the model runs ------------------------------------------------


@dataclass
class LoadReport:
    replies: list[StoreReply]
    expected: int
    inference_during_sends: int  # samples of the job queue, taken while sending, that saw a batch in processing
    done_during_sends: int
    send_seconds: float
    settle_seconds: float
    settled: bool
    delivery: Delivery
    final_problems: list[str]
    acknowledged_total: int  # the preload included

    @property
    def times_ms(self) -> list[float]:
        return [r.seconds * 1000.0 for r in self.replies if r.status is not None]

    @property
    def dropped(self) -> int:
        return self.expected - sum(1 for r in self.replies if r.status == 0x0000)

    def problems(self) -> list[str]:
        out = []
        if self.dropped:
            notes = Counter(r.note or f"0x{r.status:04X}" for r in self.replies if r.status != 0x0000)
            out.append(f"{self.dropped} of {self.expected} C-STORE(s) without Success: {dict(notes)}")
        if slow := [t for t in self.times_ms if t >= SCU_TIMEOUT_S * 1000.0]:
            out.append(f"{len(slow)} C-STORE(s) answered after {SCU_TIMEOUT_S:.0f} s (max {max(slow):.0f} ms)")
        if not self.inference_during_sends:
            out.append("the model never ran while the images were being sent (no load)")
        if not self.settled:
            out.append("the node did not finish the images in time")
        out += self.final_problems
        if self.delivery.sc_redeliveries or self.delivery.oru_redeliveries:
            out.append(f"re-deliveries without any crash: {self.delivery.sc_redeliveries} SC, "
                       f"{self.delivery.oru_redeliveries} ORU")
        return out

    def table(self) -> str:
        t = self.times_ms or [0.0]
        streams = len({r.sender for r in self.replies})
        rows: list[tuple[str, object]] = [
            ("associations x images", f"{streams} x {self.expected // max(1, streams)}"),
            ("C-STORE reply p50 ms", statistics.median(t)), ("C-STORE reply p99 ms", percentile(t, 99)),
            ("C-STORE reply max ms", max(t)), ("dropped (no Success)", self.dropped),
            ("queue samples with a batch in processing", self.inference_during_sends),
            ("jobs finished while sending", self.done_during_sends), ("send time s", self.send_seconds),
            ("time to settle s", self.settle_seconds),
            *_delivery_rows(self.delivery, self.acknowledged_total),
        ]
        return _table("load: concurrent associations while the model runs", ("measure", "value"), rows)


def run_load(nut: NodeUnderTest, *, streams: int = 4, per_stream: int = 12, preload: int = 16,
             rows: int = 512, settle_timeout: float = 300.0) -> LoadReport:
    """``preload`` images to get the model busy, then ``streams`` associations of ``per_stream`` images at once."""
    images = chest_images(preload + streams * per_stream, rows=rows, cols=rows, tag="LOAD")
    first = send_images(nut.port, images[:preload], sender=streams)
    nut.note(first)
    done_before = job_counts(nut.layout.spool)["done"]
    busy_samples = 0
    sending = threading.Event()
    sending.set()

    def sample_queue() -> None:
        nonlocal busy_samples
        while sending.is_set():
            busy_samples += job_counts(nut.layout.spool)["processing"] > 0
            time.sleep(0.05)

    sampler = threading.Thread(target=sample_queue, name="queue-sampler")
    sampler.start()
    t = time.monotonic()
    try:
        work = images[preload:]
        replies = send_concurrently(nut.port, [work[i::streams] for i in range(streams)])
    finally:
        send_seconds = time.monotonic() - t
        sending.clear()
        sampler.join()
    done_during = job_counts(nut.layout.spool)["done"] - done_before
    nut.note(replies)
    t = time.monotonic()
    ok = nut.wait_settled(settle_timeout)
    settle_seconds = time.monotonic() - t
    delivery = collect_delivery(nut.peers)
    problems = nut.final_problems(delivery) + [f"preload: {r.note}" for r in first if r.status != 0x0000]
    return LoadReport(replies, streams * per_stream, busy_samples, done_during, send_seconds, settle_seconds, ok,
                      delivery, problems, len(nut.sources))


# --- scenario: memory over a stream of images --------------------------------------------------------------


@dataclass
class MemoryReport:
    samples: list[tuple[int, float]]  # (images of this scenario processed, node RSS MiB), after each chunk
    warmup: int
    every: int
    image_bytes: int
    bound_mb: float
    problems_seen: list[str]

    @property
    def warm_mb(self) -> float:
        return next(mb for n, mb in self.samples if n >= self.warmup)

    @property
    def growth_mb(self) -> float:
        return self.samples[-1][1] - self.warm_mb

    @property
    def measured(self) -> int:
        return self.samples[-1][0] - self.warmup

    def problems(self) -> list[str]:
        out = list(self.problems_seen)
        if self.growth_mb >= self.bound_mb:
            out.append(f"RSS grew {self.growth_mb:.1f} MiB over {self.measured} images after warm-up "
                       f"(bound {self.bound_mb:.0f} MiB)")
        return out

    def table(self) -> str:
        first = self.samples[0][1]
        rows = [(n, mb, mb - first, mb - self.warm_mb if n >= self.warmup else "")
                for i, (n, mb) in enumerate(self.samples)
                if n % self.every == 0 or n == self.warmup or i == len(self.samples) - 1]
        leak = self.measured * self.image_bytes / 2**20
        return (_table("memory: node RSS (VmRSS) by images processed",
                       ("images", "RSS MiB", "since start", "since warm-up"), rows)
                + f"\ngrowth over {self.measured} images after a warm-up of {self.warmup}: {self.growth_mb:.1f} MiB "
                  f"(bound {self.bound_mb:.0f} MiB; a leak of each input image alone would add {leak:.0f} MiB)")


def run_memory(nut: NodeUnderTest, *, warmup: int, measured: int, every: int, bound_mb: float,
               rows: int = 512, chunk: int = 20, settle_timeout: float = 300.0) -> MemoryReport:
    """Send ``warmup + measured`` images in chunks, wait for each chunk's outputs, read the node's RSS after each.

    The growth that counts is from the end of the warm-up to the end: the first batches grow the allocator's
    arenas and TensorFlow's caches once; a leak grows with every image.
    """
    images = chest_images(warmup + measured, rows=rows, cols=rows, tag="SOAK")
    samples = [(0, nut.node.rss_mb())]
    problems: list[str] = []
    for start in range(0, len(images), chunk):
        replies = send_images(nut.port, images[start:start + chunk])
        nut.note(replies)
        if any(r.status != 0x0000 for r in replies):
            problems.append(f"chunk at {start}: {dict(Counter(r.note or hex(r.status or 0) for r in replies))}")
        if not nut.wait_settled(settle_timeout):
            problems.append(f"the node did not finish the chunk at image {start} in time")
            break
        samples.append((min(start + chunk, len(images)), nut.node.rss_mb()))
    warm = min((n for n, _ in samples if n >= warmup), default=samples[-1][0])
    problems += nut.final_problems(collect_delivery(nut.peers))
    return MemoryReport(samples, warm, every, image_bytes(images[0]), bound_mb, problems)


# --- scenario: SIGKILL at chosen moments -------------------------------------------------------------------

#: Where a node life ends. Each life gets a fresh share of the images, so every moment has work to hit; the state
#: at the kill is what ``run_crash`` reads right after it.
KILL_MOMENTS: dict[str, str] = {
    "receiving": "mid-association: right after the modality got its 2nd Success of this life",
    "sc-stored": "the PACS stored an SC, before its C-STORE response reaches the node",
    "inference": "a batch in processing",
    "outbox": "the PACS stored an SC while more SCs wait in the outbox, before the response reaches the node",
    "oru-stored": "the HL7 receiver stored an ORU, before its ACK reaches the node",
}


@dataclass(frozen=True)
class KillRecord:
    moment: str
    life: int
    hit: bool
    seconds_into_life: float
    acknowledged: int
    jobs: str
    outbox: str
    sc_at_pacs: int
    oru_at_receiver: int
    restart_s: float


@dataclass
class CrashReport:
    n: int
    kills: list[KillRecord]
    settled: bool
    exit_status: int
    total_s: float
    delivery: Delivery
    final_problems: list[str]
    unanswered_sc: int  # kills at which the PACS had stored an SC the node had no response for
    unacked_oru: int  # kills at which the HL7 receiver had stored an ORU the node had no ACK for

    def problems(self) -> list[str]:
        out = list(self.final_problems)
        if missed := [k.moment for k in self.kills if not k.hit]:
            out.append(f"kill moment(s) never reached: {', '.join(missed)}")
        if not self.settled:
            out.append("the node did not finish after the last restart")
        if self.exit_status != 0:
            out.append(f"graceful stop exited {self.exit_status}")
        # The node cannot know that the peer stored those, so it must have sent each again.
        if self.delivery.sc_redeliveries < self.unanswered_sc:
            out.append(f"SC re-deliveries {self.delivery.sc_redeliveries} < {self.unanswered_sc} unanswered")
        if self.delivery.oru_redeliveries < self.unacked_oru:
            out.append(f"ORU re-deliveries {self.delivery.oru_redeliveries} < {self.unacked_oru} unacknowledged")
        return out

    def table(self) -> str:
        rows = [(k.life, k.moment, "yes" if k.hit else "MISSED", k.seconds_into_life, k.acknowledged, k.jobs,
                 k.outbox, k.sc_at_pacs, k.oru_at_receiver, k.restart_s) for k in self.kills]
        kills = _table(f"crash: SIGKILL at {len(self.kills)} moments, {self.n} images (state read after the kill)",
                       ("life", "moment", "hit", "at s", "acked", "jobs d/p/q", "outbox sc d/p hl7 d/p", "SCs",
                        "ORUs", "restart s"), rows)
        summary = _table("after the last restart", ("measure", "value"), [
            *_delivery_rows(self.delivery, self.n), ("settled", self.settled),
            ("exit status (SIGTERM)", self.exit_status), ("total s", self.total_s)])
        return kills + "\n\n" + summary


def _jobs_text(spool: Path) -> str:
    j = job_counts(spool)
    return f"{j['done']}/{j['processing']}/{j['pending']}"


def _outbox_text(spool: Path) -> str:
    b = outbox_counts(spool)
    return f"{b['dicom', 'done']}/{b['dicom', 'pending']} {b['hl7', 'done']}/{b['hl7', 'pending']}"


def run_crash(nut: NodeUnderTest, moments: Sequence[str], *, n: int, rows: int = 512, peer_delay_s: float = 0.1,
              moment_timeout: float = 120.0, settle_timeout: float = 300.0) -> CrashReport:
    """A re-sending modality streams ``n`` images; the node is SIGKILLed at each moment and restarted on its spool.

    ``nut`` must be entered (node running). The images are shared out over the lives, one share released at each
    start, so each life has images to receive, infer and deliver. The PACS and the HL7 receiver answer after
    ``peer_delay_s``, so outputs wait in the outbox while the model runs. Each life first drains the job queue
    (the jobs the last crash interrupted, and the images re-sent), then gets its share: a job interrupted three
    times is failed on purpose (a poison-pill guard, ``JobQueue.requeue_processing``), which is not what this
    scenario tests.
    """
    if unknown := [m for m in moments if m not in KILL_MOMENTS]:
        raise ValueError(f"unknown kill moment(s) {unknown}; known: {', '.join(KILL_MOMENTS)}")
    started = time.monotonic()
    spool = nut.layout.spool
    peers = nut.peers
    peers.pacs.delay_s = peers.ris.delay_s = peer_delay_s
    images = chest_images(n, rows=rows, cols=rows, tag="CRASH")
    shares = [images[i::len(moments) + 1] for i in range(len(moments) + 1)]

    def drained() -> bool:
        jobs = job_counts(spool)
        return jobs["pending"] + jobs["processing"] == 0

    modality = RetryingModality(nut.port)
    modality.start()
    kills: list[KillRecord] = []
    unanswered_sc = unacked_oru = 0
    try:
        for life, moment in enumerate(moments):
            life_started = time.monotonic()
            # Drain first: what the last crash interrupted finishes before the next one (see the docstring).
            wait_until(lambda: modality.finished and drained(), moment_timeout)
            killed = threading.Event()

            # Hooks run in the peers' threads; bind this life's event so that a late one cannot act on the next.
            def kill(when: Callable[[], bool] = lambda: True, killed: threading.Event = killed) -> bool:
                if not when():
                    return False
                nut.node.kill()
                killed.set()
                return True

            if moment == "receiving":
                acked_by = modality.acknowledged + 2
                modality.after_ack = partial(kill, lambda: modality.acknowledged >= acked_by)
            elif moment == "sc-stored":
                peers.pacs.after_store = kill
            elif moment == "outbox":
                # The SC being stored is pending until the node reads the response: >= 2 means more wait behind.
                peers.pacs.after_store = partial(kill, lambda: outbox_counts(spool)["dicom", "pending"] >= 2)
            elif moment == "oru-stored":
                peers.ris.after_store = kill
            modality.add(shares[life])
            deadline = time.monotonic() + moment_timeout
            while time.monotonic() < deadline and not killed.is_set():
                if moment == "inference" and job_counts(spool)["processing"]:
                    kill()
                time.sleep(0.02)
            modality.after_ack = peers.pacs.after_store = peers.ris.after_store = None
            hit = killed.is_set()
            unanswered_sc += hit and moment in ("sc-stored", "outbox")
            unacked_oru += hit and moment == "oru-stored"
            if not hit:
                nut.node.kill()  # missed: crash here anyway, so the run keeps its shape
            record = KillRecord(moment, nut.node.lives, hit, time.monotonic() - life_started, modality.acknowledged,
                                _jobs_text(spool), _outbox_text(spool), peers.sc_distinct, peers.oru_count, 0.0)
            kills.append(replace(record, restart_s=nut.node.start()))
        modality.add(shares[-1])
        wait_until(lambda: modality.finished, settle_timeout)
    finally:
        modality.stop()
    nut.note(modality.replies)
    ok = nut.wait_settled(settle_timeout)
    time.sleep(1.0)  # anything sent twice after settling would arrive now
    exit_status = nut.node.stop()
    delivery = collect_delivery(peers)
    problems = nut.final_problems(delivery)
    if len(nut.sources) != n:
        problems.append(f"only {len(nut.sources)} of {n} images were ever acknowledged")
    if modality.error is not None:
        problems.append(f"the modality stopped: {modality.error!r}")
    return CrashReport(n, kills, ok, exit_status, time.monotonic() - started, delivery, problems, unanswered_sc,
                       unacked_oru)


def verdict(problems: list[str]) -> int:
    """Print PASS or FAIL with each problem; the exit status for a bench."""
    print("check:", "PASS" if not problems else "FAIL")
    for problem in problems:
        print(f"  - {problem}")
    return 1 if problems else 0
