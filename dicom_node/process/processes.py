"""Processing in processes (``worker.processes`` > 0): the model in one child process, decoding, rendering and
building outputs in a pool of further processes, receiving and sending in the node's own process.

  node process     SCP (spool + job queue), senders, HTTP; :class:`WorkerProcess` starts the model process and
                   starts it again after a crash, once the jobs it held are requeued (attempts counted, so a job
                   that keeps killing it is failed after three)
  model process    :func:`serve_model`: the worker's feeder and model thread, with the loaded model; its decode
                   and output pools are a :class:`StagePool`
  stage processes  :func:`~dicom_node.process.worker.prepare_job` (spool read in place, parse, render) and
                   :func:`~dicom_node.process.worker.finish_job` (overlay, DICOM objects, ORU into the outbox), on
                   their own copy of the stages (no model loaded)

C-STORE answers so never wait behind decoding or a model pass for the interpreter lock. The processes share the
spool directory, the job queue and the outbox (SQLite in WAL mode works across processes; so does PostgreSQL);
beyond that the model process sends a stage process each job and gets back the rendered item, then sends it the
item with the model's result. A stage process that dies breaks the pool: the model process stops and exits with
:data:`EXIT_STAGE_PROCESS_LOST`, and the node starts a new one, the same recovery as after any crash. Every child
ends when its parent does (a watchdog polls the parent's pid), so killing the node leaves nothing running.

Counters and histograms that the children keep (jobs processed, stage times, trust verdicts) reach the node's
``/metrics`` as snapshots over a queue, summed with the node's own (:class:`ProcessMetrics`).
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing.context import SpawnContext, SpawnProcess
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.core import Metric
from prometheus_client.samples import Sample

from dicom_node.ops.metrics import Metrics
from dicom_node.process.worker import JobOutcome, Stages, Worker, finish_job, prepare_job, timed_stage
from dicom_node.settings import WorkerSettings
from dicom_node.storage.backend import JobStore
from dicom_node.storage.jobs import Job
from dicom_node.storage.spool import Spool

logger = logging.getLogger(__name__)

#: The model process's exit status when a stage process died under it (a crash of the processing side).
EXIT_STAGE_PROCESS_LOST = 3
_REPORT_EVERY_S = 1.0
_PARENT_POLL_S = 0.1  # an orphaned child works on (shared spool, queue, outbox) at most this long
# Restart delays after the model process dies: from the first, doubling up to the last while it keeps dying.
_RESTART_DELAY_S = (1.0, 30.0)
_RUNS_LONG_ENOUGH_S = 60.0  # a model process that lived this long starts again after the shortest delay

# A snapshot of a registry: family name -> [(sample name, sorted label pairs, value)], counters and histograms.
Snapshot = dict[str, list[tuple[str, tuple[tuple[str, str], ...], float]]]


@dataclass(frozen=True)
class StageContext:
    """What a stage process prepares and finishes with: its own stages, spool and job queue connection."""

    stages: Stages
    spool: Spool
    queue: JobStore
    metrics: Metrics | None = None


@dataclass(frozen=True)
class ModelParts:
    """What the model process runs: the stages whose ``infer`` holds the model, and how to make a stage process's
    :class:`StageContext` (a picklable callable: it runs in each stage process)."""

    stages: Stages
    spool: Spool
    queue: JobStore
    metrics: Metrics
    worker: WorkerSettings
    warm_up: Callable[[Callable[[], bool]], None] | None
    stage_context: Callable[[], StageContext]


def _spawn() -> SpawnContext:
    # Never fork: the node has threads (SCP, senders) and the model process a framework runtime.
    return multiprocessing.get_context("spawn")


def _start_child(role: str, log_level: int | None) -> None:
    """What every child does first: its logging like its parent's, no reaction to the terminal's SIGINT or to a
    SIGTERM sent to the whole group (the parent decides when a child stops), and an end when the parent ends."""
    if log_level is not None:
        logging.basicConfig(level=log_level, format=f"%(asctime)s %(levelname)s %(name)s [{role}]: %(message)s",
                            stream=sys.stderr)
    from dicom_node.startup import configure_process

    configure_process(log_to_stderr=False)  # library log levels, pydicom's reading mode, warning filters
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    # The parent that spawned us, known from the start (it may already be gone by the time we get here).
    spawner = multiprocessing.parent_process()
    parent = spawner.pid if spawner is not None and spawner.pid is not None else os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(_PARENT_POLL_S)
        os._exit(1)  # orphaned: the parent died without stopping us (SIGKILL); nothing here is worth saving

    threading.Thread(target=watch, name=f"cxr-lens-{role}-watchdog", daemon=True).start()


def _parent_log_level() -> int | None:
    """The level to log at in a child, when this process logs to its own handlers at all."""
    root = logging.getLogger()
    return root.getEffectiveLevel() if root.handlers else None


# --- metrics across processes ----------------------------------------------------------------------------------


def snapshot(metrics: Metrics) -> Snapshot:
    """The counters and histograms of ``metrics`` as plain values (``_created`` samples left out)."""
    out: Snapshot = {}
    for family in metrics.registry.collect():
        if family.type not in ("counter", "histogram"):
            continue
        out[family.name] = [(s.name, tuple(sorted(s.labels.items())), float(s.value))
                            for s in family.samples if not s.name.endswith("_created")]
    return out


def _report_forever(metrics: Metrics, reports: Any, stop: threading.Event) -> None:
    while not stop.wait(_REPORT_EVERY_S):
        reports.put(("metrics", os.getpid(), snapshot(metrics)))
    reports.put(("metrics", os.getpid(), snapshot(metrics)))


class ProcessMetrics(Metrics):
    """The node's metrics plus the latest snapshot each child process reported, summed sample by sample.

    A child's snapshot is cumulative, so that of a child that has ended stays counted as it last was.
    """

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._children: dict[int, Snapshot] = {}

    def absorb(self, pid: int, values: Snapshot) -> None:
        with self._lock:
            self._children[pid] = values

    def exposition(self) -> bytes:
        return generate_latest(_Merged(self))

    def merged(self) -> Iterable[Metric]:
        with self._lock:
            children = list(self._children.values())
        for family in self.registry.collect():
            extra: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
            for child in children:
                for name, labels, value in child.get(family.name, ()):
                    extra[(name, labels)] = extra.get((name, labels), 0.0) + value
            if extra:
                samples = []
                for sample in family.samples:
                    key = (sample.name, tuple(sorted(sample.labels.items())))
                    samples.append(sample._replace(value=sample.value + extra.pop(key, 0.0)))
                samples += [Sample(name, dict(labels), value) for (name, labels), value in extra.items()]
                family.samples = samples
            yield family


class _Merged:
    def __init__(self, metrics: ProcessMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self._metrics.merged()


# --- stage processes -------------------------------------------------------------------------------------------

_context: StageContext | None = None  # a stage process's own, set by _start_stage_process


def _start_stage_process(build: Callable[[], StageContext], reports: Any, log_level: int | None) -> None:
    global _context
    _start_child("stage", log_level)  # configure_process there keeps OpenCV to the calling thread, as in the node
    _context = build()
    from dicom_node.startup import freeze_heap

    # What start-up built (pydicom's and highdicom's tables among them, ~330,000 objects) is never collected:
    # frozen, the collector's full passes skip it (one such pass is ~60 ms here).
    freeze_heap()
    reports.put(("started", os.getpid(), "stage"))
    if _context.metrics is not None:
        threading.Thread(target=_report_forever, args=(_context.metrics, reports, threading.Event()),
                         name="cxr-lens-stage-metrics", daemon=True).start()


def _prepare_here(job: Job) -> Any:
    assert _context is not None
    return timed_stage(_context.metrics, "prepare", prepare_job, _context.stages, _context.spool, _context.queue, job)


def _finish_here(job: Job, item: Any, result: Any) -> JobOutcome:
    assert _context is not None
    outcome: JobOutcome = timed_stage(_context.metrics, "output", finish_job, _context.stages, job, item, result)
    return outcome


class StagePool:
    """``prepare`` and ``finish`` in ``processes`` stage processes: the worker's decode and output pools in one
    (a :class:`~dicom_node.process.worker.StageRunner`)."""

    def __init__(self, processes: int, build: Callable[[], StageContext], reports: Any) -> None:
        if processes < 1:
            raise ValueError("a stage pool needs at least one process")
        self._executor = ProcessPoolExecutor(processes, mp_context=_spawn(), initializer=_start_stage_process,
                                             initargs=(build, reports, _parent_log_level()))
        for _ in range(processes):  # start them all now, while the model loads, not with the first batch
            self._executor.submit(os.getpid)

    def prepare(self, job: Job) -> Future[Any]:
        return self._executor.submit(_prepare_here, job)

    def finish(self, job: Job, item: Any, result: Any) -> Future[JobOutcome]:
        return self._executor.submit(_finish_here, job, item, result)

    def shutdown(self, *, wait: bool, cancel_futures: bool) -> None:
        self._executor.shutdown(wait=wait, cancel_futures=cancel_futures)

    @property
    def broken(self) -> bool:
        """Whether a stage process died, idle or not (the executor's manager thread watches them and then refuses
        every call; an idle pool would otherwise be found broken only with the next job)."""
        return bool(getattr(self._executor, "_broken", False))


# --- the model process -----------------------------------------------------------------------------------------


def serve_model(build: Callable[[], ModelParts], processes: int, stop: Any, reports: Any,
                log_level: int | None) -> None:
    """The model process: the worker with the model here and ``processes`` stage processes, until ``stop`` is
    set (or a stage process dies: exit status :data:`EXIT_STAGE_PROCESS_LOST`)."""
    _start_child("model", log_level)
    parts = build()
    reports.put(("started", os.getpid(), "model"))
    lost = threading.Event()
    work = parts.worker
    pools: list[StagePool] = []

    def stage_pool() -> StagePool:
        pools.append(StagePool(processes, parts.stage_context, reports))
        return pools[-1]

    worker = Worker(
        parts.queue, parts.spool, parts.stages, batch_size=work.batch_size, batch_wait_ms=work.batch_wait_ms,
        prefetch=1 if work.pipelined else 0, metrics=parts.metrics, warm_up=parts.warm_up,
        # Jobs come from another process, which cannot wake this one: look for them often while idle (a query
        # on an index, every 50 ms).
        idle_poll_s=0.05,
        runner=stage_pool, on_runner_lost=lost.set,
    )
    stop_reporting = threading.Event()
    reporter = threading.Thread(target=_report_forever, args=(parts.metrics, reports, stop_reporting),
                                name="cxr-lens-model-metrics", daemon=True)
    reporter.start()
    worker.start()

    def tell_ready() -> None:
        worker.model_ready.wait()
        reports.put(("ready", os.getpid(), "model"))

    threading.Thread(target=tell_ready, name="cxr-lens-model-ready", daemon=True).start()
    while not stop.wait(0.2) and not lost.is_set():
        if pools and pools[-1].broken:
            logger.error("a stage process died; stopping so that the node starts processing again")
            lost.set()
    worker.stop(timeout=10.0 if lost.is_set() else 30.0)
    stop_reporting.set()
    reporter.join()  # its last report holds the final counts
    parts.queue.close()
    reports.close()
    reports.join_thread()  # what is queued reaches the node before this process ends
    sys.exit(EXIT_STAGE_PROCESS_LOST if lost.is_set() else 0)


class WorkerProcess:
    """The model process seen from the node: what :class:`~dicom_node.node.Node` needs of a worker (``start``,
    ``stop``, ``alive``, ``model_ready``), and the process ids of the processing side (:meth:`process_ids`).

    ``build`` (picklable) makes the model process's :class:`ModelParts`. Before each start, jobs left in
    ``processing`` by the last model process are requeued through ``queue``.
    """

    def __init__(
        self, build: Callable[[], ModelParts], *, processes: int, queue_: JobStore, metrics: ProcessMetrics | None
    ) -> None:
        if processes < 1:
            raise ValueError("worker.processes must be at least 1 for a model process")
        self.model_ready = threading.Event()
        self._build = build
        self._processes = processes
        self._queue = queue_
        self._metrics = metrics
        self._context = _spawn()
        self._stopping = threading.Event()
        self._process: SpawnProcess | None = None
        self._running = False  # the model process runs: set at its start, cleared by the one thread that joins it
        self._stop_child: Any = None
        self._reports: Any = None
        self._supervisor: threading.Thread | None = None
        self._reader: threading.Thread | None = None
        self._pids: dict[int, str] = {}
        self._lock = threading.Lock()

    @property
    def alive(self) -> bool:
        return self._running

    def process_ids(self) -> dict[str, list[int]]:
        """Live process ids by role (``model``, ``stage``)."""
        with self._lock:
            pids = dict(self._pids)
        out: dict[str, list[int]] = {}
        for pid, role in pids.items():
            if _running(pid):
                out.setdefault(role, []).append(pid)
        return out

    def start(self) -> None:
        if self._process is not None:
            return
        self._stopping.clear()
        self._reports = self._context.Queue()
        self._spawn_model()
        self._reader = threading.Thread(target=self._read_reports, name="cxr-lens-reports", daemon=True)
        self._supervisor = threading.Thread(target=self._supervise, name="cxr-lens-supervisor", daemon=True)
        self._reader.start()
        self._supervisor.start()

    def _spawn_model(self) -> None:
        self.model_ready.clear()
        self._stop_child = self._context.Event()
        process = self._context.Process(
            target=serve_model, name="cxr-lens-model",
            args=(self._build, self._processes, self._stop_child, self._reports, _parent_log_level()),
        )
        process.start()
        self._process = process
        self._running = True
        logger.info("model process %d started with %d stage process(es)", process.pid, self._processes)

    def _supervise(self) -> None:
        """The only thread that waits for the model process (two waiting threads race to reap it)."""
        delay = _RESTART_DELAY_S[0]
        while True:
            process = self._process
            assert process is not None
            started = time.monotonic()
            process.join()
            self._running = False
            if self._stopping.is_set():
                return
            self.model_ready.clear()
            logger.error("model process %s ended (exit status %s); starting it again in %.0f s", process.pid,
                         process.exitcode, delay)
            if self._stopping.wait(delay):
                return
            delay = (_RESTART_DELAY_S[0] if time.monotonic() - started > _RUNS_LONG_ENOUGH_S
                     else min(_RESTART_DELAY_S[1], delay * 2))
            try:
                requeued = self._queue.requeue_processing()
            except Exception as exc:  # noqa: BLE001 (the queue is unreachable now: the next start requeues them)
                logger.error("could not requeue the model process's jobs (%s)", type(exc).__name__)
            else:
                if requeued:
                    logger.info("requeued %d job(s) the model process held", requeued)
            self._spawn_model()

    def _read_reports(self) -> None:
        while True:
            try:
                kind, pid, payload = self._reports.get(timeout=0.5)
            except queue.Empty:
                if self._stopping.is_set() and not self.alive:
                    return
                continue
            except (EOFError, OSError):
                return
            if kind == "started":
                with self._lock:
                    self._pids[pid] = payload
            elif kind == "ready":
                self.model_ready.set()
            elif kind == "metrics" and self._metrics is not None:
                self._metrics.absorb(pid, payload)

    def stop(self, timeout: float = 30.0) -> None:
        """Ask the model process to finish the batches in hand and end (up to ``timeout`` seconds), else kill it;
        what it held stays claimed and is requeued at the next start."""
        self._stopping.set()
        if self._process is None or self._supervisor is None:
            return
        self._stop_child.set()
        self._supervisor.join(timeout + 5.0)  # it ends once the model process has (its worker stops in timeout)
        if self._supervisor.is_alive():
            logger.warning("model process %d did not stop in time; killing it", self._process.pid)
            self._process.kill()
            self._supervisor.join(10.0)
        if self._reader is not None:
            self._reader.join(5.0)
        self._reports.close()
        self._process = self._supervisor = self._reader = None


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def available_cores(cgroup_root: str = "/sys/fs/cgroup") -> int:
    """The cores this process may use: its CPU affinity, lowered to a cgroup CPU quota where one is set.

    ``os.cpu_count()`` counts the host's cores; a container limited to two CPUs on a 64-core host would start 62
    stage processes. Written here because the standard library reads neither a cgroup v2 ``cpu.max`` nor a v1
    ``cpu.cfs_quota_us`` (the same rule as loky's ``cpu_count``: the quota over the period, rounded up).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota: float | None = None
    try:
        with open(os.path.join(cgroup_root, "cpu.max")) as f:  # v2: "max 100000" or "200000 100000"
            limit, period = f.read().split()[:2]
            quota = None if limit == "max" else int(limit) / int(period)
    except (OSError, ValueError):
        try:
            with open(os.path.join(cgroup_root, "cpu", "cpu.cfs_quota_us")) as f:  # v1: -1 when unlimited
                limit_us = int(f.read())
            with open(os.path.join(cgroup_root, "cpu", "cpu.cfs_period_us")) as f:
                period_us = int(f.read())
            quota = limit_us / period_us if limit_us > 0 and period_us > 0 else None
        except (OSError, ValueError):
            quota = None
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def resolve_processes(setting: int | str, cores: int | None = None) -> int:
    """``worker.processes`` as a number: "auto" is one stage process per core beyond the two that receiving and
    the model take, and at least one. On the 2-core test machine one stage process beat one process with threads
    (bench.pipeline, demo model, default outputs, 128 images per syntax: 120/144/114 against 133/164/127 core-ms
    per image, 8.9/7.4/9.7 against 6.7/5.7/6.4 images/s, C-STORE p99 233/149/53 against 292/283/178 ms)."""
    if setting != "auto":
        return int(setting)
    cores = cores if cores is not None else available_cores()
    return max(1, cores - 2)
