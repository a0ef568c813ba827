"""Values that flow from the explain stage to the output builders (SC, ORU, result.json). Pure data."""

from __future__ import annotations

from dataclasses import dataclass, field

AI_DISCLAIMER = "AI GENERATED - NOT FOR DIAGNOSTIC USE"
DEMO_LABEL = "DEMO MODEL"
NODE_MANUFACTURER = "CXR Lens"
NODE_MODEL_NAME = "cxr-lens"


@dataclass(frozen=True)
class InferenceResult:
    """What the model said about one image and how it was explained."""

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

    @property
    def probability(self) -> float:
        return self.probabilities[self.label]

    @property
    def model_text(self) -> str:
        text = f"{self.model_id} {self.model_version}"
        return f"{text} ({DEMO_LABEL})" if self.is_demo else text


@dataclass(frozen=True)
class OverlayRef:
    """Identity of the Secondary Capture that carries the overlay, and an optional small PNG of it."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    png: bytes | None = None
