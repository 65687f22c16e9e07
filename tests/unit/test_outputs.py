"""The line-output framework: VerdictEvent and its JSON, QueuedOutput's bounded queue
(oldest dropped, counted), offer cost against a slow output, failures, close, priority.

Outputs here are small real classes (a gate that holds ``emit``, a recorder), not mocks.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from edge_agent.core.frame import Frame
from edge_agent.core.verdict import Outcome, Verdict, error_verdict
from edge_agent.pipeline import Inspection
from edge_agent.sinks.outputs import (
    LineOutputError,
    Outputs,
    OutputUnavailable,
    QueuedOutput,
    VerdictEvent,
    encode_event,
    verdict_event,
)

WAIT_S = 5.0


def event(frame_id: int, outcome: Outcome = Outcome.FAIL) -> VerdictEvent:
    return VerdictEvent(frame_id, 1_700_000_000.0 + frame_id, outcome, "defect", 0.9, 4.0, "m@1")


def wait_until(condition: object, timeout: float = WAIT_S) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.002)


class GatedOutput:
    """Records frame ids; ``emit`` waits for ``gate`` (set: no waiting)."""

    def __init__(self, name: str = "gated", *, sleep_s: float = 0.0) -> None:
        self.name = name
        self.sleep_s = sleep_s
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.seen: list[int] = []
        self.closed = 0

    def emit(self, e: VerdictEvent) -> None:
        self.entered.set()
        self.gate.wait()
        if self.sleep_s:
            time.sleep(self.sleep_s)
        self.seen.append(e.frame_id)

    def close(self) -> None:
        self.closed += 1


class FailingOutput:
    """Raises ``error`` for frame ids in ``bad``; records the others."""

    def __init__(self, bad: set[int], error: type[LineOutputError]) -> None:
        self.name = "flaky"
        self.bad, self.error = bad, error
        self.seen: list[int] = []

    def emit(self, e: VerdictEvent) -> None:
        if e.frame_id in self.bad:
            raise self.error(f"device refused frame {e.frame_id}")
        self.seen.append(e.frame_id)

    def close(self) -> None:
        pass


@pytest.fixture
def gated() -> Iterator[GatedOutput]:
    output = GatedOutput()
    yield output
    output.gate.set()  # let a held thread finish


def balanced(q: QueuedOutput) -> bool:
    c = q.counters
    return c.offered == c.delivered + c.dropped + c.failed


# -- VerdictEvent ------------------------------------------------------------------------


def test_event_from_inspection_and_its_json() -> None:
    frame = Frame(42, 1_732_392_000.1234567, "cam0", data=b"\xff\xd8")
    verdict = Verdict(42, "scratch", 0.97312149, Outcome.FAIL, 8.4123456)
    e = verdict_event(Inspection(frame, verdict, None, None))
    assert e == VerdictEvent(
        42, 1_732_392_000.1234567, Outcome.FAIL, "scratch", 0.97312149, 8.4123456, "", None
    )
    assert encode_event(e) == (
        b'{"v":1,"frame":42,"ts":1732392000.123457,"outcome":"fail","label":"scratch",'
        b'"p":0.973121,"latency_ms":8.412,"model":"","error":null}'
    )


def test_error_verdict_has_no_p_and_a_reason() -> None:
    frame = Frame(7, 5.0, "folder", image=np.zeros((2, 2, 3), np.uint8))
    e = verdict_event(Inspection(frame, error_verdict(7, "truncated JPEG"), None, None))
    assert math.isnan(error_verdict(7, "x").p_defect)
    assert e.p_defect is None
    body = json.loads(encode_event(e))
    assert body["p"] is None
    assert body["outcome"] == "error"
    assert body["error"] == "truncated JPEG"
    assert set(body) == {
        "v",
        "frame",
        "ts",
        "outcome",
        "label",
        "p",
        "latency_ms",
        "model",
        "error",
    }


# -- QueuedOutput ------------------------------------------------------------------------


def test_queue_is_bounded_and_the_oldest_is_dropped(gated: GatedOutput) -> None:
    q = QueuedOutput(gated, queue_size=4)
    q.offer(event(0))
    assert gated.entered.wait(WAIT_S)  # frame 0 is inside emit, the queue is empty
    for i in range(1, 11):
        q.offer(event(i))
    assert q.counters.offered == 11
    assert q.counters.dropped == 6  # frames 1-6 made room for 7-10
    gated.gate.set()
    assert q.close(WAIT_S)
    assert gated.seen == [0, 7, 8, 9, 10]
    assert q.counters.delivered == 5
    assert balanced(q)


def test_a_slow_output_does_not_slow_offer() -> None:
    slow = GatedOutput("slow", sleep_s=0.01)
    slow.gate.set()
    q = QueuedOutput(slow, queue_size=64)
    n = 10_000
    events = [event(i) for i in range(n)]
    started = time.perf_counter()
    for e in events:
        q.offer(e)
    offer_s = time.perf_counter() - started
    output_s = n * slow.sleep_s  # what delivering them all would take
    print(
        f"\noffer: {n} verdicts in {offer_s * 1000:.1f} ms ({offer_s / n * 1e6:.2f} us each); "
        f"the output would need {output_s:.0f} s"
    )
    assert offer_s < output_s / 100
    assert q.counters.offered == n
    assert q.counters.dropped >= n - 64 - 10  # a few got through during the loop
    assert not q.close(0.05)  # gives up: ~64 x 10 ms still queued
    wait_until(lambda: not q.alive)  # the verdict that was inside emit finishes
    assert balanced(q)
    assert slow.closed == 1


def test_failures_are_counted_and_the_thread_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    output = FailingOutput(bad={0, 1, 2, 3, 4}, error=LineOutputError)
    q = QueuedOutput(output, queue_size=16)
    with caplog.at_level(logging.INFO, logger="edge_agent.outputs"):
        for i in range(10):
            q.offer(event(i))
        assert q.close(WAIT_S)
    assert (q.counters.failed, q.counters.delivered, q.counters.dropped) == (5, 5, 0)
    assert output.seen == [5, 6, 7, 8, 9]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    # One line for the run of five failures, naming the output and the error.
    assert len(warnings) == 1
    assert "flaky" in warnings[0].getMessage()
    assert "frame 0" in warnings[0].getMessage()
    assert any("delivers again" in r.getMessage() for r in caplog.records)


def test_unavailable_output_counts_drops() -> None:
    output = FailingOutput(bad=set(range(0, 10, 2)), error=OutputUnavailable)
    q = QueuedOutput(output, queue_size=16)
    for i in range(10):
        q.offer(event(i))
    assert q.close(WAIT_S)
    assert (q.counters.dropped, q.counters.delivered, q.counters.failed) == (5, 5, 0)


def test_a_crashing_output_ends_its_thread_but_offer_keeps_working(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    crashes: list[type[BaseException] | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: crashes.append(args.exc_type))

    class Buggy(GatedOutput):
        def emit(self, e: VerdictEvent) -> None:
            raise ZeroDivisionError("a bug, not an I/O failure")

    q = QueuedOutput(Buggy("buggy"), queue_size=4)
    q.offer(event(0))
    wait_until(lambda: not q.alive)
    assert crashes == [ZeroDivisionError]
    q.offer(event(1))
    assert q.counters.dropped == 1
    assert q.close(0.1)
    assert balanced(q)


def test_close_drains_what_is_queued(gated: GatedOutput) -> None:
    q = QueuedOutput(gated, queue_size=8)
    for i in range(5):
        q.offer(event(i))
    gated.gate.set()
    assert q.close(WAIT_S)
    assert gated.seen == [0, 1, 2, 3, 4]
    assert gated.closed == 1
    q.offer(event(5))  # after close: dropped, counted
    assert q.counters.dropped == 1
    assert balanced(q)


def test_close_gives_up_after_the_timeout(gated: GatedOutput) -> None:
    q = QueuedOutput(gated, queue_size=8)
    for i in range(5):
        q.offer(event(i))
    assert gated.entered.wait(WAIT_S)
    started = time.monotonic()
    assert not q.close(0.2)
    assert time.monotonic() - started < 1.0
    assert gated.closed == 1  # closed anyway
    assert q.counters.dropped == 4  # frame 0 is stuck in emit
    gated.gate.set()
    wait_until(lambda: not q.alive)
    assert gated.seen == [0]
    assert balanced(q)


def test_queue_size_must_be_positive(gated: GatedOutput) -> None:
    with pytest.raises(ValueError, match="queue_size"):
        QueuedOutput(gated, queue_size=0)


# -- Outputs (fan-out) -------------------------------------------------------------------


class Recorder:
    """Stands in for a QueuedOutput; notes the order of offers in a shared log."""

    def __init__(self, name: str, log: list[str], *, priority: bool = False) -> None:
        self.name, self.priority, self.log = name, priority, log
        self.closed_with: float | None = None

    def offer(self, e: VerdictEvent) -> None:
        self.log.append(f"{self.name}:{e.frame_id}")

    def begin_close(self) -> None:
        self.log.append(f"{self.name}:closing")

    def finish_close(self, timeout: float) -> bool:
        self.closed_with = timeout
        return True


def test_the_reject_output_is_offered_first() -> None:
    log: list[str] = []
    outputs = Outputs(
        [Recorder("mqtt", log), Recorder("reject", log, priority=True), Recorder("rest", log)]
    )
    outputs.offer(event(1))
    outputs.offer(event(2))
    assert log == ["reject:1", "mqtt:1", "rest:1", "reject:2", "mqtt:2", "rest:2"]


def test_offer_inspection_builds_the_event_once() -> None:
    log: list[str] = []
    outputs = Outputs([Recorder("a", log), Recorder("b", log)])
    frame = Frame(3, 1.0, "cam", data=b"x")
    outputs.offer_inspection(Inspection(frame, Verdict(3, "ok", 0.1, Outcome.PASS, 1.0), None))
    assert log == ["a:3", "b:3"]


def test_close_closes_all_within_one_timeout() -> None:
    slow = [GatedOutput(f"stuck-{i}") for i in range(3)]
    queued = [QueuedOutput(o, queue_size=4) for o in slow]
    outputs = Outputs(queued)
    outputs.offer(event(0))
    for o in slow:
        assert o.entered.wait(WAIT_S)
    started = time.monotonic()
    result = outputs.close(0.3)
    elapsed = time.monotonic() - started
    assert result == {"stuck-0": False, "stuck-1": False, "stuck-2": False}
    assert elapsed < 0.9  # the three waits share one deadline
    assert all(o.closed == 1 for o in slow)
    for o in slow:
        o.gate.set()


def test_output_names_must_be_unique() -> None:
    log: list[str] = []
    with pytest.raises(ValueError, match="unique"):
        Outputs([Recorder("mqtt", log), Recorder("mqtt", log)])
