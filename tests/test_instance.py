"""dicom_node.imaging.instance: headers read up to the Pixel Data, pixels as views; and the pixel paths that use them
(native pixels in place, windows as lookup tables) against pydicom's own decode of the whole file."""

from __future__ import annotations

import io
import pickle
import struct
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.pixels import pixel_array
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicom_node.errors import DecodeError, MissingPixelDataError
from dicom_node.imaging import pixels as pixels_module
from dicom_node.imaging.instance import read_data_set, read_file
from dicom_node.imaging.pixels import render_display
from dicom_node.peers.synthetic_cr import make_cr_dataset
from dicom_node.storage.spool import Spool
from tests.support.outputs import part10_bytes

# Real files: CR uncompressed (explicit and implicit VR), JPEG 2000 lossless and lossy, big endian, deflated,
# JPEG extended and lossless, RLE, JPEG-LS, signed CT.
FILES = ("RG1_UNCR.dcm", "RG1_UNCI.dcm", "RG1_J2KR.dcm", "RG1_J2KI.dcm", "MR_small_bigendian.dcm", "image_dfl.dcm",
         "JPGExtended.dcm", "JPEG-LL.dcm", "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "CT_small.dcm")


def _path(name: str) -> Path:
    path = get_testdata_file(name)
    if path is None:
        pytest.fail(f"pydicom-data does not provide {name}")
    return Path(path)


@pytest.mark.parametrize("name", FILES)
def test_read_file_gives_the_header_and_the_pixel_data_in_place(name: str) -> None:
    data = _path(name).read_bytes()
    full = pydicom.dcmread(io.BytesIO(data))
    instance = read_file(memoryview(data))
    assert "PixelData" not in instance.header
    assert instance.pixel_data is not None and bytes(instance.pixel_data) == full.PixelData
    assert instance.header.file_meta.TransferSyntaxUID == full.file_meta.TransferSyntaxUID
    assert [e.tag for e in instance.header] == [e.tag for e in full if e.tag < 0x7FE00010]
    if full.file_meta.TransferSyntaxUID != "1.2.840.10008.1.2.1.99":  # deflated: a view of the inflated copy
        assert instance.pixel_data.obj is data  # a view of the caller's buffer, not a copy
    # The header holds no reference to the buffer: it pickles (a stage process sends it on) and lets a mapping go.
    assert pickle.loads(pickle.dumps(instance.header)) == instance.header


@pytest.mark.parametrize("name", FILES)
def test_rendering_from_header_and_view_equals_rendering_the_whole_dataset(name: str) -> None:
    data = _path(name).read_bytes()
    full = pydicom.dcmread(io.BytesIO(data))
    if str(full.get("PhotometricInterpretation", "")).strip() not in ("MONOCHROME1", "MONOCHROME2"):
        pytest.skip("colour: not rendered")
    instance = read_file(memoryview(data))
    for kwargs in ({}, {"max_long_side": 100, "min_shape": (32, 32)}):
        expected = render_display(full, **kwargs)  # type: ignore[arg-type]
        got = render_display(instance.header, pixel_data=instance.pixel_data, **kwargs)  # type: ignore[arg-type]
        np.testing.assert_array_equal(got.pixels, expected.pixels)
        assert (got.voi, got.decode) == (expected.voi, expected.decode)


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_read_data_set_reads_a_c_store_data_set_up_to_its_pixels(syntax: str) -> None:
    ds = make_cr_dataset(rows=64, cols=48, seed=3)
    buffer = DicomBytesIO()
    buffer.is_implicit_VR, buffer.is_little_endian = syntax == ImplicitVRLittleEndian, True
    write_dataset(buffer, ds)
    encoded = memoryview(buffer.getvalue())
    instance = read_data_set(encoded, implicit_vr=syntax == ImplicitVRLittleEndian, little_endian=True)
    assert instance.header.SOPInstanceUID == ds.SOPInstanceUID
    assert "PixelData" not in instance.header
    assert instance.pixel_data is not None and bytes(instance.pixel_data) == ds.PixelData


def test_a_pixel_data_element_header_cut_short_is_no_pixel_data() -> None:
    data = part10_bytes(make_cr_dataset(rows=32, cols=32))
    cut = data[: data.index(struct.pack("<HH", 0x7FE0, 0x0010)) + 5]
    instance = read_file(cut)
    assert instance.pixel_data is None
    with pytest.raises(MissingPixelDataError):
        render_display(instance.header, pixel_data=instance.pixel_data)


def test_pixel_data_cut_short_fails_by_name_as_pydicom_would() -> None:
    data = part10_bytes(make_cr_dataset(rows=32, cols=32))[:-100]
    instance = read_file(data)
    assert instance.pixel_data is not None and len(instance.pixel_data) == 32 * 32 * 2 - 100
    with pytest.raises(DecodeError, match="less than expected"):
        render_display(instance.header, pixel_data=instance.pixel_data)


def test_bits_above_bits_stored_are_masked_as_pydicom_does() -> None:
    ds = make_cr_dataset(rows=40, cols=30, bits_stored=12, window=(2000, 3000), seed=5)
    noisy = np.frombuffer(ds.PixelData, dtype="<u2").reshape(40, 30) | np.uint16(0xA000)  # overlay bits set
    ds.PixelData = noisy.tobytes()
    reference = pixel_array(ds)
    assert int(reference.max()) < 4096  # pydicom masks them
    stored = pixels_module._native_stored(ds, memoryview(ds.PixelData))
    assert stored is not None
    np.testing.assert_array_equal(stored, reference)


def test_native_pixels_are_viewed_not_copied() -> None:
    ds = make_cr_dataset(rows=40, cols=30, bits_stored=16)
    view = memoryview(ds.PixelData)
    stored = pixels_module._native_stored(ds, view)
    assert stored is not None and not stored.flags.owndata and np.shares_memory(stored, np.frombuffer(view, np.uint8))


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
@pytest.mark.parametrize("dtype", [np.uint16, np.int16, np.uint8])
@pytest.mark.parametrize("rescale", [None, (2.0, -1024.0), (-1.0, 100.0)])
def test_window_as_a_lookup_table_equals_the_window_on_every_pixel(
    function: str, dtype: type, rescale: tuple[float, float] | None
) -> None:
    rng = np.random.default_rng(7)
    info = np.iinfo(dtype)
    stored = rng.integers(max(info.min, -3000), min(info.max, 5000), size=(37, 41), endpoint=True).astype(dtype)
    ds = Dataset()
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = 700, 1500, function
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    expected = pixels_module._apply_voi(pixels_module._modality_values(stored, ds), ds)
    got = pixels_module._stored_to_display(stored, ds)
    np.testing.assert_array_equal(got[0], expected[0])
    assert got[1] == expected[1]


def test_an_invalid_window_still_falls_back_to_percentiles_of_the_image() -> None:
    stored = np.random.default_rng(1).integers(0, 4000, size=(30, 30)).astype(np.uint16)
    ds = Dataset()
    ds.WindowCenter, ds.WindowWidth = 2000, 0.5  # LINEAR needs a width of at least 1
    expected = pixels_module._apply_voi(pixels_module._modality_values(stored, ds), ds)
    got = pixels_module._stored_to_display(stored, ds)
    np.testing.assert_array_equal(got[0], expected[0])
    assert got[1].startswith("min-max") and got[1] == expected[1]


def test_spool_maps_an_instance_and_drops_it_from_the_page_cache(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    data = part10_bytes(make_cr_dataset(rows=32, cols=32))
    key = spool.write([data[:200], memoryview(data)[200:]])  # written from parts, keyed by the whole
    assert key == Spool.key_for(data) and spool.read(key) == data
    with spool.mapped(key) as view:
        instance = read_file(view)
        assert bytes(view) == data
        kept = instance.pixel_data  # a slice held past the block: the mapping stays until it goes
    assert kept is not None and bytes(kept) == pydicom.dcmread(io.BytesIO(data)).PixelData
    del instance, kept
    spool.evict(key)
    assert spool.read(key) == data  # evicted from memory, not from disk
