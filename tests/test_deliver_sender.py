"""The one sender policy (deliver.sender) over both channels: counters on the node's registry, one log line per
outcome without the receiver's texts, backoff counted from the end of an attempt, waking, one Disposition."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom.events import Event
from pynetdicom.sop_class import Comprehensive3DSRStorage, ParametricMapStorage  # type: ignore[attr-defined]

from dicom_node.deliver import dicom, mllp
from dicom_node.deliver.dicom import DicomSender
from dicom_node.deliver.hl7 import HL7Sender
from dicom_node.deliver.mllp import TIMEOUT, build_ack
from dicom_node.deliver.sender import Disposition, OutboxSender
from dicom_node.ops.metrics import Metrics
from dicom_node.peers.dicom_sink import DicomSink
from dicom_node.peers.hl7_sink import HL7Sink, SinkMode
from dicom_node.settings import DestinationSettings, HL7Settings
from dicom_node.storage.outbox import Outbox, OutboxItem
from tests.support.peers import fake_secondary_capture, sample

PHI = "Doe^Jane"  # stands for anything of the patient's that a receiver's error text might quote


def oru(n: int) -> str:
    return (
        "MSH|^~\\&|CXR_LENS|RADIOLOGY|HS_RESULTS|HEALTHSHARE|20240305143015||ORU^R01^ORU_R01|"
        f"ORU{n:04d}|P|2.5.1\rPID|1||P{n}\r"
    )


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    box = Outbox(tmp_path / "outbox.sqlite")
    yield box
    box.close()


def hl7_sender(outbox: Outbox, port: int, metrics: Metrics | None, **settings: float) -> HL7Sender:
    values = {"ack_timeout_s": 2.0, "retry_initial_s": 0.05, "retry_max_s": 0.2, **settings}
    return HL7Sender(outbox, HL7Settings(host="127.0.0.1", port=port, **values), metrics=metrics)


def sample_value(metrics: Metrics, name: str) -> float:
    value = metrics.registry.get_sample_value(name)
    assert value is not None, f"{name} is not registered"
    return value


def counts(metrics: Metrics, prefix: str) -> tuple[float, float, float]:
    return tuple(  # type: ignore[return-value]
        sample_value(metrics, f"cxr_lens_{prefix}_{what}_total") for what in ("sent", "retries", "parked")
    )


# --- HL7 over MLLP to our receiver ---------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "expected"), [("AA", (1, 0, 0)), ("AR", (0, 1, 0)), ("AE", (0, 0, 1))])
def test_hl7_outcomes_are_counted(tmp_path: Path, outbox: Outbox, mode: SinkMode, expected: tuple) -> None:
    metrics = Metrics()
    with HL7Sink("127.0.0.1", 0, tmp_path / "ris", mode) as sink:
        sender = hl7_sender(outbox, sink.port, metrics)
        sender.enqueue(oru(1), "sop-1")
        assert sender.run_once() == 1
    assert list((tmp_path / "ris").glob("*_ORU0001.hl7"))  # it really went over the wire
    assert counts(metrics, "hl7") == expected
    assert counts(metrics, "sc") == (0, 0, 0)


def test_hl7_sent_and_parked_counted_on_the_node_registry(tmp_path: Path, outbox: Outbox) -> None:
    metrics = Metrics()
    with HL7Sink("127.0.0.1", 0, tmp_path / "ris") as sink:
        sender = hl7_sender(outbox, sink.port, metrics)
        for n in range(2):
            sender.enqueue(oru(n), f"sop-{n}")
        assert sender.run_once() == 2
        sink.mode = "AE"
        sender.enqueue(oru(2), "sop-2")
        assert sender.run_once() == 1
    exposition = metrics.exposition().decode()
    assert "cxr_lens_hl7_sent_total 2.0" in exposition
    assert "cxr_lens_hl7_parked_total 1.0" in exposition
    assert outbox.counts() == {("hl7", "done"): 2, ("hl7", "parked"): 1}


def test_receiver_error_text_goes_to_the_outbox_not_the_log(
    tmp_path: Path, outbox: Outbox, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics()
    with HL7Sink("127.0.0.1", 0, tmp_path / "ris") as sink:
        sink.receive = lambda data: build_ack(data.decode(), "AE", f"PID-5 {PHI} unknown")  # type: ignore[method-assign]
        sender = hl7_sender(outbox, sink.port, metrics)
        item_id = sender.enqueue(oru(7), "sop-7")
        with caplog.at_level(logging.DEBUG, logger="dicom_node.deliver"):
            sender.run_once()
    item = outbox.get(item_id)
    assert item is not None and item.state == "parked" and item.last_error == f"AE: PID-5 {PHI} unknown"
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("dicom_node.deliver")]
    assert any("HL7 ORU0007" in line and "parked" in line for line in lines), lines
    assert not any(PHI in line for line in lines)
    assert sample_value(metrics, "cxr_lens_hl7_parked_total") == 1


def test_retry_is_counted_from_the_end_of_the_attempt(outbox: Outbox) -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # takes the connection, never answers
        sender = hl7_sender(outbox, silent.getsockname()[1], None, ack_timeout_s=0.5, retry_initial_s=10,
                            retry_max_s=10)
        item_id = sender.enqueue(oru(1), "sop-1")
        before = time.time()
        assert sender.run_once() == 1
        after = time.time()
    item = outbox.get(item_id)
    assert item is not None and item.state == "pending" and (item.last_error or "").startswith(TIMEOUT)
    assert before + 0.5 + 10 <= item.next_attempt_at <= after + 10


# --- DICOM over C-STORE to our sink ----------------------------------------------------------------------------


class CommentingSink(DicomSink):
    """Refuses every C-STORE with 0xA900 and an Error Comment quoting the data set."""

    def _handle_store(self, event: Event) -> Dataset:
        status = Dataset()
        status.Status = 0xA900
        status.ErrorComment = f"{PHI} mismatch"
        return status


def dicom_sender(outbox: Outbox, port: int, metrics: Metrics) -> DicomSender:
    return DicomSender(outbox, [DestinationSettings(ae_title="PACS", host="127.0.0.1", port=port)],
                       ae_title="CXRLENS", retry_initial_s=0.05, retry_max_s=1, timeout_s=5, metrics=metrics)


@pytest.mark.parametrize(("refuse_with", "expected"), [(None, (2, 0, 0)), (0xA700, (0, 1, 0)), (0xA900, (0, 0, 2))])
def test_dicom_outcomes_are_counted(
    tmp_path: Path, outbox: Outbox, refuse_with: int | None, expected: tuple
) -> None:
    metrics = Metrics()
    pacs = DicomSink(tmp_path / "pacs", refuse_with=refuse_with)
    pacs.start()
    try:
        sender = dicom_sender(outbox, pacs.port, metrics)
        source = sample("RG1_UNCR.dcm").read_bytes()
        for n in range(2):
            sender.enqueue(fake_secondary_capture(source), f"sc-{n}")
        sender.run_once()  # a retry blocks the second item: one attempt only
    finally:
        pacs.stop()
    assert counts(metrics, "sc") == expected
    assert counts(metrics, "hl7") == (0, 0, 0)


def test_store_error_comment_goes_to_the_outbox_not_the_log(
    tmp_path: Path, outbox: Outbox, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics()
    pacs = CommentingSink(tmp_path / "pacs")
    pacs.start()
    try:
        sender = dicom_sender(outbox, pacs.port, metrics)
        (item_id,) = sender.enqueue(fake_secondary_capture(sample("RG1_UNCR.dcm").read_bytes()), "sc-1")
        with caplog.at_level(logging.DEBUG, logger="dicom_node.deliver"):
            assert sender.run_once() == 1
    finally:
        pacs.stop()
    item = outbox.get(item_id)
    assert item is not None and item.state == "parked"
    assert (item.last_error or "").startswith("0xA900") and PHI in (item.last_error or "")
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("dicom_node.deliver")]
    assert any(line.startswith(f"SC {item_id} ") and "0xA900" in line and "parked" in line for line in lines), lines
    assert not any(PHI in line for line in lines)
    assert sample_value(metrics, "cxr_lens_sc_parked_total") == 1


# --- the shared policy ----------------------------------------------------------------------------------------


def _part10(sop_class: str) -> bytes:
    """A small Part 10 object of ``sop_class`` (the sink stores any storage object as it comes)."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, generate_uid()
    ds.PatientID = "LOGNAME-1"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_the_log_names_each_object_by_its_kind(
    tmp_path: Path, outbox: Outbox, caplog: pytest.LogCaptureFixture
) -> None:
    pacs = DicomSink(tmp_path / "pacs")
    pacs.start()
    try:
        sender = dicom_sender(outbox, pacs.port, Metrics())
        source = sample("RG1_UNCR.dcm").read_bytes()
        payloads = {"SC": fake_secondary_capture(source), "Parametric Map": _part10(ParametricMapStorage),
                    "SR": _part10(Comprehensive3DSRStorage)}
        ids = {name: sender.enqueue(payload, name)[0] for name, payload in payloads.items()}
        (unreadable,) = sender.enqueue(b"not a DICOM file", "unreadable")
        with caplog.at_level(logging.INFO, logger="dicom_node.deliver"):
            for _ in range(4):
                sender.run_once()
    finally:
        pacs.stop()
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("dicom_node.deliver")]
    for name, item_id in ids.items():
        assert any(line.startswith(f"{name} {item_id} (") and "delivered to" in line for line in lines), lines
    assert any(line.startswith(f"DICOM object {unreadable} (") and "parked" in line for line in lines), lines
    assert len(pacs.received) == 3
    assert not any("LOGNAME-1" in line for line in lines)  # the patient's ID stays in the payload


def test_one_disposition_for_both_channels() -> None:
    assert mllp.Disposition is Disposition and dicom.Disposition is Disposition
    assert set(mllp.DISPOSITIONS.values()) == set(Disposition)
    assert set(dicom.STORE_STATUS_DISPOSITION.values()) | set(dicom.ASSOCIATION_DISPOSITION.values()) == set(
        Disposition
    )


def test_enqueue_wakes_a_waiting_sender(tmp_path: Path, outbox: Outbox) -> None:
    with HL7Sink("127.0.0.1", 0, tmp_path / "ris") as sink:
        sender = HL7Sender(outbox, HL7Settings(host="127.0.0.1", port=sink.port), poll_s=60)
        stop = threading.Event()
        thread = threading.Thread(target=sender.run_forever, args=(stop,))
        thread.start()
        try:
            time.sleep(0.2)  # the sender found nothing and waits up to poll_s
            sender.enqueue(oru(1), "sop-1")
            deadline = time.monotonic() + 5
            while outbox.counts().get(("hl7", "done")) != 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert outbox.counts().get(("hl7", "done")) == 1
        finally:
            stop.set()
            sender.wake()  # what Node.stop does
            thread.join(2)
        assert not thread.is_alive()


class Forgetful(OutboxSender):
    """A channel whose attempt settles nothing."""

    channel = "hl7"

    def destinations(self) -> Sequence[str]:
        return ("nowhere",)

    def describe(self, item: OutboxItem) -> str:
        return f"item {item.id}"

    def attempt(self, destination: str, item: OutboxItem, now: float | None) -> int:
        return 1


def test_an_attempt_that_settles_nothing_raises_rather_than_spinning(outbox: Outbox) -> None:
    sender = Forgetful(outbox, retry_initial_s=1, retry_max_s=1, metrics=None, poll_s=1)
    sender._store("nowhere", "key", b"payload", resend=False)
    with pytest.raises(RuntimeError, match="unsettled"):
        sender.run_once()
