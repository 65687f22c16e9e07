"""Per-frame image features for drift detection, and reference profiles built from them.

Features are computed on the frame after region-of-interest crop and resize to the
model's input size (the image the model actually sees), so their cost is a small,
fixed share of inference and they do not depend on the camera's resolution.

Wire order is ``edge_agent.protocol.manifest.FEATURE_NAMES``: brightness, contrast,
sharpness, clipped, r_mean, g_mean, b_mean, p_defect.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import numpy.typing as npt

from edge_agent.protocol.manifest import FEATURE_NAMES, FeatureReference, ReferenceProfile

IMAGE_FEATURES = FEATURE_NAMES[:-1]  # all but p_defect, which comes from the model
_CLIP_LOW = np.uint8(3)  # gray levels 3..252 are not clipped
_CLIP_HIGH = np.uint8(252)
_MIN_BINNED = 32

# Fixed histogram edges. Image features have physical ranges, so edges are fixed rather
# than taken from data quantiles: that keeps them identical across bundles of one model
# line and lets histograms from different devices add up exactly.
_DEFAULT_EDGES: dict[str, tuple[float, float, int]] = {
    "brightness": (0.0, 255.0, 32),
    "contrast": (0.0, 128.0, 32),
    "sharpness": (0.0, 12.0, 24),
    "clipped": (0.0, 1.0, 20),
    "r_mean": (0.0, 255.0, 32),
    "g_mean": (0.0, 255.0, 32),
    "b_mean": (0.0, 255.0, 32),
    "p_defect": (0.0, 1.0, 20),
}


def image_features(image_bgr: npt.NDArray[np.uint8]) -> npt.NDArray[np.float64]:
    """Return the seven image features of a BGR uint8 image, in wire order.

    All are taken on the image binned 2x2 (``binned``; ADR 8): a quarter of the pixels,
    and a sharpness that sensor noise does not dominate. brightness: mean gray level
    (0..255); contrast: RMS contrast, the standard deviation of gray levels; sharpness:
    log(1 + variance of the Laplacian); clipped: share of pixels at <= 2 or >= 253 gray;
    r_mean, g_mean, b_mean: channel means (0..255).
    """
    small = binned(image_bgr)
    gray = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY)
    mean, std = cv2.meanStdDev(gray)
    lap = cv2.Laplacian(gray, cv2.CV_16S, ksize=1)
    n = gray.size
    # Variance as E[L^2] - E[L]^2 from two reductions: meanStdDev on a 16-bit image is
    # several times slower than norm + sumElems, and this runs on every frame.
    lap_mean = cv2.sumElems(lap)[0] / n
    lap_var = max(0.0, cv2.norm(lap, cv2.NORM_L2SQR) / n - lap_mean * lap_mean)
    # uint8 arithmetic wraps: gray - 3 puts 0..2 at 253..255 and 253..255 at 250..252, so
    # one comparison counts both ends (cheaper than cv2.inRange on small images).
    clipped = np.count_nonzero((gray - _CLIP_LOW) > _CLIP_HIGH - _CLIP_LOW)
    b, g, r, _ = cv2.mean(small)
    return np.array(
        [float(mean[0, 0]), float(std[0, 0]), math.log1p(lap_var), clipped / n, r, g, b],
        dtype=np.float64,
    )


def binned(image: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """The image averaged over 2x2 blocks (an odd last row or column is dropped). Images
    under 32 pixels on a side are returned as they are."""
    h, w = image.shape[:2]
    if min(h, w) < _MIN_BINNED:
        return image
    even = image[: h - h % 2, : w - w % 2]
    return np.asarray(cv2.resize(even, (w // 2, h // 2), interpolation=cv2.INTER_AREA))


def default_edges(feature: str) -> list[float]:
    lo, hi, bins = _DEFAULT_EDGES[feature]
    return [float(v) for v in np.linspace(lo, hi, bins + 1)]


def histogram(values: npt.NDArray[np.float64], edges: list[float]) -> list[int]:
    """Counts with an underflow and an overflow bin: ``len(edges) + 1`` entries.

    Bin i (1..len(edges)-1) holds edges[i-1] <= v < edges[i]; values >= the last edge go
    to the overflow bin, values < the first edge to the underflow bin.
    """
    idx = np.searchsorted(np.asarray(edges), values, side="right")
    return [int(c) for c in np.bincount(idx, minlength=len(edges) + 1)]


def build_reference_profile(
    rows: npt.NDArray[np.float64], window_frames: int = 100
) -> ReferenceProfile:
    """Build a reference profile from per-frame feature rows (N x 8, wire order).

    ``window_mean_std`` is the standard deviation of the means of consecutive
    ``window_frames``-frame windows: what a window-mean CUSUM needs as sigma.
    """
    if rows.ndim != 2 or rows.shape[1] != len(FEATURE_NAMES):
        raise ValueError(f"rows must be N x {len(FEATURE_NAMES)}, got {rows.shape}")
    n = rows.shape[0]
    if n < 2 * window_frames:
        raise ValueError(f"need at least {2 * window_frames} frames, got {n}")
    n_windows = n // window_frames
    features: dict[str, FeatureReference] = {}
    for j, name in enumerate(FEATURE_NAMES):
        col = rows[:, j]
        edges = default_edges(name)
        means = col[: n_windows * window_frames].reshape(n_windows, window_frames).mean(axis=1)
        features[name] = FeatureReference(
            edges=edges,
            counts=histogram(col, edges),
            mean=float(col.mean()),
            std=float(col.std(ddof=1)),
            window_frames=window_frames,
            window_mean_std=float(means.std(ddof=1)),
        )
    return ReferenceProfile(frames=n, features=features)
