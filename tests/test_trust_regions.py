"""Anatomy regions from the display image: lung fields, body, border band and burned-in markers.

Scored against the generator's own lung and marker masks, and checked on real radiographs from pydicom-data:
RG1 (a PA chest) has two lung fields, RG3 (an extremity) and RG1 inverted, rotated or upside down have none.
"""

from __future__ import annotations

import hashlib

import cv2
import numpy as np
import pydicom
import pytest

from dicom_node.imaging.pixels import render_display
from explain.regions import (
    BODY,
    BORDER,
    LUNGS,
    MARKERS,
    OUTSIDE_BODY,
    Regions,
    anatomy_regions,
    border_band,
    label_overlay,
)
from models.synthetic import SHORTCUT_TOKEN, generate, generate_anatomy, generate_shortcut
from tests.support.peers import sample

PHANTOMS = 200
PHANTOM_SEED = 2024  # none of the training, validation or held-out seeds of the shipped models


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * int(np.count_nonzero(a & b)) / max(1, int(np.count_nonzero(a)) + int(np.count_nonzero(b)))


def _display(name: str) -> np.ndarray:
    return np.asarray(render_display(pydicom.dcmread(sample(name)), max_long_side=512).pixels)


@pytest.fixture(scope="module")
def phantoms():  # type: ignore[no-untyped-def]
    cases = generate_anatomy(PHANTOMS, PHANTOM_SEED, markers=True)
    return cases, [anatomy_regions(image) for image in cases.images]


def test_lung_fields_match_the_generators_lungs(phantoms) -> None:  # type: ignore[no-untyped-def]
    cases, regions = phantoms
    both = [_dice(r.lungs, cases.lungs(i)) for i, r in enumerate(regions)]
    # Each field on its own side: the image-left field against the generator's first (image-left) lung.
    sides = [(_dice(r.lung_left, cases.lung_masks[i] == 1) + _dice(r.lung_right, cases.lung_masks[i] == 2)) / 2
             for i, r in enumerate(regions)]
    assert np.mean(both) >= 0.90, f"mean lung-field Dice {np.mean(both):.3f} over {PHANTOMS} phantoms"
    assert np.mean(sides) >= 0.90, f"mean per-side Dice {np.mean(sides):.3f}"
    assert sum(r.plausible_lungs for r in regions) >= 0.99 * PHANTOMS


def test_burned_in_markers_are_found(phantoms) -> None:  # type: ignore[no-untyped-def]
    cases, regions = phantoms
    found = total = 0
    for i, r in enumerate(regions):
        for k in range(1, len(cases.markers[i]) + 1):
            drawn = cases.marker_masks[i] == k
            total += 1
            found += bool(r.markers[drawn].mean() >= 0.5)  # at least half its drawn pixels inside the boxes
    kinds = {m.kind for ms in cases.markers for m in ms}
    assert kinds == {"laterality", "label", "ruler"}
    assert total >= PHANTOMS, "every phantom carries at least a laterality letter"
    assert found / total >= 0.95, f"marker recall {found}/{total}"


def test_markers_are_not_found_where_none_were_drawn(phantoms) -> None:  # type: ignore[no-untyped-def]
    cases, regions = phantoms
    boxes = false = 0
    for i, r in enumerate(regions):
        count, labels = cv2.connectedComponents(r.markers.astype(np.uint8))
        for box in range(1, count):
            boxes += 1
            false += not np.any(cases.marker_masks[i][labels == box])
        # A focal opacity in the lungs (bright and round) is no marker.
        assert not np.any(r.markers & cases.finding_mask(i)), f"phantom {i}: the finding taken for a marker"
    assert boxes > 0 and false <= 0.02 * boxes, f"{false} of {boxes} marker boxes hold no drawn marker"


def test_label_image_precedence() -> None:
    shape = (6, 5)
    body = np.zeros(shape, dtype=bool)
    lung = np.zeros(shape, dtype=bool)
    border = np.zeros(shape, dtype=bool)
    markers = np.zeros(shape, dtype=bool)
    body[1:, :] = True  # row 0: outside
    lung[2:, :] = True  # row 1: body only
    border[3:, :] = True  # row 2: lungs over body
    markers[4:, :] = True  # row 3: border over lungs; rows 4-5: markers over everything
    regions = Regions(body, lung, np.zeros(shape, dtype=bool), border, markers, True, "ok")
    labels = regions.label_image()
    assert labels.dtype == np.uint8 and labels.shape == shape
    assert [int(labels[row, 0]) for row in range(6)] == [OUTSIDE_BODY, BODY, LUNGS, BORDER, MARKERS, MARKERS]
    assert (OUTSIDE_BODY, LUNGS, BODY, BORDER, MARKERS) == (0, 1, 2, 3, 4)


def test_label_image_of_a_phantom_agrees_with_its_masks(phantoms) -> None:  # type: ignore[no-untyped-def]
    _, regions = phantoms
    r = regions[0]
    labels = r.label_image()
    assert set(np.unique(labels)) <= {0, 1, 2, 3, 4}
    assert np.array_equal(labels == MARKERS, r.markers)
    assert np.array_equal(labels == BORDER, r.border & ~r.markers)
    assert np.array_equal(labels == LUNGS, r.lungs & ~r.border & ~r.markers)
    assert not np.any(r.lung_left & r.lung_right)
    assert np.all(r.body[r.lungs]), "the lung fields lie inside the body"
    assert not r.body.flags.writeable and not r.markers.flags.writeable


def test_border_band_width_is_a_fraction_of_the_short_side() -> None:
    band = border_band((200, 100), 0.1)
    assert band[:10].all() and band[-10:].all() and band[:, :10].all() and band[:, -10:].all()
    assert not band[10:-10, 10:-10].any()
    assert not border_band((200, 100), 0.0).any()
    image = generate(1, 5).images[0]
    wide, narrow = anatomy_regions(image, border_fraction=0.1), anatomy_regions(image)
    assert wide.border.sum() > narrow.border.sum() > 0


def test_input_is_checked_and_left_untouched() -> None:
    image = generate(1, 6).images[0]
    before = image.copy()
    anatomy_regions(image)
    assert np.array_equal(image, before)
    with pytest.raises(ValueError):
        anatomy_regions(image.astype(np.float32))
    with pytest.raises(ValueError):
        anatomy_regions(np.dstack([image, image, image]))
    with pytest.raises(ValueError):
        anatomy_regions(image, border_fraction=0.6)


@pytest.mark.parametrize("image", [np.zeros((64, 64), np.uint8), np.full((80, 60), 200, np.uint8)])
def test_a_blank_image_has_no_lung_fields(image: np.ndarray) -> None:
    r = anatomy_regions(image)
    assert not r.plausible_lungs and not r.lungs.any() and not r.markers.any()


def test_noise_has_no_lung_fields() -> None:
    noise = np.random.default_rng(0).integers(0, 256, (256, 256), dtype=np.uint8)
    assert not anatomy_regions(noise).plausible_lungs


def test_rg1_chest_has_two_lung_fields() -> None:
    display = _display("RG1_UNCR.dcm")
    r = anatomy_regions(display)
    assert r.plausible_lungs, r.lung_finding
    height, width = display.shape
    for field, side in ((r.lung_left, "left"), (r.lung_right, "right")):
        assert field.mean() >= 0.08, f"{side} lung field covers {field.mean():.1%} of the image"
        rows, cols = np.nonzero(field)
        assert (cols.mean() < width / 2) == (side == "left")
        assert rows.mean() < 0.5 * height, "lung fields sit in the upper part of a chest film"
    assert r.body.mean() > 0.9  # the chest fills the film
    overlay = label_overlay(display, r.label_image())
    assert overlay.shape == (height, width, 3) and overlay.dtype == np.uint8


@pytest.mark.parametrize(
    "name,transform",
    [
        ("RG3_UNCR.dcm", "none"),  # an extremity
        ("RG1_UNCR.dcm", "inverted"),  # MONOCHROME1 shown as MONOCHROME2
        ("RG1_UNCR.dcm", "rotated"),
        ("RG1_UNCR.dcm", "upside_down"),
    ],
)
def test_no_lung_fields_when_not_a_frontal_chest(name: str, transform: str) -> None:
    display = _display(name)
    image = {
        "none": display,
        "inverted": 255 - display,
        "rotated": np.ascontiguousarray(np.rot90(display)),
        "upside_down": np.ascontiguousarray(display[::-1]),
    }[transform]
    r = anatomy_regions(image)
    assert not r.plausible_lungs
    assert not r.lungs.any() and r.lung_finding != "ok"


def test_rg3_laterality_marker_is_found() -> None:
    # RG3 carries a lead "R" marker at about row 415, column 345 of the 512x512 display image.
    r = anatomy_regions(_display("RG3_UNCR.dcm"))
    assert r.markers[405:425, 335:355].mean() > 0.9
    assert r.markers.mean() < 0.01


def test_generate_is_unchanged_by_the_anatomy_functions() -> None:
    # The shipped demo model was trained on generate()'s stream: this digest was taken before anatomy and
    # markers were added to the generator, and must not move.
    cases = generate(40, 3)
    digest = hashlib.sha256()
    for array in (cases.images, cases.labels, cases.centers, cases.radii):
        digest.update(array.tobytes())
    assert digest.hexdigest() == "41a535b7901010f5dce65a6b861e6241510618e8db33d84150c548dfa7d418fd"
    plain = generate_anatomy(40, 3)
    assert np.array_equal(plain.images, cases.images) and np.array_equal(plain.labels, cases.labels)
    assert np.array_equal(plain.centers, cases.centers) and np.array_equal(plain.radii, cases.radii)
    assert not plain.marker_masks.any() and all(m == () for m in plain.markers)
    marked = generate_anatomy(40, 3, markers=True)
    assert np.array_equal(marked.labels, cases.labels) and np.array_equal(marked.lung_masks, plain.lung_masks)
    changed = marked.images != cases.images
    assert changed.any() and not np.any(changed & (marked.marker_masks == 0))


def test_shortcut_set_carries_its_label_only_in_the_token() -> None:
    cases = generate_shortcut(200, 7)
    has_token = np.array([any(m.text == SHORTCUT_TOKEN for m in ms) for ms in cases.markers])
    assert np.array_equal(has_token, cases.labels == 1)
    assert 60 <= cases.labels.sum() <= 140
    assert not np.any((cases.marker_masks > 0) & (cases.lung_masks > 0)), "the token lies outside the lungs"
    opacity = cases.radii > 0
    # Opacities in both classes, about as often: they say nothing about the label.
    rate_1, rate_0 = opacity[cases.labels == 1].mean(), opacity[cases.labels == 0].mean()
    assert 0.3 < rate_0 < 0.7 and 0.3 < rate_1 < 0.7
    again = generate_shortcut(200, 7)
    assert np.array_equal(again.images, cases.images)
