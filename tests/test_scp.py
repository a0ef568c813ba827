"""Storage SCP against real SCUs (pynetdicom, dcmtk echoscu/storescu): statuses, spooling, no transcoding."""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from unittest.mock import patch

import pytest
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    generate_uid,
)
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node.ops.metrics import Metrics
from dicom_node.receive.scp import (
    STORE_STATUS_COMMENT,
    SUPPORTED_TRANSFER_SYNTAXES,
    StorageSCP,
    StoreStatus,
    handle_store,
)
from dicom_node.settings import NodeSettings
from dicom_node.storage.jobs import JobQueue, JobState, jobs_path
from dicom_node.storage.spool import Spool
from tests.support.peers import dataset_part, needs_binary, run_tool, sample

AE_TITLE = "CXRLENS"


class Harness:
    def __init__(self, tmp_path: Path, *, rules_check=None, **node: object) -> None:
        fields: dict[str, object] = {"ae_title": AE_TITLE, "host": "127.0.0.1", "port": 0,
                                     "free_disk_floor_mb": 0, "spool_dir": tmp_path, **node}
        self.settings = NodeSettings(**fields)  # type: ignore[arg-type]
        self.spool = Spool(tmp_path)
        self.queue = JobQueue(jobs_path(tmp_path))
        self.metrics = Metrics()
        self.scp = StorageSCP(self.settings, self.spool, self.queue, rules_check=rules_check, metrics=self.metrics)
        self.scp.start()

    def close(self) -> None:
        self.scp.stop()
        self.queue.close()

    def associate(self, *contexts: str, called: str = AE_TITLE) -> Association:
        ae = AE(ae_title="TESTSCU")
        for sop_class in contexts or (ComputedRadiographyImageStorage,):
            ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, JPEG2000Lossless])
        return ae.associate("127.0.0.1", self.scp.port, ae_title=called)

    def send_raw(self, raw: bytes, *, sop_class: str = ComputedRadiographyImageStorage,
                 ts: str = ExplicitVRLittleEndian, uid: str | None = None) -> Dataset:
        """C-STORE ``raw`` as the encoded data set, byte for byte (pynetdicom's encoder bypassed)."""
        ds = Dataset()
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = uid or generate_uid()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ts
        assoc = self.associate(sop_class)
        assert assoc.is_established
        try:
            with patch("pynetdicom.association.encode", return_value=raw):
                return assoc.send_c_store(ds)
        finally:
            assoc.release()


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    h = Harness(tmp_path)
    yield h
    h.close()


def _el(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00"
    return struct.pack("<HH", group, elem) + vr + struct.pack("<H", len(value)) + value


def test_echo(harness: Harness) -> None:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", harness.scp.port, ae_title=AE_TITLE)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


def test_store_spools_received_bytes_unchanged(harness: Harness) -> None:
    sent = dataset_part(sample("RG1_UNCR.dcm").read_bytes())
    status = harness.send_raw(sent)
    assert status.Status == StoreStatus.SUCCESS
    (job,) = harness.queue.claim_batch(5)
    assert job.calling_ae == "TESTSCU"
    stored = harness.spool.read(job.spool_key)
    assert dataset_part(stored) == sent  # no transcoding: the data set is byte-identical
    meta = dcmread(harness.spool.path(job.spool_key)).file_meta
    assert meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert meta.MediaStorageSOPClassUID == ComputedRadiographyImageStorage


def test_duplicate_content_is_not_queued_twice(harness: Harness) -> None:
    sent = dataset_part(sample("RG1_UNCR.dcm").read_bytes())
    uid = str(dcmread(sample("RG1_UNCR.dcm"), stop_before_pixels=True).SOPInstanceUID)
    assert harness.send_raw(sent, uid=uid).Status == 0x0000
    assert harness.send_raw(sent, uid=uid).Status == 0x0000
    assert harness.queue.counts()["pending"] == 1
    assert harness.metrics.duplicates._value.get() == 1  # type: ignore[attr-defined]


def test_eligibility_check_marks_job_ineligible(tmp_path: Path) -> None:
    seen: list[str] = []

    def rules_check(ds: Dataset) -> tuple[bool, str | None, str]:
        seen.append(ds.Modality)
        return False, "body_part", "not a chest examination"

    h = Harness(tmp_path, rules_check=rules_check)
    try:
        assert h.send_raw(dataset_part(sample("RG1_UNCR.dcm").read_bytes())).Status == 0x0000
        assert seen == ["CR"]
        assert h.queue.counts()["ineligible"] == 1
        assert h.queue.claim_batch(5) == []
        job = h.queue.get(1)
        assert job is not None and (job.state, job.rule) == (JobState.INELIGIBLE, "body_part")
    finally:
        h.close()


def test_rules_check_that_raises_fails_the_job_but_answers_success(tmp_path: Path) -> None:
    def rules_check(ds: Dataset) -> tuple[bool, str | None, str]:
        raise KeyError("bug")

    h = Harness(tmp_path, rules_check=rules_check)
    try:
        assert h.send_raw(dataset_part(sample("RG1_UNCR.dcm").read_bytes())).Status == 0x0000
        assert h.queue.counts()["failed"] == 1
    finally:
        h.close()


def test_unparseable_data_set_answers_cannot_understand(harness: Harness) -> None:
    broken = (
        _el(0x0008, 0x0016, b"UI", ComputedRadiographyImageStorage.encode())
        + _el(0x0008, 0x0018, b"UI", generate_uid().encode())
        # Referenced Image Sequence, undefined length, whose item claims 100 bytes and holds 2.
        + struct.pack("<HH", 0x0008, 0x1140) + b"SQ\x00\x00" + struct.pack("<I", 0xFFFFFFFF)
        + struct.pack("<HHI", 0xFFFE, 0xE000, 100) + b"xx"
    )
    status = harness.send_raw(broken)
    assert status.Status == StoreStatus.ERROR_CANNOT_UNDERSTAND == 0xC210
    assert status.ErrorComment == STORE_STATUS_COMMENT[StoreStatus.ERROR_CANNOT_UNDERSTAND]
    assert sum(harness.queue.counts().values()) == 0
    assert not any(p.is_file() for p in harness.spool.instances.rglob("*"))


def test_data_set_without_uids_answers_cannot_understand(harness: Harness) -> None:
    assert harness.send_raw(_el(0x0010, 0x0010, b"PN", b"Nobody")).Status == 0xC210


def test_sop_class_mismatch_answers_a900(harness: Harness) -> None:
    ct = _el(0x0008, 0x0016, b"UI", CTImageStorage.encode()) + _el(0x0008, 0x0018, b"UI", generate_uid().encode())
    assert harness.send_raw(ct).Status == StoreStatus.ERROR_DATASET_DOES_NOT_MATCH_SOP_CLASS == 0xA900


def test_disk_floor_answers_out_of_resources(tmp_path: Path) -> None:
    h = Harness(tmp_path, free_disk_floor_mb=1 << 40)
    try:
        assert h.send_raw(dataset_part(sample("RG1_UNCR.dcm").read_bytes())).Status == 0xA700
        assert sum(h.queue.counts().values()) == 0
    finally:
        h.close()


def test_unsupported_sop_class_refused_at_negotiation(harness: Harness) -> None:
    assoc = harness.associate(Verification, CTImageStorage)
    assert assoc.is_established
    try:
        assert [cx.abstract_syntax for cx in assoc.rejected_contexts] == [CTImageStorage]
        with pytest.raises(ValueError, match="presentation context"):
            assoc.send_c_store(sample("CT_small.dcm"))
    finally:
        assoc.release()


def test_handler_answers_0122_for_an_unsupported_class_that_got_through(harness: Harness) -> None:
    event = SimpleNamespace(
        assoc=SimpleNamespace(requestor=SimpleNamespace(ae_title="X")),
        request=SimpleNamespace(AffectedSOPClassUID=CTImageStorage),
    )
    rsp = handle_store(event, harness.scp._deps)  # type: ignore[arg-type]
    assert rsp.Status == StoreStatus.REFUSED_SOP_CLASS_NOT_SUPPORTED == 0x0122


def test_wrong_called_ae_title_is_rejected(harness: Harness) -> None:
    assoc = harness.associate(called="SOMEONE")
    assert assoc.is_rejected
    assert assoc.acceptor.primitive.result == 0x01  # rejected-permanent: called AE title not recognised


def test_negotiation_settings_come_from_node_settings(tmp_path: Path) -> None:
    h = Harness(tmp_path, max_pdu=65536, max_associations=3)
    try:
        assert h.scp._ae.maximum_pdu_size == 65536
        assert h.scp._ae.maximum_associations == 3
        assoc = h.associate()
        assert assoc.acceptor.maximum_length == 65536
        assoc.release()
        syntaxes = {str(ts) for cx in h.scp._ae.supported_contexts for ts in cx.transfer_syntax}
        assert set(SUPPORTED_TRANSFER_SYNTAXES) <= syntaxes
    finally:
        h.close()


def test_logs_carry_no_patient_data(harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    path = sample("RG1_UNCR.dcm")
    ds = dcmread(path, stop_before_pixels=True)
    caplog.set_level(logging.DEBUG, logger="dicom_node")
    assert harness.send_raw(dataset_part(path.read_bytes()), uid=str(ds.SOPInstanceUID)).Status == 0
    text = caplog.text
    assert "stored as job" in text
    for value in (str(ds.SOPInstanceUID), str(ds.StudyInstanceUID), str(ds.PatientID)):
        if value:
            assert value not in text


# --- dcmtk: the SCUs users actually point at us -----------------------------------------------------------


@pytest.mark.peers
@needs_binary("echoscu")
def test_dcmtk_echoscu(harness: Harness) -> None:
    result = run_tool("echoscu", "-aec", AE_TITLE, "127.0.0.1", str(harness.scp.port))
    assert result.returncode == 0, result.stderr


@pytest.mark.peers
@needs_binary("storescu")
@pytest.mark.parametrize(("name", "options"), [("RG1_UNCR.dcm", ()), ("RG1_J2KR.dcm", ("-xv",))])
def test_dcmtk_storescu_arrives_without_transcoding(harness: Harness, name: str, options: tuple[str, ...]) -> None:
    """storescu re-serialises the data set itself (defined-length sequences, no trailing padding), so compare
    what matters: same transfer syntax, same Pixel Data bytes (the J2K codestream untouched), same elements.
    Byte identity of what crossed the wire is proven with pynetdicom above."""
    path = sample(name)
    result = run_tool("storescu", *options, "-aet", "DCMTK", "-aec", AE_TITLE, "127.0.0.1",
                      str(harness.scp.port), str(path))
    assert result.returncode == 0, result.stderr
    (job,) = harness.queue.claim_batch(5)
    assert job.calling_ae == "DCMTK"
    stored = dcmread(harness.spool.path(job.spool_key))
    original = dcmread(path)
    assert stored.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    assert stored.PixelData == original.PixelData
    original.pop(0xFFFCFFFC, None)  # Data Set Trailing Padding, dropped by dcmtk
    assert stored == original


@pytest.mark.peers
@needs_binary("storescu")
def test_dcmtk_storescu_ct_is_refused(harness: Harness) -> None:
    result = run_tool("storescu", "-aec", AE_TITLE, "127.0.0.1", str(harness.scp.port),
                      str(sample("CT_small.dcm")))
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "No presentation context" in output, output
    assert sum(harness.queue.counts().values()) == 0
