"""Reduced-resolution rendering: JPEG 2000 / HTJ2K decoded only to the level needed, everything else area-reduced
before the LUTs. Checked against a full decode of the same data: the rendering differs by a grey level or so,
and the demo model's predictions on the test images do not change."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import JPEG2000, HTJ2KLossless, JPEG2000Lossless

from dicom_node.imaging import j2k
from dicom_node.imaging.pixels import _first_fragment, model_input, render_display
from dicom_node.peers.synthetic_cr import make_cr_dataset
from tests.support.synthetic_dicom import encoded, encoder_missing

MODEL_SHAPE = (256, 256)


def _testdata(name: str) -> Dataset:
    path = get_testdata_file(name)
    assert path is not None, f"{name} is not in pydicom-data"
    return dcmread(path)


def _header(rows: int, columns: int, levels: int) -> j2k.CodestreamHeader:
    return j2k.CodestreamHeader(rows, columns, components=1, precision=12, signed=False, levels=levels)


@pytest.mark.parametrize(
    ("long_side", "min_shape", "levels", "expected"),
    [
        (512, MODEL_SHAPE, 5, 2),  # 489x461: within sqrt(2) of 512, above 256
        (1024, MODEL_SHAPE, 5, 1),  # 978x921
        (2048, MODEL_SHAPE, 5, 0),  # the source itself is below the cap
        (256, MODEL_SHAPE, 5, 2),  # level 3 (245x231) would be below the model's input
        (512, (512, 512), 5, 1),  # a larger model input forces a finer level
        (128, (0, 0), 1, 1),  # no more levels than the codestream has
        (512, MODEL_SHAPE, 0, 0),
    ],
)
def test_choose_level(long_side: int, min_shape: tuple[int, int], levels: int, expected: int) -> None:
    assert j2k.choose_level(_header(1955, 1841, levels), long_side, min_shape) == expected


@pytest.mark.parametrize("name", ["RG1_J2KR.dcm", "RG1_J2KI.dcm"])
def test_parse_header_of_real_codestreams(name: str) -> None:
    header = j2k.parse_header(_first_fragment(_testdata(name)))
    assert header == j2k.CodestreamHeader(1955, 1841, components=1, precision=15, signed=False, levels=5)


def test_parse_header_rejects_what_is_not_a_codestream() -> None:
    assert j2k.parse_header(b"\xff\xd8\xff\xe0" + bytes(40)) is None
    assert j2k.parse_header(b"\xff\x4f\xff\x51\x00\x29") is None  # SIZ cut short


@pytest.mark.parametrize("name", ["RG1_J2KR.dcm", "RG1_J2KI.dcm"])
def test_real_radiograph_is_decoded_at_level_2_and_renders_like_a_full_decode(name: str) -> None:
    ds = _testdata(name)
    reduced = render_display(ds, max_long_side=512, min_shape=MODEL_SHAPE)
    full = render_display(ds, max_long_side=512, min_shape=MODEL_SHAPE, reduced_decode=False)
    assert reduced.decode == "JPEG 2000 resolution level 2 of 5"
    assert full.decode == "full"
    assert reduced.pixels.shape == full.pixels.shape == (512, 482)  # level 2 (489x461) brought to the cap
    assert reduced.source_shape == full.source_shape == (1955, 1841)
    assert reduced.voi == full.voi
    a = model_input(reduced.pixels, MODEL_SHAPE, 1, "unit") * 255
    b = model_input(full.pixels, MODEL_SHAPE, 1, "unit") * 255
    diff = np.abs(a - b)
    # Measured: mean 0.8, max 24 grey levels (the 5/3 or 9/7 wavelet low-pass is not an area average; the
    # largest differences sit on the collimator edges).
    assert diff.mean() < 1.5
    assert np.percentile(diff, 99) < 8


def test_uncompressed_radiograph_reduced_before_the_luts_matches_luts_then_reduce() -> None:
    from dicom_node.imaging.pixels import fit_long_side

    ds = _testdata("RG1_UNCR.dcm")
    reduced = render_display(ds, max_long_side=512)
    reference = fit_long_side(render_display(ds).pixels, 512)
    assert reduced.pixels.shape == reference.shape == (512, 482)
    diff = np.abs(reduced.pixels.astype(int) - reference)
    assert diff.max() <= 1  # window 15000/30000 is linear over the image's range: only rounding differs


def test_htj2k_is_decoded_at_a_reduced_level(tmp_path: Path) -> None:
    if (reason := encoder_missing(HTJ2KLossless)) is not None:
        pytest.skip(reason)
    ds = encoded(make_cr_dataset(rows=1200, cols=1100, bits_stored=12, window=(2048, 4096)), HTJ2KLossless,
                 tmp_path)
    reduced = render_display(ds, max_long_side=512, min_shape=MODEL_SHAPE)
    full = render_display(ds, max_long_side=512, min_shape=MODEL_SHAPE, reduced_decode=False)
    assert reduced.decode.startswith("JPEG 2000 resolution level 1 of")
    assert reduced.pixels.shape == full.pixels.shape == (512, 469)  # level 1 is 600x550, then area-reduced
    diff = np.abs(reduced.pixels.astype(int) - full.pixels)
    assert diff.mean() < 1.5


def test_a_codestream_that_disagrees_with_the_header_is_decoded_in_full(tmp_path: Path) -> None:
    ds = encoded(make_cr_dataset(rows=1200, cols=1100, bits_stored=12, window=(2048, 4096)), JPEG2000Lossless,
                 tmp_path)
    assert render_display(ds, max_long_side=512, min_shape=MODEL_SHAPE).decode.startswith("JPEG 2000 resolution")
    ds.PixelRepresentation = 1  # the codestream says unsigned: pydicom knows the corrections, we decline
    assert render_display(ds, max_long_side=512, min_shape=MODEL_SHAPE).decode == "full"


def test_without_openjpeg_the_full_decode_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = encoded(make_cr_dataset(rows=1200, cols=1100, bits_stored=12, window=(2048, 4096)), JPEG2000Lossless,
                 tmp_path)
    monkeypatch.setattr(j2k, "_available", False)
    display = render_display(ds, max_long_side=512, min_shape=MODEL_SHAPE)
    assert display.decode == "full" and display.pixels.shape == (512, 469)


def test_a_broken_codestream_falls_back_and_the_full_decode_names_the_error(tmp_path: Path) -> None:
    from pydicom.encaps import encapsulate

    from dicom_node.errors import DecodeError

    ds = encoded(make_cr_dataset(rows=1200, cols=1100, bits_stored=12), JPEG2000Lossless, tmp_path)
    codestream = _first_fragment(ds)
    ds.PixelData = encapsulate([codestream[: len(codestream) // 3]])  # the tile data cut short
    with pytest.raises(DecodeError):
        render_display(ds, max_long_side=512, min_shape=MODEL_SHAPE)


@pytest.mark.tf
@pytest.mark.slow
def test_demo_model_predictions_do_not_change_with_the_reduced_decode(tmp_path: Path) -> None:
    """The demo model on RG1 (both J2K syntaxes) and on 24 synthetic cases encoded as JPEG 2000: the same
    class, and probabilities within 0.05, from the reduced decode as from the full one."""
    from explain import explain
    from models.loading import load_demo_model
    from models.synthetic import generate

    model = load_demo_model()
    cases = [_testdata("RG1_J2KR.dcm"), _testdata("RG1_J2KI.dcm")]
    synthetic = generate(24, seed=11, size=1024)  # the demo model's phantoms at a radiograph's size
    for i, image in enumerate(synthetic.images):
        stored = image.astype(np.uint16) * 16  # 12-bit stored values; the window maps them back to 0..255
        ds = make_cr_dataset(rows=1024, cols=1024, bits_stored=12, window=(2048, 4096), pixels=stored,
                             sop_uid=f"1.2.826.0.1.3680043.8.498.{1000 + i}")
        cases.append(encoded(ds, JPEG2000 if i % 2 else JPEG2000Lossless, tmp_path))
    inputs = {}
    for mode in (True, False):
        inputs[mode] = np.stack([
            model_input(render_display(ds, max_long_side=512, min_shape=MODEL_SHAPE, reduced_decode=mode).pixels,
                        model.input_size, model.channels, model.preprocess)
            for ds in cases
        ])
    reduced, full = explain(model, inputs[True]), explain(model, inputs[False])
    np.testing.assert_array_equal(reduced.class_index, full.class_index)
    assert np.abs(reduced.probabilities - full.probabilities).max() < 0.05
    assert len(set(full.class_index.tolist())) == 2  # both classes among the cases: the check can fail
