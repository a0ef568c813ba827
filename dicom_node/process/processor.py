"""The one place where the stages are wired: render -> explain -> overlay -> Secondary Capture + ORU.

TensorFlow is reached only from here (through ``models`` and ``explain``), and only when a
:class:`Processor` is built, so importing this module stays cheap for the network-only commands.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import pydicom
from pydicom import Dataset

from dicom_node.errors import CxrLensError, ModelError
from dicom_node.imaging import pixels
from dicom_node.outputs.oru import build_oru, new_message_control_id
from dicom_node.outputs.results import (
    AI_DISCLAIMER,
    DEMO_LABEL,
    InferenceResult,
    OverlayRef,
)
from dicom_node.outputs.secondary_capture import build_secondary_capture
from dicom_node.process.rules import Rules, evaluate
from dicom_node.settings import Settings

if TYPE_CHECKING:
    from models.loading import LoadedModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Processed:
    result: InferenceResult
    secondary_capture: Dataset
    overlay: np.ndarray  # RGB, what the SC carries
    oru_message: str
    status: str = "processed"

    @property
    def overlay_png(self) -> bytes:
        """The overlay as PNG, encoded on demand (the node sends only the SC and the ORU)."""
        return encode_png(self.overlay)


@dataclass(frozen=True)
class NotEligible:
    rule: str
    reason: str
    status: str = "not_eligible"


@dataclass(frozen=True)
class Failed:
    reason: str
    status: str = "failed"


Outcome = Processed | NotEligible | Failed


@dataclass
class _Prepared:
    index: int
    source: Dataset
    display: np.ndarray
    model_input: np.ndarray
    timings_ms: dict[str, float] = field(default_factory=dict)


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000.0, 2)


def encode_png(rgb: np.ndarray, max_long_side: int | None = None) -> bytes:
    """PNG bytes of an RGB image, optionally downscaled so its long side is at most ``max_long_side``."""
    if max_long_side is not None and max(rgb.shape[:2]) > max_long_side:
        f = max_long_side / max(rgb.shape[:2])
        rgb = cv2.resize(rgb, (max(1, round(rgb.shape[1] * f)), max(1, round(rgb.shape[0] * f))),
                         interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise CxrLensError("PNG encoding failed")
    return buf.tobytes()


class Processor:
    """Turns source datasets into outputs. One per process; holds the loaded model."""

    def __init__(self, settings: Settings, model: "LoadedModel", rules: Rules) -> None:
        self.settings = settings
        self.model = model
        self.rules = rules

    def warm_up(self, batch_size: int, should_stop: Callable[[], bool]) -> None:
        """Trace every batch-size bucket up to ``batch_size`` before the first job (see ``explain.warm_up``)."""
        from explain import warm_up

        warm_up(self.model, batch_size, method=self.settings.explain.method, should_stop=should_stop)

    def prepare(self, index: int, source: Dataset) -> _Prepared | Outcome:
        """Eligibility, then viewer rendering and model input. Pure CPU work; safe to run on a thread pool."""
        verdict = evaluate(source, self.rules)
        if not verdict.eligible:
            return NotEligible(verdict.rule or "", verdict.reason)
        t = time.perf_counter()
        cfg = self.settings.pixels
        try:
            # Rendered straight at the overlay's size (JPEG 2000: decoded only to the level it needs), never
            # below the model's input size.
            display = pixels.render_display(
                source, max_pixels=cfg.max_pixels, max_long_side=cfg.overlay_max_long_side,
                min_shape=self.model.input_size, reduced_decode=cfg.reduced_decode,
            )
        except CxrLensError as exc:
            return Failed(f"{type(exc).__name__}: {exc}")
        image = display.pixels
        x = pixels.model_input(image, self.model.input_size, self.model.channels, self.model.preprocess)
        return _Prepared(index, source, image, x, {"render": _ms(t)})

    def process(self, sources: list[Dataset]) -> list[Outcome]:
        """Process a batch: every source gets exactly one outcome, in order."""
        outcomes: list[Outcome | None] = [None] * len(sources)
        prepared: list[_Prepared] = []
        for i, ds in enumerate(sources):
            item = self.prepare(i, ds)
            if isinstance(item, _Prepared):
                prepared.append(item)
            else:
                outcomes[i] = item
        if prepared:
            for item, outcome in zip(prepared, self.explain_prepared(prepared)):
                outcomes[item.index] = outcome
        return [o if o is not None else Failed("internal: no outcome") for o in outcomes]

    def explain_prepared(self, prepared: list[_Prepared]) -> list[Outcome]:
        from explain import explain

        cfg = self.settings.explain
        t = time.perf_counter()
        explanation = explain(self.model, np.stack([p.model_input for p in prepared]), method=cfg.method)
        explain_ms = _ms(t) / len(prepared)
        results: list[Outcome] = []
        for b, item in enumerate(prepared):
            try:
                results.append(self._outputs(item, explanation, b, explain_ms))
            except CxrLensError as exc:
                results.append(Failed(f"{type(exc).__name__}: {exc}"))
        return results

    def _outputs(self, item: _Prepared, explanation: Any, b: int, explain_ms: float) -> Processed:
        from explain.overlay import compose_overlay, legend_lines
        from explain.render import normalise

        cfg = self.settings.explain
        model = self.model
        if not (np.isfinite(explanation.probabilities[b]).all() and np.isfinite(explanation.heatmaps[b]).all()):
            # A broken model (NaN weights, an overflow in float16): fail the job by name rather than send "nan"
            # probabilities to HealthShare or a heatmap that cannot be drawn.
            raise ModelError("the model's output is not finite (NaN or infinity); no result was sent")
        probs = {label: float(p) for label, p in zip(model.labels, explanation.probabilities[b])}
        class_index = int(explanation.class_index[b])
        label = model.labels[class_index]
        heat = normalise(explanation.heatmaps[b], no_evidence_threshold=cfg.no_evidence_threshold)
        timings = dict(item.timings_ms, explain=round(explain_ms, 2))
        result = InferenceResult(
            label=label, class_index=class_index, probabilities=probs, method=explanation.method,
            model_id=model.model_id, model_version=model.version, is_demo=model.is_demo,
            heatmap_max=heat.raw_max, no_evidence=heat.no_evidence, timings_ms=timings,
        )
        t = time.perf_counter()
        warnings = [AI_DISCLAIMER] + ([DEMO_LABEL + " - synthetic training data"] if model.is_demo else [])
        overlay = compose_overlay(
            item.display, heat,
            lines=legend_lines(label, probs[label], result.method, result.model_text, no_evidence=heat.no_evidence),
            warnings=warnings, colormap=cfg.colormap, alpha=cfg.alpha,
        )
        timings["overlay"] = _ms(t)
        t = time.perf_counter()
        sc = build_secondary_capture(item.source, overlay, result)
        timings["secondary_capture"] = _ms(t)
        t = time.perf_counter()
        hl7_png = encode_png(overlay, self.settings.hl7.image_long_side) if self.settings.hl7.include_image else None
        ref = OverlayRef(str(sc.StudyInstanceUID), str(sc.SeriesInstanceUID), str(sc.SOPInstanceUID), hl7_png)
        oru = build_oru(item.source, result, ref, self.settings.hl7,
                        message_control_id=new_message_control_id(), now=datetime.now().astimezone())
        timings["hl7"] = _ms(t)
        return Processed(result=result, secondary_capture=sc, overlay=overlay, oru_message=oru)


def load_processor(settings: Settings) -> Processor:
    """Load the model and rules named by ``settings`` (imports TensorFlow)."""
    from dicom_node.process.rules import load_rules
    from explain import configure_device
    from models import loading as models_loading
    from models.loading import load_model

    device = configure_device()  # GPU memory growth and mixed precision where supported; no-op on CPU
    log.info("device: %d GPU(s), mixed precision %s", device.gpus, "on" if device.mixed_precision else "off")
    try:
        model = load_model(settings.model)
    except models_loading.ModelError as exc:
        raise ModelError(str(exc)) from exc
    return Processor(settings, model, load_rules(settings.rules_file))


def _part10_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def make_process_batch(processor: Processor, dicom_sender: Any, hl7_sender: Any | None) -> Any:
    """The worker's ``process_batch``: spooled bytes -> outcomes, with outputs stored in the outbox first.

    Outputs are enqueued (durably) before the job is reported done, so a crash in between re-processes the job
    and the outbox's de-duplication key (the overlay's SOP Instance UID) keeps it from being delivered twice.
    """
    def process_batch(items: list[tuple[Any, bytes]]) -> list[Any]:
        parsed = [(job, _parse_spooled(data)) for job, data in items]
        datasets = [d for _, d in parsed if isinstance(d, Dataset)]
        results = iter(processor.process(datasets) if datasets else [])
        return [
            deliver(job.id, next(results) if isinstance(d, Dataset) else d, dicom_sender, hl7_sender)
            for job, d in parsed
        ]

    return process_batch


def _parse_spooled(data: bytes) -> Dataset | Failed:
    try:
        return pydicom.dcmread(io.BytesIO(data))
    except Exception as exc:  # boundary: a spooled file that no longer parses fails its job
        return Failed(f"spooled instance does not parse ({type(exc).__name__})")


def deliver(job_id: int, outcome: Outcome, dicom_sender: Any, hl7_sender: Any | None) -> Any:
    """Enqueue a processed job's outputs durably (SC, then ORU) and return the job's outcome."""
    from dicom_node.process.worker import JobOutcome
    from dicom_node.storage.jobs import JobState

    if isinstance(outcome, Processed):
        key = str(outcome.secondary_capture.SOPInstanceUID)
        dicom_sender.enqueue(_part10_bytes(outcome.secondary_capture), dedup_key=key)
        if hl7_sender is not None:
            hl7_sender.enqueue(outcome.oru_message, dedup_key=key)
        return JobOutcome(job_id, JobState.DONE)
    if isinstance(outcome, NotEligible):
        return JobOutcome(job_id, JobState.INELIGIBLE, rule=outcome.rule, reason=outcome.reason)
    return JobOutcome(job_id, JobState.FAILED, reason=outcome.reason)


@dataclass(frozen=True)
class _BatchResult:
    explanation: Any
    index: int
    explain_ms: float


class ProcessorStages:
    """The node's work as the pipelined worker's stages (``dicom_node.process.stages``): parse and render on the
    decode pool, one model pass per batch, overlay + Secondary Capture + ORU on the output pool."""

    def __init__(self, processor: Processor, dicom_sender: Any, hl7_sender: Any | None) -> None:
        self.processor = processor
        self.dicom_sender = dicom_sender
        self.hl7_sender = hl7_sender

    def prepare(self, job: Any, data: bytes) -> Any:
        ds = _parse_spooled(data)
        item = self.processor.prepare(0, ds) if isinstance(ds, Dataset) else ds
        return item if isinstance(item, _Prepared) else deliver(job.id, item, self.dicom_sender, self.hl7_sender)

    def infer(self, items: list[_Prepared]) -> list[_BatchResult]:
        from explain import explain

        t = time.perf_counter()
        explanation = explain(self.processor.model, np.stack([p.model_input for p in items]),
                              method=self.processor.settings.explain.method)
        per_image = _ms(t) / len(items)
        return [_BatchResult(explanation, b, per_image) for b in range(len(items))]

    def finish(self, job: Any, item: _Prepared, result: _BatchResult) -> Any:
        try:
            outcome: Outcome = self.processor._outputs(item, result.explanation, result.index, result.explain_ms)
        except CxrLensError as exc:
            outcome = Failed(f"{type(exc).__name__}: {exc}")
        return deliver(job.id, outcome, self.dicom_sender, self.hl7_sender)
