"""Fixtures for integration tests: the committed reference bundles and image files."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_agent.core.synthetic import LineConditions, render_item
from tests.integration.reference import UNSEEN_SEED


def _png_bomb() -> bytes:
    """A valid small PNG whose header claims 30000 x 30000 pixels (CRC fixed up)."""
    ok, buf = cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))
    assert ok
    data = bytearray(buf.tobytes())
    ihdr = 8  # chunk length at 8, type at 12, data at 16
    struct.pack_into(">II", data, ihdr + 8, 30000, 30000)
    crc = zlib.crc32(bytes(data[ihdr + 4 : ihdr + 8 + 13])) & 0xFFFFFFFF
    struct.pack_into(">I", data, ihdr + 8 + 13, crc)
    return bytes(data)


@pytest.fixture(scope="session")
def sample_jpeg() -> bytes:
    image = render_item(UNSEEN_SEED, 0, (640, 480), LineConditions()).image
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 92])
    assert ok
    return buf.tobytes()


@pytest.fixture
def bad_inputs(tmp_path: Path, sample_jpeg: bytes) -> dict[str, Path]:
    """Every kind of bad input named in the issue, as files (or non-files)."""
    png = cv2.imencode(".png", render_item(UNSEEN_SEED, 1, (320, 240)).image)[1].tobytes()
    files = {
        "empty.jpg": b"",
        "truncated.jpg": sample_jpeg[: len(sample_jpeg) * 6 // 10],
        "truncated.png": png[: len(png) // 2],
        "corrupt-header.jpg": sample_jpeg[:2] + b"\x00" * 40 + sample_jpeg[42:],
        "text.jpg": b"this is not an image, just a note\n",
        "bomb.png": _png_bomb(),
    }
    paths = {}
    for name, data in files.items():
        path = tmp_path / name
        path.write_bytes(data)
        paths[name] = path
    directory = tmp_path / "a-directory.jpg"
    directory.mkdir()
    paths["directory"] = directory
    paths["missing"] = tmp_path / "does-not-exist.jpg"
    return paths


@pytest.fixture
def odd_inputs(tmp_path: Path, sample_jpeg: bytes) -> dict[str, Path]:
    """Odd but valid images that must be converted and inspected."""
    color = render_item(UNSEEN_SEED, 2, (320, 240)).image
    gray = cv2.cvtColor(color, cv2.COLOR_BGR2GRAY)
    images = {
        "gray.png": gray,
        "sixteen-bit.png": gray.astype(np.uint16) * 257,
        "rgba.png": cv2.cvtColor(color, cv2.COLOR_BGR2BGRA),
        "tiny-2x2.png": color[:2, :2],
    }
    paths = {}
    for name, image in images.items():
        path = tmp_path / name
        assert cv2.imwrite(str(path), image)
        paths[name] = path
    named_wrong = tmp_path / "jpeg-named.png"
    named_wrong.write_bytes(sample_jpeg)
    paths["jpeg-named.png"] = named_wrong
    return paths
