"""What each CLI command does, given settings. Kept apart from ``cli.py`` so that parsing stays thin."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import pydicom
from pydicom import Dataset
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from dicom_node.outputs.oru import OBS_LUNG_SHARE, OBS_TRUST_VERDICT
from dicom_node.outputs.parametric_map import PARAMETRIC_MAP_STORAGE
from dicom_node.outputs.results import AI_DISCLAIMER, DEMO_LABEL, TEST_LABEL
from dicom_node.outputs.secondary_capture import SC_IMAGE_STORAGE
from dicom_node.outputs.structured_report import COMPREHENSIVE_3D_SR_STORAGE
from dicom_node.process.processor import (
    Failed,
    NotEligible,
    Outcome,
    Processed,
    encode_png,
    load_processor,
)
from dicom_node.settings import Settings

logger = logging.getLogger(__name__)

# A processed image's DICOM objects: ``Processed`` attribute and ``[outputs]`` key, SOP Class, and file name in
# ``explain``'s and ``demo``'s output directory.
DICOM_OUTPUT_FILES = (
    ("secondary_capture", SC_IMAGE_STORAGE, "overlay.dcm"),
    ("parametric_map", PARAMETRIC_MAP_STORAGE, "parametric_map.dcm"),
    ("structured_report", COMPREHENSIVE_3D_SR_STORAGE, "structured_report.dcm"),
)


def _expand(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        files.extend(sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p])
    return files


def _unique_dirs(files: list[Path], out: Path) -> list[Path]:
    seen: dict[str, int] = {}
    dirs = []
    for f in files:
        stem = f.stem or f.name
        n = seen.get(stem, 0)
        seen[stem] = n + 1
        dirs.append(out / (stem if n == 0 else f"{stem}-{n + 1}"))
    return dirs


def _read(path: Path) -> Dataset | Failed:
    try:
        return pydicom.dcmread(path)
    except Exception as exc:  # boundary: any reader failure becomes a named, reported result
        return Failed(f"cannot read {path.name} as DICOM ({type(exc).__name__}: {exc})")


def result_record(source_name: str, outcome: Outcome) -> dict[str, Any]:
    """The ``result.json`` content for one input (no patient identifiers)."""
    record: dict[str, Any] = {"input": source_name, "status": outcome.status}
    if isinstance(outcome, NotEligible):
        record.update(rule=outcome.rule, reason=outcome.reason)
    elif isinstance(outcome, Failed):
        record.update(reason=outcome.reason)
    else:
        r = outcome.result
        objects = {
            name: {"series_instance_uid": str(ds.SeriesInstanceUID), "sop_instance_uid": str(ds.SOPInstanceUID)}
            for name, _, _ in DICOM_OUTPUT_FILES if (ds := getattr(outcome, name)) is not None
        }
        record.update(
            label=r.label,
            probability=round(r.probability, 6),
            probabilities={k: round(v, 6) for k, v in r.probabilities.items()},
            model={"id": r.model_id, "version": r.model_version, "demo": r.is_demo},
            explanation={"method": r.method, "heatmap_max": r.heatmap_max, "no_evidence": r.no_evidence},
            **objects,
            timings_ms=r.timings_ms,
            disclaimer=AI_DISCLAIMER + (f" - {r.model_label}" if r.model_label else ""),
        )
        if r.evidence is not None:
            record["evidence"] = dict(r.evidence)
    return record


def write_outputs(directory: Path, source_name: str, outcome: Outcome) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    if isinstance(outcome, Processed):
        for name, _, file_name in DICOM_OUTPUT_FILES:
            if (dataset := getattr(outcome, name)) is not None:
                dataset.save_as(directory / file_name, enforce_file_format=True)
        (directory / "overlay.png").write_bytes(outcome.overlay_png)
        if outcome.regions is not None:
            # The anatomy regions' label image, single-channel 8-bit at the display size: 0 outside the body,
            # 1 lung fields, 2 rest of the body, 3 border band, 4 markers.
            (directory / "regions.png").write_bytes(encode_png(outcome.regions))
        (directory / "result.hl7").write_text(outcome.oru_message.replace("\r", "\n"), encoding="utf-8")
    record = result_record(source_name, outcome)
    (directory / "result.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def run_explain(settings: Settings, paths: list[Path], out: Path, *, console: Console | None = None) -> int:
    """Explain files offline. Exit status 1 when any input failed (ineligible inputs are not failures)."""
    console = console or Console(stderr=True)
    files = _expand(paths)
    if not files:
        console.print("cxr-lens: no input files")
        return 1
    processor = load_processor(settings)
    dirs = _unique_dirs(files, out)
    rows: list[tuple[Path, Path, Outcome]] = []
    batch = settings.worker.batch_size
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True, disable=len(files) < 2) as progress:
        task = progress.add_task("explaining", total=len(files))
        for start in range(0, len(files), batch):
            chunk = list(zip(files[start:start + batch], dirs[start:start + batch], strict=True))
            read = [_read(f) for f, _ in chunk]
            datasets = [d for d in read if isinstance(d, Dataset)]
            processed = iter(processor.process(datasets) if datasets else [])
            outcomes = [next(processed) if isinstance(d, Dataset) else d for d in read]
            for (f, d), outcome in zip(chunk, outcomes, strict=True):
                write_outputs(d, f.name, outcome)
                rows.append((f, d, outcome))
                progress.advance(task)
    table = Table(title="cxr-lens explain", show_lines=False)
    for col in ("input", "status", "label", "p", "output / reason"):
        table.add_column(col)
    for f, d, outcome in rows:
        if isinstance(outcome, Processed):
            table.add_row(f.name, "processed", outcome.result.label, f"{outcome.result.probability:.3f}", str(d))
        elif isinstance(outcome, NotEligible):
            table.add_row(f.name, "not eligible", "", "", f"{outcome.rule}: {outcome.reason}")
        else:
            table.add_row(f.name, "[red]failed[/red]", "", "", outcome.reason)
    Console(file=sys.stdout, width=160).print(table)
    if settings.model.is_demo:
        console.print(f"[bold yellow]{DEMO_LABEL}[/]: trained on synthetic phantoms, demonstration only. "
                      f"{AI_DISCLAIMER}.")
    elif settings.model.is_test_model:
        console.print(f"[bold yellow]{TEST_LABEL}[/]: made to look at a burned-in marker, not the lungs, to test the "
                      f"trust alarm. {AI_DISCLAIMER}.")
    failed = [(f, o) for f, _, o in rows if isinstance(o, Failed)]
    for f, o in failed:
        console.print(f"failed: {f}: {o.reason}")
    return 1 if failed else 0


def run_audit(settings: Settings, paths: list[Path], out: Path, *, console: Console | None = None) -> int:
    """Audit the model on a data set: ``out/report.html`` and ``out/audit.json``. Exit status 1 when no input
    could be processed or any input failed (ineligible inputs are not failures)."""
    from dicom_node.audit.collect import Audit
    from dicom_node.audit.report import write_report
    from dicom_node.audit.summary import summarise

    console = console or Console(stderr=True)
    files = _expand(paths)
    if not files:
        console.print("cxr-lens: no input files")
        return 1
    # The audit judges explanations: trust on whatever the file says, and none of the DICOM objects built.
    settings = settings.model_copy(update={
        "trust": settings.trust.model_copy(update={"enabled": True}),
        "outputs": settings.outputs.model_copy(update={"secondary_capture": False, "parametric_map": False,
                                                       "structured_report": False}),
        "hl7": settings.hl7.model_copy(update={"include_image": False}),
    })
    audit = Audit(load_processor(settings))
    batch = settings.worker.batch_size
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("auditing", total=len(files))
        for start in range(0, len(files), batch):
            chunk = files[start:start + batch]
            audit.add([(f.name, _read(f)) for f in chunk])
            progress.advance(task, len(chunk))
        progress.update(task, description="sanity check")
        findings = audit.finish()
    thresholds = settings.trust.model_dump(exclude={"enabled"})
    summary = summarise(findings, thresholds)
    report = write_report(out, findings, summary, colormap=settings.explain.colormap)
    images = summary["images"]
    Console(file=sys.stdout, width=160).print(
        f"cxr-lens audit: {images['processed']} processed, {images['not_eligible']} not eligible, "
        f"{images['failed']} failed\n{summary['conclusion']}\nreport: {report.resolve()}", highlight=False)
    for name, reason in findings.failed:
        console.print(f"failed: {name}: {reason}")
    return 1 if findings.failed or not findings.cases else 0


def run_serve(settings: Settings, *, role: str = "all") -> int:
    """Run the node (the parts of ``role``) until SIGTERM or Ctrl-C; unfinished jobs and outbox items resume."""
    import signal
    import threading

    from dicom_node.node import compose

    node = compose(settings, role=role)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    node.start()
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        node.stop()
    return 0


def run_status(settings: Settings) -> int:
    from dicom_node.ops.status import collect_status, format_status
    from dicom_node.storage.backend import StorageError

    try:
        report = collect_status(settings.node.spool_dir, storage=settings.storage)
    except StorageError as exc:
        print(f"cxr-lens status: {exc}", file=sys.stderr)
        return 1
    print(format_status(report))
    return 0


DEMO_SAMPLE = "RG1_UNCR.dcm"


def _sample_radiograph() -> Path | None:
    try:
        from pydicom.data import get_testdata_file
    except ImportError:
        return None
    try:
        found = get_testdata_file(DEMO_SAMPLE)
    except Exception as exc:  # pydicom-data missing or unreadable: reported below with what to install
        logger.error("sample radiograph unavailable (%s)", type(exc).__name__)
        return None
    return Path(found) if found else None


def run_demo(settings: Settings, out: Path, *, timeout_s: float = 600.0) -> int:
    """The main job on one machine: node + a PACS sink + an MLLP sink; send RG1 by C-STORE, collect the outputs."""
    import tempfile

    from pynetdicom import AE

    from dicom_node.node import compose
    from dicom_node.peers.dicom_sink import DicomSink
    from dicom_node.peers.hl7_sink import HL7Sink
    from dicom_node.settings import DestinationSettings

    sample = _sample_radiograph()
    if sample is None:
        print("cxr-lens demo: the sample radiograph RG1_UNCR.dcm was not found; install the demo extra "
              "(pip install 'cxr-lens[demo]', which brings pydicom-data)", file=sys.stderr)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    source = pydicom.dcmread(sample)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cxr-lens-demo-") as tmp:
        pacs = DicomSink(Path(tmp) / "pacs", ae_title="DEMOPACS")
        pacs.start()
        ris = HL7Sink("127.0.0.1", 0, Path(tmp) / "hl7")
        ris.start()
        node_settings = settings.model_copy(update={
            "node": settings.node.model_copy(update={"host": "127.0.0.1", "port": 0, "http_port": 0,
                                                     "spool_dir": Path(tmp) / "spool", "free_disk_floor_mb": 0}),
            "destinations": (DestinationSettings(ae_title="DEMOPACS", host="127.0.0.1", port=pacs.port),),
            "hl7": settings.hl7.model_copy(update={"enabled": True, "host": "127.0.0.1", "port": ris.port}),
        })
        node = compose(node_settings)
        node.start()
        try:
            ae = AE(ae_title="DEMOMODALITY")
            ae.add_requested_context(source.SOPClassUID, source.file_meta.TransferSyntaxUID)
            assoc = ae.associate("127.0.0.1", node.scp_port, ae_title=node_settings.node.ae_title)
            if not assoc.is_established:
                print("cxr-lens demo: the node refused the association", file=sys.stderr)
                return 1
            status = assoc.send_c_store(source)
            assoc.release()
            print(f"demo: sent {DEMO_SAMPLE} (CR chest PA, {source.Rows}x{source.Columns}) to the node by C-STORE: "
                  f"status 0x{int(status.Status):04X}")
            expected = sum(bool(getattr(settings.outputs, name)) for name, _, _ in DICOM_OUTPUT_FILES)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and not (len(pacs.received) >= expected
                                                       and list(ris.out_dir.glob("*.hl7"))):
                time.sleep(0.1)
                failures = node.queue.recent_failures(1)
                if failures:
                    print(f"cxr-lens demo: processing failed: {failures[0].reason}", file=sys.stderr)
                    return 1
            messages = sorted(ris.out_dir.glob("*.hl7"))
            if not (len(pacs.received) >= expected and messages):
                print("cxr-lens demo: timed out waiting for the DICOM objects and the ORU", file=sys.stderr)
                return 1
        finally:
            node.stop()
            pacs.stop()
            ris.stop()
        by_class = {r.sop_class_uid: r.path for r in pacs.received}
        received = [(file_name, pydicom.dcmread(by_class[sop_class]))
                    for _, sop_class, file_name in DICOM_OUTPUT_FILES if sop_class in by_class]
        files = []
        for file_name, dataset in received:
            dataset.save_as(out / file_name, enforce_file_format=True)
            files.append(file_name)
            if file_name == "overlay.dcm":
                (out / "overlay.png").write_bytes(encode_png(dataset.pixel_array))
                files.append("overlay.png")
        oru = messages[0].read_bytes().decode("utf-8")
        (out / "result.hl7").write_text(oru.replace("\r", "\n").rstrip("\x1c\x0b\n") + "\n", encoding="utf-8")
    elapsed = time.perf_counter() - started
    obx = [seg.split("|") for seg in oru.split("\r") if seg.startswith("OBX|")]
    finding = next((f[5] for f in obx if len(f) > 5 and f[2] == "CWE"), "")
    same_study = all(ds.StudyInstanceUID == source.StudyInstanceUID for _, ds in received)
    for _, dataset in received:
        same = dataset.StudyInstanceUID == source.StudyInstanceUID
        print(f'demo: {dataset.SOPClassUID.name} received by the PACS sink: series "{dataset.SeriesDescription}", '
              f"{'same study as the radiograph' if same else 'WRONG STUDY'}")
    print(f"demo: ORU^R01 received and acknowledged by the MLLP sink: finding {finding}")
    share = next((f[5] for f in obx if len(f) > 5 and f[3].startswith(f"{OBS_LUNG_SHARE.code}^")), "")
    verdict = next((f[5].split("^")[0] for f in obx if len(f) > 5 and f[3].startswith(f"{OBS_TRUST_VERDICT.code}^")),
                   "")
    if share:
        print(f"demo: evidence in the lungs {100.0 * float(share):.0f}% (trust verdict {verdict})")
    print(f"demo: {DEMO_LABEL if settings.model.is_demo else 'model ' + settings.model.id} - {AI_DISCLAIMER}")
    print(f"demo: round trip {elapsed:.1f} s; outputs in {out.resolve()}: {', '.join([*files, 'result.hl7'])}")
    if "overlay.png" in files:
        print(f"overlay: {(out / 'overlay.png').resolve()}")
    return 0 if same_study else 1
