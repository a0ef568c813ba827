"""The pipelined worker: stages overlap, every job gets exactly one outcome, failures stay local."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from dicom_node.process.stages import StagedWorker
from dicom_node.process.worker import JobOutcome
from dicom_node.storage.jobs import Job, JobQueue, JobState
from dicom_node.storage.spool import Spool


@pytest.fixture
def store(tmp_path: Path) -> Iterator[tuple[JobQueue, Spool]]:
    queue = JobQueue(tmp_path / "jobs.sqlite")
    yield queue, Spool(tmp_path / "spool")
    queue.close()


def _add(queue: JobQueue, spool: Spool, payloads: Sequence[bytes]) -> list[int]:
    return [queue.add(spool.write(p))[0] for p in payloads]


def _wait_final(queue: JobQueue, ids: Sequence[int], timeout: float = 20.0) -> dict[int, Job]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = {i: queue.get(i) for i in ids}
        if all(j is not None and j.state in (JobState.DONE, JobState.FAILED, JobState.INELIGIBLE)
               for j in jobs.values()):
            return jobs  # type: ignore[return-value]
        time.sleep(0.02)
    raise AssertionError(f"jobs not final: { {i: queue.get(i) for i in ids} }")


class Recorder:
    """Stages that record what ran where, with optional failures and a gate to prove overlap."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: list[tuple[str, Any]] = []
        self.infer_sizes: list[int] = []
        self.threads: dict[str, set[str]] = {"prepare": set(), "infer": set(), "finish": set()}

    def _note(self, stage: str, what: Any) -> None:
        with self.lock:
            self.events.append((stage, what))
            self.threads[stage].add(threading.current_thread().name)

    def prepare(self, job: Job, data: bytes) -> Any:
        self._note("prepare", data)
        if data.startswith(b"ineligible"):
            return JobOutcome(job.id, JobState.INELIGIBLE, rule="test", reason="marked ineligible")
        if data.startswith(b"bad-prepare"):
            raise ValueError("cannot parse")
        return data

    def infer(self, items: Sequence[Any]) -> Sequence[Any]:
        self._note("infer", list(items))
        self.infer_sizes.append(len(items))
        if any(i.startswith(b"bad-infer") for i in items):
            raise RuntimeError("model failed")
        return [i.upper() for i in items]

    def finish(self, job: Job, item: Any, result: Any) -> JobOutcome:
        self._note("finish", result)
        if item.startswith(b"bad-finish"):
            raise OSError("disk full")
        return JobOutcome(job.id, JobState.DONE)


def test_every_job_gets_one_outcome_and_failures_stay_local(store: tuple[JobQueue, Spool]) -> None:
    queue, spool = store
    stages = Recorder()
    payloads = [b"ok-1", b"bad-prepare", b"ok-2", b"ineligible", b"bad-finish", b"ok-3"]
    ids = _add(queue, spool, payloads)
    worker = StagedWorker(queue, spool, stages, batch_size=8, batch_wait_ms=0)
    worker.start()
    try:
        jobs = _wait_final(queue, ids)
    finally:
        worker.stop()
    states = {p: jobs[i].state for p, i in zip(payloads, ids)}
    assert states == {b"ok-1": JobState.DONE, b"bad-prepare": JobState.FAILED, b"ok-2": JobState.DONE,
                      b"ineligible": JobState.INELIGIBLE, b"bad-finish": JobState.FAILED, b"ok-3": JobState.DONE}
    assert jobs[ids[1]].reason == "ValueError" and jobs[ids[4]].reason == "OSError"
    # Stages ran on their own threads: decode pool, one model thread, output pool.
    assert stages.threads["infer"] == {"cxr-lens-model"}
    assert all(n.startswith("cxr-lens-decode") for n in stages.threads["prepare"])
    assert all(n.startswith("cxr-lens-output") for n in stages.threads["finish"])


def test_a_failing_model_pass_fails_only_its_batch(store: tuple[JobQueue, Spool]) -> None:
    queue, spool = store
    stages = Recorder()
    first = _add(queue, spool, [b"bad-infer", b"ok-a"])  # queued before the worker starts: one batch
    worker = StagedWorker(queue, spool, stages, batch_size=2, batch_wait_ms=0)
    worker.start()
    try:
        _wait_final(queue, first)
        second = _add(queue, spool, [b"ok-b"])
        jobs = _wait_final(queue, first + second)
    finally:
        worker.stop()
    assert [jobs[i].state for i in first] == [JobState.FAILED, JobState.FAILED]
    assert jobs[first[0]].reason == "RuntimeError"
    assert jobs[second[0]].state == JobState.DONE
    assert worker.alive is False  # stopped


def test_the_next_batch_is_decoded_while_the_model_runs(store: tuple[JobQueue, Spool]) -> None:
    queue, spool = store
    model_running = threading.Event()
    release_model = threading.Event()
    prepared_during_model: list[bytes] = []

    class Gated(Recorder):
        def prepare(self, job: Job, data: bytes) -> Any:
            if model_running.is_set() and not release_model.is_set():
                prepared_during_model.append(data)
                release_model.set()
            return super().prepare(job, data)

        def infer(self, items: Sequence[Any]) -> Sequence[Any]:
            if items[0] == b"first":
                model_running.set()
                assert release_model.wait(10), "the next batch was not prepared while the model ran"
            return super().infer(items)

    stages = Gated()
    worker = StagedWorker(queue, spool, stages, batch_size=1, batch_wait_ms=0)
    worker.start()
    try:
        first = _add(queue, spool, [b"first"])
        assert model_running.wait(10)
        second = _add(queue, spool, [b"second"])
        jobs = _wait_final(queue, first + second)
    finally:
        worker.stop()
    assert prepared_during_model == [b"second"]
    assert all(j.state == JobState.DONE for j in jobs.values())


def test_jobs_arriving_together_share_a_batch_and_batches_are_capped(store: tuple[JobQueue, Spool]) -> None:
    queue, spool = store
    stages = Recorder()
    ids = _add(queue, spool, [f"img-{i}".encode() for i in range(10)])
    worker = StagedWorker(queue, spool, stages, batch_size=4, batch_wait_ms=200)
    worker.start()
    try:
        _wait_final(queue, ids)
    finally:
        worker.stop()
    assert stages.infer_sizes == [4, 4, 2]


def test_stop_leaves_unfinished_jobs_to_be_requeued(store: tuple[JobQueue, Spool]) -> None:
    queue, spool = store
    release = threading.Event()

    class Slow(Recorder):
        def infer(self, items: Sequence[Any]) -> Sequence[Any]:
            release.wait(0.5)
            return super().infer(items)

    ids = _add(queue, spool, [f"img-{i}".encode() for i in range(6)])
    worker = StagedWorker(queue, spool, Slow(), batch_size=2, batch_wait_ms=0)
    worker.start()
    time.sleep(0.2)
    worker.stop(timeout=10)
    counts = queue.counts()
    assert counts.get("done", 0) + counts.get("processing", 0) + counts.get("pending", 0) == 6
    queue.requeue_processing()
    worker = StagedWorker(queue, spool, Recorder(), batch_size=8, batch_wait_ms=0)
    worker.start()
    try:
        jobs = _wait_final(queue, ids)
    finally:
        worker.stop()
    assert all(j.state == JobState.DONE for j in jobs.values())


def test_jobs_claimed_ahead_do_not_count_an_attempt_until_their_preparation_starts(
    store: tuple[JobQueue, Spool],
) -> None:
    """Three interruptions fail a job only if work on it had started each time (a crash loop), not jobs that
    merely waited in a claimed batch."""
    queue, spool = store
    gate = threading.Event()

    class Stuck(Recorder):
        def prepare(self, job: Job, data: bytes) -> Any:
            gate.wait(10)  # the one decode thread is stuck on the first job
            return super().prepare(job, data)

    ids = _add(queue, spool, [f"img-{i}".encode() for i in range(12)])
    worker = StagedWorker(queue, spool, Stuck(), batch_size=2, batch_wait_ms=0, decode_threads=1)
    worker.start()
    deadline = time.monotonic() + 10
    while queue.counts()["processing"] < 4 and time.monotonic() < deadline:  # claimed ahead while stuck
        time.sleep(0.02)
    time.sleep(0.1)
    attempts = [queue.get(i).attempts for i in ids]  # type: ignore[union-attr]
    gate.set()
    worker.stop()
    assert attempts[0] == 1  # its preparation started
    assert sum(attempts) == 1, attempts  # the other claimed jobs waited: no attempt counted


@pytest.mark.parametrize("fails", [False, True], ids=["ok", "failing"])
def test_warm_up_runs_before_the_first_claim_and_a_failing_one_does_not_stop_the_worker(
    store: tuple[JobQueue, Spool], fails: bool
) -> None:
    queue, spool = store
    stages = Recorder()
    release = threading.Event()
    claims_during_warm_up: list[int] = []

    def warm_up(should_stop: Callable[[], bool]) -> None:
        assert not should_stop()
        release.wait(5)
        claims_during_warm_up.append(queue.counts().get("processing", 0))
        if fails:
            raise RuntimeError("no")

    ids = _add(queue, spool, [b"ok-1", b"ok-2"])
    worker = StagedWorker(queue, spool, stages, batch_size=4, batch_wait_ms=0, warm_up=warm_up)
    worker.start()
    try:
        time.sleep(0.3)
        assert queue.counts().get("pending", 0) == 2  # nothing claimed while warming up
        release.set()
        jobs = _wait_final(queue, ids)
    finally:
        worker.stop()
    assert claims_during_warm_up == [0]
    assert all(jobs[i].state is JobState.DONE for i in ids)


def test_model_ready_is_set_after_the_warm_up_and_at_once_without_one(store: tuple[JobQueue, Spool]) -> None:
    queue, spool = store
    release = threading.Event()
    worker = StagedWorker(queue, spool, Recorder(), batch_size=2, warm_up=lambda _: release.wait(5) and None)
    plain = StagedWorker(queue, spool, Recorder(), batch_size=2)
    worker.start()
    plain.start()
    try:
        assert plain.model_ready.wait(2)
        assert not worker.model_ready.wait(0.3)
        release.set()
        assert worker.model_ready.wait(5)
    finally:
        worker.stop()
        plain.stop()


def test_stop_during_the_warm_up_ends_it_and_claims_nothing(store: tuple[JobQueue, Spool]) -> None:
    queue, spool = store
    traced: list[int] = []

    def warm_up(should_stop: Callable[[], bool]) -> None:  # like explain.warm_up: asks before each bucket
        for bucket in (1, 2, 4, 8, 16):
            if should_stop():
                return
            traced.append(bucket)
            time.sleep(0.2)

    ids = _add(queue, spool, [b"ok-1"])
    worker = StagedWorker(queue, spool, Recorder(), batch_size=16, batch_wait_ms=0, warm_up=warm_up)
    worker.start()
    time.sleep(0.3)
    started = time.monotonic()
    worker.stop(timeout=5)
    assert time.monotonic() - started < 1.0
    assert 1 <= len(traced) < 5
    assert worker.model_ready.is_set()
    assert queue.get(ids[0]).state is JobState.PENDING  # left for the next start
