"""Tests for edge_agent.core.preprocess against tensors computed by hand.

Images are BGR uint8 (H, W, 3), written pixel by pixel as (B, G, R) triplets.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from edge_agent.core.preprocess import Preprocessor, Quantization
from edge_agent.protocol.manifest import (
    ColorOrder,
    DType,
    InputSpec,
    Layout,
    Normalization,
    RegionOfInterest,
    ResizeMode,
)

Image = npt.NDArray[np.uint8]

U8_IDENTITY = Quantization(scale=1 / 255, zero_point=0)
I8_SHIFT = Quantization(scale=1 / 255, zero_point=-128)


def _img(rows: list[list[tuple[int, int, int]]]) -> Image:
    return np.array(rows, dtype=np.uint8)


def _spec(
    width: int,
    height: int,
    *,
    layout: Layout = Layout.NHWC,
    dtype: DType = DType.FLOAT32,
    color: ColorOrder = ColorOrder.BGR,
    resize: ResizeMode = ResizeMode.STRETCH,
    pad_value: int = 0,
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0),
    std: tuple[float, float, float] = (255.0, 255.0, 255.0),
    roi: RegionOfInterest | None = None,
) -> InputSpec:
    return InputSpec(
        width=width,
        height=height,
        layout=layout,
        dtype=dtype,
        color=color,
        resize=resize,
        pad_value=pad_value,
        normalization=Normalization(mean=mean, std=std),
        roi=roi,
    )


# 2x2, BGR: B = 10, 40, 70, 100; G = B + 10; R = B + 20.
SQUARE = _img(
    [
        [(10, 20, 30), (40, 50, 60)],
        [(70, 80, 90), (100, 110, 120)],
    ]
)


# --- normalization and layout ------------------------------------------------------------


def test_nchw_float32_rgb_default_normalization() -> None:
    spec = _spec(2, 2, layout=Layout.NCHW, dtype=DType.FLOAT32, color=ColorOrder.RGB)
    tensor = Preprocessor(spec)(SQUARE)
    expected = np.array(
        [
            [
                [[30, 60], [90, 120]],  # R
                [[20, 50], [80, 110]],  # G
                [[10, 40], [70, 100]],  # B
            ]
        ],
        dtype=np.float64,
    )
    assert tensor.dtype == np.float32
    assert tensor.shape == (1, 3, 2, 2)
    np.testing.assert_allclose(tensor.astype(np.float64), expected / 255.0, rtol=1e-6, atol=0)


def test_nhwc_float32_bgr_per_channel_mean_std() -> None:
    # mean/std in the tensor's (BGR) order: B (10, 10), G (20, 10), R (30, 20).
    spec = _spec(
        2,
        2,
        layout=Layout.NHWC,
        dtype=DType.FLOAT32,
        color=ColorOrder.BGR,
        mean=(10, 20, 30),
        std=(10, 10, 20),
    )
    tensor = Preprocessor(spec)(SQUARE)
    expected = [
        [
            [[0.0, 0.0, 0.0], [3.0, 3.0, 1.5]],
            [[6.0, 6.0, 3.0], [9.0, 9.0, 4.5]],
        ]
    ]
    assert tensor.dtype == np.float32
    np.testing.assert_allclose(tensor.astype(np.float64), np.array(expected), rtol=1e-6, atol=1e-6)


def test_mean_std_follow_the_rgb_color_order() -> None:
    # The same numbers as above with the channels reversed: R (30, 20), G (20, 10), B (10, 10).
    spec = _spec(
        2,
        2,
        layout=Layout.NHWC,
        dtype=DType.FLOAT32,
        color=ColorOrder.RGB,
        mean=(30, 20, 10),
        std=(20, 10, 10),
    )
    tensor = Preprocessor(spec)(SQUARE)
    expected = [
        [
            [[0.0, 0.0, 0.0], [1.5, 3.0, 3.0]],
            [[3.0, 6.0, 6.0], [4.5, 9.0, 9.0]],
        ]
    ]
    np.testing.assert_allclose(tensor.astype(np.float64), np.array(expected), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layout", [Layout.NCHW, Layout.NHWC])
def test_float32_identity_normalization_gives_pixels(layout: Layout) -> None:
    spec = _spec(2, 2, layout=layout, dtype=DType.FLOAT32, color=ColorOrder.BGR, std=(1, 1, 1))
    tensor = Preprocessor(spec)(SQUARE)
    expected = SQUARE.astype(np.float32)[np.newaxis]
    if layout is Layout.NCHW:
        expected = expected.transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(tensor, expected)
    assert tensor.dtype == np.float32


# --- quantized inputs --------------------------------------------------------------------


def test_uint8_identity_quantization_is_the_rgb_pixels() -> None:
    spec = _spec(2, 2, layout=Layout.NCHW, dtype=DType.UINT8, color=ColorOrder.RGB)
    tensor = Preprocessor(spec, U8_IDENTITY)(SQUARE)
    expected = np.array(
        [[[[30, 60], [90, 120]], [[20, 50], [80, 110]], [[10, 40], [70, 100]]]], dtype=np.uint8
    )
    assert tensor.dtype == np.uint8
    np.testing.assert_array_equal(tensor, expected)


def test_uint8_identity_nhwc_rgb() -> None:
    spec = _spec(2, 2, layout=Layout.NHWC, dtype=DType.UINT8, color=ColorOrder.RGB)
    tensor = Preprocessor(spec, U8_IDENTITY)(SQUARE)
    expected = [[[[30, 20, 10], [60, 50, 40]], [[90, 80, 70], [120, 110, 100]]]]
    assert tensor.dtype == np.uint8
    np.testing.assert_array_equal(tensor, np.array(expected, dtype=np.uint8))


def test_int8_zero_point_minus_128_is_pixel_minus_128() -> None:
    image = _img([[(0, 128, 255), (255, 0, 128), (1, 127, 129), (254, 2, 100)]])
    spec = _spec(4, 1, layout=Layout.NHWC, dtype=DType.INT8, color=ColorOrder.RGB)
    tensor = Preprocessor(spec, I8_SHIFT)(image)
    # RGB pixels (255,128,0) (128,0,255) (129,127,1) (100,2,254), each minus 128.
    expected = [[[[127, 0, -128], [0, -128, 127], [1, -1, -127], [-28, -126, 126]]]]
    assert tensor.dtype == np.int8
    np.testing.assert_array_equal(tensor, np.array(expected, dtype=np.int8))


def test_int8_shift_covers_every_pixel_value() -> None:
    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    image = np.dstack([values, values, values])
    spec = _spec(16, 16, layout=Layout.NCHW, dtype=DType.INT8, color=ColorOrder.RGB)
    tensor = Preprocessor(spec, I8_SHIFT)(image)
    expected = (np.arange(256) - 128).reshape(16, 16)
    for channel in range(3):
        np.testing.assert_array_equal(tensor[0, channel].astype(np.int64), expected)


@pytest.mark.parametrize("dtype", [DType.UINT8, DType.INT8])
def test_general_quantization_without_clipping(dtype: DType) -> None:
    # x = (p - 100) / 50; q = x / 0.5 + 10 = 0.04 p + 6, rounded to nearest.
    image = _img([[(0, 100, 255), (37, 38, 200), (150, 25, 0)]])
    spec = _spec(
        3, 1, layout=Layout.NHWC, dtype=dtype, color=ColorOrder.BGR, mean=(100,) * 3, std=(50,) * 3
    )
    tensor = Preprocessor(spec, Quantization(scale=0.5, zero_point=10))(image)
    # 0.04 * (0, 100, 255) + 6 = (6, 10, 16.2); (37, 38, 200) -> (7.48, 7.52, 14); ...
    expected = [[[[6, 10, 16], [7, 8, 14], [12, 7, 6]]]]
    assert tensor.dtype == np.dtype(dtype.value)
    np.testing.assert_array_equal(tensor.astype(np.int64), expected)


# x = (p - 100) / 50; q = x / 0.01 + 10 = 2 p - 190, clipped to the dtype's range.
CLIP_IMAGE = _img([[(0, 95, 96), (100, 150, 222), (223, 255, 97), (30, 31, 158), (159, 189, 190)]])


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        (
            DType.UINT8,
            [[0, 0, 2], [10, 110, 254], [255, 255, 4], [0, 0, 126], [128, 188, 190]],
        ),
        (
            DType.INT8,
            [[-128, 0, 2], [10, 110, 127], [127, 127, 4], [-128, -128, 126], [127, 127, 127]],
        ),
    ],
)
def test_general_quantization_clips(dtype: DType, expected: list[list[int]]) -> None:
    spec = _spec(
        5, 1, layout=Layout.NHWC, dtype=dtype, color=ColorOrder.BGR, mean=(100,) * 3, std=(50,) * 3
    )
    tensor = Preprocessor(spec, Quantization(scale=0.01, zero_point=10))(CLIP_IMAGE)
    assert tensor.dtype == np.dtype(dtype.value)
    np.testing.assert_array_equal(tensor.astype(np.int64), [[expected]])


def test_integer_shift_clips_uint8_at_zero() -> None:
    # gain 1, offset -128 on a uint8 input: q = p - 128 clipped at 0.
    image = _img([[(0, 128, 255), (100, 200, 129)]])
    spec = _spec(
        2,
        1,
        layout=Layout.NHWC,
        dtype=DType.UINT8,
        color=ColorOrder.BGR,
        mean=(128,) * 3,
        std=(1,) * 3,
    )
    tensor = Preprocessor(spec, Quantization(scale=1.0, zero_point=0))(image)
    np.testing.assert_array_equal(tensor, np.array([[[[0, 0, 127], [0, 72, 1]]]], np.uint8))


def test_integer_shift_clips_int8_at_127() -> None:
    # gain 1, offset +5: q = p + 5 clipped at 127.
    image = _img([[(0, 122, 123), (200, 255, 1)]])
    spec = _spec(2, 1, layout=Layout.NHWC, dtype=DType.INT8, color=ColorOrder.BGR, std=(1,) * 3)
    tensor = Preprocessor(spec, Quantization(scale=1.0, zero_point=5))(image)
    np.testing.assert_array_equal(tensor, np.array([[[[5, 127, 127], [127, 127, 6]]]], np.int8))


def test_per_channel_quantization_in_rgb_order() -> None:
    # RGB mean (0, 100, 200), std (1, 2, 4), scale 1, zp 0: q_c = (p_c - mean_c) / std_c.
    image = _img(
        [
            [(40, 10, 200), (0, 30, 5)],
            [(255, 250, 0), (207, 104, 100)],
        ]
    )
    spec = _spec(
        2,
        2,
        layout=Layout.NCHW,
        dtype=DType.INT8,
        color=ColorOrder.RGB,
        mean=(0, 100, 200),
        std=(1, 2, 4),
    )
    tensor = Preprocessor(spec, Quantization(scale=1.0, zero_point=0))(image)
    expected = [
        [
            [[127, 5], [0, 100]],  # R: 200 clipped to 127
            [[-45, -35], [75, 2]],  # G: (10-100)/2, (30-100)/2, (250-100)/2, (104-100)/2
            [[-40, -50], [14, 2]],  # B: (40-200)/4, (0-200)/4, 13.75, 1.75
        ]
    ]
    np.testing.assert_array_equal(tensor, np.array(expected, dtype=np.int8))


@pytest.mark.parametrize("dtype", [DType.UINT8, DType.INT8])
def test_quantized_dtype_needs_quantization(dtype: DType) -> None:
    with pytest.raises(ValueError, match=dtype.value):
        Preprocessor(_spec(2, 2, dtype=dtype))


# --- fitting: ROI and resize -------------------------------------------------------------

# 4 wide, 2 high; B channel below, G = B + 1, R = B + 2.
_B = np.array([[10, 20, 100, 200], [30, 40, 100, 200]], dtype=np.uint8)
WIDE = np.dstack([_B, _B + 1, _B + 2])


def _fit(spec: InputSpec, image: Image) -> Image:
    fitted = Preprocessor(spec).fit(image)
    assert fitted.dtype == np.uint8
    assert fitted.shape == (spec.height, spec.width, 3)
    return fitted


def test_stretch_shrink_averages_blocks() -> None:
    spec = _spec(2, 1, layout=Layout.NCHW, color=ColorOrder.RGB, std=(1, 1, 1))
    fitted = _fit(spec, WIDE)
    # Left 2x2 block: B (10+20+30+40)/4 = 25; right block: (100+200+100+200)/4 = 150.
    np.testing.assert_array_equal(fitted, [[[25, 26, 27], [150, 151, 152]]])
    tensor = Preprocessor(spec)(WIDE)
    np.testing.assert_array_equal(tensor, [[[[27, 152]], [[26, 151]], [[25, 150]]]])


def test_stretch_enlarge_is_bilinear() -> None:
    image = _img([[(0, 0, 0), (100, 100, 100)]])
    fitted = _fit(_spec(4, 2), image)
    # Pixel centres of the 4-wide output map to x = -0.25, 0.25, 0.75, 1.25 in the source.
    np.testing.assert_array_equal(fitted[..., 0], [[0, 25, 75, 100], [0, 25, 75, 100]])
    np.testing.assert_array_equal(fitted[..., 0], fitted[..., 2])


def test_stretch_same_size_keeps_pixels() -> None:
    np.testing.assert_array_equal(_fit(_spec(4, 2), WIDE), WIDE)


def test_letterbox_pads_top_and_bottom() -> None:
    fitted = _fit(_spec(4, 4, resize=ResizeMode.LETTERBOX, pad_value=7), WIDE)
    np.testing.assert_array_equal(
        fitted[..., 0],
        [[7, 7, 7, 7], [10, 20, 100, 200], [30, 40, 100, 200], [7, 7, 7, 7]],
    )
    np.testing.assert_array_equal(fitted[1:3], WIDE)
    assert np.all(fitted[[0, 3]] == 7)


def test_letterbox_odd_padding_puts_the_extra_row_below() -> None:
    fitted = _fit(_spec(4, 5, resize=ResizeMode.LETTERBOX, pad_value=9), WIDE)
    np.testing.assert_array_equal(fitted[1:3], WIDE)
    assert np.all(fitted[0] == 9)
    assert np.all(fitted[3:] == 9)


def test_letterbox_pads_left_and_right() -> None:
    tall = np.ascontiguousarray(WIDE.transpose(1, 0, 2))  # 2 wide, 4 high
    fitted = _fit(_spec(4, 4, resize=ResizeMode.LETTERBOX, pad_value=3), tall)
    np.testing.assert_array_equal(fitted[:, 1:3], tall)
    assert np.all(fitted[:, [0, 3]] == 3)


def test_letterbox_shrinks_then_pads() -> None:
    # 4x2 into 2x2: scale 0.5 -> 2x1 (block averages), one pad row below.
    fitted = _fit(_spec(2, 2, resize=ResizeMode.LETTERBOX, pad_value=5), WIDE)
    np.testing.assert_array_equal(fitted, [[[25, 26, 27], [150, 151, 152]], [[5, 5, 5], [5, 5, 5]]])


def test_center_crop_keeps_middle_columns() -> None:
    fitted = _fit(_spec(2, 2, resize=ResizeMode.CENTER_CROP), WIDE)
    np.testing.assert_array_equal(fitted[..., 0], [[20, 100], [40, 100]])
    np.testing.assert_array_equal(fitted, WIDE[:, 1:3])


def test_center_crop_keeps_middle_rows() -> None:
    tall = np.ascontiguousarray(WIDE.transpose(1, 0, 2))  # 2 wide, 4 high
    fitted = _fit(_spec(2, 2, resize=ResizeMode.CENTER_CROP), tall)
    np.testing.assert_array_equal(fitted, tall[1:3])


def test_center_crop_shrinks_then_crops() -> None:
    # 4x4 into 2x1: scale max(2/4, 1/4) = 0.5 -> 2x2 of block averages, keep row 0.
    b = np.array(
        [[0, 4, 8, 12], [4, 8, 12, 16], [100, 100, 200, 200], [100, 100, 200, 200]],
        dtype=np.uint8,
    )
    image = np.dstack([b, b, b])
    fitted = _fit(_spec(2, 1, resize=ResizeMode.CENTER_CROP), image)
    np.testing.assert_array_equal(fitted[..., 0], [[4, 12]])


_GRID = np.arange(16, dtype=np.uint8).reshape(4, 4) * 10
GRID = np.dstack([_GRID, _GRID + 1, _GRID + 2])


def test_roi_crop_without_resize() -> None:
    roi = RegionOfInterest(x=0.25, y=0.5, width=0.5, height=0.5)
    fitted = _fit(_spec(2, 2, roi=roi), GRID)
    np.testing.assert_array_equal(fitted[..., 0], [[90, 100], [130, 140]])
    np.testing.assert_array_equal(fitted, GRID[2:4, 1:3])


def test_roi_crop_then_resize() -> None:
    # Top-right 2x2 block (20, 30, 60, 70) averaged to one pixel: 45.
    roi = RegionOfInterest(x=0.5, y=0.0, width=0.5, height=0.5)
    fitted = _fit(_spec(1, 1, roi=roi), GRID)
    np.testing.assert_array_equal(fitted, [[[45, 46, 47]]])


def test_roi_then_tensor() -> None:
    roi = RegionOfInterest(x=0.0, y=0.75, width=0.5, height=0.25)
    spec = _spec(2, 1, layout=Layout.NCHW, dtype=DType.UINT8, color=ColorOrder.RGB, roi=roi)
    tensor = Preprocessor(spec, U8_IDENTITY)(GRID)
    # Bottom row, first two pixels: B 120, 130; G +1; R +2.
    np.testing.assert_array_equal(tensor, [[[[122, 132]], [[121, 131]], [[120, 130]]]])


# Regression: a valid narrow ROI at the right edge of a small frame crops nothing.
# x0 = round(0.9 * 4) = 4 == width, so image[:, 4:5] is empty and cv2.resize raises.
def test_narrow_roi_at_the_frame_edge_keeps_the_last_column() -> None:
    roi = RegionOfInterest(x=0.9, y=0.0, width=0.1, height=1.0)
    fitted = _fit(_spec(1, 2, roi=roi), WIDE)
    np.testing.assert_array_equal(fitted, WIDE[:, 3:4])


# --- output shape, dtype and memory layout, for every path -------------------------------

Path = tuple[DType, "Quantization | None", tuple[float, float, float], tuple[float, float, float]]

# (dtype, quantization, mean, std): one entry per code path of to_tensor.
_PATHS: list[tuple[str, Path]] = [
    ("float-general", (DType.FLOAT32, None, (0.0, 0.0, 0.0), (255.0,) * 3)),
    ("float-identity", (DType.FLOAT32, None, (0.0, 0.0, 0.0), (1.0,) * 3)),
    ("uint8-identity", (DType.UINT8, U8_IDENTITY, (0.0, 0.0, 0.0), (255.0,) * 3)),
    ("uint8-shift", (DType.UINT8, U8_IDENTITY, (3.0,) * 3, (255.0,) * 3)),
    ("uint8-general", (DType.UINT8, Quantization(0.02, 3), (1.0, 2.0, 3.0), (50.0,) * 3)),
    ("int8-minus-128", (DType.INT8, I8_SHIFT, (0.0, 0.0, 0.0), (255.0,) * 3)),
    ("int8-shift", (DType.INT8, Quantization(1.0, 7), (0.0,) * 3, (1.0,) * 3)),
    ("int8-general", (DType.INT8, Quantization(0.05, -3), (9.0, 8.0, 7.0), (60.0,) * 3)),
]


@pytest.mark.parametrize("color", [ColorOrder.RGB, ColorOrder.BGR])
@pytest.mark.parametrize("layout", [Layout.NCHW, Layout.NHWC])
@pytest.mark.parametrize("path", [pytest.param(p, id=i) for i, p in _PATHS])
def test_tensor_shape_dtype_and_contiguity(layout: Layout, color: ColorOrder, path: Path) -> None:
    dtype, quant, mean, std = path
    image = np.random.default_rng(3).integers(0, 256, size=(7, 5, 3), dtype=np.uint8)
    spec = _spec(3, 2, layout=layout, dtype=dtype, color=color, mean=mean, std=std)
    pre = Preprocessor(spec, quant)
    tensor = pre(image)
    expected_shape = (1, 3, 2, 3) if layout is Layout.NCHW else (1, 2, 3, 3)
    assert tensor.shape == expected_shape
    assert tensor.dtype == np.dtype(dtype.value)
    assert tensor.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(tensor, pre.to_tensor(pre.fit(image)))
    # The same map written out in float64: (p - mean) / std, then quantized.
    fitted = pre.fit(image).astype(np.float64)
    if color is ColorOrder.RGB:
        fitted = fitted[..., ::-1]
    real = (fitted - np.asarray(mean)) / np.asarray(std)
    if quant is not None:
        lo, hi = (0, 255) if dtype is DType.UINT8 else (-128, 127)
        real = np.clip(np.rint(real / quant.scale + quant.zero_point), lo, hi)
    if layout is Layout.NCHW:
        real = real.transpose(2, 0, 1)
    np.testing.assert_allclose(tensor[0].astype(np.float64), real, rtol=1e-5, atol=1e-5)


def test_call_does_not_modify_the_frame() -> None:
    frame = WIDE.copy()
    spec = _spec(
        2,
        2,
        layout=Layout.NCHW,
        dtype=DType.INT8,
        color=ColorOrder.RGB,
        resize=ResizeMode.CENTER_CROP,
    )
    Preprocessor(spec, I8_SHIFT)(frame)
    np.testing.assert_array_equal(frame, WIDE)
