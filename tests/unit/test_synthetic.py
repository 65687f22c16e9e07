"""The synthetic inspection line: determinism, sizes, defect rate, defects, lighting, errors."""

from __future__ import annotations

import math

import cv2
import numpy as np
import numpy.typing as npt
import pytest

from edge_agent.core.synthetic import (
    DEFECT_KINDS,
    NO_DEFECT,
    VARIANTS,
    LineConditions,
    render_item,
)

SIZE = (320, 240)


def _gray_mean(image: npt.NDArray[np.uint8]) -> float:
    return float(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY).mean())


def _model_view(image: npt.NDArray[np.uint8]) -> npt.NDArray[np.int16]:
    """The image as the reference model sees it: 160x120, INTER_AREA."""
    small = cv2.resize(image, (160, 120), interpolation=cv2.INTER_AREA)
    return np.asarray(small, dtype=np.int16)


def test_same_arguments_give_identical_bytes() -> None:
    cond = LineConditions(brightness=0.9, color_cast=(1.1, 1.0, 0.9), defect_rate=0.5)
    first = render_item(7, 3, SIZE, cond)
    again = render_item(7, 3, SIZE, cond)
    assert first.image.tobytes() == again.image.tobytes()
    assert (first.label, first.defect) == (again.label, again.defect)


@pytest.mark.parametrize(("seed", "index"), [(8, 3), (7, 4)])
def test_other_seed_or_index_gives_other_pixels(seed: int, index: int) -> None:
    base = render_item(7, 3, SIZE)
    other = render_item(seed, index, SIZE)
    assert base.image.tobytes() != other.image.tobytes()


@pytest.mark.parametrize("size", [(32, 24), (160, 120), (641, 479), (1920, 1080)])
def test_renders_requested_size_as_bgr_uint8(size: tuple[int, int]) -> None:
    item = render_item(1, 0, size)
    assert item.image.shape == (size[1], size[0], 3)
    assert item.image.dtype == np.uint8
    assert item.image.flags.c_contiguous


def test_scene_is_the_same_at_any_size() -> None:
    # Geometry is in scene units: a large render, shrunk, looks like a small render.
    small = _model_view(render_item(2, 5, (160, 120), LineConditions(noise=0.0)).image)
    large = _model_view(render_item(2, 5, (1280, 960), LineConditions(noise=0.0)).image)
    assert float(np.abs(small - large).mean()) < 6.0


@pytest.mark.parametrize(("rate", "n"), [(0.1, 2000), (0.5, 1000)])
def test_defect_rate_matches_within_binomial_tolerance(rate: float, n: int) -> None:
    cond = LineConditions(defect_rate=rate)
    items = [render_item(11, i, (32, 24), cond) for i in range(n)]
    defects = sum(item.label == "defect" for item in items)
    sigma = math.sqrt(n * rate * (1 - rate))
    assert abs(defects - n * rate) < 4.5 * sigma
    assert all((item.label == "defect") == (item.defect is not None) for item in items)
    kinds = {item.defect for item in items if item.defect is not None}
    assert kinds == set(DEFECT_KINDS)


@pytest.mark.parametrize(("rate", "label"), [(0.0, "ok"), (1.0, "defect")])
def test_defect_rate_bounds(rate: float, label: str) -> None:
    cond = LineConditions(defect_rate=rate)
    assert {render_item(3, i, (32, 24), cond).label for i in range(50)} == {label}


@pytest.mark.parametrize("kind", DEFECT_KINDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_each_defect_kind_shows_on_the_same_item(kind: str, variant: str) -> None:
    cond = LineConditions(variant=variant)
    for index in range(3):
        good = render_item(21, index, SIZE, cond, defect=NO_DEFECT)
        bad = render_item(21, index, SIZE, cond, defect=kind)
        assert (good.label, good.defect) == ("ok", None)
        assert (bad.label, bad.defect) == ("defect", kind)
        diff = np.abs(_model_view(bad.image) - _model_view(good.image))
        changed = float((diff.max(axis=2) > 12).mean())
        # Visible to the model (strong local change at 160x120), yet local: the product
        # and its pose are unchanged.
        assert diff.max() >= 30, f"{kind} barely visible at 160x120"
        assert 0.0005 < changed < 0.05


def test_forced_defect_matches_drawn_defect() -> None:
    cond = LineConditions(defect_rate=0.5)
    for index in range(20):
        drawn = render_item(4, index, SIZE, cond)
        forced = render_item(4, index, SIZE, cond, defect=drawn.defect or NO_DEFECT)
        assert forced.image.tobytes() == drawn.image.tobytes()
        assert (forced.label, forced.defect) == (drawn.label, drawn.defect)


def test_brightness_scales_mean_gray() -> None:
    ratios = []
    for index in range(5):
        normal = _gray_mean(render_item(5, index, SIZE).image)
        dim = _gray_mean(render_item(5, index, SIZE, LineConditions(brightness=0.6)).image)
        ratios.append(dim / normal)
    assert all(0.57 < r < 0.63 for r in ratios), ratios


def test_color_cast_gains_apply_per_channel() -> None:
    neutral = render_item(5, 1, SIZE).image.reshape(-1, 3).mean(axis=0)
    warm = render_item(5, 1, SIZE, LineConditions(color_cast=(1.2, 1.0, 0.8))).image
    b, g, r = warm.reshape(-1, 3).mean(axis=0) / neutral
    assert r == pytest.approx(1.2, abs=0.03)
    assert g == pytest.approx(1.0, abs=0.03)
    assert b == pytest.approx(0.8, abs=0.03)


def test_variant_b_is_a_different_product() -> None:
    a = render_item(6, 2, SIZE, LineConditions(variant="a")).image
    b = render_item(6, 2, SIZE, LineConditions(variant="b")).image
    assert float(np.abs(a.astype(np.int16) - b).mean()) > 10.0
    assert _gray_mean(b) > _gray_mean(a) + 10.0


def test_noise_zero_renders_a_cleaner_image() -> None:
    clean = render_item(9, 0, SIZE, LineConditions(noise=0.0)).image
    noisy = render_item(9, 0, SIZE, LineConditions(noise=2.0)).image
    residual = np.abs(noisy.astype(np.int16) - clean)
    assert 1.0 < float(residual.mean()) < 8.0


@pytest.mark.parametrize(
    ("size", "conditions", "defect", "message"),
    [
        pytest.param((31, 24), LineConditions(), None, "size", id="too-narrow"),
        pytest.param((32, 23), LineConditions(), None, "size", id="too-short"),
        pytest.param(SIZE, LineConditions(defect_rate=-0.1), None, "defect_rate", id="rate-neg"),
        pytest.param(SIZE, LineConditions(defect_rate=1.5), None, "defect_rate", id="rate-high"),
        pytest.param(SIZE, LineConditions(variant="c"), None, "variant", id="variant"),
        pytest.param(SIZE, LineConditions(brightness=0.0), None, "brightness", id="dark"),
        pytest.param(SIZE, LineConditions(brightness=-1.0), None, "brightness", id="negative"),
        pytest.param(SIZE, LineConditions(noise=-1.0), None, "noise", id="noise"),
        pytest.param(
            SIZE, LineConditions(color_cast=(1.0, 0.0, 1.0)), None, "color_cast", id="cast"
        ),
        pytest.param(SIZE, LineConditions(), "smudge", "defect", id="unknown-defect"),
    ],
)
def test_bad_arguments_raise_value_error(
    size: tuple[int, int], conditions: LineConditions, defect: str | None, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        render_item(1, 0, size, conditions, defect=defect)


def test_brightness_ramp_darkens_the_line_then_holds() -> None:
    from edge_agent.sources.synthetic import SyntheticLine

    line = SyntheticLine(
        seed=3,
        size=(160, 120),
        conditions=LineConditions(brightness=1.0),
        brightness_end=0.6,
        ramp_frames=4,
        count=6,
    )
    assert [round(line.conditions_at(i).brightness, 3) for i in range(6)] == [
        1.0,
        0.9,
        0.8,
        0.7,
        0.6,
        0.6,
    ]
    means = [float(frame.image.mean()) for frame in line if frame.image is not None]
    assert len(means) == 6
    assert means[4] < 0.75 * means[0]
    assert means[5] < 0.75 * means[0]


def test_no_ramp_keeps_the_conditions() -> None:
    from edge_agent.sources.synthetic import SyntheticLine

    conditions = LineConditions(brightness=0.9)
    line = SyntheticLine(conditions=conditions)
    assert line.conditions_at(10_000) is conditions
