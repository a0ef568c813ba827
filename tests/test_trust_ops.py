"""Explanation trust for the operator: /metrics counts lung shares and verdicts, ``cxr-lens status`` shows the alarm
rate of the latest results (read back from the ORU messages in the outbox)."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from dicom_node.ops.metrics import Metrics
from dicom_node.ops.status import collect_status, format_status, recent_trust
from dicom_node.outputs.oru import build_oru
from dicom_node.outputs.results import InferenceResult, OverlayRef
from dicom_node.peers.synthetic_cr import make_cr_dataset
from dicom_node.settings import HL7Settings
from dicom_node.storage.outbox import Outbox, outbox_path

OK = {"lungs": 0.6, "body": 0.3, "outside_body": 0.0, "border": 0.1, "markers": 0.0, "peak_region": "lungs",
      "verdict": "ok", "reasons": []}
ON_MARKER = {"lungs": 0.03, "body": 0.2, "outside_body": 0.03, "border": 0.1, "markers": 0.64,
             "peak_region": "markers", "verdict": "suspect",
             "reasons": ["evidence_on_marker", "evidence_outside_lungs"]}
NO_LUNGS = {"lungs": 0.0, "body": 0.8, "outside_body": 0.0, "border": 0.2, "markers": 0.0, "peak_region": "body",
            "verdict": "no_lung_fields", "reasons": []}
RESULT = InferenceResult(label="focal_opacity", class_index=1, probabilities={"no_finding": 0.1, "focal_opacity": 0.9},
                         method="gradcam", model_id="m", model_version="1", is_demo=False, heatmap_max=1.0,
                         no_evidence=False)


def _samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.exposition().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_count_lung_shares_and_verdicts_by_reason() -> None:
    metrics = Metrics()
    for evidence in (OK, OK, ON_MARKER, NO_LUNGS):
        metrics.observe_evidence(evidence)
    samples = _samples(metrics)
    verdicts = {labels: value for (name, labels), value in samples.items() if name == "cxr_lens_trust_verdicts_total"}
    assert verdicts == {
        (("reasons", ""), ("verdict", "ok")): 2.0,
        (("reasons", "evidence_on_marker+evidence_outside_lungs"), ("verdict", "suspect")): 1.0,
        (("reasons", ""), ("verdict", "no_lung_fields")): 1.0,
    }
    assert samples[("cxr_lens_evidence_lung_share_count", ())] == 4.0
    assert samples[("cxr_lens_evidence_lung_share_sum", ())] == sum(e["lungs"] for e in (OK, OK, ON_MARKER, NO_LUNGS))
    buckets = {dict(labels)["le"]: value for (name, labels), value in samples.items()
               if name == "cxr_lens_evidence_lung_share_bucket"}
    assert buckets["0.05"] == 2.0 and buckets["0.5"] == 2.0 and buckets["0.6"] == 4.0 and buckets["+Inf"] == 4.0


def _enqueue(outbox: Outbox, key: str, evidence: dict[str, Any] | None) -> None:
    result = dataclasses.replace(RESULT, evidence=evidence)
    message = build_oru(make_cr_dataset(), result, OverlayRef("1.2.3", "1.2.3.4", "1.2.3.5"), HL7Settings(),
                        message_control_id=key, now=datetime(2024, 1, 1, tzinfo=UTC))
    outbox.enqueue("hl7", "ris:2575", key, message.encode("utf-8"))


def test_status_shows_the_alarm_rate_of_the_latest_oru_messages(tmp_path: Path) -> None:
    outbox = Outbox(outbox_path(tmp_path))
    try:
        for i, evidence in enumerate([OK, ON_MARKER, OK, NO_LUNGS, OK, None]):
            _enqueue(outbox, f"K{i}", evidence)
        outbox.enqueue("dicom", "PACS", "sc", b"not an ORU")
    finally:
        outbox.close()
    trust = recent_trust(tmp_path)
    assert trust == {"messages": 6, "judged": 5, "verdicts": {"no_lung_fields": 1, "ok": 3, "suspect": 1},
                     "alarm_rate": 0.4}
    assert recent_trust(tmp_path, limit=2)["verdicts"] == {"ok": 1}  # the newest two: one without a verdict
    text = format_status(collect_status(tmp_path))
    assert "alarm rate 40.0%: 2 of 5 results not ok (no_lung_fields 1, ok 3, suspect 1)" in text


def test_status_without_verdicts_says_so(tmp_path: Path) -> None:
    assert recent_trust(tmp_path / "nothing") == {"messages": 0, "judged": 0, "verdicts": {}, "alarm_rate": None}
    assert not (tmp_path / "nothing").exists()  # nothing created by looking
    assert "no verdicts in 0 ORU message(s)" in format_status(collect_status(tmp_path / "nothing"))
