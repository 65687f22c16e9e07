"""The health gate a candidate model must pass before it becomes the active model.

    open_candidate -> check_golden -> ShadowRun (live frames, beside the active model)

``open_candidate`` loads the installed bundle, ``check_golden`` runs its golden samples,
and ``ShadowRun`` runs the candidate on a copy of the live frames on its own thread:
the agent's loop hands it every inspected frame with the active model's verdict
(``offer``, which never blocks), and the shadow thread decodes the frame with the
candidate's own preprocessing, times the candidate's inference, checks its outputs are
finite and compares its outcome with the active one. At the end it checks agreement,
p99 latency and the process's resident memory against ``GateLimits``.

Every failure is a ``GateError`` (load and golden checks) or a failed ``GateReport``
(shadow run) with a typed ``Reason``; the report's figures go into the ``gate passed`` /
``gate failed`` event. A candidate that raises while shadow-running fails the gate; it
never raises into the agent's loop.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_agent.core.decode import ImageError
from edge_agent.core.frame import Frame
from edge_agent.core.verdict import Outcome, Verdict, judge
from edge_agent.inspect import Inspector
from edge_agent.protocol.errors import BundleError
from edge_agent.runtimes import ModelLoadError, RuntimeOptions
from edge_agent.update.errors import GateError, Reason

_POLL_S = 0.1
_RSS_EVERY = 50  # shadow frames between two resident-memory samples
_WARMUP_FRAMES = 5  # shadow frames whose latency is not counted (at most a quarter)
# The shadow thread yields the CPU to the line's threads when both want it: on a
# two-core device the line must keep its pace while a candidate is being tried.
_SHADOW_NICE = 5


@dataclass(frozen=True, slots=True, kw_only=True)
class GateLimits:
    """What a candidate must meet. The latency and memory limits come from the device
    (firmware profile, config); there are no defaults for them.

    Attributes:
        max_latency_ms: p99 of the candidate's own inference time on the shadow frames
            (wall time of ``runtime.run`` on the shadow thread, which runs at a lower
            priority than the line: a saturated CPU makes this figure pessimistic).
        max_memory_mb: the process's resident memory (VmRSS) with the candidate loaded
            and running must stay at or under this.
        shadow_frames: live frames to compare (frames with an active error verdict and
            frames skipped because the shadow queue was full do not count).
        min_agreement: share of compared frames whose outcome (pass / fail / uncertain)
            equals the active model's.
        timeout_s: ``shadow_frames`` not compared within this many seconds of the start
            of the shadow run -> ``GATE_TIMEOUT``.
        queue_size: frames waiting for the shadow thread; more are skipped, not waited for.
    """

    max_latency_ms: float
    max_memory_mb: float
    shadow_frames: int = 200
    min_agreement: float = 0.98
    timeout_s: float = 600.0
    queue_size: int = 4

    def __post_init__(self) -> None:
        if self.shadow_frames < 1:
            raise ValueError("shadow_frames must be >= 1")
        if not 0.0 <= self.min_agreement <= 1.0:
            raise ValueError("min_agreement must be between 0 and 1")
        if self.max_latency_ms <= 0 or self.max_memory_mb <= 0 or self.timeout_s <= 0:
            raise ValueError("max_latency_ms, max_memory_mb and timeout_s must be > 0")
        if self.queue_size < 1:
            raise ValueError("queue_size must be >= 1")


@dataclass(frozen=True, slots=True)
class GateReport:
    """The gate's result and the figures it measured (NaN where not measured).

    ``frames`` were compared; ``skipped`` were offered while the queue was full;
    ``active_errors`` were offered with an active error verdict and not compared.
    """

    passed: bool
    reason: Reason | None
    message: str
    candidate: str
    frames: int = 0
    agreement: float = math.nan
    p99_latency_ms: float = math.nan
    rss_mb: float = math.nan
    golden_max_error: float = math.nan
    nan_frames: int = 0
    skipped: int = 0
    active_errors: int = 0


def refused_report(
    candidate: str, error: GateError, golden_max_error: float = math.nan
) -> GateReport:
    """A failed report for a candidate refused before its shadow run (load or golden)."""
    return GateReport(
        False, error.reason, error.message, candidate, golden_max_error=golden_max_error
    )


def open_candidate(bundle_dir: Path, options: RuntimeOptions) -> Inspector:
    """Load and verify the candidate bundle in ``bundle_dir`` and its model.

    Raises:
        GateError: ``GATE_LOAD``, for a bad bundle or a model the runtime cannot load
            (whatever the runtime library raises).
    """
    try:
        return Inspector.open(bundle_dir, options)
    except (BundleError, ModelLoadError) as e:
        raise GateError(Reason.GATE_LOAD, f"{bundle_dir.name}: {e}") from e
    except Exception as e:
        # The runtime libraries parse the untrusted model file and raise their own types
        # (onnxruntime's InvalidProtobuf, for one, is not wrapped in ModelLoadError):
        # whatever they raise, the candidate did not load.
        raise GateError(Reason.GATE_LOAD, f"{bundle_dir.name}: {type(e).__name__}: {e}") from e


def check_golden(candidate: Inspector) -> float:
    """Run the candidate's golden samples; return the largest ``|p_defect - expected|``.

    A bundle without golden samples cannot be checked and is refused.

    Raises:
        GateError: ``GATE_NAN`` when an output is not finite; ``GATE_GOLDEN`` when a
            sample is unreadable or off by more than its tolerance (or there are none);
            ``GATE_LOAD`` when the runtime raises while running the model.
    """
    m = candidate.manifest
    if not m.golden:
        raise GateError(Reason.GATE_GOLDEN, f"{m.id}: the bundle has no golden samples")
    worst = 0.0
    for sample in m.golden:
        try:
            image = candidate.decode(candidate.bundle.file(sample.file).read_bytes())
        except (OSError, ImageError) as e:
            raise GateError(Reason.GATE_GOLDEN, f"{m.id}: {sample.file}: unreadable: {e}") from e
        tensor = candidate.preprocessor(image)
        try:
            outputs = candidate.runtime.run(tensor)
        except Exception as e:
            # As in open_candidate: the runtime's own exception types, whatever they are.
            raise GateError(
                Reason.GATE_LOAD, f"{m.id}: {sample.file}: the model fails to run: {e}"
            ) from e
        if not np.all(np.isfinite(outputs)):
            raise GateError(Reason.GATE_NAN, f"{m.id}: {sample.file}: output is not finite")
        verdict = judge(outputs, m.output, candidate.decision, 0, 0.0)
        if verdict.error is not None:
            raise GateError(Reason.GATE_GOLDEN, f"{m.id}: {sample.file}: {verdict.error}")
        error = abs(verdict.p_defect - sample.p_defect)
        worst = max(worst, error)
        if error > sample.tolerance:
            raise GateError(
                Reason.GATE_GOLDEN,
                f"{m.id}: {sample.file}: p_defect {verdict.p_defect:.6f}, expected "
                f"{sample.p_defect:.6f} +- {sample.tolerance}",
            )
    return worst


def read_rss_mb() -> float:
    """This process's resident memory in MB, from ``/proc/self/status`` (NaN if unknown)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return math.nan
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return math.nan


class ShadowRun:
    """Run ``candidate`` beside the active model on live frames, on its own thread.

    The thread starts at construction and owns ``candidate`` until the run is over
    (``done()``); then the caller may use it again (e.g. hand it to ``Pipeline.swap``,
    warmed up by the shadow run) or close it. ``read_rss`` reads the process's resident
    memory in MB (NaN when unknown, which fails ``GATE_MEMORY``: the limit is unchecked).

    A candidate that raises while running fails the gate with ``GATE_LOAD`` (it loaded
    but cannot run); the exception never reaches the caller.
    """

    def __init__(
        self,
        candidate: Inspector,
        limits: GateLimits,
        *,
        golden_max_error: float = math.nan,
        read_rss: Callable[[], float] = read_rss_mb,
    ) -> None:
        self.candidate = candidate
        self.limits = limits
        self._golden = golden_max_error
        self._read_rss = read_rss
        self._queue: queue.Queue[tuple[Frame, Verdict]] = queue.Queue(limits.queue_size)
        self._closed = threading.Event()
        self._done = threading.Event()
        self._report: GateReport | None = None
        self._skipped = 0
        self._active_errors = 0
        self._frames = 0
        self._agreed = 0
        self._latencies: list[float] = []
        self._rss = math.nan
        self._thread = threading.Thread(target=self._run, name="gate-shadow", daemon=True)
        self._thread.start()

    def offer(self, frame: Frame, active_verdict: Verdict) -> None:
        """Hand the shadow thread a frame the active model has judged. Never blocks:
        when the queue is full (or the run is over) the frame is skipped."""
        if self._done.is_set():
            return
        if active_verdict.outcome is Outcome.ERROR:
            self._active_errors += 1
            return
        try:
            self._queue.put_nowait((frame, active_verdict))
        except queue.Full:
            self._skipped += 1

    def done(self) -> bool:
        return self._done.is_set()

    def result(self) -> GateReport:
        """The report of a finished run.

        Raises:
            RuntimeError: the run is not over yet (check ``done()`` or use ``wait``).
        """
        if self._report is None:
            raise RuntimeError("the shadow run is not over yet")
        return self._report

    def wait(self, timeout_s: float | None = None) -> GateReport | None:
        """Wait up to ``timeout_s`` (None: until the run is over); None if still running."""
        if not self._done.wait(timeout_s):
            return None
        return self.result()

    def close(self) -> GateReport:
        """End the run (a run not over yet fails with ``GATE_TIMEOUT``); return its report."""
        self._closed.set()
        self._thread.join()
        return self.result()

    # -- the shadow thread --------------------------------------------------------------

    def _run(self) -> None:
        # Only on Linux does a thread id name a single thread (elsewhere this would renice
        # the whole process); where not permitted, the thread keeps the line's priority.
        if sys.platform == "linux":
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _SHADOW_NICE)
        try:
            self._report = self._shadow()
        except Exception as e:  # noqa: BLE001 - a candidate's failure fails the gate, never the line
            self._report = self._failed(
                Reason.GATE_LOAD, f"candidate failed on a live frame: {type(e).__name__}: {e}"
            )
        self._done.set()

    def _shadow(self) -> GateReport:
        limits = self.limits
        deadline = time.monotonic() + limits.timeout_s
        self._sample_rss()  # the candidate is loaded: its weights count from the start
        while self._frames < limits.shadow_frames:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._closed.is_set():
                when = "before close" if remaining > 0 else f"in {limits.timeout_s:g} s"
                return self._failed(
                    Reason.GATE_TIMEOUT,
                    f"{self._frames} of {limits.shadow_frames} frames compared {when} "
                    f"({self._skipped} skipped)",
                )
            try:
                frame, active = self._queue.get(timeout=min(remaining, _POLL_S))
            except queue.Empty:
                continue
            if not self._compare(frame, active):
                return self._failed(
                    Reason.GATE_NAN, f"output is not finite on frame {frame.frame_id}", nan=1
                )
            if self._frames % _RSS_EVERY == 0:
                self._sample_rss()
        self._sample_rss()
        return self._judge()

    def _compare(self, frame: Frame, active: Verdict) -> bool:
        """Run the candidate on one frame; False when its output is not finite."""
        c = self.candidate
        try:
            image = c.decode(frame.data) if frame.data is not None else frame.image
        except ImageError:
            image = None
        if image is None:
            # The active model read this frame; a candidate that cannot disagrees.
            self._frames += 1
            return True
        tensor = c.preprocessor(image)
        started = time.perf_counter()
        outputs = c.runtime.run(tensor)
        # The first calls of a freshly loaded model are slow (allocation, caches); they
        # say nothing about its steady latency on the line.
        if self._frames >= min(_WARMUP_FRAMES, self.limits.shadow_frames // 4):
            self._latencies.append((time.perf_counter() - started) * 1000.0)
        if not np.all(np.isfinite(outputs)):
            return False
        verdict = judge(outputs, c.manifest.output, c.decision, frame.frame_id, 0.0)
        self._frames += 1
        self._agreed += verdict.outcome is active.outcome
        return True

    def _sample_rss(self) -> None:
        rss = self._read_rss()
        if math.isnan(self._rss) or rss > self._rss:
            self._rss = rss

    def _judge(self) -> GateReport:
        limits = self.limits
        agreement = self._agreed / self._frames
        p99 = self._p99()
        if agreement < limits.min_agreement:
            return self._failed(
                Reason.GATE_AGREEMENT,
                f"agreement {agreement:.4f} below {limits.min_agreement} on {self._frames} frames",
            )
        if not p99 <= limits.max_latency_ms:
            return self._failed(
                Reason.GATE_LATENCY,
                f"p99 inference {p99:.3f} ms above {limits.max_latency_ms:g} ms",
            )
        if math.isnan(self._rss):
            return self._failed(Reason.GATE_MEMORY, "resident memory unknown (no VmRSS)")
        if self._rss > limits.max_memory_mb:
            return self._failed(
                Reason.GATE_MEMORY,
                f"resident memory {self._rss:.1f} MB above {limits.max_memory_mb:g} MB",
            )
        return self._report_of(
            True,
            None,
            f"agreement {agreement:.4f}, p99 {p99:.3f} ms, RSS {self._rss:.1f} MB "
            f"on {self._frames} frames",
        )

    def _p99(self) -> float:
        if not self._latencies:
            return math.nan
        return float(np.percentile(np.asarray(self._latencies), 99))

    def _failed(self, reason: Reason, message: str, nan: int = 0) -> GateReport:
        return self._report_of(False, reason, message, nan)

    def _report_of(
        self, passed: bool, reason: Reason | None, message: str, nan: int = 0
    ) -> GateReport:
        frames = self._frames
        return GateReport(
            passed=passed,
            reason=reason,
            message=f"{self.candidate.manifest.id}: {message}",
            candidate=self.candidate.manifest.id,
            frames=frames,
            agreement=self._agreed / frames if frames else math.nan,
            p99_latency_ms=self._p99(),
            rss_mb=self._rss,
            golden_max_error=self._golden,
            nan_frames=nan,
            skipped=self._skipped,
            active_errors=self._active_errors,
        )
