"""SIGKILL the node with jobs queued and outputs pending; after a restart everything arrives, nothing twice."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import SecondaryCaptureImageStorage, Verification  # type: ignore[attr-defined]

from dicom_node.peers.dicom_sink import DicomSink
from dicom_node.peers.hl7_sink import HL7Sink
from dicom_node.peers.node_process import new_layout
from tests.support.peers import sample

pytestmark = [pytest.mark.tf, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("RG1_UNCR.dcm", "RG1_J2KR.dcm", "RG1_J2KI.dcm")
OBJECTS_PER_IMAGE = 3  # the default [outputs]: Secondary Capture, Parametric Map, Structured Report


def _start_node(config: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_LENS_")}
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(config)],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def _wait_echo(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 180) -> None:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        try:  # a plain connect first: pynetdicom 3.0.4 leaks the socket of a refused association (#979)
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            time.sleep(0.3)
            continue
        assoc = ae.associate("127.0.0.1", port, ae_title="CXRLENS")
        if assoc.is_established:
            assoc.send_c_echo()
            assoc.release()
            return
        time.sleep(0.3)
    raise AssertionError("node did not answer C-ECHO:\n" + log.read_text(errors="replace")[-3000:])


def _send(port: int, names: tuple[str, ...]) -> None:
    ae = AE(ae_title="MODALITY")
    datasets = [pydicom.dcmread(sample(n)) for n in names]
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="CXRLENS", max_pdu=1_048_576)
    assert assoc.is_established
    for ds in datasets:
        assert assoc.send_c_store(ds).Status == 0x0000
    assoc.release()


def _unfinished(spool: Path) -> tuple[int, int]:
    """(jobs not finished, outbox items pending) as left on disk."""
    with sqlite3.connect(spool / "jobs.sqlite") as db:
        jobs = db.execute("SELECT COUNT(*) FROM jobs WHERE state IN ('pending', 'processing')").fetchone()[0]
    with sqlite3.connect(spool / "outbox.sqlite") as db:
        pending = db.execute("SELECT COUNT(*) FROM outbox WHERE state = 'pending'").fetchone()[0]
    return jobs, pending


def test_sigkill_with_jobs_and_outbox_pending(tmp_path: Path) -> None:
    layout = new_layout(tmp_path, batch_size=2, batch_wait_ms=0, processes="auto")
    node_port, pacs_port, hl7_port = layout.node_port, layout.pacs_port, layout.hl7_port
    spool, config, log = layout.spool, layout.config, layout.log
    # First life: the PACS and the HL7 receiver are down, so outputs can only wait in the outbox.
    proc = _start_node(config, log)
    try:
        _wait_echo(node_port, proc, log)
        _send(node_port, SOURCES[:1])
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and _unfinished(spool)[1] < 2:  # its SC and ORU wait in the outbox
            time.sleep(0.1)
        _send(node_port, SOURCES[1:])
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    jobs_left, outbox_left = _unfinished(spool)
    assert jobs_left > 0 and outbox_left >= 2, (jobs_left, outbox_left)

    pacs = DicomSink(tmp_path / "pacs", ae_title="PACS", port=pacs_port)
    ris = HL7Sink("127.0.0.1", hl7_port, tmp_path / "hl7")
    pacs.start()
    ris.start()
    proc = _start_node(config, log)
    try:
        _wait_echo(node_port, proc, log)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and (len(pacs.received) < 3 * OBJECTS_PER_IMAGE
                                               or len(list(ris.out_dir.glob("*.hl7"))) < 3
                                               or sum(_unfinished(spool))):
            time.sleep(0.3)
        time.sleep(1.0)  # anything sent twice would arrive now
        _send(node_port, SOURCES[:1])  # a re-send of identical content is not processed again
        time.sleep(2.0)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        pacs.stop()
        ris.stop()
    assert proc.returncode == 0
    sops = [r.sop_instance_uid for r in pacs.received]
    assert len(sops) == 3 * OBJECTS_PER_IMAGE and len(set(sops)) == len(sops), f"objects delivered: {sops}"
    scs = [r for r in pacs.received if r.sop_class_uid == SecondaryCaptureImageStorage]
    assert len(scs) == 3
    referenced = {pydicom.dcmread(r.path).SourceImageSequence[0].ReferencedSOPInstanceUID for r in scs}
    assert referenced == {pydicom.dcmread(sample(n), stop_before_pixels=True).SOPInstanceUID for n in SOURCES}
    messages = sorted(ris.out_dir.glob("*.hl7"))
    assert len(messages) == 3, [m.name for m in messages]
    assert _unfinished(spool) == (0, 0)
    print(f"at SIGKILL: {jobs_left} job(s) unfinished, {outbox_left} outbox item(s) pending")
