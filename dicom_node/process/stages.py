"""A pipelined worker: decode the next batch while the model runs on this one; build outputs off the model thread.

Three stages, each bounded so that memory stays flat however fast images arrive:

  feeder thread   claims a batch (waiting up to ``batch_wait_ms`` for it to fill, across every association:
                  images of concurrent studies share model batches) and submits each job's ``prepare``
                  (spool read, parse, eligibility, render) to the decode pool; at most ``prefetch`` batches
                  wait ahead of the model;
  model thread    waits for a batch's prepared items in claim order and runs ``infer`` on them (one compiled
                  pass per batch), then hands each item to the output pool;
  output pool     ``finish`` builds the overlay, the Secondary Capture and the ORU, enqueues them durably and
                  records the job's outcome; at most ``2 x batch_size`` items wait there.

A stage that raises fails only the jobs in hand, with the reason recorded; the threads go on. On stop, jobs
claimed but not yet finished stay in state ``processing`` and are requeued at the next start, like a crash.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from dicom_node.ops.metrics import Metrics
from dicom_node.process.worker import JobOutcome, Worker, failure_reason
from dicom_node.storage.jobs import Job, JobQueue, JobState
from dicom_node.storage.spool import Spool, SpoolError

LOG = logging.getLogger(__name__)


class Stages(Protocol):
    """What the pipelined worker runs. ``prepare`` and ``finish`` run on pools, ``infer`` on one thread."""

    def prepare(self, job: Job, data: bytes) -> Any:
        """Parse and render one job; return the item for ``infer``, or a final :class:`JobOutcome`."""

    def infer(self, items: Sequence[Any]) -> Sequence[Any]:
        """Run the model once on the batch; one result per item, in order."""

    def finish(self, job: Job, item: Any, result: Any) -> JobOutcome:
        """Turn one item and its model result into stored outputs; return the job's outcome."""


@dataclass
class _Batch:
    jobs: list[Job]
    futures: list[Future[Any]]
    claimed: float


class StagedWorker(Worker):
    """:class:`Worker` with decode, model and output stages running concurrently (see the module docstring)."""

    def __init__(
        self,
        queue_: JobQueue,
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
    ) -> None:
        super().__init__(queue_, spool, self._unused, batch_size=batch_size, batch_wait_ms=batch_wait_ms,
                         metrics=metrics, idle_poll_s=idle_poll_s, warm_up=warm_up)
        self._stages = stages
        self._decode_threads = max(1, decode_threads)
        self._output_threads = max(1, output_threads)
        self._batches: queue.Queue[_Batch | None] = queue.Queue(maxsize=max(1, prefetch))
        self._output_slots = threading.BoundedSemaphore(2 * batch_size)
        self._decode: ThreadPoolExecutor | None = None
        self._output: ThreadPoolExecutor | None = None
        self._model_thread: threading.Thread | None = None

    @staticmethod
    def _unused(items: list[tuple[Job, bytes]]) -> list[JobOutcome]:
        raise RuntimeError("StagedWorker does not use process_batch")

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._decode = ThreadPoolExecutor(self._decode_threads, thread_name_prefix="cxr-lens-decode")
        self._output = ThreadPoolExecutor(self._output_threads, thread_name_prefix="cxr-lens-output")
        self._model_thread = threading.Thread(target=self._model_loop, name="cxr-lens-model", daemon=True)
        self._model_thread.start()
        self._thread = threading.Thread(target=self._run, name="cxr-lens-feeder", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop claiming, finish the batches in hand (up to ``timeout`` seconds), then stop."""
        deadline = time.monotonic() + timeout
        self._stop.set()
        self._queue.wake()
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
        self._put(None)
        if self._model_thread is not None:
            self._model_thread.join(max(0.0, deadline - time.monotonic()))
            if self._model_thread.is_alive():
                LOG.warning("model stage still busy after %.0f s; its jobs resume on the next start", timeout)
        for pool in (self._decode, self._output):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=False)
        self._thread = self._model_thread = None
        self._decode = self._output = None

    @property
    def alive(self) -> bool:
        return all(t is not None and t.is_alive() for t in (self._thread, self._model_thread))

    def _put(self, batch: _Batch | None) -> None:
        while True:
            try:
                self._batches.put(batch, timeout=0.5)
                return
            except queue.Full:
                if batch is None and (self._model_thread is None or not self._model_thread.is_alive()):
                    return

    # Feeder: claim and submit decoding. `_run` (Worker) calls run_once whenever there is work.
    def _claim(self, max_n: int) -> list[Job]:
        # Up to prefetch + 2 batches are claimed at once: a crash must count an attempt (towards failing a job
        # that keeps crashing the process) only for jobs whose preparation had started, see _prepare.
        return self._queue.claim_batch(max_n, count_attempt=False)

    def run_once(self) -> int:
        jobs = self._gather()
        if not jobs:
            return 0
        assert self._decode is not None
        futures = [self._decode.submit(self._prepare, job) for job in jobs]
        self._put(_Batch(jobs, futures, time.perf_counter()))
        return len(jobs)

    def _prepare(self, job: Job) -> Any:
        started = time.perf_counter()
        try:
            self._queue.begin_attempt(job.id)
            data = self._spool.read(job.spool_key)
            return self._stages.prepare(job, data)
        except (SpoolError, OSError) as exc:
            return JobOutcome(job.id, JobState.FAILED, reason=failure_reason(exc))
        except Exception as exc:  # noqa: BLE001 (one image's failure must not take the batch down)
            LOG.error("job %d: preparing failed: %s", job.id, type(exc).__name__)
            LOG.debug("prepare failure detail", exc_info=True)
            return JobOutcome(job.id, JobState.FAILED, reason=failure_reason(exc))
        finally:
            self._observe("prepare", started)

    # Model stage.
    def _model_loop(self) -> None:
        while True:
            batch = self._batches.get()
            if batch is None:
                return
            try:
                self._infer_batch(batch)
            except Exception as exc:  # noqa: BLE001 (keep the model thread alive whatever happens)
                LOG.error("model stage failed on jobs %s: %s", [j.id for j in batch.jobs], type(exc).__name__)
                LOG.debug("model stage failure detail", exc_info=True)
                for job in batch.jobs:
                    self._record(JobOutcome(job.id, JobState.FAILED, reason=failure_reason(exc)))

    def _infer_batch(self, batch: _Batch) -> None:
        prepared: list[tuple[Job, Any]] = []
        for job, future in zip(batch.jobs, batch.futures):
            item = future.result()
            if isinstance(item, JobOutcome):
                self._record(item)
            else:
                prepared.append((job, item))
        if not prepared:
            return
        started = time.perf_counter()
        try:
            results = list(self._stages.infer([item for _, item in prepared]))
            if len(results) != len(prepared):
                raise RuntimeError(f"infer returned {len(results)} results for {len(prepared)} items")
        except Exception as exc:  # noqa: BLE001 (fail this batch's jobs with the reason, go on)
            LOG.error("batch of %d job(s) %s failed: %s", len(prepared), [j.id for j, _ in prepared],
                      type(exc).__name__)
            LOG.debug("batch failure detail", exc_info=True)
            for job, _ in prepared:
                self._record(JobOutcome(job.id, JobState.FAILED, reason=failure_reason(exc)))
            return
        finally:
            self._observe("batch", started)
        assert self._output is not None
        for (job, item), result in zip(prepared, results):
            self._output_slots.acquire()
            self._output.submit(self._finish, job, item, result)

    # Output pool.
    def _finish(self, job: Job, item: Any, result: Any) -> None:
        started = time.perf_counter()
        try:
            outcome = self._stages.finish(job, item, result)
            if outcome.job_id != job.id or outcome.state not in (JobState.DONE, JobState.FAILED,
                                                                  JobState.INELIGIBLE):
                outcome = JobOutcome(job.id, JobState.FAILED, reason=f"invalid outcome {outcome!r}"[:500])
        except Exception as exc:  # noqa: BLE001 (fail this job only)
            LOG.error("job %d: building outputs failed: %s", job.id, type(exc).__name__)
            LOG.debug("output failure detail", exc_info=True)
            outcome = JobOutcome(job.id, JobState.FAILED, reason=failure_reason(exc))
        try:
            self._record(outcome)
        finally:
            self._output_slots.release()
            self._observe("output", started)

    def _observe(self, stage: str, started: float) -> None:
        if self._metrics is not None:
            self._metrics.stage_seconds.labels(stage=stage).observe(time.perf_counter() - started)
