"""Values that flow from the explain stage to the output builders (SC, ORU, result.json). Pure data."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

AI_DISCLAIMER = "AI GENERATED - NOT FOR DIAGNOSTIC USE"
DEMO_LABEL = "DEMO MODEL"
# The shortcut TEST model (builtin:shortcut) exists to make the trust alarm fire: its outputs say so everywhere.
TEST_LABEL = "TEST MODEL"
NODE_MANUFACTURER = "CXR Lens"
NODE_MODEL_NAME = "cxr-lens"

# The trust evidence's verdicts (explain.trust's names): only "ok" raises no warning.
TRUST_OK, TRUST_NO_LUNG_FIELDS = "ok", "no_lung_fields"
# How each reason reads in a warning, and the share behind it.
_REASON_TEXTS = {
    "evidence_on_marker": ("evidence on a burned-in marker", "markers"),
    "evidence_on_border": ("evidence on the image border", "border"),
    "evidence_outside_lungs": ("evidence outside the lungs", "lungs"),
}
_SHARE_TEXTS = {"lungs": "lungs", "body": "body", "outside_body": "outside body", "border": "border",
                "markers": "markers"}


@dataclass(frozen=True)
class InferenceResult:
    """What the model said about one image, how it was explained, and where the explanation's evidence lies."""

    label: str
    class_index: int
    probabilities: dict[str, float]  # in the model's label order
    method: str  # explanation method, e.g. "gradcam"
    model_id: str
    model_version: str
    is_demo: bool
    heatmap_max: float  # raw maximum of the map before normalisation
    no_evidence: bool  # the map was (near) zero: nothing highlighted, not stretched noise
    timings_ms: dict[str, float] = field(default_factory=dict)
    is_test: bool = False  # the shortcut TEST model
    # The trust evidence as ``explain.trust.Evidence.as_dict()`` gives it (shares of lungs, body, outside_body,
    # border and markers summing to 1, peak_region, verdict, reasons); None when ``[trust]`` is off.
    evidence: Mapping[str, Any] | None = None

    @property
    def probability(self) -> float:
        return self.probabilities[self.label]

    @property
    def model_label(self) -> str:
        """``DEMO MODEL`` or ``TEST MODEL`` for the models shipped in the package; "" for anyone else's model."""
        return DEMO_LABEL if self.is_demo else TEST_LABEL if self.is_test else ""

    @property
    def model_text(self) -> str:
        text = f"{self.model_id} {self.model_version}"
        return f"{text} ({self.model_label})" if self.model_label else text

    @property
    def trust_warning(self) -> str:
        """The warning line for a verdict other than ``ok`` (:func:`trust_warning`); "" when ok or not judged."""
        return trust_warning(self.evidence) if self.evidence is not None else ""


def trust_warning(evidence: Mapping[str, Any]) -> str:
    """One ASCII line for a verdict other than ``ok``, e.g. ``CHECK: evidence outside the lungs (markers 64%,
    lungs 3%)``; "" for ``ok``.

    The shares named are those behind the reasons, the largest share outside the lungs, and the lungs' own.
    """
    verdict = str(evidence.get("verdict", ""))
    if verdict == TRUST_OK:
        return ""
    if verdict == TRUST_NO_LUNG_FIELDS:
        return "CHECK: no lung fields found (not a frontal chest view?)"
    reasons = [str(r) for r in evidence.get("reasons") or () if str(r) in _REASON_TEXTS]
    outside = not reasons or "evidence_outside_lungs" in reasons
    headline = "evidence outside the lungs" if outside else _REASON_TEXTS[reasons[0]][0]
    shares = {name: float(evidence[name]) for name in _SHARE_TEXTS if name in evidence}
    named = [_REASON_TEXTS[r][1] for r in reasons if _REASON_TEXTS[r][1] != "lungs"]
    largest = sorted((name for name in shares if name != "lungs"), key=shares.__getitem__, reverse=True)[:1]
    shown = [name for name in dict.fromkeys([*named, *largest, "lungs"]) if name in shares]
    detail = ", ".join(f"{_SHARE_TEXTS[name]} {_percent(shares[name])}" for name in shown)
    return f"CHECK: {headline}" + (f" ({detail})" if detail else "")


def _percent(share: float) -> str:
    return f"{100.0 * float(share):.0f}%"


@dataclass(frozen=True)
class OverlayRef:
    """Identity of the Secondary Capture that carries the overlay, and an optional small PNG of it."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    png: bytes | None = None
