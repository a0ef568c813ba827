"""Where the evidence lies: a heatmap split by anatomy region, and a verdict on whether to trust it. Pure numpy.

A classifier can be right for the wrong reason: DeGrave, Janizek and Lee (Nature Machine Intelligence, 2021)
showed Covid-19 chest-radiograph classifiers relying on laterality markers, burned-in text and image borders.
:func:`evidence` takes the positive class activation map, upsamples it to the display image, normalises it to
sum 1 and adds it up per region of :class:`explain.regions.Regions` (each pixel counted once, in the region of
highest precedence: markers, border band, lungs, rest of the body, outside the body). :func:`verdict` turns the
shares into ``ok``, ``suspect`` (with reasons) or ``no_lung_fields``.

A map that is zero everywhere (no positive evidence at all) has no distribution to split. It is reported as if
the evidence were spread evenly over the image: the shares are the regions' shares of the image's area, they
still sum to 1, ``peak_region`` is ``"none"``, and no evidence reason is raised (there is nothing to distrust;
``no_lung_fields`` still applies).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Final

import cv2
import numpy as np

from explain.regions import REGION_NAMES, Regions
from explain.render import upsample

OK, SUSPECT, NO_LUNG_FIELDS = "ok", "suspect", "no_lung_fields"
VERDICTS: Final = (OK, SUSPECT, NO_LUNG_FIELDS)
ON_MARKER, ON_BORDER, OUTSIDE_LUNGS = "evidence_on_marker", "evidence_on_border", "evidence_outside_lungs"
REASONS: Final = (ON_MARKER, ON_BORDER, OUTSIDE_LUNGS)
NO_PEAK: Final = "none"
# The order of Evidence's shares and of its dictionary.
SHARE_NAMES: Final = ("lungs", "body", "outside_body", "border", "markers")
_DECIMALS = 3


@dataclass(frozen=True)
class TrustThresholds:
    """When evidence is suspect; the field names are the ``[trust]`` configuration keys.

    The defaults sit between what ``python -m bench.trust`` measures on held-out generated radiographs for the
    demo model (evidence on the lungs) and for the shortcut test model (evidence on a burned-in token), with a
    margin on both sides; Grad-CAM maps of a small CNN are diffuse, so even a model that looks at the lungs puts
    much of its evidence elsewhere, and the shares are judged against that, not against an ideal map.
    """

    # A marker box covers about 1% of a radiograph: 5% of the evidence on markers is five times their area.
    max_marker_share: float = 0.05
    # The band covers 19% of a square image at the default width; twice that is evidence drawn to the edges.
    max_border_share: float = 0.4
    # The lung fields cover about 30% of a frontal chest film; a tenth of the evidence is a third of that.
    min_lung_share: float = 0.1

    def __post_init__(self) -> None:
        for name in ("max_marker_share", "max_border_share", "min_lung_share"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"trust.{name} must lie in [0, 1], not {value}")


@dataclass(frozen=True)
class Evidence:
    """The share of the evidence in each region (summing to 1), the region of the map's peak, and the verdict."""

    lungs: float
    body: float
    outside_body: float
    border: float
    markers: float
    peak_region: str  # a region name, or "none" for a map without evidence
    verdict: str
    reasons: tuple[str, ...]

    @property
    def no_evidence(self) -> bool:
        return self.peak_region == NO_PEAK

    def shares(self) -> dict[str, float]:
        return {name: float(getattr(self, name)) for name in SHARE_NAMES}

    def as_dict(self) -> dict[str, Any]:
        """The ``evidence`` object of result.json: shares to three decimals that still sum to 1."""
        return {
            **_rounded(self.shares()),
            "peak_region": self.peak_region,
            "verdict": self.verdict,
            "reasons": list(self.reasons),
        }


def evidence(
    heatmap_raw: np.ndarray, regions: Regions, thresholds: TrustThresholds | None = None
) -> Evidence:
    """Split the positive part of a raw (h, w) heatmap over ``regions`` and judge it (see :func:`verdict`)."""
    heat = np.maximum(upsample(heatmap_raw, regions.shape), np.float32(0.0))
    labels = regions.label_image()
    areas = np.zeros(len(REGION_NAMES))
    sums = np.zeros(len(REGION_NAMES))
    for label in REGION_NAMES:
        # Masked means in OpenCV (double accumulators): several times faster than a weighted bincount here.
        mask = (labels == label).view(np.uint8)
        areas[label] = cv2.countNonZero(mask)
        sums[label] = cv2.mean(heat, mask=mask)[0] * areas[label] if areas[label] else 0.0
    if sums.sum() > 0.0:
        peak = REGION_NAMES[int(labels.flat[int(np.argmax(heat))])]
    else:
        sums, peak = areas, NO_PEAK
    fractions = sums / sums.sum()
    by_name = {REGION_NAMES[label]: float(fractions[label]) for label in REGION_NAMES}
    shares = Evidence(**{name: by_name[name] for name in SHARE_NAMES}, peak_region=peak, verdict=OK, reasons=())
    judged, reasons = verdict(shares, regions, thresholds or TrustThresholds())
    return replace(shares, verdict=judged, reasons=reasons)


def verdict(
    evidence: Evidence, regions: Regions, thresholds: TrustThresholds
) -> tuple[str, tuple[str, ...]]:
    """``(verdict, reasons)`` from the evidence's shares and the lung fields' plausibility.

    ``no_lung_fields`` when the regions found no plausible pair of lung fields (its reasons can still name markers
    or the border, but not "outside the lungs"); else ``suspect`` when any reason applies, else ``ok``. A map
    without evidence raises no reason. Reads only the shares and ``peak_region`` of ``evidence``.
    """
    reasons: list[str] = []
    if not evidence.no_evidence:
        if evidence.markers >= thresholds.max_marker_share:
            reasons.append(ON_MARKER)
        if evidence.border >= thresholds.max_border_share:
            reasons.append(ON_BORDER)
        if regions.plausible_lungs and evidence.lungs < thresholds.min_lung_share:
            reasons.append(OUTSIDE_LUNGS)
    if not regions.plausible_lungs:
        return NO_LUNG_FIELDS, tuple(reasons)
    return (SUSPECT if reasons else OK), tuple(reasons)


def _rounded(shares: dict[str, float]) -> dict[str, float]:
    """Shares rounded to :data:`_DECIMALS` by largest remainder, so the rounded values still sum to 1."""
    unit = 10**_DECIMALS
    scaled = {name: value * unit for name, value in shares.items()}
    floors = {name: int(np.floor(value)) for name, value in scaled.items()}
    missing = unit - sum(floors.values())
    by_remainder = sorted(shares, key=lambda name: scaled[name] - floors[name], reverse=True)
    for name in by_remainder[: max(0, missing)]:
        floors[name] += 1
    return {name: round(floors[name] / unit, _DECIMALS) for name in shares}
