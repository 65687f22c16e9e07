"""The reject schedule as pure logic: time is an argument, nothing sleeps.

Delay, pulse length, merging of overlapping pulses, late verdicts, the outcome set, and
the conversion of a capture time (wall clock) to a monotonic due time.
"""

from __future__ import annotations

import time

import pytest

from edge_agent.core.verdict import Outcome
from edge_agent.sinks.gpio import (
    RejectSchedule,
    RejectScheduler,
    SimulatedRejectLine,
    Step,
    due_time,
)
from edge_agent.sinks.outputs import VerdictEvent

PULSE = 0.1


def run(schedule: RejectSchedule, until: float) -> list[tuple[float, bool]]:
    """Step the schedule at each time it asks for, up to ``until``; the line changes."""
    changes: list[tuple[float, bool]] = []
    wake = schedule.next_wake()
    while wake is not None and wake <= until:
        step = schedule.step(wake)
        if step.set_active is not None:
            changes.append((round(wake, 9), step.set_active))
        wake = step.wake_at
    return changes


def test_pulse_starts_at_the_due_time_and_lasts_pulse_s() -> None:
    s = RejectSchedule(PULSE)
    assert s.add(due=1.0, now=0.2)
    assert s.step(0.5) == Step(None, 1.0)  # nothing yet; come back at the due time
    assert s.step(1.0) == Step(True, 1.1)
    assert s.step(1.05) == Step(None, 1.1)
    assert s.step(1.1) == Step(False, None)
    assert s.idle
    assert (s.counters.requested, s.counters.pulses, s.counters.late) == (1, 1, 0)


def test_a_late_step_still_gives_the_full_pulse() -> None:
    s = RejectSchedule(PULSE)
    s.add(due=1.0, now=0.0)
    step = s.step(1.25)
    assert step.set_active is True
    assert step.wake_at == pytest.approx(1.35)


def test_driven_extends_to_a_full_pulse_from_the_write() -> None:
    s = RejectSchedule(PULSE)
    s.add(due=1.0, now=0.0)
    s.step(1.0)
    s.driven(True, at=1.003)
    assert s.next_wake() == pytest.approx(1.103)


@pytest.mark.parametrize(
    ("dues", "expected"),
    [
        # overlapping: one pulse from the first start to the last end
        ((1.0, 1.05), [(1.0, True), (1.15, False)]),
        ((1.0, 1.03, 1.06, 1.09), [(1.0, True), (1.19, False)]),
        # back to back: the second starts as the first ends -> still one pulse
        ((1.0, 1.1), [(1.0, True), (1.2, False)]),
        # apart: two pulses
        ((1.0, 1.3), [(1.0, True), (1.1, False), (1.3, True), (1.4, False)]),
        # added out of order: the heap sorts them
        ((1.3, 1.0), [(1.0, True), (1.1, False), (1.3, True), (1.4, False)]),
    ],
    ids=["overlap", "train", "back-to-back", "apart", "out-of-order"],
)
def test_overlapping_pulses_merge(
    dues: tuple[float, ...], expected: list[tuple[float, bool]]
) -> None:
    s = RejectSchedule(PULSE)
    for due in dues:
        s.add(due, now=0.0)
    assert run(s, until=10.0) == expected
    pulses = sum(1 for _, active in expected if active)
    assert s.counters.pulses == pulses
    assert s.counters.merged == len(dues) - pulses


def test_a_request_while_active_extends_the_pulse() -> None:
    s = RejectSchedule(PULSE)
    s.add(due=1.0, now=0.0)
    assert s.step(1.0).set_active is True
    s.add(due=1.08, now=1.02)
    step = s.step(1.08)
    assert step.set_active is None
    assert step.wake_at is not None
    assert step.wake_at == pytest.approx(1.18)
    assert s.step(step.wake_at) == Step(False, None)
    assert s.counters.merged == 1


def test_a_late_verdict_fires_at_once_and_is_counted() -> None:
    s = RejectSchedule(PULSE)
    assert s.add(due=1.0, now=1.3)
    assert s.counters.late == 1
    step = s.step(1.3)
    assert step.set_active is True
    assert step.wake_at == pytest.approx(1.4)


def test_a_verdict_too_late_is_skipped_when_max_late_is_set() -> None:
    s = RejectSchedule(PULSE, max_late_s=0.5)
    assert not s.add(due=1.0, now=1.6)
    assert s.add(due=1.0, now=1.4)  # within the limit: fired, late
    assert (s.counters.skipped, s.counters.late, s.counters.requested) == (1, 1, 2)
    assert run(s, until=10.0) == [(1.4, True), (1.5, False)]


def test_cancel_forgets_pending_pulses() -> None:
    s = RejectSchedule(PULSE)
    s.add(due=1.0, now=0.0)
    s.add(due=2.0, now=0.0)
    assert s.cancel() == 2
    assert s.idle
    assert s.step(3.0) == Step(None, None)


@pytest.mark.parametrize(("pulse", "max_late"), [(0.0, None), (-1.0, None), (0.1, -0.1)])
def test_bad_schedule_settings(pulse: float, max_late: float | None) -> None:
    with pytest.raises(ValueError, match="must be"):
        RejectSchedule(pulse, max_late)


def test_due_time_converts_capture_time_to_the_monotonic_clock() -> None:
    # Captured 50 ms ago (wall clock), delay 200 ms: due 150 ms from now (monotonic).
    assert due_time(100.0, 0.2, wall_now=100.05, mono_now=7.0) == pytest.approx(7.15)
    # A capture stamp in the future counts as now: it cannot hold the reject back.
    assert due_time(101.0, 0.2, wall_now=100.0, mono_now=7.0) == pytest.approx(7.2)


def test_simulated_line_reports_pulses() -> None:
    ticks = iter([1.0, 1.1, 2.0, 2.5])
    line = SimulatedRejectLine(clock=lambda: next(ticks))
    line.set_active(True)
    line.set_active(False)
    line.set_active(True)
    assert line.pulses() == [(1.0, 1.1), (2.0, None)]
    line.close()  # leaves the line inactive
    assert line.writes()[-1] == (2.5, False)
    assert line.closed


# -- which verdicts reject: RejectScheduler.emit ------------------------------------------


def verdict(outcome: Outcome) -> VerdictEvent:
    return VerdictEvent(1, time.time(), outcome, "", 0.5, 1.0, "m@1")


@pytest.mark.parametrize(
    ("outcomes", "rejecting"),
    [
        ((Outcome.FAIL,), {Outcome.FAIL}),
        ((Outcome.FAIL, Outcome.UNCERTAIN), {Outcome.FAIL, Outcome.UNCERTAIN}),
        ((Outcome.FAIL, Outcome.UNCERTAIN, Outcome.ERROR), set(Outcome) - {Outcome.PASS}),
    ],
    ids=["default", "with-uncertain", "with-uncertain-and-error"],
)
def test_only_the_configured_outcomes_reject(
    outcomes: tuple[Outcome, ...], rejecting: set[Outcome]
) -> None:
    line = SimulatedRejectLine()
    # A long delay: pulses stay pending, and close() gives up on them at once.
    scheduler = RejectScheduler(line, delay_ms=60_000, pulse_ms=10, outcomes=outcomes, drain_s=0)
    for outcome in Outcome:
        scheduler.emit(verdict(outcome))
    assert scheduler.counters.requested == len(rejecting)
    scheduler.close()
    assert scheduler.counters.cancelled == len(rejecting)
    assert line.writes() == []  # nothing fired
    assert line.closed


def test_default_outcomes_are_fail_only() -> None:
    scheduler = RejectScheduler(SimulatedRejectLine(), delay_ms=0, pulse_ms=1, drain_s=0)
    assert scheduler.outcomes == frozenset({Outcome.FAIL})
    scheduler.close()


@pytest.mark.parametrize(
    ("delay_ms", "outcomes"), [(-1.0, (Outcome.FAIL,)), (10.0, ())], ids=["delay", "outcomes"]
)
def test_bad_scheduler_settings(delay_ms: float, outcomes: tuple[Outcome, ...]) -> None:
    with pytest.raises(ValueError, match="must"):
        RejectScheduler(SimulatedRejectLine(), delay_ms=delay_ms, pulse_ms=1, outcomes=outcomes)
