"""Worker: batching (batch_size, batch_wait_ms), overlapping stages, one outcome per job, failures that stay local,
attempts, warm-up and stop."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from typing_extensions import Buffer

from dicom_node.errors import DecodeError
from dicom_node.peers.node_process import wait_until as _wait_until
from dicom_node.process.worker import JobOutcome, Worker
from dicom_node.storage.jobs import Job, JobQueue, JobState, jobs_path
from dicom_node.storage.spool import Spool


@pytest.fixture
def store(tmp_path: Path) -> Iterator[tuple[JobQueue, Spool]]:
    queue = JobQueue(jobs_path(tmp_path))
    yield queue, Spool(tmp_path)
    queue.close()


def _add(queue: JobQueue, spool: Spool, payloads: Sequence[bytes]) -> list[int]:
    return [queue.add(spool.write(p))[0] for p in payloads]


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    return _wait_until(predicate, timeout, poll_s=0.01)


def _wait_final(queue: JobQueue, ids: Sequence[int], timeout: float = 20.0) -> dict[int, Job]:
    final = (JobState.DONE, JobState.FAILED, JobState.INELIGIBLE)
    done = wait_until(lambda: all(j is not None and j.state in final for j in (queue.get(i) for i in ids)), timeout)
    jobs = {i: queue.get(i) for i in ids}
    assert done, f"jobs not final: {jobs}"
    return jobs  # type: ignore[return-value]


PHI = "Doe" + "^Jane " + "19700101"  # split, so that a traceback's source line cannot show it


@dataclass(frozen=True)
class Item:
    job_id: int
    data: bytes


class Recorder:
    """Stages that record what ran where, with failures chosen by the payload."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.prepared: list[bytes] = []
        self.batches: list[list[int]] = []  # job ids per model pass
        self.results: dict[int, bytes] = {}
        self.threads: dict[str, set[str]] = {"prepare": set(), "infer": set(), "finish": set()}

    def _note(self, stage: str) -> None:
        with self.lock:
            self.threads[stage].add(threading.current_thread().name)

    def prepare(self, job: Job, data: Buffer) -> Any:
        data = bytes(data)  # the worker hands over a view of the spooled file
        self._note("prepare")
        with self.lock:
            self.prepared.append(data)
        if data.startswith(b"ineligible"):
            return JobOutcome(job.id, JobState.INELIGIBLE, rule="test", reason="marked ineligible")
        if data.startswith(b"bad-prepare"):
            raise ValueError("cannot parse")
        return Item(job.id, data)

    def infer(self, items: Sequence[Item]) -> Sequence[Any]:
        self._note("infer")
        self.batches.append([i.job_id for i in items])
        if any(i.data.startswith(b"bad-infer") for i in items):
            raise RuntimeError("model failed")
        return [i.data.upper() for i in items]

    def finish(self, job: Job, item: Item, result: Any) -> JobOutcome:
        self._note("finish")
        if item.data.startswith(b"bad-finish"):
            raise OSError("disk full")
        with self.lock:
            self.results[job.id] = result
        return JobOutcome(job.id, JobState.DONE)


def _run(queue: JobQueue, spool: Spool, stages: Any, ids: Sequence[int], **kwargs: Any) -> dict[int, Job]:
    worker = Worker(queue, spool, stages, **{"batch_wait_ms": 0, "idle_poll_s": 0.05, **kwargs})
    worker.start()
    try:
        return _wait_final(queue, ids)
    finally:
        worker.stop()


# Batching.
def test_batches_are_capped_and_oldest_first(store: tuple[JobQueue, Spool]) -> None:
    queue, spool = store
    ids = _add(queue, spool, [f"img-{i}".encode() for i in range(5)])
    stages = Recorder()
    jobs = _run(queue, spool, stages, ids, batch_size=2)
    assert stages.batches == [ids[0:2], ids[2:4], ids[4:5]]
    assert stages.results[ids[3]] == b"IMG-3"  # the spooled bytes went through every stage
    assert all(j.state == JobState.DONE for j in jobs.values())


def test_jobs_arriving_together_share_a_batch_and_batches_are_capped(store: tuple[JobQueue, Spool]) -> None:
    queue, spool = store
    stages = Recorder()
    ids = _add(queue, spool, [f"img-{i}".encode() for i in range(10)])
    _run(queue, spool, stages, ids, batch_size=4, batch_wait_ms=200)
    assert [len(b) for b in stages.batches] == [4, 4, 2]


def test_batch_waits_for_stragglers(store: tuple[JobQueue, Spool]) -> None:
    queue, spool = store
    stages = Recorder()
    worker = Worker(queue, spool, stages, batch_size=8, batch_wait_ms=400, idle_poll_s=0.05)
    worker.start()
    try:
        first = _add(queue, spool, [b"first"])
        time.sleep(0.1)
        later = _add(queue, spool, [b"second", b"third"])
        _wait_final(queue, first + later)
    finally:
        worker.stop()
    assert stages.batches == [first + later]


def test_no_wait_processes_a_lone_job_at_once(store: tuple[JobQueue, Spool]) -> None:
    queue, spool = store
    stages = Recorder()
    worker = Worker(queue, spool, stages, batch_size=8, batch_wait_ms=0, idle_poll_s=0.05)
    worker.start()
    try:
        started = time.monotonic()
        ids = _add(queue, spool, [b"lone"])
        _wait_final(queue, ids)
        assert time.monotonic() - started < 1.0
    finally:
        worker.stop()
    assert stages.batches == [ids]


# Outcomes and failures.
def test_every_job_gets_one_outcome_and_failures_stay_local(store: tuple[JobQueue, Spool]) -> None:
    queue, spool = store
    stages = Recorder()
    payloads = [b"ok-1", b"bad-prepare", b"ok-2", b"ineligible", b"bad-finish", b"ok-3"]
    ids = _add(queue, spool, payloads)
    jobs = _run(queue, spool, stages, ids, batch_size=8)
    states = {p: jobs[i].state for p, i in zip(payloads, ids, strict=True)}
    assert states == {b"ok-1": JobState.DONE, b"bad-prepare": JobState.FAILED, b"ok-2": JobState.DONE,
                      b"ineligible": JobState.INELIGIBLE, b"bad-finish": JobState.FAILED, b"ok-3": JobState.DONE}
    assert jobs[ids[1]].reason == "ValueError" and jobs[ids[4]].reason == "OSError"
    assert (jobs[ids[3]].rule, jobs[ids[3]].reason) == ("test", "marked ineligible")
    # Stages ran on their own threads: decode pool, one model thread, output pool.
    assert stages.threads["infer"] == {"cxr-lens-model"}
    assert all(n.startswith("cxr-lens-decode") for n in stages.threads["prepare"])
    assert all(n.startswith("cxr-lens-output") for n in stages.threads["finish"])


@pytest.mark.parametrize("stage", ["prepare", "infer", "finish"])
def test_an_exception_fails_its_jobs_without_phi_and_the_worker_goes_on(
    store: tuple[JobQueue, Spool], caplog: pytest.LogCaptureFixture, stage: str
) -> None:
    queue, spool = store
    failing = threading.Event()
    failing.set()

    class Failing(Recorder):
        def prepare(self, job: Job, data: Buffer) -> Any:
            data = bytes(data)  # the worker hands over a view of the spooled file
            if stage == "prepare" and failing.is_set():
                raise ValueError(PHI)  # a third-party message quoting the data set
            return super().prepare(job, data)

        def infer(self, items: Sequence[Item]) -> Sequence[Any]:
            if stage == "infer" and failing.is_set():
                raise ValueError(PHI)
            return super().infer(items)

        def finish(self, job: Job, item: Item, result: Any) -> JobOutcome:
            if stage == "finish" and failing.is_set():
                raise ValueError(PHI)
            return super().finish(job, item, result)

    caplog.set_level(logging.DEBUG, logger="dicom_node")  # the traceback at debug level too
    worker = Worker(queue, spool, Failing(), batch_size=4, batch_wait_ms=0, idle_poll_s=0.05)
    worker.start()
    try:
        bad = _add(queue, spool, [b"bad"])
        _wait_final(queue, bad)
        assert worker.alive
        failing.clear()
        good = _add(queue, spool, [b"good"])
        _wait_final(queue, good)
    finally:
        worker.stop()
    assert (queue.get(bad[0]).state, queue.get(bad[0]).reason) == (JobState.FAILED, "ValueError")  # type: ignore
    assert queue.get(good[0]).state == JobState.DONE  # type: ignore[union-attr]
    assert "ValueError" in caplog.text
    assert "Doe^Jane" not in caplog.text and "19700101" not in caplog.text


def test_own_errors_keep_their_message(store: tuple[JobQueue, Spool]) -> None:
    queue, spool = store

    class Truncated(Recorder):
        def prepare(self, job: Job, data: Buffer) -> Any:
            data = bytes(data)  # the worker hands over a view of the spooled file
            raise DecodeError("JPEG-LS stream truncated")

    ids = _add(queue, spool, [b"jls"])
    jobs = _run(queue, spool, Truncated(), ids)
    assert jobs[ids[0]].reason == "DecodeError: JPEG-LS stream truncated"


def test_a_failing_model_pass_fails_only_its_batch(store: tuple[JobQueue, Spool]) -> None:
    queue, spool = store
    stages = Recorder()
    first = _add(queue, spool, [b"bad-infer", b"ok-a"])  # queued before the worker starts: one batch
    worker = Worker(queue, spool, stages, batch_size=2, batch_wait_ms=0)
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


def test_outcomes_given_by_the_stages_are_recorded_and_invalid_ones_fail_their_job(
    store: tuple[JobQueue, Spool],
) -> None:
    queue, spool = store

    class Contract(Recorder):
        def prepare(self, job: Job, data: Buffer) -> Any:
            data = bytes(data)  # the worker hands over a view of the spooled file
            if data == b"all-zero":
                return JobOutcome(job.id, JobState.FAILED, reason="AllZeroDecodeError: decoder returned zeros")
            if data == b"not-final":
                return JobOutcome(job.id, JobState.PROCESSING)
            if data == b"someone-else":
                return JobOutcome(job.id + 1000, JobState.DONE)
            return super().prepare(job, data)

        def finish(self, job: Job, item: Item, result: Any) -> JobOutcome:
            if item.data == b"finish-pending":
                return JobOutcome(job.id, JobState.PENDING)
            return super().finish(job, item, result)

    payloads = [b"ok", b"ineligible", b"all-zero", b"not-final", b"someone-else", b"finish-pending"]
    ids = _add(queue, spool, payloads)
    jobs = _run(queue, spool, Contract(), ids, batch_size=10)
    got = {p: (jobs[i].state, jobs[i].rule, jobs[i].reason) for p, i in zip(payloads, ids, strict=True)}
    assert got[b"ok"] == (JobState.DONE, None, None)
    assert got[b"ineligible"] == (JobState.INELIGIBLE, "test", "marked ineligible")
    assert got[b"all-zero"] == (JobState.FAILED, None, "AllZeroDecodeError: decoder returned zeros")
    assert got[b"not-final"] == (JobState.FAILED, None, "StageContractError: invalid outcome state 'processing'")
    assert got[b"someone-else"] == (JobState.FAILED, None, f"StageContractError: outcome for job {ids[4] + 1000} "
                                                           f"returned for job {ids[4]}")
    assert got[b"finish-pending"] == (JobState.FAILED, None, "StageContractError: invalid outcome state 'pending'")
    assert queue.get(ids[4] + 1000) is None


def test_a_model_pass_with_too_few_results_fails_its_batch(store: tuple[JobQueue, Spool]) -> None:
    queue, spool = store

    class Short(Recorder):
        def infer(self, items: Sequence[Item]) -> Sequence[Any]:
            return list(super().infer(items))[:-1]

    ids = _add(queue, spool, [b"a", b"b"])
    jobs = _run(queue, spool, Short(), ids, batch_size=2)
    assert {(j.state, j.reason) for j in jobs.values()} == {
        (JobState.FAILED, "StageContractError: infer returned 1 results for 2 items")
    }


def test_missing_spool_file_fails_only_that_job(store: tuple[JobQueue, Spool]) -> None:
    queue, spool = store
    ok = _add(queue, spool, [b"ok"])[0]
    lost, _ = queue.add("9" * 64)
    stages = Recorder()
    jobs = _run(queue, spool, stages, [ok, lost])
    assert stages.prepared == [b"ok"]
    assert jobs[ok].state == JobState.DONE
    assert jobs[lost].reason == "SpoolError: spool file 999999999999 is missing"


# Overlap and pacing.
def test_the_next_batch_is_decoded_while_the_model_runs(store: tuple[JobQueue, Spool]) -> None:
    queue, spool = store
    model_running = threading.Event()
    release_model = threading.Event()
    prepared_during_model: list[bytes] = []

    class Gated(Recorder):
        def prepare(self, job: Job, data: Buffer) -> Any:
            data = bytes(data)  # the worker hands over a view of the spooled file
            if model_running.is_set() and not release_model.is_set():
                prepared_during_model.append(data)
                release_model.set()
            return super().prepare(job, data)

        def infer(self, items: Sequence[Item]) -> Sequence[Any]:
            if items[0].data == b"first":
                model_running.set()
                assert release_model.wait(10), "the next batch was not prepared while the model ran"
            return super().infer(items)

    worker = Worker(queue, spool, Gated(), batch_size=1, batch_wait_ms=0)
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


def test_without_prefetch_the_next_batch_is_claimed_once_the_model_is_done(store: tuple[JobQueue, Spool]) -> None:
    """The sequential worker (worker.pipelined = false): one thread per stage, nothing claimed ahead."""
    queue, spool = store
    model_running = threading.Event()
    release = threading.Event()

    class Gated(Recorder):
        def infer(self, items: Sequence[Item]) -> Sequence[Any]:
            if items[0].data == b"img-0":
                model_running.set()
                release.wait(10)
            return super().infer(items)

    stages = Gated()
    ids = _add(queue, spool, [f"img-{i}".encode() for i in range(6)])
    worker = Worker(queue, spool, stages, batch_size=2, batch_wait_ms=0, decode_threads=1, output_threads=1,
                    prefetch=0)
    worker.start()
    try:
        assert model_running.wait(10)
        time.sleep(0.3)  # time enough for a feeder that did not wait to claim the next batch
        counts = queue.counts()
        assert (counts["processing"], counts["pending"]) == (2, 4)
        release.set()
        jobs = _wait_final(queue, ids)
    finally:
        release.set()
        worker.stop()
    assert all(j.state == JobState.DONE for j in jobs.values())
    assert stages.batches == [ids[0:2], ids[2:4], ids[4:6]]
    assert len(stages.threads["prepare"]) == len(stages.threads["finish"]) == 1


# Attempts, crashes and stop.
def test_worker_resumes_jobs_interrupted_by_a_crash(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    queue = JobQueue(jobs_path(tmp_path))
    ids = _add(queue, spool, [b"crash"])
    queue.claim_batch(1)  # claimed, then the process dies
    queue.close()

    queue = JobQueue(jobs_path(tmp_path))
    try:
        queue.requeue_processing()
        stages = Recorder()
        jobs = _run(queue, spool, stages, ids)
        assert stages.batches == [ids]
        assert jobs[ids[0]].state == JobState.DONE and jobs[ids[0]].attempts == 2
    finally:
        queue.close()


def test_jobs_claimed_ahead_do_not_count_an_attempt_until_their_preparation_starts(
    store: tuple[JobQueue, Spool],
) -> None:
    """Three interruptions fail a job only if work on it had started each time (a crash loop), not jobs that
    merely waited in a claimed batch."""
    queue, spool = store
    gate = threading.Event()

    class Stuck(Recorder):
        def prepare(self, job: Job, data: Buffer) -> Any:
            data = bytes(data)  # the worker hands over a view of the spooled file
            gate.wait(10)  # the one decode thread is stuck on the first job
            return super().prepare(job, data)

    ids = _add(queue, spool, [f"img-{i}".encode() for i in range(12)])
    worker = Worker(queue, spool, Stuck(), batch_size=2, batch_wait_ms=0, decode_threads=1)
    worker.start()
    try:
        assert wait_until(lambda: queue.counts()["processing"] >= 4, 10)  # claimed ahead while stuck
        time.sleep(0.1)
        attempts = [queue.get(i).attempts for i in ids]  # type: ignore[union-attr]
    finally:
        gate.set()
        worker.stop()
    assert attempts[0] == 1  # its preparation started
    assert sum(attempts) == 1, attempts  # the other claimed jobs waited: no attempt counted


def test_stop_finishes_the_batch_in_hand(store: tuple[JobQueue, Spool]) -> None:
    queue, spool = store

    class Slow(Recorder):
        def infer(self, items: Sequence[Item]) -> Sequence[Any]:
            time.sleep(0.3)
            return super().infer(items)

    stages = Slow()
    worker = Worker(queue, spool, stages, batch_wait_ms=0, idle_poll_s=0.05)
    worker.start()
    _add(queue, spool, [b"in-hand"])
    assert wait_until(lambda: len(stages.threads["infer"]) == 1)
    worker.stop()
    assert queue.counts()["done"] == 1
    assert not worker.alive


def test_stop_leaves_unfinished_jobs_to_be_requeued(store: tuple[JobQueue, Spool]) -> None:
    queue, spool = store
    release = threading.Event()

    class Slow(Recorder):
        def infer(self, items: Sequence[Item]) -> Sequence[Any]:
            release.wait(0.5)
            return super().infer(items)

    ids = _add(queue, spool, [f"img-{i}".encode() for i in range(6)])
    worker = Worker(queue, spool, Slow(), batch_size=2, batch_wait_ms=0)
    worker.start()
    time.sleep(0.2)
    worker.stop(timeout=10)
    counts = queue.counts()
    assert counts["failed"] == 0
    assert counts["done"] + counts["processing"] + counts["pending"] == 6
    queue.requeue_processing()
    jobs = _run(queue, spool, Recorder(), ids, batch_size=8)
    assert all(j.state == JobState.DONE for j in jobs.values())


def test_a_stop_that_times_out_leaves_the_jobs_claimed_not_failed(store: tuple[JobQueue, Spool]) -> None:
    queue, spool = store
    in_model = threading.Event()
    release = threading.Event()

    class Hung(Recorder):
        def infer(self, items: Sequence[Item]) -> Sequence[Any]:
            in_model.set()
            release.wait(10)
            return super().infer(items)

    ids = _add(queue, spool, [b"a", b"b"])
    worker = Worker(queue, spool, Hung(), batch_size=2, batch_wait_ms=0)
    worker.start()
    try:
        assert in_model.wait(10)
        started = time.monotonic()
        worker.stop(timeout=0.5)
        assert time.monotonic() - started < 2.0
        assert not worker.alive
    finally:
        release.set()  # the hung pass returns after the stop: its results are dropped
    assert wait_until(lambda: not any(t.name == "cxr-lens-model" for t in threading.enumerate()))
    assert queue.counts()["processing"] == 2 and queue.counts()["failed"] == 0
    queue.requeue_processing()
    jobs = _run(queue, spool, Recorder(), ids)
    assert all(j.state == JobState.DONE for j in jobs.values())


def test_a_stop_that_times_out_on_the_outputs_returns_and_the_running_output_still_completes(
    store: tuple[JobQueue, Spool],
) -> None:
    queue, spool = store
    in_finish = threading.Semaphore(0)
    release = threading.Event()

    class HungOutput(Recorder):
        def finish(self, job: Job, item: Item, result: Any) -> JobOutcome:
            in_finish.release()
            release.wait(10)
            return super().finish(job, item, result)

    ids = _add(queue, spool, [b"a", b"b"])
    # batch_size 1: 2 output slots, both held by the hung outputs.
    worker = Worker(queue, spool, HungOutput(), batch_size=1, batch_wait_ms=0, output_threads=2)
    worker.start()
    try:
        assert in_finish.acquire(timeout=10) and in_finish.acquire(timeout=10)
        started = time.monotonic()
        worker.stop(timeout=0.5)
        assert time.monotonic() - started < 2.0
        assert queue.counts()["processing"] == 2
    finally:
        release.set()
    jobs = _wait_final(queue, ids)
    assert all(j.state == JobState.DONE for j in jobs.values())  # their outputs were built: recorded


# Warm-up.
@pytest.mark.parametrize("fails", [False, True], ids=["ok", "failing"])
def test_warm_up_runs_before_the_first_claim_and_a_failing_one_does_not_stop_the_worker(
    store: tuple[JobQueue, Spool], fails: bool
) -> None:
    queue, spool = store
    release = threading.Event()
    claims_during_warm_up: list[int] = []

    def warm_up(should_stop: Callable[[], bool]) -> None:
        assert not should_stop()
        release.wait(5)
        claims_during_warm_up.append(queue.counts().get("processing", 0))
        if fails:
            raise RuntimeError("no")

    ids = _add(queue, spool, [b"ok-1", b"ok-2"])
    worker = Worker(queue, spool, Recorder(), batch_size=4, batch_wait_ms=0, warm_up=warm_up)
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
    def warm_up(should_stop: Callable[[], bool]) -> None:
        release.wait(5)

    worker = Worker(queue, spool, Recorder(), batch_size=2, warm_up=warm_up)
    plain = Worker(queue, spool, Recorder(), batch_size=2)
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
    worker = Worker(queue, spool, Recorder(), batch_size=16, batch_wait_ms=0, warm_up=warm_up)
    worker.start()
    time.sleep(0.3)
    started = time.monotonic()
    worker.stop(timeout=5)
    assert time.monotonic() - started < 1.0
    assert 1 <= len(traced) < 5
    assert worker.model_ready.is_set()
    assert queue.get(ids[0]).state is JobState.PENDING  # type: ignore[union-attr]  # left for the next start


def test_bad_arguments_are_refused(store: tuple[JobQueue, Spool]) -> None:
    queue, spool = store
    for name in ("batch_size", "decode_threads", "output_threads", "prefetch"):
        with pytest.raises(ValueError, match=name):
            Worker(queue, spool, Recorder(), **{name: -1})  # type: ignore[arg-type]
