"""Turn a camera frame into the model's input tensor, exactly as the manifest says.

Two steps, kept apart because drift features are computed on the middle image:

1. ``fit``: crop the region of interest and resize to the model's size (stretch,
   letterbox or center-crop). Result: BGR uint8 at the model's resolution.
2. ``to_tensor``: color order, normalization ``(pixel - mean) / std``, quantization with
   the model's own scale and zero point for uint8/int8 inputs, layout, batch axis.

Normalization and quantization are folded into one per-channel affine map
``pixel * gain + offset`` computed once; when that map is the identity or an integer
shift (the usual uint8/int8 quantized model), no float arithmetic happens per frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

from edge_agent.protocol.manifest import ColorOrder, DType, InputSpec, Layout, ResizeMode

Image = npt.NDArray[np.uint8]
Tensor = npt.NDArray[np.generic]

_INT_RANGE = {DType.UINT8: (0, 255), DType.INT8: (-128, 127)}


@dataclass(frozen=True, slots=True)
class Quantization:
    """A model input's affine quantization: ``real = scale * (q - zero_point)``."""

    scale: float
    zero_point: int


class Preprocessor:
    """Preprocessing for one input spec (and the model's input quantization, if any).

    Raises ValueError at construction when a quantized dtype has no quantization.
    """

    def __init__(self, spec: InputSpec, quant: Quantization | None = None) -> None:
        if spec.dtype is not DType.FLOAT32 and quant is None:
            raise ValueError(f"{spec.dtype.value} input needs the model's quantization")
        self.spec = spec
        self.size = (spec.width, spec.height)
        mean = np.asarray(spec.normalization.mean, dtype=np.float64)
        std = np.asarray(spec.normalization.std, dtype=np.float64)
        gain = 1.0 / std
        offset = -mean / std
        if spec.dtype is not DType.FLOAT32:
            assert quant is not None
            gain = gain / quant.scale
            offset = offset / quant.scale + quant.zero_point
        self._int_shift: int | None = None
        if spec.dtype is not DType.FLOAT32 and np.allclose(gain, 1.0, atol=1e-4):
            rounded = np.rint(offset)
            if np.allclose(offset, rounded, atol=1e-3) and np.all(rounded == rounded[0]):
                self._int_shift = int(rounded[0])
        # mean/std are given in the manifest's color order, which is also the tensor's.
        self._gain = gain.astype(np.float32)
        self._offset = offset.astype(np.float32)
        self._identity = bool(np.all(gain == 1.0) and np.all(offset == 0.0))
        self._planes = (2, 1, 0) if spec.color is ColorOrder.RGB else (0, 1, 2)

    def fit(self, image: Image) -> Image:
        """Crop the ROI and resize to the model's size; returns BGR uint8 (H, W, 3)."""
        roi = self.spec.roi
        if roi is not None:
            h, w = image.shape[:2]
            x0, y0 = min(round(roi.x * w), w - 1), min(round(roi.y * h), h - 1)
            x1 = max(x0 + 1, min(w, round((roi.x + roi.width) * w)))
            y1 = max(y0 + 1, min(h, round((roi.y + roi.height) * h)))
            image = image[y0:y1, x0:x1]
        mode = self.spec.resize
        if mode is ResizeMode.STRETCH:
            return _resize(image, self.size)
        if mode is ResizeMode.LETTERBOX:
            return _letterbox(image, self.size, self.spec.pad_value)
        return _center_crop(image, self.size)

    def to_tensor(self, fitted: Image) -> Tensor:
        """Convert a fitted BGR image to the model's input tensor, with batch axis.

        Arithmetic runs on contiguous per-channel planes: broadcasting over a transposed
        view is several times slower in NumPy.
        """
        dtype = self.spec.dtype
        if dtype is DType.FLOAT32:
            return self._float_tensor(fitted)
        img = fitted
        if self.spec.color is ColorOrder.RGB:
            img = np.asarray(cv2.cvtColor(img, cv2.COLOR_BGR2RGB), dtype=np.uint8)
        lo, hi = _INT_RANGE[dtype]
        target = np.uint8 if dtype is DType.UINT8 else np.int8
        if self._int_shift == 0 and dtype is DType.UINT8:
            q: Tensor = img if img is not fitted else img.copy()
        elif self._int_shift == -128 and dtype is DType.INT8:
            # x - 128 for x in 0..255 is the same bit pattern as flipping the top bit.
            q = (img ^ np.uint8(0x80)).view(np.int8)
        elif self._int_shift is not None:
            q = np.clip(img.astype(np.int16) + self._int_shift, lo, hi).astype(target)
        else:
            real = img.astype(np.float32)
            real *= self._gain
            real += self._offset
            q = np.clip(np.rint(real), lo, hi).astype(target)
        if self.spec.layout is Layout.NCHW:
            q = q.transpose(2, 0, 1)
        # A copy where needed: the caller's frame buffer may be reused by a camera driver.
        return np.ascontiguousarray(q[np.newaxis])

    def _float_tensor(self, fitted: Image) -> Tensor:
        h, w = fitted.shape[:2]
        # OpenCV gives B, G, R planes; the tensor's channel c takes plane _planes[c].
        if self.spec.layout is Layout.NCHW:
            out = np.empty((1, 3, h, w), dtype=np.float32)
            planes = cv2.split(fitted)
            for c in range(3):
                dst = out[0, c]
                np.multiply(planes[self._planes[c]], self._gain[c], out=dst, casting="unsafe")
                if self._offset[c] != 0.0:
                    dst += self._offset[c]
            return out
        img = fitted
        if self.spec.color is ColorOrder.RGB:
            img = np.asarray(cv2.cvtColor(img, cv2.COLOR_BGR2RGB), dtype=np.uint8)
        hwc = img.astype(np.float32)
        if not self._identity:
            hwc *= self._gain
            hwc += self._offset
        return hwc[np.newaxis]

    def __call__(self, image: Image) -> Tensor:
        return self.to_tensor(self.fit(image))


def _interpolation(src: tuple[int, int], dst: tuple[int, int]) -> int:
    # INTER_AREA averages when shrinking (no aliasing of thin scratches); linear when
    # enlarging, where INTER_AREA degenerates to nearest-neighbour.
    if dst[0] <= src[0] and dst[1] <= src[1]:
        return cv2.INTER_AREA
    return cv2.INTER_LINEAR


def _resize(image: Image, size: tuple[int, int]) -> Image:
    h, w = image.shape[:2]
    if (w, h) == size:
        return image
    resized = cv2.resize(image, size, interpolation=_interpolation((w, h), size))
    return np.asarray(resized, dtype=np.uint8)


def _letterbox(image: Image, size: tuple[int, int], pad: int) -> Image:
    h, w = image.shape[:2]
    tw, th = size
    scale = min(tw / w, th / h)
    nw, nh = max(1, min(tw, round(w * scale))), max(1, min(th, round(h * scale)))
    resized = _resize(image, (nw, nh))
    left, top = (tw - nw) // 2, (th - nh) // 2
    padded = cv2.copyMakeBorder(
        resized, top, th - nh - top, left, tw - nw - left, cv2.BORDER_CONSTANT, value=(pad,) * 3
    )
    return np.asarray(padded, dtype=np.uint8)


def _center_crop(image: Image, size: tuple[int, int]) -> Image:
    h, w = image.shape[:2]
    tw, th = size
    scale = max(tw / w, th / h)
    nw, nh = max(tw, math.ceil(w * scale - 1e-9)), max(th, math.ceil(h * scale - 1e-9))
    resized = _resize(image, (nw, nh))
    left, top = (nw - tw) // 2, (nh - th) // 2
    return resized[top : top + th, left : left + tw]
