"""Deliver ORU messages from the durable outbox to one MLLP receiver, in FIFO order.

Delivery is at-least-once: an item is marked done only after its ACK has arrived. If the node dies between the
receiver's commit and our ``mark_done`` (or the ACK is lost), the same bytes, with the same MSH-10, are sent
again after restart. Receivers make that exactly-once by discarding a repeated MSH-10 (see the README).
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Sequence

from dicom_node.deliver.mllp import ENCODING, Ack, MLLPError, message_control_id, send_message
from dicom_node.deliver.sender import OutboxSender, Outcome
from dicom_node.ops.metrics import Metrics
from dicom_node.settings import HL7Settings
from dicom_node.storage.backend import OutboxStore
from dicom_node.storage.outbox import OutboxItem

CHANNEL = "hl7"
IDLE_POLL_S = 0.5  # how often an idle sender looks for items it was not woken for (another process's)

SendFunction = Callable[..., Ack]


class HL7Sender(OutboxSender):
    """Sends the ``hl7`` items of one destination (``settings.host:settings.port``) from an outbox.

    Over TLS when ``settings.tls.enabled`` (or when ``ssl_context`` is given, which takes precedence).
    """

    channel = CHANNEL

    def __init__(
        self,
        outbox: OutboxStore,
        settings: HL7Settings,
        *,
        ssl_context: ssl.SSLContext | None = None,
        send: SendFunction = send_message,
        metrics: Metrics | None = None,
        poll_s: float = IDLE_POLL_S,
    ) -> None:
        super().__init__(outbox, retry_initial_s=settings.retry_initial_s, retry_max_s=settings.retry_max_s,
                         metrics=metrics, poll_s=poll_s)
        self.settings = settings
        self.ssl_context = ssl_context if ssl_context is not None else (
            settings.tls.context() if settings.tls.enabled else None
        )
        self._send = send

    @property
    def destination(self) -> str:
        return f"{self.settings.host}:{self.settings.port}"

    def destinations(self) -> Sequence[str]:
        return (self.destination,)

    def describe(self, item: OutboxItem) -> str:
        return f"HL7 {message_control_id(item.payload.decode(ENCODING, errors='replace'))}"

    def enqueue(self, message: str, dedup_key: str, *, resend: bool = False) -> int:
        """Store a message durably for delivery; the same ``dedup_key`` is stored once (see Outbox.enqueue)."""
        return self._store(self.destination, dedup_key, message.encode(ENCODING), resend=resend)

    def attempt(self, destination: str, item: OutboxItem, now: float | None) -> int:
        """One MLLP send of ``item`` and its ACK."""
        try:
            ack = self._send(
                self.settings.host,
                self.settings.port,
                item.payload.decode(ENCODING),
                timeout_s=self.settings.ack_timeout_s,
                ssl_context=self.ssl_context,
            )
        except MLLPError as exc:
            outcome = Outcome(exc.disposition, exc.outcome, str(exc))
        else:
            outcome = Outcome(ack.disposition, ack.code, f"{ack.code}: {ack.text}" if ack.text else ack.code)
        self.settle(destination, item, outcome, now)
        return 1
