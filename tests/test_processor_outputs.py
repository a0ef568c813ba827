"""The processor's outputs wired together: Secondary Capture, Parametric Map and Structured Report per image, each
with its own identity and series, referenced by the SR and the ORU, queued in the outbox one item each, and
delivered over shared associations. No framework: the model and its explanation are stand-ins."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import hl7
import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.sr.coding import Code
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    Comprehensive3DSRStorage,
    ParametricMapStorage,
    SecondaryCaptureImageStorage,
)

from dicom_node.deliver.dicom import AssociationOutcome, DicomSender
from dicom_node.outputs.parametric_map import PARAMETRIC_MAP_SERIES_NUMBER, parametric_map_uids
from dicom_node.outputs.secondary_capture import OVERLAY_SERIES_NUMBER, overlay_uids
from dicom_node.outputs.structured_report import (
    DEMO_LABEL_CODES,
    STRUCTURED_REPORT_SERIES_NUMBER,
    structured_report_uids,
)
from dicom_node.peers.dicom_sink import DicomSink
from dicom_node.peers.synthetic_cr import make_cr_dataset
from dicom_node.process.processor import (
    ModelResult,
    NotEligible,
    Prepared,
    Processed,
    Processor,
    enqueue_outputs,
)
from dicom_node.process.rules import load_rules
from dicom_node.settings import DestinationSettings, LabelCode, OutputsSettings, Settings, load_settings
from dicom_node.storage.jobs import JobState
from dicom_node.storage.outbox import Outbox
from tests.support.outputs import StandInExplanation, StandInModel, part10_bytes

LABELS = ("no_finding", "focal_opacity")


# A model of its own (not the demo's id, version or input size), so the outputs are seen to name what they are given.
MODEL = StandInModel(labels=LABELS, model_id="test-cnn", version="2.0", input_size=(64, 64))


def _hot_spot() -> np.ndarray:
    heat = np.zeros((16, 16), np.float32)
    heat[3:6, 2:5] = 1.0
    return heat


def _processor(**outputs: Any) -> Processor:
    settings = Settings().model_copy(update={"outputs": OutputsSettings(**outputs)})
    return Processor(settings, MODEL, load_rules(None))  # type: ignore[arg-type]


def _source(**kw: Any) -> Dataset:
    return make_cr_dataset(rows=128, cols=96, **kw)


def _processed(processor: Processor, source: Dataset | None = None) -> Processed:
    item = processor.prepare(source if source is not None else _source())
    assert isinstance(item, Prepared)
    # A hot spot in the upper left of a 16x16 map, the second class called at 0.8.
    explanation = StandInExplanation(_hot_spot()[np.newaxis], np.array([[0.2, 0.8]], np.float32))
    return processor.build_outputs(item, ModelResult(explanation, 0, 1.0))


def _round_trip(ds: Dataset) -> Dataset:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))


def _obx(message: hl7.Message, code: str) -> list[str]:
    return [str(obx[5]) for obx in message.segments("OBX") if str(obx[3][0][0]) == code or str(obx[3]) == code]


def test_three_objects_each_with_its_own_identity_and_series_in_the_source_study() -> None:
    source = _source()
    out = _processed(_processor(), source)
    sc, pm, sr = out.dicom_outputs
    assert (sc, pm, sr) == (out.secondary_capture, out.parametric_map, out.structured_report)
    assert [ds.SOPClassUID for ds in (sc, pm, sr)] == [
        SecondaryCaptureImageStorage, ParametricMapStorage, Comprehensive3DSRStorage]
    assert [ds.SeriesNumber for ds in (sc, pm, sr)] == [
        OVERLAY_SERIES_NUMBER, PARAMETRIC_MAP_SERIES_NUMBER, STRUCTURED_REPORT_SERIES_NUMBER]
    assert {ds.StudyInstanceUID for ds in (sc, pm, sr)} == {source.StudyInstanceUID}
    assert len({ds.SeriesInstanceUID for ds in (sc, pm, sr)} | {source.SeriesInstanceUID}) == 4
    # Each identity is the builder's own deterministic one for (source, model id, version, method).
    assert (sc.SeriesInstanceUID, sc.SOPInstanceUID) == overlay_uids(source, out.result)
    assert (pm.SeriesInstanceUID, pm.SOPInstanceUID) == parametric_map_uids(source, out.result)[:2]
    assert (sr.SeriesInstanceUID, sr.SOPInstanceUID) == structured_report_uids(source, out.result)
    again = _processed(_processor(), source)
    assert [ds.SOPInstanceUID for ds in again.dicom_outputs] == [ds.SOPInstanceUID for ds in (sc, pm, sr)]
    assert {"secondary_capture", "parametric_map", "structured_report", "hl7"} <= set(out.result.timings_ms)


def test_the_map_is_the_explained_heatmap_on_the_source_grid() -> None:
    source = _source()
    pm = _round_trip(_processed(_processor(), source).parametric_map)  # type: ignore[arg-type]
    levels = pm.pixel_array
    assert levels.shape == (source.Rows, source.Columns)
    # The hot spot of the 16x16 map (rows 3-5, columns 2-4) lands in the same place on the 128x96 grid.
    peak_row, peak_col = np.unravel_index(int(np.argmax(levels)), levels.shape)
    assert 3 * 8 <= peak_row < 6 * 8 and 2 * 6 <= peak_col < 5 * 6
    assert levels[100:, 60:].max() == 0


def test_the_report_references_the_source_the_overlay_and_the_map() -> None:
    source = _source()
    out = _processed(_processor(), source)
    sr = hd.sr.srread(io.BytesIO(part10_bytes(out.structured_report)))  # type: ignore[arg-type]
    group = sr.content.get_image_measurement_groups()[0]
    referenced = {
        item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for item in group[0].ContentSequence
        if item.ValueType == "IMAGE"
    }
    expected = {source.SOPInstanceUID, out.secondary_capture.SOPInstanceUID,  # type: ignore[union-attr]
                out.parametric_map.SOPInstanceUID}  # type: ignore[union-attr]
    assert referenced == expected
    finding = group.finding_type
    assert (finding.value, finding.scheme_designator) == ("focal_opacity", "99CXRL")


def test_the_oru_names_the_map_and_the_report() -> None:
    out = _processed(_processor())
    message = hl7.parse(out.oru_message)
    assert _obx(message, "AIPMAP") == [out.parametric_map.SOPInstanceUID]  # type: ignore[union-attr]
    assert _obx(message, "AISR") == [out.structured_report.SOPInstanceUID]  # type: ignore[union-attr]
    assert _obx(message, "^SOP Instance UID") == [out.secondary_capture.SOPInstanceUID]  # type: ignore[union-attr]
    assert out.oru_key == out.secondary_capture.SOPInstanceUID  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "enabled",
    [
        {"secondary_capture": False},
        {"parametric_map": False},
        {"structured_report": False},
        {"parametric_map": False, "structured_report": False},
        {"secondary_capture": False, "parametric_map": False, "structured_report": False},
    ],
)
def test_outputs_turned_off_are_neither_built_nor_named(enabled: dict[str, bool]) -> None:
    source = _source()
    out = _processed(_processor(**enabled), source)
    built = {name: getattr(out, name) is not None for name in ("secondary_capture", "parametric_map",
                                                                "structured_report")}
    assert built == {name: enabled.get(name, True) for name in built}
    message = hl7.parse(out.oru_message)
    assert bool(_obx(message, "^SOP Instance UID")) == built["secondary_capture"]
    assert bool(_obx(message, "112002")) == built["secondary_capture"]
    assert bool(_obx(message, "AIPMAP")) == built["parametric_map"]
    assert bool(_obx(message, "AISR")) == built["structured_report"]
    assert _obx(message, "113014") == [source.StudyInstanceUID]
    # The ORU keeps one key whichever objects exist, so a re-processed image never sends a second message.
    assert out.oru_key == overlay_uids(source, out.result)[1]
    if out.structured_report is not None:
        sr = hd.sr.srread(io.BytesIO(part10_bytes(out.structured_report)))
        images = [item for item in sr.content.get_image_measurement_groups()[0][0].ContentSequence
                  if item.ValueType == "IMAGE"]
        assert len(images) == 1 + built["secondary_capture"] + built["parametric_map"]


def test_label_codes_from_the_settings_reach_the_report() -> None:
    pneumonia = LabelCode(value="233604007", scheme="SCT", meaning="Pneumonia")
    out = _processed(_processor(label_codes={"focal_opacity": pneumonia}))
    sr = hd.sr.srread(io.BytesIO(part10_bytes(out.structured_report)))  # type: ignore[arg-type]
    group = sr.content.get_image_measurement_groups()[0]
    assert (group.finding_type.value, group.finding_type.scheme_designator) == ("233604007", "SCT")
    names = {m.name.value for m in group.get_measurements()}
    assert {"233604007", "no_finding"} <= names  # the unlisted label falls back to the demo's private code


def test_default_label_codes_are_the_report_builders_demo_codes() -> None:
    defaults = load_settings(None).outputs.label_codes
    assert {label: Code(c.value, c.scheme, c.meaning) for label, c in defaults.items()} == dict(DEMO_LABEL_CODES)


class RecordingSender:
    def __init__(self) -> None:
        self.items: list[tuple[bytes | str, str]] = []

    def enqueue(self, payload: bytes | str, dedup_key: str, *, source_received_at: float | None = None) -> list[int]:
        self.items.append((payload, dedup_key))
        return [len(self.items)]


def test_each_object_is_its_own_outbox_item_keyed_by_its_uid() -> None:
    out = _processed(_processor())
    dicom, hl7_sender = RecordingSender(), RecordingSender()
    outcome = enqueue_outputs(7, out, dicom, hl7_sender)
    assert (outcome.job_id, outcome.state) == (7, JobState.DONE)
    queued = [pydicom.dcmread(io.BytesIO(payload)) for payload, _ in dicom.items]  # type: ignore[arg-type]
    assert [ds.SOPInstanceUID for ds in queued] == [ds.SOPInstanceUID for ds in out.dicom_outputs]
    assert [key for _, key in dicom.items] == [str(ds.SOPInstanceUID) for ds in out.dicom_outputs]
    assert hl7_sender.items == [(out.oru_message, out.oru_key)]


def test_an_ineligible_image_queues_nothing() -> None:
    processor = _processor()
    item = processor.prepare(_source(body_part="KNEE"))
    assert isinstance(item, NotEligible)
    dicom, hl7_sender = RecordingSender(), RecordingSender()
    assert enqueue_outputs(1, item, dicom, hl7_sender).state == JobState.INELIGIBLE
    assert dicom.items == [] and hl7_sender.items == []


# --- delivery: the three SOP Classes interleaved in one destination's FIFO -------------------------------------


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    box = Outbox(tmp_path / "outbox.db")
    yield box
    box.close()


class CountingSender(DicomSender):
    """A DicomSender that counts the associations it opens."""

    associations = 0

    def _associate(self, *args: Any) -> Any:
        self.associations += 1
        return super()._associate(*args)


def _queue_two_images(sender: DicomSender) -> list[Dataset]:
    objects = []
    for n in range(2):
        out = _processed(_processor(), _source(sop_uid=f"1.2.826.0.1.3680043.8.498.77.{n}", seed=n))
        objects += out.dicom_outputs
        enqueue_outputs(n, out, sender, None)
    return objects


def test_an_images_objects_share_one_association_in_fifo_order(outbox: Outbox, sink: DicomSink) -> None:
    destination = DestinationSettings(ae_title="PACS", host="127.0.0.1", port=sink.port)
    sender = CountingSender(outbox, [destination], ae_title="CXRLENS")
    objects = _queue_two_images(sender)  # SC, PM, SR, SC, PM, SR
    assert sender.run_once() == 6
    assert sender.associations == 1
    received = sink.wait_for(6)
    assert [r.sop_instance_uid for r in received] == [ds.SOPInstanceUID for ds in objects]
    assert [r.sop_class_uid for r in received] == [SecondaryCaptureImageStorage, ParametricMapStorage,
                                                   Comprehensive3DSRStorage] * 2
    for r, ds in zip(received, objects, strict=True):
        assert pydicom.dcmread(r.path).SOPInstanceUID == ds.SOPInstanceUID
    assert outbox.counts() == {("dicom", "done"): 6}


@dataclass
class OldPacs:
    """A PACS that stores Secondary Captures and SRs but has never heard of Parametric Maps."""

    destination: DestinationSettings
    stored: list[str]


@pytest.fixture
def old_pacs() -> Iterator[OldPacs]:
    stored: list[str] = []

    def on_store(event: evt.Event) -> int:
        stored.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    ae = AE(ae_title="OLDPACS")
    for sop_class in (SecondaryCaptureImageStorage, Comprehensive3DSRStorage):
        ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        yield OldPacs(DestinationSettings(ae_title="OLDPACS", host="127.0.0.1", port=server.server_address[1]),
                      stored)
    finally:
        server.shutdown()


def _parked_classes(outbox: Outbox) -> list[str]:
    parked = outbox.problems()
    assert all(item.state == "parked" for item in parked)
    assert all(item.last_error == AssociationOutcome.NO_PRESENTATION_CONTEXT.value for item in parked)
    return [pydicom.dcmread(io.BytesIO(item.payload)).SOPClassUID for item in parked]


def test_a_pacs_without_parametric_maps_parks_them_and_takes_the_rest(outbox: Outbox, old_pacs: OldPacs) -> None:
    sender = CountingSender(outbox, [old_pacs.destination], ae_title="CXRLENS")
    objects = _queue_two_images(sender)
    sender.run_once()
    assert old_pacs.stored == [str(ds.SOPInstanceUID) for ds in objects if ds.SOPClassUID != ParametricMapStorage]
    assert _parked_classes(outbox) == [ParametricMapStorage] * 2
    # The peer refused the Parametric Map class outright when the first association was negotiated: every map
    # behind it is parked on that association, and the other objects go on over it.
    assert sender.associations == 1


def test_a_refused_head_is_parked_and_what_follows_goes_on_the_same_association(
    outbox: Outbox, old_pacs: OldPacs
) -> None:
    sender = CountingSender(outbox, [old_pacs.destination], ae_title="CXRLENS")
    out = _processed(_processor(secondary_capture=False))
    enqueue_outputs(1, out, sender, None)  # the map heads the queue, the report follows
    sender.run_once()
    assert old_pacs.stored == [str(out.structured_report.SOPInstanceUID)]  # type: ignore[union-attr]
    assert _parked_classes(outbox) == [ParametricMapStorage]
    assert sender.associations == 1


def test_the_test_model_and_a_trust_warning_are_named_in_the_map_and_the_report() -> None:
    import dataclasses

    from dicom_node.outputs.parametric_map import build_parametric_map
    from dicom_node.outputs.structured_report import build_structured_report

    source = _source()
    suspect = {"lungs": 0.03, "body": 0.2, "outside_body": 0.03, "border": 0.1, "markers": 0.64,
               "peak_region": "markers", "verdict": "suspect", "reasons": ["evidence_on_marker"]}
    result = dataclasses.replace(_processed(_processor(), source).result, is_demo=False, is_test=True,
                                 evidence=suspect)
    pm = build_parametric_map(source, _hot_spot(), result)
    sr = build_structured_report(source, result, evidence=result.evidence)
    assert pm.SeriesDescription.endswith(" TEST") and sr.SeriesDescription.endswith(" TEST")
    assert "TEST MODEL" in pm.ImageComments and result.trust_warning in pm.ImageComments
    assert result.trust_warning.startswith("CHECK: ")
    group = hd.sr.srread(io.BytesIO(part10_bytes(sr))).content.get_image_measurement_groups()[0]
    shares = {m.name.value: m.value for m in group.get_measurements()}
    assert float(shares["lung_share"]) == pytest.approx(0.03)
