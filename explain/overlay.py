"""The overlay image: heatmap over the radiograph plus a burned-in legend band. Pure numpy/OpenCV, no TensorFlow.

The legend is drawn in a band below the radiograph, never over the anatomy. Text uses OpenCV's Hershey fonts
(ASCII only), which is why every legend string is ASCII. Alerts (a trust verdict other than ok) get a red strip
of their own between the radiograph and the legend, so that nobody reads the heatmap without seeing them.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from explain.render import Normalised, blend, colour_bar, upsample

_WHITE = (255, 255, 255)
_AMBER = (255, 191, 0)
_ALERT_RED = (200, 0, 0)


def legend_lines(
    label: str, probability: float, method: str, model_text: str, *, no_evidence: bool,
    lung_share: float | None = None,
) -> list[str]:
    """The legend's text: prediction, method and model, the share of the evidence on the lung fields (when the
    trust evidence was computed) and a line for an empty map."""
    lines = [f"{label}  p={probability:.3f}", f"{method} | {model_text}"]
    if lung_share is not None:
        lines.append(f"evidence in the lungs {100.0 * lung_share:.0f}%")
    if no_evidence:
        lines.append("NO EVIDENCE: empty heatmap for this class")
    return lines


def _ascii(text: str) -> str:
    return text.encode("ascii", "replace").decode("ascii")


def _put_lines(
    band: np.ndarray, texts: Sequence[tuple[str, tuple[int, int, int]]], *, scale: float, line_h: int, pad: int,
    text_w: int,
) -> None:
    thickness = max(1, int(round(2 * scale)))
    for i, (text, colour) in enumerate(texts):
        text = _ascii(text)
        font_scale = scale
        (tw, _), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, thickness)
        # Shrink a long line to fit rather than cut it; again until it fits, as small Hershey text is not
        # exactly proportional to its scale.
        while tw > text_w and font_scale > 0.05:
            font_scale *= min(0.95, text_w / tw)
            (tw, _), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, thickness)
        y = pad + line_h * (i + 1) - line_h // 4
        cv2.putText(band, text, (pad, y), cv2.FONT_HERSHEY_SIMPLEX, font_scale, colour, thickness, cv2.LINE_AA)


def compose_overlay(
    display: np.ndarray,
    heat: Normalised,
    *,
    lines: list[str],
    warnings: list[str],
    colormap: str,
    alpha: float,
    alerts: Sequence[str] = (),
) -> np.ndarray:
    """The (H + bands, W, 3) uint8 overlay: ``heat`` (normalised at the map's own resolution, see
    :func:`explain.render.normalise`) upsampled onto ``display``; a red strip with ``alerts`` in white when
    there are any; a legend band with ``lines`` and ``warnings``.
    """
    h, w = display.shape
    picture = blend(display, upsample(heat.map, (h, w)), colormap=colormap, alpha=alpha)
    scale = max(w, 400) / 1200.0
    line_h = int(round(34 * scale))
    pad = int(round(12 * scale))
    parts = [picture]
    if alerts:
        strip = np.empty((pad * 2 + line_h * len(alerts), w, 3), dtype=np.uint8)
        strip[:] = _ALERT_RED
        _put_lines(strip, [(t, _WHITE) for t in alerts], scale=scale, line_h=line_h, pad=pad, text_w=w - 2 * pad)
        parts.append(strip)
    texts = [(t, _WHITE) for t in lines] + [(t, _AMBER) for t in warnings]
    band = np.zeros((pad * 2 + line_h * len(texts), w, 3), dtype=np.uint8)
    bar_w = max(32, w // 4)
    _put_lines(band, texts, scale=scale, line_h=line_h, pad=pad, text_w=w - bar_w - 3 * pad)
    thickness = max(1, int(round(2 * scale)))
    bar_h = max(8, line_h // 2)
    x0 = w - bar_w - pad
    band[pad:pad + bar_h, x0:x0 + bar_w] = colour_bar(bar_h, bar_w, colormap)
    label_scale = scale * 0.7
    y = pad + bar_h + line_h // 2 + pad // 2
    cv2.putText(band, "0", (x0, y), cv2.FONT_HERSHEY_SIMPLEX, label_scale, _WHITE, thickness, cv2.LINE_AA)
    (tw, _), _ = cv2.getTextSize("max", cv2.FONT_HERSHEY_SIMPLEX, label_scale, thickness)
    cv2.putText(band, "max", (x0 + bar_w - tw, y), cv2.FONT_HERSHEY_SIMPLEX, label_scale, _WHITE, thickness,
                cv2.LINE_AA)
    parts.append(band)
    return np.vstack(parts)
