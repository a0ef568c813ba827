"""Worker: batching (batch_size, batch_wait_ms), outcome recording, failures that never kill the thread."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from dicom_node.errors import DecodeError
from dicom_node.process.worker import JobOutcome, Worker
from dicom_node.storage.jobs import Job, JobQueue, JobState, jobs_path
from dicom_node.storage.spool import Spool
from tests.node_harness import wait_until as _wait_until


class FakePipeline:
    """A pure-numpy stand-in for the real process_batch: 'infers' the mean byte of each payload."""

    def __init__(self, *, fail_with: Exception | None = None, delay_s: float = 0.0) -> None:
        self.batches: list[list[int]] = []
        self.means: dict[int, float] = {}
        self.fail_with = fail_with
        self.delay_s = delay_s
        self.done = threading.Event()

    def __call__(self, items: list[tuple[Job, bytes]]) -> list[JobOutcome]:
        self.batches.append([job.id for job, _ in items])
        time.sleep(self.delay_s)
        if self.fail_with is not None:
            raise self.fail_with
        for job, data in items:
            self.means[job.id] = float(np.frombuffer(data, dtype=np.uint8).mean())
        self.done.set()
        return [JobOutcome(job.id, JobState.DONE) for job, _ in items]


@pytest.fixture
def parts(tmp_path: Path) -> Iterator[tuple[JobQueue, Spool]]:
    queue = JobQueue(jobs_path(tmp_path))
    yield queue, Spool(tmp_path)
    queue.close()


def add(queue: JobQueue, spool: Spool, i: int) -> int:
    return queue.add(spool.write(bytes([i % 256]) * 64))[0]


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    return _wait_until(predicate, timeout, poll_s=0.01)


def test_batches_are_capped_and_oldest_first(parts: tuple[JobQueue, Spool]) -> None:
    queue, spool = parts
    ids = [add(queue, spool, i) for i in range(5)]
    fake = FakePipeline()
    worker = Worker(queue, spool, fake, batch_size=2, batch_wait_ms=0)
    while worker.run_once():
        pass
    assert fake.batches == [ids[0:2], ids[2:4], ids[4:5]]
    assert fake.means[ids[3]] == 3.0
    assert queue.counts()["done"] == 5


def test_batch_waits_for_stragglers(parts: tuple[JobQueue, Spool]) -> None:
    queue, spool = parts
    fake = FakePipeline()
    worker = Worker(queue, spool, fake, batch_size=8, batch_wait_ms=400, idle_poll_s=0.05)
    worker.start()
    try:
        first = add(queue, spool, 1)
        time.sleep(0.1)
        later = [add(queue, spool, i) for i in (2, 3)]
        assert wait_until(lambda: queue.counts()["done"] == 3)
    finally:
        worker.stop()
    assert fake.batches == [[first, *later]]


def test_no_wait_processes_a_lone_job_at_once(parts: tuple[JobQueue, Spool]) -> None:
    queue, spool = parts
    fake = FakePipeline()
    worker = Worker(queue, spool, fake, batch_size=8, batch_wait_ms=0, idle_poll_s=0.05)
    worker.start()
    try:
        started = time.monotonic()
        add(queue, spool, 7)
        assert fake.done.wait(5)
        assert time.monotonic() - started < 1.0
    finally:
        worker.stop()
    assert len(fake.batches) == 1


def test_exception_fails_the_batch_without_phi_and_keeps_running(
    parts: tuple[JobQueue, Spool], caplog: pytest.LogCaptureFixture
) -> None:
    queue, spool = parts
    fake = FakePipeline(fail_with=ValueError("Doe^Jane 19700101"))
    worker = Worker(queue, spool, fake, batch_size=4, batch_wait_ms=0, idle_poll_s=0.05)
    caplog.set_level(logging.INFO, logger="dicom_node")
    worker.start()
    try:
        bad = add(queue, spool, 1)
        assert wait_until(lambda: queue.counts()["failed"] == 1)
        assert worker.alive
        fake.fail_with = None
        good = add(queue, spool, 2)
        assert wait_until(lambda: queue.counts()["done"] == 1)
    finally:
        worker.stop()
    failed = queue.get(bad)
    assert failed is not None and failed.reason == "ValueError"
    assert queue.get(good).state == JobState.DONE  # type: ignore[union-attr]
    assert "Doe^Jane" not in caplog.text and "19700101" not in caplog.text


def test_own_errors_keep_their_message(parts: tuple[JobQueue, Spool]) -> None:
    queue, spool = parts
    job_id = add(queue, spool, 1)
    Worker(queue, spool, FakePipeline(fail_with=DecodeError("JPEG-LS stream truncated")), batch_wait_ms=0).run_once()
    assert queue.get(job_id).reason == "DecodeError: JPEG-LS stream truncated"  # type: ignore[union-attr]


def test_outcomes_are_recorded_per_job(parts: tuple[JobQueue, Spool]) -> None:
    queue, spool = parts
    a, b, c, d = (add(queue, spool, i) for i in range(4))

    def process(items: list[tuple[Job, bytes]]) -> list[JobOutcome]:
        return [
            JobOutcome(a, JobState.DONE),
            JobOutcome(b, JobState.INELIGIBLE, rule="photometric", reason="colour image"),
            JobOutcome(c, JobState.FAILED, reason="AllZeroDecodeError: decoder returned zeros"),
            # no outcome for d
            JobOutcome(999, JobState.DONE),
        ]

    assert Worker(queue, spool, process, batch_size=10, batch_wait_ms=0).run_once() == 4
    states = {j: queue.get(j) for j in (a, b, c, d)}
    assert states[a].state == JobState.DONE  # type: ignore[union-attr]
    assert (states[b].state, states[b].rule) == (JobState.INELIGIBLE, "photometric")  # type: ignore[union-attr]
    assert states[c].reason == "AllZeroDecodeError: decoder returned zeros"  # type: ignore[union-attr]
    assert (states[d].state, states[d].reason) == (  # type: ignore[union-attr]
        JobState.FAILED, "process_batch returned no outcome"
    )


def test_missing_spool_file_fails_only_that_job(parts: tuple[JobQueue, Spool]) -> None:
    queue, spool = parts
    ok = add(queue, spool, 1)
    lost, _ = queue.add("9" * 64)
    fake = FakePipeline()
    Worker(queue, spool, fake, batch_wait_ms=0).run_once()
    assert fake.batches == [[ok]]
    assert queue.get(lost).reason == "SpoolError: spool file 999999999999 is missing"  # type: ignore[union-attr]


def test_worker_resumes_jobs_interrupted_by_a_crash(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    queue = JobQueue(jobs_path(tmp_path))
    job_id = add(queue, spool, 5)
    queue.claim_batch(1)  # claimed, then the process dies
    queue.close()

    queue = JobQueue(jobs_path(tmp_path))
    queue.requeue_processing()
    fake = FakePipeline()
    Worker(queue, spool, fake, batch_wait_ms=0).run_once()
    assert fake.batches == [[job_id]]
    job = queue.get(job_id)
    assert job is not None and job.state == JobState.DONE and job.attempts == 2
    queue.close()


def test_stop_finishes_the_batch_in_hand(parts: tuple[JobQueue, Spool]) -> None:
    queue, spool = parts
    fake = FakePipeline(delay_s=0.3)
    worker = Worker(queue, spool, fake, batch_wait_ms=0, idle_poll_s=0.05)
    worker.start()
    add(queue, spool, 1)
    assert wait_until(lambda: len(fake.batches) == 1)
    worker.stop()
    assert queue.counts()["done"] == 1
    assert not worker.alive
