"""The whole product on real data: explain CLI, the demo round trip, and Orthanc as the PACS with the real model."""

from __future__ import annotations

import json
import re
import shutil
import time
from io import BytesIO
from pathlib import Path

import cv2
import highdicom as hd
import hl7
import numpy as np
import pydicom
import pytest

from dicom_node.cli import main
from dicom_node.outputs.parametric_map import map_grid
from dicom_node.peers.node_process import free_port
from dicom_node.settings import DestinationSettings, load_settings
from tests.support.dicom_tools import dciodvfy_errors, requires_dciodvfy
from tests.support.peers import needs_binary, sample, start_orthanc

pytestmark = [pytest.mark.tf, pytest.mark.slow]

RG1 = ("RG1_UNCR.dcm", "RG1_J2KR.dcm", "RG1_J2KI.dcm")
SC, PM, SR = "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.30", "1.2.840.10008.5.1.4.1.1.88.34"


@pytest.fixture(scope="module")
def explained(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path]:
    out = tmp_path_factory.mktemp("explain")
    broken = out.parent / "broken.dcm"
    broken.write_bytes(b"DICM but not really" * 10)
    inputs = [str(sample(n)) for n in (*RG1, "RG3_UNCR.dcm", "CT_small.dcm")] + [str(broken)]
    return main(["explain", *inputs, "--out", str(out / "out")]), out / "out"


def _alert_rows(png: Path) -> int:
    """Rows of the trust alert's red strip (explain.overlay) in an overlay PNG: from its first red row to its last."""
    rgb = cv2.cvtColor(cv2.imread(str(png)), cv2.COLOR_BGR2RGB)
    red = np.flatnonzero(np.all(rgb == np.array([200, 0, 0], np.uint8), axis=2).mean(axis=1) > 0.5)
    return int(red.max() - red.min() + 1) if red.size else 0


def _gray(png: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(png)), cv2.COLOR_BGR2GRAY).astype(np.float32)


def test_explain_writes_seven_files_per_radiograph(explained: tuple[int, Path]) -> None:
    code, out = explained
    assert code == 1  # the broken input failed, and the exit status says so
    for name in RG1:
        d = out / Path(name).stem
        assert sorted(p.name for p in d.iterdir()) == [
            "overlay.dcm", "overlay.png", "parametric_map.dcm", "regions.png", "result.hl7", "result.json",
            "structured_report.dcm"]
        result = json.loads((d / "result.json").read_text())
        assert result["status"] == "processed"
        assert result["label"] in ("no_finding", "focal_opacity")
        assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert result["model"] == {"id": "cxr-lens-demo-cnn", "version": "1.0.0", "demo": True}
        assert result["explanation"]["method"] == "gradcam"
        assert {"render", "explain", "overlay", "secondary_capture", "hl7"} <= set(result["timings_ms"])
        assert "DEMO MODEL" in result["disclaimer"]
        message = hl7.parse((d / "result.hl7").read_text().replace("\n", "\r").strip())
        assert str(message.segment("MSH")[9]) == "ORU^R01^ORU_R01"
        assert "DEMO MODEL" in str(message)
        # result.json and the ORU name each DICOM object written beside them, in the source's study.
        source = pydicom.dcmread(sample(name), stop_before_pixels=True)
        obx = {str(seg[3][0][0]) or str(seg[3][0][1]): str(seg[5]) for seg in message.segments("OBX")}
        for key, file_name, code in (("secondary_capture", "overlay.dcm", "SOP Instance UID"),
                                     ("parametric_map", "parametric_map.dcm", "AIPMAP"),
                                     ("structured_report", "structured_report.dcm", "AISR")):
            written = pydicom.dcmread(d / file_name, stop_before_pixels=True)
            assert result[key] == {"series_instance_uid": written.SeriesInstanceUID,
                                   "sop_instance_uid": written.SOPInstanceUID}
            assert obx[code] == written.SOPInstanceUID
            assert written.StudyInstanceUID == source.StudyInstanceUID


def test_explain_reports_where_the_evidence_lies(explained: tuple[int, Path]) -> None:
    _, out = explained
    for name in RG1:
        d = out / Path(name).stem
        evidence = json.loads((d / "result.json").read_text())["evidence"]
        shares = ("lungs", "body", "outside_body", "border", "markers")
        assert list(evidence) == [*shares, "peak_region", "verdict", "reasons"]
        assert sum(evidence[s] for s in shares) == pytest.approx(1.0, abs=1e-3)
        assert evidence["verdict"] in ("ok", "suspect", "no_lung_fields")
        # regions.png: one 8-bit channel at the display size (the overlay's width, its height without the legend).
        regions = cv2.imread(str(d / "regions.png"), cv2.IMREAD_UNCHANGED)
        overlay = cv2.imread(str(d / "overlay.png"))
        assert regions.ndim == 2 and regions.dtype == np.uint8 and set(np.unique(regions)) <= {0, 1, 2, 3, 4}
        assert regions.shape[1] == overlay.shape[1] and regions.shape[0] < overlay.shape[0]
        # RG1 is a frontal chest: a lung field (label 1) on each side of the midline, a third of the image or so.
        lungs = regions == 1
        half = regions.shape[1] // 2
        assert lungs[:, :half].mean() > 0.1 and lungs[:, half:].mean() > 0.1
        message = hl7.parse((d / "result.hl7").read_text().replace("\n", "\r").strip())
        share = next(obx for obx in message.segments("OBX") if str(obx[3][0][0]) == "lung_share")
        assert float(str(share[5])) == pytest.approx(evidence["lungs"], abs=1e-3)


def test_ineligible_and_broken_inputs_get_a_reason(explained: tuple[int, Path]) -> None:
    _, out = explained
    for stem, rule in (("RG3_UNCR", "body_part"), ("CT_small", "modality")):
        assert [p.name for p in (out / stem).iterdir()] == ["result.json"]
        result = json.loads((out / stem / "result.json").read_text())
        assert (result["status"], result["rule"]) == ("not_eligible", rule)
    broken = json.loads((out / "broken" / "result.json").read_text())
    assert broken["status"] == "failed" and "cannot read broken.dcm" in broken["reason"]


def test_three_transfer_syntaxes_give_alike_overlays_with_dark_lungs(explained: tuple[int, Path]) -> None:
    _, out = explained
    overlays = [_gray(out / Path(n).stem / "overlay.png") for n in RG1]
    # The source (1955x1841) capped at overlay_max_long_side 512, plus the legend band, whatever the syntax; an
    # alert strip between them where the trust verdict is not ok (RG1's border share lies near max_border_share).
    assert all(g.shape[1] == 482 and g.shape[0] > 512 for g in overlays)
    band = overlays[0].shape[0] - 512 - _alert_rows(out / "RG1_UNCR" / "overlay.png")
    for n, g in zip(RG1, overlays, strict=True):
        assert g.shape[0] == 512 + band + _alert_rows(out / Path(n).stem / "overlay.png")
    grays = [np.vstack([g[:512], g[-band:]]) for g in overlays]  # the picture and the legend band
    # UNCR is reduced from the full image, J2KR/J2KI decoded at resolution level 2 (a wavelet low-pass).
    assert np.abs(grays[0] - grays[1]).mean() < 3.0
    assert np.abs(grays[0] - grays[2]).mean() < 3.0
    picture = grays[0][:512]
    h, w = picture.shape
    mediastinum = picture[h // 4: 3 * h // 5, int(0.45 * w): int(0.55 * w)].mean()
    lungs = [picture[h // 4: h // 2, int(0.15 * w): int(0.3 * w)].mean(),
             picture[h // 4: h // 2, int(0.7 * w): int(0.85 * w)].mean()]
    assert mediastinum > max(lungs) + 30


@requires_dciodvfy
def test_explain_dicom_outputs_validate(explained: tuple[int, Path]) -> None:
    _, out = explained
    for name in RG1:
        for file_name in ("overlay.dcm", "parametric_map.dcm", "structured_report.dcm"):
            assert dciodvfy_errors(out / Path(name).stem / file_name) == [], (name, file_name)


def test_explain_report_reads_back_with_its_references(explained: tuple[int, Path]) -> None:
    _, out = explained
    d = out / "RG1_J2KI"
    result = json.loads((d / "result.json").read_text())
    report = hd.sr.srread(d / "structured_report.dcm")
    group = report.content.get_image_measurement_groups()[0]
    probabilities = {m.name.value: m.value for m in group.get_measurements()}
    # Beside the probabilities, the trust evidence's share on the lung fields (result.json's evidence).
    assert float(probabilities.pop("lung_share")) == pytest.approx(result["evidence"]["lungs"], abs=1e-6)
    assert probabilities == pytest.approx({k: v for k, v in result["probabilities"].items()}, abs=1e-6)
    assert group.finding_type.value == result["label"]
    referenced = {item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                  for item in group[0].ContentSequence if item.ValueType == "IMAGE"}
    source = pydicom.dcmread(sample("RG1_J2KI.dcm"), stop_before_pixels=True)
    assert referenced == {source.SOPInstanceUID, result["secondary_capture"]["sop_instance_uid"],
                          result["parametric_map"]["sop_instance_uid"]}
    heatmap = pydicom.dcmread(d / "parametric_map.dcm")
    # outputs.parametric_map_max_long_side (512): RG1's 1955 x 1841 grid in blocks of 4 x 4.
    assert heatmap.pixel_array.shape == map_grid(source.Rows, source.Columns, 512)[:2] == (489, 461)


def test_demo_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "same study as the radiograph" in printed and "DEMO MODEL" in printed
    # The lung share the ORU carried, as the summary prints it.
    shown = re.search(r"demo: evidence in the lungs (\d+)% \(trust verdict (ok|suspect|no_lung_fields)\)", printed)
    assert shown is not None, printed
    study = pydicom.dcmread(sample("RG1_UNCR.dcm"), stop_before_pixels=True).StudyInstanceUID
    oru = (tmp_path / "result.hl7").read_text()
    received = {}
    for file_name, sop_class in (("overlay.dcm", SC), ("parametric_map.dcm", PM), ("structured_report.dcm", SR)):
        ds = pydicom.dcmread(tmp_path / file_name)
        assert (ds.SOPClassUID, ds.StudyInstanceUID) == (sop_class, study)
        assert ds.SOPInstanceUID in oru  # the ORU names every object the PACS received
        received[file_name] = ds
    assert printed.count("same study as the radiograph") == 3
    assert (tmp_path / "overlay.png").stat().st_size > 10_000
    assert "OBX" in oru
    share = next(line.split("|")[5] for line in oru.splitlines() if line.startswith("OBX|") and "|lung_share^" in line)
    assert shown.group(1) == f"{100 * float(share):.0f}"
    if shutil.which("dciodvfy"):  # the objects that travelled over the network are judged too
        for file_name in received:
            assert dciodvfy_errors(tmp_path / file_name) == [], file_name


@needs_binary("Orthanc", "/usr/sbin/Orthanc")
def test_orthanc_pushes_radiographs_and_gets_their_objects_back(tmp_path: Path) -> None:
    """Orthanc (the PACS) pushes RG1 in three transfer syntaxes, RG3 and a CT; only RG1 gets objects back: an SC,
    a Parametric Map and an SR per instance, in RG1's study."""
    from dicom_node.node import compose

    node_port = free_port()
    orthanc = start_orthanc(tmp_path / "orthanc", modalities={"cxrlens": ("CXRLENS", "127.0.0.1", node_port)})
    try:
        settings = load_settings(None, [
            "node.host='127.0.0.1'", f"node.port={node_port}", "node.http_port=0", "node.free_disk_floor_mb=0",
            f"node.spool_dir='{tmp_path / 'spool'}'", "hl7.enabled=false", "worker.batch_wait_ms=0",
        ]).model_copy(update={"destinations": (
            DestinationSettings(ae_title=orthanc.ae_title, host="127.0.0.1", port=orthanc.dicom_port),)})
        node = compose(settings)
        with node:
            for name in (*RG1, "RG3_UNCR.dcm", "CT_small.dcm"):
                uploaded = orthanc.upload(sample(name))
                try:
                    orthanc.push(uploaded["ID"])
                except Exception:  # noqa: BLE001 - the CT is refused at negotiation: Orthanc reports a failed push
                    assert name == "CT_small.dcm"
                if name in RG1:
                    deadline = time.monotonic() + 120
                    while time.monotonic() < deadline and node.queue.counts().get("done", 0) < RG1.index(name) + 1:
                        time.sleep(0.2)
            again = orthanc.upload(sample("RG1_UNCR.dcm"))  # the same instance sent twice is processed once
            orthanc.push(again["ID"])
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and node.dicom_sender.outbox.counts().get(("dicom", "pending"), 0):
                time.sleep(0.2)
            counts = node.queue.counts()
            assert counts.get("done", 0) == 3 and counts.get("ineligible", 0) == 1 and not counts.get("failed")
        rg1_study = again["ParentStudy"]
        series = orthanc.get(f"/studies/{rg1_study}/series")
        by_class: dict[str, list[pydicom.Dataset]] = {}
        for one_series in series:
            datasets = [pydicom.dcmread(BytesIO(orthanc.get_bytes(f"/instances/{i}/file")))
                        for i in one_series["Instances"]]
            (sop_class,) = {ds.SOPClassUID for ds in datasets}  # one kind of object per series
            assert sop_class not in by_class  # and one series per kind
            by_class[sop_class] = datasets
        sources = {pydicom.dcmread(sample(n), stop_before_pixels=True).SOPInstanceUID for n in RG1}
        assert sorted(by_class) == sorted(["1.2.840.10008.5.1.4.1.1.1", SC, PM, SR])  # the radiographs' series too
        objects_of: dict[str, set[str]] = {source: set() for source in sources}
        for sop_class in (SC, PM):
            for ds in by_class[sop_class]:
                assert "DEMO MODEL" in ds.ImageComments
                objects_of[ds.SourceImageSequence[0].ReferencedSOPInstanceUID].add(ds.SOPInstanceUID)
        # One SC and one map per source instance, none twice, and one report per source naming all three.
        assert all(len(objects) == 2 for objects in objects_of.values())
        reports = {}
        for sr in by_class[SR]:
            evidence = {ref.ReferencedSOPInstanceUID for study in sr.CurrentRequestedProcedureEvidenceSequence
                        for series_item in study.ReferencedSeriesSequence for ref in series_item.ReferencedSOPSequence}
            (source,) = evidence & sources
            reports[source] = evidence
        assert reports == {source: {source, *objects} for source, objects in objects_of.items()}
        for other in ("RG3_UNCR.dcm", "CT_small.dcm"):
            ds = pydicom.dcmread(sample(other), stop_before_pixels=True)
            study = [s for s in orthanc.get("/studies?expand")
                     if s["MainDicomTags"]["StudyInstanceUID"] == ds.StudyInstanceUID]
            assert len(study) == 1 and len(study[0]["Series"]) == 1  # only the source series: no overlay
    finally:
        orthanc.stop()


@pytest.mark.parametrize("field", ["probabilities", "heatmaps"])
def test_a_non_finite_model_output_fails_the_image_by_name(field: str) -> None:
    """A model that outputs NaN gets no SC and no ORU ("nan" is not an HL7 NM), and the reason is named."""
    import dataclasses

    from dicom_node.errors import ModelError
    from dicom_node.process.processor import ModelResult, Prepared, load_processor
    from explain import explain

    processor = load_processor(load_settings())
    item = processor.prepare(pydicom.dcmread(sample("RG1_UNCR.dcm")))
    assert isinstance(item, Prepared)
    good = explain(processor.model, item.model_input[np.newaxis])
    assert processor.build_outputs(item, ModelResult(good, 0, 1.0)).result.label in ("no_finding", "focal_opacity")
    broken = np.array(getattr(good, field))
    broken[0].flat[0] = np.nan
    with pytest.raises(ModelError, match="not finite"):
        processor.build_outputs(item, ModelResult(dataclasses.replace(good, **{field: broken}), 0, 1.0))
