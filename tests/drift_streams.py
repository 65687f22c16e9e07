"""Drift streams from the synthetic line, shared by the drift tests and scripts/bench_drift.py.

Three parts; the first two make millions of frames cost seconds:

1. ``measure_line`` renders real frames of the synthetic line for each condition (normal
   light, dimmer light, the unseen variant "b"), fits them with the bundle's own
   preprocessor exactly as the agent does, and records per frame the seven image
   features of the fitted image, P(defect) from the bundle's model and the true label.
   Good and defective items are kept apart, so any defect rate can be mixed later.
2. ``LineSimulator`` bootstrap-resamples those rows into a stream: per frame a label
   (Bernoulli at the segment's defect rate) and a measured row of that label, fed through
   the agent's real ``WindowAccumulator``, which closes the ``TelemetryWindow`` objects
   the detectors see.
3. The goal runners (``run_in_control``, ``detection_delays``, ``check_cbpe``) feed those
   windows to a ``DriftMonitor`` and measure what the goals ask.

Frames are rendered at 640x480, the size of the reference split the bundles' profiles
were built from. At 320x240 the fitted image carries more sensor noise, and the mean
sharpness alone sits about two window sigmas away from the profile: every in-control
stream would look drifted.
"""

from __future__ import annotations

import math
import multiprocessing
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from edge_agent.core.drift import DriftMonitor
from edge_agent.core.stats import WindowAccumulator, edges_of
from edge_agent.inspect import Inspector
from edge_agent.protocol.manifest import Decision, ReferenceProfile
from edge_agent.protocol.telemetry import TelemetryWindow
from edge_agent.runtimes import RuntimeOptions

ROOT = Path(__file__).resolve().parents[1]
ONNX_BUNDLE = ROOT / "models" / "reference-onnx"
RENDER_SIZE = (640, 480)
# Line seeds no training, validation, reference, golden or evaluation split uses.
SEED_BASE = 610_000
FPS = 30.0  # the demo line's frame rate: timestamps of simulated frames
MODEL_ID = "reference-onnx@1.0.0"
EDGE_VERSION = "0.1.0"

Rows = npt.NDArray[np.float64]  # N x 8: seven image features, then P(defect)


@dataclass(frozen=True, slots=True)
class Condition:
    """How the line looks while a condition lasts (see ``LineConditions``)."""

    brightness: float = 1.0
    variant: str = "a"


CONDITIONS: dict[str, Condition] = {
    "normal": Condition(),
    "bright98": Condition(brightness=0.98),
    "bright95": Condition(brightness=0.95),
    "bright90": Condition(brightness=0.90),
    "bright80": Condition(brightness=0.80),
    "bright70": Condition(brightness=0.70),
    "variant_b": Condition(variant="b"),
}


@dataclass(frozen=True, slots=True)
class Measured:
    """Measured frames of one condition: rows of good items and rows of defective ones."""

    ok: Rows
    defect: Rows


def _render_chunk(job: tuple[str, str, bool, int, int]) -> Rows:
    from edge_agent.core.features import image_features
    from edge_agent.core.synthetic import NO_DEFECT, LineConditions, render_item

    bundle, name, defective, start, stop = job
    inspector = _inspector(bundle)
    cond = CONDITIONS[name]
    line = LineConditions(
        brightness=cond.brightness, variant=cond.variant, defect_rate=1.0 if defective else 0.0
    )
    seed = SEED_BASE + 10 * list(CONDITIONS).index(name) + int(defective)
    out = np.empty((stop - start, 8), dtype=np.float64)
    for k, index in enumerate(range(start, stop)):
        item = render_item(seed, index, RENDER_SIZE, line, defect=None if defective else NO_DEFECT)
        fitted = inspector.preprocessor.fit(item.image)
        out[k, :7] = image_features(fitted)
        verdict = inspector.run_tensor(inspector.preprocessor.to_tensor(fitted), index, 0.0)
        out[k, 7] = verdict.p_defect
    return out


_INSPECTORS: dict[str, Inspector] = {}


def _inspector(bundle: str) -> Inspector:
    # One runtime per worker process, opened on its first chunk and kept.
    if bundle not in _INSPECTORS:
        _INSPECTORS[bundle] = Inspector.open(bundle, RuntimeOptions(threads=1))
    return _INSPECTORS[bundle]


def measure_line(
    plan: Mapping[str, tuple[int, int]],
    *,
    bundle: Path = ONNX_BUNDLE,
    workers: int | None = None,
    chunk: int = 100,
) -> dict[str, Measured]:
    """Render and measure ``plan[name] = (good items, defective items)`` per condition.

    Deterministic: item i of a condition is always the same frame, whatever ``workers``.
    Work is spread over ``workers`` processes (default: the CPU count, at most 4), each
    with its own single-threaded runtime.
    """
    jobs: list[tuple[str, str, bool, int, int]] = []
    for name, (n_ok, n_defect) in plan.items():
        for defective, count in ((False, n_ok), (True, n_defect)):
            jobs += [
                (str(bundle), name, defective, s, min(count, s + chunk))
                for s in range(0, count, chunk)
            ]
    n_workers = max(1, min(workers or min(4, os.cpu_count() or 1), len(jobs)))
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(n_workers, mp_context=ctx, initializer=_quiet_cv) as pool:
        parts = list(pool.map(_render_chunk, jobs))
    out: dict[str, Measured] = {}
    for name in plan:
        ok = [p for j, p in zip(jobs, parts, strict=True) if j[1] == name and not j[2]]
        bad = [p for j, p in zip(jobs, parts, strict=True) if j[1] == name and j[2]]
        empty = np.empty((0, 8))
        out[name] = Measured(
            ok=np.concatenate(ok) if ok else empty, defect=np.concatenate(bad) if bad else empty
        )
    return out


def _quiet_cv() -> None:
    import cv2

    cv2.setNumThreads(1)  # one process per core; OpenCV's own threads would oversubscribe


@dataclass(frozen=True, slots=True)
class Mix:
    """What the line shows during a segment: conditions with their shares of frames, and
    the defect rate (share of defective items)."""

    parts: tuple[tuple[str, float], ...]
    defect_rate: float

    @classmethod
    def of(cls, condition: str, defect_rate: float) -> Mix:
        return cls(((condition, 1.0),), defect_rate)


@dataclass(frozen=True, slots=True)
class SimWindow:
    """A closed window and the truth behind it: its frames are stream frames
    ``first .. end - 1``; ``correct`` counts frames whose fail/not-fail call matches the
    label (the true accuracy is correct / frames)."""

    window: TelemetryWindow
    first: int
    end: int
    correct: int


class LineSimulator:
    """Bootstrap streams of measured rows through the agent's real window accumulator."""

    def __init__(
        self,
        measured: Mapping[str, Measured],
        profile: ReferenceProfile,
        decision: Decision,
        *,
        window_frames: int = 500,
    ) -> None:
        self.measured = measured
        self.decision = decision
        self.window_frames = window_frames
        self.edges = edges_of(profile)

    def windows(
        self, segments: Sequence[tuple[Mix, int]], rng: np.random.Generator, *, seq0: int = 0
    ) -> Iterator[SimWindow]:
        """Windows of ``window_frames`` frames over the segments (``(mix, frames)`` in
        order); a last partial window is dropped."""
        acc = WindowAccumulator(self.edges, max_frames=self.window_frames, max_seconds=math.inf)
        t_fail, t_unc = self.decision.t_fail, self.decision.t_uncertain
        frame = 0
        first = 0
        correct = 0
        seq = seq0
        for mix, size in _pieces(segments, 4 * self.window_frames):
            rows, labels = self._draw(mix, size, rng)
            p = rows[:, 7]
            called = p >= t_fail
            outcomes = np.where(called, "fail", np.where(p >= t_unc, "uncertain", "pass"))
            right = called == labels
            latency = rng.uniform(0.8, 4.0, size)
            for k in range(size):
                acc.add(str(outcomes[k]), rows[k, :7], float(p[k]), float(latency[k]), frame / FPS)
                correct += int(right[k])
                frame += 1
                if acc.frames >= self.window_frames:
                    window = acc.close(frame / FPS, seq=seq, model=MODEL_ID, edge=EDGE_VERSION)
                    assert window is not None
                    yield SimWindow(window, first, frame, correct)
                    seq += 1
                    first, correct = frame, 0

    def _draw(
        self, mix: Mix, frames: int, rng: np.random.Generator
    ) -> tuple[Rows, npt.NDArray[np.bool_]]:
        names = [n for n, _ in mix.parts]
        shares = np.array([s for _, s in mix.parts], dtype=np.float64)
        which = rng.choice(len(names), size=frames, p=shares / shares.sum())
        labels = rng.random(frames) < mix.defect_rate
        rows = np.empty((frames, 8), dtype=np.float64)
        for i, name in enumerate(names):
            for defective, pool in (
                (False, self.measured[name].ok),
                (True, self.measured[name].defect),
            ):
                sel = (which == i) & (labels == defective)
                count = int(sel.sum())
                if count:
                    if len(pool) == 0:
                        raise ValueError(
                            f"no measured {'defective' if defective else 'good'} rows for {name!r}"
                        )
                    rows[sel] = pool[rng.integers(len(pool), size=count)]
        return rows, labels


def _pieces(segments: Sequence[tuple[Mix, int]], size: int) -> Iterator[tuple[Mix, int]]:
    # Rows are drawn a few windows at a time: a run that stops at its first alarm does
    # not pay for the rest of its segment, and 2 million frames never sit in memory.
    for mix, frames in segments:
        for start in range(0, frames, size):
            yield mix, min(size, frames - start)


# --- goal runners: what the goal tests assert and the bench reports -----------------------

FAMILIES: dict[str, str] = {
    "cusum": "cusum",
    "bernoulli_cusum": "bernoulli_cusum",
    "chi2": "histogram",
    "ks": "histogram",
    "psi": "effect",
    "js": "effect",
    "wasserstein": "effect",
}
FAMILY_NAMES = ("cusum", "bernoulli_cusum", "histogram", "effect")


@dataclass(frozen=True, slots=True)
class InControl:
    """False alarms on an in-control stream: per detector family, the windows in which
    at least one of its detectors alarmed."""

    frames: int
    windows: int
    alarms: Mapping[str, int]
    effects_alone: int = 0  # windows where an effect size passed its threshold, test or not

    def arl0(self, family: str | None = None) -> float:
        """Frames per false alarm (all families together for None). With no alarm at all
        it is the frames watched: a lower bound."""
        count = self.alarms.get(family, 0) if family else self.alarms.get("any", 0)
        return self.frames / max(1, count)


def run_in_control(
    sim: LineSimulator,
    monitor: DriftMonitor,
    mix: Mix,
    frames: int,
    rng: np.random.Generator,
    *,
    progress: Callable[[int], None] | None = None,
) -> InControl:
    """Feed ``frames`` in-control frames through ``monitor`` and count its alarms."""
    counts = dict.fromkeys((*FAMILY_NAMES, "any"), 0)
    windows = 0
    effects_alone = 0
    every = max(1, frames // sim.window_frames // 10)  # progress in tenths
    for sw in sim.windows([(mix, frames)], rng):
        status = monitor.update(sw.window)
        windows += 1
        for family in {FAMILIES[f.test] for f in status.alarms}:
            counts[family] += 1
        counts["any"] += int(status.drifting)
        effects_alone += any(f.statistic > f.threshold for f in status.effects)
        if progress is not None and windows % every == 0:
            progress(sw.end)
    return InControl(windows * sim.window_frames, windows, counts, effects_alone)


@dataclass(frozen=True, slots=True)
class Delays:
    """Detection delays over runs, in frames from the change to the end of the window in
    which the first alarm after it fired; inf when nothing fired within the horizon."""

    window_frames: int
    delays: tuple[float, ...]
    false_before: int  # runs with an alarm before the change (counted, not used)

    @property
    def mean(self) -> float:
        return float(np.mean(self.delays))

    @property
    def median(self) -> float:
        return float(np.median(self.delays))

    def share_within(self, frames: float) -> float:
        return float(np.mean(np.asarray(self.delays) <= frames))


def detection_delays(
    sim: LineSimulator,
    monitor: DriftMonitor,
    before: Mix,
    after: Mix,
    *,
    runs: int,
    rng: np.random.Generator,
    pre_windows: int = 8,
    max_windows: int = 40,
    tests: frozenset[str] | None = None,
) -> Delays:
    """Runs of ``pre_windows`` windows of ``before`` then ``after`` (the change falls on a
    window boundary, mid-stream); the first alarm at or after the change, from detectors
    whose test is in ``tests`` (all for None), ends a run. The monitor is reset per run."""
    change = pre_windows * sim.window_frames
    delays: list[float] = []
    false_before = 0
    for _ in range(runs):
        monitor.reset()
        delay = math.inf
        alarmed_before = False
        segments = [(before, change), (after, max_windows * sim.window_frames)]
        for sw in sim.windows(segments, rng):
            status = monitor.update(sw.window)
            if not any(tests is None or f.test in tests for f in status.alarms):
                continue
            if sw.end <= change:
                alarmed_before = True
                continue
            delay = float(sw.end - change)
            break
        false_before += int(alarmed_before)
        delays.append(delay)
    return Delays(sim.window_frames, tuple(delays), false_before)


@dataclass(frozen=True, slots=True)
class CbpeCheck:
    """CBPE per window after a change: estimate, true accuracy, and the validity flag."""

    estimates: tuple[float, ...]
    truths: tuple[float, ...]
    valid: tuple[bool, ...]

    @property
    def errors(self) -> npt.NDArray[np.float64]:
        diff = np.asarray(self.estimates, dtype=np.float64) - np.asarray(self.truths)
        out: npt.NDArray[np.float64] = np.abs(diff)
        return out

    @property
    def max_error(self) -> float:
        """Largest error over all windows, flagged invalid or not."""
        return float(self.errors.max())

    @property
    def max_error_valid(self) -> float:
        """Largest error over the windows the estimate called valid (0 if none)."""
        valid = np.asarray(self.valid)
        return float(self.errors[valid].max()) if valid.any() else 0.0

    @property
    def share_invalid(self) -> float:
        return 1.0 - float(np.mean(self.valid))

    def holds(self, tolerance: float) -> bool:
        """The goal: every window within tolerance of the truth, or flagged invalid."""
        return self.max_error_valid <= tolerance


def check_cbpe(
    sim: LineSimulator,
    monitor: DriftMonitor,
    before: Mix,
    after: Mix,
    *,
    windows: int,
    rng: np.random.Generator,
    pre_windows: int = 2,
) -> CbpeCheck:
    """CBPE on ``windows`` windows of ``after`` that follow ``pre_windows`` of ``before``."""
    monitor.reset()
    change = pre_windows * sim.window_frames
    est: list[float] = []
    truth: list[float] = []
    valid: list[bool] = []
    for sw in sim.windows([(before, change), (after, windows * sim.window_frames)], rng):
        status = monitor.update(sw.window)
        if sw.first < change:
            continue
        perf = status.performance
        assert perf is not None, "a window without a P(defect) histogram or p_sum"
        est.append(perf.accuracy)
        truth.append(sw.correct / (sw.end - sw.first))
        valid.append(perf.valid)
    return CbpeCheck(tuple(est), tuple(truth), tuple(valid))
