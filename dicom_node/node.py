"""The node's life cycle: start the receiving, processing and sending threads in order, stop them gracefully.

Everything it runs is handed in (``node.compose`` builds the parts), so a test can start a whole node on
free ports with fake stages. Start order: requeue interrupted jobs, worker, senders, SCP, HTTP. Stop order:
SCP first (no new input), then the worker finishes its batch, then the senders, then HTTP.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Protocol

from pydicom import Dataset
from typing_extensions import Buffer

from dicom_node.deliver.dicom import DicomSender
from dicom_node.deliver.hl7 import HL7Sender
from dicom_node.ops.metrics import Metrics, MetricsServer
from dicom_node.process.processes import ModelParts, ProcessMetrics, StageContext, WorkerProcess, resolve_processes
from dicom_node.process.processor import Processor, ProcessorStages, load_processor
from dicom_node.process.rules import evaluate, load_rules
from dicom_node.process.worker import JobOutcome, Stages, Worker
from dicom_node.receive.scp import RulesCheck, StorageSCP
from dicom_node.settings import Settings
from dicom_node.startup import freeze_heap
from dicom_node.storage.backend import JobStore, OutboxStore, open_job_store, open_outbox_store, open_storage
from dicom_node.storage.jobs import Job
from dicom_node.storage.spool import Spool

LOG = logging.getLogger(__name__)

# What a node process runs (``cxr-lens serve --role``): receiving (SCP), processing (worker), delivering
# (senders), or all three. Roles scale apart when they share a PostgreSQL store and the spool directory.
ROLES = ("all", "ingest", "worker", "sender")


class BackgroundSender(Protocol):
    """Anything that delivers from the outbox until told to stop (the HL7 MLLP sender, for instance)."""

    def run_forever(self, stop_event: threading.Event) -> None: ...

    def wake(self) -> None:
        """End a wait in run_forever at once (the node is stopping)."""


class Node:
    """One CXR Lens node: Storage SCP -> job queue -> worker -> outbox -> senders, plus /metrics and /healthz."""

    def __init__(
        self,
        settings: Settings,
        *,
        stages: Stages,
        dicom_sender: DicomSender,
        hl7_sender: BackgroundSender | None = None,
        rules_check: RulesCheck | None = None,
        spool: Spool | None = None,
        queue: JobStore | None = None,
        metrics: Metrics | None = None,
        warm_up: Callable[[Callable[[], bool]], None] | None = None,
        owned: Sequence[JobStore | OutboxStore] = (),
        role: str = "all",
        worker: WorkerProcess | None = None,
    ) -> None:
        if role not in ROLES:
            raise ValueError(f"role {role!r}: expected one of {', '.join(ROLES)}")
        self.role = role
        self.settings = settings
        self.metrics = metrics if metrics is not None else Metrics()
        self.spool = spool if spool is not None else Spool(settings.node.spool_dir)
        self._owns_queue = queue is None
        self.queue = queue if queue is not None else open_job_store(settings.storage, settings.node.spool_dir)
        self._owned = owned  # stores handed over by compose(), closed at stop
        self.dicom_sender = dicom_sender
        self.hl7_sender = hl7_sender
        self.scp = StorageSCP(settings.node, self.spool, self.queue, rules_check=rules_check, metrics=self.metrics)
        work = settings.worker
        # pipelined = false: one thread per stage, and no batch claimed before the model is done with the last.
        # ``worker``: the processing side in child processes instead (worker.processes, see compose()).
        self.worker: Worker | WorkerProcess = worker if worker is not None else Worker(
            self.queue, self.spool, stages, batch_size=work.batch_size, batch_wait_ms=work.batch_wait_ms,
            decode_threads=work.decode_threads if work.pipelined else 1,
            output_threads=work.output_threads if work.pipelined else 1,
            prefetch=1 if work.pipelined else 0, metrics=self.metrics, warm_up=warm_up,
        )
        self.http: MetricsServer | None = None
        self._stop_senders = threading.Event()
        self._sender_threads: dict[str, threading.Thread] = {}
        self.metrics.register_gauges(
            "jobs", "Jobs in the queue by state", ("state",),
            lambda: {(state,): n for state, n in self.queue.counts().items()},
        )
        self.metrics.register_gauges(
            "outbox_items", "Outbox items by channel and state", ("channel", "state"),
            lambda: {key: float(n) for key, n in self._outbox().counts().items()},
        )

    def _outbox(self) -> OutboxStore:
        return self.dicom_sender.outbox

    @property
    def scp_port(self) -> int:
        return self.scp.port

    @property
    def http_port(self) -> int:
        if self.http is None:
            raise RuntimeError("the HTTP server is not running")
        return self.http.port

    def runs(self, part: str) -> bool:
        """Whether this node's role runs ``part`` (ingest, worker or sender)."""
        return self.role in ("all", part)

    def start(self) -> None:
        """Start the parts of the role; if any fails to start, stop what did start and re-raise."""
        try:
            if self.runs("worker"):
                requeued = self.queue.requeue_processing()
                if requeued:
                    LOG.info("requeued %d job(s) interrupted by the last shutdown", requeued)
                self.worker.start()
            self._stop_senders.clear()
            if self.runs("sender"):
                self._start_sender("dicom", self.dicom_sender)
                if self.hl7_sender is not None:
                    self._start_sender("hl7", self.hl7_sender)
            if self.runs("ingest"):
                self.scp.start()
            self.http = MetricsServer(
                self.metrics, self.health, host=self.settings.node.host, port=self.settings.node.http_port
            )
            self.http.start()
        except BaseException:
            self.stop()
            raise
        LOG.info("node %s started (role %s): DICOM port %s, HTTP port %d", self.settings.node.ae_title, self.role,
                 self.scp_port if self.scp.running else "-", self.http_port)

    def _start_sender(self, name: str, sender: BackgroundSender) -> None:
        thread = threading.Thread(
            target=sender.run_forever, args=(self._stop_senders,), name=f"cxr-lens-{name}-sender", daemon=True
        )
        thread.start()
        self._sender_threads[name] = thread

    def stop(self, timeout: float = 30.0) -> None:
        """Graceful stop: refuse new associations, finish the batch in hand, stop the senders."""
        self.scp.stop()
        self.worker.stop(timeout)
        self._stop_senders.set()
        self.dicom_sender.wake()
        if self.hl7_sender is not None:
            self.hl7_sender.wake()
        for thread in self._sender_threads.values():
            thread.join(timeout)
        self._sender_threads.clear()
        if self.http is not None:
            self.http.stop()
            self.http = None
        if self._owns_queue:
            self.queue.close()
        for store in self._owned:
            store.close()
        LOG.info("node %s stopped", self.settings.node.ae_title)

    def health(self) -> dict[str, Any]:
        """``/healthz``: ok when the SCP listens and every thread is alive; queue depths by state.

        ``model_ready`` is false while the model warms up at start: the node is up and queues what arrives.
        """
        components = {
            **({"scp": self.scp.running} if self.runs("ingest") else {}),
            **({"worker": self.worker.alive} if self.runs("worker") else {}),
            **{f"{name}_sender": t.is_alive() for name, t in self._sender_threads.items()},
        }
        outbox: dict[str, dict[str, int]] = {}
        for (channel, state), n in self._outbox().counts().items():
            outbox.setdefault(channel, {})[state] = n
        return {
            "ok": all(components.values()),
            "model_ready": self.worker.model_ready.is_set() if self.runs("worker") else None,
            "components": components,
            "jobs": self.queue.counts(),
            "outbox": outbox,
        }

    def __enter__(self) -> Node:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _NoStages:
    """The stages of a node whose role runs no worker (ingest, sender): it loads no model, and nothing calls them."""

    def prepare(self, job: Job, data: Buffer) -> Any:
        raise RuntimeError(f"no worker in this node (job {job.id})")

    def infer(self, items: Sequence[Any]) -> Sequence[Any]:
        raise RuntimeError("no worker in this node")

    def finish(self, job: Job, item: Any, result: Any) -> JobOutcome:
        raise RuntimeError(f"no worker in this node (job {job.id})")


def compose(settings: Settings, processor: Processor | None = None, *, role: str = "all") -> Node:
    """Build the node of a role from settings: model (worker), rules, stores, senders, SCP. Nothing starts yet."""
    if role not in ROLES:
        raise ValueError(f"role {role!r}: expected one of {', '.join(ROLES)}")
    # worker.processes: the model and the stages in child processes, which load and build them themselves
    processes = resolve_processes(settings.worker.processes) if role in ("all", "worker") and not processor else 0
    if processor is None and role in ("all", "worker") and not processes:
        processor = load_processor(settings)
        freeze_heap()
    rules = processor.rules if processor is not None else load_rules(settings.rules_file)
    jobs, outbox = open_storage(settings, role=role)
    metrics = ProcessMetrics() if processes else Metrics()  # one registry for the node and its senders
    dicom_sender, hl7_sender = _senders(settings, outbox, metrics)

    def rules_check(ds: Dataset) -> tuple[bool, str | None, str]:
        verdict = evaluate(ds, rules)
        return verdict.eligible, verdict.rule, verdict.reason

    if processes:
        worker = WorkerProcess(partial(_model_parts, settings), processes=processes, queue_=jobs,
                               metrics=metrics if isinstance(metrics, ProcessMetrics) else None)
        return Node(settings, dicom_sender=dicom_sender, hl7_sender=hl7_sender, rules_check=rules_check,
                    metrics=metrics, queue=jobs, owned=(jobs, outbox), role=role, stages=_NoStages(), worker=worker)
    if processor is None:
        return Node(settings, dicom_sender=dicom_sender, hl7_sender=hl7_sender, rules_check=rules_check,
                    metrics=metrics, queue=jobs, owned=(jobs, outbox), role=role, stages=_NoStages())
    model = processor

    def warm_up(should_stop: Callable[[], bool]) -> None:
        model.warm_up(settings.worker.batch_size, should_stop)
        freeze_heap()  # the traced functions too

    return Node(settings, dicom_sender=dicom_sender, hl7_sender=hl7_sender, rules_check=rules_check, metrics=metrics,
                warm_up=warm_up if settings.worker.warm_up else None, queue=jobs, owned=(jobs, outbox), role=role,
                stages=ProcessorStages(processor, dicom_sender, hl7_sender, metrics))


def _senders(settings: Settings, outbox: OutboxStore, metrics: Metrics) -> tuple[DicomSender, HL7Sender | None]:
    dicom_sender = DicomSender(outbox, settings.destinations, ae_title=settings.node.ae_title,
                               max_pdu=settings.node.max_pdu, retry_initial_s=settings.node.retry_initial_s,
                               retry_max_s=settings.node.retry_max_s, metrics=metrics)
    hl7_sender = HL7Sender(outbox, settings.hl7, metrics=metrics) if settings.hl7.enabled else None
    return dicom_sender, hl7_sender


def _model_parts(settings: Settings) -> ModelParts:
    """In the model process (worker.processes): the model, the stages that run it, and how each stage process
    builds its own stages (without the network: what the outputs name of the model travels instead)."""
    processor = load_processor(settings)
    freeze_heap()
    metrics = Metrics()

    def warm_up(should_stop: Callable[[], bool]) -> None:
        processor.warm_up(settings.worker.batch_size, should_stop)
        freeze_heap()

    described = dataclasses.replace(processor.model, network=None)
    return ModelParts(
        stages=ProcessorStages(processor, None, None, metrics),  # only its infer runs here
        spool=Spool(settings.node.spool_dir), queue=open_job_store(settings.storage, settings.node.spool_dir),
        metrics=metrics, worker=settings.worker, warm_up=warm_up if settings.worker.warm_up else None,
        stage_context=partial(_stage_context, settings, described),
    )


def _stage_context(settings: Settings, model: Any) -> StageContext:
    """In a stage process: the processor's prepare and outputs, with this process's own outbox and queue."""
    spool_dir = settings.node.spool_dir
    metrics = Metrics()
    dicom_sender, hl7_sender = _senders(settings, open_outbox_store(settings.storage, spool_dir), metrics)
    processor = Processor(settings, model, load_rules(settings.rules_file))
    return StageContext(ProcessorStages(processor, dicom_sender, hl7_sender, metrics), Spool(spool_dir),
                        open_job_store(settings.storage, spool_dir), metrics)
