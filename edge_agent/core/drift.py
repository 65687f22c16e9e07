"""Drift detectors on aggregate telemetry windows: one monitor per device (or per fleet view).

    monitor = DriftMonitor(bundle.reference, bundle.decision)
    for window in windows_in_seq_order:
        status = monitor.update(window)
        if status.drifting: ...  # status.alarms says which feature, which test, since when

Detectors, each on what a window carries (``edge_agent.protocol.telemetry``):

- **CUSUM** (two-sided) on each image feature's window mean, standardized by the
  reference's window-mean sigma (see ``window_sigma`` for other window sizes).
- **Bernoulli CUSUM** (both directions) on the predicted-defect rate: fail verdicts
  among inspected frames, against the reference's rate or a configured baseline.
- **chi-square and KS** per histogram, on windows of at least ``min_test_frames`` frames,
  at a per-window family-wise level ``alpha`` (Bonferroni over the window's tests).
- **PSI, Jensen-Shannon, Wasserstein** effect sizes against thresholds calibrated on
  reference windows of the same size; they alarm only with a significant test on the
  same feature (significant *and* larger than chance), because on their own at
  mean + 3 sigma they fire on a few percent of in-control windows per feature.
- **CBPE**: the model's own accuracy estimate, flagged invalid while inputs drift.

Pure: no files, sockets or clocks; the only randomness (threshold calibration) is seeded
by the config. The statistics themselves are in ``edge_agent.core.drift_tests``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edge_agent.core.drift_tests import (
    EffectThresholds,
    benjamini_hochberg,
    calibrate_effect_thresholds,
    cbpe,
    chi2_critical,
    chi_square,
    jensen_shannon,
    ks_critical,
    ks_from_histograms,
    psi,
    reference_defect_rate,
    wasserstein,
)
from edge_agent.protocol.manifest import FEATURE_NAMES, Decision, ReferenceProfile
from edge_agent.protocol.telemetry import P_DEFECT, TelemetryWindow, edges_id

__all__ = [
    "IMAGE_FEATURES",
    "DriftConfig",
    "DriftMonitor",
    "DriftStatus",
    "EffectThresholds",
    "Finding",
    "PerformanceEstimate",
    "benjamini_hochberg",
    "calibrate_effect_thresholds",
    "cbpe",
    "chi_square",
    "jensen_shannon",
    "ks_from_histograms",
    "psi",
    "reference_defect_rate",
    "wasserstein",
    "window_sigma",
]

IMAGE_FEATURES: tuple[str, ...] = FEATURE_NAMES[:-1]
HISTOGRAM_TESTS = ("chi2", "ks")
EFFECT_TESTS = ("psi", "js", "wasserstein")


@dataclass(frozen=True, slots=True)
class Finding:
    """One detector's result. ``statistic`` and ``threshold`` are in the test's own units
    (CUSUM sums in window sigmas, chi-square, KS D, PSI, JS bits, Wasserstein in feature
    units). ``effect``: CUSUM: shift since ``since_seq`` in reference per-frame standard
    deviations; Bernoulli CUSUM: defect rate since ``since_seq`` minus the baseline;
    chi2: Cramer's V; ks: D; effect sizes: their value. ``since_seq``: the CUSUM's
    change-point estimate (first window after its sum last stood at zero), else this
    window."""

    feature: str
    test: str
    direction: str | None
    statistic: float
    threshold: float
    effect: float | None
    p_value: float | None
    since_seq: int


@dataclass(frozen=True, slots=True)
class PerformanceEstimate:
    """CBPE accuracy over ``frames`` frames; ``valid`` False (with ``reason``) when the
    inputs have drifted, which voids the model's calibration the estimate rests on."""

    accuracy: float
    frames: int
    valid: bool
    reason: str | None


@dataclass(frozen=True, slots=True)
class DriftStatus:
    """What the monitor concludes after one window.

    ``alarms``: every detector alarming after this window. ``tests``: chi2/KS results for
    this window's histograms, alarming or not (p-values for Benjamini-Hochberg across
    devices). ``effects``: PSI/JS/Wasserstein for this window, alarming or not.
    ``skipped``: why the window was not used (then everything else is empty).
    """

    seq: int
    alarms: tuple[Finding, ...]
    tests: tuple[Finding, ...]
    performance: PerformanceEstimate | None
    effects: tuple[Finding, ...] = ()
    skipped: str | None = None

    @property
    def drifting(self) -> bool:
        return bool(self.alarms)


@dataclass(frozen=True, slots=True)
class DriftConfig:
    """Detector settings. Defaults were chosen on streams of the synthetic line so that
    every detector family stays above 10^5 frames between false alarms on windows of 100
    and of 500 frames (docs/drift.md has the measurements).

    cusum_k, cusum_h: CUSUM allowance and decision limit, in window sigmas.
    cusum_features: features with a window-mean CUSUM (P(defect) is watched by the
        Bernoulli CUSUM instead).
    sigma_floor_bins: smallest sigma, as a share of the feature's narrowest bin: a
        feature constant in the reference (``clipped``: std 0) still gets a finite CUSUM
        that ignores changes below a fiftieth of a bin.
    bernoulli_ratio: the defect-rate change the Bernoulli CUSUM is tuned to (x ratio up,
        / ratio down); bernoulli_h its decision limit (log-likelihood units).
    baseline_defect_rate: in-control fail rate; None takes it from the reference profile.
    alpha: per-window family-wise level of the chi2/KS tests (Bonferroni).
    min_test_frames: smallest window the chi2/KS tests (and so effect alarms) run on.
    effect_z, effect_draws, calibration_seed: effect thresholds are mean + effect_z sd of
        effect_draws reference windows of the window's size, drawn with this seed.
    cbpe_max_shift: CBPE is invalid when an image feature's window mean is this many
        window sigmas from the reference, or any image-feature detector alarms.
    """

    cusum_k: float = 1.0
    cusum_h: float = 5.0
    cusum_features: tuple[str, ...] = IMAGE_FEATURES
    sigma_floor_bins: float = 0.02
    bernoulli_ratio: float = 2.0
    bernoulli_h: float = 6.5
    baseline_defect_rate: float | None = None
    alpha: float = 1e-3
    min_test_frames: int = 500
    test_features: tuple[str, ...] = FEATURE_NAMES
    effect_z: float = 3.0
    effect_draws: int = 200
    calibration_seed: int = 0
    cbpe_max_shift: float = 3.0

    def __post_init__(self) -> None:
        if self.cusum_k < 0 or self.cusum_h <= 0 or self.bernoulli_h <= 0:
            raise ValueError("cusum_k must be >= 0, cusum_h and bernoulli_h > 0")
        if self.bernoulli_ratio <= 1.0:
            raise ValueError(f"bernoulli_ratio must be > 1, got {self.bernoulli_ratio}")
        if self.baseline_defect_rate is not None and not 0.0 < self.baseline_defect_rate < 1.0:
            raise ValueError(f"baseline_defect_rate must be in (0, 1): {self.baseline_defect_rate}")
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if self.sigma_floor_bins <= 0 or self.effect_draws < 2 or self.min_test_frames < 1:
            raise ValueError("sigma_floor_bins > 0, effect_draws >= 2, min_test_frames >= 1")
        unknown = set(self.cusum_features) | set(self.test_features)
        unknown -= set(FEATURE_NAMES)
        if unknown:
            raise ValueError(f"unknown features: {', '.join(sorted(unknown))}")


def window_sigma(window_mean_std: float, std: float, window_frames: int, n: int) -> float:
    """Standard deviation of an n-frame window mean, from the reference profile.

    The profile measured ``window_mean_std`` over windows of ``window_frames`` frames,
    and it also holds the per-frame ``std``. sigma_W = max(window_mean_std,
    std / sqrt(W)): the larger of the measured value and the independent-frames value
    (both estimate the same thing on an uncorrelated line; the first is noisier).

    For n <= W: sigma_W * sqrt(W / n). For n > W: sigma_W, not sigma_W * sqrt(W / n).
    On a line whose frames are positively correlated (lighting that wanders, batches of
    similar parts), n Var(mean_n) grows with n, so the independent-frames scaling
    understates the spread of long windows and false-alarms; and the mean of several
    W-frame means can never vary more than one of them, so sigma_W is an upper bound
    for any such line. Both cases give the largest sigma consistent with non-negative
    autocorrelation. The price: a long window is judged like a W-frame one, so small
    shifts take a few windows (docs/drift.md).
    """
    sigma_w = max(window_mean_std, std / math.sqrt(window_frames))
    return sigma_w * math.sqrt(window_frames / min(n, window_frames))


@dataclass(slots=True)
class _Side:
    """One side of a CUSUM: the sum, and what was seen since it last stood at zero."""

    s: float = 0.0
    since: int = -1
    shift_sum: float = 0.0  # sum over those windows of (value - target) * frames
    frames: int = 0

    def step(self, increment: float, seq: int, deviation: float, frames: int) -> None:
        if self.s == 0.0:
            self.since, self.shift_sum, self.frames = seq, 0.0, 0
        self.s = max(0.0, self.s + increment)
        self.shift_sum += deviation * frames
        self.frames += frames
        if self.s == 0.0:
            self.since, self.shift_sum, self.frames = -1, 0.0, 0

    def restart(self) -> None:
        self.s, self.since, self.shift_sum, self.frames = 0.0, -1, 0.0, 0


class DriftMonitor:
    """All detectors for one stream of windows from devices sharing one reference.

    Feed windows in seq order with ``update``. Call ``reset`` when the active model or
    reference changes, or after an operator has acted on an alarm. A CUSUM that alarms
    restarts from zero, so a change that persists alarms again every few windows.
    """

    def __init__(
        self, reference: ReferenceProfile, decision: Decision, config: DriftConfig = DriftConfig()
    ) -> None:
        self.reference = reference
        self.decision = decision
        self.config = config
        self.ref_id = edges_id({n: list(reference.features[n].edges) for n in FEATURE_NAMES})
        rate = config.baseline_defect_rate
        if rate is None:
            rate = reference_defect_rate(reference, decision.t_fail)
        # A reference without a single fail (or only fails) would give an infinite
        # log-likelihood ratio; keep the baseline within one frame of the profile's ends.
        edge = 1.0 / (reference.frames + 1)
        self.baseline = min(max(rate, edge), 1.0 - edge)
        self._floor = {
            name: config.sigma_floor_bins * min(b - a for a, b in itertools.pairwise(f.edges))
            for name, f in reference.features.items()
        }
        self._thresholds: dict[int, dict[str, EffectThresholds]] = {}
        self.reset()

    def reset(self) -> None:
        """Forget all sums (every detector starts again from in-control)."""
        self._sides: dict[tuple[str, str], _Side] = {}  # (feature, direction)
        self._last_seq: int | None = None

    def update(self, window: TelemetryWindow) -> DriftStatus:
        """Run every detector on one window and return what alarms now.

        A window whose ``ref`` names other histogram edges than this reference's, or that
        repeats the last seq (a QoS 1 redelivery), is skipped: nothing changes.
        """
        if window.ref != self.ref_id:
            return DriftStatus(window.seq, (), (), None, skipped="ref does not match")
        if window.seq == self._last_seq:
            return DriftStatus(window.seq, (), (), None, skipped="repeated seq")
        self._last_seq = window.seq
        alarms = self._feature_cusums(window)
        alarms += self._rate_cusum(window)
        tests, effects, level = self._histograms(window)
        significant = [f for f in tests if f.p_value is not None and f.p_value < level]
        rejected = {f.feature for f in significant}
        alarms += significant
        alarms += [f for f in effects if f.feature in rejected and f.statistic > f.threshold]
        performance = self._performance(window, alarms)
        return DriftStatus(window.seq, tuple(alarms), tuple(tests), performance, tuple(effects))

    def _sigma(self, name: str, n: int) -> float:
        ref = self.reference.features[name]
        sigma = window_sigma(ref.window_mean_std, ref.std, ref.window_frames, n)
        return max(sigma, self._floor[name])

    def _feature_cusums(self, window: TelemetryWindow) -> list[Finding]:
        cfg = self.config
        found: list[Finding] = []
        for name in cfg.cusum_features:
            m = window.moments.get(name)
            if m is None or m.n == 0:
                continue
            ref = self.reference.features[name]
            sigma = self._sigma(name, m.n)
            deviation = m.mean - ref.mean
            z = deviation / sigma
            unit = max(ref.std, self._sigma(name, ref.window_frames))
            for direction, inc in (("up", z - cfg.cusum_k), ("down", -z - cfg.cusum_k)):
                side = self._sides.setdefault((name, direction), _Side())
                side.step(inc, window.seq, deviation, m.n)
                if side.s > cfg.cusum_h:
                    effect = side.shift_sum / side.frames / unit
                    found.append(
                        Finding(
                            name, "cusum", direction, side.s, cfg.cusum_h, effect, None, side.since
                        )
                    )
                    side.restart()
        return found

    def _rate_cusum(self, window: TelemetryWindow) -> list[Finding]:
        counts = window.counts
        n = sum(counts.get(k, 0) for k in ("pass", "fail", "uncertain"))
        if n == 0:
            return []
        x = counts.get("fail", 0)
        p0, r, h = self.baseline, self.config.bernoulli_ratio, self.config.bernoulli_h
        found: list[Finding] = []
        for direction, p1 in (("up", min(p0 * r, 1.0 - (1.0 - p0) / r)), ("down", p0 / r)):
            llr = x * math.log(p1 / p0) + (n - x) * math.log((1.0 - p1) / (1.0 - p0))
            side = self._sides.setdefault(("defect_rate", direction), _Side())
            side.step(llr, window.seq, x / n - p0, n)
            if side.s > h:
                effect = side.shift_sum / side.frames
                found.append(
                    Finding(
                        "defect_rate",
                        "bernoulli_cusum",
                        direction,
                        side.s,
                        h,
                        effect,
                        None,
                        side.since,
                    )
                )
                side.restart()
        return found

    def _histograms(self, window: TelemetryWindow) -> tuple[list[Finding], list[Finding], float]:
        """chi2/KS findings, effect-size findings, and the per-test level (Bonferroni)."""
        cfg = self.config
        present = [f for f in cfg.test_features if f in window.hist]
        if not present:
            return [], [], 0.0
        frames = window.frames
        tests: list[Finding] = []
        run_tests = frames >= cfg.min_test_frames
        level = cfg.alpha / (len(HISTOGRAM_TESTS) * len(present))
        thresholds = self._effect_thresholds(frames)
        effects: list[Finding] = []
        seq = window.seq
        for name in present:
            counts = list(window.hist[name])
            ref = self.reference.features[name]
            if len(counts) != len(ref.counts):
                continue
            if run_tests:
                stat, dof, p = chi_square(counts, ref.counts)
                n, m = float(sum(counts)), float(sum(ref.counts))
                v = math.sqrt(stat / (n + m)) if n + m > 0 else 0.0
                tests.append(
                    Finding(name, "chi2", None, stat, chi2_critical(level, dof), v, p, seq)
                )
                d, p_ks = ks_from_histograms(counts, ref.counts)
                tests.append(Finding(name, "ks", None, d, ks_critical(level, n, m), d, p_ks, seq))
            t = thresholds[name]
            for test, value, limit in (
                ("psi", psi(counts, ref.counts), t.psi),
                ("js", jensen_shannon(counts, ref.counts), t.js),
                ("wasserstein", wasserstein(counts, ref.counts, ref.edges), t.wasserstein),
            ):
                effects.append(Finding(name, test, None, value, limit, value, None, seq))
        return tests, effects, level

    def _effect_thresholds(self, frames: int) -> dict[str, EffectThresholds]:
        # Calibrated once per size bucket (two significant digits, rounded down: a
        # smaller window has wider chance spread, so the threshold errs high).
        digits = max(0, len(str(frames)) - 2)
        bucket = max(1, frames // 10**digits * 10**digits)
        if bucket not in self._thresholds:
            rng = np.random.default_rng([self.config.calibration_seed, bucket])
            self._thresholds[bucket] = calibrate_effect_thresholds(
                self.reference,
                bucket,
                rng,
                draws=self.config.effect_draws,
                z=self.config.effect_z,
            )
        return self._thresholds[bucket]

    def _performance(
        self, window: TelemetryWindow, alarms: Sequence[Finding]
    ) -> PerformanceEstimate | None:
        hist = window.hist.get(P_DEFECT)
        if hist is None or window.p_sum is None:
            return None
        ref = self.reference.features[P_DEFECT]
        accuracy = cbpe(hist, window.p_sum, ref.edges, self.decision.t_fail)
        drifted = sorted({f.feature for f in alarms if f.feature in IMAGE_FEATURES})
        for name in IMAGE_FEATURES:
            m = window.moments.get(name)
            if m is None or m.n == 0 or name in drifted:
                continue
            shift = abs(m.mean - self.reference.features[name].mean) / self._sigma(name, m.n)
            if shift > self.config.cbpe_max_shift:
                drifted.append(name)
        reason = f"input drift: {', '.join(sorted(drifted))}" if drifted else None
        return PerformanceEstimate(accuracy, int(sum(hist)), not drifted, reason)
