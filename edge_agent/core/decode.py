"""Decode untrusted image bytes into 8-bit BGR frames.

This module is a security boundary: bytes arriving from a camera, a hot folder or the
API are untrusted. The contract is:

* ``decode_image`` returns a ``uint8`` C-contiguous array of shape ``(H, W, 3)`` in BGR
  order, or raises an :class:`ImageError` subclass. No other exception escapes for
  bad *data* (bad *arguments*, e.g. ``max_pixels <= 0``, raise ``ValueError``).
* The format is sniffed from the content (magic bytes), never from a file name.
  Only JPEG, PNG, BMP and WebP are accepted; everything else is refused before OpenCV
  sees it, which keeps the decoder attack surface small.
* Width and height are parsed from the header before any pixel is decoded, and images
  claiming more than ``max_pixels`` are refused (decompression bombs stay cheap).
* Truncation is detected explicitly (JPEG end-of-image marker, PNG IEND chunk, WebP
  RIFF size) instead of trusting the decoder to notice.
* ``cv2.IMREAD_COLOR`` normalises grayscale, 16-bit, alpha and palette images to 8-bit
  BGR. It also applies the EXIF orientation of JPEGs, so a rotated JPEG's result can
  have width and height swapped relative to :func:`sniff`.

Only :func:`read_image_file` touches the filesystem; everything else is pure.
"""

from __future__ import annotations

import math
import os
import stat
import struct
import zlib
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MAX_BYTES = 64 * 1024 * 1024

_PNG_SIG = b"\x89PNG\r\n\x1a\n"
_JPEG_SOI = b"\xff\xd8"
_JPEG_EOI = b"\xff\xd9"
_JPEG_PADDING = b"\x00 \t\r\n"
# SOF0..SOF15 minus DHT (C4), JPG (C8) and DAC (CC).
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field: TEM and RST0..RST7.
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})
# JPEG scale-down factors, largest first (libjpeg DCT scaling: fast).
_REDUCED_FLAGS = (
    (8, cv2.IMREAD_REDUCED_COLOR_8),
    (4, cv2.IMREAD_REDUCED_COLOR_4),
    (2, cv2.IMREAD_REDUCED_COLOR_2),
)
_BMP_DIB_SIZES = frozenset({12, 16, 40, 52, 56, 64, 108, 124})
# Known formats we refuse, so the error message can name them.
_KNOWN_UNSUPPORTED = (
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"%PDF", "PDF"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
)


class ImageError(Exception):
    """Base class for bad image input; ``str(e)`` and ``e.reason`` give a short reason."""

    reason: str

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UnsupportedImageError(ImageError):
    """The data is not an image, or is in a format this module does not accept."""


class CorruptImageError(ImageError):
    """The header is invalid, the data is truncated, or the decoder failed."""


class ImageTooLargeError(ImageError):
    """The image claims more pixels than allowed, or the file is too big."""


class UnreadableImageError(ImageError):
    """The file could not be read (missing, a directory, no permission, too large)."""


class FileTooLargeError(UnreadableImageError, ImageTooLargeError):
    """The file is bigger than ``max_bytes``; both unreadable and too large."""


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """What the header says: ``format`` is "jpeg", "png", "bmp" or "webp"."""

    format: str
    width: int
    height: int


def _u16be(data: bytes, off: int) -> int:
    return int.from_bytes(data[off : off + 2], "big")


def _u32be(data: bytes, off: int) -> int:
    return int.from_bytes(data[off : off + 4], "big")


def _u32le(data: bytes, off: int) -> int:
    return int.from_bytes(data[off : off + 4], "little")


def _sniff_png(data: bytes) -> tuple[int, int]:
    if len(data) < 33:
        raise CorruptImageError("truncated PNG header")
    if _u32be(data, 8) != 13 or data[12:16] != b"IHDR":
        raise CorruptImageError("bad PNG header (first chunk is not IHDR)")
    if zlib.crc32(data[12:29]) != _u32be(data, 29):
        raise CorruptImageError("bad PNG header (IHDR CRC mismatch)")
    # IEND is a zero-length chunk; its position must leave room for the 4-byte CRC.
    iend = data.rfind(b"\x00\x00\x00\x00IEND")
    if iend < 33 or iend + 12 > len(data):
        raise CorruptImageError("truncated PNG (no IEND chunk)")
    return _u32be(data, 16), _u32be(data, 20)


def _sniff_jpeg(data: bytes) -> tuple[int, int]:
    pos, n = 2, len(data)
    while True:
        if pos >= n:
            raise CorruptImageError("truncated JPEG header")
        if data[pos] != 0xFF:
            raise CorruptImageError(f"bad JPEG marker at offset {pos}")
        while pos < n and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= n:
            raise CorruptImageError("truncated JPEG header")
        marker = data[pos]
        pos += 1
        if marker in _JPEG_STANDALONE:
            continue
        if marker in (0x00, 0xD8, 0xD9, 0xDA):
            raise CorruptImageError(f"bad JPEG (marker 0x{marker:02X} before frame header)")
        if pos + 2 > n:
            raise CorruptImageError("truncated JPEG header")
        length = _u16be(data, pos)
        if length < 2:
            raise CorruptImageError("bad JPEG segment length")
        if marker in _JPEG_SOF:
            if length < 8 or pos + 7 > n:
                raise CorruptImageError("truncated JPEG frame header")
            end = data.rfind(_JPEG_EOI)
            if end < 0 or data[end + 2 :].rstrip(_JPEG_PADDING):
                raise CorruptImageError("truncated JPEG (no end-of-image marker)")
            return _u16be(data, pos + 5), _u16be(data, pos + 3)
        pos += length


def _sniff_bmp(data: bytes) -> tuple[int, int]:
    if len(data) < 26:
        raise CorruptImageError("truncated BMP header")
    if _u32le(data, 14) == 12:  # BITMAPCOREHEADER: unsigned 16-bit dims
        width, height = struct.unpack_from("<HH", data, 18)
    else:  # BITMAPINFOHEADER and later: signed 32-bit, negative height = top-down
        width, height = struct.unpack_from("<ii", data, 18)
        if width < 0:
            raise CorruptImageError("bad BMP header (negative width)")
    return int(width), abs(int(height))


def _sniff_webp(data: bytes) -> tuple[int, int]:
    if len(data) < 30:
        raise CorruptImageError("truncated WebP header")
    if _u32le(data, 4) + 8 > len(data):
        raise CorruptImageError("truncated WebP (RIFF size exceeds data)")
    chunk, body = data[12:16], data[20:30]
    if chunk == b"VP8 ":
        if body[3:6] != b"\x9d\x01\x2a":
            raise CorruptImageError("bad WebP VP8 header (no start code)")
        w, h = struct.unpack_from("<HH", body, 6)
        return w & 0x3FFF, h & 0x3FFF
    if chunk == b"VP8L":
        if body[0] != 0x2F:
            raise CorruptImageError("bad WebP VP8L header (no signature)")
        bits = _u32le(body, 1)
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":
        w = int.from_bytes(body[4:7], "little") + 1
        h = int.from_bytes(body[7:10], "little") + 1
        return w, h
    raise CorruptImageError(f"bad WebP (unknown first chunk {chunk!r})")


def _format_of(data: bytes) -> str:
    if data.startswith(_JPEG_SOI):
        return "jpeg"
    if data.startswith(_PNG_SIG):
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:2] == b"BM" and len(data) >= 18 and _u32le(data, 14) in _BMP_DIB_SIZES:
        return "bmp"
    for magic, name in _KNOWN_UNSUPPORTED:
        if data.startswith(magic):
            raise UnsupportedImageError(f"unsupported image format ({name})")
    raise UnsupportedImageError(f"not an image (starts with {data[:8]!r})")


_SNIFFERS = {"jpeg": _sniff_jpeg, "png": _sniff_png, "bmp": _sniff_bmp, "webp": _sniff_webp}


def sniff(data: bytes) -> ImageInfo:
    """Identify the format and dimensions from magic bytes and header only.

    Never decodes pixels. Also checks for truncation (JPEG end-of-image marker,
    PNG IEND chunk, WebP RIFF size).

    Raises:
        CorruptImageError: empty data, bad or truncated header, zero width/height.
        UnsupportedImageError: not a JPEG, PNG, BMP or WebP.
    """
    if not data:
        raise CorruptImageError("empty file")
    fmt = _format_of(data)
    width, height = _SNIFFERS[fmt](data)
    if width <= 0 or height <= 0:
        raise CorruptImageError(f"bad {fmt.upper()} header (zero width or height)")
    return ImageInfo(fmt, width, height)


def _imread_flag(info: ImageInfo, reduce_to: tuple[int, int] | None) -> int:
    """Largest JPEG reduced-decode flag that keeps the result at least ``reduce_to``."""
    if reduce_to is None or info.format != "jpeg":
        return int(cv2.IMREAD_COLOR)
    want_w, want_h = reduce_to
    for k, flag in _REDUCED_FLAGS:
        if math.ceil(info.width / k) >= want_w and math.ceil(info.height / k) >= want_h:
            return int(flag)
    return int(cv2.IMREAD_COLOR)


def decode_image(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    reduce_to: tuple[int, int] | None = None,
) -> npt.NDArray[np.uint8]:
    """Decode image bytes to a C-contiguous ``uint8`` BGR array of shape ``(H, W, 3)``.

    ``reduce_to=(w, h)`` lets JPEGs decode at 1/2, 1/4 or 1/8 scale when the result
    stays at least ``w x h``; other formats decode at full size. No resizing is done.

    Raises:
        UnsupportedImageError: not a JPEG, PNG, BMP or WebP.
        CorruptImageError: empty, bad header, truncated, or the decoder failed.
        ImageTooLargeError: the header claims more than ``max_pixels`` pixels.
        ValueError: ``max_pixels`` or ``reduce_to`` is not positive (caller bug).
    """
    if max_pixels <= 0:
        raise ValueError("max_pixels must be positive")
    if reduce_to is not None and min(reduce_to) <= 0:
        raise ValueError("reduce_to must be a positive (width, height)")
    info = sniff(data)
    pixels = info.width * info.height
    if pixels > max_pixels:
        raise ImageTooLargeError(
            f"image too large ({info.width}x{info.height} = {pixels} pixels > {max_pixels})"
        )
    name = info.format.upper() if info.format != "webp" else "WebP"
    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), _imread_flag(info, reduce_to))
    except cv2.error as e:
        raise CorruptImageError(f"could not decode {name} data (OpenCV error)") from e
    if img is None:
        raise CorruptImageError(f"could not decode {name} data")
    arr = np.asarray(img)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise CorruptImageError(f"could not decode {name} data (unexpected layout)")
    if arr.shape[0] * arr.shape[1] > max_pixels:  # belt and braces: header lied
        raise ImageTooLargeError("image too large (decoded size exceeds limit)")
    return np.ascontiguousarray(arr)


def read_image_file(
    path: str | os.PathLike[str],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    reduce_to: tuple[int, int] | None = None,
) -> npt.NDArray[np.uint8]:
    """Read a file (at most ``max_bytes``) and decode it with :func:`decode_image`.

    The size is checked with ``stat`` before reading, and the read itself is bounded,
    so memory stays bounded even if the file grows meanwhile. FIFOs and devices are
    refused (reading them could block forever).

    Raises:
        UnreadableImageError: "no such file", "is a directory", "permission denied",
            "not a regular file" or another OS error.
        FileTooLargeError: the file exceeds ``max_bytes`` (an ``UnreadableImageError``
            and an ``ImageTooLargeError``).
        UnsupportedImageError, CorruptImageError, ImageTooLargeError: see
            :func:`decode_image`.
    """
    if max_bytes <= 0:
        raise ValueError("max_bytes must be positive")
    try:
        st = os.stat(path)
        _check_stat(st, max_bytes)
        flags = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NONBLOCK", 0)
        fd = os.open(path, flags)
        with os.fdopen(fd, "rb") as f:
            _check_stat(os.fstat(f.fileno()), max_bytes)  # the file may have been swapped
            data = f.read(max_bytes + 1)
    except (FileNotFoundError, NotADirectoryError) as e:
        raise UnreadableImageError("no such file") from e
    except IsADirectoryError as e:
        raise UnreadableImageError("is a directory") from e
    except PermissionError as e:
        raise UnreadableImageError("permission denied") from e
    except OSError as e:
        raise UnreadableImageError(f"cannot read file ({e.strerror or type(e).__name__})") from e
    if len(data) > max_bytes:
        raise FileTooLargeError(f"file too large (more than {max_bytes} bytes)")
    return decode_image(data, max_pixels=max_pixels, reduce_to=reduce_to)


def _check_stat(st: os.stat_result, max_bytes: int) -> None:
    if stat.S_ISDIR(st.st_mode):
        raise UnreadableImageError("is a directory")
    if not stat.S_ISREG(st.st_mode):
        raise UnreadableImageError("not a regular file")
    if st.st_size > max_bytes:
        raise FileTooLargeError(f"file too large ({st.st_size} bytes > {max_bytes})")
