"""The reject signal: a GPIO pulse, timed to the conveyor, for verdicts that reject.

    VerdictEvent -> RejectScheduler.emit -> RejectSchedule (pure: what to do at time t)
                                         -> scheduler thread -> RejectLine (gpiod or simulated)

For each verdict whose outcome is in ``outcomes`` (default {fail}) the line is driven
active for ``pulse_ms``, starting ``delay_ms`` after the frame's capture time: the time
the item needs to travel from the camera to the reject gate. Pulses that overlap merge
into one longer active period instead of toggling the line. A verdict that arrives after
its due time (inference slower than the conveyor) fires at once and is counted as late;
with ``max_late_ms`` set, one later than that is skipped instead, since by then the gate
would push off a different item.

Times inside are on the monotonic clock; a frame's capture time (wall clock) is turned
into a monotonic due time once, when its verdict arrives (``due_time``), so a wall-clock
step (NTP) never moves a pulse that is already scheduled.

``gpiod`` (libgpiod v2 bindings) is imported only when a ``GpiodRejectLine`` is opened,
so the agent runs without it; ``SimulatedRejectLine`` has the same interface for tests
and for devices without GPIO.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from edge_agent.core.verdict import Outcome
from edge_agent.sinks.outputs import LineOutputError, VerdictEvent

log = logging.getLogger("edge_agent.outputs.gpio")

Clock = Callable[[], float]


class RejectLineError(LineOutputError):
    """The reject line cannot be opened or driven; the message names chip and line."""


class RejectLine(Protocol):
    """A single output line, in logical terms (active = reject), whatever its polarity."""

    def set_active(self, active: bool) -> None:
        """Drive the line. Raises RejectLineError when the write fails."""

    def close(self) -> None:
        """Leave the line inactive and release it; idempotent."""


class _LineRequest(Protocol):
    # The part of gpiod.LineRequest used here, typed locally: gpiod is optional.
    def set_value(self, line: int | str, value: Any) -> None: ...

    def release(self) -> None: ...


class GpiodRejectLine:
    """One GPIO line through libgpiod v2, requested as an output, initially inactive.

    Args:
        chip_path: the GPIO character device, e.g. ``/dev/gpiochip0``.
        line: the line's offset on the chip, or its name.
        active_low: the reject is a low level (the kernel inverts the logical value).
        consumer: the label the kernel shows for the line (``gpioinfo``).

    Raises:
        RejectLineError: gpiod (v2) is not installed, or the chip or line cannot be
            requested (missing device, no permission, line busy or out of range).
    """

    def __init__(
        self,
        chip_path: str,
        line: int | str,
        *,
        active_low: bool = False,
        consumer: str = "edgefleet-reject",
    ) -> None:
        self.chip_path, self.line = chip_path, line
        where = f"GPIO line {line!r} on {chip_path}"
        try:
            import gpiod  # type: ignore[import-not-found, unused-ignore]
            from gpiod.line import Direction, Value  # type: ignore[import-not-found, unused-ignore]
        except ImportError as e:
            raise RejectLineError(
                f"cannot open {where}: the gpiod package (libgpiod v2 bindings) is not installed"
            ) from e
        if not hasattr(gpiod, "request_lines"):
            raise RejectLineError(f"cannot open {where}: gpiod is older than v2 (libgpiod 2.x)")
        self._active, self._inactive = Value.ACTIVE, Value.INACTIVE
        settings = gpiod.LineSettings(
            direction=Direction.OUTPUT, output_value=Value.INACTIVE, active_low=active_low
        )
        try:
            request: _LineRequest = gpiod.request_lines(
                chip_path, consumer=consumer, config={line: settings}
            )
        except (OSError, ValueError) as e:
            raise RejectLineError(f"cannot open {where}: {e}") from e
        self._request: _LineRequest | None = request

    def set_active(self, active: bool) -> None:
        if self._request is None:
            raise RuntimeError("GpiodRejectLine used after close()")
        try:
            self._request.set_value(self.line, self._active if active else self._inactive)
        except OSError as e:
            raise RejectLineError(
                f"cannot drive GPIO line {self.line!r} on {self.chip_path}: {e}"
            ) from e

    def close(self) -> None:
        request, self._request = self._request, None
        if request is None:
            return
        try:
            request.set_value(self.line, self._inactive)
        except OSError as e:
            raise RejectLineError(
                f"cannot reset GPIO line {self.line!r} on {self.chip_path}: {e}"
            ) from e
        finally:
            request.release()


class SimulatedRejectLine:
    """A RejectLine that records every write as ``(clock(), active)``; thread-safe. It
    keeps the last ``keep`` writes, so an agent configured with it runs for months."""

    def __init__(self, clock: Clock = time.monotonic, keep: int = 100_000) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._writes: deque[tuple[float, bool]] = deque(maxlen=keep)
        self.closed = False

    def set_active(self, active: bool) -> None:
        with self._lock:
            self._writes.append((self._clock(), active))

    def close(self) -> None:
        with self._lock:
            if not self.closed and self._writes and self._writes[-1][1]:
                self._writes.append((self._clock(), False))
            self.closed = True

    def writes(self) -> list[tuple[float, bool]]:
        """Every write so far, in order."""
        with self._lock:
            return list(self._writes)

    def pulses(self) -> list[tuple[float, float | None]]:
        """Active periods as (start, end); end is None while still active."""
        out: list[tuple[float, float | None]] = []
        for t, active in self.writes():
            if active and (not out or out[-1][1] is not None):
                out.append((t, None))
            elif not active and out and out[-1][1] is None:
                out[-1] = (out[-1][0], t)
        return out


def due_time(captured_at: float, delay_s: float, wall_now: float, mono_now: float) -> float:
    """The monotonic time a pulse is due: ``delay_s`` after the capture (wall clock).

    A capture time in the future (clock skew, a file's mtime) counts as "now", so that
    a wrong stamp can never hold a reject back.
    """
    age = max(wall_now - captured_at, 0.0)
    return mono_now - age + delay_s


@dataclass(frozen=True, slots=True)
class Step:
    """What to do now: drive the line (``set_active``; None: leave it) and when to look
    again (``wake_at``; None: nothing scheduled)."""

    set_active: bool | None
    wake_at: float | None


@dataclass(slots=True)
class RejectCounters:
    requested: int = 0  # verdicts that asked for a reject
    pulses: int = 0  # times the line went active
    merged: int = 0  # requests folded into a pulse already active
    late: int = 0  # requests that arrived after their due time (fired at once)
    skipped: int = 0  # later than max_late: not fired
    failed: int = 0  # line writes that failed
    cancelled: int = 0  # still pending when the scheduler was stopped


class RejectSchedule:
    """Pure pulse scheduling on one clock; every call takes the time as an argument.

    Args:
        pulse_s: how long the line stays active per request.
        max_late_s: a request more than this past its due time is skipped (None: fire
            every late request at once).
    """

    def __init__(self, pulse_s: float, max_late_s: float | None = None) -> None:
        if pulse_s <= 0:
            raise ValueError("pulse length must be > 0")
        if max_late_s is not None and max_late_s < 0:
            raise ValueError("max_late must be >= 0")
        self.pulse_s, self.max_late_s = pulse_s, max_late_s
        self.counters = RejectCounters()
        self._pending: list[tuple[float, float]] = []  # heap of (start, end)
        self._active_until: float | None = None  # None: the line is inactive

    @property
    def active(self) -> bool:
        return self._active_until is not None

    @property
    def idle(self) -> bool:
        """Nothing active and nothing pending."""
        return self._active_until is None and not self._pending

    def add(self, due: float, now: float) -> bool:
        """Request a pulse starting at ``due``; False when skipped as too late."""
        self.counters.requested += 1
        start = due
        if due < now:
            if self.max_late_s is not None and now - due > self.max_late_s:
                self.counters.skipped += 1
                return False
            self.counters.late += 1
            start = now  # a full-length pulse from now, not the remains of one
        heapq.heappush(self._pending, (start, start + self.pulse_s))
        return True

    def step(self, now: float) -> Step:
        """Advance to ``now``: start due pulses, merge overlaps, end finished pulses."""
        change: bool | None = None
        while self._pending and self._pending[0][0] <= now:
            _, end = heapq.heappop(self._pending)
            if self._active_until is None:
                # Full length from the moment the line really goes active, even if this
                # step comes late: a gate needs the whole pulse to move.
                self._active_until = now + self.pulse_s
                self.counters.pulses += 1
                change = True
            else:
                # Still active (or due to go inactive at this very moment): extend rather
                # than toggle, so the gate sees one clean pulse.
                self._active_until = max(self._active_until, end)
                self.counters.merged += 1
        if self._active_until is not None and self._active_until <= now:
            self._active_until = None
            change = False
        return Step(change, self.next_wake())

    def driven(self, active: bool, at: float) -> None:
        """The line was driven ``active`` at ``at``: a pulse lasts ``pulse_s`` from then,
        however long the write took to get there after ``step``."""
        if active and self._active_until is not None:
            self._active_until = max(self._active_until, at + self.pulse_s)

    def next_wake(self) -> float | None:
        """When ``step`` next has something to do (None: nothing scheduled)."""
        times = [t for t in (self._active_until,) if t is not None]
        if self._pending:
            times.append(self._pending[0][0])
        return min(times) if times else None

    def cancel(self) -> int:
        """Forget pending pulses (not the active one); return how many."""
        n = len(self._pending)
        self._pending.clear()
        self.counters.cancelled += n
        return n


class RejectScheduler:
    """The reject output (an ``Output``): schedules pulses and drives the line on a
    thread of its own. ``emit`` only enters the pulse in the schedule and never waits
    for the line.

    Args:
        line: the reject line (owned from now on: ``close`` closes it).
        delay_ms: from capture to the start of the pulse (camera-to-gate travel time).
        pulse_ms: how long the line is active per reject.
        outcomes: which verdicts reject (default: fail only).
        max_late_ms: skip a reject that is later than this (None: fire it at once).
        drain_s: on ``close``, how long to keep running for pulses already scheduled.
        clock, wall_clock: monotonic and wall clocks (injectable for tests).

    Raises:
        ValueError: negative delay, pulse <= 0, or an empty outcome set.
    """

    def __init__(
        self,
        line: RejectLine,
        *,
        delay_ms: float,
        pulse_ms: float,
        outcomes: Iterable[Outcome] = (Outcome.FAIL,),
        max_late_ms: float | None = None,
        drain_s: float = 2.0,
        name: str = "gpio-reject",
        clock: Clock = time.monotonic,
        wall_clock: Clock = time.time,
    ) -> None:
        if delay_ms < 0:
            raise ValueError("reject delay must be >= 0 ms")
        self.outcomes = frozenset(outcomes)
        if not self.outcomes:
            raise ValueError("reject outcomes must not be empty")
        self.line = line
        self.delay_s = delay_ms / 1000.0
        self.drain_s = drain_s
        self._name = name
        self._clock, self._wall = clock, wall_clock
        max_late_s = None if max_late_ms is None else max_late_ms / 1000.0
        self.schedule = RejectSchedule(pulse_ms / 1000.0, max_late_s)
        self._cond = threading.Condition()
        self._stopping = False
        self._abort = False
        self._failing = False
        self._thread = threading.Thread(target=self._loop, name=f"output-{name}", daemon=True)
        self._thread.start()

    @property
    def name(self) -> str:
        return self._name

    @property
    def counters(self) -> RejectCounters:
        return self.schedule.counters

    def emit(self, event: VerdictEvent) -> None:
        """Schedule a pulse for ``event`` if its outcome rejects; returns at once."""
        if event.outcome not in self.outcomes:
            return
        with self._cond:
            if self._stopping:
                self.schedule.counters.requested += 1
                self.schedule.counters.cancelled += 1
                return
            now = self._clock()
            due = due_time(event.captured_at, self.delay_s, self._wall(), now)
            if self.schedule.add(due, now):
                self._cond.notify()

    def close(self) -> None:
        """Finish the pulses already scheduled (up to ``drain_s``), then leave the line
        inactive and close it. Later verdicts are counted as cancelled."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(self.drain_s)
        if self._thread.is_alive():
            with self._cond:
                self._abort = True
                self._cond.notify()
            self._thread.join(1.0)
        self.line.close()

    def _loop(self) -> None:
        with self._cond:
            while True:
                step = self.schedule.step(self._clock())
                if step.set_active is not None:
                    # Drive the line without the lock: emit() must not wait on line I/O.
                    self._cond.release()
                    try:
                        self._drive(step.set_active)
                        driven_at = self._clock()
                    finally:
                        self._cond.acquire()
                    self.schedule.driven(step.set_active, driven_at)
                if self._stopping and (self._abort or self.schedule.idle):
                    break
                # Recomputed under the lock just before waiting: a pulse added while the
                # line was being driven is seen here, or its notify() wakes the wait.
                wake = self.schedule.next_wake()
                timeout = None if wake is None else wake - self._clock()
                if timeout is None or timeout > 0:
                    self._cond.wait(timeout)
            self.schedule.cancel()
            was_active = self.schedule.active
        if was_active:
            self._drive(False)

    def _drive(self, active: bool) -> None:
        try:
            self.line.set_active(active)
        except RejectLineError as e:
            self.schedule.counters.failed += 1
            if not self._failing:
                log.warning(
                    "output %s failed: %s",
                    self._name,
                    e,
                    extra={"event": "output_failed", "output": self._name},
                )
            self._failing = True
            return
        self._failing = False
