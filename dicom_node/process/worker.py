"""The worker thread: claims pending jobs in batches, hands them to the injected ``process_batch``, records outcomes.

``process_batch`` (wired in ``node.compose``) renders, infers, explains and enqueues the outputs in the
outbox itself; the worker only moves job states. Nothing it receives can kill the thread: an exception fails
that batch's jobs with a reason and the loop goes on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from dicom_node.errors import CxrLensError
from dicom_node.ops.metrics import Metrics
from dicom_node.storage.jobs import Job, JobQueue, JobState
from dicom_node.storage.spool import Spool, SpoolError

LOG = logging.getLogger(__name__)

_FINAL_STATES = (JobState.DONE, JobState.FAILED, JobState.INELIGIBLE)


@dataclass(frozen=True)
class JobOutcome:
    """What became of one job: ``done``, ``failed`` (with ``reason``) or ``ineligible`` (with ``rule``)."""

    job_id: int
    state: JobState
    rule: str | None = None
    reason: str = ""


ProcessBatch = Callable[[list[tuple[Job, bytes]]], list[JobOutcome]]


def failure_reason(exc: BaseException) -> str:
    """A reason safe to store and show: our own errors carry their message, others only their type.

    Messages of third-party exceptions can quote attribute values (names, IDs) from the data set.
    """
    if isinstance(exc, CxrLensError):
        return f"{type(exc).__name__}: {exc}"[:500]
    return type(exc).__name__


class Worker:
    """A thread that processes the job queue in batches of up to ``batch_size``.

    After the first job of a batch is claimed it waits up to ``batch_wait_ms`` for more, so a study's images
    arriving together share one inference pass, while a lone image waits at most ``batch_wait_ms``.
    """

    def __init__(
        self,
        queue: JobQueue,
        spool: Spool,
        process_batch: ProcessBatch,
        *,
        batch_size: int = 16,
        batch_wait_ms: int = 50,
        metrics: Metrics | None = None,
        idle_poll_s: float = 1.0,
        warm_up: Callable[[Callable[[], bool]], None] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self._warm_up = warm_up
        self.model_ready = threading.Event()  # set once the warm-up is over (at once without one)
        self._queue = queue
        self._spool = spool
        self._process_batch = process_batch
        self.batch_size = batch_size
        self.batch_wait_s = max(0, batch_wait_ms) / 1000.0
        self._metrics = metrics
        self._idle_poll_s = idle_poll_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self.model_ready.clear()
        self._thread = threading.Thread(target=self._run, name="cxr-lens-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the batch in hand (up to ``timeout`` seconds), then stop."""
        self._stop.set()
        self._queue.wake()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                LOG.warning("worker still busy after %.0f s; its jobs resume on the next start", timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        if self._warm_up is not None:  # before the first claim: jobs that arrive meanwhile wait in the queue
            started = time.perf_counter()
            try:
                self._warm_up(self._stop.is_set)  # it stops between batch sizes once stop() is called
                LOG.info("model warm-up done in %.1f s", time.perf_counter() - started)
            except Exception as exc:  # noqa: BLE001 (a failed warm-up only costs the first batches their tracing)
                LOG.error("model warm-up failed (%s); buckets are traced on first use", type(exc).__name__)
            finally:
                self.model_ready.set()
        else:
            self.model_ready.set()
        while not self._stop.is_set():
            if not self._queue.wait_for_work(self._idle_poll_s):
                continue
            self.run_once()

    def run_once(self) -> int:
        """Claim one batch (waiting up to ``batch_wait_ms`` for it to fill) and process it; returns its size."""
        jobs = self._gather()
        if jobs:
            self._process(jobs)
        return len(jobs)

    def _claim(self, max_n: int) -> list[Job]:
        return self._queue.claim_batch(max_n)

    def _gather(self) -> list[Job]:
        jobs = self._claim(self.batch_size)
        if not jobs or self.batch_wait_s <= 0:
            return jobs
        deadline = time.monotonic() + self.batch_wait_s
        while len(jobs) < self.batch_size and not self._stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if self._queue.wait_for_work(remaining):
                jobs += self._claim(self.batch_size - len(jobs))
        return jobs

    def _process(self, jobs: list[Job]) -> None:
        items: list[tuple[Job, bytes]] = []
        for job in jobs:
            try:
                items.append((job, self._spool.read(job.spool_key)))
            except (SpoolError, OSError) as exc:
                self._record(JobOutcome(job.id, JobState.FAILED, reason=failure_reason(exc)))
        if not items:
            return
        started = time.perf_counter()
        try:
            outcomes = self._process_batch(items)
        except Exception as exc:  # noqa: BLE001 (fail the batch, keep the worker alive)
            LOG.error("batch of %d job(s) %s failed: %s", len(items), [j.id for j, _ in items], type(exc).__name__)
            LOG.debug("batch failure detail", exc_info=True)
            for job, _ in items:
                self._record(JobOutcome(job.id, JobState.FAILED, reason=failure_reason(exc)))
            return
        finally:
            if self._metrics is not None:
                self._metrics.stage_seconds.labels(stage="batch").observe(time.perf_counter() - started)
        by_id = {o.job_id: o for o in outcomes}
        for job, _ in items:
            outcome = by_id.pop(job.id, None)
            if outcome is None:
                outcome = JobOutcome(job.id, JobState.FAILED, reason="process_batch returned no outcome")
            elif outcome.state not in _FINAL_STATES:
                outcome = JobOutcome(job.id, JobState.FAILED, reason=f"invalid outcome state {outcome.state!r}")
            self._record(outcome)
        if by_id:
            LOG.warning("process_batch returned outcomes for unknown job(s) %s", sorted(by_id))

    def _record(self, outcome: JobOutcome) -> None:
        if outcome.state == JobState.DONE:
            self._queue.complete(outcome.job_id)
            if self._metrics is not None:
                self._metrics.processed.inc()
            LOG.info("job %d done", outcome.job_id)
        elif outcome.state == JobState.INELIGIBLE:
            self._queue.mark_ineligible(outcome.job_id, outcome.rule, outcome.reason)
            if self._metrics is not None:
                self._metrics.ineligible.labels(rule=outcome.rule or "").inc()
            LOG.info("job %d not eligible (rule %s)", outcome.job_id, outcome.rule)
        else:
            self._queue.fail(outcome.job_id, outcome.reason or "failed")
            if self._metrics is not None:
                self._metrics.failed.inc()
            LOG.warning("job %d failed: %s", outcome.job_id, outcome.reason)
