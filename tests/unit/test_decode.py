"""Tests for edge_agent.core.decode: every input is generated here with cv2/numpy."""

from __future__ import annotations

import os
import resource
import struct
import sys
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.core.decode import (
    CorruptImageError,
    FileTooLargeError,
    ImageError,
    ImageInfo,
    ImageTooLargeError,
    UnreadableImageError,
    UnsupportedImageError,
    decode_image,
    read_image_file,
    sniff,
)

Image = npt.NDArray[np.uint8]


def _encode(
    ext: str, img: npt.NDArray[np.uint8] | npt.NDArray[np.uint16], params: list[int] | None = None
) -> bytes:
    ok, buf = cv2.imencode(ext, img, params or [])
    assert ok
    return bytes(buf.tobytes())


def _color(h: int, w: int) -> Image:
    """A smooth, deterministic BGR test pattern (compresses like a real photo)."""
    y, x = np.mgrid[0:h, 0:w]
    return np.dstack([x % 256, y % 256, (x + y) % 256]).astype(np.uint8)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _raw_png(w: int, h: int, color_type: int, rows: list[bytes], plte: bytes = b"") -> bytes:
    """Hand-built 8-bit PNG (cv2 cannot write palette or gray+alpha PNGs)."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 0)
    idat = zlib.compress(b"".join(b"\x00" + r for r in rows))
    chunks = _png_chunk(b"IHDR", ihdr)
    if plte:
        chunks += _png_chunk(b"PLTE", plte)
    return b"\x89PNG\r\n\x1a\n" + chunks + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _bomb_png() -> bytes:
    """A real, valid 8x8 PNG whose IHDR claims 30000x30000, with a correct CRC."""
    data = bytearray(_encode(".png", _color(8, 8)))
    data[16:24] = struct.pack(">II", 30000, 30000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


JPEG = _encode(".jpg", _color(48, 64))
PNG = _encode(".png", _color(48, 64))


def _zeroed_header(data: bytes) -> bytes:
    out = bytearray(data)
    out[2:20] = bytes(18)
    return bytes(out)


# --------------------------------------------------------------------------- bad bytes

BAD_BYTES: list[tuple[str, bytes, type[ImageError], str]] = [
    ("empty", b"", CorruptImageError, "empty file"),
    ("truncated_jpeg", JPEG[: len(JPEG) * 6 // 10], CorruptImageError, "truncated JPEG"),
    ("jpeg_without_eoi", JPEG[:-2], CorruptImageError, "no end-of-image marker"),
    ("truncated_png", PNG[: len(PNG) * 6 // 10], CorruptImageError, "truncated PNG"),
    ("png_header_only", PNG[:20], CorruptImageError, "truncated PNG header"),
    ("jpeg_zeroed_header", _zeroed_header(JPEG), CorruptImageError, "bad JPEG marker"),
    ("jpeg_garbage_after_soi", b"\xff\xd8garbage" + JPEG[2:], CorruptImageError, "bad JPEG"),
    ("text", b"hello world, this is not an image\n", UnsupportedImageError, "not an image"),
    ("random", np.random.default_rng(1).bytes(1000), UnsupportedImageError, "not an image"),
    ("gif", b"GIF89a" + bytes(40), UnsupportedImageError, "GIF"),
    ("bomb_png", _bomb_png(), ImageTooLargeError, "30000x30000"),
]


@pytest.mark.parametrize(
    ("data", "exc", "reason"),
    [pytest.param(d, e, r, id=name) for name, d, e, r in BAD_BYTES],
)
def test_bad_bytes_raise_typed_error(data: bytes, exc: type[ImageError], reason: str) -> None:
    with pytest.raises(exc) as info:
        decode_image(data)
    assert reason in str(info.value)
    assert info.value.reason == str(info.value)
    assert str(info.value).isprintable() and len(str(info.value)) < 120


def test_unsupported_reason_is_short_and_names_content() -> None:
    with pytest.raises(UnsupportedImageError, match=r"starts with b'hello wo'"):
        sniff(b"hello world")


def test_bomb_is_refused_before_decode_with_bounded_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bomb = _bomb_png()
    assert len(bomb) < 1000
    assert sniff(bomb) == ImageInfo("png", 30000, 30000)

    def _no_decode(*_args: object) -> None:
        raise AssertionError("imdecode must not be called for a decompression bomb")

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    try:
        with monkeypatch.context() as m:
            m.setattr(cv2, "imdecode", _no_decode)
            with pytest.raises(ImageTooLargeError):
                decode_image(bomb)
        with pytest.raises(ImageTooLargeError):  # the real decoder path too
            decode_image(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    rss_delta_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    scale = 1 if sys.platform != "darwin" else 1024  # ru_maxrss is bytes on macOS
    assert peak < 10 * 1024 * 1024
    assert rss_delta_kb / scale < 200 * 1024


def test_max_pixels_is_respected() -> None:
    data = _encode(".png", _color(10, 10))
    assert decode_image(data, max_pixels=100).shape == (10, 10, 3)
    with pytest.raises(ImageTooLargeError):
        decode_image(data, max_pixels=99)


def test_zero_dimension_png_is_corrupt() -> None:
    data = _raw_png(0, 1, 0, [b""])
    with pytest.raises(CorruptImageError, match="zero width or height"):
        sniff(data)


def test_bad_arguments_raise_value_error() -> None:
    with pytest.raises(ValueError, match="max_pixels"):
        decode_image(PNG, max_pixels=0)
    with pytest.raises(ValueError, match="reduce_to"):
        decode_image(JPEG, reduce_to=(0, 10))


# --------------------------------------------------------------------------- bad files


def _text_as_jpg(tmp_path: Path) -> Path:
    p = tmp_path / "photo.jpg"
    p.write_text("definitely not a jpeg\n")
    return p


def _directory(tmp_path: Path) -> Path:
    p = tmp_path / "frames.jpg"
    p.mkdir()
    return p


def _missing(tmp_path: Path) -> Path:
    return tmp_path / "nope.jpg"


def _missing_parent(tmp_path: Path) -> Path:
    f = tmp_path / "file"
    f.write_bytes(b"x")
    return f / "child.jpg"


def _fifo(tmp_path: Path) -> Path:
    p = tmp_path / "pipe.jpg"
    os.mkfifo(p)
    return p


BAD_FILES: list[tuple[str, Callable[[Path], Path], type[ImageError], str]] = [
    ("text_named_jpg", _text_as_jpg, UnsupportedImageError, "not an image"),
    ("directory", _directory, UnreadableImageError, "is a directory"),
    ("missing", _missing, UnreadableImageError, "no such file"),
    ("missing_parent", _missing_parent, UnreadableImageError, "no such file"),
    ("fifo", _fifo, UnreadableImageError, "not a regular file"),
]


@pytest.mark.parametrize(
    ("make", "exc", "reason"),
    [pytest.param(f, e, r, id=name) for name, f, e, r in BAD_FILES],
)
def test_bad_files_raise_typed_error(
    tmp_path: Path, make: Callable[[Path], Path], exc: type[ImageError], reason: str
) -> None:
    with pytest.raises(exc, match=reason):
        read_image_file(make(tmp_path))


def test_oversize_file_refused_before_reading(tmp_path: Path) -> None:
    p = tmp_path / "big.png"
    p.write_bytes(PNG)
    with pytest.raises(FileTooLargeError, match=r"file too large \(\d+ bytes > 100\)") as info:
        read_image_file(p, max_bytes=100)
    assert isinstance(info.value, UnreadableImageError)
    assert isinstance(info.value, ImageTooLargeError)
    assert read_image_file(p, max_bytes=len(PNG)).shape == (48, 64, 3)


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        pytest.param(PermissionError(13, "Permission denied"), "permission denied", id="eacces"),
        pytest.param(IsADirectoryError(21, "Is a directory"), "is a directory", id="eisdir"),
        pytest.param(FileNotFoundError(2, "gone"), "no such file", id="raced_delete"),
        pytest.param(OSError(5, "Input/output error"), "Input/output error", id="eio"),
    ],
)
def test_open_errors_are_mapped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: OSError, reason: str
) -> None:
    p = tmp_path / "frame.png"
    p.write_bytes(PNG)

    def _fail(*_args: object) -> int:
        raise error

    with monkeypatch.context() as m:
        m.setattr(os, "open", _fail)
        with pytest.raises(UnreadableImageError, match=reason) as info:
            read_image_file(p)
    assert info.value.__cause__ is error


# --------------------------------------------------------------------------- good inputs

GRAY = (np.arange(30 * 20) % 256).astype(np.uint8).reshape(30, 20)
GOOD: list[tuple[str, bytes, str, tuple[int, int]]] = [
    ("gray_png", _encode(".png", GRAY), "png", (30, 20)),
    ("gray_jpeg", _encode(".jpg", GRAY), "jpeg", (30, 20)),
    ("color_jpeg", JPEG, "jpeg", (48, 64)),
    (
        "progressive_jpeg",
        _encode(".jpg", _color(33, 17), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]),
        "jpeg",
        (33, 17),
    ),
    ("color_png", PNG, "png", (48, 64)),
    ("png_16bit", _encode(".png", np.full((5, 7), 65535, np.uint16)), "png", (5, 7)),
    ("png_16bit_color", _encode(".png", np.full((5, 7, 3), 65535, np.uint16)), "png", (5, 7)),
    ("rgba_png", _encode(".png", np.full((6, 4, 4), 200, np.uint8)), "png", (6, 4)),
    ("la_png", _raw_png(3, 2, 4, [b"\x10\xff" * 3, b"\x20\x00" * 3]), "png", (2, 3)),
    (
        "palette_png",
        _raw_png(2, 2, 3, [b"\x00\x01", b"\x01\x00"], b"\xff\x00\x00\x00\x00\xff"),
        "png",
        (2, 2),
    ),
    ("png_2x2", _encode(".png", _color(2, 2)), "png", (2, 2)),
    ("png_1x1", _encode(".png", _color(1, 1)), "png", (1, 1)),
    ("jpeg_1x1", _encode(".jpg", _color(1, 1)), "jpeg", (1, 1)),
    ("bmp", _encode(".bmp", _color(9, 11)), "bmp", (9, 11)),
    ("bmp_gray", _encode(".bmp", GRAY), "bmp", (30, 20)),
    (
        "webp_lossy",
        _encode(".webp", _color(21, 13), [cv2.IMWRITE_WEBP_QUALITY, 80]),
        "webp",
        (21, 13),
    ),
    (
        "webp_lossless",
        _encode(".webp", _color(21, 13), [cv2.IMWRITE_WEBP_QUALITY, 101]),
        "webp",
        (21, 13),
    ),
    ("jpeg_zero_padded", JPEG + bytes(512), "jpeg", (48, 64)),
    ("jpeg_space_padded", JPEG + b" \r\n\t ", "jpeg", (48, 64)),
]


def _assert_bgr(img: Image, shape: tuple[int, int]) -> None:
    assert isinstance(img, np.ndarray)
    assert img.dtype == np.uint8
    assert img.ndim == 3
    assert img.shape == (*shape, 3)
    assert img.flags["C_CONTIGUOUS"]


@pytest.mark.parametrize(
    ("data", "fmt", "shape"),
    [pytest.param(d, f, s, id=name) for name, d, f, s in GOOD],
)
def test_good_inputs_decode_to_bgr(data: bytes, fmt: str, shape: tuple[int, int]) -> None:
    _assert_bgr(decode_image(data), shape)
    assert sniff(data) == ImageInfo(fmt, width=shape[1], height=shape[0])


def test_webp_vp8x_header_is_parsed() -> None:
    # Lossless RGBA WebP from OpenCV may be a plain VP8L; build a VP8X container by hand.
    inner = _encode(".webp", _color(5, 9), [cv2.IMWRITE_WEBP_QUALITY, 101])[12:]
    vp8x = b"VP8X" + struct.pack("<I", 10) + bytes(4) + (9 - 1).to_bytes(3, "little")
    vp8x += (5 - 1).to_bytes(3, "little")
    body = b"WEBP" + vp8x + inner
    data = b"RIFF" + struct.pack("<I", len(body)) + body
    assert sniff(data) == ImageInfo("webp", 9, 5)


def test_16bit_png_scaled_to_8bit() -> None:
    gray16 = np.array([[0, 32768, 65535]], np.uint16)
    img = decode_image(_encode(".png", gray16))
    assert img[0, :, 0].tolist() == [0, 128, 255]
    assert (img[..., 0] == img[..., 2]).all()


def test_rgba_png_alpha_dropped_and_palette_expanded() -> None:
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., :3] = (10, 20, 30)
    img = decode_image(_encode(".png", rgba))  # alpha = 0 everywhere; colour kept
    assert img[0, 0].tolist() == [10, 20, 30]
    pal = _raw_png(2, 1, 3, [b"\x00\x01"], b"\xff\x00\x00\x00\x00\xff")  # red, blue
    assert decode_image(pal)[0].tolist() == [[0, 0, 255], [255, 0, 0]]


def test_jpeg_named_png_decodes(tmp_path: Path) -> None:
    p = tmp_path / "frame.png"
    p.write_bytes(JPEG)
    _assert_bgr(read_image_file(p), (48, 64))
    _assert_bgr(read_image_file(str(p)), (48, 64))


# --------------------------------------------------------------------------- reduce_to

BIG_JPEG = _encode(".jpg", _color(960, 1280))


@pytest.mark.parametrize(
    ("reduce_to", "shape"),
    [
        pytest.param((160, 120), (120, 160), id="eighth"),
        pytest.param((161, 120), (240, 320), id="just_over_eighth"),
        pytest.param((300, 200), (240, 320), id="quarter"),
        pytest.param((640, 480), (480, 640), id="half"),
        pytest.param((641, 1), (960, 1280), id="full_width_bound"),
        pytest.param((2000, 2000), (960, 1280), id="larger_than_image"),
        pytest.param(None, (960, 1280), id="none"),
    ],
)
def test_reduce_to_jpeg(reduce_to: tuple[int, int] | None, shape: tuple[int, int]) -> None:
    _assert_bgr(decode_image(BIG_JPEG, reduce_to=reduce_to), shape)


def test_reduce_to_rounds_up_odd_sizes() -> None:
    data = _encode(".jpg", _color(13, 17))  # 1/8 -> ceil: 3x2
    _assert_bgr(decode_image(data, reduce_to=(3, 2)), (2, 3))


def test_reduce_to_ignored_for_png() -> None:
    data = _encode(".png", _color(960, 1280))
    _assert_bgr(decode_image(data, reduce_to=(160, 120)), (960, 1280))


# --------------------------------------------------------------------------- fuzzing

FUZZ_SETTINGS = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
SMALL_JPEG = _encode(".jpg", _color(16, 24))
SMALL_PNG = _encode(".png", _color(16, 24))
SMALL_WEBP = _encode(".webp", _color(16, 24), [cv2.IMWRITE_WEBP_QUALITY, 80])
SMALL_BMP = _encode(".bmp", _color(4, 6))
MAGICS = [b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"RIFF\x00\x01\x00\x00WEBPVP8 ", b"BM"]


def _check_never_crashes(data: bytes) -> None:
    try:
        img = decode_image(data, max_pixels=1_000_000, reduce_to=(4, 4))
    except ImageError as e:
        assert e.reason and str(e) == e.reason
    else:
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
        assert img.shape[0] * img.shape[1] <= 1_000_000


@FUZZ_SETTINGS
@given(
    st.one_of(
        st.binary(max_size=4096),
        st.sampled_from(MAGICS).flatmap(
            lambda m: st.binary(max_size=4096).map(lambda tail: m + tail)
        ),
    )
)
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    _check_never_crashes(data)


@st.composite
def _mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from([SMALL_JPEG, SMALL_PNG, SMALL_WEBP, SMALL_BMP])))
    for _ in range(draw(st.integers(1, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        del data[draw(st.integers(0, len(data))) :]
    return bytes(data)


@FUZZ_SETTINGS
@given(_mutated())
def test_fuzz_mutated_images(data: bytes) -> None:
    _check_never_crashes(data)
