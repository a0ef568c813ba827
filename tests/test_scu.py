"""DicomSender against real Storage SCPs (our dicom_sink, our own SCP): deliver, retry, park, FIFO."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian

from dicom_node.deliver.dicom import (
    CHANNEL,
    AssociationOutcome,
    DicomSender,
    destination_key,
    store_status_disposition,
    store_status_text,
)
from dicom_node.deliver.sender import Disposition
from dicom_node.peers.dicom_sink import DicomSink
from dicom_node.peers.node_process import free_port
from dicom_node.receive.scp import StorageSCP
from dicom_node.settings import DestinationSettings, NodeSettings
from dicom_node.storage.jobs import JobQueue, jobs_path
from dicom_node.storage.outbox import Outbox
from dicom_node.storage.spool import Spool
from tests.support.peers import dataset_part, fake_secondary_capture, sample


@pytest.fixture(scope="module")
def source() -> bytes:
    return sample("RG1_UNCR.dcm").read_bytes()


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    box = Outbox(tmp_path / "outbox.sqlite")
    yield box
    box.close()


def dest(port: int, ae: str = "PACS") -> DestinationSettings:
    return DestinationSettings(ae_title=ae, host="127.0.0.1", port=port)


def sender(outbox: Outbox, *dests: DestinationSettings, retry_initial_s: float = 0.05) -> DicomSender:
    return DicomSender(outbox, dests, ae_title="CXRLENS", retry_initial_s=retry_initial_s,
                       retry_max_s=max(1.0, retry_initial_s), timeout_s=5)


# pynetdicom 3.0.4 leaves the socket of a refused connection unclosed (shutdown() raises ENOTCONN before
# close() in AssociationSocket._shutdown_socket; pydicom/pynetdicom#979, fixed by #999). The fd is released
# when the object is collected; only the ResourceWarning is silenced, and only where we connect to nothing.
PYNETDICOM_REFUSED_SOCKET = pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning")


@pytest.mark.parametrize(
    ("status", "disposition"),
    [
        (0x0000, Disposition.DONE), (0xB000, Disposition.DONE), (0xB006, Disposition.DONE),
        (0xB007, Disposition.DONE), (0xA700, Disposition.RETRY), (0xA7FF, Disposition.RETRY),
        (0xA900, Disposition.PARK), (0xA9FF, Disposition.PARK), (0xC000, Disposition.PARK),
        (0xC210, Disposition.PARK), (0x0122, Disposition.PARK), (0x0124, Disposition.PARK),
        (0xFFFF, Disposition.PARK),
    ],
)
def test_status_table(status: int, disposition: Disposition) -> None:
    assert store_status_disposition(status) == disposition


def test_status_text_names_the_status() -> None:
    assert store_status_text(0xA900, "bad SC").startswith("0xA900 Failure")
    assert "(bad SC)" in store_status_text(0xA900, "bad SC")
    assert "Out of Resources" in store_status_text(0xA7F0)


def test_delivers_to_sink_unchanged(outbox: Outbox, sink: DicomSink, source: bytes) -> None:
    sc = fake_secondary_capture(source)
    s = sender(outbox, dest(sink.port))
    (item_id,) = s.enqueue(sc, "sc-1")
    assert s.run_once() == 1
    (got,) = sink.received
    assert got.calling_ae == "CXRLENS"
    assert dataset_part(got.path.read_bytes()) == dataset_part(sc)
    item = outbox.get(item_id)
    assert item is not None and item.state == "done" and item.destination == destination_key(dest(sink.port))


def test_one_item_per_destination(tmp_path: Path, outbox: Outbox, source: bytes) -> None:
    sinks = [DicomSink(tmp_path / f"pacs{i}", ae_title=f"PACS{i}") for i in range(2)]
    for s in sinks:
        s.start()
    try:
        snd = sender(outbox, *(dest(s.port, s.ae_title) for s in sinks))
        assert len(snd.enqueue(fake_secondary_capture(source), "sc-1")) == 2
        snd.run_once()
        assert [len(s.received) for s in sinks] == [1, 1]
    finally:
        for s in sinks:
            s.stop()


@PYNETDICOM_REFUSED_SOCKET
def test_retries_while_sink_is_down_then_delivers(tmp_path: Path, outbox: Outbox, source: bytes) -> None:
    port = free_port()
    snd = sender(outbox, dest(port))
    (item_id,) = snd.enqueue(fake_secondary_capture(source), "sc-1")
    snd.run_once()  # nothing listens yet
    item = outbox.get(item_id)
    assert item is not None and item.state == "pending" and item.attempts == 1
    assert item.last_error == AssociationOutcome.CONNECTION_FAILED.value
    assert item.next_attempt_at > time.time() - 1

    sink = DicomSink(tmp_path / "pacs", port=port)
    sink.start()
    stop = threading.Event()
    thread = threading.Thread(target=snd.run_forever, args=(stop,))
    thread.start()
    try:
        assert len(sink.wait_for(1, timeout=10)) == 1
    finally:
        stop.set()
        thread.join(5)
        sink.stop()
    assert outbox.get(item_id).state == "done"  # type: ignore[union-attr]


def test_backoff_grows_on_out_of_resources(tmp_path: Path, outbox: Outbox, source: bytes) -> None:
    busy = DicomSink(tmp_path / "pacs", refuse_with=0xA700)
    busy.start()
    try:
        snd = sender(outbox, dest(busy.port), retry_initial_s=10)
        (item_id,) = snd.enqueue(fake_secondary_capture(source), "sc-1")
        before = time.time()
        snd.run_once()
        item = outbox.get(item_id)
        assert item is not None and item.state == "pending" and item.last_error.startswith("0xA700")  # type: ignore[union-attr]
        assert item.next_attempt_at - before == pytest.approx(10, abs=1)
        assert snd.run_once() == 0  # not due yet
    finally:
        busy.stop()


def test_parks_on_permanent_refusal(tmp_path: Path, outbox: Outbox, source: bytes) -> None:
    refusing = DicomSink(tmp_path / "pacs", refuse_with=0xA900)
    refusing.start()
    try:
        snd = sender(outbox, dest(refusing.port))
        first, second = (snd.enqueue(fake_secondary_capture(source), f"sc-{i}")[0] for i in range(2))
        assert snd.run_once() == 2  # a parked head does not block the items behind it
        for item_id in (first, second):
            item = outbox.get(item_id)
            assert item is not None and item.state == "parked"
            assert item.last_error is not None and item.last_error.startswith("0xA900")
    finally:
        refusing.stop()


def test_parks_when_association_is_rejected_permanently(tmp_path: Path, outbox: Outbox, source: bytes) -> None:
    spool_dir = tmp_path / "other-node"
    queue = JobQueue(jobs_path(spool_dir))
    scp = StorageSCP(NodeSettings(ae_title="OTHER", host="127.0.0.1", port=0, free_disk_floor_mb=0),
                     Spool(spool_dir), queue)
    scp.start()
    try:
        snd = sender(outbox, dest(scp.port, ae="WRONGAE"))  # OTHER requires to be called by its own title
        (item_id,) = snd.enqueue(fake_secondary_capture(source), "sc-1")
        snd.run_once()
        item = outbox.get(item_id)
        assert item is not None and item.state == "parked"
        assert "rejected (permanent)" in (item.last_error or "")
    finally:
        scp.stop()
        queue.close()


def test_fifo_order_per_destination(outbox: Outbox, sink: DicomSink, source: bytes) -> None:
    snd = sender(outbox, dest(sink.port))
    payloads = [fake_secondary_capture(source) for _ in range(4)]
    for i, sc in enumerate(payloads):
        snd.enqueue(sc, f"sc-{i}")
    assert snd.run_once() == 4
    expected = [str(dcmread(BytesIO(sc)).SOPInstanceUID) for sc in payloads]
    assert [r.sop_instance_uid for r in sink.received] == expected


def test_resend_replaces_a_delivered_item(outbox: Outbox, sink: DicomSink, source: bytes) -> None:
    snd = sender(outbox, dest(sink.port))
    (first,) = snd.enqueue(fake_secondary_capture(source), "study-x")
    snd.run_once()
    (again,) = snd.enqueue(fake_secondary_capture(source), "study-x")
    assert again == first
    assert outbox.get(first).state == "pending"  # type: ignore[union-attr]
    snd.run_once()
    assert len(sink.received) == 2


def test_unreadable_payload_is_parked(outbox: Outbox, sink: DicomSink) -> None:
    snd = sender(outbox, dest(sink.port))
    (item_id,) = snd.enqueue(b"not dicom", "junk")
    snd.run_once()
    assert outbox.get(item_id).last_error == AssociationOutcome.PAYLOAD_UNREADABLE.value  # type: ignore[union-attr]
    assert outbox.counts()[(CHANNEL, "parked")] == 1


def test_an_images_objects_arrive_in_the_syntax_they_are_stored_in(outbox: Outbox, sink: DicomSink) -> None:
    """The sink, like pynetdicom's default acceptor, prefers Implicit VR when a context offers both uncompressed
    syntaxes; each syntax in a context of its own lets the SC, map and report go as stored (Explicit VR Little
    Endian), byte for byte, instead of being re-encoded on every C-STORE."""
    import numpy as np

    from dicom_node.outputs.parametric_map import build_parametric_map
    from dicom_node.outputs.secondary_capture import build_secondary_capture
    from dicom_node.outputs.structured_report import InstanceReference, build_structured_report
    from dicom_node.process.processor import _part10_bytes
    from tests.support.outputs import inference_result, source_radiograph

    src, result = source_radiograph("dx_with_imager_spacing", 80, 96), inference_result()
    sc = build_secondary_capture(src, np.zeros((80, 96, 3), np.uint8), result)
    pm = build_parametric_map(src, np.ones((4, 4), np.float32), result)
    sr = build_structured_report(src, result, secondary_capture=InstanceReference.of(sc),
                                 parametric_map=InstanceReference.of(pm))
    stored = {str(ds.SOPInstanceUID): _part10_bytes(ds) for ds in (sc, pm, sr)}
    s = sender(outbox, dest(sink.port))
    for uid, payload in stored.items():
        s.enqueue(payload, uid)
    assert s.run_once() == 3
    got = sink.wait_for(3)
    assert [g.sop_instance_uid for g in got] == list(stored)
    assert {g.transfer_syntax_uid for g in got} == {ExplicitVRLittleEndian}
    for g in got:
        assert dataset_part(g.path.read_bytes()) == dataset_part(stored[g.sop_instance_uid])
