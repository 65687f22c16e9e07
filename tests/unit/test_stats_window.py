"""The stats window accumulator (edge_agent.core.stats): what one window holds and when."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.core.features import histogram
from edge_agent.core.stats import WindowAccumulator, edges_of
from edge_agent.protocol.manifest import FEATURE_NAMES
from edge_agent.protocol.telemetry import (
    LATENCY_EDGES_MS,
    check_privacy,
    decode_window,
    edges_id,
    encode_window,
)

MODEL = "reference-onnx@1.0.0"


def _rows(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = np.empty((n, 7))
    rows[:, 0] = rng.normal(65, 4, n)
    rows[:, 1] = rng.normal(16, 3, n)
    rows[:, 2] = rng.normal(6.4, 0.2, n)
    rows[:, 3] = 0.0
    rows[:, 4:] = rng.normal(65, 4, (n, 3))
    return rows


def _fill(acc: WindowAccumulator, rows: np.ndarray, p: np.ndarray, t: float = 0.0) -> None:
    for k, (row, pk) in enumerate(zip(rows, p, strict=True)):
        outcome = "fail" if pk >= 0.5 else "pass"
        acc.add(outcome, row, float(pk), 2.0 + k % 7, t + k * 0.01)


def test_window_holds_moments_and_histograms_of_exactly_its_frames() -> None:
    acc = WindowAccumulator(edges_of(None), max_frames=500)
    rows = _rows(500)
    p = np.random.default_rng(1).random(500)
    _fill(acc, rows, p)
    assert acc.due(5.0)
    window = acc.close(5.0, seq=3, model=MODEL, edge="0.1.0")
    assert window is not None
    check_privacy(window)
    assert window.seq == 3 and window.frames == 500
    assert window.counts["fail"] == int((p >= 0.5).sum())
    full = np.column_stack([rows, p])
    for j, name in enumerate(FEATURE_NAMES):
        m = window.moments[name]
        assert m.n == 500
        assert m.total == pytest.approx(full[:, j].sum(), rel=1e-12)
        assert m.total_sq == pytest.approx((full[:, j] ** 2).sum(), rel=1e-12)
    brightness_edges = edges_of(None)["brightness"]
    assert list(window.hist["brightness"]) == histogram(rows[:, 0], brightness_edges)
    # Sum of p per p_defect bin, for bins of at least 10 frames.
    p_edges = np.asarray(edges_of(None)["p_defect"])
    idx = np.searchsorted(p_edges, p, side="right")
    assert window.p_sum is not None
    for i, s in enumerate(window.p_sum):
        if s is not None:
            assert s == pytest.approx(p[idx == i].sum())
    assert window.latency is not None and sum(window.latency) == 500
    assert len(window.latency) == len(LATENCY_EDGES_MS) + 1
    assert window.ref == edges_id(edges_of(None))
    assert len(encode_window(window)) <= 2048


def test_under_50_frames_at_the_deadline_carry_over_into_the_next_window() -> None:
    acc = WindowAccumulator(edges_of(None), max_frames=500, max_seconds=60.0)
    _fill(acc, _rows(30), np.zeros(30), t=0.0)
    assert acc.due(61.0)
    assert acc.close(61.0, seq=0, model=MODEL, edge="0.1.0") is None
    assert not acc.due(62.0)  # the deadline restarts; the 30 frames stay
    _fill(acc, _rows(30, seed=2), np.zeros(30), t=70.0)
    assert acc.due(122.0)
    window = acc.close(122.0, seq=0, model=MODEL, edge="0.1.0")
    assert window is not None
    assert window.frames == 60
    assert window.t0 == 0 and window.t1 == 122
    assert window.moments["brightness"].n == 60


def test_histograms_under_10_frames_per_bin_are_left_out() -> None:
    acc = WindowAccumulator(edges_of(None), max_frames=100)
    _fill(acc, _rows(100), np.full(100, 0.01))
    window = acc.close(1.0, seq=0, model=MODEL, edge="0.1.0")
    assert window is not None
    # 100 frames: brightness has 34 bins (needs 340), p_defect 22 (needs 220), latency
    # 14 (needs 140): none may go; the moments still do.
    assert window.hist == {}
    assert window.p_sum is None and window.latency is None
    assert set(window.moments) == set(FEATURE_NAMES)
    check_privacy(window)


def test_error_frames_are_counted_but_carry_no_features() -> None:
    acc = WindowAccumulator(edges_of(None), max_frames=500)
    _fill(acc, _rows(60), np.zeros(60))
    for k in range(40):
        acc.add("error", None, float("nan"), 0.0, 1.0 + k)
    acc.add_dropped(7)
    window = acc.close(50.0, seq=1, model=MODEL, edge="0.1.0")
    assert window is not None
    assert window.counts["error"] == 40 and window.counts["dropped"] == 7
    assert window.frames == 100
    assert window.moments["brightness"].n == 60


def test_mostly_errors_sends_counts_only() -> None:
    acc = WindowAccumulator(edges_of(None), max_frames=500)
    _fill(acc, _rows(10), np.zeros(10))
    for k in range(50):
        acc.add("error", None, float("nan"), 0.0, float(k))
    window = acc.close(60.0, seq=1, model=MODEL, edge="0.1.0")
    assert window is not None
    assert window.frames == 60
    assert window.moments == {}  # 10 frames of features: too few to send their sums
    check_privacy(window)


def test_idle_line_is_never_due_and_a_window_starts_with_its_first_frame() -> None:
    acc = WindowAccumulator(edges_of(None), max_seconds=60.0)
    assert not acc.due(1e9)
    _fill(acc, _rows(1), np.zeros(1), t=1000.0)
    assert not acc.due(1059.0)
    assert acc.due(1060.0)


def test_frame_count_closes_before_the_deadline_and_the_next_window_is_fresh() -> None:
    acc = WindowAccumulator(edges_of(None), max_frames=50)
    _fill(acc, _rows(50), np.zeros(50))
    assert acc.due(0.6)
    first = acc.close(0.6, seq=0, model=MODEL, edge="0.1.0")
    assert first is not None and first.frames == 50
    assert acc.frames == 0
    assert acc.close(0.7, seq=1, model=MODEL, edge="0.1.0") is None


def test_more_frames_than_planned_grow_the_buffer() -> None:
    acc = WindowAccumulator(edges_of(None), max_frames=50)
    _fill(acc, _rows(175), np.zeros(175))  # the caller closed late: nothing is lost
    window = acc.close(9.0, seq=0, model=MODEL, edge="0.1.0")
    assert window is not None and window.moments["brightness"].n == 175


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_frames": 49}, "max_frames must be >= 50"),
        ({"max_seconds": 0.0}, "max_seconds must be > 0"),
    ],
)
def test_bad_settings_name_the_setting(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        WindowAccumulator(edges_of(None), **kwargs)  # type: ignore[arg-type]


def test_missing_edges_are_named() -> None:
    edges = edges_of(None)
    del edges["sharpness"]
    with pytest.raises(ValueError, match="sharpness"):
        WindowAccumulator(edges)


def test_decoded_window_matches_what_was_built() -> None:
    acc = WindowAccumulator(edges_of(None))
    _fill(acc, _rows(500, seed=5), np.random.default_rng(5).random(500))
    window = acc.close(9.0, seq=11, model=MODEL, edge="0.1.0")
    assert window is not None
    back = decode_window(encode_window(window))
    assert back.moments == window.moments
    assert back.seq == 11 and back.ref == window.ref
