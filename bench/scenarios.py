"""A CXR Lens node as a black box under load, over time and under SIGKILL (the benchmarks and their tests).

The node runs in a subprocess (:class:`~dicom_node.peers.node_process.NodeProcess`), so it can be SIGKILLed and its
memory read from ``/proc``. The PACS and the HL7 receiver (:class:`~bench.delivery.Peers`) run in the calling
process and outlive the node's restarts. What the node did is judged only from outside: the C-STORE statuses the
modality got, what the two peers stored, and the counts in the node's SQLite files (opened read-only).

Three scenarios, each returning a report with ``problems()`` (empty when the check holds) and ``table()``:
:func:`run_load` (concurrent associations while the model runs), :func:`run_memory` (RSS over a stream of
images) and :func:`run_crash` (SIGKILL at chosen moments, restart on the same spool, exactly-once at the peers).
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

from pydicom import Dataset
from pydicom.uid import SecondaryCaptureImageStorage

from bench.delivery import Delivery, Peers, collect_delivery
from dicom_node.peers.modality import (
    SCU_TIMEOUT_S,
    RetryingModality,
    StoreReply,
    send_concurrently,
    send_images,
)
from dicom_node.peers.node_process import (
    NodeProcess,
    job_counts,
    new_layout,
    outbox_counts,
    wait_until,
)
from dicom_node.peers.synthetic_cr import chest_images


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (1..99), inclusive method; the value itself for a single sample."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[max(0, min(98, round(q) - 1))]


def image_bytes(ds: Dataset) -> int:
    """Size of the pixel data as received (what a per-image leak of the input would retain at least)."""
    return len(ds.PixelData)


# --- one node with its peers -------------------------------------------------------------------------------


class NodeUnderTest:
    """A layout, its peers and its node process; remembers every image the node acknowledged."""

    def __init__(self, root: Path, *, batch_size: int = 16, batch_wait_ms: int = 50, processes: int = 0) -> None:
        self.layout = new_layout(root, batch_size=batch_size, batch_wait_ms=batch_wait_ms, processes=processes)
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
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(cells[0], widths, strict=True)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells[1:]]
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


def _last_is_sc(peers: Peers) -> bool:
    """Whether the PACS's last stored object is a Secondary Capture (the SR and PM of an image travel beside it)."""
    received = peers.pacs.received
    return bool(received) and str(received[-1].sop_class_uid) == SecondaryCaptureImageStorage

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
                modality.after_ack = partial(kill, lambda n=acked_by: modality.acknowledged >= n)
            elif moment == "sc-stored":
                # An SC, not the Parametric Map or SR beside it: the check counts SC re-deliveries.
                peers.pacs.after_store = partial(kill, partial(_last_is_sc, peers))
            elif moment == "outbox":
                # The SC being stored is pending until the node reads the response: >= 2 means more wait behind.
                peers.pacs.after_store = partial(
                    kill, lambda: _last_is_sc(peers) and outbox_counts(spool)["dicom", "pending"] >= 2)
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
