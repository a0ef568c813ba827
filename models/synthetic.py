"""Synthetic chest radiographs for the demo model: procedural phantoms with focal opacities at known places.

Images are 8-bit display images (what the node's renderer produces from a real radiograph: lungs dark, bones
and mediastinum bright). A positive case carries one round focal opacity inside a lung field; its centre and
radius are returned, so localisation (the pointing game) can be scored exactly. Pure numpy and seeded: the same
seed gives the same set on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

LABELS = ("no_finding", "focal_opacity")


@dataclass(frozen=True)
class SyntheticSet:
    images: np.ndarray  # (N, H, W) uint8 display images
    labels: np.ndarray  # (N,) int: index into LABELS
    centers: np.ndarray  # (N, 2) float: (row, col) of the opacity centre in pixels; -1 for negatives
    radii: np.ndarray  # (N,) float: opacity radius in pixels; 0 for negatives

    def finding_mask(self, i: int) -> np.ndarray:
        """Boolean (H, W) mask of the finding of case ``i`` (all False for a negative)."""
        h, w = self.images.shape[1:]
        if self.labels[i] == 0:
            return np.zeros((h, w), dtype=bool)
        rr, cc = np.mgrid[0:h, 0:w]
        r0, c0 = self.centers[i]
        return (rr - r0) ** 2 + (cc - c0) ** 2 <= self.radii[i] ** 2


def _ellipse(rr: np.ndarray, cc: np.ndarray, r0: float, c0: float, ar: float, ac: float) -> np.ndarray:
    return ((rr - r0) / ar) ** 2 + ((cc - c0) / ac) ** 2


def _phantom(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[tuple[float, float, float, float]]]:
    """One chest phantom in [0, 1] float and its two lung ellipses (r0, c0, ar, ac)."""
    s = size / 256.0
    rr, cc = np.mgrid[0:size, 0:size].astype(np.float32)
    img = np.full((size, size), rng.uniform(0.02, 0.10), dtype=np.float32)
    body = _ellipse(rr, cc, size * rng.uniform(0.52, 0.58), size * rng.uniform(0.47, 0.53),
                    size * rng.uniform(0.46, 0.52), size * rng.uniform(0.42, 0.48))
    tissue = rng.uniform(0.45, 0.62)
    img = np.where(body <= 1, tissue, img)
    lungs = []
    lung_dark = rng.uniform(0.22, 0.34)
    for side in (-1, 1):
        r0 = size * rng.uniform(0.43, 0.49)
        c0 = size * 0.5 + side * size * rng.uniform(0.19, 0.23)
        ar, ac = size * rng.uniform(0.27, 0.32), size * rng.uniform(0.13, 0.16)
        e = _ellipse(rr, cc, r0, c0, ar, ac)
        # Lungs darker towards the periphery and the apex, smooth edge.
        depth = np.clip(1.0 - e, 0.0, 1.0) ** 0.5
        img = img - lung_dark * depth * (0.8 + 0.2 * (rr - (r0 - ar)) / (2 * ar))
        lungs.append((r0, c0, ar, ac))
    # Mediastinum / heart: bright blob left of centre (patient's left on the image's right side).
    heart = _ellipse(rr, cc, size * rng.uniform(0.58, 0.64), size * rng.uniform(0.52, 0.58),
                     size * rng.uniform(0.13, 0.17), size * rng.uniform(0.12, 0.16))
    img = img + 0.18 * np.clip(1.0 - heart, 0.0, 1.0) ** 0.4
    # Spine.
    img = img + 0.12 * np.exp(-(((cc - size * 0.5) / (9 * s)) ** 2)) * (body <= 1)
    # Ribs: bright arcs across the lungs.
    phase = rng.uniform(0, 2 * np.pi)
    period = size * rng.uniform(0.075, 0.09)
    arcs = np.sin(2 * np.pi * (rr + 0.0025 * (cc - size * 0.5) ** 2 / s) / period + phase)
    img = img + rng.uniform(0.04, 0.08) * (arcs > 0.75) * (body <= 1)
    # Clavicles.
    for side in (-1, 1):
        clav = np.abs((rr - size * 0.2) - side * 0.25 * (cc - size * 0.5)) < 3 * s
        img = img + 0.1 * (clav & (np.abs(cc - size * 0.5) < size * 0.3))
    img = cv2.GaussianBlur(img, (0, 0), 1.2 * s)
    img = img + rng.normal(0.0, rng.uniform(0.01, 0.03), img.shape).astype(np.float32)
    return img, lungs


def generate(n: int, seed: int, *, size: int = 256, positive_fraction: float = 0.5) -> SyntheticSet:
    """Generate ``n`` cases; about ``positive_fraction`` carry one focal opacity inside a lung field."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, size, size), dtype=np.uint8)
    labels = np.zeros(n, dtype=np.int64)
    centers = np.full((n, 2), -1.0)
    radii = np.zeros(n)
    rr, cc = np.mgrid[0:size, 0:size].astype(np.float32)
    for i in range(n):
        img, lungs = _phantom(rng, size)
        if rng.random() < positive_fraction:
            r0, c0, ar, ac = lungs[rng.integers(2)]
            radius = rng.uniform(0.03, 0.07) * size
            # Centre well inside the lung ellipse so the whole disc lies in the lung field.
            t, u = rng.uniform(0, 2 * np.pi), np.sqrt(rng.uniform(0, 1))
            row = r0 + u * (ar - radius) * 0.8 * np.sin(t)
            col = c0 + u * (ac - radius) * 0.8 * np.cos(t)
            d = np.sqrt((rr - row) ** 2 + (cc - col) ** 2) / radius
            profile = np.where(d < 1, 0.5 * (1 + np.cos(np.pi * d)), 0.0)
            img = img + rng.uniform(0.18, 0.32) * profile
            labels[i], centers[i], radii[i] = 1, (row, col), radius
        gamma = rng.uniform(0.85, 1.15)
        images[i] = np.round(255 * np.clip(img, 0, 1) ** gamma).astype(np.uint8)
    return SyntheticSet(images, labels, centers, radii)
