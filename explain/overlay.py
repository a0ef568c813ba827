"""The overlay image: heatmap over the radiograph plus a burned-in legend band. Pure numpy/OpenCV, no TensorFlow.

The legend is drawn in a band below the radiograph, never over the anatomy. Text uses OpenCV's Hershey fonts
(ASCII only), which is why every legend string is ASCII.
"""

from __future__ import annotations

import cv2
import numpy as np

from explain.render import Normalised, blend, colour_bar, upsample

_WHITE = (255, 255, 255)
_AMBER = (255, 191, 0)


def legend_lines(label: str, probability: float, method: str, model_text: str, *, no_evidence: bool) -> list[str]:
    lines = [f"{label}  p={probability:.3f}", f"{method} | {model_text}"]
    if no_evidence:
        lines.append("NO EVIDENCE: empty heatmap for this class")
    return lines


def _ascii(text: str) -> str:
    return text.encode("ascii", "replace").decode("ascii")


def compose_overlay(
    display: np.ndarray,
    heat: Normalised,
    *,
    lines: list[str],
    warnings: list[str],
    colormap: str,
    alpha: float,
) -> np.ndarray:
    """The (H + band, W, 3) uint8 overlay: ``heat`` (normalised at the map's own resolution, see
    :func:`explain.render.normalise`) upsampled onto ``display``, and a legend band with ``lines`` and ``warnings``.
    """
    h, w = display.shape
    picture = blend(display, upsample(heat.map, (h, w)), colormap=colormap, alpha=alpha)
    scale = max(w, 400) / 1200.0
    line_h = int(round(34 * scale))
    pad = int(round(12 * scale))
    texts = [(t, _WHITE) for t in lines] + [(t, _AMBER) for t in warnings]
    band_h = pad * 2 + line_h * len(texts)
    band = np.zeros((band_h, w, 3), dtype=np.uint8)
    thickness = max(1, int(round(2 * scale)))
    bar_w = max(32, w // 4)
    text_w = w - bar_w - 3 * pad
    for i, (text, colour) in enumerate(texts):
        text = _ascii(text)
        font_scale = scale
        (tw, _), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, thickness)
        if tw > text_w:  # shrink a long line to fit rather than cut it
            font_scale *= text_w / tw
        y = pad + line_h * (i + 1) - line_h // 4
        cv2.putText(band, text, (pad, y), cv2.FONT_HERSHEY_SIMPLEX, font_scale, colour, thickness, cv2.LINE_AA)
    bar_h = max(8, line_h // 2)
    x0 = w - bar_w - pad
    band[pad:pad + bar_h, x0:x0 + bar_w] = colour_bar(bar_h, bar_w, colormap)
    label_scale = scale * 0.7
    y = pad + bar_h + line_h // 2 + pad // 2
    cv2.putText(band, "0", (x0, y), cv2.FONT_HERSHEY_SIMPLEX, label_scale, _WHITE, thickness, cv2.LINE_AA)
    (tw, _), _ = cv2.getTextSize("max", cv2.FONT_HERSHEY_SIMPLEX, label_scale, thickness)
    cv2.putText(band, "max", (x0 + bar_w - tw, y), cv2.FONT_HERSHEY_SIMPLEX, label_scale, _WHITE, thickness,
                cv2.LINE_AA)
    return np.vstack([picture, band])
