"""Exact fleet aggregates (fleet_server.domain.aggregate): G5, order and grouping free."""

from __future__ import annotations

import math
import random
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.protocol.telemetry import VERDICT_COUNTS, Moments, TelemetryWindow
from fleet_server.domain.aggregate import (
    ExactMoments,
    FleetAggregate,
    merge_all,
    merge_windows,
)

REF = "0123456789abcdef"
BINS = 5
FEATURES = ("brightness", "p_defect")

_floats = st.floats(min_value=-1e12, max_value=1e12, allow_nan=False, allow_infinity=False)
_counts = st.lists(st.integers(0, 10_000), min_size=BINS, max_size=BINS)


@st.composite
def windows(draw: st.DrawFn) -> tuple[str, TelemetryWindow]:
    device = draw(st.sampled_from(["cam-1", "cam-2", "cam-3", "cam-4"]))
    t0 = draw(st.integers(0, 10**9))
    hist = {name: draw(_counts) for name in draw(st.sets(st.sampled_from(FEATURES)))}
    p_sum: list[float | None] | None = None
    if "p_defect" in hist and draw(st.booleans()):
        p_sum = [
            draw(st.one_of(st.none(), st.floats(0.0, float(c), allow_nan=False)))
            for c in hist["p_defect"]
        ]
    moments = {
        name: Moments(draw(st.integers(0, 10**6)), draw(_floats), abs(draw(_floats)))
        for name in draw(st.sets(st.sampled_from(FEATURES)))
    }
    window = TelemetryWindow(
        seq=draw(st.integers(0, 10**6)),
        t0=t0,
        t1=t0 + draw(st.integers(0, 3600)),
        model="m@1",
        edge="0.1.0",
        ref=REF,
        counts={k: draw(st.integers(0, 1000)) for k in VERDICT_COUNTS},
        moments=moments,
        hist=hist,
        p_sum=p_sum,
        latency=draw(st.one_of(st.none(), _counts)),
    )
    return device, window


def _tree_merge(items: list[FleetAggregate], rnd: random.Random) -> FleetAggregate:
    """Merge in a random binary tree: any grouping of the (already shuffled) items."""
    if len(items) == 1:
        return items[0]
    cut = rnd.randint(1, len(items) - 1)
    return _tree_merge(items[:cut], rnd).merge(_tree_merge(items[cut:], rnd))


@settings(max_examples=200, deadline=None)
@given(st.lists(windows(), min_size=1, max_size=12), st.randoms(use_true_random=False))
def test_aggregate_is_identical_whatever_the_order_and_grouping(
    pairs: list[tuple[str, TelemetryWindow]], rnd: random.Random
) -> None:
    parts = [FleetAggregate.from_window(device, window) for device, window in pairs]
    in_order = merge_all(parts)
    shuffled = list(parts)
    rnd.shuffle(shuffled)
    regrouped = _tree_merge(shuffled, rnd)
    assert regrouped == in_order
    assert merge_windows(pairs) == {REF: in_order}


def test_float_sums_would_not_be_associative_but_the_aggregate_is() -> None:
    # The reason for exact sums: (a + b) + c != a + (b + c) in floating point.
    a, b, c = 1e16, -1e16, 1.0
    assert (a + b) + c != a + (b + c)
    parts = [
        FleetAggregate.from_window("d", _window(total=x, seq=i)) for i, x in enumerate((a, b, c))
    ]
    left = (parts[0] + parts[1]) + parts[2]
    right = parts[0] + (parts[1] + parts[2])
    assert left == right
    assert left.moments["brightness"].total == Fraction(1)


def _window(*, total: float = 100.0, seq: int = 1, ref: str = REF) -> TelemetryWindow:
    return TelemetryWindow(
        seq=seq,
        t0=100 * seq,
        t1=100 * seq + 60,
        model="m@1",
        edge="0.1.0",
        ref=ref,
        counts={"pass": 90, "fail": 8, "uncertain": 1, "error": 1, "dropped": 3},
        moments={"brightness": Moments(99, total, 5000.0)},
        hist={"brightness": [10, 20, 30, 20, 19], "p_defect": [50, 20, 10, 10, 9]},
        p_sum=[2.5, 5.0, 4.0, None, 8.5],
        latency=[0, 50, 30, 10, 9],
    )


def test_merged_values_are_the_sums_of_the_windows() -> None:
    merged = merge_all(FleetAggregate.from_window(d, _window(seq=i)) for i, d in enumerate("abc"))
    assert merged is not None
    assert merged.devices == frozenset("abc") and merged.windows == 3
    assert merged.t0 == 0 and merged.t1 == 260
    assert merged.frames == 300 and merged.counts["dropped"] == 9
    assert merged.hist["brightness"] == (30, 60, 90, 60, 57)
    assert merged.latency == (0, 150, 90, 30, 27)
    assert merged.moments["brightness"] == ExactMoments(297, Fraction(300), Fraction(15000))
    assert merged.mean("brightness") == pytest.approx(300 / 297)
    assert merged.mean("contrast") is None
    # A bin whose sum a device withheld has no fleet sum either.
    assert merged.p_sum_floats() == [7.5, 15.0, 12.0, None, 25.5]


def test_variance_is_exact_and_rounded_once() -> None:
    m = ExactMoments(3, Fraction(6), Fraction(14))  # values 1, 2, 3
    assert m.variance == 1.0 and m.mean == 2.0
    assert math.isnan(ExactMoments(1, Fraction(1), Fraction(1)).variance)
    assert math.isnan(ExactMoments(0, Fraction(0), Fraction(0)).mean)


def test_windows_with_other_edges_are_never_added_up() -> None:
    a = FleetAggregate.from_window("a", _window())
    b = FleetAggregate.from_window("b", _window(ref="fedcba9876543210"))
    with pytest.raises(ValueError, match="different histogram edges"):
        a.merge(b)
    by_ref = merge_windows([("a", _window()), ("b", _window(ref="fedcba9876543210"))])
    assert sorted(by_ref) == ["0123456789abcdef", "fedcba9876543210"]


def test_histograms_of_different_lengths_are_refused() -> None:
    a = FleetAggregate.from_window("a", _window())
    short = TelemetryWindow(
        seq=2,
        t0=0,
        t1=1,
        model="m@1",
        edge="0.1.0",
        ref=REF,
        counts=dict.fromkeys(VERDICT_COUNTS, 0),
        hist={"brightness": [1, 2, 3]},
    )
    with pytest.raises(ValueError, match="5 and 3 bins"):
        a.merge(FleetAggregate.from_window("b", short))
