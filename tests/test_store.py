"""Spool (content-addressed, durable) and JobQueue (SQLite WAL) round trips."""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from pathlib import Path

import pytest

from dicom_node.storage.jobs import JobQueue, JobState, jobs_path
from dicom_node.storage.spool import Spool, SpoolError


def test_spool_key_is_content_hash_and_round_trips(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    data = b"\x00" * 128 + b"DICM" + b"payload"
    key = spool.write(data)
    assert key == hashlib.sha256(data).hexdigest()
    assert spool.read(key) == data
    assert spool.path(key) == tmp_path / "instances" / key[:2] / f"{key}.dcm"
    assert spool.write(data) == key  # idempotent
    leftovers = [p for p in (tmp_path / "instances").rglob("*") if p.is_file() and p.suffix != ".dcm"]
    assert leftovers == []


@pytest.mark.parametrize("bad", ["../../etc/passwd", "1.2.840.10008.1.2", "A" * 64, ""])
def test_spool_rejects_keys_that_are_not_hashes(tmp_path: Path, bad: str) -> None:
    with pytest.raises(SpoolError):
        Spool(tmp_path).path(bad)


def test_spool_read_missing_raises_spool_error(tmp_path: Path) -> None:
    with pytest.raises(SpoolError):
        Spool(tmp_path).read("0" * 64)


def test_queue_add_is_idempotent_per_content(tmp_path: Path) -> None:
    q = JobQueue(jobs_path(tmp_path))
    first = q.add("a" * 64, calling_ae="PACS")
    again = q.add("a" * 64, calling_ae="PACS")
    other = q.add("b" * 64)
    assert first == (first[0], True)
    assert again == (first[0], False)
    assert other[1] is True and other[0] != first[0]
    assert q.counts()["pending"] == 2


def test_claim_batch_oldest_first_and_limited(tmp_path: Path) -> None:
    q = JobQueue(tmp_path / "jobs.sqlite")
    ids = [q.add(f"{i:064x}")[0] for i in range(5)]
    batch = q.claim_batch(3)
    assert [j.id for j in batch] == ids[:3]
    assert all(j.state == JobState.PROCESSING and j.attempts == 1 for j in batch)
    assert [j.id for j in q.claim_batch(10)] == ids[3:]
    assert q.claim_batch(10) == []
    assert q.counts() == {"pending": 0, "processing": 5, "done": 0, "failed": 0, "ineligible": 0}


def test_final_states_and_recent_failures(tmp_path: Path) -> None:
    q = JobQueue(tmp_path / "jobs.sqlite")
    a, b, c = (q.add(f"{i:064x}")[0] for i in range(3))
    q.claim_batch(3)
    q.complete(a)
    q.fail(b, "DecodeError: corrupt J2K stream")
    q.mark_ineligible(c, "modality", "not a radiograph")
    assert q.counts() == {"pending": 0, "processing": 0, "done": 1, "failed": 1, "ineligible": 1}
    (failure,) = q.recent_failures(5)
    assert (failure.id, failure.reason) == (b, "DecodeError: corrupt J2K stream")
    job_c = q.get(c)
    assert job_c is not None and (job_c.state, job_c.rule) == (JobState.INELIGIBLE, "modality")


def test_failed_job_is_requeued_when_received_again(tmp_path: Path) -> None:
    q = JobQueue(tmp_path / "jobs.sqlite")
    job_id, _ = q.add("c" * 64)
    q.claim_batch(1)
    q.fail(job_id, "boom")
    assert q.add("c" * 64) == (job_id, True)
    job = q.get(job_id)
    assert job is not None and job.state == JobState.PENDING and job.reason is None


def test_restart_requeues_processing_jobs(tmp_path: Path) -> None:
    q = JobQueue(tmp_path / "jobs.sqlite")
    done, interrupted = q.add("d" * 64)[0], q.add("e" * 64)[0]
    q.claim_batch(2)
    q.complete(done)
    q.close()  # the process "crashes" with job `interrupted` in processing

    q2 = JobQueue(tmp_path / "jobs.sqlite")
    assert q2.requeue_processing() == 1
    assert [j.id for j in q2.claim_batch(5)] == [interrupted]


def test_requeue_gives_up_on_a_job_that_keeps_crashing(tmp_path: Path) -> None:
    q = JobQueue(tmp_path / "jobs.sqlite")
    job_id, _ = q.add("f" * 64)
    for _ in range(3):
        q.claim_batch(1)
        q.requeue_processing(max_attempts=3)
    job = q.get(job_id)
    assert job is not None and job.state == JobState.FAILED and "interrupted 3 times" in (job.reason or "")


def test_queue_uses_wal_and_enforces_states(tmp_path: Path) -> None:
    q = JobQueue(tmp_path / "jobs.sqlite")
    q.add("1" * 64)
    db = sqlite3.connect(tmp_path / "jobs.sqlite")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with pytest.raises(sqlite3.IntegrityError):
        db.execute("UPDATE jobs SET state='bogus'")
    db.close()


def test_wait_for_work_wakes_on_add(tmp_path: Path) -> None:
    q = JobQueue(tmp_path / "jobs.sqlite")
    assert q.wait_for_work(0.01) is False
    threading.Timer(0.05, lambda: q.add("2" * 64)).start()
    assert q.wait_for_work(5.0) is True
