"""Deliver ORU messages from the durable outbox to one MLLP receiver, in FIFO order.

Delivery is at-least-once: an item is marked done only after its ACK has arrived. If the node dies between the
receiver's commit and our ``mark_done`` (or the ACK is lost), the same bytes, with the same MSH-10, are sent
again after restart. Receivers make that exactly-once by discarding a repeated MSH-10 (see the README).
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable

from dicom_node.deliver.mllp import (
    ENCODING,
    Ack,
    Disposition,
    MLLPError,
    message_control_id,
    send_message,
)
from dicom_node.settings import HL7Settings
from dicom_node.storage.outbox import Outbox, OutboxItem, backoff_delay

log = logging.getLogger(__name__)

CHANNEL = "hl7"
IDLE_POLL_S = 0.5  # how often an idle sender looks for new items (another thread or process may add them)

SendFunction = Callable[..., Ack]


class HL7Sender:
    """Sends the ``hl7`` items of one destination (``settings.host:settings.port``) from an :class:`Outbox`.

    Over TLS when ``settings.tls.enabled`` (or when ``ssl_context`` is given, which takes precedence).
    """

    def __init__(
        self,
        outbox: Outbox,
        settings: HL7Settings,
        *,
        ssl_context: ssl.SSLContext | None = None,
        send: SendFunction = send_message,
    ) -> None:
        self.outbox = outbox
        self.settings = settings
        self.ssl_context = ssl_context if ssl_context is not None else (
            settings.tls.context() if settings.tls.enabled else None
        )
        self._send = send

    @property
    def destination(self) -> str:
        return f"{self.settings.host}:{self.settings.port}"

    def enqueue(self, message: str, dedup_key: str, *, resend: bool = False) -> int:
        """Store a message durably for delivery; the same ``dedup_key`` is stored once (see Outbox.enqueue)."""
        return self.outbox.enqueue(CHANNEL, self.destination, dedup_key, message.encode(ENCODING), resend=resend)

    def run_once(self, now: float | None = None) -> int:
        """Send the due items at the head of the queue, oldest first; return the number of attempts made.

        Stops at the first item that must wait (its retry is not due yet): nothing overtakes it.
        """
        attempts = 0
        while (item := self.outbox.due(CHANNEL, self.destination, now)) is not None:
            self._attempt(item, now)
            attempts += 1
        return attempts

    def run_forever(self, stop: threading.Event) -> None:
        """Deliver until ``stop`` is set, sleeping until the head item is due (at most :data:`IDLE_POLL_S`)."""
        while not stop.is_set():
            self.run_once()
            head = self.outbox.head(CHANNEL, self.destination)
            wait = IDLE_POLL_S if head is None else min(IDLE_POLL_S, max(0.0, head.next_attempt_at - time.time()))
            stop.wait(wait)

    def _attempt(self, item: OutboxItem, now: float | None) -> None:
        message = item.payload.decode(ENCODING)
        try:
            ack = self._send(
                self.settings.host,
                self.settings.port,
                message,
                timeout_s=self.settings.ack_timeout_s,
                ssl_context=self.ssl_context,
            )
        except MLLPError as exc:
            disposition, outcome, error = exc.disposition, exc.outcome, str(exc)
        else:
            disposition, outcome = ack.disposition, ack.code
            error = f"{ack.code}: {ack.text}" if ack.text else ack.code
        # Receivers' error texts may echo message content (patient data): they go to the outbox, not the log.
        control_id = message_control_id(message)
        if disposition is Disposition.DONE:
            self.outbox.mark_done(item.id)
            log.info("HL7 %s delivered to %s (%s)", control_id, self.destination, outcome)
        elif disposition is Disposition.PARK:
            self.outbox.park(item.id, error)
            log.error("HL7 %s parked: %s answered %s (outbox item %d)", control_id, self.destination, outcome, item.id)
        else:
            delay = backoff_delay(item.attempts, self.settings.retry_initial_s, self.settings.retry_max_s)
            # Counted from the end of this attempt: a timeout must not eat the backoff.
            self.outbox.mark_retry(item.id, error, (time.time() if now is None else now) + delay)
            log.warning("HL7 %s to %s: %s; retry in %.1f s", control_id, self.destination, outcome, delay)
