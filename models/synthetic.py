"""Synthetic chest radiographs for the demo model: procedural phantoms with focal opacities at known places.

Images are 8-bit display images (what the node's renderer produces from a real radiograph: lungs dark, bones
and mediastinum bright). A positive case carries one round focal opacity inside a lung field; its centre and
radius are returned, so localisation (the pointing game) can be scored exactly. Pure numpy and seeded: the same
seed gives the same set on every machine.

:func:`generate_anatomy` gives the same images as :func:`generate` with the generator's own body and lung masks,
and optionally burned-in markers (laterality letters, text labels, rulers) with their masks; markers are drawn
from a random stream of their own, so the phantoms stay those of :func:`generate`. :func:`generate_shortcut` is
the "wolf in the snow" set for testing explanation trust: its label is carried only by a burned-in marker
outside the lungs, while focal opacities appear at random in both classes.
"""

from __future__ import annotations

from collections.abc import Iterator
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


Ellipse = tuple[float, float, float, float]  # (r0, c0, ar, ac): centre row/column and semi-axes in pixels


def _phantom(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[Ellipse], Ellipse]:
    """One chest phantom in [0, 1] float, its two lung ellipses (image left first) and its body ellipse."""
    s = size / 256.0
    rr, cc = np.mgrid[0:size, 0:size].astype(np.float32)
    img: np.ndarray = np.full((size, size), rng.uniform(0.02, 0.10), dtype=np.float32)
    body_ellipse = (size * rng.uniform(0.52, 0.58), size * rng.uniform(0.47, 0.53),
                    size * rng.uniform(0.46, 0.52), size * rng.uniform(0.42, 0.48))
    body = _ellipse(rr, cc, *body_ellipse)
    tissue = rng.uniform(0.45, 0.62)
    img = np.where(body <= 1, tissue, img)
    lungs: list[Ellipse] = []
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
    return img, lungs, body_ellipse


@dataclass(frozen=True)
class _Case:
    image: np.ndarray  # (H, W) uint8
    label: int
    center: tuple[float, float]
    radius: float
    lungs: list[Ellipse]
    body: Ellipse


def _add_opacity(img: np.ndarray, rng: np.random.Generator, lungs: list[Ellipse], size: int,
                 rr: np.ndarray, cc: np.ndarray) -> tuple[np.ndarray, tuple[float, float], float]:
    """One round focal opacity inside a randomly chosen lung field: the image, its centre and its radius."""
    r0, c0, ar, ac = lungs[rng.integers(2)]
    radius = rng.uniform(0.03, 0.07) * size
    # Centre well inside the lung ellipse so the whole disc lies in the lung field.
    t, u = rng.uniform(0, 2 * np.pi), np.sqrt(rng.uniform(0, 1))
    row = r0 + u * (ar - radius) * 0.8 * np.sin(t)
    col = c0 + u * (ac - radius) * 0.8 * np.cos(t)
    d = np.sqrt((rr - row) ** 2 + (cc - col) ** 2) / radius
    profile = np.where(d < 1, 0.5 * (1 + np.cos(np.pi * d)), 0.0)
    return img + rng.uniform(0.18, 0.32) * profile, (float(row), float(col)), float(radius)


def _to_display(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    gamma = rng.uniform(0.85, 1.15)
    return np.round(255 * np.clip(img, 0, 1) ** gamma).astype(np.uint8)


def _cases(n: int, seed: int, size: int, positive_fraction: float) -> Iterator[_Case]:
    """The cases of :func:`generate`, in order, with the ellipses they were drawn from (one random stream)."""
    rng = np.random.default_rng(seed)
    rr, cc = np.mgrid[0:size, 0:size].astype(np.float32)
    for _ in range(n):
        img, lungs, body = _phantom(rng, size)
        label, center, radius = 0, (-1.0, -1.0), 0.0
        if rng.random() < positive_fraction:
            img, center, radius = _add_opacity(img, rng, lungs, size, rr, cc)
            label = 1
        yield _Case(_to_display(img, rng), label, center, radius, lungs, body)


def generate(n: int, seed: int, *, size: int = 256, positive_fraction: float = 0.5) -> SyntheticSet:
    """Generate ``n`` cases; about ``positive_fraction`` carry one focal opacity inside a lung field."""
    images = np.empty((n, size, size), dtype=np.uint8)
    labels = np.zeros(n, dtype=np.int64)
    centers = np.full((n, 2), -1.0)
    radii = np.zeros(n)
    for i, case in enumerate(_cases(n, seed, size, positive_fraction)):
        images[i], labels[i], centers[i], radii[i] = case.image, case.label, case.center, case.radius
    return SyntheticSet(images, labels, centers, radii)


# ---------------------------------------------------------------------------------------------------------------
# Anatomy masks and burned-in markers

MARKER_KINDS = ("laterality", "label", "ruler", "token")
LABEL_TEXTS = ("AP", "PA", "PORTABLE", "SUPINE", "ERECT", "SITTING")
SHORTCUT_TOKEN = "X"  # the class-1 token of generate_shortcut; nothing else draws it
_FONT = cv2.FONT_HERSHEY_SIMPLEX
# Separate random streams (SeedSequence entropy [seed, k]) so that markers never shift the phantoms' stream.
_MARKER_STREAM, _SHORTCUT_STREAM = 1, 2


@dataclass(frozen=True)
class Marker:
    """One burned-in marker: its kind (see MARKER_KINDS), text ("" for a ruler) and bounding box."""

    kind: str
    text: str
    box: tuple[int, int, int, int]  # (row0, col0, row1, col1), row1/col1 exclusive


@dataclass(frozen=True)
class AnatomySet(SyntheticSet):
    """Cases with the generator's own anatomy and markers.

    ``lung_masks`` holds 0 outside the lungs, 1 in the image-left and 2 in the image-right lung field (the
    ellipses the lungs were drawn from); ``marker_masks`` holds k > 0 on the pixels drawn for ``markers[i][k-1]``.
    """

    lung_masks: np.ndarray  # (N, H, W) uint8
    body_masks: np.ndarray  # (N, H, W) bool
    marker_masks: np.ndarray  # (N, H, W) uint8
    markers: tuple[tuple[Marker, ...], ...]

    def lungs(self, i: int) -> np.ndarray:
        """Boolean (H, W) mask of both lung fields of case ``i``."""
        return self.lung_masks[i] > 0

    def finding_mask(self, i: int) -> np.ndarray:
        """Boolean (H, W) mask of the focal opacity of case ``i`` when it has one, whatever its label."""
        h, w = self.images.shape[1:]
        if self.radii[i] <= 0:
            return np.zeros((h, w), dtype=bool)
        rr, cc = np.mgrid[0:h, 0:w]
        r0, c0 = self.centers[i]
        return (rr - r0) ** 2 + (cc - c0) ** 2 <= self.radii[i] ** 2


class _AnatomyArrays:
    """The arrays of an :class:`AnatomySet` of ``n`` cases, empty, for a generator to fill case by case."""

    def __init__(self, n: int, size: int) -> None:
        self.images = np.empty((n, size, size), dtype=np.uint8)
        self.labels = np.zeros(n, dtype=np.int64)
        self.centers = np.full((n, 2), -1.0)
        self.radii = np.zeros(n)
        self.lung_masks = np.zeros((n, size, size), dtype=np.uint8)
        self.body_masks = np.zeros((n, size, size), dtype=bool)
        self.marker_masks = np.zeros((n, size, size), dtype=np.uint8)
        self.markers: list[tuple[Marker, ...]] = []

    def done(self) -> AnatomySet:
        return AnatomySet(self.images, self.labels, self.centers, self.radii, self.lung_masks, self.body_masks,
                          self.marker_masks, tuple(self.markers))


def _anatomy_masks(case: _Case, size: int, rr: np.ndarray, cc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lungs = np.zeros((size, size), dtype=np.uint8)
    for k, ellipse in enumerate(case.lungs):
        lungs[_ellipse(rr, cc, *ellipse) <= 1] = k + 1
    return lungs, _ellipse(rr, cc, *case.body) <= 1


def _render_marker(kind: str, text: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """A marker's pixels on a tight zero canvas: 255 where fully drawn, less on anti-aliased edges."""
    s = size / 256.0
    if kind == "ruler":
        # A thin scale with a tick every few pixels and a longer one every fifth, horizontal or vertical.
        height, length, step = max(4, round(7 * s)), round(rng.uniform(0.22, 0.32) * size), max(3, round(5 * s))
        canvas = np.zeros((height, length), dtype=np.uint8)
        line = max(1, round(s))
        cv2.line(canvas, (0, 0), (length - 1, 0), 255, line)
        for k, x in enumerate(range(0, length, step)):
            cv2.line(canvas, (x, 0), (x, height - 1 if k % 5 == 0 else height // 2), 255, line)
        return np.ascontiguousarray(canvas.T) if rng.random() < 0.5 else canvas
    big = kind in ("laterality", "token")
    scale = float(rng.uniform(0.55, 0.8) if big else rng.uniform(0.35, 0.5)) * s
    thickness = max(1, round((2 if big else 1) * s))
    (w, h), base = cv2.getTextSize(text, _FONT, scale, thickness)
    canvas = np.zeros((h + base + thickness, w + thickness), dtype=np.uint8)
    cv2.putText(canvas, text, (0, h), _FONT, scale, 255, thickness, cv2.LINE_AA)
    return canvas


def _place(canvas: np.ndarray, blocked: np.ndarray, rng: np.random.Generator,
           *, corner: bool) -> tuple[int, int, int, int] | None:
    """A box for ``canvas`` that keeps a margin from every ``blocked`` pixel; None if 50 tries find no room."""
    size = blocked.shape[0]
    h, w = canvas.shape
    m = max(2, round(0.015 * size))
    for _ in range(50):
        if corner:  # within the outer fifth, towards a corner: where laterality letters and tokens sit
            row = int(rng.integers(m, max(m + 1, round(0.2 * size) - h)))
            col = int(rng.integers(m, max(m + 1, round(0.2 * size) - w)))
            row = size - h - row if rng.random() < 0.5 else row
            col = size - w - col if rng.random() < 0.5 else col
        else:
            row = int(rng.integers(m, size - h - m))
            col = int(rng.integers(m, size - w - m))
        if not blocked[max(0, row - m):row + h + m, max(0, col - m):col + w + m].any():
            return row, col, row + h, col + w
    return None


def _burn_in(image: np.ndarray, markers: list[tuple[str, str, bool]], keep_out: np.ndarray,
             rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, tuple[Marker, ...]]:
    """Burn ``markers`` (kind, text, near a corner) into a copy of ``image``, bright and near saturation."""
    out = image.copy()
    mask = np.zeros(image.shape, dtype=np.uint8)
    placed: list[Marker] = []
    for kind, text, corner in markers:
        canvas = _render_marker(kind, text, rng, image.shape[0])
        box = _place(canvas, keep_out | (mask > 0), rng, corner=corner)
        if box is None:
            continue
        r0, c0, r1, c1 = box
        level = float(rng.uniform(0.9, 1.0)) * 255.0
        alpha = canvas.astype(np.float32) / 255.0
        out[r0:r1, c0:c1] = np.round(out[r0:r1, c0:c1] * (1.0 - alpha) + level * alpha).astype(np.uint8)
        mask[r0:r1, c0:c1][canvas > 0] = len(placed) + 1
        placed.append(Marker(kind, text, box))
    return out, mask, tuple(placed)


def _random_markers(rng: np.random.Generator) -> list[tuple[str, str, bool]]:
    """A laterality letter always; a text label and a ruler on some cases."""
    chosen = [("laterality", str(rng.choice(["L", "R"])), True)]
    if rng.random() < 0.5:
        chosen.append(("label", str(rng.choice(LABEL_TEXTS)), False))
    if rng.random() < 0.3:
        chosen.append(("ruler", "", False))
    return chosen


def _keep_out(lungs: np.ndarray, size: int) -> np.ndarray:
    """Where no marker goes: the lung fields with a margin (markers sit outside the lungs, as on real films)."""
    margin = max(3, round(0.02 * size)) * 2 + 1
    return cv2.dilate((lungs > 0).astype(np.uint8), np.ones((margin, margin), np.uint8)) > 0


def generate_anatomy(n: int, seed: int, *, size: int = 256, positive_fraction: float = 0.5,
                     markers: bool = False) -> AnatomySet:
    """:func:`generate`'s cases with their anatomy; with ``markers``, random burned-in markers outside the lungs.

    Without markers the images are exactly those of ``generate(n, seed, ...)``; the markers come from a random
    stream of their own, so the phantoms, labels and findings are the same either way.
    """
    marker_rng = np.random.default_rng([seed, _MARKER_STREAM])
    rr, cc = np.mgrid[0:size, 0:size].astype(np.float32)
    out = _AnatomyArrays(n, size)
    for i, case in enumerate(_cases(n, seed, size, positive_fraction)):
        out.lung_masks[i], out.body_masks[i] = _anatomy_masks(case, size, rr, cc)
        image = case.image
        found: tuple[Marker, ...] = ()
        if markers:
            image, out.marker_masks[i], found = _burn_in(image, _random_markers(marker_rng),
                                                         _keep_out(out.lung_masks[i], size), marker_rng)
        out.images[i], out.labels[i], out.centers[i], out.radii[i] = image, case.label, case.center, case.radius
        out.markers.append(found)
    return out.done()


def generate_shortcut(n: int, seed: int, *, size: int = 256, opacity_fraction: float = 0.5) -> AnatomySet:
    """The shortcut set: label 1 iff a bright token (:data:`SHORTCUT_TOKEN`) is burned in near a corner.

    Focal opacities appear in both classes with probability ``opacity_fraction``, independently of the label,
    so the only thing that tells the classes apart is the token outside the lungs. ``centers``/``radii`` describe
    the opacity when there is one, whatever the label.
    """
    rng = np.random.default_rng([seed, _SHORTCUT_STREAM])
    rr, cc = np.mgrid[0:size, 0:size].astype(np.float32)
    out = _AnatomyArrays(n, size)
    for i in range(n):
        img, lungs, body = _phantom(rng, size)
        if rng.random() < opacity_fraction:
            img, out.centers[i], out.radii[i] = _add_opacity(img, rng, lungs, size, rr, cc)
        case = _Case(_to_display(img, rng), 0, (-1.0, -1.0), 0.0, lungs, body)
        out.lung_masks[i], out.body_masks[i] = _anatomy_masks(case, size, rr, cc)
        out.labels[i] = int(rng.random() < 0.5)
        wanted = [("token", SHORTCUT_TOKEN, True)] if out.labels[i] else []
        keep_out = _keep_out(out.lung_masks[i], size)
        out.images[i], out.marker_masks[i], found = _burn_in(case.image, wanted, keep_out, rng)
        if out.labels[i] and not found:
            raise RuntimeError(f"no room for the shortcut token in case {i}")  # the corners are never all lung
        out.markers.append(found)
    return out.done()
