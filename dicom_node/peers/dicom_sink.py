"""A small Storage SCP that plays the PACS in the demo and in tests.

It accepts every storage SOP class in every transfer syntax pynetdicom knows, writes each instance as received
into ``out_dir`` and remembers it in :attr:`DicomSink.received`. ``refuse_with`` makes it answer every C-STORE
with that status instead (e.g. 0xA700 out of resources, 0xA900 data set does not match SOP Class), to exercise
a sender's retry and park paths. ``ssl_context`` makes it a TLS PACS (handshake outside the accept loop, as for
our own SCP: see :mod:`dicom_node.receive.acceptor`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node.receive.acceptor import (
    AcceptPolicy,
    GuardedAssociationServer,
    start_server,
)

logger = logging.getLogger(__name__)

_UID_RE = re.compile(r"^[0-9.]{1,64}$")


@dataclass(frozen=True)
class ReceivedInstance:
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    calling_ae: str
    path: Path


class DicomSink:
    """Storage SCP on ``host:port`` (``port=0``: a free one) writing instances to ``out_dir``."""

    def __init__(
        self,
        out_dir: Path | str,
        *,
        ae_title: str = "PACS",
        host: str = "127.0.0.1",
        port: int = 0,
        refuse_with: int | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.ae_title = ae_title
        self.host = host
        self.refuse_with = refuse_with
        self._requested_port = port
        self._lock = threading.Lock()
        self._received: list[ReceivedInstance] = []
        self._server: GuardedAssociationServer | None = None
        self._policy = AcceptPolicy(name=f"DICOM sink {ae_title}", tls_context=ssl_context)
        self._ae = AE(ae_title=ae_title)
        self._ae.add_supported_context(Verification)
        for cx in AllStoragePresentationContexts:
            if cx.abstract_syntax is not None:
                self._ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)

    @property
    def port(self) -> int:
        if self._server is None:
            return self._requested_port
        return int(self._server.server_address[1])

    @property
    def received(self) -> list[ReceivedInstance]:
        with self._lock:
            return list(self._received)

    def start(self) -> None:
        """Start listening; after a :meth:`stop` it listens again on the same port."""
        if self._server is not None:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        handlers: list[Any] = [(evt.EVT_C_STORE, self._handle_store), (evt.EVT_C_ECHO, lambda event: 0x0000)]
        self._server = start_server(self._ae, (self.host, self._requested_port), self._policy, handlers)
        self._requested_port = self.port
        logger.info("DICOM sink %s listening on %s:%d%s", self.ae_title, self.host, self.port,
                 " (TLS)" if self._policy.tls_context is not None else "")

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def wait_for(self, n: int, timeout: float = 10.0) -> list[ReceivedInstance]:
        """Wait until at least ``n`` instances arrived (or ``timeout``); returns what arrived."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.received
            if len(got) >= n:
                return got
            time.sleep(0.02)
        return self.received

    def _handle_store(self, event: Event) -> int:
        if self.refuse_with is not None:
            return self.refuse_with
        data = event.encoded_dataset()
        req = cast(C_STORE, event.request)
        uid = str(req.AffectedSOPInstanceUID)
        # UIDs come from the peer: use one as a file name only when it is a plain UID.
        name = uid if _UID_RE.match(uid) else hashlib.sha256(uid.encode()).hexdigest()
        path = self.out_dir / f"{name}.dcm"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        with self._lock:
            self._received.append(
                ReceivedInstance(
                    str(req.AffectedSOPClassUID), uid, str(event.context.transfer_syntax),
                    str(event.assoc.requestor.ae_title).strip(), path,
                )
            )
        return 0x0000
