"""No patient data in the logs: a full round trip (C-STORE -> demo model -> SC to a PACS sink, ORU to an MLLP
sink) with every logger at DEBUG, in process and as the real ``cxr-lens serve -v`` subprocess.

The identifying strings are unusual enough to grep for, and the test first proves they did reach the outputs
(the SC and the ORU must carry them), so an absent string means a clean log, not a missing message.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    Comprehensive3DSRStorage,
    ParametricMapStorage,
    SecondaryCaptureImageStorage,
    Verification,
)

from dicom_node.peers.dicom_sink import DicomSink
from dicom_node.peers.hl7_sink import HL7Sink
from dicom_node.peers.node_process import new_layout
from dicom_node.peers.node_process import wait_until as _wait_until
from dicom_node.peers.synthetic_cr import make_cr_dataset
from dicom_node.settings import DestinationSettings, load_settings

pytestmark = [pytest.mark.tf, pytest.mark.slow]

# What the node delivers per image with the default [outputs]: the SC, the Parametric Map and the SR.
DICOM_OUTPUTS = (SecondaryCaptureImageStorage, ParametricMapStorage, Comprehensive3DSRStorage)

ROOT = Path(__file__).resolve().parents[1]
NODE_AE = "CXRLENS"
UID_ROOT = "1.2.826.0.1.3680043.8.498.77"  # pydicom's prefix plus a tail no other test uses

# Strings that identify the patient or the study. "where" says which output must carry each one.
PATIENT_NAME = "Quaxworth^Zebedine^Ulrika"
IDENTIFIERS: dict[str, tuple[str, ...]] = {
    "Quaxworth": ("sc", "oru"),
    "Zebedine": ("sc", "oru"),
    "Ulrika": ("sc", "oru"),
    "PIDQX7Z93K1": ("sc", "oru"),  # Patient ID
    "19230417": ("sc", "oru"),  # Patient's Birth Date
    "ACCJQ4829XV": ("sc", "oru"),  # Accession Number
    "Vrtlkova": ("sc",),  # Referring Physician's Name
    "STQ8812Z": ("sc",),  # Study ID
    "Quokka Valley Infirmary": (),  # Institution Name: in the source only
    "17 Wombat Lane": (),  # Patient's Address: in the source only
}


def source_image() -> Dataset:
    """A small synthetic chest CR carrying the identifiers, with study, series and instance UIDs of its own."""
    ds = make_cr_dataset(
        rows=96, cols=90, patient_name=PATIENT_NAME, patient_id="PIDQX7Z93K1", accession="ACCJQ4829XV",
        study_uid=generate_uid(UID_ROOT + "."), series_uid=generate_uid(UID_ROOT + "."),
        sop_uid=generate_uid(UID_ROOT + "."),
    )
    ds.PatientBirthDate = "19230417"
    ds.ReferringPhysicianName = "Vrtlkova^Ingeborg"
    ds.StudyID = "STQ8812Z"
    ds.InstitutionName = "Quokka Valley Infirmary"
    ds.PatientAddress = "17 Wombat Lane"
    return ds


def secrets(ds: Dataset) -> dict[str, tuple[str, ...]]:
    """Every string to look for, with the outputs that must carry it: identifiers and the source's UIDs."""
    uids = {
        str(ds.StudyInstanceUID): ("sc", "oru"),
        str(ds.SOPInstanceUID): ("sc",),  # referenced from the SC's Source Image Sequence
        str(ds.SeriesInstanceUID): (),
    }
    return IDENTIFIERS | uids


def c_store(port: int, ds: Dataset) -> int:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


def wait_until(predicate: Callable[[], bool], timeout: float = 120.0) -> bool:
    return _wait_until(predicate, timeout, poll_s=0.05)


def outputs_and_leaks(ds: Dataset, pacs: DicomSink, hl7_dir: Path, log_text: str) -> list[str]:
    """Check the SC and the ORU carry what they must; return the identifying strings found in ``log_text``."""
    assert sorted(r.sop_class_uid for r in pacs.received) == sorted(DICOM_OUTPUTS)
    (received,) = [r for r in pacs.received if r.sop_class_uid == SecondaryCaptureImageStorage]
    payloads = {
        "sc": received.path.read_bytes().decode("latin-1"),
        "oru": next(hl7_dir.glob("*.hl7")).read_bytes().decode("utf-8"),
    }
    sc = pydicom.dcmread(received.path)
    assert sc.PatientName == PATIENT_NAME and sc.StudyInstanceUID == ds.StudyInstanceUID
    for secret, where in secrets(ds).items():
        for output in where:
            assert secret in payloads[output], f"{secret!r} missing from the {output.upper()}: the test would be blind"
    return [secret for secret in secrets(ds) if secret in log_text]


def test_round_trip_logs_no_patient_data_in_process(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The whole node in this process, every logger at DEBUG (third-party ones at the level the node sets)."""
    from dicom_node.node import compose

    caplog.set_level(logging.DEBUG)  # the root logger and its handler: every logger that propagates
    pacs = DicomSink(tmp_path / "pacs", ae_title="PACS")
    ris = HL7Sink("127.0.0.1", 0, tmp_path / "hl7")
    pacs.start()
    ris.start()
    try:
        settings = load_settings(None, [
            "node.host='127.0.0.1'", "node.port=0", "node.http_port=0", "node.free_disk_floor_mb=0",
            f"node.spool_dir='{tmp_path / 'spool'}'", "worker.batch_wait_ms=0", f"hl7.port={ris.port}",
        ]).model_copy(update={"destinations": (DestinationSettings(ae_title="PACS", host="127.0.0.1",
                                                                   port=pacs.port),)})
        node = compose(settings)
        with node:
            ds = source_image()
            assert c_store(node.scp_port, ds) == 0x0000
            assert wait_until(lambda: len(pacs.received) == len(DICOM_OUTPUTS) and any(ris.out_dir.glob("*.hl7")))
            assert wait_until(lambda: sum(node.dicom_sender.outbox.counts().get((ch, "done"), 0)
                                          for ch in ("dicom", "hl7")) == len(DICOM_OUTPUTS) + 1)
        node.dicom_sender.outbox.close()
    finally:
        pacs.stop()
        ris.stop()
    log_text = caplog.text
    assert "stored as job" in log_text and "DEBUG" in log_text  # the capture saw the node's logging
    assert outputs_and_leaks(ds, pacs, ris.out_dir, log_text) == []


def test_serve_subprocess_logs_no_patient_data(tmp_path: Path) -> None:
    """``python -m dicom_node.cli serve -v``: everything it writes to stderr (logging at DEBUG, warnings)."""
    layout = new_layout(tmp_path, batch_wait_ms=0, processes="auto")
    node_port, pacs_port, hl7_port, config = layout.node_port, layout.pacs_port, layout.hl7_port, layout.config
    pacs = DicomSink(tmp_path / "pacs", ae_title="PACS", port=pacs_port)
    ris = HL7Sink("127.0.0.1", hl7_port, tmp_path / "hl7")
    pacs.start()
    ris.start()
    stderr_path = tmp_path / "stderr.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_LENS_")}
    with stderr_path.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(config), "-v"],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr,
        )
    ds = source_image()
    try:
        assert wait_until(lambda: _echo(node_port, proc), timeout=180), stderr_path.read_text(errors="replace")
        assert c_store(node_port, ds) == 0x0000
        assert wait_until(lambda: len(pacs.received) == len(DICOM_OUTPUTS) and any(ris.out_dir.glob("*.hl7")))
        delivered = (r"HL7 \S+ delivered to", r"SC \d+ .* delivered to",  # the senders' last words per item
                     r"Parametric Map \d+ .* delivered to", r"SR \d+ .* delivered to")
        assert wait_until(lambda: all(re.search(p, stderr_path.read_text(errors="replace")) for p in delivered),
                          timeout=30)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        pacs.stop()
        ris.stop()
    assert proc.returncode == 0
    log_text = stderr_path.read_text(errors="replace")
    assert re.search(r" DEBUG ", log_text) and "stored as job" in log_text
    assert outputs_and_leaks(ds, pacs, ris.out_dir, log_text) == []


def _echo(port: int, proc: subprocess.Popen[bytes]) -> bool:
    assert proc.poll() is None, "the node exited"
    try:  # a plain connect first: pynetdicom 3.0.4 leaks the socket of a refused association (#979)
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    ae = AE(ae_title="PHITEST")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
    if not assoc.is_established:
        return False
    assoc.send_c_echo()
    assoc.release()
    return True
