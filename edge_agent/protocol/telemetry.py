"""Aggregate telemetry windows on ``devices/{id}/telemetry``, and the privacy contract.

One window is compact JSON (at most MAX_WINDOW_BYTES)::

    {"v": 1, "seq": 17, "t0": 1795000000, "t1": 1795000060,
     "model": "reference-onnx@1.0.0", "edge": "0.1.0", "ref": "<16 hex>",
     "counts": {"pass": 480, "fail": 12, "uncertain": 3, "error": 1, "dropped": 4},
     "moments": {"brightness": [n, sum, sum_sq], ...},
     "hist": {"brightness": [under, b1, ..., over], ...},
     "p_sum": [sum of P(defect) per p_defect bin, or null],
     "latency": [counts on LATENCY_EDGES_MS, with under- and overflow bins]}

Histogram edges are not sent: they come from the active bundle's reference profile
(``ref`` identifies them, so the server only adds up histograms with the same edges).
``t0``/``t1`` are whole seconds.

The privacy rules live here and only here (``check_privacy``); ``encode_window`` refuses
to produce bytes that break them and ``decode_window`` refuses to accept them:

- a window covers at least MIN_WINDOW_FRAMES inspected frames;
- moments are sent only over at least MIN_WINDOW_FRAMES frames;
- a histogram is sent only when it holds at least MIN_FRAMES_PER_BIN frames per bin
  (``sum(counts) >= MIN_FRAMES_PER_BIN * len(counts)``);
- a bin's sum of P(defect) is sent only for a bin holding MIN_FRAMES_PER_BIN frames or
  more (null otherwise), so no sum ever stands for a single frame;
- nothing else: no min/max, no raw values, no image bytes, no per-frame anything. Every
  list has a length fixed by the edges, never by the number of frames.

Pure and stdlib-only; ``decode_window`` raises only ``ValueError``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from edge_agent.protocol.wire import load_document, text_field

VERSION: Final = 1
MAX_WINDOW_BYTES: Final = 2048
MIN_WINDOW_FRAMES: Final = 50
MIN_FRAMES_PER_BIN: Final = 10
MAX_BINS: Final = 66  # 64 bins between edges plus under- and overflow
VERDICT_COUNTS: Final = ("pass", "fail", "uncertain", "error", "dropped")
# Fixed latency edges (milliseconds): the same on every device, so latency histograms
# add up across the fleet whatever the model.
LATENCY_EDGES_MS: Final = (1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 50.0, 75.0, 100.0)
P_DEFECT: Final = "p_defect"

_KEYS: Final = frozenset(
    (
        *("v", "seq", "t0", "t1", "model", "edge", "ref"),
        *("counts", "moments", "hist", "p_sum", "latency"),
    )
)


class PrivacyError(ValueError):
    """A window breaks the privacy contract; the message names the rule and the field."""


@dataclass(frozen=True, slots=True)
class Moments:
    """n, sum and sum of squares of one feature over a window."""

    n: int
    total: float
    total_sq: float

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else math.nan

    @property
    def variance(self) -> float:
        """Sample variance (n - 1 in the denominator); NaN below two values."""
        if self.n < 2:
            return math.nan
        return max(0.0, (self.total_sq - self.total * self.total / self.n) / (self.n - 1))


@dataclass(frozen=True, slots=True)
class TelemetryWindow:
    """One aggregate window as sent. ``frames`` = pass + fail + uncertain + error."""

    seq: int
    t0: int
    t1: int
    model: str
    edge: str
    ref: str
    counts: Mapping[str, int]
    moments: Mapping[str, Moments] = field(default_factory=dict)
    hist: Mapping[str, Sequence[int]] = field(default_factory=dict)
    p_sum: Sequence[float | None] | None = None
    latency: Sequence[int] | None = None

    @property
    def frames(self) -> int:
        return sum(self.counts.get(k, 0) for k in VERDICT_COUNTS if k != "dropped")


def edges_id(edges: Mapping[str, Sequence[float]]) -> str:
    """16 hex digits naming a set of histogram edges (sorted canonical JSON, sha256)."""
    canonical = json.dumps(
        {k: [float(v) for v in edges[k]] for k in sorted(edges)}, separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def bin_floor(counts: Sequence[int]) -> int:
    """Frames a histogram of ``len(counts)`` bins must hold before it may be sent."""
    return MIN_FRAMES_PER_BIN * len(counts)


def check_privacy(window: TelemetryWindow) -> None:
    """Raise PrivacyError if ``window`` may not leave the device (rules in the module doc)."""
    frames = window.frames
    if frames < MIN_WINDOW_FRAMES:
        raise PrivacyError(f"window {window.seq} covers {frames} frames (< {MIN_WINDOW_FRAMES})")
    for name, m in window.moments.items():
        if m.n < MIN_WINDOW_FRAMES:
            raise PrivacyError(f"moments of {name!r} over {m.n} frames (< {MIN_WINDOW_FRAMES})")
        if m.n > frames:
            raise PrivacyError(f"moments of {name!r} over {m.n} frames, window has {frames}")
    for name, counts in window.hist.items():
        _check_histogram(f"histogram {name!r}", counts, frames)
    if window.latency is not None:
        _check_histogram("latency histogram", window.latency, frames)
    if window.p_sum is not None:
        p_hist = window.hist.get(P_DEFECT)
        if p_hist is None or len(p_hist) != len(window.p_sum):
            raise PrivacyError("p_sum needs a p_defect histogram of the same length")
        for i, (count, s) in enumerate(zip(p_hist, window.p_sum, strict=True)):
            if s is None:
                continue
            if count < MIN_FRAMES_PER_BIN:
                raise PrivacyError(
                    f"p_sum[{i}] sent for a bin of {count} frames (< {MIN_FRAMES_PER_BIN})"
                )
            if not 0.0 <= s <= count:
                raise PrivacyError(f"p_sum[{i}] = {s} is outside 0..{count}")


def _check_histogram(what: str, counts: Sequence[int], frames: int) -> None:
    if not 3 <= len(counts) <= MAX_BINS:
        raise PrivacyError(f"{what} has {len(counts)} bins (allowed 3..{MAX_BINS})")
    total = sum(counts)
    if total < bin_floor(counts):
        raise PrivacyError(
            f"{what} holds {total} frames in {len(counts)} bins (< {MIN_FRAMES_PER_BIN} per bin)"
        )
    if total > frames:
        raise PrivacyError(f"{what} holds {total} frames, window has {frames}")


def encode_window(window: TelemetryWindow) -> bytes:
    """Compact JSON bytes of a window that passes ``check_privacy``.

    Raises:
        PrivacyError: the window breaks a privacy rule.
        ValueError: a non-finite number, or more than MAX_WINDOW_BYTES.
    """
    check_privacy(window)
    document: dict[str, object] = {
        "v": VERSION,
        "seq": window.seq,
        "t0": window.t0,
        "t1": window.t1,
        "model": window.model,
        "edge": window.edge,
        "ref": window.ref,
        "counts": {k: int(window.counts.get(k, 0)) for k in VERDICT_COUNTS},
    }
    if window.moments:
        document["moments"] = {
            k: [m.n, m.total, m.total_sq] for k, m in sorted(window.moments.items())
        }
    if window.hist:
        document["hist"] = {k: [int(c) for c in v] for k, v in sorted(window.hist.items())}
    if window.p_sum is not None:
        document["p_sum"] = list(window.p_sum)
    if window.latency is not None:
        document["latency"] = [int(c) for c in window.latency]
    payload = json.dumps(document, separators=(",", ":"), allow_nan=False).encode()
    if len(payload) > MAX_WINDOW_BYTES:
        raise ValueError(f"window of {len(payload)} bytes is over {MAX_WINDOW_BYTES}")
    return payload


def decode_window(payload: bytes) -> TelemetryWindow:
    """Parse, validate and privacy-check a window (the server and the privacy test use this).

    Raises:
        ValueError (PrivacyError included): oversize, not JSON, unknown keys, wrong types,
            or a broken privacy rule.
    """
    document = load_document(
        payload, what="window", max_bytes=MAX_WINDOW_BYTES, keys=_KEYS, version=VERSION
    )
    raw_counts = _mapping(document, "counts")
    if set(raw_counts) != set(VERDICT_COUNTS):
        raise ValueError(f"counts must have exactly {', '.join(VERDICT_COUNTS)}")
    counts = {k: _count(raw_counts[k], f"counts.{k}") for k in VERDICT_COUNTS}
    moments: dict[str, Moments] = {}
    for name, value in _mapping(document, "moments", optional=True).items():
        if not isinstance(value, list) or len(value) != 3:
            raise ValueError(f"moments.{name} must be [n, sum, sum_sq]")
        moments[text_field(name, "moments key")] = Moments(
            _count(value[0], f"moments.{name}.n"),
            _number(value[1], f"moments.{name}.sum"),
            _number(value[2], f"moments.{name}.sum_sq"),
        )
    hist = {
        text_field(name, "hist key"): _counts(value, f"hist.{name}")
        for name, value in _mapping(document, "hist", optional=True).items()
    }
    p_sum: list[float | None] | None = None
    if "p_sum" in document:
        raw = document["p_sum"]
        if not isinstance(raw, list) or len(raw) > MAX_BINS:
            raise ValueError("p_sum must be a list")
        p_sum = [None if s is None else _number(s, "p_sum") for s in raw]
    latency = _counts(document["latency"], "latency") if "latency" in document else None
    window = TelemetryWindow(
        seq=_count(document.get("seq"), "seq"),
        t0=_count(document.get("t0"), "t0"),
        t1=_count(document.get("t1"), "t1"),
        model=text_field(document.get("model"), "model"),
        edge=text_field(document.get("edge"), "edge"),
        ref=text_field(document.get("ref"), "ref"),
        counts=counts,
        moments=moments,
        hist=hist,
        p_sum=p_sum,
        latency=latency,
    )
    check_privacy(window)
    return window


def _mapping(document: dict[str, object], key: str, *, optional: bool = False) -> dict[str, object]:
    if key not in document and optional:
        return {}
    value = document.get(key)
    if not isinstance(value, dict):
        raise ValueError(f"{key} must be an object")
    return value


# Counts, seqs and times fit a signed 64-bit column on every database the server uses.
_MAX_COUNT = 2**63 - 1


def _count(value: object, where: str) -> int:
    if type(value) is not int or not 0 <= value <= _MAX_COUNT:
        raise ValueError(f"{where} must be a non-negative integer below 2**63")
    return value


def _number(value: object, where: str) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{where} must be a finite number")
    return float(value)


def _counts(value: object, where: str) -> list[int]:
    if not isinstance(value, list) or len(value) > MAX_BINS:
        raise ValueError(f"{where} must be a list of at most {MAX_BINS} counts")
    return [_count(c, where) for c in value]
