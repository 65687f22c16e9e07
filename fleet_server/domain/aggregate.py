"""Exact merging of telemetry windows into fleet aggregates.

A ``FleetAggregate`` is what a set of windows adds up to: verdict counts, moments,
histograms, sums of P(defect) per bin and latency counts. Merging is exact, so the
aggregate of a set of windows is the same value (``==``) whatever the order and grouping
of the merges (a device's hour, then a line, then the fleet; or all windows at once):

- counts are Python ints;
- moment sums are ``fractions.Fraction`` of each float as sent. A float is a dyadic
  rational, so its Fraction is exact and sums of Fractions are associative and
  commutative; floating point addition is neither. Floats appear only when a value is
  read (``mean``, ``variance``, ``p_sum_floats``), each rounded once;
- histograms are added bin by bin, and only between windows with the same ``ref`` (the
  same edges): merging aggregates of different ``ref`` raises ``ValueError``;
- a bin's sum of P(defect) is kept with the number of frames it covers
  (``p_counted``), because a device leaves out the sum of a sparse bin (privacy rule);
- the devices that contributed are a frozenset, the time span is (min t0, max t1).

Pure and stdlib-only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TypeVar

from edge_agent.protocol.telemetry import P_DEFECT, VERDICT_COUNTS, TelemetryWindow

_ZERO = Fraction(0)
_V = TypeVar("_V")


@dataclass(frozen=True, slots=True)
class ExactMoments:
    """n, sum and sum of squares of one feature, the sums held exactly."""

    n: int
    total: Fraction
    total_sq: Fraction

    def __add__(self, other: ExactMoments) -> ExactMoments:
        return ExactMoments(
            self.n + other.n, self.total + other.total, self.total_sq + other.total_sq
        )

    @property
    def mean(self) -> float:
        """The mean, rounded once to a float; NaN for no values."""
        return float(self.total / self.n) if self.n else float("nan")

    @property
    def variance(self) -> float:
        """Sample variance (n - 1 in the denominator), computed exactly and rounded once;
        NaN below two values."""
        if self.n < 2:
            return float("nan")
        exact = (self.total_sq - self.total * self.total / self.n) / (self.n - 1)
        return float(max(exact, _ZERO))


@dataclass(frozen=True, slots=True)
class FleetAggregate:
    """The exact sum of some windows that share one ``ref`` (histogram edges id).

    Build one with ``from_window`` and combine with ``merge`` (or ``+``); ``EMPTY`` is not
    needed: ``merge_all`` of nothing is ``None``.
    """

    ref: str
    devices: frozenset[str]
    windows: int
    t0: int
    t1: int
    counts: Mapping[str, int]
    moments: Mapping[str, ExactMoments] = field(default_factory=dict)
    hist: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    p_sum: tuple[Fraction, ...] | None = None
    p_counted: tuple[int, ...] | None = None
    latency: tuple[int, ...] | None = None

    @classmethod
    def from_window(cls, device_id: str, window: TelemetryWindow) -> FleetAggregate:
        """One device's window as an aggregate (floats converted exactly)."""
        p_sum: tuple[Fraction, ...] | None = None
        p_counted: tuple[int, ...] | None = None
        p_hist = window.hist.get(P_DEFECT)
        if window.p_sum is not None and p_hist is not None:
            p_sum = tuple(_ZERO if s is None else Fraction(s) for s in window.p_sum)
            p_counted = tuple(
                0 if s is None else int(c) for s, c in zip(window.p_sum, p_hist, strict=True)
            )
        return cls(
            ref=window.ref,
            devices=frozenset((device_id,)),
            windows=1,
            t0=window.t0,
            t1=window.t1,
            counts={k: int(window.counts.get(k, 0)) for k in VERDICT_COUNTS},
            moments={
                name: ExactMoments(m.n, Fraction(m.total), Fraction(m.total_sq))
                for name, m in window.moments.items()
            },
            hist={name: tuple(int(c) for c in v) for name, v in window.hist.items()},
            p_sum=p_sum,
            p_counted=p_counted,
            latency=None if window.latency is None else tuple(int(c) for c in window.latency),
        )

    def merge(self, other: FleetAggregate) -> FleetAggregate:
        """The exact sum of two aggregates.

        Raises:
            ValueError: different ``ref`` (edges), or histograms of one feature with
                different numbers of bins.
        """
        if self.ref != other.ref:
            raise ValueError(
                f"cannot merge windows of different histogram edges: {self.ref} and {other.ref}"
            )
        p_sum, p_counted = _merge_p(self, other)
        return FleetAggregate(
            ref=self.ref,
            devices=self.devices | other.devices,
            windows=self.windows + other.windows,
            t0=min(self.t0, other.t0),
            t1=max(self.t1, other.t1),
            counts={k: self.counts.get(k, 0) + other.counts.get(k, 0) for k in VERDICT_COUNTS},
            moments=_merge_maps(self.moments, other.moments, lambda a, b: a + b),
            hist=_merge_maps(self.hist, other.hist, _add_bins),
            p_sum=p_sum,
            p_counted=p_counted,
            latency=_merge_optional(self.latency, other.latency, "latency"),
        )

    __add__ = merge

    @property
    def frames(self) -> int:
        """Inspected frames (pass + fail + uncertain + error)."""
        return sum(self.counts.get(k, 0) for k in VERDICT_COUNTS if k != "dropped")

    def mean(self, feature: str) -> float | None:
        """The merged mean of ``feature``, or None if no window sent its moments."""
        m = self.moments.get(feature)
        return None if m is None or m.n == 0 else m.mean

    def p_sum_floats(self) -> list[float | None] | None:
        """Sum of P(defect) per bin, as floats; None for a bin whose sum does not cover
        every frame the merged histogram counts in it (a device left it out)."""
        p_hist = self.hist.get(P_DEFECT)
        if self.p_sum is None or self.p_counted is None or p_hist is None:
            return None
        return [
            float(s) if counted == c else None
            for s, counted, c in zip(self.p_sum, self.p_counted, p_hist, strict=True)
        ]


def merge_all(aggregates: Iterable[FleetAggregate]) -> FleetAggregate | None:
    """The sum of ``aggregates`` (left to right), or None for none.

    Raises:
        ValueError: as ``FleetAggregate.merge``.
    """
    result: FleetAggregate | None = None
    for aggregate in aggregates:
        result = aggregate if result is None else result.merge(aggregate)
    return result


def merge_windows(windows: Iterable[tuple[str, TelemetryWindow]]) -> dict[str, FleetAggregate]:
    """``(device_id, window)`` pairs summed per ``ref``: one aggregate per set of edges."""
    by_ref: dict[str, FleetAggregate] = {}
    for device_id, window in windows:
        one = FleetAggregate.from_window(device_id, window)
        current = by_ref.get(window.ref)
        by_ref[window.ref] = one if current is None else current.merge(one)
    return by_ref


def _add_bins(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    if len(a) != len(b):
        raise ValueError(f"histograms of {len(a)} and {len(b)} bins cannot be added")
    return tuple(x + y for x, y in zip(a, b, strict=True))


def _merge_maps(
    a: Mapping[str, _V], b: Mapping[str, _V], combine: Callable[[_V, _V], _V]
) -> dict[str, _V]:
    merged = dict(a)
    for key, value in b.items():
        merged[key] = combine(merged[key], value) if key in merged else value
    return merged


def _merge_optional(
    a: tuple[int, ...] | None, b: tuple[int, ...] | None, what: str
) -> tuple[int, ...] | None:
    if a is None:
        return b
    if b is None:
        return a
    if len(a) != len(b):
        raise ValueError(f"{what} histograms of {len(a)} and {len(b)} bins cannot be added")
    return _add_bins(a, b)


def _merge_p(
    a: FleetAggregate, b: FleetAggregate
) -> tuple[tuple[Fraction, ...] | None, tuple[int, ...] | None]:
    if a.p_sum is None or a.p_counted is None:
        return b.p_sum, b.p_counted
    if b.p_sum is None or b.p_counted is None:
        return a.p_sum, a.p_counted
    if len(a.p_sum) != len(b.p_sum):
        raise ValueError(f"p_sum of {len(a.p_sum)} and {len(b.p_sum)} bins cannot be added")
    return (
        tuple(x + y for x, y in zip(a.p_sum, b.p_sum, strict=True)),
        tuple(x + y for x, y in zip(a.p_counted, b.p_counted, strict=True)),
    )
