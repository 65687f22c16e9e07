"""What a stored telemetry window says in numbers people read: rates, throughput, latency
percentiles, feature means and their distance from the reference.

Pure: takes the window's stored JSON document (the wire form, see
``edge_agent.protocol.telemetry``) and reference figures, returns plain data. Stored
documents were accepted by ``decode_window``, but every reader here still tolerates a
missing or odd field (a view must render whatever an older schema left behind): such a
figure comes out as None.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

from edge_agent.core.drift import window_sigma
from edge_agent.protocol.manifest import FEATURE_NAMES, FeatureReference, ReferenceProfile
from edge_agent.protocol.telemetry import LATENCY_EDGES_MS, VERDICT_COUNTS

IMAGE_FEATURES: tuple[str, ...] = tuple(f for f in FEATURE_NAMES if f != "p_defect")
OUTCOMES = ("pass", "fail", "uncertain", "error")
# The drift monitor's default smallest sigma, as a share of a feature's narrowest bin
# (edge_agent.core.drift.DriftConfig.sigma_floor_bins): a feature constant in the
# reference (``clipped``) still gets a finite, comparable shift.
SIGMA_FLOOR_BINS = 0.02
BAND_SIGMAS = 3.0


def counts_of(document: Mapping[str, Any]) -> dict[str, int]:
    """The verdict counts of a window (0 for a missing verdict)."""
    raw = document.get("counts")
    counts = raw if isinstance(raw, Mapping) else {}
    return {k: _int(counts.get(k)) or 0 for k in VERDICT_COUNTS}


def feature_means(document: Mapping[str, Any]) -> dict[str, float | None]:
    """Mean of every feature in ``FEATURE_NAMES`` over the window, from its moments
    (None when the window carries no moments of that feature)."""
    raw = document.get("moments")
    moments = raw if isinstance(raw, Mapping) else {}
    return {name: _mean(moments.get(name)) for name in FEATURE_NAMES}


def moment_n(document: Mapping[str, Any], feature: str) -> int:
    """How many frames the window's moments of ``feature`` cover (0 if none)."""
    raw = document.get("moments")
    value = raw.get(feature) if isinstance(raw, Mapping) else None
    if isinstance(value, Sequence) and len(value) == 3 and isinstance(value[0], int):
        return value[0]
    return 0


def latency_quantile(counts: Sequence[int] | None, q: float) -> float | None:
    """The ``q`` quantile (0..1) of a latency histogram on LATENCY_EDGES_MS (under- and
    overflow bins included), interpolated linearly inside its bin; the underflow bin spans
    0 to the first edge, and a quantile in the overflow bin is reported as the last edge
    (a lower bound). None without a histogram of the right length."""
    if counts is None or len(counts) != len(LATENCY_EDGES_MS) + 1:
        return None
    total = sum(counts)
    if total <= 0:
        return None
    bounds = [0.0, *LATENCY_EDGES_MS]
    rank = q * total
    seen = 0.0
    for i, count in enumerate(counts):
        if count > 0 and seen + count >= rank:
            if i >= len(bounds) - 1:
                return bounds[-1]
            lo, hi = bounds[i], bounds[i + 1]
            return lo + (hi - lo) * max(0.0, rank - seen) / count
        seen += count
    return bounds[-1]


def summarize_window(document: Mapping[str, Any]) -> dict[str, Any]:
    """One window as chart data: ``t0``, ``t1``, ``seq``, ``model``, ``frames``,
    ``counts`` (per verdict), ``rates`` (pass/fail/uncertain/error share of inspected
    frames), ``throughput`` (frames/s over t0..t1), ``latency_p50_ms``, ``latency_p99_ms``
    and ``means`` (per feature)."""
    counts = counts_of(document)
    frames = sum(counts[k] for k in OUTCOMES)
    t0, t1 = _int(document.get("t0")), _int(document.get("t1"))
    span = (t1 - t0) if t0 is not None and t1 is not None else 0
    raw_latency = document.get("latency")
    latency = (
        [int(c) for c in raw_latency if isinstance(c, int)]
        if isinstance(raw_latency, list)
        else None
    )
    return {
        "seq": _int(document.get("seq")),
        "t0": t0,
        "t1": t1,
        "model": document.get("model"),
        "frames": frames,
        "counts": counts,
        "rates": {k: (counts[k] / frames if frames else None) for k in OUTCOMES},
        # A window shorter than a second (a burst) is counted over one second.
        "throughput": frames / max(span, 1),
        "latency_p50_ms": latency_quantile(latency, 0.5),
        "latency_p99_ms": latency_quantile(latency, 0.99),
        "means": feature_means(document),
    }


def window_mean_sigma(reference: FeatureReference, n: int | None = None) -> float:
    """Standard deviation of an ``n``-frame window mean of the feature (the profile's
    own window size when None), floored like the drift monitor's CUSUM."""
    frames = reference.window_frames if n is None or n <= 0 else n
    sigma = window_sigma(reference.window_mean_std, reference.std, reference.window_frames, frames)
    narrowest = min(b - a for a, b in itertools.pairwise(reference.edges))
    return max(sigma, SIGMA_FLOOR_BINS * narrowest)


def reference_band(reference: FeatureReference, n: int | None = None) -> tuple[float, float]:
    """The reference mean -/+ BAND_SIGMAS window-mean sigmas (for ``n``-frame windows)."""
    sigma = window_mean_sigma(reference, n)
    return reference.mean - BAND_SIGMAS * sigma, reference.mean + BAND_SIGMAS * sigma


def standardized_shift(
    document: Mapping[str, Any], feature: str, reference: FeatureReference
) -> float | None:
    """(window mean - reference mean) / window-mean sigma, for the window's own frame
    count; None when the window has no moments of ``feature``."""
    mean = feature_means(document).get(feature)
    if mean is None:
        return None
    return (mean - reference.mean) / window_mean_sigma(reference, moment_n(document, feature))


def pool_windows(
    documents: Sequence[Mapping[str, Any]], reference: ReferenceProfile | None
) -> dict[str, Any]:
    """Several windows (a group's devices' latest) added up: ``windows``, ``frames``,
    ``fail_rate``, exact pooled ``means`` per feature (from the moments), and ``shift`` per
    feature in window-mean sigmas against ``reference`` (for windows of the average
    size; empty without a reference)."""
    frames = fails = 0
    sums: dict[str, list[float]] = {name: [0.0, 0.0] for name in FEATURE_NAMES}
    for document in documents:
        counts = counts_of(document)
        frames += sum(counts[k] for k in OUTCOMES)
        fails += counts["fail"]
        means = feature_means(document)
        for name in FEATURE_NAMES:
            mean, n = means[name], moment_n(document, name)
            if mean is not None and n > 0:
                sums[name][0] += mean * n
                sums[name][1] += n
    pooled = {k: (s / n if n else None) for k, (s, n) in sums.items()}
    shift: dict[str, float | None] = {}
    if reference is not None:
        for name, mean in pooled.items():
            feature = reference.features[name]
            n = int(sums[name][1] / max(len(documents), 1))
            shift[name] = (
                None if mean is None else (mean - feature.mean) / window_mean_sigma(feature, n)
            )
    return {
        "windows": len(documents),
        "frames": frames,
        "fail_rate": fails / frames if frames else None,
        "means": pooled,
        "shift": shift,
    }


def _mean(value: object) -> float | None:
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 3:
        return None
    n, total = value[0], value[1]
    if not isinstance(n, int) or n <= 0 or not isinstance(total, int | float):
        return None
    mean = float(total) / n
    return mean if math.isfinite(mean) else None


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
