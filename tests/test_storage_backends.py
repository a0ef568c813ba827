"""The storage contract, run against both backends: SQLite files and a real PostgreSQL (a throw-away cluster).

The queue and outbox tests take a ``backend`` that opens stores the way the node does (``open_job_store`` /
``open_outbox_store``); what only PostgreSQL promises (leases, SKIP LOCKED between processes, LISTEN/NOTIFY,
sender leases, migrations, an outage) is tested against it alone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE

from dicom_node.deliver.dicom import DicomSender
from dicom_node.ops.status import collect_status, format_status
from dicom_node.peers.dicom_sink import DicomSink
from dicom_node.peers.node_process import ROOT, wait_until
from dicom_node.peers.synthetic_cr import make_cr_dataset
from dicom_node.process.worker import JobOutcome
from dicom_node.receive.scp import StorageSCP
from dicom_node.settings import (
    DestinationSettings,
    NodeSettings,
    Settings,
    StorageSettings,
    WorkerSettings,
    load_settings,
)
from dicom_node.storage.backend import (
    JobStore,
    OutboxStore,
    StorageError,
    StorageNotFound,
    is_postgres,
    open_job_store,
    open_outbox_store,
    open_storage,
    redacted,
)
from dicom_node.storage.jobs import Job, JobQueue, JobState
from dicom_node.storage.outbox import Outbox
from dicom_node.storage.spool import Spool
from tests.support import postgres as pg_support
from tests.support.peers import fake_secondary_capture, sample
from tests.support.postgres import PostgresCluster, needs_postgres, start_postgres

postgres_cluster = pg_support.postgres_cluster  # the session's cluster, a fixture

KEYS = [f"{i:064x}" for i in range(40)]


@dataclass
class Backend:
    """Opens stores of one backend on one place (a spool directory, or one database)."""

    name: str
    storage: StorageSettings
    spool_dir: Path
    opened: list[JobStore | OutboxStore]

    def jobs(self) -> JobStore:
        store = open_job_store(self.storage, self.spool_dir)
        self.opened.append(store)
        return store

    def outbox(self) -> OutboxStore:
        store = open_outbox_store(self.storage, self.spool_dir)
        self.opened.append(store)
        return store


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=needs_postgres())])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "postgres":
        cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
        storage = StorageSettings(url=cluster.database(), lease_s=60.0)
    else:
        storage = StorageSettings()
    b = Backend(request.param, storage, tmp_path / "spool", [])
    yield b
    for store in reversed(b.opened):
        store.close()


@pytest.fixture
def pg_url(postgres_cluster: PostgresCluster) -> str:
    return postgres_cluster.database()


# The job queue, on both backends.
def test_add_is_idempotent_per_content_and_a_failed_job_comes_back(backend: Backend) -> None:
    q = backend.jobs()
    first = q.add(KEYS[0], calling_ae="PACS", uid_hash="abc")
    assert first[1] is True
    assert q.add(KEYS[0], calling_ae="PACS") == (first[0], False)
    other = q.add(KEYS[1])
    assert other[1] is True and other[0] != first[0]
    assert q.pending_count() == 2
    (claimed, _) = q.claim_batch(2)
    q.fail(claimed.id, "boom")
    assert q.add(KEYS[0]) == (first[0], True)
    job = q.get(first[0])
    assert job is not None and (job.state, job.reason, job.calling_ae, job.uid_hash) == (
        JobState.PENDING, None, "PACS", "abc")


def test_claims_oldest_first_and_counts_attempts(backend: Backend) -> None:
    q = backend.jobs()
    ids = [q.add(k)[0] for k in KEYS[:5]]
    batch = q.claim_batch(3)
    assert [j.id for j in batch] == ids[:3]
    assert all(j.state == JobState.PROCESSING and j.attempts == 1 for j in batch)
    ahead = q.claim_batch(10, count_attempt=False)
    assert [j.id for j in ahead] == ids[3:] and all(j.attempts == 0 for j in ahead)
    q.begin_attempt(ahead[0].id)
    assert q.get(ahead[0].id).attempts == 1  # type: ignore[union-attr]
    assert q.claim_batch(10) == []
    assert q.counts() == {"pending": 0, "processing": 5, "done": 0, "failed": 0, "ineligible": 0}


def test_final_states_counts_and_recent_failures(backend: Backend) -> None:
    q = backend.jobs()
    a, b, c, d = (q.add(k)[0] for k in KEYS[:4])
    q.claim_batch(4)
    q.complete(a)
    q.fail(b, "DecodeError: corrupt J2K stream")
    q.mark_ineligible(c, "modality", "not a radiograph")
    q.fail(d, "later failure")
    assert q.counts() == {"pending": 0, "processing": 0, "done": 1, "failed": 2, "ineligible": 1}
    assert [(j.id, j.reason) for j in q.recent_failures(5)] == [(d, "later failure"),
                                                                (b, "DecodeError: corrupt J2K stream")]
    job_c = q.get(c)
    assert job_c is not None and (job_c.state, job_c.rule, job_c.reason) == (
        JobState.INELIGIBLE, "modality", "not a radiograph")
    assert q.get(10_000) is None


def test_wait_for_work_wakes_on_add_and_on_wake(backend: Backend) -> None:
    q = backend.jobs()
    q.wait_for_work(0.05)  # PostgreSQL: starts listening
    assert q.wait_for_work(0.05) is False
    threading.Timer(0.2, lambda: q.add(KEYS[0])).start()
    started = time.monotonic()
    assert wait_until(lambda: q.wait_for_work(5.0), 10.0, poll_s=0.0)
    assert time.monotonic() - started < 4.0
    q.claim_batch(1)
    threading.Timer(0.2, q.wake).start()
    started = time.monotonic()
    assert q.wait_for_work(10.0) is False
    assert time.monotonic() - started < 5.0


@pytest.mark.parametrize("shared", [True, False], ids=["threads of one queue", "a queue each"])
def test_concurrent_claimers_never_share_a_job(backend: Backend, shared: bool) -> None:
    # Threads share their process's queue object; processes have one each (a connection of their own).
    first = backend.jobs()
    claimers = [first, first if shared else backend.jobs()]
    ids = {first.add(k)[0] for k in KEYS}
    got: list[list[int]] = [[], []]
    start = threading.Barrier(2)

    def claim(n: int) -> None:
        start.wait()
        while batch := claimers[n].claim_batch(3):
            got[n] += [j.id for j in batch]

    threads = [threading.Thread(target=claim, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(got[0] + got[1]) == sorted(ids)  # each job exactly once
    assert not set(got[0]) & set(got[1])


def test_an_interrupted_claim_comes_back(backend: Backend, tmp_path: Path) -> None:
    """SQLite: requeued when the node starts again; PostgreSQL: when the dead worker's lease runs out."""
    q = backend.jobs()
    done, interrupted = q.add(KEYS[0])[0], q.add(KEYS[1])[0]
    if backend.name == "sqlite":
        q.claim_batch(2)
        q.complete(done)
        q.close()  # the process "crashes" with job `interrupted` in processing
        again = JobQueue(backend.spool_dir / "jobs.sqlite")
        backend.opened.append(again)
        assert again.requeue_processing() == 1
        assert [j.id for j in again.claim_batch(5)] == [interrupted]
        return
    claimed = _claim_in_a_process_then_die(backend.storage.url, lease_s=1.0, complete_first=True)
    assert claimed == [done, interrupted]
    assert q.claim_batch(5) == []  # leased to the dead worker until the lease runs out
    assert wait_until(lambda: q.wait_for_work(0.5), 10.0)
    assert [j.id for j in q.claim_batch(5)] == [interrupted]
    assert q.get(done).state == JobState.DONE  # type: ignore[union-attr]


def test_a_job_interrupted_max_attempts_times_fails(backend: Backend) -> None:
    q = backend.jobs()
    job_id, _ = q.add(KEYS[2])
    if backend.name == "sqlite":
        for _ in range(3):
            q.claim_batch(1)
            q.requeue_processing(max_attempts=3)
    else:
        for _ in range(3):  # a worker claims it and dies, three times
            assert wait_until(lambda: q.wait_for_work(0.5), 10.0)
            assert _claim_in_a_process_then_die(backend.storage.url, lease_s=1.0) == [job_id]
        assert wait_until(lambda: q.wait_for_work(0.5), 10.0)  # the third lease ran out
        assert q.claim_batch(1) == []
    job = q.get(job_id)
    assert job is not None and job.state == JobState.FAILED and "interrupted 3 times" in (job.reason or "")


# The outbox, on both backends.
def test_outbox_dedup_fifo_retry_park_and_resend(backend: Backend) -> None:
    box = backend.outbox()
    payloads = [bytes([i]) * 1000 + b"\x00\xff" for i in range(3)]
    ids = [box.enqueue("dicom", "PACS@h:1", f"sc-{i}", p) for i, p in enumerate(payloads)]
    assert box.enqueue("dicom", "PACS@h:1", "sc-0", b"other") == ids[0]  # stored once
    assert box.enqueue("hl7", "h:2", "sc-0", b"MSH|") != ids[0]  # another channel is another item
    assert box.destinations("dicom") == ["PACS@h:1"]
    head = box.due("dicom", "PACS@h:1")
    assert head is not None and (head.id, head.payload, head.state, head.attempts) == (ids[0], payloads[0],
                                                                                       "pending", 0)
    later = time.time() + 30
    box.mark_retry(ids[0], "0xA700 out of resources", later)
    assert box.due("dicom", "PACS@h:1") is None  # FIFO: the retried head blocks the ones behind it
    assert box.head("dicom", "PACS@h:1").id == ids[0]  # type: ignore[union-attr]
    assert box.due("dicom", "PACS@h:1", now=later + 1).id == ids[0]  # type: ignore[union-attr]
    box.park(ids[0], "0xA900 refused")
    box.mark_done(ids[1])
    assert box.due("dicom", "PACS@h:1").id == ids[2]  # type: ignore[union-attr]
    assert box.counts() == {("dicom", "parked"): 1, ("dicom", "done"): 1, ("dicom", "pending"): 1,
                            ("hl7", "pending"): 1}
    parked = box.get(ids[0])
    assert parked is not None and (parked.state, parked.attempts, parked.last_error) == ("parked", 2,
                                                                                          "0xA900 refused")
    assert [p.id for p in box.problems()] == [ids[0]]
    assert box.enqueue("dicom", "PACS@h:1", "sc-1", b"new", resend=True) == ids[1]
    again = box.get(ids[1])
    assert again is not None and (again.state, again.attempts, again.payload) == ("pending", 0, b"new")
    assert box.get(10_000) is None


def test_two_outboxes_enqueueing_the_same_outputs_at_once_store_each_once(backend: Backend) -> None:
    """Stage processes (``worker.processes`` >= 2) each hold an outbox of their own on the same store. Two jobs can
    make the same outputs (one SOP Instance received twice with different bytes), so two processes may enqueue one
    dedup key at the same moment: each call must return the one item, never fail on the other's insert."""
    boxes = [backend.outbox(), backend.outbox()]
    keys = [f"sr-{i}" for i in range(150)]
    got: list[list[int]] = [[], []]
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def enqueue(n: int) -> None:
        start.wait()
        try:
            for key in keys:
                got[n].append(boxes[n].enqueue("dicom", "PACS@h:1", key, f"{key} from {n}".encode(), resend=True,
                                               source_received_at=0.0))
        except BaseException as exc:  # noqa: BLE001 (reported below, with the thread's name)
            errors.append(exc)

    threads = [threading.Thread(target=enqueue, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, [type(e).__name__ + ": " + str(e) for e in errors]
    assert got[0] == got[1] and len(set(got[0])) == len(keys)
    assert boxes[0].counts() == {("dicom", "pending"): len(keys)}


def test_resend_replaces_an_earlier_studys_output_but_not_the_same_instances(backend: Backend) -> None:
    """A delivered twin enqueued before the source arrived is an earlier study's output: the new one replaces it.
    One enqueued after is this instance's own, from an attempt interrupted after storing it: left delivered."""
    box = backend.outbox()
    first = box.enqueue("dicom", "PACS@h:1", "sc", b"study sent once")
    box.mark_done(first)
    received_again = time.time()  # the study arrives again, corrected
    time.sleep(0.01)
    assert box.enqueue("dicom", "PACS@h:1", "sc", b"corrected", resend=True,
                       source_received_at=received_again) == first
    replaced = box.get(first)
    assert replaced is not None and (replaced.state, replaced.payload) == ("pending", b"corrected")
    box.mark_done(first)
    # Its job is processed again (the worker died after storing the outputs, before the job was done): the
    # twin it stored and that was delivered meanwhile stays delivered, not sent twice.
    assert box.enqueue("dicom", "PACS@h:1", "sc", b"corrected, built again", resend=True,
                       source_received_at=received_again) == first
    kept = box.get(first)
    assert kept is not None and (kept.state, kept.payload) == ("done", b"corrected")


# PostgreSQL only.
CLAIMER = """
import sys, time
from dicom_node.storage.postgres import PostgresJobQueue
q = PostgresJobQueue(sys.argv[1], lease_s=float(sys.argv[2]))
jobs = q.claim_batch(10)
if sys.argv[3] == "1" and jobs:
    q.complete(jobs[0].id)
print(",".join(str(j.id) for j in jobs), flush=True)
time.sleep(600)
"""


def _claimer(url: str, lease_s: float, complete_first: bool = False) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", CLAIMER, url, str(lease_s), "1" if complete_first else "0"],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)


def _claim_in_a_process_then_die(url: str, *, lease_s: float, complete_first: bool = False) -> list[int]:
    """A worker process claims what it can, then is SIGKILLed: no shutdown code runs."""
    proc = _claimer(url, lease_s, complete_first)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        if proc.stdout is not None:
            proc.stdout.close()
    return [int(x) for x in line.split(",") if x]


@needs_postgres()
def test_a_live_worker_keeps_its_claims_past_the_lease(pg_url: str) -> None:
    from dicom_node.storage.postgres import PostgresJobQueue

    q = PostgresJobQueue(pg_url, lease_s=60)
    try:
        job_id, _ = q.add(KEYS[0])
        proc = _claimer(pg_url, 1.0)
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == str(job_id)
            time.sleep(2.5)  # 2.5 leases: renewed every third of one
            assert q.claim_batch(5) == []
            assert q.requeue_processing() == 0  # a starting node leaves live workers' claims alone
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
            if proc.stdout is not None:
                proc.stdout.close()
        assert wait_until(lambda: [j.id for j in q.claim_batch(5)] == [job_id], 10.0)
    finally:
        q.close()


@needs_postgres()
def test_a_job_whose_outcome_was_lost_is_let_go(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The database failed as the worker stored an outcome: its lease is not renewed, another worker takes it."""
    from dicom_node.storage.postgres import PostgresJobQueue

    a, b = PostgresJobQueue(pg_url, lease_s=1.0), PostgresJobQueue(pg_url, lease_s=60)
    try:
        kept, lost = (a.add(k)[0] for k in KEYS[:2])
        assert [j.id for j in a.claim_batch(2)] == [kept, lost]
        working = a._db.transaction

        def down() -> None:
            raise StorageError("PostgreSQL: connection refused")

        monkeypatch.setattr(a._db, "transaction", down)
        with pytest.raises(StorageError):
            a.fail(lost, "DecodeError")
        monkeypatch.setattr(a._db, "transaction", working)
        time.sleep(2.0)  # two leases: `kept` is renewed, `lost` is not
        assert [j.id for j in b.claim_batch(5)] == [lost]
        assert a.get(kept).state == JobState.PROCESSING  # type: ignore[union-attr]
    finally:
        a.close()
        b.close()


@needs_postgres()
def test_close_returns_claims_at_once(pg_url: str) -> None:
    from dicom_node.storage.postgres import PostgresJobQueue

    a, b = PostgresJobQueue(pg_url, lease_s=600), PostgresJobQueue(pg_url, lease_s=600)
    try:
        ids = [a.add(k)[0] for k in KEYS[:3]]
        assert len(a.claim_batch(3)) == 3 and b.claim_batch(3) == []
        a.close()
        assert [j.id for j in b.claim_batch(3)] == ids
    finally:
        a.close()
        b.close()


@needs_postgres()
def test_notify_wakes_a_worker_in_another_process(pg_url: str) -> None:
    from dicom_node.storage.postgres import PostgresJobQueue

    worker = PostgresJobQueue(pg_url, poll_s=60)  # no polling to speak of: only NOTIFY can wake it in time
    receiver = PostgresJobQueue(pg_url)
    try:
        worker.wait_for_work(0.1)  # starts listening
        assert wait_until(lambda: worker._listener.listening, 10.0, poll_s=0.05)
        threading.Timer(0.3, lambda: receiver.add(KEYS[0])).start()
        started = time.monotonic()
        assert worker.wait_for_work(30.0) is True
        assert time.monotonic() - started < 5.0
    finally:
        worker.close()
        receiver.close()


@needs_postgres()
def test_one_sender_per_destination(pg_url: str) -> None:
    from dicom_node.storage.postgres import PostgresOutbox

    first, second = PostgresOutbox(pg_url, lease_s=1.0), PostgresOutbox(pg_url, lease_s=1.0)
    try:
        item_id = first.enqueue("hl7", "ris:2575", "MSG1", b"MSH|...")
        assert first.due("hl7", "ris:2575").id == item_id  # type: ignore[union-attr]
        assert second.due("hl7", "ris:2575") is None  # the first sender holds the destination
        assert second.head("hl7", "ris:2575").id == item_id  # type: ignore[union-attr]
        assert second.due("hl7", "other:1") is None  # nothing there
        time.sleep(1.5)  # the first sender stopped calling: its lease runs out
        assert second.due("hl7", "ris:2575").id == item_id  # type: ignore[union-attr]
        assert first.due("hl7", "ris:2575") is None
        second.close()  # a sender that stops hands the destination back at once
        assert first.due("hl7", "ris:2575").id == item_id  # type: ignore[union-attr]
    finally:
        first.close()
        second.close()


@needs_postgres()
def test_schema_is_created_versioned_and_migrated_once(pg_url: str) -> None:
    from dicom_node.storage.postgres import SCHEMA_TABLE, SCHEMA_VERSION, PostgresJobQueue, migrate

    with pytest.raises(StorageNotFound):
        PostgresJobQueue(pg_url, create=False)
    errors: list[BaseException] = []

    def open_close() -> None:
        try:
            PostgresJobQueue(pg_url).close()
        except BaseException as exc:  # noqa: BLE001 (collected for the assertion below)
            errors.append(exc)

    threads = [threading.Thread(target=open_close) for _ in range(4)]  # nodes starting together
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    with psycopg.connect(pg_url) as conn:
        versions = conn.execute(f"SELECT version FROM {SCHEMA_TABLE} ORDER BY version").fetchall()
        assert versions == [(v,) for v in range(1, SCHEMA_VERSION + 1)]
        conn.execute(f"INSERT INTO {SCHEMA_TABLE} (version) VALUES ({SCHEMA_VERSION + 1})")
    from dicom_node.storage.postgres import _Database

    db = _Database(pg_url)
    try:
        with pytest.raises(StorageError, match="newer than this node"):
            migrate(db)
    finally:
        db.close()


@needs_postgres()
def test_a_version_1_database_is_migrated(pg_url: str) -> None:
    """A database a node of schema version 1 made (payloads compressed in the row) is brought to the current
    version at start, its items kept."""
    from dicom_node.storage.postgres import _MIGRATIONS, SCHEMA_TABLE, SCHEMA_VERSION, PostgresOutbox

    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {SCHEMA_TABLE} (version integer PRIMARY KEY, applied_at timestamptz NOT NULL"
                     " DEFAULT now())")
        conn.execute(_MIGRATIONS[0])  # type: ignore[arg-type]
        conn.execute(f"INSERT INTO {SCHEMA_TABLE} (version) VALUES (1)")
        conn.execute("INSERT INTO outbox (channel, destination, dedup_key, payload, next_attempt_at, created_at,"
                     " updated_at) VALUES ('hl7', 'ris:2575', 'MSG1', 'MSH|old', 0, 0, 0)")
    box = PostgresOutbox(pg_url)
    try:
        head = box.head("hl7", "ris:2575")
        assert head is not None and head.payload == b"MSH|old"
    finally:
        box.close()
    with psycopg.connect(pg_url) as conn:
        assert conn.execute(f"SELECT max(version) FROM {SCHEMA_TABLE}").fetchone() == (SCHEMA_VERSION,)
        assert SCHEMA_VERSION >= 2
        storage = conn.execute("SELECT attstorage FROM pg_attribute WHERE attrelid = 'outbox'::regclass"
                               " AND attname = 'payload'").fetchone()
        assert storage == ("e",)  # external: stored as it is, not compressed


@needs_postgres()
def test_head_sends_a_payload_once_per_version(pg_url: str) -> None:
    from dicom_node.storage.postgres import PostgresOutbox

    box = PostgresOutbox(pg_url)
    try:
        item_id = box.enqueue("dicom", "PACS@h:1", "sc", b"first" * 1000)
        first = box.head("dicom", "PACS@h:1")
        assert first is not None and first.payload == b"first" * 1000
        with psycopg.connect(pg_url, autocommit=True) as conn:  # what the cached head must not hide
            conn.execute("UPDATE outbox SET attempts = 7 WHERE id = %s", (item_id,))
        again = box.head("dicom", "PACS@h:1")
        assert again is not None and again.payload is first.payload and again.attempts == 7
        box.mark_done(item_id)
        assert box.head("dicom", "PACS@h:1") is None
        assert box.enqueue("dicom", "PACS@h:1", "sc", b"second", resend=True) == item_id
        resent = box.head("dicom", "PACS@h:1")
        assert resent is not None and (resent.id, resent.payload, resent.attempts) == (item_id, b"second", 0)
    finally:
        box.close()


@needs_postgres()
def test_payloads_live_in_the_shared_spool_and_names_in_the_database(pg_url: str, tmp_path: Path) -> None:
    import hashlib

    box = open_outbox_store(StorageSettings(url=pg_url), tmp_path / "spool")
    other_node = open_outbox_store(StorageSettings(url=pg_url), tmp_path / "spool")  # same spool, another process
    try:
        payload = bytes(range(256)) * 4096
        key = hashlib.sha256(payload).hexdigest()
        first = box.enqueue("dicom", "PACS@a:1", "sc-1", payload)
        box.enqueue("dicom", "ARCHIVE@b:2", "sc-1", payload)  # the same bytes to a second destination: one file
        assert [p.name for p in (tmp_path / "spool" / "outbox").rglob("*") if p.is_file()] == [key]
        with psycopg.connect(pg_url) as conn:
            rows = conn.execute("SELECT payload IS NULL, payload_key FROM outbox ORDER BY id").fetchall()
        assert rows == [(True, key), (True, key)]
        head = other_node.head("dicom", "PACS@a:1")
        assert head is not None and (head.id, head.payload) == (first, payload)
        (tmp_path / "spool" / "outbox" / key[:2] / key).unlink()
        with pytest.raises(StorageError, match="missing"):
            other_node.get(first)
    finally:
        box.close()
        other_node.close()


@needs_postgres()
def test_states_are_enforced_by_the_database(pg_url: str) -> None:
    q = open_job_store(StorageSettings(url=pg_url), "/nonexistent")
    try:
        q.add(KEYS[0])
        with psycopg.connect(pg_url) as conn, pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("UPDATE jobs SET state = 'bogus'")
    finally:
        q.close()


@needs_postgres()
def test_status_lists_the_processes_seen(pg_url: str, tmp_path: Path) -> None:
    from dicom_node.storage.postgres import nodes_seen

    settings = Settings(node=NodeSettings(spool_dir=tmp_path), storage=StorageSettings(url=pg_url))
    jobs, outbox = open_storage(settings, role="ingest")
    try:
        assert wait_until(lambda: [(n.role, n.pid) for n in nodes_seen(pg_url)] == [("ingest", os.getpid())], 10.0)
        (seen,) = nodes_seen(pg_url)
        assert seen.ae_title == settings.node.ae_title and seen.seen_at >= seen.started_at
        job_id, _ = jobs.add(KEYS[0])
        jobs.claim_batch(1)
        jobs.fail(job_id, "DecodeError: corrupt")
        outbox.park(outbox.enqueue("dicom", "PACS@h:1", "sc", b"x"), "0xA900 refused")
        report = collect_status(tmp_path, storage=settings.storage)
        assert report["jobs"]["failed"] == 1 and report["outbox"]["dicom"]["parked"] == 1
        assert [(n["role"], n["pid"]) for n in report["nodes"]] == [("ingest", os.getpid())]
        text = format_status(report)
        assert "Processes seen" in text and f"ingest  {seen.host}:{os.getpid()}" in text
        assert "0xA900 refused" in text and "DecodeError: corrupt" in text
    finally:
        jobs.close()
        outbox.close()


def test_storage_url_setting_and_redaction(tmp_path: Path) -> None:
    assert load_settings(None).storage.url == ""
    assert not is_postgres("") and not is_postgres("sqlite") and is_postgres("postgresql://h/db")
    cfg = tmp_path / "c.toml"
    cfg.write_text('[storage]\nurl = "mysql://h/db"\n')
    with pytest.raises(Exception, match="storage.url"):
        load_settings(cfg)
    assert redacted("postgresql://cxr:s3cret@db:5432/cxr") == "postgresql://cxr:***@db:5432/cxr"
    assert redacted("postgresql://cxr@db/cxr") == "postgresql://cxr@db/cxr"
    jobs, outbox = open_storage(Settings(node=NodeSettings(spool_dir=tmp_path / "spool")))
    try:
        assert isinstance(jobs, JobQueue) and isinstance(outbox, Outbox)
        assert (tmp_path / "spool" / "jobs.sqlite").exists() and (tmp_path / "spool" / "outbox.sqlite").exists()
    finally:
        jobs.close()
        outbox.close()
    with pytest.raises(StorageNotFound):
        open_job_store(StorageSettings(), tmp_path / "typo", create=False)
    assert not (tmp_path / "typo").exists()


@needs_postgres()
def test_status_of_an_empty_database_creates_nothing(pg_url: str) -> None:
    report = collect_status("/nonexistent", storage=StorageSettings(url=pg_url))
    assert report["jobs"]["pending"] == 0 and report["nodes"] == [] and report["problems"] == []
    assert "cxr_lens_test@127.0.0.1" in format_status(report)
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT to_regclass('cxr_lens_schema')").fetchone() == (None,)


@pytest.fixture
def own_cluster() -> Iterator[PostgresCluster]:
    """A cluster of this test's own, which it stops and starts."""
    cluster = start_postgres()
    yield cluster
    cluster.remove()


@needs_postgres()
def test_database_outage_refuses_c_store_then_recovers_by_itself(own_cluster: PostgresCluster,
                                                                  tmp_path: Path) -> None:
    """While PostgreSQL is down, C-STORE answers 0xA700 (never Success); once it is back, the same store works."""
    url = own_cluster.database()
    queue = open_job_store(StorageSettings(url=url), tmp_path)
    scp = StorageSCP(NodeSettings(ae_title="CXRLENS", host="127.0.0.1", port=0, free_disk_floor_mb=0),
                     Spool(tmp_path / "spool"), queue)
    scp.start()
    source = dcmread(sample("RG1_UNCR.dcm"))

    def c_store() -> int:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(source.SOPClassUID, source.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", scp.port, ae_title="CXRLENS")
        assert assoc.is_established
        try:
            return int(assoc.send_c_store(source).Status)
        finally:
            assoc.release()

    try:
        assert queue.pending_count() == 0
        own_cluster.stop("immediate")
        assert c_store() == 0xA700
        with pytest.raises(StorageError):
            queue.pending_count()
        own_cluster.start()
        assert c_store() == 0x0000
        assert queue.counts()["pending"] == 1
    finally:
        scp.stop()
        queue.close()


def test_roles_start_only_their_parts(backend: Backend, tmp_path: Path) -> None:
    """An ingest node receives into the shared store and runs no worker or sender; a sender node only delivers."""
    from dicom_node.node import compose

    settings = Settings(node=NodeSettings(ae_title="CXRLENS", host="127.0.0.1", port=0, http_port=0,
                                          spool_dir=backend.spool_dir, free_disk_floor_mb=0),
                        storage=backend.storage)
    ingest = compose(settings, role="ingest")  # no processor given: an ingest node loads no model
    with ingest:
        health = ingest.health()
        assert set(health["components"]) == {"scp"} and health["ok"] and health["model_ready"] is None
        source = dcmread(sample("RG1_UNCR.dcm"))
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(source.SOPClassUID, source.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", ingest.scp_port, ae_title="CXRLENS")
        assert assoc.is_established
        assert int(assoc.send_c_store(source).Status) == 0x0000
        assoc.release()
    queue = backend.jobs()
    assert queue.counts()["pending"] == 1  # left for a worker: nothing claimed it
    sender = compose(settings.model_copy(update={"hl7": settings.hl7.model_copy(update={"enabled": False})}),
                     role="sender")
    with sender:
        assert set(sender.health()["components"]) == {"dicom_sender"}
        assert not sender.scp.running
    with pytest.raises(ValueError, match="role"):
        compose(settings, role="everything")


class _PassThroughStages:
    """Worker stages without a model: each job's output is a small SC of its own, queued for the PACS."""

    def __init__(self, sender: DicomSender) -> None:
        self.sender = sender

    def prepare(self, job: Job, data: bytes | memoryview) -> bytes:
        return bytes(data)  # the worker may hand over a view of the spooled file

    def infer(self, items: Sequence[bytes]) -> list[bytes]:
        return list(items)

    def finish(self, job: Job, item: bytes, result: bytes) -> JobOutcome:
        self.sender.enqueue(fake_secondary_capture(item), dedup_key=job.spool_key)
        return JobOutcome(job.id, JobState.DONE)


OUTAGE_S = 30.0  # the outage: PostgreSQL killed for 30 s while images arrive


@needs_postgres()
def test_ingest_and_worker_ride_out_a_database_outage(own_cluster: PostgresCluster, tmp_path: Path,
                                                      sink: DicomSink) -> None:
    """PostgreSQL stopped while an ingest node and a worker node run: C-STORE answers 0xA700, never Success; once
    the database is back, the same nodes take images again and process them all."""
    from dicom_node.node import Node

    url = own_cluster.database()
    settings = Settings(node=NodeSettings(ae_title="CXRLENS", host="127.0.0.1", port=0, http_port=0,
                                          spool_dir=tmp_path / "spool", free_disk_floor_mb=0),
                        worker=WorkerSettings(batch_size=2, batch_wait_ms=10), storage=StorageSettings(url=url))
    nodes = []
    for role in ("ingest", "worker"):  # as two processes would: stores of their own
        jobs, outbox = open_storage(settings, role=role)
        sender = DicomSender(outbox, (DestinationSettings(ae_title="PACS", host="127.0.0.1", port=sink.port),),
                             ae_title="CXRLENS", retry_initial_s=0.1, retry_max_s=0.5, timeout_s=10)
        nodes.append(Node(settings, stages=_PassThroughStages(sender), dicom_sender=sender, queue=jobs,
                          owned=(jobs, outbox), role=role))
    ingest, worker = nodes
    images = [make_cr_dataset(rows=64, cols=64, sop_uid=generate_uid()) for _ in range(6)]

    def c_store(ds: Dataset) -> int:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", ingest.scp_port, ae_title="CXRLENS")
        assert assoc.is_established
        try:
            return int(assoc.send_c_store(ds).Status)
        finally:
            assoc.release()

    def done() -> int:
        return int(worker.queue.counts()["done"])

    with ingest, worker:
        assert [c_store(ds) for ds in images[:2]] == [0, 0]
        assert wait_until(lambda: done() == 2, 30)
        own_cluster.stop("immediate")
        # Down for 30 s while images keep arriving: every C-STORE meanwhile is refused, never answered Success,
        # and the worker meets the outage in its loop.
        down_until = time.monotonic() + OUTAGE_S
        refused = []
        while time.monotonic() < down_until:
            refused.append(c_store(images[2]))
            time.sleep(5.0)
        assert len(refused) >= 5 and set(refused) == {0xA700}, refused
        own_cluster.start()
        assert [c_store(ds) for ds in images[2:]] == [0, 0, 0, 0]
        assert wait_until(lambda: done() == 6, 60), worker.health()
        assert ingest.health()["ok"] and worker.health()["ok"]
        assert worker.dicom_sender.outbox.counts() == {("dicom", "pending"): 6}  # no sender in these roles


@needs_postgres()
def test_a_sender_rides_out_a_database_outage(own_cluster: PostgresCluster, sink: DicomSink,
                                              tmp_path: Path) -> None:
    url = own_cluster.database()
    outbox = open_outbox_store(StorageSettings(url=url), tmp_path)
    sender = DicomSender(outbox, (DestinationSettings(ae_title="PACS", host="127.0.0.1", port=sink.port),),
                         ae_title="CXRLENS", retry_initial_s=0.1, retry_max_s=0.5, timeout_s=10, poll_s=0.1)
    stop = threading.Event()
    thread = threading.Thread(target=sender.run_forever, args=(stop,), daemon=True)
    thread.start()
    try:
        source = sample("RG1_UNCR.dcm").read_bytes()
        sender.enqueue(fake_secondary_capture(source), "sc-1")
        assert wait_until(lambda: len(sink.received) == 1, 30)
        own_cluster.stop("immediate")
        time.sleep(2.0)  # the sender meets the outage in its loop
        own_cluster.start()
        sender.enqueue(fake_secondary_capture(source), "sc-2")
        assert wait_until(lambda: len(sink.received) == 2, 30)
        assert thread.is_alive()
    finally:
        stop.set()
        sender.wake()
        thread.join(10)
        outbox.close()


def test_serve_takes_a_role() -> None:
    from dicom_node.cli import build_parser

    assert build_parser().parse_args(["serve"]).role == "all"
    assert build_parser().parse_args(["serve", "--role", "worker"]).role == "worker"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--role", "gpu"])
