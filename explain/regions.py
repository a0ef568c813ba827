"""Anatomy regions of a rendered chest radiograph, by classical image processing: pure numpy/OpenCV, no weights.

The input is the display image as :func:`dicom_node.imaging.pixels.render_display` makes it (uint8, lungs dark,
bone bright, MONOCHROME1 already inverted). The regions say where a heatmap's evidence lies:

- **lung fields**: the two large dark fields inside the body, one on each side of the midline. A grey-level
  threshold is swept from dark to bright; at each level the largest dark component on each side must look like
  a lung field (not touching the image edge, taller than wide, of similar size to the other, side by side, high
  in the image, not ragged). The pair found in the middle of the plausible levels seeds each field, which then
  grows, within a band around it and away from the background, to the pixels a little darker than the tissue
  around the fields (a lung fades into the chest wall, so any level that keeps the fields apart cuts them
  short). Each field is its convex hull, so the ribs crossing it and the lung behind the heart count as lung.
  When no level gives a plausible pair (not a frontal chest, rotated, upside down, inverted, a lateral view, an
  extremity), ``plausible_lungs`` is False and the lung masks are empty.
- **body**: everything but the dark background connected to the image edge.
- **border band**: a frame ``border_fraction`` of the short side wide (collimator edges, cassette borders).
- **markers**: burned-in laterality letters, text labels and rulers: small, thin, bright (near saturation)
  components with sharp edges, found with a white top-hat and kept as their bounding boxes with a margin.
  Dark-on-bright text is not looked for.

Lungs and body are computed at a working size (long side :data:`WORK_LONG_SIDE`) and scaled back; markers at the
display size, where thin strokes are still thin.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

import cv2
import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_BORDER_FRACTION: Final = 0.05
WORK_LONG_SIDE: Final = 192

_MERGED = "no dark field on each side of the midline"

# Label values of Regions.label_image(); higher precedence wins where regions overlap.
OUTSIDE_BODY, LUNGS, BODY, BORDER, MARKERS = 0, 1, 2, 3, 4
REGION_NAMES: Final = MappingProxyType(
    {OUTSIDE_BODY: "outside_body", LUNGS: "lungs", BODY: "body", BORDER: "border", MARKERS: "markers"}
)
# Viewing colours (RGB) of the labels: lungs green, body grey, border blue, markers red.
REGION_COLOURS: Final = MappingProxyType(
    {OUTSIDE_BODY: (0, 0, 0), LUNGS: (40, 200, 60), BODY: (128, 128, 128), BORDER: (40, 110, 230),
     MARKERS: (230, 30, 30)}
)

# Lung-field sweep: thresholds at these percentiles of the working image, from dark to bright; it stops after
# this many levels at which the fields have merged with each other or with the background.
_SWEEP_PERCENTILES = np.arange(8.0, 72.0, 3.0)
_SWEEP_STOP_AFTER = 3
_SWEEP_LONG_SIDE = 128
# Plausibility of a pair of lung fields; lengths and areas are fractions of the image's.
_LUNG_MIN_AREA, _LUNG_MAX_AREA = 0.025, 0.25
_LUNG_MIN_HEIGHT = 0.22
_LUNG_MIN_ASPECT = 0.9  # height / width of the bounding box: lungs are taller than wide on a frontal view
_LUNG_MIN_SOLIDITY = 0.55  # area / convex hull area: a field, not a ragged net of dark gaps
_LUNG_PAIR_MIN_AREA_RATIO = 0.35
_LUNG_PAIR_MIN_ROW_OVERLAP = 0.5  # of the shorter field's height: side by side, not one above the other
_LUNG_MAX_CROSS = 0.08  # how far a field may reach over the image midline, fraction of the width
_LUNG_MAX_CENTRE_ROW = 0.55  # the fields' mean centre row, fraction of the height: lungs sit high in a chest film
_LUNG_OPENING = 0.012  # radius of the opening that cuts narrow bridges, fraction of the long side
# Growing the seeds found by the sweep out to the fields' faint edges.
_GROW_BAND = 0.05  # how far a field may grow beyond its seed, fraction of the long side
_GROW_MARGIN = 0.2  # the edge level lies this fraction of the tissue-to-lung contrast below the tissue
# Markers, relative to the display size and the 0..255 grey scale.
_MARKER_KERNEL_FRACTION = 0.03  # top-hat kernel: strokes thinner than this (of the short side) stand out
_MARKER_MIN_CONTRAST = 60  # top-hat response
_MARKER_MIN_LEVEL = 200  # burned-in text is drawn at or near full white
_MARKER_WEAK_CONTRAST, _MARKER_WEAK_LEVEL = 25, 150  # hysteresis: weaker pixels joined to a strong one
_MARKER_MIN_EDGE = 70  # grey step between neighbouring pixels at a drawn stroke's edge
_MARKER_MIN_AREA = 3  # pixels
_MARKER_MAX_EXTENT = 0.4  # of the long side: longer thin bright lines are skin folds or collimator edges
_MARKER_MAX_AREA = 0.02  # of the image
_MARKER_MARGIN_FRACTION = 0.012  # the boxes are widened by this much of the short side


@dataclass(frozen=True)
class Regions:
    """Boolean (H, W) masks at the display image's size (read-only), and whether the lung fields are plausible.

    ``lung_left`` / ``lung_right`` are the fields on the image's left and right (the patient's right and left on
    a conventionally displayed PA/AP view). Masks may overlap; :meth:`label_image` applies the precedence.
    """

    body: np.ndarray
    lung_left: np.ndarray
    lung_right: np.ndarray
    border: np.ndarray
    markers: np.ndarray
    plausible_lungs: bool
    lung_finding: str  # why the lung fields are (not) plausible, for logs and reports

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.body.shape[0]), int(self.body.shape[1]))

    @property
    def lungs(self) -> np.ndarray:
        return self.lung_left | self.lung_right

    def label_image(self) -> np.ndarray:
        """uint8 (H, W): 0 outside the body, 1 lung fields, 2 rest of the body, 3 border band, 4 markers.

        Precedence where regions overlap: markers > border band > lungs > body > outside.
        """
        labels = np.full(self.shape, OUTSIDE_BODY, dtype=np.uint8)
        labels[self.body] = BODY
        labels[self.lung_left | self.lung_right] = LUNGS
        labels[self.border] = BORDER
        labels[self.markers] = MARKERS
        return labels


def anatomy_regions(display: np.ndarray, *, border_fraction: float = DEFAULT_BORDER_FRACTION) -> Regions:
    """The anatomy regions of a uint8 (H, W) display image; ``display`` is not modified."""
    image = np.asarray(display)
    if image.ndim != 2 or image.dtype != np.uint8:
        raise ValueError(f"display must be a 2-D uint8 array, not {image.dtype} {image.shape}")
    if min(image.shape) < 16:
        raise ValueError(f"display is too small for anatomy regions: {image.shape}")
    if not 0.0 <= border_fraction < 0.5:
        raise ValueError(f"border_fraction must lie in [0, 0.5), not {border_fraction}")
    height, width = image.shape
    work = _smoothed(_fit(image, WORK_LONG_SIDE))
    lung_left_w, lung_right_w, finding = _lung_fields(work)
    plausible = bool(lung_left_w.any())
    if not plausible:
        logger.debug("no plausible lung fields in a %dx%d image: %s", height, width, finding)
    body_w = _body(work, lung_left_w | lung_right_w)
    size = (width, height)
    lung_left = _scale_mask(lung_left_w, size)
    lung_right = _scale_mask(lung_right_w, size)
    body = _scale_mask(body_w, size) | lung_left | lung_right
    return Regions(
        body=_frozen(body),
        lung_left=_frozen(lung_left),
        lung_right=_frozen(lung_right),
        border=_frozen(border_band((height, width), border_fraction)),
        markers=_frozen(burned_in_markers(image)),
        plausible_lungs=plausible,
        lung_finding=finding,
    )


def label_overlay(display: np.ndarray, labels: np.ndarray, *, alpha: float = 0.45) -> np.ndarray:
    """The label image's colours (:data:`REGION_COLOURS`) laid over the radiograph, for viewing; (H, W, 3) RGB."""
    if display.shape != labels.shape:
        raise ValueError(f"display {display.shape} and labels {labels.shape} differ in size")
    palette = np.array([REGION_COLOURS[label] for label in sorted(REGION_COLOURS)], dtype=np.float32)
    grey = np.repeat(display[..., np.newaxis].astype(np.float32), 3, axis=-1)
    return np.rint(grey * (1.0 - alpha) + palette[labels] * alpha).astype(np.uint8)


def border_band(shape: tuple[int, int], fraction: float) -> np.ndarray:
    """A frame ``fraction`` of the short side wide (at least one pixel when ``fraction`` > 0)."""
    band = np.zeros(shape, dtype=bool)
    if fraction <= 0:
        return band
    width = max(1, round(fraction * min(shape)))
    band[:width, :] = band[-width:, :] = True
    band[:, :width] = band[:, -width:] = True
    return band


def burned_in_markers(display: np.ndarray) -> np.ndarray:
    """Boolean mask of burned-in markers: bright thin components with sharp edges, as boxes with a margin.

    Hysteresis on the white top-hat: a component of weak response (a ruler running from the dark background
    onto the bright mediastinum, a thin anti-aliased letter) is kept when it holds a pixel of strong response.
    """
    height, width = display.shape
    short, long = min(height, width), max(height, width)
    k = max(5, int(round(_MARKER_KERNEL_FRACTION * short)) | 1)
    tophat = cv2.morphologyEx(display, cv2.MORPH_TOPHAT, cv2.getStructuringElement(cv2.MORPH_RECT, (k, k)))
    mask = np.zeros((height, width), dtype=bool)
    strong = (tophat >= _MARKER_MIN_CONTRAST) & (display >= _MARKER_MIN_LEVEL)
    if not strong.any():
        return mask
    # Strong pixels lie within a pixel of a sharp grey step: drawn strokes, not smooth anatomy (a nodule, the
    # crossing of clavicles and spine) that the top-hat also lets through.
    sharp = (_edge_strength(display) >= _MARKER_MIN_EDGE).astype(np.uint8)
    strong &= cv2.dilate(sharp, np.ones((3, 3), np.uint8)) > 0
    if not strong.any():
        return mask
    weak = (((tophat >= _MARKER_WEAK_CONTRAST) & (display >= _MARKER_WEAK_LEVEL)) | strong).astype(np.uint8)
    margin = max(2, round(_MARKER_MARGIN_FRACTION * short))
    # One flood fill per weak component that holds a strong pixel (a handful per image): labelling every
    # component of the image with its statistics would cost more than the rest of the detector.
    for y, x in zip(*np.nonzero(strong), strict=True):
        if weak[y, x] != 1:
            continue  # in a component already filled
        area, _, _, (x0, y0, w, h) = cv2.floodFill(weak, None, (int(x), int(y)), 2, 0, 0, 8)
        too_big = area > _MARKER_MAX_AREA * height * width or max(w, h) > _MARKER_MAX_EXTENT * long
        if area < _MARKER_MIN_AREA or too_big:
            continue
        mask[max(0, y0 - margin):y0 + h + margin, max(0, x0 - margin):x0 + w + margin] = True
    return mask


def _edge_strength(display: np.ndarray) -> np.ndarray:
    """The larger absolute grey step to the next pixel down or to the right, uint8."""
    edge = np.zeros(display.shape, dtype=np.uint8)
    edge[:-1] = cv2.absdiff(display[1:], display[:-1])
    edge[:, :-1] = cv2.max(edge[:, :-1], cv2.absdiff(display[:, 1:], display[:, :-1]))
    return edge


@dataclass(frozen=True)
class _Field:
    label: int
    area: float  # fraction of the image
    top: int
    bottom: int  # exclusive
    left: int
    right: int  # exclusive
    centre_row: float
    centre_col: float


def _lung_fields(work: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
    """Image-left and image-right lung masks at the working size (both empty when implausible) and why."""
    sweep = _fit(work, _SWEEP_LONG_SIDE)
    plausible: list[float] = []
    reasons: Counter[str] = Counter()
    for level in np.percentile(sweep, _SWEEP_PERCENTILES):
        pair, why = _plausible_pair(sweep < level)
        if pair is not None:
            plausible.append(float(level))
        else:
            reasons[why] += 1
            if plausible and reasons[why] >= _SWEEP_STOP_AFTER and why == _MERGED:
                break  # brighter levels only merge the fields further
    empty = np.zeros(work.shape, dtype=bool)
    # Seeds from the middle of the plausible range: clear of both the noise at its dark end and the leaks into
    # the chest wall at its bright end; _grow takes them to the edges. The working size, finer than the sweep's,
    # may disagree at a level: then the next darker one is taken.
    middle = len(plausible) // 2
    for level in plausible[middle::-1]:
        pair, why = _plausible_pair(work < level)
        if pair is not None:
            break
    else:
        # No plausible level: the reason given at most levels of the sweep.
        return empty, empty, why if plausible else reasons.most_common(1)[0][0]
    labels, left, right = pair
    grown = _grow(work, labels == left.label, labels == right.label, level)
    return _filled(grown == 1), _filled(grown == 2), "ok"


def _grow(work: np.ndarray, left: np.ndarray, right: np.ndarray, level: float) -> np.ndarray:
    """Grow the two fields found at ``level`` out to their faint edges: 1 left, 2 right, 0 elsewhere.

    A lung field fades into the chest wall, so a threshold that keeps the fields apart cuts them short. Each
    field is grown, within a band around it and away from the background, to the pixels darker than a level
    just below the tissue in a ring around the fields.
    """
    both = left | right
    band = _GROW_BAND * max(work.shape)
    distance = cv2.distanceTransform((~both).astype(np.uint8), cv2.DIST_L2, 3)
    near = distance <= band
    ring = (distance > band) & (distance <= 2 * band)
    background = _edge_connected(work < _background_level(work, both))
    ring &= ~background
    if not ring.any():
        return left.astype(np.uint8) + 2 * right.astype(np.uint8)
    tissue = float(np.median(work[ring]))
    lung = float(np.median(work[both]))
    edge_level = tissue - _GROW_MARGIN * (tissue - lung)
    grown_mask = ((work < max(edge_level, level)) & near & ~background).astype(np.uint8)
    _, grown = cv2.connectedComponents(grown_mask | both.astype(np.uint8), connectivity=4)
    out = np.zeros(work.shape, dtype=np.uint8)
    for value, seed in ((1, left), (2, right)):
        ids = np.unique(grown[seed])
        out[np.isin(grown, ids[ids > 0]) & (out == 0)] = value
    return out


def _plausible_pair(dark: np.ndarray) -> tuple[tuple[np.ndarray, _Field, _Field] | None, str]:
    """The largest dark component on each side of the midline, if they look like a pair of lung fields."""
    height, width = dark.shape
    # Opened first, so that a field meeting the background through a narrow gap (an apex beyond the body's
    # outline) is still a field of its own.
    radius = max(1, round(_LUNG_OPENING * max(height, width)))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    opened = cv2.morphologyEx(dark.astype(np.uint8), cv2.MORPH_OPEN, kernel)
    count, labels, stats, centroids = cv2.connectedComponentsWithStats(opened, connectivity=4)
    fields: list[_Field] = []
    for i in range(1, count):
        x, y, w, h, area = (int(v) for v in stats[i])
        if x == 0 or y == 0 or x + w == width or y + h == height:
            continue  # touches the edge: background, not a field inside the body
        if area < _LUNG_MIN_AREA * height * width:
            continue
        fields.append(_Field(i, area / (height * width), y, y + h, x, x + w, float(centroids[i][1]),
                             float(centroids[i][0])))
    left = max((f for f in fields if f.centre_col < width / 2), key=lambda f: f.area, default=None)
    right = max((f for f in fields if f.centre_col >= width / 2), key=lambda f: f.area, default=None)
    if left is None or right is None:
        return None, _MERGED
    for field in (left, right):
        if field.area > _LUNG_MAX_AREA:
            return None, "a dark field larger than a lung"
        if field.bottom - field.top < _LUNG_MIN_HEIGHT * height:
            return None, "a dark field shorter than a lung"
        if (field.bottom - field.top) < _LUNG_MIN_ASPECT * (field.right - field.left):
            return None, "a dark field wider than tall"
    if left.right > width * (0.5 + _LUNG_MAX_CROSS) or right.left < width * (0.5 - _LUNG_MAX_CROSS):
        return None, "a dark field across the midline"
    if min(left.area, right.area) < _LUNG_PAIR_MIN_AREA_RATIO * max(left.area, right.area):
        return None, "dark fields of unequal size"
    overlap = min(left.bottom, right.bottom) - max(left.top, right.top)
    if overlap < _LUNG_PAIR_MIN_ROW_OVERLAP * min(left.bottom - left.top, right.bottom - right.top):
        return None, "dark fields not side by side"
    if left.centre_row + right.centre_row > 2 * _LUNG_MAX_CENTRE_ROW * height:
        return None, "dark fields low in the image (upside down?)"
    for field in (left, right):
        component = (labels[field.top:field.bottom, field.left:field.right] == field.label).astype(np.uint8)
        if field.area * height * width < _LUNG_MIN_SOLIDITY * cv2.contourArea(_hull(component)):
            return None, "a ragged dark field"
    return (labels, left, right), "ok"


def _hull(mask: np.ndarray) -> np.ndarray:
    """The convex hull of a mask's outer contours (fewer points than all of its pixels)."""
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return cv2.convexHull(np.concatenate(contours))


def _filled(field: np.ndarray) -> np.ndarray:
    """A lung field's convex hull: ribs crossing it and lung behind the heart or a nodule count as lung."""
    out = np.zeros(field.shape, dtype=np.uint8)
    if field.any():
        cv2.fillConvexPoly(out, _hull(field.astype(np.uint8)), 1)
    return out.astype(bool)


def _body(work: np.ndarray, lungs: np.ndarray) -> np.ndarray:
    """Everything but the dark background connected to the image edge."""
    if lungs.any():
        threshold = _background_level(work, lungs)
    else:
        threshold, _ = cv2.threshold(_to_u8(work), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return ~_edge_connected(work < threshold)


def _background_level(work: np.ndarray, lungs: np.ndarray) -> float:
    """Between the darkest grey and the lungs' own: background air is darker than aerated lung."""
    return 0.5 * (float(np.percentile(work, 1)) + float(np.median(work[lungs])))


def _edge_connected(mask: np.ndarray) -> np.ndarray:
    """The parts of ``mask`` connected to the image's edge."""
    _, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=4)
    edge_labels = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    return np.isin(labels, edge_labels[edge_labels > 0])


def _fit(image: np.ndarray, long_side: int) -> np.ndarray:
    height, width = image.shape
    scale = long_side / max(height, width)
    if scale >= 1.0:
        return image
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def _smoothed(image: np.ndarray) -> np.ndarray:
    sigma = max(1.0, 0.008 * max(image.shape))
    return cv2.GaussianBlur(image.astype(np.float32), (0, 0), sigma)


def _to_u8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _scale_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A working-size mask at ``size`` = (W, H), edges interpolated rather than blocky."""
    if (mask.shape[1], mask.shape[0]) == size:
        return mask.copy()
    return cv2.resize(mask.astype(np.float32), size, interpolation=cv2.INTER_LINEAR) >= 0.5


def _frozen(mask: np.ndarray) -> np.ndarray:
    mask.setflags(write=False)
    return mask
