"""The worker: claims pending jobs in batches and runs them through three overlapping stages.

  feeder thread   claims a batch (waiting up to ``batch_wait_ms`` for it to fill, across every association:
                  images of concurrent studies share model batches) and submits each job's ``prepare``
                  (spool read, parse, eligibility, render) to the decode pool; at most ``prefetch`` batches
                  are claimed ahead of the one the model is on;
  model thread    waits for a batch's prepared items in claim order and runs ``infer`` on them (one compiled
                  pass per batch), then hands each item to the output pool;
  output pool     ``finish`` builds the outputs, enqueues them durably and returns the job's outcome; at most
                  ``2 x batch_size`` items wait there.

The two pools are a :class:`StageRunner`: threads of this process (:class:`ThreadStageRunner`, the default), or
processes (``worker.processes``, :class:`~dicom_node.process.processes.StagePool`) that run the same
:func:`prepare_job` and :func:`finish_job` on their own copy of the stages, while the feeder and the model thread
stay here with the model.

With ``decode_threads=1, output_threads=1, prefetch=0`` the same code is the sequential worker: the next batch
is claimed only once the model is done with the one in hand. :class:`Stages` is the worker's only contract with
the processor. A stage that raises fails only the jobs in hand, with a reason (:func:`failure_reason`); the
threads go on. On stop, jobs claimed but not yet finished stay in state ``processing`` and are requeued at the
next start, like a crash; so do they when a stage process dies (the runner is then broken: the worker stops and
says so through ``on_runner_lost``).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import BrokenExecutor, CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

from typing_extensions import Buffer

from dicom_node.errors import CxrLensError
from dicom_node.ops.metrics import Metrics
from dicom_node.storage.backend import JobStore
from dicom_node.storage.jobs import Job, JobState
from dicom_node.storage.spool import Spool

logger = logging.getLogger(__name__)

_STOPPED = object()  # a stage future that ended with the runner broken or cancelled by stop()

FINAL_STATES = (JobState.DONE, JobState.FAILED, JobState.INELIGIBLE)


@dataclass(frozen=True)
class JobOutcome:
    """What became of one job: ``done``, ``failed`` (with ``reason``) or ``ineligible`` (with ``rule``)."""

    job_id: int
    state: JobState
    rule: str | None = None
    reason: str = ""


class Stages(Protocol):
    """What the worker runs. ``prepare`` and ``finish`` run on pools, ``infer`` on one thread."""

    def prepare(self, job: Job, data: Buffer) -> Any:
        """Parse and render one job from its spooled bytes (a read-only view of the file mapped in memory: keep no
        reference to it); return the item for ``infer``, or a final :class:`JobOutcome`."""

    def infer(self, items: Sequence[Any]) -> Sequence[Any]:
        """Run the model once on the batch; one result per item, in order."""

    def finish(self, job: Job, item: Any, result: Any) -> JobOutcome:
        """Turn one item and its model result into stored outputs; return the job's outcome."""


class StageContractError(CxrLensError):
    """A stage broke the :class:`Stages` contract (a result count or an outcome that does not fit its jobs)."""


def failure_reason(exc: BaseException) -> str:
    """A reason safe to store and show: our own errors carry their message, others only their type.

    Messages of third-party exceptions can quote attribute values (names, IDs) from the data set.
    """
    if isinstance(exc, CxrLensError):
        return f"{type(exc).__name__}: {exc}"[:500]
    return type(exc).__name__


def _checked(job: Job, outcome: JobOutcome) -> JobOutcome:
    if outcome.job_id != job.id:
        raise StageContractError(f"outcome for job {outcome.job_id} returned for job {job.id}")
    if outcome.state not in FINAL_STATES:
        raise StageContractError(f"invalid outcome state {str(outcome.state)!r}")
    return outcome


def failed_outcomes(stage: str, jobs: Sequence[Job], exc: BaseException) -> list[JobOutcome]:
    """The one place where an exception becomes failed outcomes; the log names only the exception's type."""
    logger.error("%s failed for job(s) %s: %s", stage, [j.id for j in jobs], type(exc).__name__)
    # Where it failed, without the message (it may quote the data set).
    logger.debug("%s failed at:\n%s", stage, "".join(traceback.format_tb(exc.__traceback__)))
    reason = failure_reason(exc)
    return [JobOutcome(job.id, JobState.FAILED, reason=reason) for job in jobs]


def prepare_job(stages: Stages, spool: Spool, queue_: JobStore, job: Job) -> Any:
    """Count the job's attempt, then ``prepare`` it from its spooled file read in place; the item for ``infer``,
    or a final outcome (a failure among them). Runs on the decode pool, a thread or a process."""
    try:
        queue_.begin_attempt(job.id)
        with spool.mapped(job.spool_key) as data:
            item = stages.prepare(job, data)
        spool.evict(job.spool_key)
        return _checked(job, item) if isinstance(item, JobOutcome) else item
    except Exception as exc:  # noqa: BLE001 (one image's failure must not take the batch down)
        return failed_outcomes("prepare", [job], exc)[0]


def finish_job(stages: Stages, job: Job, item: Any, result: Any) -> JobOutcome:
    """``finish`` one job (its outputs stored in the outbox) and return its outcome; a failure fails it alone."""
    try:
        return _checked(job, stages.finish(job, item, result))
    except Exception as exc:  # noqa: BLE001 (fail this job only)
        return failed_outcomes("finish", [job], exc)[0]


def observe_stage(metrics: Metrics | None, stage: str, started: float) -> None:
    """The time since ``started`` (``time.perf_counter()``) in ``metrics``' stage histogram under ``stage``."""
    if metrics is not None:
        metrics.stage_seconds.labels(stage=stage).observe(time.perf_counter() - started)


def timed_stage(metrics: Metrics | None, stage: str, function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)``, its time observed in ``metrics``' stage histogram under ``stage`` (raised or not)."""
    started = time.perf_counter()
    try:
        return function(*args)
    finally:
        observe_stage(metrics, stage, started)


class StageRunner(Protocol):
    """Where ``prepare`` and ``finish`` run for the worker: each call returns at once with a future."""

    def prepare(self, job: Job) -> Future[Any]:
        """:func:`prepare_job` for ``job``: an item for ``infer`` or a final :class:`JobOutcome`."""

    def finish(self, job: Job, item: Any, result: Any) -> Future[JobOutcome]:
        """:func:`finish_job` for ``job``."""

    def shutdown(self, *, wait: bool, cancel_futures: bool) -> None:
        """Release the threads or processes (after the work in hand, with ``wait``)."""


class ThreadStageRunner:
    """``prepare`` on a pool of decode threads and ``finish`` on a pool of output threads, in this process."""

    def __init__(
        self, stages: Stages, spool: Spool, queue_: JobStore, *, decode_threads: int, output_threads: int,
        metrics: Metrics | None = None,
    ) -> None:
        self._stages, self._spool, self._queue, self._metrics = stages, spool, queue_, metrics
        self._decode = ThreadPoolExecutor(decode_threads, thread_name_prefix="cxr-lens-decode")
        self._output = ThreadPoolExecutor(output_threads, thread_name_prefix="cxr-lens-output")

    def prepare(self, job: Job) -> Future[Any]:
        return self._decode.submit(timed_stage, self._metrics, "prepare", prepare_job, self._stages, self._spool,
                                   self._queue, job)

    def finish(self, job: Job, item: Any, result: Any) -> Future[JobOutcome]:
        return self._output.submit(timed_stage, self._metrics, "output", finish_job, self._stages, job, item, result)

    def shutdown(self, *, wait: bool, cancel_futures: bool) -> None:
        for pool in (self._decode, self._output):
            pool.shutdown(wait=wait, cancel_futures=cancel_futures)


@dataclass
class _Batch:
    jobs: list[Job]
    prepared: list[Future[Any]]  # one per job, in claim order: an item for infer or a JobOutcome


class Worker:
    """Claims jobs in batches of up to ``batch_size`` and runs them through ``stages`` (see the module docstring).

    After the first job of a batch is claimed it waits up to ``batch_wait_ms`` for more, so a study's images
    arriving together share one inference pass, while a lone image waits at most ``batch_wait_ms``. ``warm_up``
    runs on the feeder before the first claim (jobs arriving meanwhile wait in the queue); ``model_ready`` is set
    when it is over, at once without one.
    """

    def __init__(
        self,
        queue_: JobStore,
        spool: Spool,
        stages: Stages,
        *,
        batch_size: int = 16,
        batch_wait_ms: int = 50,
        decode_threads: int = 2,
        output_threads: int = 2,
        prefetch: int = 1,
        metrics: Metrics | None = None,
        idle_poll_s: float = 1.0,
        warm_up: Callable[[Callable[[], bool]], None] | None = None,
        runner: Callable[[], StageRunner] | None = None,
        on_runner_lost: Callable[[], None] | None = None,
    ) -> None:
        """``runner`` makes the :class:`StageRunner` at each start (default: :class:`ThreadStageRunner` with
        ``decode_threads`` and ``output_threads``); ``on_runner_lost`` is called once if it breaks (a stage
        process died): the worker has stopped then, leaving its jobs claimed."""
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if decode_threads < 1 or output_threads < 1:
            raise ValueError("decode_threads and output_threads must be at least 1")
        if prefetch < 0:
            raise ValueError("prefetch must be at least 0")
        self.stages = stages
        self.batch_size = batch_size
        self.batch_wait_s = max(0, batch_wait_ms) / 1000.0
        self.decode_threads = decode_threads
        self.output_threads = output_threads
        self.prefetch = prefetch
        self.model_ready = threading.Event()
        self._queue = queue_
        self._spool = spool
        self._metrics = metrics
        self._idle_poll_s = idle_poll_s
        self._warm_up = warm_up
        self._make_runner = runner or self._thread_runner
        self._on_runner_lost = on_runner_lost
        self._stop = threading.Event()
        self._abandon = threading.Event()  # stop() gave up waiting: drop the work in hand, leave it processing
        self._lost = threading.Event()  # the runner broke: leave the work in hand claimed, record nothing more
        self._batches: queue.SimpleQueue[_Batch | None] = queue.SimpleQueue()
        self._claim_slots = threading.Semaphore(prefetch + 1)
        self._output_slots = threading.Semaphore(2 * batch_size)
        self._runner: StageRunner | None = None
        self._feeder: threading.Thread | None = None
        self._model_thread: threading.Thread | None = None

    def start(self) -> None:
        if self._feeder is not None:
            return
        self._stop.clear()
        self._abandon.clear()
        self._lost.clear()
        self.model_ready.clear()
        self._batches = queue.SimpleQueue()
        self._claim_slots = threading.Semaphore(self.prefetch + 1)
        self._output_slots = threading.Semaphore(2 * self.batch_size)
        self._runner = self._make_runner()
        self._model_thread = threading.Thread(target=self._run_model, name="cxr-lens-model", daemon=True)
        self._model_thread.start()
        self._feeder = threading.Thread(target=self._feed, name="cxr-lens-feeder", daemon=True)
        self._feeder.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop claiming, finish the batches in hand (up to ``timeout`` seconds), then stop."""
        deadline = time.monotonic() + timeout
        self._stop.set()
        self._queue.wake()
        if self._feeder is not None:
            self._feeder.join(max(0.0, deadline - time.monotonic()))
        self._batches.put(None)  # after the feeder's last batch: the model thread drains them, then ends
        if self._model_thread is not None:
            self._model_thread.join(max(0.0, deadline - time.monotonic()))
        busy = any(t is not None and t.is_alive() for t in (self._feeder, self._model_thread))
        if not busy and self._runner is not None and not self._lost.is_set():
            busy = not self._wait_for_outputs(deadline)
        if busy:
            self._abandon.set()
            logger.warning("worker still busy after %.0f s; its jobs resume on the next start", timeout)
        if self._runner is not None:
            self._runner.shutdown(wait=not busy and not self._lost.is_set(), cancel_futures=busy or self._lost.is_set())
        self._feeder = self._model_thread = None
        self._runner = None

    @property
    def alive(self) -> bool:
        return all(t is not None and t.is_alive() for t in (self._feeder, self._model_thread))

    def _thread_runner(self) -> StageRunner:
        return ThreadStageRunner(self.stages, self._spool, self._queue, decode_threads=self.decode_threads,
                                 output_threads=self.output_threads, metrics=self._metrics)

    def _runner_broke(self, exc: BaseException) -> None:
        """A stage process died: stop where we are; the jobs in hand stay claimed and resume on the next start."""
        if self._lost.is_set():
            return
        self._lost.set()
        self._abandon.set()
        self._stop.set()
        self._queue.wake()
        self._batches.put(None)
        logger.error("a stage process died (%s); the jobs in hand resume when processing restarts",
                     type(exc).__name__)
        if self._on_runner_lost is not None:
            self._on_runner_lost()

    def _wait_for_outputs(self, deadline: float) -> bool:
        """Wait until no ``finish`` is in flight (all output slots free again) or ``deadline`` passes."""
        taken = 0
        try:
            while taken < 2 * self.batch_size:
                if not self._output_slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
                    return False
                taken += 1
            return True
        finally:
            if taken:
                self._output_slots.release(taken)

    # Feeder: warm up, then claim batches and submit their preparation.
    def _feed(self) -> None:
        self._run_warm_up()
        while not self._stop.is_set():
            if not self._queue.wait_for_work(self._idle_poll_s) or not self._take(self._claim_slots):
                continue
            jobs = self._gather()
            if not jobs:
                self._claim_slots.release()
                continue
            assert self._runner is not None
            try:
                prepared = [self._runner.prepare(job) for job in jobs]
            except BrokenExecutor as exc:
                self._runner_broke(exc)
                return
            except RuntimeError:  # the pool was shut down by stop() giving up
                logger.info("stopping: job(s) %s stay claimed until the next start", [j.id for j in jobs])
                return
            self._batches.put(_Batch(jobs, prepared))

    def _run_warm_up(self) -> None:
        if self._warm_up is None:
            self.model_ready.set()
            return
        started = time.perf_counter()
        try:
            self._warm_up(self._stop.is_set)  # it stops between batch sizes once stop() is called
            logger.info("model warm-up done in %.1f s", time.perf_counter() - started)
        except Exception as exc:  # noqa: BLE001 (a failed warm-up only costs the first batches their tracing)
            logger.error("model warm-up failed (%s); buckets are traced on first use", type(exc).__name__)
        finally:
            self.model_ready.set()

    def _take(self, slots: threading.Semaphore) -> bool:
        """Acquire one of ``slots``; False if stop() was called first."""
        while not self._stop.is_set():
            if slots.acquire(timeout=0.1):
                return True
        return False

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

    def _claim(self, max_n: int) -> list[Job]:
        # A job claimed ahead counts an attempt (towards failing a job that keeps crashing the process) only
        # once its preparation starts, see prepare_job.
        return self._queue.claim_batch(max_n, count_attempt=False)

    # Model thread.
    def _run_model(self) -> None:
        while (batch := self._batches.get()) is not None and not self._abandon.is_set():
            try:
                self._infer(batch)
            except Exception as exc:  # noqa: BLE001 (keep the model thread alive whatever happens)
                if self._abandon.is_set():  # pools shut down under it: the jobs stay claimed
                    return
                for outcome in failed_outcomes("model stage", batch.jobs, exc):
                    self._record(outcome)
            finally:
                self._claim_slots.release()

    def _infer(self, batch: _Batch) -> None:
        prepared: list[tuple[Job, Any]] = []
        for job, future in zip(batch.jobs, batch.prepared, strict=True):
            item = self._stage_result(future, "prepare", job)
            if item is _STOPPED:
                return
            if isinstance(item, JobOutcome):
                self._record(item)
            else:
                prepared.append((job, item))
        if not prepared:
            return
        started = time.perf_counter()
        try:
            results = list(self.stages.infer([item for _, item in prepared]))
            if len(results) != len(prepared):
                raise StageContractError(f"infer returned {len(results)} results for {len(prepared)} items")
        except Exception as exc:  # noqa: BLE001 (fail this batch's jobs with the reason, go on)
            for outcome in failed_outcomes("infer", [job for job, _ in prepared], exc):
                self._record(outcome)
            return
        finally:
            observe_stage(self._metrics, "batch", started)
        assert self._runner is not None
        for (job, item), result in zip(prepared, results, strict=True):
            self._output_slots.acquire()
            try:
                future = self._runner.finish(job, item, result)
            except BrokenExecutor as exc:
                self._output_slots.release()
                self._runner_broke(exc)
                return
            future.add_done_callback(partial(self._finished, job))

    # Output pool, as each finish completes.
    def _finished(self, job: Job, future: Future[JobOutcome]) -> None:
        try:
            outcome = self._stage_result(future, "finish", job)
            if outcome is not _STOPPED:
                self._record(outcome)
        finally:
            self._output_slots.release()

    def _stage_result(self, future: Future[Any], stage: str, job: Job) -> Any:
        """A stage's result for one job; a failed transfer to or from a stage process becomes the job's failed
        outcome; :data:`_STOPPED` when the runner broke or ``stop()`` cancelled the future (the job stays claimed)."""
        try:
            return future.result()
        except BrokenExecutor as exc:
            self._runner_broke(exc)
            return _STOPPED
        except CancelledError:
            return _STOPPED
        except Exception as exc:  # noqa: BLE001 (the item or result could not travel to or from a stage process)
            return failed_outcomes(stage, [job], exc)[0]

    def _record(self, outcome: JobOutcome) -> None:
        try:
            self._store(outcome)
        except Exception as exc:  # noqa: BLE001 (the queue is unreachable: the job stays claimed, retried later)
            logger.error("job %d: its outcome could not be stored (%s); it resumes on the next start",
                         outcome.job_id, type(exc).__name__)

    def _store(self, outcome: JobOutcome) -> None:
        if outcome.state == JobState.DONE:
            self._queue.complete(outcome.job_id)
            if self._metrics is not None:
                self._metrics.processed.inc()
            logger.info("job %d done", outcome.job_id)
        elif outcome.state == JobState.INELIGIBLE:
            self._queue.mark_ineligible(outcome.job_id, outcome.rule, outcome.reason)
            if self._metrics is not None:
                self._metrics.ineligible.labels(rule=outcome.rule or "").inc()
            logger.info("job %d not eligible (rule %s)", outcome.job_id, outcome.rule)
        else:
            self._queue.fail(outcome.job_id, outcome.reason or "failed")
            if self._metrics is not None:
                self._metrics.failed.inc()
            logger.warning("job %d failed: %s", outcome.job_id, outcome.reason)
