"""Who may associate, TLS on every link, and PDU lengths checked before reading (acceptor.py, tls.py).

Real peers on free ports: our Storage SCP and sinks, pynetdicom SCUs, raw sockets that speak PS3.8 by hand.
Certificates come from a throw-away CA (tests/support/tls_certs.py).
"""

from __future__ import annotations

import gc
import logging
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node.cli import EXIT_CONFIG, main
from dicom_node.deliver.dicom import DicomSender
from dicom_node.deliver.hl7 import HL7Sender
from dicom_node.deliver.mllp import CONNECTION_FAILED, MLLPError, send_message
from dicom_node.errors import ConfigError
from dicom_node.ops.metrics import Metrics
from dicom_node.peers.dicom_sink import DicomSink
from dicom_node.peers.hl7_sink import HL7Sink
from dicom_node.peers.node_process import free_port
from dicom_node.peers.node_process import wait_until as _wait_until
from dicom_node.receive.acceptor import ABORT_INVALID_PDU_PARAMETER, AcceptPolicy
from dicom_node.receive.scp import StorageSCP
from dicom_node.settings import (
    DestinationSettings,
    HL7Settings,
    NodeSettings,
    load_settings,
)
from dicom_node.storage.jobs import JobQueue, jobs_path
from dicom_node.storage.outbox import Outbox
from dicom_node.storage.spool import Spool
from dicom_node.tls import client_context, server_context
from tests.support.peers import (
    fake_secondary_capture,
    needs_binary,
    run_tool,
    sample,
)
from tests.support.tls_certs import CertFiles, make_pki

AE_TITLE = "CXRLENS"
LOCAL = "127.0.0.1"

# pynetdicom 3.0.4 leaves an SCU's socket unclosed when the connection fails or the peer drops it
# (AssociationSocket._shutdown_socket: shutdown() raises before close(); pydicom/pynetdicom#979, fixed by #999).
# Only that ResourceWarning is silenced, and only in the tests whose SCU is meant to fail; they collect garbage
# before they end, so that the warning is raised (and ignored) inside them.
PYNETDICOM_FAILED_SCU_SOCKET = pytest.mark.filterwarnings(
    "ignore:unclosed <socket.socket:ResourceWarning", "ignore:unclosed <ssl.SSLSocket:ResourceWarning"
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> CertFiles:
    return make_pki(tmp_path_factory.mktemp("pki"))


def server_tls(pki: CertFiles, **kw: object) -> dict[str, object]:
    return {"enabled": True, "cert_file": pki.server_cert, "key_file": pki.server_key, **kw}


def peer_context(pki: CertFiles, *, ca: Path | None = None, with_cert: bool = False) -> ssl.SSLContext:
    """A client's TLS context (ours, as the SCU and MLLP sender build it)."""
    return client_context(ca_file=ca or pki.ca, cert_file=pki.client_cert if with_cert else None,
                          key_file=pki.client_key if with_cert else None)


class Node:
    """Our Storage SCP on a free port with its own metrics."""

    def __init__(self, tmp_path: Path, **node: object) -> None:
        fields: dict[str, object] = {"ae_title": AE_TITLE, "host": LOCAL, "port": 0, "free_disk_floor_mb": 0,
                                     "spool_dir": tmp_path, **node}
        self.settings = NodeSettings(**fields)  # type: ignore[arg-type]
        self.queue = JobQueue(jobs_path(tmp_path))
        self.metrics = Metrics()
        self.scp = StorageSCP(self.settings, Spool(tmp_path), self.queue, metrics=self.metrics)
        self.scp.start()
        self.port = self.scp.port

    def refused(self, reason: str) -> float:
        value = self.metrics.registry.get_sample_value("cxr_lens_associations_refused_total", {"reason": reason})
        return value or 0.0

    def close(self) -> None:
        self.scp.stop()
        self.queue.close()


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    nodes: list[Node] = []

    def make(**node: object) -> Node:
        nodes.append(Node(tmp_path / f"node{len(nodes)}", **node))
        return nodes[-1]

    yield make
    for n in nodes:
        n.close()


def echo(port: int, *, tls: ssl.SSLContext | None = None, calling: str = "TESTSCU") -> tuple[bool, int | None]:
    """(association established?, C-ECHO status) from a pynetdicom SCU."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = 5
    assoc = ae.associate(LOCAL, port, ae_title=AE_TITLE, tls_args=(tls, "localhost") if tls is not None else None)
    if not assoc.is_established:
        return False, None
    try:
        return True, int(assoc.send_c_echo().Status)
    finally:
        assoc.release()


def wait_until(condition: Callable[[], bool], timeout: float = 3.0) -> bool:
    return _wait_until(condition, timeout, poll_s=0.01)


# --- access control ------------------------------------------------------------------------------------------


def test_unknown_calling_ae_title_gets_associate_rj_1_1_3(
    node_factory: Callable[..., Node], caplog: pytest.LogCaptureFixture
) -> None:
    node = node_factory(allowed_calling_aets=["MODALITY1"])
    caplog.set_level(logging.WARNING, logger="dicom_node")
    assert echo(node.port, calling="MODALITY1") == (True, 0x0000)

    ae = AE(ae_title="INTRUDER")
    ae.add_requested_context(Verification)
    assoc = ae.associate(LOCAL, node.port, ae_title=AE_TITLE)
    assert assoc.is_rejected
    rj = assoc.acceptor.primitive
    # PS3.8 9.3.4: rejected-permanent, DICOM UL service-user, calling-AE-title-not-recognized
    assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x03)
    assert wait_until(lambda: node.refused("calling_ae_title") == 1)
    (line,) = [r.getMessage() for r in caplog.records if "calling_ae_title" in r.getMessage()]
    assert "'INTRUDER'" in line and LOCAL in line


def test_source_outside_allowed_networks_is_closed_before_any_pdu(node_factory: Callable[..., Node]) -> None:
    node = node_factory(allowed_networks=["10.0.0.0/8", "fd00::/8"])
    with socket.create_connection((LOCAL, node.port), timeout=2) as raw:
        # No A-ASSOCIATE-RJ, no byte at all: the connection is closed as soon as it is accepted.
        assert raw.recv(64) == b""
    assert node.refused("network") == 1

    allowed = node_factory(allowed_networks=["127.0.0.0/8"])
    assert echo(allowed.port) == (True, 0x0000)
    assert allowed.refused("network") == 0


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("10.1.2.3", True),
        ("10.1.2.3%eth0", False),  # not an IP address without its zone; zones are IPv6-only
        ("192.168.1.9", False),
        ("::ffff:10.9.9.9", True),  # IPv4-mapped: what a dual-stack listener reports for an IPv4 peer
        ("fd00::1", True),
        ("fe80::1%eth0", False),
        ("2001:db8::1", False),
        ("not-an-address", False),
    ],
)
def test_network_allowlist_ipv4_ipv6(host: str, allowed: bool) -> None:
    nets = NodeSettings(allowed_networks=["10.0.0.0/8", "fd00::/8"]).allowed_networks
    assert AcceptPolicy(name="t", allowed_networks=nets).network_allowed(host) is allowed


def test_open_access_logs_one_warning(node_factory: Callable[..., Node], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="dicom_node")
    node_factory()
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "access is open" in warning.getMessage()
    caplog.clear()
    node_factory(allowed_calling_aets=["MODALITY1"], allowed_networks=["127.0.0.1/32"])
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_connection_closed_before_associate_rq_frees_its_slot(node_factory: Callable[..., Node]) -> None:
    node = node_factory()
    with socket.create_connection((LOCAL, node.port), timeout=2):
        assert wait_until(lambda: node.scp.active_associations == 1)
    # pynetdicom alone keeps it for the ACSE timeout (30 s), holding one of node.max_associations.
    assert wait_until(lambda: node.scp.active_associations == 0, timeout=2)


# --- configuration -------------------------------------------------------------------------------------------


def test_tls_file_errors_name_the_key(tmp_path: Path, pki: CertFiles) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    cases = [
        ({"node.tls.enabled": "true"}, "node.tls", "cert_file and key_file are required"),
        ({"node.tls.enabled": "true", "node.tls.cert_file": f"'{tmp_path / 'missing.pem'}'",
          "node.tls.key_file": f"'{pki.server_key}'"}, "node.tls.cert_file", "file"),
        ({"node.tls.enabled": "true", "node.tls.cert_file": f"'{garbage}'",
          "node.tls.key_file": f"'{pki.server_key}'"}, "node.tls", "cert_file"),
        ({"node.tls.enabled": "true", "node.tls.cert_file": f"'{pki.server_cert}'",
          "node.tls.key_file": f"'{pki.client_key}'"}, "node.tls", "key_file"),
        ({"node.tls.enabled": "true", "node.tls.cert_file": f"'{pki.server_cert}'",
          "node.tls.key_file": f"'{pki.server_key}'", "node.tls.require_client_cert": "true"},
         "node.tls", "ca_file"),
        ({"hl7.tls.enabled": "true", "hl7.tls.ca_file": f"'{garbage}'"}, "hl7.tls", "ca_file"),
        ({"node.allowed_networks": "['10.0.0.1/8']"}, "node.allowed_networks.0", "network"),
        ({"node.allowed_calling_aets": "['BACK\\\\SLASH']"}, "node.allowed_calling_aets", "AE title"),
    ]
    for overrides, key, text in cases:
        with pytest.raises(ConfigError) as err:
            load_settings(None, [f"{k}={v}" for k, v in overrides.items()])
        assert f"{key}:" in str(err.value) and text in str(err.value), (overrides, str(err.value))
    dest = tmp_path / "dest.toml"
    dest.write_text(f'[[destinations]]\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 4242\n'
                    f"[destinations.tls]\nenabled = true\ncert_file = '{pki.client_cert}'\n")
    with pytest.raises(ConfigError, match=r"destinations\.0\.tls: .*key_file"):
        load_settings(dest)
    assert main(["config", "--set", "node.tls.enabled=true"]) == EXIT_CONFIG


def test_contexts_need_tls_1_2_and_verify_peers(pki: CertFiles) -> None:
    server = server_context(pki.server_cert, pki.server_key, ca_file=pki.ca, require_client_cert=True)
    client = client_context(ca_file=pki.ca)
    assert server.minimum_version == client.minimum_version == ssl.TLSVersion.TLSv1_2
    assert server.verify_mode == client.verify_mode == ssl.CERT_REQUIRED
    assert client.check_hostname


# --- TLS -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_tls", [True, False], ids=["tls", "plain"])
def test_idle_client_does_not_stall_other_associations(
    node_factory: Callable[..., Node], pki: CertFiles, use_tls: bool
) -> None:
    """pynetdicom 3.0.4 handshakes in the accept loop: one silent client would block every other peer."""
    node = node_factory(tls=server_tls(pki, handshake_timeout_s=1.5)) if use_tls else node_factory()
    with socket.create_connection((LOCAL, node.port), timeout=5) as idle:
        time.sleep(0.05)  # accepted first
        started = time.monotonic()
        result = echo(node.port, tls=peer_context(pki) if use_tls else None)
        elapsed = time.monotonic() - started
        assert result == (True, 0x0000)
        assert elapsed < 1.0
        if use_tls:  # the silent client is dropped after the handshake timeout, and counted
            assert idle.recv(1) == b""
    if use_tls:
        assert wait_until(lambda: node.refused("tls_handshake") == 1)


@PYNETDICOM_FAILED_SCU_SOCKET
def test_tls_client_with_wrong_ca_fails(node_factory: Callable[..., Node], pki: CertFiles) -> None:
    node = node_factory(tls=server_tls(pki))
    assert echo(node.port, tls=peer_context(pki, ca=pki.other_ca)) == (False, None)
    assert echo(node.port) == (False, None)  # plain DICOM to a TLS port
    assert wait_until(lambda: node.refused("tls_handshake") == 2)
    assert echo(node.port, tls=peer_context(pki)) == (True, 0x0000)
    gc.collect()


@PYNETDICOM_FAILED_SCU_SOCKET
def test_mutual_tls_requires_a_client_certificate(node_factory: Callable[..., Node], pki: CertFiles) -> None:
    node = node_factory(tls=server_tls(pki, ca_file=pki.ca, require_client_cert=True))
    assert echo(node.port, tls=peer_context(pki)) == (False, None)
    assert wait_until(lambda: node.refused("tls_handshake") == 1)
    assert echo(node.port, tls=peer_context(pki, with_cert=True)) == (True, 0x0000)
    gc.collect()


def test_c_store_over_tls_end_to_end(tmp_path: Path, node_factory: Callable[..., Node], pki: CertFiles) -> None:
    """DicomSender (TLS, client certificate) to our SCP (mutual TLS) and to the TLS sink, in one run."""
    node = node_factory(tls=server_tls(pki, ca_file=pki.ca, require_client_cert=True))
    sink = DicomSink(tmp_path / "pacs", ae_title="PACS",
                     ssl_context=server_context(pki.server_cert, pki.server_key))
    sink.start()
    outbox = Outbox(tmp_path / "outbox.sqlite")
    try:
        tls = {"enabled": True, "ca_file": pki.ca, "cert_file": pki.client_cert, "key_file": pki.client_key}
        dests = [DestinationSettings(ae_title=AE_TITLE, host=LOCAL, port=node.port, tls=tls),  # type: ignore[arg-type]
                 DestinationSettings(ae_title="PACS", host=LOCAL, port=sink.port, tls=tls)]  # type: ignore[arg-type]
        sender = DicomSender(outbox, dests, ae_title="CXRLENS", timeout_s=5)
        sc = fake_secondary_capture(sample("RG1_UNCR.dcm").read_bytes())
        ids = sender.enqueue(sc, "sc-1")
        assert sender.run_once() == 2
        assert [outbox.get(i).state for i in ids] == ["done", "done"]  # type: ignore[union-attr]
        assert len(sink.received) == 1
        assert sum(node.queue.counts().values()) == 1  # our SCP spooled it and queued a job
    finally:
        outbox.close()
        sink.stop()


@PYNETDICOM_FAILED_SCU_SOCKET
def test_c_store_to_pacs_with_untrusted_certificate_is_retried(tmp_path: Path, pki: CertFiles) -> None:
    sink = DicomSink(tmp_path / "pacs", ae_title="PACS",
                     ssl_context=server_context(pki.server_cert, pki.server_key))
    sink.start()
    outbox = Outbox(tmp_path / "outbox.sqlite")
    try:
        dest = DestinationSettings(ae_title="PACS", host=LOCAL, port=sink.port,
                                   tls={"enabled": True, "ca_file": pki.other_ca})  # type: ignore[arg-type]
        sender = DicomSender(outbox, [dest], ae_title="CXRLENS", timeout_s=5)
        (item_id,) = sender.enqueue(fake_secondary_capture(sample("RG1_UNCR.dcm").read_bytes()), "sc-1")
        sender.run_once()
        item = outbox.get(item_id)
        assert item is not None and item.state == "pending" and "connection failed" in (item.last_error or "")
        assert sink.received == []
    finally:
        outbox.close()
        sink.stop()
    gc.collect()


ORU = (
    "MSH|^~\\&|CXR_LENS|RADIOLOGY|HS_RESULTS|HEALTHSHARE|20240305143015||ORU^R01^ORU_R01|TLS0001|P|2.5.1\r"
    "PID|1||P1\r"
    "OBR|1|||36643-5^XR Chest 2V^LN|||20240305143015|||||||||||||||||RAD|P\r"
    "OBX|1|ST|113014^DICOM Study^DCM||1.2.3.4||||||P\r"
)


def test_hl7_oru_over_tls_mllp_is_acknowledged(tmp_path: Path, pki: CertFiles) -> None:
    server = server_context(pki.server_cert, pki.server_key, ca_file=pki.ca, require_client_cert=True)
    with HL7Sink(LOCAL, 0, tmp_path / "hl7", ssl_context=server, handshake_timeout_s=2) as sink:
        settings = HL7Settings(host=LOCAL, port=sink.port, ack_timeout_s=5,
                               tls={"enabled": True, "ca_file": pki.ca,  # type: ignore[arg-type]
                                    "cert_file": pki.client_cert, "key_file": pki.client_key})
        outbox = Outbox(tmp_path / "outbox.sqlite")
        try:
            sender = HL7Sender(outbox, settings)
            item_id = sender.enqueue(ORU, "oru-1")
            assert sender.run_once() == 1
            item = outbox.get(item_id)
            assert item is not None and item.state == "done"
        finally:
            outbox.close()
        (stored,) = (tmp_path / "hl7").glob("*.hl7")
        assert stored.read_bytes() == ORU.encode()
        # Without our certificate the receiver refuses; with a CA that did not sign it, we refuse the receiver.
        for ctx in (peer_context(pki), peer_context(pki, ca=pki.other_ca, with_cert=True)):
            with pytest.raises(MLLPError) as err:
                send_message(LOCAL, sink.port, ORU, timeout_s=5, ssl_context=ctx)
            assert err.value.outcome == CONNECTION_FAILED


def test_hl7_sink_command_speaks_mutual_tls(tmp_path: Path, pki: CertFiles) -> None:
    """``cxr-lens hl7-sink --tls-*``: a real process that an engine's TLS client (ours here) can reach."""
    port = free_port()
    out = tmp_path / "hl7"
    command = [sys.executable, "-m", "dicom_node.cli", "hl7-sink", "--port", str(port), "--out", str(out),
               "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key), "--tls-ca", str(pki.ca),
               "--tls-require-client-cert"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_until(lambda: _accepts(port) or process.poll() is not None, 30)
        assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
        send_message(LOCAL, port, ORU, timeout_s=5, ssl_context=peer_context(pki, with_cert=True))
        (stored,) = out.glob("*.hl7")
        assert stored.read_bytes() == ORU.encode()
        with pytest.raises(MLLPError):  # no client certificate: refused
            send_message(LOCAL, port, ORU, timeout_s=5, ssl_context=peer_context(pki))
    finally:
        process.terminate()
        process.wait(10)
        if process.stderr is not None:
            process.stderr.close()


@pytest.mark.parametrize("options", [["--tls-cert", "CERT"], ["--tls-ca", "CA"], ["--tls-cert", "CERT",
                                                                                 "--tls-key", "MISSING"]])
def test_hl7_sink_command_tls_option_errors_exit_3(
    tmp_path: Path, pki: CertFiles, options: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    values = {"CERT": str(pki.server_cert), "CA": str(pki.ca), "MISSING": str(tmp_path / "missing.pem")}
    argv = ["hl7-sink", "--port", "0", "--out", str(tmp_path / "hl7"), *(values.get(o, o) for o in options)]
    assert main(argv) == EXIT_CONFIG
    assert "cxr-lens: configuration error:" in capsys.readouterr().err


def _accepts(port: int) -> bool:
    try:
        socket.create_connection((LOCAL, port), timeout=0.5).close()
        return True
    except OSError:
        return False


# --- PDU length guard ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 10, 1 << 20, (1 << 20) + 1, 10_000_000])
def test_pdu_reads_return_exactly_what_was_declared(size: int) -> None:
    from dicom_node.receive.acceptor import _PduLengthGuard

    ours, peer = socket.socketpair()
    guard = _PduLengthGuard.__new__(_PduLengthGuard)
    guard.socket = ours
    data = (bytes(range(256)) * (size // 256 + 1))[:size]
    writer = threading.Thread(target=lambda: (peer.sendall(data + b"next PDU"), peer.close()))
    writer.start()
    try:
        assert guard._recv_exact(size) == data
        assert guard._recv_exact(8) == b"next PDU"
        assert guard._recv_exact(6) == bytearray()  # closed: what arrived, as pynetdicom's recv
    finally:
        writer.join()
        ours.close()


def test_a_huge_declared_length_costs_memory_only_for_the_bytes_sent() -> None:
    """node.max_pdu = 0 lets any P-DATA length through the guard: the buffer must grow with the data."""
    from dicom_node.receive.acceptor import _PduLengthGuard

    ours, peer = socket.socketpair()
    guard = _PduLengthGuard.__new__(_PduLengthGuard)
    guard.socket = ours
    peer.sendall(b"x" * 3000)
    peer.close()
    tracemalloc.start()
    try:
        received = guard._recv_exact(4_000_000_000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        ours.close()
    assert len(received) == 3000
    assert peak < 8 << 20, f"peak {peak} bytes for 3000 received"


def _item(item_type: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(payload)) + payload


def associate_rq(called: str, calling: str = "RAWSCU") -> bytes:
    """An A-ASSOCIATE-RQ PDU for Verification (PS3.8 9.3.2), built by hand."""
    context = (
        struct.pack(">BBBB", 1, 0, 0, 0)
        + _item(0x30, Verification.encode())  # abstract syntax
        + _item(0x40, b"1.2.840.10008.1.2")  # Implicit VR Little Endian
    )
    user_info = _item(0x51, struct.pack(">L", 16382)) + _item(0x52, b"1.2.826.0.1.3680043.9.7433.1")
    body = (
        struct.pack(">HH", 1, 0)
        + called.ljust(16).encode()
        + calling.ljust(16).encode()
        + bytes(32)
        + _item(0x10, b"1.2.840.10008.3.1.1.1")
        + _item(0x20, context)
        + _item(0x50, user_info)
    )
    return struct.pack(">BBL", 0x01, 0, len(body)) + body


def read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    header = b""
    while len(header) < 6:
        chunk = sock.recv(6 - len(header))
        assert chunk, "connection closed before a PDU"
        header += chunk
    pdu_type, _, length = struct.unpack(">BBL", header)
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        assert chunk, "connection closed inside a PDU"
        body += chunk
    return pdu_type, body


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def assert_aborted_unread(sock: socket.socket) -> None:
    """The next PDU is A-ABORT (provider, invalid-PDU-parameter value), then the connection closes: promptly."""
    sock.settimeout(1.0)
    pdu_type, body = read_pdu(sock)
    assert struct.pack(">BBL", pdu_type, 0, len(body)) + body == ABORT_INVALID_PDU_PARAMETER
    assert sock.recv(1) == b""


@pytest.mark.parametrize("declared", [1 << 31, 16385], ids=["2GiB", "max_pdu+1"])
def test_p_data_longer_than_max_pdu_is_aborted_unread(node_factory: Callable[..., Node], declared: int) -> None:
    node = node_factory(max_pdu=16384)
    before = rss_bytes()
    with socket.create_connection((LOCAL, node.port), timeout=2) as raw:
        raw.sendall(associate_rq(AE_TITLE))
        assert read_pdu(raw)[0] == 0x02  # A-ASSOCIATE-AC
        raw.sendall(struct.pack(">BBL", 0x04, 0, declared) + b"\x00" * 1024)
        assert_aborted_unread(raw)
    assert rss_bytes() - before < 64 << 20
    assert wait_until(lambda: node.refused("pdu_length") == 1)
    assert wait_until(lambda: node.scp.active_associations == 0)
    assert echo(node.port) == (True, 0x0000)


def test_oversized_associate_rq_is_aborted_unread(node_factory: Callable[..., Node]) -> None:
    node = node_factory(max_associate_rq_bytes=65536)
    with socket.create_connection((LOCAL, node.port), timeout=2) as raw:
        raw.sendall(struct.pack(">BBL", 0x01, 0, 100 << 20) + b"\x00" * 1024)
        assert_aborted_unread(raw)
    assert wait_until(lambda: node.refused("pdu_length") == 1)
    # Its association slot is free at once (not after the ACSE timeout).
    assert wait_until(lambda: node.scp.active_associations == 0, timeout=1)
    assert echo(node.port) == (True, 0x0000)


def test_p_data_within_max_pdu_is_read(node_factory: Callable[..., Node]) -> None:
    """The guard reads every PDU it allows: a hand-made association, echo via pynetdicom afterwards."""
    node = node_factory(max_pdu=16384)
    with socket.create_connection((LOCAL, node.port), timeout=2) as raw:
        raw.sendall(associate_rq(AE_TITLE))
        assert read_pdu(raw)[0] == 0x02
        raw.sendall(struct.pack(">BBL", 0x05, 0, 4) + bytes(4))  # A-RELEASE-RQ
        assert read_pdu(raw)[0] == 0x06  # A-RELEASE-RP
    assert node.refused("pdu_length") == 0


# --- dcmtk: what a real modality or PACS would speak -----------------------------------------------------------


@pytest.mark.peers
@needs_binary("echoscu")
def test_dcmtk_echoscu_over_mutual_tls(node_factory: Callable[..., Node], pki: CertFiles) -> None:
    node = node_factory(tls=server_tls(pki, ca_file=pki.ca, require_client_cert=True))
    with_cert = run_tool("echoscu", "-aec", AE_TITLE, "+tls", str(pki.client_key), str(pki.client_cert),
                         "+cf", str(pki.ca), LOCAL, str(node.port))
    assert with_cert.returncode == 0, with_cert.stderr
    anonymous = run_tool("echoscu", "-aec", AE_TITLE, "+tla", "+cf", str(pki.ca), LOCAL, str(node.port))
    assert anonymous.returncode != 0
    assert wait_until(lambda: node.refused("tls_handshake") == 1)
