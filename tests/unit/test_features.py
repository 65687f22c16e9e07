"""Tests for edge_agent.core.features on images whose features are known by hand."""

from __future__ import annotations

import itertools
import math

import numpy as np
import numpy.typing as npt
import pytest

from edge_agent.core.features import (
    IMAGE_FEATURES,
    build_reference_profile,
    default_edges,
    histogram,
    image_features,
)
from edge_agent.protocol.manifest import FEATURE_NAMES

Image = npt.NDArray[np.uint8]
BRIGHTNESS, CONTRAST, SHARPNESS, CLIPPED, R_MEAN, G_MEAN, B_MEAN = range(7)


def _uniform(bgr: tuple[int, int, int], h: int = 4, w: int = 5) -> Image:
    return np.full((h, w, 3), bgr, dtype=np.uint8)


def test_feature_order_is_the_wire_order() -> None:
    assert IMAGE_FEATURES == (
        "brightness",
        "contrast",
        "sharpness",
        "clipped",
        "r_mean",
        "g_mean",
        "b_mean",
    )
    assert (*IMAGE_FEATURES, "p_defect") == FEATURE_NAMES


@pytest.mark.parametrize(
    ("value", "clipped"),
    [(0, 1.0), (2, 1.0), (3, 0.0), (128, 0.0), (252, 0.0), (253, 1.0), (255, 1.0)],
)
def test_uniform_gray(value: int, clipped: float) -> None:
    features = image_features(_uniform((value, value, value)))
    assert features.dtype == np.float64
    assert features.shape == (7,)
    # brightness, contrast, sharpness = log1p(0), clipped, r, g, b
    np.testing.assert_array_equal(features, [value, 0.0, 0.0, clipped, value, value, value])


def test_half_black_half_white() -> None:
    image = np.zeros((4, 4, 3), dtype=np.uint8)
    image[:, 2:] = 255
    features = image_features(image)
    # Laplacian (kernel 0 1 0 / 1 -4 1 / 0 1 0, reflected border) of each row 0 0 255 255:
    # 0, 255, -255, 0, so its variance is (255^2 + 255^2) / 4 = 32512.5.
    np.testing.assert_allclose(
        features,
        [127.5, 127.5, math.log1p(32512.5), 1.0, 127.5, 127.5, 127.5],
        rtol=1e-12,
    )


def test_single_bright_pixel() -> None:
    image = np.zeros((3, 3, 3), dtype=np.uint8)
    image[1, 1] = 100
    features = image_features(image)
    # Laplacian: -400 at the centre, 200 at the four edge middles (the reflected border
    # counts the centre twice), 0 at the corners: variance 320000/9 - (400/9)^2.
    lap_var = 320000 / 9 - (400 / 9) ** 2
    np.testing.assert_allclose(
        features,
        [100 / 9, math.sqrt(10000 / 9 - (100 / 9) ** 2), math.log1p(lap_var), 8 / 9]
        + [100 / 9] * 3,
        rtol=1e-9,
    )


@pytest.mark.parametrize(
    ("bgr", "gray"),
    [
        # gray = round(0.299 R + 0.587 G + 0.114 B)
        pytest.param((255, 0, 0), 29, id="blue"),  # 29.07
        pytest.param((0, 255, 0), 150, id="green"),  # 149.685
        pytest.param((0, 0, 255), 76, id="red"),  # 76.245
        pytest.param((10, 20, 30), 22, id="dark"),  # 21.85
    ],
)
def test_channel_means_are_read_from_bgr(bgr: tuple[int, int, int], gray: int) -> None:
    b, g, r = bgr
    features = image_features(_uniform(bgr))
    assert features[[R_MEAN, G_MEAN, B_MEAN]].tolist() == [r, g, b]
    assert features[BRIGHTNESS] == gray
    assert features[CONTRAST] == 0.0
    assert features[SHARPNESS] == 0.0


def test_channel_means_of_mixed_image() -> None:
    image = np.zeros((2, 2, 3), dtype=np.uint8)
    image[0, 0] = (255, 0, 0)  # blue
    image[0, 1] = (0, 0, 255)  # red
    image[1, :] = (0, 200, 0)  # green
    features = image_features(image)
    assert features[[R_MEAN, G_MEAN, B_MEAN]].tolist() == [63.75, 100.0, 63.75]


def test_clipped_counts_dark_and_bright_pixels() -> None:
    row = np.array([0, 2, 3, 100, 252, 253, 255, 128], dtype=np.uint8)
    image = np.dstack([row, row, row])  # 1 x 8 x 3
    assert image.shape == (1, 8, 3)
    assert image_features(image)[CLIPPED] == 4 / 8


def test_large_images_are_binned_2x2_before_the_features() -> None:
    # Columns alternate 0 and 200 gray: full resolution has contrast 100 and a busy
    # Laplacian; binned 2x2 every block averages to 100 gray, flat.
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    image[:, 1::2] = 200
    features = image_features(image)
    assert features[BRIGHTNESS] == 100.0
    assert features[CONTRAST] == 0.0
    assert features[SHARPNESS] == 0.0
    assert features[CLIPPED] == 0.0


def test_odd_sized_large_image_drops_the_last_row_and_column() -> None:
    image = np.full((65, 67, 3), 50, dtype=np.uint8)
    image[64, :] = 255  # the odd last row is not part of any 2x2 block
    image[:, 66] = 255
    features = image_features(image)
    assert features[BRIGHTNESS] == 50.0
    assert features[CLIPPED] == 0.0


def test_clipped_share_matches_a_direct_count_on_random_images() -> None:
    import cv2

    rng = np.random.default_rng(7)
    for _ in range(20):
        image = rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
        image[rng.random((40, 40)) < 0.2] = rng.choice([0, 1, 2, 253, 254, 255])
        small = cv2.resize(image, (20, 20), interpolation=cv2.INTER_AREA)
        gray = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY)
        expected = np.count_nonzero((gray <= 2) | (gray >= 253)) / gray.size
        assert image_features(image)[CLIPPED] == expected


# --- histogram and edges -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "counts"),
    [
        pytest.param([-5.0, 0.0, 0.5, 1.0, 1.999, 2.0, 100.0], [1, 2, 2, 2], id="all-bins"),
        pytest.param([], [0, 0, 0, 0], id="empty"),
        pytest.param([-math.inf, math.inf], [1, 0, 0, 1], id="infinities"),
        pytest.param([-1e-12], [1, 0, 0, 0], id="just-below-first-edge"),
        pytest.param([2.0, 2.0, 2.0], [0, 0, 0, 3], id="last-edge-is-overflow"),
        pytest.param([0.0], [0, 1, 0, 0], id="first-edge-is-first-bin"),
    ],
)
def test_histogram(values: list[float], counts: list[int]) -> None:
    result = histogram(np.array(values, dtype=np.float64), [0.0, 1.0, 2.0])
    assert result == counts
    assert all(type(c) is int for c in result)


@pytest.mark.parametrize(
    ("feature", "lo", "hi", "bins"),
    [
        ("brightness", 0.0, 255.0, 32),
        ("contrast", 0.0, 128.0, 32),
        ("sharpness", 0.0, 12.0, 24),
        ("clipped", 0.0, 1.0, 20),
        ("r_mean", 0.0, 255.0, 32),
        ("g_mean", 0.0, 255.0, 32),
        ("b_mean", 0.0, 255.0, 32),
        ("p_defect", 0.0, 1.0, 20),
    ],
)
def test_default_edges(feature: str, lo: float, hi: float, bins: int) -> None:
    edges = default_edges(feature)
    assert len(edges) == bins + 1
    assert (edges[0], edges[-1]) == (lo, hi)
    assert all(b > a for a, b in itertools.pairwise(edges))
    assert all(type(e) is float for e in edges)
    assert edges[1] == pytest.approx((hi - lo) / bins)


def test_every_feature_has_default_edges() -> None:
    for name in FEATURE_NAMES:
        assert len(default_edges(name)) >= 2


# --- reference profile -------------------------------------------------------------------

# Five frames, windows of two: windows [0:2] and [2:4]; the fifth frame is in no window.
IMAGE_COLUMN = [1.0, 3.0, 5.0, 9.0, 100.0]
P_DEFECT_COLUMN = [0.01, 0.02, 0.5, 0.97, 1.0]


def _rows() -> npt.NDArray[np.float64]:
    rows = np.empty((5, 8), dtype=np.float64)
    rows[:, :7] = np.array(IMAGE_COLUMN)[:, np.newaxis]
    rows[:, 7] = P_DEFECT_COLUMN
    return rows


def _sparse(counts: list[int]) -> dict[int, int]:
    return {i: c for i, c in enumerate(counts) if c}


def test_reference_profile_statistics() -> None:
    profile = build_reference_profile(_rows(), window_frames=2)
    assert profile.frames == 5
    assert set(profile.features) == set(FEATURE_NAMES)
    for name in IMAGE_FEATURES:
        ref = profile.features[name]
        assert ref.window_frames == 2
        assert ref.mean == pytest.approx(23.6)  # 118 / 5
        # Deviations -22.6 -20.6 -18.6 -14.6 76.4; squares sum to 7331.2; / (5 - 1).
        assert ref.std == pytest.approx(math.sqrt(1832.8))
        # Window means 2 and 7: sample std |7 - 2| / sqrt(2); frame 5 (100) is left out.
        assert ref.window_mean_std == pytest.approx(5 / math.sqrt(2))
        assert ref.edges == default_edges(name)
        assert sum(ref.counts) == 5
    p = profile.features["p_defect"]
    assert p.mean == pytest.approx(0.5)
    assert p.std == pytest.approx(math.sqrt(0.9414 / 4))
    assert p.window_mean_std == pytest.approx((0.735 - 0.015) / math.sqrt(2))


def test_reference_profile_counts() -> None:
    features = build_reference_profile(_rows(), window_frames=2).features
    # brightness edges step 255/32 = 7.97: 1 3 5 -> bin 1, 9 -> bin 2, 100 -> bin 13.
    assert _sparse(features["brightness"].counts) == {1: 3, 2: 1, 13: 1}
    # contrast edges step 4: 100 is an edge and goes to the bin above it.
    assert _sparse(features["contrast"].counts) == {1: 2, 2: 1, 3: 1, 26: 1}
    # sharpness edges step 0.5 up to 12: 1 -> bin 3, ..., 100 -> overflow bin 25.
    assert _sparse(features["sharpness"].counts) == {3: 1, 7: 1, 11: 1, 19: 1, 25: 1}
    # clipped edges 0..1: every value is >= 1, the last edge: all overflow.
    assert _sparse(features["clipped"].counts) == {21: 5}
    # p_defect edges step 0.05: 0.5 is an edge (bin 11), 1.0 the last edge (overflow).
    assert _sparse(features["p_defect"].counts) == {1: 2, 11: 1, 20: 1, 21: 1}
    for name in FEATURE_NAMES:
        assert len(features[name].counts) == len(default_edges(name)) + 1


def test_window_mean_std_matches_numpy_on_random_rows() -> None:
    rows = np.random.default_rng(11).normal(50.0, 10.0, size=(250, 8))
    profile = build_reference_profile(rows, window_frames=30)
    for j, name in enumerate(FEATURE_NAMES):
        col = rows[:240, j]  # 8 whole windows of 30; the last 10 rows are in no window
        means = [col[k : k + 30].mean() for k in range(0, 240, 30)]
        assert profile.features[name].window_mean_std == pytest.approx(np.std(means, ddof=1))
        assert profile.features[name].mean == pytest.approx(rows[:, j].mean())
        assert profile.features[name].std == pytest.approx(rows[:, j].std(ddof=1))


def test_reference_profile_needs_two_windows() -> None:
    build_reference_profile(_rows()[:4], window_frames=2)  # exactly two windows: fine
    with pytest.raises(ValueError, match=r"need at least 4 frames, got 3"):
        build_reference_profile(_rows()[:3], window_frames=2)
    with pytest.raises(ValueError, match=r"need at least 200 frames, got 199"):
        build_reference_profile(np.zeros((199, 8)))


@pytest.mark.parametrize(
    "shape",
    [(10, 7), (10, 9), (80,), (10, 8, 1), (0, 8)],
    ids=["seven-columns", "nine-columns", "one-dimensional", "three-dimensional", "no-rows"],
)
def test_reference_profile_rejects_bad_shape(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"rows must be N x 8|need at least"):
        build_reference_profile(np.zeros(shape), window_frames=2)


def test_reference_profile_wrong_shape_message_names_shape() -> None:
    with pytest.raises(ValueError, match=r"rows must be N x 8, got \(10, 7\)"):
        build_reference_profile(np.zeros((10, 7)), window_frames=2)


def test_constant_rows_have_zero_spread() -> None:
    profile = build_reference_profile(np.full((4, 8), 0.25), window_frames=2)
    for ref in profile.features.values():
        assert (ref.mean, ref.std, ref.window_mean_std) == (0.25, 0.0, 0.0)
