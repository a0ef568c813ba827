"""Render a grayscale radiograph as a viewer shows it, and shape it for the model. Pure functions.

The grayscale pipeline of PS3.3 C.7.6.3 / C.11 (PS3.4 N.2): stored values → Modality LUT (Rescale
Slope/Intercept or Modality LUT Sequence, C.11.1) → VOI LUT (the first VOI LUT Sequence item, else the first
Window Center/Width pair with its VOI LUT Function, C.11.2) → MONOCHROME1 inversion (C.7.6.3.1.2: the minimum
value is displayed white). Every check that can be made from the header runs before any decode, so a hostile
header (a 65535x65535 image with a few bytes of data) fails with a named error instead of a MemoryError.

The Pixel Data value may come apart from the header (``pixel_data=``: a view of a spooled file, see
:mod:`dicom_node.imaging.instance`); it is then read where it lies. Native little-endian pixels are viewed, not
copied, before they are reduced; a window runs as a lookup table over the stored values.
"""

from __future__ import annotations

import logging
import math
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi, get_decoder, pixel_array
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from dicom_node.errors import (
    AllZeroDecodeError,
    ColourImageError,
    DecodeError,
    ImageTooLargeError,
    MissingPixelDataError,
    MultiFrameError,
)
from dicom_node.imaging import j2k

if TYPE_CHECKING:
    from typing_extensions import Buffer

logger = logging.getLogger(__name__)

# What the node can decode, in the order it prefers them for network negotiation: uncompressed first, then
# lossless, then lossy. Each needs pydicom's native decoder or one of its plugins (pylibjpeg-libjpeg,
# pylibjpeg-openjpeg, pyjpegls, pylibjpeg-rle); check_renderable verifies the plugin is really installed.
SUPPORTED_TRANSFER_SYNTAXES: tuple[UID, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGLSLossless,
    JPEG2000Lossless,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEGLosslessSV1,
    JPEGLossless,
    RLELossless,
    JPEGLSNearLossless,
    JPEG2000,
    HTJ2K,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
)

MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
DISPLAY_MAX = 255
# Percentiles of the modality values used when the header carries no VOI: robust to collimator blades,
# burnt-out direct exposure and a few hot pixels, which would otherwise compress the anatomy into a few greys.
FALLBACK_PERCENTILES = (0.5, 99.5)
PREPROCESS_MODES = ("unit", "symmetric")

_J2K_SYNTAXES = frozenset({JPEG2000Lossless, JPEG2000, HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K})
_JPEG_SYNTAXES = frozenset(
    {JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless}
)
# Start-of-frame markers of ITU-T T.81 B.1.1.3 (not DHT C4, JPG C8, DAC CC) and SOF55 of JPEG-LS (T.87).
_SOF_MARKERS = frozenset({*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC} | {0xF7})
# Native little-endian pixels that are read in place (PS3.5 8.1.1): anything else goes through pydicom.
_NATIVE_LITTLE_ENDIAN = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian})
_CODESTREAM_HEADER_SEARCH = 4096  # bytes of a first fragment searched for the JPEG 2000 main header first
# Encapsulated Pixel Data items, PS3.5 A.4: Item (FFFE,E000) and Sequence Delimitation Item (FFFE,E0DD).
_ITEM, _SEQUENCE_DELIMITER = (0xFFFE, 0xE000), (0xFFFE, 0xE0DD)


@dataclass(frozen=True)
class DisplayImage:
    """A radiograph as a viewer shows it.

    ``pixels`` is uint8 (rows, columns), 0 black, read-only; ``voi`` says which VOI transform produced it,
    e.g. ``"window 15000/30000 LINEAR"``, ``"VOI LUT 1/2"``, ``"min-max p0.5-p99.5 (no VOI in header)"``.
    """

    pixels: np.ndarray
    source_shape: tuple[int, int]
    photometric: str
    voi: str
    decode: str = "full"  # or e.g. "JPEG 2000 resolution level 2 of 5": how the stored values were obtained


def check_renderable(ds: Dataset, *, max_pixels: int, pixel_data: Buffer | None = None) -> None:
    """Raise a :class:`~dicom_node.errors.PixelError` unless ``ds`` can be rendered; reads the header only.

    Checks Pixel Data (7FE0,0010) is present, Samples per Pixel 1 and Photometric Interpretation MONOCHROME1/2
    (PS3.3 C.7.6.3.1.2), one frame (C.7.6.6), 0 < RowsxColumns ≤ ``max_pixels``, a supported transfer syntax
    with its decoder installed, and that a JPEG/JPEG-LS/JPEG 2000 codestream declares the same size as the
    header (a small header over a huge codestream would otherwise be decoded in full). ``pixel_data``: the
    Pixel Data value when ``ds`` holds only the header.
    """
    view = _pixel_view(ds, pixel_data)
    if view is None or not len(view):
        raise MissingPixelDataError("the dataset has no (7FE0,0010) Pixel Data")

    samples = _required_int(ds, "SamplesPerPixel")
    photometric = str(ds.get("PhotometricInterpretation") or "").strip()
    if samples != 1 or photometric not in MONOCHROME:
        raise ColourImageError(
            f"expected one sample per pixel and MONOCHROME1/MONOCHROME2, got Samples per Pixel {samples} "
            f"and Photometric Interpretation {photometric or '(missing)'!r}"
        )

    frames = ds.get("NumberOfFrames")
    if frames not in (None, "") and int(frames) > 1:
        raise MultiFrameError(f"the image has {int(frames)} frames; only single-frame radiographs are rendered")

    rows, columns = _required_int(ds, "Rows"), _required_int(ds, "Columns")
    _check_size(rows, columns, max_pixels, "the header")

    transfer_syntax = _transfer_syntax(ds)
    if transfer_syntax not in SUPPORTED_TRANSFER_SYNTAXES:
        raise DecodeError(f"transfer syntax {transfer_syntax} ({transfer_syntax.name}) is not supported")
    decoder = get_decoder(transfer_syntax)
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies)
        raise DecodeError(f"no decoder installed for {transfer_syntax} ({transfer_syntax.name}): {missing}")

    if transfer_syntax.is_encapsulated:
        shape = _codestream_shape(_first_fragment(view), transfer_syntax)
        if shape is not None:
            _check_size(shape[0] or rows, shape[1], max_pixels, "the codestream")
            if shape[1] != columns or shape[0] not in (0, rows):
                raise DecodeError(
                    f"the codestream is {shape[0]}x{shape[1]} but the header says Rows {rows}, Columns {columns}"
                )


def render_display(
    ds: Dataset,
    *,
    max_pixels: int = 64_000_000,
    max_long_side: int | None = None,
    min_shape: tuple[int, int] = (0, 0),
    reduced_decode: bool = True,
    pixel_data: Buffer | None = None,
) -> DisplayImage:
    """Decode ``ds`` and return it as a viewer shows it (PS3.3 C.11: Modality LUT, VOI, MONOCHROME1 inversion).

    The VOI transform is the first VOI LUT Sequence item when there is one (preferred over a window when both
    are present, as pydicom's ``apply_voi_lut`` does; PS3.3 C.11.2 leaves the choice to the application), else
    the first Window Center/Width pair (C.11.2.1.2), else the 0.5-99.5 percentile range of the modality values.
    The dataset is not modified (decoding does not cache the array on it).

    With ``max_long_side`` the image is rendered at the source size capped at that long side (never enlarged
    beyond the source): the stored values are resized first (cv2 INTER_AREA), then the LUTs run on the small
    array, as a viewer that minifies before windowing does. JPEG 2000 and HTJ2K are then decoded only to the
    coarsest resolution level that gives at least ``min_shape`` (rows, columns) and comes within sqrt(2) of
    ``max_long_side`` (see :func:`dicom_node.imaging.j2k.choose_level`), unless ``reduced_decode`` is False;
    everything else, and any codestream the reduced path declines, is decoded in full first.

    ``pixel_data``: the Pixel Data value when ``ds`` holds only the header (read where it lies, not copied).
    """
    check_renderable(ds, max_pixels=max_pixels, pixel_data=pixel_data)
    view = _pixel_view(ds, pixel_data)
    assert view is not None  # check_renderable says so
    photometric = str(ds.PhotometricInterpretation).strip()
    stored, how = None, "full"
    if max_long_side is not None and reduced_decode:
        stored, how = _decode_reduced(ds, view, max_long_side, min_shape)
    if stored is None:
        stored = _decode(ds, view)
    if not stored.any():
        raise AllZeroDecodeError(
            f"decoding {_transfer_syntax(ds).name} produced only zeros (a known codec failure mode)"
        )
    if max_long_side is not None:
        stored = _resize_stored(stored, _target_shape(ds, max_long_side))
    display, voi = _stored_to_display(stored, ds)
    if photometric == "MONOCHROME1":
        display = DISPLAY_MAX - display
    display.setflags(write=False)
    source_shape = (int(ds.Rows), int(ds.Columns))
    return DisplayImage(pixels=display, source_shape=source_shape, photometric=photometric, voi=voi, decode=how)


def _decode_reduced(
    ds: Dataset, view: memoryview, max_long_side: int, min_shape: tuple[int, int]
) -> tuple[np.ndarray | None, str]:
    """A JPEG 2000 / HTJ2K frame at a coarser resolution level, or (None, "full") to decode in full."""
    if _transfer_syntax(ds) not in _J2K_SYNTAXES:
        return None, "full"
    header = j2k.parse_header(_first_fragment(view))
    if header is None:
        return None, "full"
    level = j2k.choose_level(header, max_long_side, min_shape)
    if level == 0:
        return None, "full"
    codestream = _fragments(view)[1:]  # one frame: every fragment after the Basic Offset Table
    stored = j2k.decode_reduced(
        codestream, level, signed=int(ds.get("PixelRepresentation") or 0) == 1, bits_stored=int(ds.BitsStored),
        bits_allocated=int(ds.BitsAllocated),
    )
    if stored is None:
        return None, "full"
    return stored, f"JPEG 2000 resolution level {level} of {header.levels}"


def _fit_shape(height: int, width: int, max_long_side: int) -> tuple[int, int]:
    """(height, width) with the long side scaled to ``max_long_side``, aspect kept to the nearest pixel."""
    scale = max_long_side / max(height, width)
    new_height = max_long_side if height >= width else max(1, round(height * scale))
    new_width = max_long_side if width > height else max(1, round(width * scale))
    return new_height, new_width


def _target_shape(ds: Dataset, max_long_side: int) -> tuple[int, int]:
    """The source size capped at ``max_long_side``: the same whatever the transfer syntax or decode level."""
    rows, columns = int(ds.Rows), int(ds.Columns)
    return (rows, columns) if max(rows, columns) <= max_long_side else _fit_shape(rows, columns, max_long_side)


def _resize_stored(stored: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Stored values resized to ``shape``, rounded back to their dtype: area-averaged when reducing; bilinear
    when a JPEG 2000 level came out slightly smaller than the target (at most sqrt(2), see choose_level)."""
    if stored.shape == shape:
        return stored
    shrink = stored.shape[0] >= shape[0] and stored.shape[1] >= shape[1]
    native = stored.dtype in (np.uint8, np.uint16, np.int16, np.float32, np.float64)
    resized = cv2.resize(stored if native else stored.astype(np.float64), (shape[1], shape[0]),
                         interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return resized if native else np.rint(resized).astype(stored.dtype)


def window_to_display(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """Apply a VOI window (PS3.3 C.11.2.1.2 LINEAR, C.11.2.1.3.1 SIGMOID, C.11.2.1.3.2 LINEAR_EXACT) to 0..255.

    Written here rather than with pydicom's ``apply_windowing`` because that returns values in the stored-value
    range, which we would have to rescale to 0..255 anyway. Returns uint8. Raises ValueError for a width the
    function does not allow (LINEAR needs ≥ 1, the others > 0) or an unknown function.
    """
    x = np.asarray(values, dtype=np.float64)
    y_max = float(DISPLAY_MAX)
    if function == "LINEAR":
        if width < 1:
            raise ValueError(f"LINEAR window width must be >= 1, not {width}")
        # C.11.2.1.2.1: x <= c - 0.5 - (w-1)/2 -> ymin; x > c - 0.5 + (w-1)/2 -> ymax; else
        # y = ((x - (c - 0.5)) / (w - 1) + 0.5) * (ymax - ymin) + ymin. The width-1 case is a hard threshold.
        lower = center - 0.5 - (width - 1) / 2
        if width == 1:
            y = np.where(x > lower, y_max, 0.0)
        else:
            y = ((x - (center - 0.5)) / (width - 1) + 0.5) * y_max
            y = np.where(x <= lower, 0.0, y)
            y = np.where(x > center - 0.5 + (width - 1) / 2, y_max, y)
    elif function == "LINEAR_EXACT":
        if width <= 0:
            raise ValueError(f"LINEAR_EXACT window width must be > 0, not {width}")
        y = ((x - center) / width + 0.5) * y_max
    elif function == "SIGMOID":
        if width <= 0:
            raise ValueError(f"SIGMOID window width must be > 0, not {width}")
        y = y_max / (1.0 + np.exp(-4.0 * (x - center) / width))
    else:
        raise ValueError(f"unknown VOI LUT Function {function!r}")
    return np.rint(np.clip(y, 0.0, y_max)).astype(np.uint8)


def model_input(display: np.ndarray, input_size: tuple[int, int], channels: int, preprocess: str) -> np.ndarray:
    """Return the model's float32 (height, width, channels) input for a uint8 display image.

    The whole image is resized (cv2 INTER_AREA, no crop) so that a heatmap maps back onto the full display
    image; ``preprocess`` "unit" gives x/255 in 0..1, "symmetric" x/127.5 - 1 in -1..1; 3 channels replicate
    the grey plane. ``display`` is not modified.
    """
    if display.ndim != 2 or display.dtype != np.uint8:
        raise ValueError(f"display must be a 2-D uint8 array, not {display.dtype} {display.shape}")
    height, width = input_size
    if height < 1 or width < 1:
        raise ValueError(f"input_size must be positive, not {input_size}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, not {channels}")
    if preprocess not in PREPROCESS_MODES:
        raise ValueError(f"preprocess must be one of {PREPROCESS_MODES}, not {preprocess!r}")
    resized = cv2.resize(display, (width, height), interpolation=cv2.INTER_AREA).astype(np.float32)
    scaled = resized / np.float32(255.0) if preprocess == "unit" else resized / np.float32(127.5) - np.float32(1.0)
    return np.repeat(scaled[:, :, np.newaxis], channels, axis=2)


def fit_long_side(display: np.ndarray, max_long_side: int) -> np.ndarray:
    """Return a copy of ``display`` downscaled (cv2 INTER_AREA) so its long side is ≤ ``max_long_side``.

    Never upscales; the aspect ratio is kept to the nearest pixel.
    """
    if max_long_side < 1:
        raise ValueError(f"max_long_side must be >= 1, not {max_long_side}")
    height, width = display.shape[:2]
    if max(height, width) <= max_long_side:
        return display.copy()
    new_height, new_width = _fit_shape(height, width, max_long_side)
    return cv2.resize(display, (new_width, new_height), interpolation=cv2.INTER_AREA)


def _required_int(ds: Dataset, keyword: str) -> int:
    value = ds.get(keyword)
    if value is None or value == "":
        raise DecodeError(f"the Type 1 attribute {keyword} is missing or empty")
    try:
        return int(value)
    except (TypeError, ValueError):  # several values (VM > 1), or text that is no number
        raise DecodeError(f"the Type 1 attribute {keyword} is not one integer") from None


def _check_size(rows: int, columns: int, max_pixels: int, where: str) -> None:
    if rows <= 0 or columns <= 0:
        raise ImageTooLargeError(f"{where} gives an empty image: Rows {rows}, Columns {columns}")
    if rows * columns > max_pixels:
        raise ImageTooLargeError(
            f"{where} gives {rows}x{columns} = {rows * columns} pixels, more than the maximum {max_pixels}"
        )


def _transfer_syntax(ds: Dataset) -> UID:
    meta = getattr(ds, "file_meta", None)
    value = meta.get("TransferSyntaxUID") if meta is not None else None
    if not value:
        raise DecodeError("the dataset has no (0002,0010) Transfer Syntax UID in its file meta information")
    return UID(str(value))


def _pixel_view(ds: Dataset, pixel_data: Buffer | None) -> memoryview | None:
    """The Pixel Data value as bytes in place: ``pixel_data`` when given, else the dataset's own (no copy)."""
    if pixel_data is not None:
        return memoryview(pixel_data).cast("B")
    if "PixelData" not in ds or ds["PixelData"].is_empty:
        return None
    return memoryview(ds.PixelData).cast("B")


def _items(view: memoryview) -> Iterator[memoryview]:
    """The items of encapsulated Pixel Data (PS3.5 A.4), Basic Offset Table first, as views; a cut last item is
    returned as far as it goes. Raises DecodeError on anything but items before the sequence delimiter."""
    pos = 0
    while pos + 8 <= len(view):
        group, element, length = struct.unpack_from("<HHI", view, pos)
        if (group, element) == _SEQUENCE_DELIMITER:
            return
        if (group, element) != _ITEM:
            raise DecodeError(
                f"the encapsulated Pixel Data is malformed: tag ({group:04X},{element:04X}) where an item belongs"
            )
        if length == 0xFFFFFFFF:
            raise DecodeError("the encapsulated Pixel Data is malformed: an item of undefined length")
        yield view[pos + 8 : pos + 8 + length]
        pos += 8 + length


def _fragments(view: memoryview) -> list[memoryview]:
    return list(_items(view))


def _first_fragment(pixels: memoryview | Dataset) -> memoryview:
    """The first fragment of encapsulated Pixel Data (PS3.5 A.4; the value, or a dataset holding it), skipping the
    Basic Offset Table item."""
    view = pixels if isinstance(pixels, memoryview) else _pixel_view(pixels, None)
    if view is None:
        raise MissingPixelDataError("the dataset has no (7FE0,0010) Pixel Data")
    items = _items(view)
    next(items, None)
    fragment = next(items, None)
    if fragment is None or not len(fragment):
        raise DecodeError("the encapsulated Pixel Data has no fragment after the Basic Offset Table")
    return fragment


def _codestream_shape(fragment: memoryview | bytes, transfer_syntax: UID) -> tuple[int, int] | None:
    """(rows, columns) a codestream declares, or None when its header is not in ``fragment``.

    JPEG 2000: the SIZ segment after SOC (ISO 15444-1 A.5.1); rows may not be 0 there. JPEG and JPEG-LS: the
    first SOF segment (ITU-T T.81 B.2.2, T.87); rows 0 means "defined later by a DNL marker".
    """
    if transfer_syntax in _J2K_SYNTAXES:
        # SOC and SIZ open a codestream (ISO 15444-1 A.4.1, A.5.1): looked for at the start before anywhere else.
        start = bytes(fragment[:_CODESTREAM_HEADER_SEARCH]).find(b"\xff\x4f\xff\x51")
        if start < 0 and len(fragment) > _CODESTREAM_HEADER_SEARCH:
            start = bytes(fragment).find(b"\xff\x4f\xff\x51")
        if start < 0 or len(fragment) < start + 24:
            return None
        x_size, y_size, x_offset, y_offset = struct.unpack_from(">IIII", fragment, start + 8)
        return y_size - y_offset, x_size - x_offset
    if transfer_syntax in _JPEG_SYNTAXES and fragment[:2] == b"\xff\xd8":
        pos = 2
        while pos + 4 <= len(fragment):
            if fragment[pos] != 0xFF:
                return None
            marker = fragment[pos + 1]
            if marker == 0xFF:
                pos += 1
                continue
            if marker in _SOF_MARKERS:
                if len(fragment) < pos + 9:
                    return None
                rows, columns = struct.unpack_from(">HH", fragment, pos + 5)
                return rows, columns
            pos += 2 + struct.unpack_from(">H", fragment, pos + 2)[0]
    return None


def _native_stored(ds: Dataset, view: memoryview) -> np.ndarray | None:
    """Native little-endian pixels of one sample, 8 or 16 bits, as an array over ``view`` (no copy unless bits
    above Bits Stored are set and must be masked off), or None for pydicom to decode (other layouts, and signed
    values whose sign bit is not the top bit: those need pydicom's sign extension)."""
    if _transfer_syntax(ds) not in _NATIVE_LITTLE_ENDIAN:
        return None
    rows, columns = int(ds.Rows), int(ds.Columns)
    bits_allocated, bits_stored = int(ds.BitsAllocated), int(ds.get("BitsStored") or ds.BitsAllocated)
    signed = int(ds.get("PixelRepresentation") or 0) == 1
    if bits_allocated not in (8, 16) or not 0 < bits_stored <= bits_allocated:
        return None
    if signed and bits_stored != bits_allocated:
        return None
    dtype = np.dtype(f"<{'i' if signed else 'u'}{bits_allocated // 8}")
    expected = rows * columns * dtype.itemsize
    if len(view) < expected:
        raise DecodeError(
            f"the Pixel Data holds {len(view)} bytes, less than expected for {rows}x{columns} pixels of "
            f"{bits_allocated} bits ({expected} bytes)"
        )
    stored = np.frombuffer(view, dtype=dtype, count=rows * columns).reshape(rows, columns)
    if bits_stored < bits_allocated and int(stored.max()) >> bits_stored:
        stored = stored & dtype.type((1 << bits_stored) - 1)  # PS3.5 8.1.1: bits above Bits Stored are not the value
    return stored


def _decode(ds: Dataset, view: memoryview) -> np.ndarray:
    """The stored values as a 2-D array; codec failures become DecodeError. pydicom's function form does not
    cache the array on the dataset, unlike ``Dataset.pixel_array``."""
    transfer_syntax = _transfer_syntax(ds)
    native = _native_stored(ds, view)
    if native is not None:
        return native
    if "PixelData" not in ds:  # a header read apart from its pixels: pydicom decodes from a dataset that has them
        ds = ds.copy()
        ds["PixelData"] = DataElement(0x7FE00010, "OB" if transfer_syntax.is_encapsulated else "OW", bytes(view))
    try:
        stored = pixel_array(ds)
    except MemoryError:
        raise
    except Exception as exc:  # codec plugins raise anything from ValueError to RuntimeError
        raise DecodeError(f"cannot decode {transfer_syntax.name} pixel data: {exc}") from exc
    expected = (int(ds.Rows), int(ds.Columns))
    if stored.shape != expected:
        raise DecodeError(f"decoded array has shape {stored.shape}, the header says {expected}")
    return stored


def _stored_to_display(stored: np.ndarray, ds: Dataset) -> tuple[np.ndarray, str]:
    """Modality LUT then VOI (before any MONOCHROME1 inversion).

    Integer stored values under a window take a lookup table built over the range they span (at most 65,536
    entries), element for element the same as transforming every pixel, at a fraction of the cost.
    """
    window = not ds.get("VOILUTSequence") and ds.get("WindowCenter") not in (None, "") and ds.get(
        "WindowWidth") not in (None, "")
    if window and stored.dtype.kind in "ui" and stored.dtype.itemsize <= 2 and stored.size > 1:
        low, high = int(stored.min()), int(stored.max())
        domain = np.arange(low, high + 1, dtype=np.int64 if stored.dtype.kind == "i" else stored.dtype)
        lut, voi = _apply_voi(_modality_values(domain, ds), ds)
        if voi.startswith("window"):  # an invalid window falls back to percentiles of the image, not of the table
            index = stored if low == 0 else stored.astype(np.int32) - low
            return lut[index], voi
    return _apply_voi(_modality_values(stored, ds), ds)


def _modality_values(stored: np.ndarray, ds: Dataset) -> np.ndarray:
    """Modality LUT (PS3.3 C.11.1): the LUT Sequence if present, else Rescale Slope/Intercept; float64."""
    try:
        if ds.get("ModalityLUTSequence"):
            # int64 so that a negative first mapped value cannot overflow an unsigned stored array.
            return np.asarray(apply_modality_lut(stored.astype(np.int64), ds), dtype=np.float64)
        return np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    except (ValueError, TypeError, AttributeError, IndexError, KeyError, struct.error) as exc:
        raise DecodeError(f"cannot apply the Modality LUT: {exc}") from exc


def _apply_voi(values: np.ndarray, ds: Dataset) -> tuple[np.ndarray, str]:
    voi_luts = ds.get("VOILUTSequence")
    if voi_luts:
        return _apply_voi_lut(values, ds, len(voi_luts))
    if ds.get("WindowCenter") not in (None, "") and ds.get("WindowWidth") not in (None, ""):
        centers, widths = _as_list(ds.WindowCenter), _as_list(ds.WindowWidth)
        center, width = float(centers[0]), float(widths[0])
        function = str(ds.get("VOILUTFunction") or "LINEAR").strip().upper()
        if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
            logger.warning("unknown VOI LUT Function %r, applying LINEAR", function)
            function = "LINEAR"
        label = f"window {center:g}/{width:g} {function}"
        if len(centers) > 1:
            label += f" (1 of {len(centers)})"
        try:
            return window_to_display(values, center, width, function), label
        except ValueError as exc:
            logger.warning("ignoring the window: %s", exc)
            return _percentile_display(values, f"invalid {label}")
    return _percentile_display(values, "no VOI in header")


def _apply_voi_lut(values: np.ndarray, ds: Dataset, count: int) -> tuple[np.ndarray, str]:
    """First VOI LUT Sequence item (PS3.3 C.11.2.1.1), scaled from its 2**bits - 1 output range to 0..255."""
    item = ds.VOILUTSequence[0]
    try:
        entries, first_mapped, bits = (int(v) for v in item.LUTDescriptor)
        entries = entries or 65536
        # Clip and round here: pydicom writes the input into a uint16 index array, so values outside the LUT
        # (or a float from the Modality LUT) would wrap around instead of saturating as C.11.2.1.1 requires.
        index = np.clip(np.rint(values), first_mapped, first_mapped + entries - 1).astype(np.int64)
        lut_values = apply_voi(index, ds, index=0)
    except (ValueError, TypeError, AttributeError, IndexError, KeyError, NotImplementedError, struct.error) as exc:
        raise DecodeError(f"cannot apply the VOI LUT Sequence: {exc}") from exc
    out_max = 2**bits - 1
    display = np.rint(np.clip(lut_values.astype(np.float64) * (DISPLAY_MAX / out_max), 0, DISPLAY_MAX))
    label = f"VOI LUT 1/{count}"
    if explanation := str(item.get("LUTExplanation") or "").strip():
        label += f" ({explanation})"
    return display.astype(np.uint8), label


def _percentile_display(values: np.ndarray, why: str) -> tuple[np.ndarray, str]:
    low_p, high_p = FALLBACK_PERCENTILES
    low, high = (float(v) for v in np.percentile(values, FALLBACK_PERCENTILES))
    label = f"min-max p{low_p:g}-p{high_p:g} ({why})"
    if high <= low:
        low, high = float(values.min()), float(values.max())
        label = f"min-max ({why})"
    if high <= low or not math.isfinite(high - low):
        return np.zeros(values.shape, dtype=np.uint8), f"constant image ({why})"
    scaled = (values - low) * (DISPLAY_MAX / (high - low))
    return np.rint(np.clip(scaled, 0, DISPLAY_MAX)).astype(np.uint8), label


def _as_list(value: Any) -> Sequence[Any]:
    return list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value]
