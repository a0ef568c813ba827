"""What the findings say about the model: verdict rates by label and reason, lung shares, the sanity check and a
one-line conclusion. Pure: the numbers of ``audit.json`` and of the report come from here alone.

The conclusion is ``this model looks at the lungs``, ``this model looks elsewhere: ...`` or ``cannot tell where
this model looks: ...``. A model looks elsewhere when more than :data:`MAX_ALARM_RATE` of its judged calls, over
all or for any one label with at least :data:`MIN_CALLS` of them, are ``suspect``: each verdict already allows a
margin (``[trust]``), so a model that earns one in ten calls is not one to trust without a look. Nothing can be
told when the maps barely change with the weights (they show the input, not the model) or when most images have
no lung fields.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Final

import numpy as np

from dicom_node.audit.collect import Case, Findings

MAX_ALARM_RATE: Final = 0.1
MIN_CALLS: Final = 5
# Adebayo et al. 2018 judge the correlation by eye; the demo model's Grad-CAM is at 0.055 (models/MODEL_CARD.md).
MAX_RANDOMISATION_SPEARMAN: Final = 0.5
MIN_LUNG_FIELD_RATE: Final = 0.5  # of the processed images
LOOKS_AT_THE_LUNGS: Final = "this model looks at the lungs"
LOOKS_ELSEWHERE: Final = "this model looks elsewhere"
CANNOT_TELL: Final = "cannot tell where this model looks"

OK, SUSPECT, NO_LUNG_FIELDS = "ok", "suspect", "no_lung_fields"
VERDICTS: Final = (OK, SUSPECT, NO_LUNG_FIELDS)
REASON_TEXTS: Final = {
    "evidence_on_marker": "on a burned-in marker",
    "evidence_on_border": "on the image border",
    "evidence_outside_lungs": "outside the lungs",
}
SHARES: Final = ("lungs", "body", "outside_body", "border", "markers")
HISTOGRAM_BINS: Final = 20


def verdict_counts(cases: Sequence[Case]) -> dict[str, Any]:
    """Calls, each verdict and each reason (a call may have several), the alarm rate (suspect among the calls
    with lung fields) and the median lung share of ``cases``."""
    verdicts = Counter(str(c.evidence["verdict"]) for c in cases)
    reasons = Counter(str(r) for c in cases for r in c.evidence.get("reasons") or ())
    judged = verdicts[OK] + verdicts[SUSPECT]
    return {
        "calls": len(cases),
        "verdicts": {v: verdicts[v] for v in VERDICTS},
        "reasons": {r: reasons[r] for r in REASON_TEXTS},
        "alarm_rate": round(verdicts[SUSPECT] / judged, 4) if judged else None,
        "median_lung_share": round(float(np.median([c.lung_share for c in cases])), 4) if cases else None,
    }


def lung_share_statistics(cases: Sequence[Case]) -> dict[str, Any]:
    shares = np.array([c.lung_share for c in cases], dtype=np.float64)
    counts, edges = np.histogram(shares, bins=HISTOGRAM_BINS, range=(0.0, 1.0))
    stats: dict[str, Any] = {"histogram": {"edges": [round(float(e), 4) for e in edges],
                                           "counts": [int(c) for c in counts]}}
    if shares.size:
        p5, median, p95 = np.percentile(shares, [5, 50, 95])
        stats.update(mean=round(float(shares.mean()), 4), median=round(float(median), 4), p5=round(float(p5), 4),
                     p95=round(float(p95), 4), min=round(float(shares.min()), 4), max=round(float(shares.max()), 4))
    return stats


def conclusion(overall: Mapping[str, Any], by_label: Mapping[str, Mapping[str, Any]], spearman: float,
               pairs: int) -> str:
    """The one line (see the module's docstring)."""
    calls = int(overall["calls"])
    if calls == 0:
        return f"{CANNOT_TELL}: no image was processed"
    verdicts = overall["verdicts"]
    if verdicts[NO_LUNG_FIELDS] > (1.0 - MIN_LUNG_FIELD_RATE) * calls:
        return f"{CANNOT_TELL}: no lung fields found on {verdicts[NO_LUNG_FIELDS]} of {calls} images"
    if pairs and spearman > MAX_RANDOMISATION_SPEARMAN:
        return (f"{CANNOT_TELL}: its maps barely change when its weights are re-initialised (Spearman "
                f"{spearman:.2f} over {pairs} images), so they show the input rather than the model")
    alarming = [(label, counts) for label, counts in by_label.items()
                if counts["alarm_rate"] is not None and counts["calls"] >= MIN_CALLS
                and counts["alarm_rate"] > MAX_ALARM_RATE]
    if alarming:
        label, counts = max(alarming, key=lambda item: item[1]["alarm_rate"])
        return f"{LOOKS_ELSEWHERE}: {_alarm_text(counts, f'{label} calls')}"
    if overall["alarm_rate"] is not None and overall["alarm_rate"] > MAX_ALARM_RATE:
        return f"{LOOKS_ELSEWHERE}: {_alarm_text(overall, 'calls')}"
    return (f"{LOOKS_AT_THE_LUNGS}: median lung share {overall['median_lung_share']:.2f}, "
            f"{overall['verdicts'][SUSPECT]} of {calls} calls suspect")


def _alarm_text(counts: Mapping[str, Any], calls: str) -> str:
    suspect = counts["verdicts"][SUSPECT]
    judged = suspect + counts["verdicts"][OK]
    reasons = ", ".join(f"{text} {counts['reasons'][r]}" for r, text in REASON_TEXTS.items() if counts["reasons"][r])
    return (f"{suspect} of {judged} {calls} suspect (evidence {reasons}); "
            f"median lung share {counts['median_lung_share']:.2f}")


def summarise(findings: Findings, thresholds: Mapping[str, Any]) -> dict[str, Any]:
    """``audit.json``: every number of the report, the conclusion, and one record per input."""
    cases = findings.cases
    overall = verdict_counts(cases)
    by_label = {label: verdict_counts([c for c in cases if c.label == label]) for label in findings.labels}
    spearman, pairs = findings.randomisation_spearman, findings.randomisation_pairs
    mean_evidence = {name: round(float(np.mean([c.evidence[name] for c in cases])), 4) if cases else None
                     for name in SHARES}
    return {
        "conclusion": conclusion(overall, by_label, spearman, pairs),
        "model": {"id": findings.model_id, "version": findings.model_version, "label": findings.model_label,
                  "labels": list(findings.labels), "method": findings.method},
        "thresholds": dict(thresholds),
        "images": {"processed": len(cases), "not_eligible": len(findings.not_eligible),
                   "failed": len(findings.failed)},
        "overall": overall,
        "by_label": by_label,
        "lung_share": lung_share_statistics(cases),
        "mean_evidence": mean_evidence,
        "randomisation": {
            "spearman": None if pairs == 0 else round(spearman, 4), "pairs": pairs,
            "max_spearman": MAX_RANDOMISATION_SPEARMAN,
            "passed": None if pairs == 0 else bool(spearman <= MAX_RANDOMISATION_SPEARMAN),
        },
        "worst_cases": [_case_record(case) for case, _ in findings.worst],
        "cases": [_case_record(case) for case in cases],
        "not_eligible": [{"input": name, "reason": reason} for name, reason in findings.not_eligible],
        "failed": [{"input": name, "reason": reason} for name, reason in findings.failed],
    }


def _case_record(case: Case) -> dict[str, Any]:
    return {"input": case.input, "label": case.label, "probability": case.probability, "evidence": case.evidence}
