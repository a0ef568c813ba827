"""Run a data set through the node's own stages and keep what the report needs, one batch at a time.

Each image goes the way it goes in the node (:class:`~dicom_node.process.processor.Processor`: eligibility and
rendering, one model pass per batch, overlay and trust evidence), so the audit judges the explanations the node
would send. Memory stays bounded: per image only its numbers are kept, the radiographs and heatmaps are added
into running sums on one grid, and only the worst cases keep their overlays.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
from pydicom import Dataset

from dicom_node.errors import CxrLensError
from dicom_node.process.processor import Failed, NotEligible, Prepared, Processed, Processor

logger = logging.getLogger(__name__)

# The grid the mean radiograph and the mean heatmap are drawn on (rows, columns).
MEAN_GRID = (256, 256)


@dataclass(frozen=True)
class Case:
    """One processed image: what the model said and where its evidence lay (``Evidence.as_dict()``)."""

    input: str
    label: str
    probability: float
    evidence: dict[str, Any]

    @property
    def lung_share(self) -> float:
        return float(self.evidence["lungs"])


@dataclass
class Findings:
    """Everything the audit saw, ready to be summarised."""

    model_id: str
    model_version: str
    model_label: str  # DEMO MODEL / TEST MODEL / ""
    labels: tuple[str, ...]
    method: str
    cases: list[Case] = field(default_factory=list)
    not_eligible: list[tuple[str, str]] = field(default_factory=list)  # (input, rule: reason)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (input, reason)
    mean_radiograph: np.ndarray | None = None  # float32 on MEAN_GRID, 0-255
    mean_heatmap: np.ndarray | None = None  # float32 on MEAN_GRID, 0-1
    worst: list[tuple[Case, np.ndarray]] = field(default_factory=list)  # lowest lung share first, with overlays
    randomisation_spearman: float = float("nan")
    randomisation_pairs: int = 0


class Audit:
    """Feed it batches of (input name, dataset or failure); :meth:`finish` runs the sanity check and returns the
    :class:`Findings`."""

    def __init__(self, processor: Processor, *, worst_cases: int = 6, sanity_sample: int = 16) -> None:
        model = processor.model
        self.processor = processor
        self._worst_cases = worst_cases
        self._sanity_sample = sanity_sample
        self._sample: list[tuple[Prepared, int]] = []  # model inputs and predicted classes for the sanity check
        self._radiograph_sum = np.zeros(MEAN_GRID, np.float64)
        self._heatmap_sum = np.zeros(MEAN_GRID, np.float64)
        self._worst: list[tuple[float, int, Case, np.ndarray]] = []  # a max-heap on the lung share, negated
        self.findings = Findings(model_id=model.model_id, model_version=model.version, model_label="",
                                 labels=tuple(model.labels), method=processor.settings.explain.method)

    def add(self, batch: Sequence[tuple[str, Dataset | Failed]]) -> None:
        """Prepare, infer (one pass for the batch) and judge every image of ``batch``."""
        prepared: list[tuple[str, Prepared]] = []
        for name, read in batch:
            item = self.processor.prepare(read) if isinstance(read, Dataset) else read
            if isinstance(item, Prepared):
                prepared.append((name, item))
            elif isinstance(item, NotEligible):
                self.findings.not_eligible.append((name, f"{item.rule}: {item.reason}"))
            else:
                self.findings.failed.append((name, item.reason))
        if not prepared:
            return
        results = self.processor.infer([item for _, item in prepared])
        for (name, item), result in zip(prepared, results, strict=True):
            try:
                processed = self.processor.build_outputs(item, result)
            except CxrLensError as exc:  # a non-finite model output, for one: reported, the audit goes on
                self.findings.failed.append((name, f"{type(exc).__name__}: {exc}"))
                continue
            self._keep(name, item, processed)

    def _keep(self, name: str, item: Prepared, processed: Processed) -> None:
        result = processed.result
        if result.evidence is None or processed.heatmap is None:
            raise ValueError("the audit needs the trust evidence: build the processor with [trust] enabled")
        self.findings.model_label = result.model_label
        case = Case(name, result.label, round(result.probability, 6), dict(result.evidence))
        self.findings.cases.append(case)
        size = (MEAN_GRID[1], MEAN_GRID[0])
        self._radiograph_sum += cv2.resize(item.display, size, interpolation=cv2.INTER_AREA)
        self._heatmap_sum += cv2.resize(processed.heatmap, size, interpolation=cv2.INTER_LINEAR)
        entry = (-case.lung_share, len(self.findings.cases), case, processed.overlay)
        if len(self._worst) < self._worst_cases:
            heapq.heappush(self._worst, entry)
        elif self._worst_cases and entry[:2] > self._worst[0][:2]:
            heapq.heapreplace(self._worst, entry)
        if len(self._sample) < self._sanity_sample:
            self._sample.append((item, result.class_index))

    def finish(self) -> Findings:
        """The means, the worst cases (lowest lung share first) and the model-randomisation sanity check."""
        findings = self.findings
        n = len(findings.cases)
        if n:
            findings.mean_radiograph = (self._radiograph_sum / n).astype(np.float32)
            findings.mean_heatmap = (self._heatmap_sum / n).astype(np.float32)
        findings.worst = [(case, overlay) for _, _, case, overlay in sorted(self._worst, reverse=True)]
        if self._sample:
            rho, pairs = self.processor.randomisation_check([item for item, _ in self._sample],
                                                            [index for _, index in self._sample])
            findings.randomisation_spearman, findings.randomisation_pairs = rho, pairs
            self._sample.clear()
        return findings
