"""What an operator's scraper sees: Prometheus metrics on a private registry, and a tiny HTTP server.

Each :class:`Metrics` owns its own ``CollectorRegistry`` (never the process-global one) so that a process, a
test session for instance, can run several nodes side by side.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

PREFIX = "cxr_lens"
# Latencies from a C-STORE answer (milliseconds) up to an inference batch (seconds).
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Shares of the evidence on the lung fields: finer below 0.2, where the trust alarm's min_lung_share (0.1) lies.
_SHARE_BUCKETS = (0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


@dataclass(frozen=True)
class DeliveryCounters:
    """One channel's delivery outcomes, counted by its sender as it settles each outbox item."""

    sent: Counter
    retries: Counter
    parked: Counter


class Metrics:
    """The node's counters and histograms, registered on a private registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(f"{PREFIX}_{name}", doc, labels, registry=self.registry)

        self.received = counter("received", "C-STORE requests received")
        self.associations_refused = counter(
            "associations_refused", "Connections or associations refused, by reason (see acceptor.Refusal)", ("reason",)
        )
        self.cstore_status = counter("cstore_status", "C-STORE responses sent, by status", ("status",))
        self.stored = counter("stored", "Instances newly written to the spool and queued")
        self.duplicates = counter("duplicates", "Instances received again with identical content (not re-queued)")
        self.ineligible = counter("ineligible", "Instances excluded by an eligibility rule", ("rule",))
        self.processed = counter("processed", "Jobs processed successfully")
        self.failed = counter("failed", "Jobs that failed")
        self.sc_sent = counter("sc_sent", "Secondary Captures accepted by a destination")
        self.sc_parked = counter("sc_parked", "Secondary Captures parked after a permanent refusal")
        self.sc_retries = counter("sc_retries", "Secondary Capture deliveries scheduled for retry")
        self.hl7_sent = counter("hl7_sent", "ORU messages accepted by the HL7 receiver")
        self.hl7_parked = counter("hl7_parked", "ORU messages parked after an error ACK")
        self.hl7_retries = counter("hl7_retries", "ORU deliveries scheduled for retry")
        # Keyed by outbox channel: what each sender counts its outcomes on.
        self._deliveries = {
            "dicom": DeliveryCounters(sent=self.sc_sent, retries=self.sc_retries, parked=self.sc_parked),
            "hl7": DeliveryCounters(sent=self.hl7_sent, retries=self.hl7_retries, parked=self.hl7_parked),
        }
        self.cstore_seconds = Histogram(
            f"{PREFIX}_cstore_handler_seconds",
            "Time from C-STORE request to response in the handler",
            registry=self.registry,
            buckets=_BUCKETS,
        )
        self.stage_seconds = Histogram(
            f"{PREFIX}_stage_seconds",
            "Time spent per pipeline stage (per batch or per item)",
            ("stage",),
            registry=self.registry,
            buckets=_BUCKETS,
        )
        self.lung_share = Histogram(
            f"{PREFIX}_evidence_lung_share",
            "Share of each explanation's evidence on the lung fields (0-1)",
            registry=self.registry,
            buckets=_SHARE_BUCKETS,
        )
        self.trust_verdicts = counter(
            "trust_verdicts",
            "Explanation trust verdicts (ok, suspect, no_lung_fields), one per image, by verdict and its reasons "
            "('+'-joined, empty for none)",
            ("verdict", "reasons"),
        )

    def observe_evidence(self, evidence: Mapping[str, Any]) -> None:
        """Count one image's trust evidence (``explain.trust.Evidence.as_dict()``): its lung share and verdict."""
        self.lung_share.observe(float(evidence["lungs"]))
        reasons = "+".join(str(reason) for reason in evidence.get("reasons") or ())
        self.trust_verdicts.labels(verdict=str(evidence["verdict"]), reasons=reasons).inc()

    def delivery(self, channel: str) -> DeliveryCounters:
        """The sent/retries/parked counters of an outbox channel (``dicom``, ``hl7``); KeyError for others."""
        return self._deliveries[channel]

    def register_gauges(
        self, name: str, doc: str, labels: tuple[str, ...], read: Callable[[], Mapping[tuple[str, ...], float]]
    ) -> None:
        """Expose ``read()`` (label values -> number), evaluated at scrape time, as gauge ``cxr_lens_<name>``."""
        self.registry.register(_CallbackGauge(f"{PREFIX}_{name}", doc, labels, read))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _CallbackGauge(Collector):
    def __init__(
        self, name: str, doc: str, labels: tuple[str, ...], read: Callable[[], Mapping[tuple[str, ...], float]]
    ) -> None:
        self._name, self._doc, self._labels, self._read = name, doc, list(labels), read

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(self._name, self._doc, labels=self._labels)
        for key, value in sorted(self._read().items()):
            family.add_metric(list(key), value)
        yield family

    def describe(self) -> Iterable[Metric]:
        # Describing without reading keeps registration free of database access.
        return [GaugeMetricFamily(self._name, self._doc, labels=self._labels)]


HealthCheck = Callable[[], dict[str, Any]]


class MetricsServer:
    """HTTP on a thread: ``GET /metrics`` (Prometheus text format) and ``GET /healthz`` (JSON).

    ``health()`` returns a dict with at least ``ok: bool``; ``/healthz`` answers 200 when ok, else 503.
    ``port=0`` picks a free port; read it back from :attr:`port`.
    """

    def __init__(self, metrics: Metrics, health: HealthCheck, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self._metrics = metrics
        self._health = health
        self._httpd = ThreadingHTTPServer((host, port), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def start(self) -> None:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="cxr-lens-http", daemon=True)
        self._thread.start()
        logger.info("HTTP /metrics and /healthz on port %d", self.port)

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._httpd.server_close()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        metrics, health = self._metrics, self._health

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._reply(HTTPStatus.OK, CONTENT_TYPE_LATEST, metrics.exposition())
                elif path == "/healthz":
                    body = health()
                    status = HTTPStatus.OK if body.get("ok") else HTTPStatus.SERVICE_UNAVAILABLE
                    self._reply(status, "application/json", json.dumps(body, sort_keys=True).encode())
                else:
                    self._reply(HTTPStatus.NOT_FOUND, "text/plain; charset=utf-8", b"not found\n")

            def _reply(self, status: HTTPStatus, content_type: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
                logger.debug("http: " + format, *args)  # noqa: G003 (the stdlib hands us a format and its args)

        return Handler
