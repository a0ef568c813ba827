"""The one place where the stages are wired: render -> explain -> overlay -> SC, Parametric Map, SR + ORU.

:class:`Processor` does one image's steps (``prepare``, ``infer`` for a batch, ``build_outputs``);
:class:`ProcessorStages` runs them as the worker's stages and enqueues the outputs in the outbox.

TensorFlow is reached only from here (through ``models`` and ``explain``), and only when a
:class:`Processor` is built, so importing this module stays cheap for the network-only commands.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
from pydicom import Dataset
from pydicom.sr.coding import Code

from dicom_node.errors import CxrLensError, ModelError
from dicom_node.imaging import pixels
from dicom_node.imaging.instance import Instance, read_file
from dicom_node.ops.metrics import Metrics
from dicom_node.outputs import iod_lookups
from dicom_node.outputs.oru import build_oru, new_message_control_id
from dicom_node.outputs.parametric_map import build_parametric_map
from dicom_node.outputs.results import (
    AI_DISCLAIMER,
    DEMO_LABEL,
    TEST_LABEL,
    InferenceResult,
    OverlayRef,
)
from dicom_node.outputs.secondary_capture import build_secondary_capture, overlay_uids
from dicom_node.outputs.structured_report import InstanceReference, build_structured_report
from dicom_node.process.rules import Rules, evaluate
from dicom_node.process.worker import JobOutcome
from dicom_node.settings import Settings
from dicom_node.storage.jobs import Job, JobState

if TYPE_CHECKING:
    from typing_extensions import Buffer

    from explain.trust import Evidence
    from models.loading import LoadedModel

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Processed:
    """One image's outputs. The DICOM objects are None where ``[outputs]`` turns them off."""

    result: InferenceResult
    secondary_capture: Dataset | None
    overlay: np.ndarray  # RGB, what the SC carries
    oru_message: str
    # The ORU's key in the outbox: the overlay's SOP Instance UID, stable per (source, model, method), built or not.
    oru_key: str
    parametric_map: Dataset | None = None
    structured_report: Dataset | None = None
    # The anatomy regions' label image (explain.regions: uint8 at the display size); None when [trust] is off.
    regions: np.ndarray | None = None
    heatmap: np.ndarray | None = None  # the map scaled to [0, 1] at the model's resolution (what the overlay shows)
    status: str = "processed"

    @property
    def overlay_png(self) -> bytes:
        """The overlay as PNG, encoded on demand (the node sends only the DICOM objects and the ORU)."""
        return encode_png(self.overlay)

    @property
    def dicom_outputs(self) -> list[Dataset]:
        """The DICOM objects to deliver: SC, Parametric Map, then the SR that references them."""
        return [ds for ds in (self.secondary_capture, self.parametric_map, self.structured_report) if ds is not None]


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
class Prepared:
    """An eligible image rendered for the viewer and for the model (``Processor.prepare``)."""

    source: Dataset
    display: np.ndarray
    model_input: np.ndarray
    timings_ms: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelResult:
    """One image's share of a batch's model pass: an explanation and this image's row in it."""

    explanation: Any
    index: int
    explain_ms: float  # the pass's time divided by the batch size


def explanation_row(explanation: Any, index: int, batch: int) -> SimpleNamespace:
    """Image ``index``'s share of a batch's explanation: its fields as plain values, every array with the batch
    axis cut to that row (a batch axis of one). With worker.processes it travels to a stage process, which can read
    it without importing the framework module that defines the batch's own type."""
    def row(value: Any) -> Any:
        if isinstance(value, np.ndarray) and value.ndim and value.shape[0] == batch:
            return value[index : index + 1].copy()
        return value

    return SimpleNamespace(**{f.name: row(getattr(explanation, f.name)) for f in dataclasses.fields(explanation)})


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000.0, 2)


def encode_png(rgb: np.ndarray, max_long_side: int | None = None) -> bytes:
    """PNG bytes of an RGB image (or of a 2-D one, as single-channel PNG), optionally downscaled so its long side
    is at most ``max_long_side``."""
    if max_long_side is not None and max(rgb.shape[:2]) > max_long_side:
        f = max_long_side / max(rgb.shape[:2])
        rgb = cv2.resize(rgb, (max(1, round(rgb.shape[1] * f)), max(1, round(rgb.shape[0] * f))),
                         interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".png", rgb if rgb.ndim == 2 else cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise CxrLensError("PNG encoding failed")
    return buf.tobytes()


class Processor:
    """Turns source datasets into outputs. One per process; holds the loaded model."""

    def __init__(self, settings: Settings, model: LoadedModel, rules: Rules) -> None:
        self.settings = settings
        self.model = model
        self.rules = rules
        self._label_codes = {
            label: Code(code.value, code.scheme, code.meaning) for label, code in settings.outputs.label_codes.items()
        }
        iod_lookups.load_tables()  # before the start-up's heap freeze, not at the first image (see there)

    def warm_up(self, batch_size: int, should_stop: Callable[[], bool]) -> None:
        """Trace every batch-size bucket up to ``batch_size`` before the first job (see ``explain.warm_up``)."""
        from explain import warm_up

        warm_up(self.model, batch_size, method=self.settings.explain.method, should_stop=should_stop)

    def prepare(self, source: Dataset, pixel_data: Buffer | None = None) -> Prepared | NotEligible | Failed:
        """Eligibility, then viewer rendering and model input. Pure CPU work; safe to run on a thread pool.

        ``pixel_data``: the Pixel Data value when ``source`` holds only the header (a spooled instance read in
        place, see :func:`dicom_node.imaging.instance.read_file`); ``source`` is then what the outputs copy from.
        """
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
                min_shape=self.model.input_size, reduced_decode=cfg.reduced_decode, pixel_data=pixel_data,
            )
        except CxrLensError as exc:
            return Failed(f"{type(exc).__name__}: {exc}")
        image = display.pixels
        x = pixels.model_input(image, self.model.input_size, self.model.channels, self.model.preprocess)
        return Prepared(source, image, x, {"render": _ms(t)})

    def infer(self, items: Sequence[Prepared]) -> list[ModelResult]:
        """One model pass (prediction and heatmap) over a batch; one result per item, in order."""
        from explain import explain

        t = time.perf_counter()
        explanation = explain(self.model, np.stack([p.model_input for p in items]),
                              method=self.settings.explain.method)
        per_image = _ms(t) / len(items)
        return [ModelResult(explanation_row(explanation, b, len(items)), 0, per_image) for b in range(len(items))]

    def process(self, sources: Sequence[Dataset]) -> list[Outcome]:
        """Every step for a batch of datasets (the offline ``explain`` command): one outcome per source, in order."""
        items = [self.prepare(ds) for ds in sources]
        prepared = [item for item in items if isinstance(item, Prepared)]
        results = iter(self.infer(prepared) if prepared else [])
        outcomes: list[Outcome] = []
        for item in items:
            if not isinstance(item, Prepared):
                outcomes.append(item)
                continue
            try:
                outcomes.append(self.build_outputs(item, next(results)))
            except CxrLensError as exc:
                outcomes.append(Failed(f"{type(exc).__name__}: {exc}"))
        return outcomes

    def judge(self, display: np.ndarray, heatmap: np.ndarray) -> tuple[Evidence, np.ndarray] | None:
        """The trust evidence of ``heatmap`` (at the map's resolution) over the anatomy regions of ``display``
        (explain.trust), and the regions' label image; None when ``[trust]`` is off."""
        cfg = self.settings.trust
        if not cfg.enabled:
            return None
        from explain.regions import anatomy_regions
        from explain.trust import TrustThresholds, evidence

        regions = anatomy_regions(display, border_fraction=cfg.border_fraction)
        thresholds = TrustThresholds(max_marker_share=cfg.max_marker_share, max_border_share=cfg.max_border_share,
                                     min_lung_share=cfg.min_lung_share)
        return evidence(heatmap, regions, thresholds), regions.label_image()

    def randomisation_check(self, items: Sequence[Prepared], class_index: Sequence[int]) -> tuple[float, int]:
        """The model-randomisation sanity check (explain.sanity) on these items for these classes: the mean
        Spearman correlation of the model's maps with a re-initialised copy's, and the number of pairs."""
        from explain.sanity import randomisation_check

        images = np.stack([p.model_input for p in items])
        return randomisation_check(self.model, images, class_index, method=self.settings.explain.method)

    def build_outputs(self, item: Prepared, model_result: ModelResult) -> Processed:
        """Overlay, the DICOM objects ``[outputs]`` enables (Secondary Capture, Parametric Map, Structured Report)
        and the ORU for one image; raises :class:`ModelError` on a non-finite output."""
        from explain.overlay import compose_overlay, legend_lines
        from explain.render import normalise

        cfg = self.settings.explain
        model = self.model
        explanation, b, explain_ms = model_result.explanation, model_result.index, model_result.explain_ms
        if not (np.isfinite(explanation.probabilities[b]).all() and np.isfinite(explanation.heatmaps[b]).all()):
            # A broken model (NaN weights, an overflow in float16): fail the job by name rather than send "nan"
            # probabilities to HealthShare or a heatmap that cannot be drawn.
            raise ModelError("the model's output is not finite (NaN or infinity); no result was sent")
        probs = {label: float(p) for label, p in zip(model.labels, explanation.probabilities[b], strict=True)}
        class_index = int(explanation.class_index[b])
        label = model.labels[class_index]
        heat = normalise(explanation.heatmaps[b], no_evidence_threshold=cfg.no_evidence_threshold)
        timings = dict(item.timings_ms, explain=round(explain_ms, 2))
        t = time.perf_counter()
        # The normalised map has the raw map's shares, and is zero everywhere where the node reports no evidence.
        judged = self.judge(item.display, heat.map)
        evidence = judged[0].as_dict() if judged is not None else None
        if judged is not None:
            timings["trust"] = _ms(t)
        result = InferenceResult(
            label=label, class_index=class_index, probabilities=probs, method=explanation.method,
            model_id=model.model_id, model_version=model.version, is_demo=model.is_demo,
            heatmap_max=heat.raw_max, no_evidence=heat.no_evidence, timings_ms=timings,
            is_test=self.settings.model.is_test_model, evidence=evidence,
        )
        t = time.perf_counter()
        notes = {DEMO_LABEL: "synthetic training data", TEST_LABEL: "made to look at a marker, not the lungs"}
        warnings = [AI_DISCLAIMER] + ([f"{result.model_label} - {notes[result.model_label]}"]
                                      if result.model_label else [])
        lines = legend_lines(label, probs[label], result.method, result.model_text, no_evidence=heat.no_evidence,
                             lung_share=float(evidence["lungs"]) if evidence is not None else None)
        overlay = compose_overlay(item.display, heat, lines=lines, warnings=warnings, colormap=cfg.colormap,
                                  alpha=cfg.alpha, alerts=[result.trust_warning] if result.trust_warning else [])
        timings["overlay"] = _ms(t)
        enabled = self.settings.outputs
        sc = pm = sr = None
        if enabled.secondary_capture:
            t = time.perf_counter()
            sc = build_secondary_capture(item.source, overlay, result)
            timings["secondary_capture"] = _ms(t)
        if enabled.parametric_map:
            t = time.perf_counter()
            # From the map at the model's own resolution: it resamples onto the source's grid or its blocks.
            pm = build_parametric_map(item.source, heat.map, result, max_long_side=enabled.parametric_map_max_long_side)
            timings["parametric_map"] = _ms(t)
        if enabled.structured_report:
            t = time.perf_counter()
            sr = build_structured_report(
                item.source, result,
                secondary_capture=InstanceReference.of(sc) if sc is not None else None,
                parametric_map=InstanceReference.of(pm) if pm is not None else None,
                # The trust evidence (lung share, verdict, reasons) where [trust] judged the map; else left out.
                label_codes=self._label_codes, evidence=result.evidence,
            )
            timings["structured_report"] = _ms(t)
        t = time.perf_counter()
        hl7_png = encode_png(overlay, self.settings.hl7.image_long_side) if self.settings.hl7.include_image else None
        study_uid = str(item.source.get("StudyInstanceUID", ""))
        ref = (OverlayRef(study_uid, str(sc.SeriesInstanceUID), str(sc.SOPInstanceUID), hl7_png) if sc is not None
               else OverlayRef(study_uid, "", "", hl7_png))
        oru = build_oru(item.source, result, ref, self.settings.hl7,
                        message_control_id=new_message_control_id(), now=datetime.now().astimezone(),
                        structured_report_uid=str(sr.SOPInstanceUID) if sr is not None else "",
                        parametric_map_uid=str(pm.SOPInstanceUID) if pm is not None else "")
        timings["hl7"] = _ms(t)
        return Processed(result=result, secondary_capture=sc, overlay=overlay, oru_message=oru,
                         oru_key=overlay_uids(item.source, result)[1], parametric_map=pm, structured_report=sr,
                         regions=judged[1] if judged is not None else None, heatmap=heat.map)


def load_processor(settings: Settings) -> Processor:
    """Load the model and rules named by ``settings`` (imports Keras and its backend, TensorFlow or JAX)."""
    from dicom_node.process.rules import load_rules
    from dicom_node.startup import configure_keras_backend
    from models import loading as models_loading
    from models.loading import load_model, resolve_backend

    try:
        # Here rather than in configure_process: the backend is a model setting, and Keras is first imported below.
        configure_keras_backend(resolve_backend(settings.model.backend))
        from explain import configure_device

        device = configure_device()  # GPU memory growth and mixed precision where supported; no-op on CPU
        logger.info("device: %s, %d GPU(s), mixed precision %s", device.backend, device.gpus,
                 device.policy if device.mixed_precision else "off")
        model = load_model(settings.model)
    except models_loading.ModelError as exc:
        raise ModelError(str(exc)) from exc
    return Processor(settings, model, load_rules(settings.rules_file))


def _part10_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _parse_spooled(data: Buffer) -> Instance | Failed:
    """The spooled file's header and a view of its Pixel Data (not copied)."""
    try:
        return read_file(data)
    except Exception as exc:  # boundary: a spooled file that no longer parses fails its job
        return Failed(f"spooled instance does not parse ({type(exc).__name__})")


def enqueue_outputs(
    job_id: int, outcome: Outcome, dicom_sender: Any, hl7_sender: Any | None, *, received_at: float | None = None
) -> JobOutcome:
    """Enqueue a processed job's outputs in the outbox (SC, Parametric Map, SR, then ORU) and return the job's
    outcome.

    Outputs are enqueued (durably) before the job is reported done, so a crash in between re-processes the job
    and the outbox's de-duplication keys (each DICOM object's SOP Instance UID; the overlay's for the ORU) keep
    them from being delivered twice: ``received_at`` (the job's) tells a twin from this job's interrupted attempt,
    delivered meanwhile and left alone, from an earlier study's, which the new object replaces.
    """
    if isinstance(outcome, Processed):
        for dataset in outcome.dicom_outputs:
            dicom_sender.enqueue(_part10_bytes(dataset), dedup_key=str(dataset.SOPInstanceUID),
                                 source_received_at=received_at)
        if hl7_sender is not None:
            hl7_sender.enqueue(outcome.oru_message, dedup_key=outcome.oru_key)
        return JobOutcome(job_id, JobState.DONE)
    if isinstance(outcome, NotEligible):
        return JobOutcome(job_id, JobState.INELIGIBLE, rule=outcome.rule, reason=outcome.reason)
    return JobOutcome(job_id, JobState.FAILED, reason=outcome.reason)


class ProcessorStages:
    """The node's work as the worker's :class:`~dicom_node.process.worker.Stages`: parse and render on the decode
    pool, one model pass per batch, overlay + DICOM objects + ORU (enqueued in the outbox) on the output pool.

    A stage that raises (``build_outputs``' :class:`ModelError`, for one) fails its job in the worker, with our
    own errors' messages as the reason.
    """

    def __init__(
        self, processor: Processor, dicom_sender: Any, hl7_sender: Any | None, metrics: Metrics | None = None
    ) -> None:
        self.processor = processor
        self.dicom_sender = dicom_sender
        self.hl7_sender = hl7_sender
        self.metrics = metrics

    def prepare(self, job: Job, data: Buffer) -> Prepared | JobOutcome:
        instance = _parse_spooled(data)
        item = (self.processor.prepare(instance.header, instance.pixel_data) if isinstance(instance, Instance)
                else instance)
        if isinstance(item, Prepared):
            return item
        return enqueue_outputs(job.id, item, self.dicom_sender, self.hl7_sender, received_at=job.received_at)

    def infer(self, items: Sequence[Prepared]) -> list[ModelResult]:
        return self.processor.infer(items)

    def finish(self, job: Job, item: Prepared, result: ModelResult) -> JobOutcome:
        outputs = self.processor.build_outputs(item, result)
        outcome = enqueue_outputs(job.id, outputs, self.dicom_sender, self.hl7_sender, received_at=job.received_at)
        if self.metrics is not None and outputs.result.evidence is not None:
            self.metrics.observe_evidence(outputs.result.evidence)
        return outcome
