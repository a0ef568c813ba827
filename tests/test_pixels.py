"""dicom_node.imaging.pixels on real files (pydicom-data) and synthetic radiographs in every transfer syntax."""

from __future__ import annotations

import copy
import re
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_fragments
from pydicom.pixels import apply_modality_lut, apply_windowing, pixel_array
from pydicom.uid import (
    HTJ2K,
    JPEG2000MC,
    UID,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
)

from dicom_node.errors import (
    AllZeroDecodeError,
    ColourImageError,
    DecodeError,
    ImageTooLargeError,
    MissingPixelDataError,
    MultiFrameError,
    PixelError,
)
from dicom_node.imaging import pixels as pixels_module
from dicom_node.imaging.pixels import (
    SUPPORTED_TRANSFER_SYNTAXES,
    DisplayImage,
    check_renderable,
    fit_long_side,
    model_input,
    render_display,
    window_to_display,
)
from dicom_node.peers.synthetic_cr import make_cr_dataset
from tests.support.synthetic_dicom import (
    ENCODERS,
    LOSSY_TRANSFER_SYNTAXES,
    encoded,
    encoder_missing,
    stored_values,
)


def _testdata(name: str) -> Dataset:
    path = get_testdata_file(name)
    if path is None:
        pytest.fail(f"pydicom-data does not provide {name}")
    return pydicom.dcmread(path)


def _regions(image: np.ndarray) -> dict[str, float]:
    """Mean grey of the mediastinum/spine strip and of each lung field (middle half of the rows)."""
    rows, cols = image.shape
    band = image[rows // 4 : 3 * rows // 4]
    return {
        "mediastinum": float(band[:, cols * 45 // 100 : cols * 55 // 100].mean()),
        "right_lung": float(band[:, cols * 20 // 100 : cols * 35 // 100].mean()),
        "left_lung": float(band[:, cols * 65 // 100 : cols * 80 // 100].mean()),
    }


# --------------------------------------------------------------------------------------------- RG1 (real CR)

RG1_FILES = ("RG1_UNCR.dcm", "RG1_UNCI.dcm", "RG1_J2KR.dcm", "RG1_J2KI.dcm")


@pytest.fixture(scope="module")
def rg1() -> dict[str, tuple[Dataset, DisplayImage]]:
    out = {}
    for name in RG1_FILES:
        ds = _testdata(name)
        out[name] = (ds, render_display(ds))
    return out


def test_rg1_header_as_documented(rg1: dict[str, tuple[Dataset, DisplayImage]]) -> None:
    for name, (_, display) in rg1.items():
        assert display.photometric == "MONOCHROME1", name
        assert display.voi == "window 15000/30000 LINEAR", name
        assert display.source_shape == (1955, 1841), name
        assert display.pixels.shape == (1955, 1841) and display.pixels.dtype == np.uint8, name


def test_rg1_lossless_j2k_renders_identically_to_uncompressed(rg1: dict[str, tuple[Dataset, DisplayImage]]) -> None:
    np.testing.assert_array_equal(rg1["RG1_J2KR.dcm"][1].pixels, rg1["RG1_UNCR.dcm"][1].pixels)
    # RG1_UNCI is the lossy J2K image stored uncompressed: it must decode to exactly the same display.
    np.testing.assert_array_equal(rg1["RG1_J2KI.dcm"][1].pixels, rg1["RG1_UNCI.dcm"][1].pixels)


def test_rg1_lossy_j2k_is_close_to_lossless(rg1: dict[str, tuple[Dataset, DisplayImage]]) -> None:
    lossless = rg1["RG1_UNCR.dcm"][1].pixels.astype(np.int16)
    lossy = rg1["RG1_J2KI.dcm"][1].pixels.astype(np.int16)
    diff = np.abs(lossy - lossless)
    assert diff.mean() < 1.0
    assert diff.max() <= 8


def test_rg1_chest_looks_like_a_chest(rg1: dict[str, tuple[Dataset, DisplayImage]]) -> None:
    """Lungs dark, mediastinum and spine bright: only true once MONOCHROME1 has been inverted."""
    for name, (_, display) in rg1.items():
        r = _regions(display.pixels)
        assert r["mediastinum"] > r["right_lung"] + 30, (name, r)
        assert r["mediastinum"] > r["left_lung"] + 30, (name, r)


def test_rg1_monochrome1_inverted_after_window(rg1: dict[str, tuple[Dataset, DisplayImage]]) -> None:
    ds, display = rg1["RG1_UNCR.dcm"]
    stored = pixel_array(ds)
    # Independent oracle: pydicom's windowing (PS3.3 C.11.2.1.2) into the 15-bit output range, scaled to 0..255.
    windowed = apply_windowing(stored.astype(np.float64), ds) * (255 / (2**ds.BitsStored - 1))
    not_inverted = np.rint(windowed)
    expected = 255 - not_inverted
    diff = np.abs(display.pixels.astype(np.float64) - expected)
    assert diff.max() <= 1
    assert np.abs(display.pixels - not_inverted).mean() > 50


# ------------------------------------------------------------------------- every supported transfer syntax

EXPECTED_SYNTAXES = {
    "1.2.840.10008.1.2",  # implicit VR little endian
    "1.2.840.10008.1.2.1",  # explicit VR little endian
    "1.2.840.10008.1.2.1.99",  # deflated explicit VR little endian
    "1.2.840.10008.1.2.2",  # explicit VR big endian
    "1.2.840.10008.1.2.4.50",  # JPEG baseline
    "1.2.840.10008.1.2.4.51",  # JPEG extended
    "1.2.840.10008.1.2.4.57",  # JPEG lossless process 14
    "1.2.840.10008.1.2.4.70",  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.201",  # HTJ2K lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K lossless RPCL
    "1.2.840.10008.1.2.4.203",  # HTJ2K
    "1.2.840.10008.1.2.5",  # RLE lossless
}


def test_supported_transfer_syntaxes_are_the_agreed_list() -> None:
    assert len(SUPPORTED_TRANSFER_SYNTAXES) == len(set(SUPPORTED_TRANSFER_SYNTAXES))
    assert set(SUPPORTED_TRANSFER_SYNTAXES) == EXPECTED_SYNTAXES
    assert all(isinstance(uid, UID) for uid in SUPPORTED_TRANSFER_SYNTAXES)
    # Uncompressed first: the SCP offers them in this order.
    assert SUPPORTED_TRANSFER_SYNTAXES[0] == ExplicitVRLittleEndian
    assert set(ENCODERS) == EXPECTED_SYNTAXES


@pytest.fixture(scope="module")
def synthetic_sources() -> dict[str, tuple[Dataset, np.ndarray, np.ndarray]]:
    """12-bit and 8-bit (JPEG baseline) synthetic CRs with their stored values and reference rendering."""
    out = {}
    for key, ds in (
        ("12", make_cr_dataset(window=(2000, 3500), seed=1)),
        ("8", make_cr_dataset(bits_stored=8, window=(120, 220), seed=2)),
    ):
        out[key] = (ds, stored_values(ds), render_display(ds).pixels)
    return out


@pytest.mark.parametrize("transfer_syntax", SUPPORTED_TRANSFER_SYNTAXES, ids=lambda uid: uid.name)
def test_every_transfer_syntax_renders_like_the_source(
    transfer_syntax: UID,
    synthetic_sources: dict[str, tuple[Dataset, np.ndarray, np.ndarray]],
    tmp_path: Path,
) -> None:
    if (reason := encoder_missing(transfer_syntax)) is not None:
        pytest.skip(reason)
    source, stored, reference = synthetic_sources["8" if transfer_syntax == JPEGBaseline8Bit else "12"]
    received = encoded(source, transfer_syntax, tmp_path)
    assert received.file_meta.TransferSyntaxUID == transfer_syntax
    display = render_display(received)
    assert display.source_shape == reference.shape
    diff = np.abs(display.pixels.astype(np.int16) - reference.astype(np.int16))
    if transfer_syntax in LOSSY_TRANSFER_SYNTAXES:
        assert diff.mean() < 2.5
        assert diff.max() <= 20
    else:
        np.testing.assert_array_equal(pixel_array(received), stored)
        np.testing.assert_array_equal(display.pixels, reference)


def _codestream(ds: Dataset) -> bytes:
    return list(generate_fragments(ds.PixelData))[1]


def _main_header(codestream: bytes) -> bytes:
    """JPEG 2000 main header: from SOC up to the first SOT (ISO 15444-1 A.4.2)."""
    return codestream[: codestream.index(b"\xff\x90")]


@pytest.mark.parametrize("transfer_syntax", (HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K), ids=lambda uid: uid.name)
def test_htj2k_fixtures_really_use_the_ht_block_coder(
    transfer_syntax: UID, synthetic_sources: dict[str, tuple[Dataset, np.ndarray, np.ndarray]], tmp_path: Path
) -> None:
    if (reason := encoder_missing(transfer_syntax)) is not None:
        pytest.skip(reason)
    header = _main_header(_codestream(encoded(synthetic_sources["12"][0], transfer_syntax, tmp_path)))
    assert b"\xff\x50" in header  # CAP segment: Part 15 capabilities, present in every HTJ2K codestream
    if transfer_syntax == HTJ2KLosslessRPCL:
        cod = header.index(b"\xff\x52")
        assert header[cod + 5] == 2  # progression order RPCL (ISO 15444-1 Table A.16)
        assert b"\xff\x55" in header  # TLM, required by PS3.5 A.4.11 for this syntax


# Real files whose uncompressed twin is in pydicom-data: decoded by a different path, rendered identically.
REAL_PAIRS = (
    ("MR_small_bigendian.dcm", "MR_small.dcm"),
    ("MR_small_implicit.dcm", "MR_small.dcm"),
    ("MR_small_RLE.dcm", "MR_small.dcm"),
    ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),
    ("MR2_J2KR.dcm", "MR2_UNCR.dcm"),
    ("MR2_J2KI.dcm", "MR2_UNCI.dcm"),
    ("RG3_J2KR.dcm", "RG3_UNCR.dcm"),
    ("RG3_J2KI.dcm", "RG3_UNCI.dcm"),
)


@pytest.mark.parametrize(("encoded_name", "reference_name"), REAL_PAIRS)
def test_real_files_render_like_their_uncompressed_twin(encoded_name: str, reference_name: str) -> None:
    display = render_display(_testdata(encoded_name))
    reference = render_display(_testdata(reference_name))
    assert display.voi == reference.voi
    np.testing.assert_array_equal(display.pixels, reference.pixels)
    assert display.pixels.std() > 10  # a real image, not a flat field


# Real files without a twin: decompress with dcmtk (IJG / CharLS / zlib, not pydicom's plugins) and compare.
DCMTK_DECOMPRESS = (
    ("JPEG-LL.dcm", ["dcmdjpeg"], 0),
    ("JPGLosslessP14SV1_1s_1f_8b.dcm", ["dcmdjpeg"], 0),
    ("JPGExtended.dcm", ["dcmdjpeg"], 1),  # lossy: two IDCT implementations may round differently
    ("JPEGLSNearLossless_16.dcm", ["dcmdjpls"], 0),
    ("JPEGLSNearLossless_08.dcm", ["dcmdjpls"], 0),
    ("image_dfl.dcm", ["dcmconv", "+te"], 0),
)


@pytest.mark.parametrize(("name", "command", "tolerance"), DCMTK_DECOMPRESS, ids=[c[0] for c in DCMTK_DECOMPRESS])
def test_real_files_render_like_dcmtk_decompressed(
    name: str, command: list[str], tolerance: int, tmp_path: Path
) -> None:
    if shutil.which(command[0]) is None:
        pytest.skip(f"dcmtk's {command[0]} is not installed (Debian package dcmtk)")
    source = get_testdata_file(name)
    out = tmp_path / "plain.dcm"
    subprocess.run([*command, source, str(out)], check=True, capture_output=True, timeout=60)
    plain = pydicom.dcmread(out)
    assert plain.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    received = pydicom.dcmread(source)
    stored_diff = np.abs(pixel_array(received).astype(np.int32) - pixel_array(plain).astype(np.int32))
    assert stored_diff.max() <= tolerance
    display = render_display(received)
    reference = render_display(plain)
    assert display.pixels.std() > 10  # an image, not a flat field
    if tolerance == 0:
        np.testing.assert_array_equal(display.pixels, reference.pixels)
    else:  # this image uses 265 of 4096 values, so one stored unit is about one grey level after the stretch
        diff = np.abs(display.pixels.astype(np.int16) - reference.pixels.astype(np.int16))
        assert diff.mean() < 0.1 and diff.max() <= 4


# ------------------------------------------------------------------------------------- MONOCHROME1 / 2


@pytest.mark.parametrize("window", [(1500, 2500), None], ids=["window", "no-window"])
def test_monochrome1_and_its_monochrome2_mirror_render_alike(window: tuple[int, int] | None) -> None:
    max_value = 2**12 - 1
    m2 = make_cr_dataset(photometric="MONOCHROME2", window=window, seed=3)
    m1_window = None if window is None else (max_value - window[0], window[1])
    m1 = make_cr_dataset(photometric="MONOCHROME1", window=m1_window, seed=3)
    np.testing.assert_array_equal(stored_values(m1), max_value - stored_values(m2).astype(np.int32))
    shown_m1, shown_m2 = render_display(m1), render_display(m2)
    assert np.abs(shown_m1.pixels.astype(np.int16) - shown_m2.pixels.astype(np.int16)).max() <= 1
    for shown in (shown_m1, shown_m2):
        r = _regions(shown.pixels)
        assert r["mediastinum"] > max(r["right_lung"], r["left_lung"]) + 60, r


# ----------------------------------------------------------------------------------- Modality LUT and VOI


def _tiny(values: list[list[int]], **kwargs: object) -> Dataset:
    return make_cr_dataset(pixels=np.array(values, dtype=np.uint16), **kwargs)  # type: ignore[arg-type]


def test_linear_window_maps_known_values() -> None:
    # c=100, w=101: x <= 49.5 -> 0, x > 149.5 -> 255, else ((x - 99.5) / 100 + 0.5) * 255 (PS3.3 C.11.2.1.2.1).
    ds = _tiny([[49, 50, 100], [149, 150, 4000]], window=(100, 101))
    display = render_display(ds)
    np.testing.assert_array_equal(display.pixels, [[0, 1, 129], [254, 255, 255]])
    assert display.voi == "window 100/101 LINEAR"


def test_linear_exact_window_maps_known_values() -> None:
    ds = _tiny([[40, 50, 75, 100], [125, 150, 160, 0]], window=(100, 100), voi_lut_function="LINEAR_EXACT")
    display = render_display(ds)
    np.testing.assert_array_equal(display.pixels, [[0, 0, 64, 128], [191, 255, 255, 0]])
    assert display.voi == "window 100/100 LINEAR_EXACT"


def test_sigmoid_window_maps_known_values() -> None:
    # y = 255 / (1 + exp(-4 (x - c) / w)) (PS3.3 C.11.2.1.3.1)
    ds = _tiny([[0, 75, 100], [125, 200, 1000]], window=(100, 100), voi_lut_function="SIGMOID")
    display = render_display(ds)
    np.testing.assert_array_equal(display.pixels, [[5, 69, 128], [186, 250, 255]])
    assert display.voi == "window 100/100 SIGMOID"


def test_window_on_monochrome1_is_inverted_after_windowing() -> None:
    ds = _tiny([[49, 50, 100], [149, 150, 4000]], window=(100, 101), photometric="MONOCHROME1")
    np.testing.assert_array_equal(render_display(ds).pixels, [[255, 254, 126], [1, 0, 0]])


def test_first_of_several_windows_is_used() -> None:
    values = [[49, 50, 100], [149, 150, 4000]]
    several = render_display(_tiny(values, window=[(100, 101), (3000, 10)]))
    np.testing.assert_array_equal(several.pixels, [[0, 1, 129], [254, 255, 255]])
    assert several.voi == "window 100/101 LINEAR (1 of 2)"


def test_rescale_slope_intercept_applied_before_window() -> None:
    # modality value = 2 * stored - 100 (PS3.3 C.11.1.1.2) -> 48, 50, 100, 124, 150 under the c=100, w=101 window
    ds = _tiny([[74, 75, 100], [112, 125, 0]], window=(100, 101), rescale=(2, -100))
    np.testing.assert_array_equal(render_display(ds).pixels, [[0, 1, 129], [190, 255, 0]])


def test_dx_for_presentation_renders_like_cr() -> None:
    cr = make_cr_dataset(modality="CR", window=(1800, 3000), seed=4)
    dx = make_cr_dataset(modality="DX", window=(1800, 3000), seed=4)
    assert dx.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1.1" and dx.RescaleSlope == 1
    np.testing.assert_array_equal(render_display(dx).pixels, render_display(cr).pixels)


def test_modality_lut_sequence_from_real_file() -> None:
    ds = _testdata("mlut_18.dcm")
    assert "ModalityLUTSequence" in ds and "VOILUTSequence" not in ds and "WindowCenter" not in ds
    item = ds.ModalityLUTSequence[0]
    entries, first, _ = item.LUTDescriptor
    lut = np.asarray(item.LUTData)
    stored = pixel_array(ds).astype(np.int64)
    modality = lut[np.clip(stored - first, 0, (entries or 65536) - 1)].astype(np.float64)
    low, high = np.percentile(modality, (0.5, 99.5))
    expected = np.rint(np.clip((modality - low) * 255 / (high - low), 0, 255))
    display = render_display(ds)
    assert display.voi == "min-max p0.5-p99.5 (no VOI in header)"
    np.testing.assert_array_equal(display.pixels, expected)
    # and the LUT mattered: rescaling the raw stored values instead gives another image
    assert not np.array_equal(np.asarray(apply_modality_lut(stored, ds)), stored)


def test_voi_lut_sequence_from_real_file() -> None:
    ds = _testdata("vlut_04.dcm")
    item = ds.VOILUTSequence[0]
    entries, first, bits = item.LUTDescriptor
    lut = np.asarray(item.LUTData, dtype=np.float64)
    stored = pixel_array(ds).astype(np.int64)
    expected = np.rint(lut[np.clip(stored - first, 0, (entries or 65536) - 1)] * 255 / (2**bits - 1))
    display = render_display(ds)
    assert display.voi.startswith(f"VOI LUT 1/{len(ds.VOILUTSequence)}")
    np.testing.assert_array_equal(display.pixels, expected)


def test_voi_lut_sequence_clamps_outside_values_and_scales_by_its_bit_depth() -> None:
    values = [[5, 10, 11, 13], [15, 200, 4095, 12]]
    eight_bit = render_display(_tiny(values, voi_lut=(10, 8, [0, 50, 100, 150, 200, 255])))
    np.testing.assert_array_equal(eight_bit.pixels, [[0, 0, 50, 150], [255, 255, 255, 100]])
    assert eight_bit.voi == "VOI LUT 1/1 (LUT1)"
    twelve_bit = render_display(_tiny(values, voi_lut=(10, 12, [0, 1024, 4095, 4095, 4095, 4095])))
    np.testing.assert_array_equal(twelve_bit.pixels, [[0, 0, 64, 255], [255, 255, 255, 255]])


def test_voi_lut_preferred_over_window_and_first_lut_used() -> None:
    values = [[5, 10, 11, 13], [15, 200, 4095, 12]]
    luts = [(10, 8, [0, 50, 100, 150, 200, 255]), (0, 8, [255] * 16)]
    display = render_display(_tiny(values, voi_lut=luts, window=(2000, 100)))
    np.testing.assert_array_equal(display.pixels, [[0, 0, 50, 150], [255, 255, 255, 100]])
    assert display.voi == "VOI LUT 1/2 (LUT1)"


def test_no_voi_uses_percentiles_of_modality_values() -> None:
    rng = np.random.default_rng(5)
    values = rng.integers(1000, 3000, size=(64, 64))
    values[0, :5] = 0  # a few outliers (collimator edge, dead pixels) must not compress the contrast
    values[1, :5] = 4095
    display = render_display(make_cr_dataset(pixels=values.astype(np.uint16)))
    assert display.voi == "min-max p0.5-p99.5 (no VOI in header)"
    low, high = np.percentile(values.astype(np.float64), (0.5, 99.5))
    expected = np.rint(np.clip((values - low) * 255 / (high - low), 0, 255))
    np.testing.assert_array_equal(display.pixels, expected)


def test_window_to_display_rejects_invalid_width() -> None:
    with pytest.raises(ValueError, match="LINEAR"):
        window_to_display(np.zeros((2, 2)), 100, 0.5)
    with pytest.raises(ValueError, match="SIGMOID"):
        window_to_display(np.zeros((2, 2)), 100, 0, "SIGMOID")


def test_invalid_window_in_header_falls_back_to_percentiles() -> None:
    display = render_display(make_cr_dataset(window=(2000, 0.5), seed=6))
    assert display.voi == "min-max p0.5-p99.5 (invalid window 2000/0.5 LINEAR)"
    assert display.pixels.min() == 0 and display.pixels.max() == 255


def test_render_does_not_mutate_the_dataset_and_returns_read_only_pixels() -> None:
    ds = make_cr_dataset(window=(2000, 3000), rescale=(1.5, -10), photometric="MONOCHROME1")
    before = copy.deepcopy(ds)
    display = render_display(ds)
    assert ds == before and ds.file_meta == before.file_meta
    assert ds.PixelData == before.PixelData
    assert getattr(ds, "_pixel_array", None) is None  # nothing cached on the dataset either
    with pytest.raises(ValueError):
        display.pixels[0, 0] = 1


# ----------------------------------------------------------------------------------------- named errors


def test_colour_images_rejected() -> None:
    with pytest.raises(ColourImageError, match="RGB"):
        render_display(_testdata("SC_rgb.dcm"))
    with pytest.raises(ColourImageError, match="PALETTE COLOR"):
        render_display(_testdata("OBXXXX1A.dcm"))


@pytest.mark.parametrize(
    "name", ["emri_small_big_endian.dcm", "emri_small_RLE.dcm", "emri_small_jpeg_ls_lossless.dcm", "liver.dcm"]
)
def test_multi_frame_rejected_before_decoding(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pixels_module, "pixel_array", _must_not_decode)
    with pytest.raises(MultiFrameError, match="frames"):
        render_display(_testdata(name))


def test_synthetic_two_frames_rejected() -> None:
    ds = make_cr_dataset(rows=16, cols=16)
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2
    with pytest.raises(MultiFrameError):
        render_display(ds)


def test_missing_or_empty_pixel_data_rejected() -> None:
    ds = make_cr_dataset(rows=16, cols=16)
    del ds.PixelData
    with pytest.raises(MissingPixelDataError):
        render_display(ds)
    ds = make_cr_dataset(rows=16, cols=16)
    ds.PixelData = b""
    with pytest.raises(MissingPixelDataError):
        check_renderable(ds, max_pixels=1000)


def test_all_zero_decode_rejected(tmp_path: Path) -> None:
    zeros = make_cr_dataset(pixels=np.zeros((64, 64), dtype=np.uint16))
    with pytest.raises(AllZeroDecodeError):
        render_display(zeros)
    if (reason := encoder_missing(JPEG2000Lossless)) is not None:
        pytest.skip(reason)
    with pytest.raises(AllZeroDecodeError, match="JPEG 2000"):
        render_display(encoded(zeros, JPEG2000Lossless, tmp_path))


def _must_not_decode(*args: object, **kwargs: object) -> np.ndarray:
    raise AssertionError("pixel data was decoded")


def test_too_large_header_rejected_without_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    ds = make_cr_dataset(rows=8, cols=8)
    ds.Rows = ds.Columns = 65535
    monkeypatch.setattr(pixels_module, "pixel_array", _must_not_decode)
    with pytest.raises(ImageTooLargeError, match="65535x65535"):
        render_display(ds)


def test_max_pixels_boundary() -> None:
    ds = make_cr_dataset(rows=32, cols=30)
    check_renderable(ds, max_pixels=32 * 30)
    with pytest.raises(ImageTooLargeError):
        check_renderable(ds, max_pixels=32 * 30 - 1)
    ds.Rows = 0
    with pytest.raises(ImageTooLargeError, match="empty"):
        check_renderable(ds, max_pixels=10_000)


def _with_j2k_header(tmp_path: Path, rows: int, cols: int) -> Dataset:
    if (reason := encoder_missing(JPEG2000Lossless)) is not None:
        pytest.skip(reason)
    return encoded(make_cr_dataset(rows=rows, cols=cols), JPEG2000Lossless, tmp_path)


def test_codestream_larger_than_header_rejected_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = _with_j2k_header(tmp_path, 256, 240)
    ds.Rows, ds.Columns = 16, 16  # a small header over a big codestream
    monkeypatch.setattr(pixels_module, "pixel_array", _must_not_decode)
    with pytest.raises(ImageTooLargeError, match="codestream"):
        render_display(ds, max_pixels=10_000)
    with pytest.raises(DecodeError, match="codestream is 256x240"):
        render_display(ds)


def test_jpeg_codestream_size_checked(tmp_path: Path, synthetic_sources: dict) -> None:
    if (reason := encoder_missing(JPEGBaseline8Bit)) is not None:
        pytest.skip(reason)
    ds = encoded(synthetic_sources["8"][0], JPEGBaseline8Bit, tmp_path)
    ds.Columns = 100
    with pytest.raises(DecodeError, match="codestream is 512x480"):
        check_renderable(ds, max_pixels=10**7)


def test_unsupported_or_missing_transfer_syntax_named(tmp_path: Path) -> None:
    ds = make_cr_dataset(rows=16, cols=16)
    ds.file_meta.TransferSyntaxUID = JPEG2000MC
    with pytest.raises(DecodeError, match=re.escape(str(JPEG2000MC))):
        render_display(ds)
    del ds.file_meta.TransferSyntaxUID
    with pytest.raises(DecodeError, match="Transfer Syntax UID"):
        render_display(ds)


def test_codec_failure_becomes_decode_error() -> None:
    # A real 12-bit JPEG that pylibjpeg-libjpeg refuses ("misplaced marker segment") and Pillow cannot read.
    with pytest.raises(DecodeError, match="JPEG Extended"):
        render_display(_testdata("JPEG-lossy.dcm"))


def test_corrupt_j2k_codestream_becomes_decode_error(tmp_path: Path) -> None:
    ds = _with_j2k_header(tmp_path, 64, 64)
    codestream = _codestream(ds)
    header = _main_header(codestream)
    ds.PixelData = encapsulate([header + b"\xff\x90" + b"\x00" * 64])
    with pytest.raises(DecodeError, match="JPEG 2000"):
        render_display(ds)


def test_truncated_native_pixel_data_becomes_decode_error() -> None:
    ds = make_cr_dataset(rows=64, cols=64)
    ds.PixelData = ds.PixelData[:1000]
    with pytest.raises(DecodeError):
        render_display(ds)


def test_all_errors_are_pixel_errors() -> None:
    for error in (
        MissingPixelDataError,
        ColourImageError,
        MultiFrameError,
        AllZeroDecodeError,
        ImageTooLargeError,
        DecodeError,
    ):
        assert issubclass(error, PixelError)


# ----------------------------------------------------------------------------- model input and resizing


@pytest.fixture
def display() -> np.ndarray:
    image = np.zeros((400, 300), dtype=np.uint8)
    image[:, :150] = 255  # left half white: shows the whole image is kept, not cropped
    return image


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize(("preprocess", "low", "high"), [("unit", 0.0, 1.0), ("symmetric", -1.0, 1.0)])
def test_model_input_shape_range_and_layout(
    display: np.ndarray, channels: int, preprocess: str, low: float, high: float
) -> None:
    before = display.copy()
    x = model_input(display, (128, 96), channels, preprocess)
    np.testing.assert_array_equal(display, before)
    assert x.shape == (128, 96, channels) and x.dtype == np.float32
    assert x.min() == pytest.approx(low) and x.max() == pytest.approx(high)
    np.testing.assert_allclose(x[:, :47], high)  # whole width kept: left half still white
    np.testing.assert_allclose(x[:, 49:], low)
    for c in range(1, channels):
        np.testing.assert_array_equal(x[..., c], x[..., 0])


def test_model_input_exact_values_and_read_only_input() -> None:
    image = np.full((300, 200), 51, dtype=np.uint8)
    image.setflags(write=False)
    np.testing.assert_allclose(model_input(image, (64, 64), 1, "unit"), 51 / 255, rtol=1e-6)
    np.testing.assert_allclose(model_input(image, (64, 64), 3, "symmetric"), 51 / 127.5 - 1, rtol=1e-6)


def test_model_input_rejects_bad_arguments(display: np.ndarray) -> None:
    with pytest.raises(ValueError, match="channels"):
        model_input(display, (64, 64), 2, "unit")
    with pytest.raises(ValueError, match="preprocess"):
        model_input(display, (64, 64), 1, "imagenet")
    with pytest.raises(ValueError, match="uint8"):
        model_input(display.astype(np.float32), (64, 64), 1, "unit")


def test_model_input_from_rendered_rg1(rg1: dict[str, tuple[Dataset, DisplayImage]]) -> None:
    x = model_input(rg1["RG1_UNCR.dcm"][1].pixels, (256, 256), 3, "symmetric")
    assert x.shape == (256, 256, 3) and -1.0 <= x.min() < x.max() <= 1.0
    r = _regions(x[..., 0])
    assert r["mediastinum"] > max(r["left_lung"], r["right_lung"])


@pytest.mark.parametrize(
    ("shape", "limit", "expected"),
    [
        ((3000, 2000), 2048, (2048, 1365)),
        ((2000, 3000), 2048, (1365, 2048)),
        ((1955, 1841), 1024, (1024, 964)),
        ((1000, 800), 2048, (1000, 800)),
        ((2048, 10), 2048, (2048, 10)),
    ],
)
def test_fit_long_side(shape: tuple[int, int], limit: int, expected: tuple[int, int]) -> None:
    image = np.full(shape, 77, dtype=np.uint8)
    before = image.copy()
    fitted = fit_long_side(image, limit)
    assert fitted.shape == expected and fitted.dtype == np.uint8
    assert fitted is not image
    np.testing.assert_array_equal(fitted, 77)
    np.testing.assert_array_equal(image, before)


# ------------------------------------------------------------------------------------ synthetic helper


@pytest.mark.parametrize("modality", ["CR", "DX"])
def test_synthetic_dataset_round_trips_as_a_valid_file(modality: str, tmp_path: Path) -> None:
    ds = make_cr_dataset(modality=modality, window=(2000, 3000), patient_id="PID-9", accession="ACC-9")
    back = encoded(ds, ExplicitVRLittleEndian, tmp_path)
    assert back.SOPClassUID == ds.file_meta.MediaStorageSOPClassUID == back.file_meta.MediaStorageSOPClassUID
    assert back.SOPInstanceUID == back.file_meta.MediaStorageSOPInstanceUID
    assert (back.PatientID, back.AccessionNumber, back.Modality) == ("PID-9", "ACC-9", modality)
    assert (back.Rows, back.Columns, back.BitsStored) == (512, 480, 12)
    stored = pixel_array(back)
    np.testing.assert_array_equal(stored, stored_values(ds))
    assert 0 < stored.min() < stored.max() <= 4095


def test_synthetic_j2k_header_parsed(tmp_path: Path) -> None:
    """The SIZ parse used by check_renderable agrees with the encoder on a real codestream."""
    ds = _with_j2k_header(tmp_path, 100, 60)
    codestream = _codestream(ds)
    start = codestream.index(b"\xff\x4f\xff\x51")
    x_size, y_size = struct.unpack_from(">II", codestream, start + 8)
    assert (y_size, x_size) == (100, 60)
    check_renderable(ds, max_pixels=6000)
    with pytest.raises(ImageTooLargeError):
        check_renderable(ds, max_pixels=5999)


def test_htj2k_lossy_listed_as_lossy() -> None:
    assert HTJ2K in LOSSY_TRANSFER_SYNTAXES and HTJ2KLossless not in LOSSY_TRANSFER_SYNTAXES
