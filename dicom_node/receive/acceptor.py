"""Accepting associations: who may connect, TLS outside the accept loop, PDU lengths checked before reading.

pynetdicom's association server accepts connections in one thread and starts each association from a request
thread. Each check below runs at the earliest point that has what it needs:

1. Source address, in the accept loop (:meth:`GuardedAssociationServer.verify_request`, no I/O): a peer outside
   ``node.allowed_networks`` is disconnected before the TLS handshake and before any PDU; it learns nothing, not
   even that a DICOM application listens.
2. TLS handshake, in the connection's request thread with a timeout. pynetdicom 3.0.4 wraps the socket in the
   accept loop with ``do_handshake_on_connect=True`` and no timeout, so one client that never sends a
   ClientHello stalls every other peer; here the server gets no ``ssl_context`` and wraps the socket itself.
3. Calling AE title: pynetdicom's ``AE.require_calling_aet`` answers A-ASSOCIATE-RJ (result 1 rejected-permanent,
   source 1 service-user, reason 3 calling-AE-title-not-recognized, PS3.8 9.3.4); :func:`_on_rejected` logs and
   counts it together with the other rejections.
4. PDU length: pynetdicom reads the 6-byte PDU header, then as many bytes as the header declares (up to 4 GiB),
   without comparing it with the maximum we negotiated. :class:`_PduLengthGuard` checks the header first: a
   P-DATA-TF longer than our Maximum Length Received (PS3.8 D.1; 0 = no limit), or any other PDU longer than
   ``max_associate_rq_bytes``, gets an A-ABORT (source 2, reason 6 invalid-PDU-parameter value, PS3.8 9.3.8)
   and the connection is closed with the body unread.

A connection that closes, or is aborted by the guard, before its A-ASSOCIATE-RQ ends its association at once;
pynetdicom would keep it (and one of ``node.max_associations``) waiting for the ACSE timeout.

Item 4 and that early end use pynetdicom internals (``RequestHandler._create_association``, the DUL calling
``AssociationSocket.recv`` for the header and then for the body, the DUL's queue to the association):
pyproject.toml pins pynetdicom below 3.1, and tests/test_access_tls.py fails if any of them stops working.

Refusals are logged with the peer's address and AE title only (never data-set content) and counted in
``cxr_lens_associations_refused_total{reason=...}``.
"""

from __future__ import annotations

import enum
import ipaddress
import logging
import socket
import socketserver
import ssl
import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.events import Event, EventHandlerType
from pynetdicom.transport import (
    AssociationSocket,
    RequestHandler,
    ThreadedAssociationServer,
)
from pynetdicom.utils import make_target

from dicom_node.ops.metrics import Metrics

logger = logging.getLogger(__name__)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

PDU_HEADER_LENGTH = 6  # PDU-type, reserved, PDU-length (4 bytes, big endian): PS3.8 9.3.1
P_DATA_TF = 0x04
#: A-ABORT PDU (PS3.8 9.3.8): type 7, length 4; source 2 (service-provider), reason 6 (invalid-PDU-parameter value).
ABORT_INVALID_PDU_PARAMETER = struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, 0x02, 0x06)


class Refusal(enum.StrEnum):
    """Why a peer was turned away: the ``reason`` label of ``cxr_lens_associations_refused_total``."""

    NETWORK = "network"
    TLS_HANDSHAKE = "tls_handshake"
    CALLING_AE_TITLE = "calling_ae_title"
    CALLED_AE_TITLE = "called_ae_title"
    ASSOCIATION_LIMIT = "association_limit"
    PDU_LENGTH = "pdu_length"
    OTHER = "other"


#: A-ASSOCIATE-RJ (result, source, reason/diag.) -> refusal (PS3.8 Table 9-21).
REJECT_REFUSAL: dict[tuple[int, int, int], Refusal] = {
    (0x01, 0x01, 0x03): Refusal.CALLING_AE_TITLE,
    (0x01, 0x01, 0x07): Refusal.CALLED_AE_TITLE,
    (0x02, 0x03, 0x01): Refusal.ASSOCIATION_LIMIT,  # temporary congestion
    (0x02, 0x03, 0x02): Refusal.ASSOCIATION_LIMIT,  # local limit exceeded
}


@dataclass(frozen=True)
class AcceptPolicy:
    """What an association server checks before and while it reads from a peer (see the module docstring)."""

    name: str
    allowed_networks: tuple[IPNetwork, ...] = ()
    tls_context: ssl.SSLContext | None = None
    handshake_timeout_s: float = 10.0
    max_associate_rq_bytes: int = 262_144
    metrics: Metrics | None = None

    def network_allowed(self, host: str) -> bool:
        """Whether ``host`` (as accepted; an IPv4-mapped IPv6 address counts as IPv4) lies in an allowed network."""
        if not self.allowed_networks:
            return True
        try:
            ip = ipaddress.ip_address(host)  # a zone ("fe80::1%eth0") is kept and does not affect membership
        except ValueError:
            return False
        candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [ip]
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            candidates.append(ip.ipv4_mapped)
        return any(addr in net for addr in candidates for net in self.allowed_networks if addr.version == net.version)

    def refuse(self, reason: Refusal, peer: str, detail: str) -> None:
        logger.warning("%s: peer %s refused (%s): %s", self.name, peer, reason.value, detail)
        if self.metrics is not None:
            self.metrics.associations_refused.labels(reason=reason.value).inc()


def warn_if_open(name: str, allowed_calling_aets: Iterable[str], allowed_networks: Iterable[IPNetwork]) -> None:
    """One WARNING at start when either allowlist is empty (anyone who knows our AE title may store)."""
    open_checks = []
    if not tuple(allowed_calling_aets):
        open_checks.append("any calling AE title (node.allowed_calling_aets is empty)")
    if not tuple(allowed_networks):
        open_checks.append("any source address (node.allowed_networks is empty)")
    if open_checks:
        logger.warning("%s: access is open: %s", name, "; ".join(open_checks))


_FIRST_READ = 1 << 20  # bytes: the receive buffer's first size (see _PduLengthGuard._recv_exact)


class _PduLengthGuard(AssociationSocket):
    """An :class:`AssociationSocket` that reads a PDU's body only when the header declares an acceptable length."""

    policy: AcceptPolicy
    _body_pending: bool

    def arm(self, policy: AcceptPolicy) -> None:
        self.policy = policy
        self._body_pending = False

    def recv(self, nr_bytes: int) -> bytearray:
        if self._body_pending:  # the DUL now reads the body of the header just checked
            self._body_pending = False
            return self._recv_exact(nr_bytes)
        try:
            data = self._recv_exact(nr_bytes)
        except OSError:  # reset by the peer: the DUL ends the connection
            self._release_slot()
            raise
        if nr_bytes != PDU_HEADER_LENGTH:
            return data
        if len(data) != PDU_HEADER_LENGTH:  # closed by the peer: the DUL ends the connection
            self._release_slot()
            return data
        pdu_type, _, length = struct.unpack(">BBL", data)
        limit = self.assoc.acceptor.maximum_length if pdu_type == P_DATA_TF else self.policy.max_associate_rq_bytes
        if limit and length > limit:
            self._abort(pdu_type, length, limit)
            self._release_slot()
            # An empty read is "transport closed" to the DUL: it closes the socket and ends the association.
            return bytearray()
        self._body_pending = True
        return data

    def _recv_exact(self, nr_bytes: int) -> bytearray:
        """``nr_bytes`` from the socket, or fewer when the peer closes; what pynetdicom's ``recv`` returns.

        Written here because pynetdicom reads in 4 KiB pieces: a 7 MB radiograph is ~1,800 ``recv`` calls, each
        giving up the GIL and waiting up to the switch interval (5 ms) to get it back while the node's other
        threads are busy. Measured on the 2-core node under load, that wait, not the bytes, set the C-STORE
        reply time. Here each ``recv_into`` takes whatever the kernel holds. The buffer grows (doubling, from
        1 MiB) only as bytes arrive, so a header that declares a huge length (``node.max_pdu = 0``: no limit)
        costs memory only for what the peer actually sends.
        """
        sock = self.socket
        assert sock is not None
        buffer = bytearray(min(nr_bytes, _FIRST_READ))
        read = 0
        while read < nr_bytes:
            if read == len(buffer):
                buffer.extend(bytes(min(nr_bytes - read, len(buffer))))
            with memoryview(buffer) as view:
                n = sock.recv_into(view[read:], len(buffer) - read)
            if not n:  # closed by the peer: return what arrived, as pynetdicom does
                break
            read += n
        if read < len(buffer):
            del buffer[read:]
        return buffer

    def _release_slot(self) -> None:
        # Before its A-ASSOCIATE-RQ, the association thread waits for one for the ACSE timeout (30 s), holding a
        # slot of node.max_associations; a connection that closes (a port probe) or is aborted here would hold
        # it that long. An empty item is what that wait returns on timeout: the association ends now.
        if self.assoc.requestor.primitive is None:
            self.assoc.dul.to_user_queue.put(None)  # type: ignore[arg-type]  # what pynetdicom's own wait returns

    def _abort(self, pdu_type: int, length: int, limit: int) -> None:
        peer = self.assoc.requestor.address
        ae_title = str(self.assoc.requestor.ae_title or "").strip()
        self.policy.refuse(
            Refusal.PDU_LENGTH, peer,
            f"PDU type 0x{pdu_type:02X} declares {length} bytes, limit {limit}"
            + (f" (calling AE {ae_title!r})" if ae_title else "")
            + "; A-ABORT sent, body not read",
        )
        if self.socket is not None:
            try:
                self.socket.sendall(ABORT_INVALID_PDU_PARAMETER)
            except OSError:
                pass  # the peer is gone already; the connection is closed either way


class _GuardedRequestHandler(RequestHandler):
    """Runs in the connection's own request thread: TLS handshake with a timeout, then pynetdicom's handling."""

    server: GuardedAssociationServer

    def handle(self) -> None:
        policy = self.server.policy
        if policy.tls_context is not None:
            tls = _tls_handshake(self.request, policy, str(self.client_address[0]))
            if tls is None:
                return
            self.request = tls
        super().handle()

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        # pynetdicom builds the AssociationSocket itself (and queues its transport event): extend that object.
        sock = assoc.dul.socket
        assert sock is not None
        sock.__class__ = _PduLengthGuard
        cast(_PduLengthGuard, sock).arm(self.server.policy)
        return assoc


def _tls_handshake(raw: socket.socket, policy: AcceptPolicy, peer: str) -> ssl.SSLSocket | None:
    assert policy.tls_context is not None
    tls: ssl.SSLSocket | None = None
    try:
        tls = policy.tls_context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
        tls.settimeout(policy.handshake_timeout_s)
        tls.do_handshake()
        tls.settimeout(None)  # as pynetdicom expects of an accepted socket: blocking, read when select() says so
        return tls
    except OSError as exc:  # ssl.SSLError and TimeoutError included
        policy.refuse(Refusal.TLS_HANDSHAKE, peer, _handshake_failure(exc, policy.handshake_timeout_s))
        (tls if tls is not None else raw).close()
        return None


def _handshake_failure(exc: OSError, timeout_s: float) -> str:
    if isinstance(exc, ssl.SSLError):  # e.g. TLSV1_ALERT_UNKNOWN_CA, PEER_DID_NOT_RETURN_A_CERTIFICATE
        return f"TLS handshake failed: {exc.reason or type(exc).__name__}"
    if isinstance(exc, TimeoutError):
        return f"no TLS handshake within {timeout_s:g} s"
    return f"connection lost during the TLS handshake ({type(exc).__name__})"


class GuardedAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the checks of :class:`AcceptPolicy` (see the module docstring)."""

    def __init__(self, *args: Any, policy: AcceptPolicy, **kwargs: Any) -> None:
        self.policy = policy
        super().__init__(*args, request_handler=_GuardedRequestHandler, **kwargs)  # type: ignore[misc]

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """socketserver's hook, in the accept loop: a refused peer's socket is closed before anything is read."""
        host = str(client_address[0])
        if self.policy.network_allowed(host):
            return True
        self.policy.refuse(Refusal.NETWORK, host, "source address not in node.allowed_networks; disconnected")
        return False

    def service_actions(self) -> None:
        """socketserver's hook after each accept or poll: nothing to do.

        pynetdicom's version forces a full ``gc.collect()`` every 60 calls to free ended association threads. In a
        node that also holds a model, that collection walks every framework object while holding the GIL, and
        C-STORE answers wait behind it; the interpreter's own collector frees those threads' cycles anyway.
        """

    def shutdown(self) -> None:
        # pynetdicom's shutdown() also removes the server from AE._servers, where only AE.start_server() puts it.
        socketserver.BaseServer.shutdown(self)
        self.server_close()


def _on_rejected(event: Event, policy: AcceptPolicy) -> None:
    """``evt.EVT_REJECTED``: log and count every A-ASSOCIATE-RJ we send."""
    rsp = event.assoc.acceptor.primitive
    key = (0, 0, 0) if rsp is None else (int(rsp.result or 0), int(rsp.result_source or 0), int(rsp.diagnostic or 0))
    calling = str(event.assoc.requestor.ae_title or "").strip()
    policy.refuse(
        REJECT_REFUSAL.get(key, Refusal.OTHER), event.assoc.requestor.address,
        f"calling AE {calling!r}: A-ASSOCIATE-RJ (result {key[0]}, source {key[1]}, reason {key[2]})",
    )


def start_server(
    ae: AE, address: tuple[str, int], policy: AcceptPolicy, evt_handlers: list[EventHandlerType]
) -> GuardedAssociationServer:
    """Start ``ae`` as an acceptor on ``address`` in a background thread, with ``policy``'s checks."""
    handlers: list[EventHandlerType] = [*evt_handlers, (evt.EVT_REJECTED, _on_rejected, [policy])]
    server = ae.make_server(
        address, evt_handlers=handlers, server_class=GuardedAssociationServer, policy=policy
    )
    assert isinstance(server, GuardedAssociationServer)
    name = f"AcceptorServer@{datetime.now():%Y%m%d%H%M%S}"
    threading.Thread(target=make_target(server.serve_forever), name=name, daemon=True).start()
    return server
