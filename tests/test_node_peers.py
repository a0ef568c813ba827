"""Whole node on free ports with fake stages: our sink and Orthanc as PACS, HTTP, status, restart."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage
from pynetdicom import AE
from pynetdicom.sop_class import ComputedRadiographyImageStorage  # type: ignore[attr-defined]
from typing_extensions import Buffer

from dicom_node.deliver.dicom import DicomSender
from dicom_node.node import BackgroundSender, Node
from dicom_node.ops.metrics import Metrics
from dicom_node.ops.status import collect_status, format_status
from dicom_node.peers.dicom_sink import DicomSink
from dicom_node.peers.node_process import free_port
from dicom_node.peers.node_process import wait_until as _wait_until
from dicom_node.process.worker import JobOutcome, Stages
from dicom_node.settings import (
    DestinationSettings,
    NodeSettings,
    Settings,
    WorkerSettings,
)
from dicom_node.storage.jobs import Job, JobQueue, JobState, jobs_path
from dicom_node.storage.outbox import Outbox, outbox_path
from dicom_node.storage.spool import Spool
from tests.support.peers import (
    fake_secondary_capture,
    needs_binary,
    sample,
    start_orthanc,
)

AE_TITLE = "CXRLENS"


class FakeStages:
    """Stands in for the processor's stages: builds an SC of the same study and puts it in the outbox."""

    def __init__(self, sender: DicomSender) -> None:
        self.sender = sender

    def prepare(self, job: Job, data: Buffer) -> bytes:
        return bytes(data)  # the worker hands over a view of the spooled file

    def infer(self, items: Sequence[bytes]) -> list[bytes]:
        return list(items)

    def finish(self, job: Job, item: bytes, result: bytes) -> JobOutcome:
        self.sender.enqueue(fake_secondary_capture(item), dedup_key=job.spool_key)
        return JobOutcome(job.id, JobState.DONE)


def make_node(spool_dir: Path, destinations: tuple[DestinationSettings, ...], *, port: int = 0,
              stages: Callable[[DicomSender], Stages] = FakeStages,
              hl7_sender: BackgroundSender | None = None) -> tuple[Node, Outbox]:
    settings = Settings(
        node=NodeSettings(ae_title=AE_TITLE, host="127.0.0.1", port=port, http_port=0, spool_dir=spool_dir,
                          free_disk_floor_mb=0),
        worker=WorkerSettings(batch_size=4, batch_wait_ms=10),
        destinations=destinations,
    )
    outbox = Outbox(outbox_path(spool_dir))
    metrics = Metrics()
    sender = DicomSender(outbox, destinations, ae_title=AE_TITLE, retry_initial_s=0.05, retry_max_s=0.5,
                         timeout_s=10, metrics=metrics)
    node = Node(settings, stages=stages(sender), dicom_sender=sender, hl7_sender=hl7_sender, metrics=metrics)
    return node, outbox


def c_store(port: int, path: Path) -> int:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title=AE_TITLE)
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(path).Status)
    finally:
        assoc.release()


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as rsp:
            return rsp.status, rsp.read().decode()
    except urllib.error.HTTPError as exc:
        body = exc.read().decode()
        exc.close()
        return exc.code, body


def wait_until(predicate: Callable[[], bool], timeout: float = 15.0) -> bool:
    return _wait_until(predicate, timeout, poll_s=0.05)


def test_node_round_trip_with_metrics_and_health(tmp_path: Path, sink: DicomSink) -> None:
    node, outbox = make_node(tmp_path / "spool", (DestinationSettings(ae_title="PACS", host="127.0.0.1",
                                                                      port=sink.port),))
    with node:
        source = sample("RG1_UNCR.dcm")
        assert c_store(node.scp_port, source) == 0x0000
        (got,) = sink.wait_for(1)
        sc = dcmread(got.path)
        original = dcmread(source, stop_before_pixels=True)
        assert sc.SOPClassUID == SecondaryCaptureImageStorage
        assert sc.StudyInstanceUID == original.StudyInstanceUID
        assert wait_until(lambda: node.queue.counts()["done"] == 1)
        # The sink has the SC before the sender has read the C-STORE response and counted it: wait for the count.
        assert wait_until(lambda: "cxr_lens_sc_sent_total 1.0" in http_get(node.http_port, "/metrics")[1])

        status, text = http_get(node.http_port, "/metrics")
        assert status == 200
        for line in ("cxr_lens_received_total 1.0", "cxr_lens_stored_total 1.0", "cxr_lens_processed_total 1.0",
                     "cxr_lens_sc_sent_total 1.0", 'cxr_lens_jobs{state="done"} 1.0',
                     'cxr_lens_outbox_items{channel="dicom",state="done"} 1.0',
                     'cxr_lens_cstore_status_total{status="0x0000"} 1.0'):
            assert line in text, line
        assert "cxr_lens_cstore_handler_seconds_bucket" in text

        status, body = http_get(node.http_port, "/healthz")
        health = json.loads(body)
        assert status == 200 and health["ok"] is True and health["model_ready"] is True
        assert health["jobs"]["done"] == 1 and health["outbox"]["dicom"]["done"] == 1
        assert http_get(node.http_port, "/nope")[0] == 404
    outbox.close()


def test_two_nodes_in_one_process_have_separate_metrics(tmp_path: Path) -> None:
    a, box_a = make_node(tmp_path / "a", ())
    b, box_b = make_node(tmp_path / "b", ())
    with a, b:
        assert c_store(a.scp_port, sample("RG1_UNCR.dcm")) == 0
        assert "cxr_lens_received_total 1.0" in http_get(a.http_port, "/metrics")[1]
        assert "cxr_lens_received_total 0.0" in http_get(b.http_port, "/metrics")[1]
    box_a.close()
    box_b.close()


class FakeHL7Sender:
    """Anything with run_forever(stop_event) and wake() runs on its own thread and shows up in /healthz."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.stopped = threading.Event()

    def run_forever(self, stop_event: threading.Event) -> None:
        self.started.set()
        stop_event.wait()
        self.stopped.set()

    def wake(self) -> None:
        pass  # run_forever waits on the stop event itself


def test_hl7_sender_runs_with_the_node_and_stops_with_it(tmp_path: Path) -> None:
    hl7 = FakeHL7Sender()
    node, outbox = make_node(tmp_path / "spool", (), hl7_sender=hl7)
    with node:
        assert hl7.started.wait(5)
        health = json.loads(http_get(node.http_port, "/healthz")[1])
        assert health["components"]["hl7_sender"] is True
    assert hl7.stopped.is_set()
    outbox.close()


def test_restart_resumes_jobs_left_in_processing(tmp_path: Path, sink: DicomSink) -> None:
    spool_dir = tmp_path / "spool"
    spool, queue = Spool(spool_dir), JobQueue(jobs_path(spool_dir))
    job_id, _ = queue.add(spool.write(sample("RG1_UNCR.dcm").read_bytes()), calling_ae="PACS")
    queue.claim_batch(1)  # the previous run died while processing it
    queue.close()

    node, outbox = make_node(spool_dir, (DestinationSettings(ae_title="PACS", host="127.0.0.1", port=sink.port),))
    with node:
        assert len(sink.wait_for(1)) == 1
        assert wait_until(lambda: node.queue.get(job_id).state == JobState.DONE)  # type: ignore[union-attr]
    outbox.close()


def test_status_reports_failures_and_parked_items_without_phi(tmp_path: Path) -> None:
    refusing = DicomSink(tmp_path / "pacs", refuse_with=0xA900)
    refusing.start()
    spool_dir = tmp_path / "spool"

    class FailingThenOk(FakeStages):
        calls = 0

        def infer(self, items: Sequence[bytes]) -> list[bytes]:
            self.calls += 1
            if self.calls == 1:
                raise ValueError("Doe^Jane")  # a third-party message that might quote the data set
            return super().infer(items)

    node, outbox = make_node(spool_dir, (DestinationSettings(ae_title="PACS", host="127.0.0.1",
                                                             port=refusing.port),), stages=FailingThenOk)
    try:
        with node:
            assert c_store(node.scp_port, sample("RG1_UNCR.dcm")) == 0
            assert wait_until(lambda: node.queue.counts()["failed"] == 1)
            assert c_store(node.scp_port, sample("RG1_UNCR.dcm")) == 0  # re-sent: the failed job is retried
            assert wait_until(lambda: outbox.counts().get(("dicom", "parked")) == 1)
            report = collect_status(spool_dir)
    finally:
        refusing.stop()
        outbox.close()
    assert report["jobs"]["done"] == 1
    assert report["outbox"]["dicom"]["parked"] == 1
    (problem,) = report["problems"]
    assert problem["last_error"].startswith("0xA900") and problem["state"] == "parked"
    text = format_status(report)
    assert "parked" in text and "0xA900" in text
    original = dcmread(sample("RG1_UNCR.dcm"), stop_before_pixels=True)
    for phi in (str(original.PatientName), str(original.PatientID), "Doe^Jane"):
        if phi:
            assert phi not in text


def test_status_of_an_empty_directory_creates_nothing(tmp_path: Path) -> None:
    report = collect_status(tmp_path / "typo")
    assert report["jobs"]["pending"] == 0 and report["problems"] == []
    assert not (tmp_path / "typo").exists()
    assert "Recent failed jobs" in format_status(report)


@pytest.mark.peers
@needs_binary("Orthanc", "/usr/sbin/Orthanc")
def test_orthanc_round_trip(tmp_path: Path) -> None:
    """Orthanc pushes RG1 to the node; the node's SC comes back into RG1's study in Orthanc."""
    node_port = free_port()
    orthanc = start_orthanc(tmp_path / "orthanc", modalities={"cxrlens": (AE_TITLE, "127.0.0.1", node_port)})
    try:
        destination = DestinationSettings(ae_title=orthanc.ae_title, host="127.0.0.1", port=orthanc.dicom_port)
        node, outbox = make_node(tmp_path / "spool", (destination,), port=node_port)
        with node:
            uploaded = orthanc.upload(sample("RG1_UNCR.dcm"))
            study = uploaded["ParentStudy"]
            orthanc.push(uploaded["ID"])
            assert node.queue.counts()["pending"] + node.queue.counts()["processing"] + node.queue.counts()[
                "done"] == 1

            def two_series() -> bool:
                return len(orthanc.get(f"/studies/{study}/series")) == 2

            assert wait_until(two_series, timeout=20), orthanc.log_tail()
            series = orthanc.get(f"/studies/{study}/series")
            modalities = sorted(s["MainDicomTags"].get("Modality", "") for s in series)
            assert modalities == ["CR", "OT"]
            sc_series = next(s for s in series if s["MainDicomTags"].get("Modality") == "OT")
            (instance,) = sc_series["Instances"]
            sc = dcmread(BytesIO(orthanc.get_bytes(f"/instances/{instance}/file")))
            assert sc.SOPClassUID == SecondaryCaptureImageStorage
        outbox.close()
    finally:
        orthanc.stop()
