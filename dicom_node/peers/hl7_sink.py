"""A small MLLP receiver for demos and tests (``cxr-lens hl7-sink``): stores every message, answers one ACK code.

Not a production interface engine: one thread per connection, no deduplication. With an ``ssl_context`` it
speaks MLLP over TLS; the handshake runs in the connection's thread with a timeout, never in the accept loop.
"""

from __future__ import annotations

import logging
import re
import socket
import socketserver
import ssl
import threading
from pathlib import Path
from typing import Literal

from dicom_node.deliver.mllp import (
    ENCODING,
    END_BLOCK,
    START_BLOCK,
    build_ack,
    frame,
    message_control_id,
)

logger = logging.getLogger(__name__)

SinkMode = Literal["AA", "AE", "AR"]
SINK_MODES: tuple[SinkMode, ...] = ("AA", "AE", "AR")
MAX_MESSAGE_BYTES = 64 << 20
_POLL_S = 0.1
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_STORED = re.compile(r"^(\d+)_")


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        conn: socket.socket = self.request
        context = self.server.sink.ssl_context
        if context is None:
            self._serve(conn)
            return
        peer = str(self.client_address[0])
        try:
            tls = context.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        except OSError as exc:  # ssl.SSLError included
            logger.warning("hl7-sink: %s: connection lost before TLS (%s)", peer, type(exc).__name__)
            return
        with tls:
            try:
                tls.settimeout(self.server.sink.handshake_timeout_s)
                tls.do_handshake()
            except ssl.SSLError as exc:
                logger.warning("hl7-sink: %s: TLS handshake failed (%s)", peer, exc.reason or type(exc).__name__)
                return
            except OSError as exc:  # TimeoutError included
                logger.warning("hl7-sink: %s: no TLS handshake (%s)", peer, type(exc).__name__)
                return
            self._serve(tls)

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(_POLL_S)
        buffer = bytearray()
        while not self.server.stopping.is_set():
            end = buffer.find(END_BLOCK)
            if end >= 0:
                block, buffer = bytes(buffer[: end + len(END_BLOCK)]), buffer[end + len(END_BLOCK) :]
                start = block.find(START_BLOCK)
                if start >= 0:
                    reply = self.server.sink.receive(block[start + 1 : -len(END_BLOCK)])
                    conn.sendall(frame(reply))
                continue
            if len(buffer) > MAX_MESSAGE_BYTES:
                logger.warning("hl7-sink: message over %d bytes; closing the connection", MAX_MESSAGE_BYTES)
                return
            try:
                chunk = conn.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                return
            buffer += chunk


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = False  # stop() joins the connection threads

    def __init__(self, address: tuple[str, int], sink: HL7Sink) -> None:
        self.sink = sink
        self.stopping = threading.Event()
        super().__init__(address, _Handler)


class HL7Sink:
    """MLLP receiver on ``host:port`` (port 0 picks a free one, see :attr:`port`) that stores what it receives.

    Each message is written to ``<out_dir>/<n>_<MSH-10>.hl7`` (n counts on from the files already there) and
    answered with ``mode``: ``AA`` accept, ``AE`` application error, ``AR`` reject; MSA-2 echoes MSH-10.
    """

    def __init__(
        self,
        host: str,
        port: int,
        out_dir: Path | str,
        mode: SinkMode = "AA",
        *,
        ssl_context: ssl.SSLContext | None = None,
        handshake_timeout_s: float = 10.0,
    ) -> None:
        if mode not in SINK_MODES:
            raise ValueError(f"mode must be one of {', '.join(SINK_MODES)}")
        self.host = host
        self.out_dir = Path(out_dir)
        self.mode: SinkMode = mode
        self.port = port
        self.ssl_context = ssl_context
        self.handshake_timeout_s = handshake_timeout_s
        self._lock = threading.Lock()
        self._count = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind and serve in a background thread; :attr:`port` is the bound port afterwards."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._count = max((int(m.group(1)) for p in self.out_dir.iterdir() if (m := _STORED.match(p.name))), default=0)
        self._server = _Server((self.host, self.port), self)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(_POLL_S,), name="hl7-sink", daemon=True
        )
        self._thread.start()
        logger.info("hl7-sink listening on %s:%d%s, answering %s, storing in %s", self.host, self.port,
                 " (TLS)" if self.ssl_context is not None else "", self.mode, self.out_dir)

    def stop(self) -> None:
        """Stop accepting, close connections and wait for their threads."""
        if self._server is None:
            return
        self._server.stopping.set()
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()
        self._server = None

    def __enter__(self) -> HL7Sink:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def receive(self, data: bytes) -> str:
        """Store one message and return the ACK to send back."""
        message = data.decode(ENCODING, errors="replace")
        control_id = message_control_id(message)
        with self._lock:
            self._count += 1
            path = self.out_dir / f"{self._count:06d}_{_UNSAFE.sub('_', control_id) or 'unknown'}.hl7"
        tmp = path.with_suffix(".part")
        tmp.write_bytes(data)
        tmp.replace(path)
        text = "" if self.mode == "AA" else f"hl7-sink answers {self.mode}"
        ack = build_ack(message, self.mode, text)
        logger.info("hl7-sink: %s stored as %s, answered %s", control_id or "(no MSH-10)", path.name, self.mode)
        return ack


def run_sink_forever(
    host: str,
    port: int,
    out_dir: Path | str,
    mode: SinkMode = "AA",
    *,
    stop: threading.Event | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> None:
    """Run an :class:`HL7Sink` until ``stop`` is set or the process is interrupted (Ctrl-C)."""
    stop = stop or threading.Event()
    with HL7Sink(host, port, out_dir, mode, ssl_context=ssl_context):
        try:
            while not stop.wait(_POLL_S):
                pass
        except KeyboardInterrupt:
            logger.info("hl7-sink: interrupted")
