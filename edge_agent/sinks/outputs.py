"""Line outputs: verdicts to the line's own equipment, each output on its own thread.

    inspection -> verdict_event() -> Outputs.offer -> QueuedOutput (bounded queue, thread)
                                                   -> Output.emit (MQTT, GPIO reject, ...)

A slow or dead output must never slow inspection. Each output runs behind its own
bounded queue on its own thread; ``offer`` returns at once, and when the queue is full
the oldest waiting verdict is dropped (and counted) to make room for the newest: a line
controller wants the current verdict, not a backlog. The reject output is offered each
verdict first, so it is never behind another output's queue work.

An output reports a failed delivery by raising ``LineOutputError`` (its own I/O errors
wrapped, ``from e``); ``OutputUnavailable`` means "could not even try" (e.g. not
connected) and is counted as a drop. Either way the thread logs it with the output's
name and goes on with the next verdict. Anything else is a bug and ends that output's
thread (logged by ``threading.excepthook``); ``offer`` keeps working and drops.

Privacy: these messages stay in the plant (the plant's own broker, a GPIO line), never
on the fleet connection, so per-frame values (P(defect), label, frame id) are allowed
here, unlike in fleet telemetry (ARCHITECTURE.md, "What leaves the device").
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from edge_agent.core.verdict import Outcome

if TYPE_CHECKING:  # only for annotations: the outputs need not load the pipeline
    from edge_agent.pipeline import Inspection

log = logging.getLogger("edge_agent.outputs")

# Version of the VerdictEvent JSON encoding ("v" in every message).
EVENT_VERSION = 1


class LineOutputError(Exception):
    """An output could not deliver a verdict; the message names what failed.

    Named apart from ``edge_agent.core.verdict.OutputError`` (model outputs that do not
    fit the manifest), which is a different failure at a different boundary.
    """


class OutputUnavailable(LineOutputError):
    """The output cannot take verdicts right now (e.g. its broker is not connected);
    the verdict is dropped at once instead of being buffered."""


@dataclass(frozen=True, slots=True)
class VerdictEvent:
    """One verdict as the line sees it; the payload of every line output.

    ``captured_at`` is the frame's capture time as the source stamped it (Unix seconds,
    wall clock); ``p_defect`` is None when there is none (an error verdict); ``error`` is
    the reason of an error verdict, else None.
    """

    frame_id: int
    captured_at: float
    outcome: Outcome
    label: str
    p_defect: float | None
    latency_ms: float
    model: str
    error: str | None = None


def verdict_event(inspection: Inspection) -> VerdictEvent:
    """The VerdictEvent for one inspection (pure: no clock, no I/O)."""
    v = inspection.verdict
    return VerdictEvent(
        frame_id=inspection.frame.frame_id,
        captured_at=inspection.frame.timestamp,
        outcome=v.outcome,
        label=v.label,
        p_defect=None if math.isnan(v.p_defect) else v.p_defect,
        latency_ms=v.latency_ms,
        model=inspection.model,
        error=v.error,
    )


def encode_event(event: VerdictEvent) -> bytes:
    """Compact UTF-8 JSON, one object, always the same keys (docs/line-outputs.md)::

        {"v":1,"frame":17,"ts":1732392000.123456,"outcome":"fail","label":"defect",
         "p":0.973121,"latency_ms":8.412,"model":"widget@1.2.0","error":null}

    Times are rounded to microseconds, P(defect) to 6 decimals, latency to microseconds:
    more digits carry no information and cost bytes on every frame.
    """
    body = {
        "v": EVENT_VERSION,
        "frame": event.frame_id,
        "ts": round(event.captured_at, 6),
        "outcome": event.outcome.value,
        "label": event.label,
        "p": None if event.p_defect is None else round(event.p_defect, 6),
        "latency_ms": round(event.latency_ms, 3),
        "model": event.model,
        "error": event.error,
    }
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


class Output(Protocol):
    """One line output. ``emit`` runs on the output's own thread (see QueuedOutput).

    ``emit`` may block (it only delays this output); it raises ``LineOutputError`` when
    delivery fails and ``OutputUnavailable`` when it cannot try right now. ``close`` frees
    the output's resources; it may be called while a stuck ``emit`` is still running
    (when QueuedOutput gave up waiting), so it must be safe for that.
    """

    @property
    def name(self) -> str: ...

    def emit(self, event: VerdictEvent) -> None: ...

    def close(self) -> None: ...


@dataclass(slots=True)
class OutputCounters:
    """offered = delivered + dropped + failed + (still queued or in emit)."""

    offered: int = 0
    delivered: int = 0
    dropped: int = 0
    failed: int = 0


class QueuedOutput:
    """Runs one Output on its own thread behind a bounded queue; ``offer`` never blocks.

    Args:
        output: the output to feed.
        queue_size: verdicts that may wait; when full, the oldest is dropped for the new.
        priority: offered each verdict before the other outputs (the reject signal).
    """

    def __init__(self, output: Output, *, queue_size: int = 64, priority: bool = False) -> None:
        if queue_size < 1:
            raise ValueError("queue_size must be >= 1")
        self.output = output
        self.priority = priority
        self.counters = OutputCounters()
        self._queue: deque[VerdictEvent] = deque(maxlen=queue_size)
        self._cond = threading.Condition()
        self._closing = False
        self._abandoned = False
        self._ended = False  # set by the thread as it ends, under the lock
        self._failing = False  # log the first failure of a run, not every one
        self._run_failures = 0
        self._thread = threading.Thread(
            target=self._loop, name=f"output-{output.name}", daemon=True
        )
        self._thread.start()

    @property
    def name(self) -> str:
        return self.output.name

    @property
    def alive(self) -> bool:
        """False once the output's thread has ended (closed, or crashed on a bug)."""
        return self._thread.is_alive()

    def offer(self, event: VerdictEvent) -> None:
        """Queue ``event``; returns at once. Dropped (and counted) after ``close``."""
        with self._cond:
            self.counters.offered += 1
            if self._closing or self._ended:
                self.counters.dropped += 1
                return
            if len(self._queue) == self._queue.maxlen:
                self.counters.dropped += 1  # the deque drops its oldest on append
            self._queue.append(event)
            self._cond.notify()

    def begin_close(self) -> None:
        """Take no more verdicts; the thread delivers what is queued, then ends."""
        with self._cond:
            self._closing = True
            self._cond.notify()

    def finish_close(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the queue to drain, then close the output.

        Returns whether everything queued was delivered (or failed) in time; when not,
        what is still queued is dropped and counted, and the output is closed anyway.
        """
        self._thread.join(max(timeout, 0.0))
        drained = not self._thread.is_alive()
        if not drained:
            with self._cond:
                self._abandoned = True
                self.counters.dropped += len(self._queue)
                self._queue.clear()
            log.warning(
                "output %s did not drain within %.3g s; closing it anyway",
                self.name,
                timeout,
                extra={"event": "output_undrained", "output": self.name},
            )
        try:
            self.output.close()
        except LineOutputError as e:
            log.warning(
                "output %s failed to close: %s",
                self.name,
                e,
                extra={"event": "output_close_failed", "output": self.name},
            )
        return drained

    def close(self, timeout: float = 5.0) -> bool:
        """``begin_close`` then ``finish_close(timeout)``."""
        self.begin_close()
        return self.finish_close(timeout)

    def _loop(self) -> None:
        event: VerdictEvent | None = None
        try:
            while (event := self._next()) is not None:
                self._deliver(event)
        finally:
            # A crash (a bug in the output) ends the thread: the verdict in hand failed,
            # and what is queued will never be delivered; offer() drops from here on.
            with self._cond:
                if event is not None:
                    self.counters.failed += 1
                self.counters.dropped += len(self._queue)
                self._queue.clear()
                self._ended = True

    def _next(self) -> VerdictEvent | None:
        with self._cond:
            while not self._queue:
                if self._closing or self._abandoned:
                    return None
                self._cond.wait()
            if self._abandoned:
                return None
            return self._queue.popleft()

    def _deliver(self, event: VerdictEvent) -> None:
        try:
            self.output.emit(event)
        except OutputUnavailable as e:
            with self._cond:  # offer() counts drops too, from another thread
                self.counters.dropped += 1
            self._note_failure(e)
            return
        except LineOutputError as e:
            self.counters.failed += 1
            self._note_failure(e)
            return
        self.counters.delivered += 1
        if self._failing:
            self._failing = False
            log.info(
                "output %s delivers again after %d failed verdicts",
                self.name,
                self._run_failures,
                extra={"event": "output_recovered", "output": self.name},
            )

    def _note_failure(self, error: LineOutputError) -> None:
        # One line per run of failures: a dead output at 100 frames/s must not flood the
        # journal; the counters have the totals.
        if not self._failing:
            self._failing, self._run_failures = True, 0
            log.warning(
                "output %s failed: %s",
                self.name,
                error,
                extra={"event": "output_failed", "output": self.name},
            )
        self._run_failures += 1


class Offered(Protocol):
    """What Outputs fans out to: a QueuedOutput, or anything that behaves like one."""

    @property
    def name(self) -> str: ...

    @property
    def priority(self) -> bool: ...

    def offer(self, event: VerdictEvent) -> None: ...

    def begin_close(self) -> None: ...

    def finish_close(self, timeout: float) -> bool: ...


class Outputs:
    """Fans each verdict out to all outputs, priority outputs (the reject) first.

    Raises:
        ValueError: two outputs share a name (counters and logs are keyed by it).
    """

    def __init__(self, outputs: Sequence[Offered]) -> None:
        names = [o.name for o in outputs]
        if len(set(names)) != len(names):
            raise ValueError(f"output names must be unique: {names}")
        # sorted() is stable: within each class, the configured order is kept.
        self.members: tuple[Offered, ...] = tuple(sorted(outputs, key=lambda o: not o.priority))

    def offer(self, event: VerdictEvent) -> None:
        """Offer ``event`` to every output; returns at once."""
        for output in self.members:
            output.offer(event)

    def offer_inspection(self, inspection: Inspection) -> None:
        """``offer(verdict_event(inspection))``: the event is built once for all."""
        if self.members:
            self.offer(verdict_event(inspection))

    def close(self, timeout: float = 5.0) -> dict[str, bool]:
        """Close all outputs, draining them in parallel within one ``timeout``.

        Returns, per output name, whether it drained in time.
        """
        for output in self.members:
            output.begin_close()
        deadline = time.monotonic() + timeout
        return {o.name: o.finish_close(deadline - time.monotonic()) for o in self.members}
