"""The one delivery policy of every channel: take the outbox head of each destination when it is due, attempt it,
and settle the outcome (done, retry with exponential backoff, or park), with metrics and one log line.

A channel (:class:`~dicom_node.deliver.dicom.DicomSender`, :class:`~dicom_node.deliver.hl7.HL7Sender`) supplies
only its destinations and the attempt itself, whose outcomes it maps to a :class:`Disposition` through its own
table (C-STORE statuses, MLLP ACK codes).

Items of one destination leave in FIFO order: the head blocks the items behind it until it is done or parked.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from dicom_node.ops.metrics import DeliveryCounters, Metrics
from dicom_node.storage.backend import OutboxStore
from dicom_node.storage.outbox import OutboxItem, backoff_delay

logger = logging.getLogger(__name__)


class Disposition(enum.Enum):
    """What the outbox does with an item after one attempt."""

    DONE = "done"  # accepted: mark delivered
    RETRY = "retry"  # try again later, with backoff; the item keeps its place at the head of the queue
    PARK = "park"  # the receiver refused the content: retrying cannot help; alert a human


@dataclass(frozen=True)
class Outcome:
    """The result of one attempt on one item.

    ``code`` names the outcome in the channel's table and is logged; ``detail`` goes to the outbox (shown by
    ``cxr-lens status``) and may quote the receiver, whose texts can echo patient data, so it is never logged.
    """

    disposition: Disposition
    code: str
    detail: str


class OutboxSender(ABC):
    """Delivers one outbox channel to its destinations: the loop, the wait, the backoff and the bookkeeping.

    Subclasses set :attr:`channel` and implement :meth:`destinations`, :meth:`describe` and :meth:`attempt`.
    """

    #: The outbox channel this sender serves.
    channel: ClassVar[str]

    def __init__(
        self,
        outbox: OutboxStore,
        *,
        retry_initial_s: float,
        retry_max_s: float,
        metrics: Metrics | None,
        poll_s: float,
    ) -> None:
        self.outbox = outbox
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.metrics = metrics
        self._counters: DeliveryCounters | None = metrics.delivery(self.channel) if metrics is not None else None
        self._poll_s = poll_s
        self._wake = threading.Event()

    @abstractmethod
    def destinations(self) -> Sequence[str]:
        """The outbox destination keys this sender serves."""

    @abstractmethod
    def describe(self, item: OutboxItem) -> str:
        """How log lines name an item, without patient data (``SC 12 (hash)``, ``HL7 <MSH-10>``)."""

    @abstractmethod
    def attempt(self, destination: str, item: OutboxItem, now: float | None) -> int:
        """Attempt the due ``item`` (the head of ``destination``) and settle it with :meth:`settle`.

        May go on with the items behind it while they are due (one association for several C-STOREs); returns
        the number of sends made (an item parked without being sent counts 0).
        """

    def wake(self) -> None:
        """End the current wait of :meth:`run_forever` now (an item was queued, or the node is stopping)."""
        self._wake.set()

    def _store(
        self, destination: str, dedup_key: str, payload: bytes, *, resend: bool, source_received_at: float | None = None
    ) -> int:
        item_id = self.outbox.enqueue(self.channel, destination, dedup_key, payload, resend=resend,
                                      source_received_at=source_received_at)
        self._wake.set()
        return item_id

    def run_forever(self, stop_event: threading.Event) -> None:
        """Deliver until ``stop_event`` is set; wakes at once on :meth:`wake`, else when the first head is due."""
        while not stop_event.is_set():
            wait = self._poll_s
            try:
                self.run_once()
                wait = self._seconds_to_next_due()
            except Exception:  # noqa: BLE001 (a sender bug or a storage outage must not end delivery; items stay)
                logger.exception("%s sender loop error", self.channel)
            self._wake.wait(wait)
            self._wake.clear()

    def _seconds_to_next_due(self) -> float:
        now = time.time()
        wait = self._poll_s  # other threads or processes may add items without waking us
        for destination in self.destinations():
            head = self.outbox.head(self.channel, destination)
            if head is not None:
                wait = min(wait, max(0.0, head.next_attempt_at - now))
        return wait

    def run_once(self, now: float | None = None) -> int:
        """Attempt every due item once, per destination in FIFO order; returns the number of sends made.

        A destination stops at its first item that must wait (a retry not due yet): nothing overtakes it.
        ``now`` stands in for the clock (tests); by default, the time of each check.
        """
        sends = 0
        for destination in self.destinations():
            item = self.due(destination, now)
            while item is not None:
                sends += self.attempt(destination, item, now)
                following = self.due(destination, now)
                if following is not None and (following.id, following.attempts) == (item.id, item.attempts):
                    # An attempt that settles nothing would spin here; run_forever logs this and waits.
                    raise RuntimeError(f"{self.channel} attempt left outbox item {item.id} unsettled")
                item = following
        return sends

    def due(self, destination: str, now: float | None = None) -> OutboxItem | None:
        """The head of ``destination`` if it is due, else None."""
        return self.outbox.due(self.channel, destination, now)

    def settle(self, destination: str, item: OutboxItem, outcome: Outcome, now: float | None = None) -> None:
        """Record ``outcome`` in the outbox, count it and log it once."""
        name = self.describe(item)
        if outcome.disposition is Disposition.DONE:
            self.outbox.mark_done(item.id)
            if self._counters is not None:
                self._counters.sent.inc()
            logger.info("%s delivered to %s: %s", name, destination, outcome.code)
        elif outcome.disposition is Disposition.RETRY:
            delay = backoff_delay(item.attempts, self.retry_initial_s, self.retry_max_s)
            # Counted from the end of this attempt: a timeout must not eat the backoff.
            self.outbox.mark_retry(item.id, outcome.detail, (time.time() if now is None else now) + delay)
            if self._counters is not None:
                self._counters.retries.inc()
            logger.warning("%s to %s: %s; retry in %.1f s", name, destination, outcome.code, delay)
        else:
            self.outbox.park(item.id, outcome.detail)
            if self._counters is not None:
                self._counters.parked.inc()
            logger.error("%s to %s parked: %s (outbox item %d)", name, destination, outcome.code, item.id)
