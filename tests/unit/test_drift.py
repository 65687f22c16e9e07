"""The drift monitor (edge_agent.core.drift) on built windows: CUSUMs, tests, CBPE, skips."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from edge_agent.core.drift import (
    DriftConfig,
    DriftMonitor,
    DriftStatus,
    Finding,
    reference_defect_rate,
    window_sigma,
)
from edge_agent.core.drift_tests import (
    calibrate_effect_thresholds,
    psi,
)
from edge_agent.core.features import build_reference_profile
from edge_agent.core.stats import WindowAccumulator, edges_of
from edge_agent.protocol.manifest import FEATURE_NAMES, Decision, ReferenceProfile, parse_manifest
from edge_agent.protocol.telemetry import Moments, TelemetryWindow, edges_id

DECISION = Decision(t_fail=0.5, t_uncertain=0.05)
BRIGHTNESS, CLIPPED, P = 0, 3, 7

# --- profiles, windows ----------------------------------------------------------------


def _rows(n: int, rng: np.random.Generator, brightness: float = 65.0) -> npt.NDArray[np.float64]:
    rows = np.empty((n, 8))
    rows[:, BRIGHTNESS] = rng.normal(brightness, 4.4, n)
    rows[:, 1] = rng.normal(15.7, 2.9, n)
    rows[:, 2] = rng.normal(6.46, 0.2, n)
    rows[:, CLIPPED] = 0.0  # constant in the reference: std 0
    rows[:, 4:7] = rng.normal(brightness, 4.5, (n, 3))
    defect = rng.random(n) < 0.1
    rows[:, P] = np.where(defect, rng.uniform(0.96, 1.0, n), rng.uniform(0.0, 0.02, n))
    return rows


@pytest.fixture(scope="module")
def profile() -> ReferenceProfile:
    return build_reference_profile(_rows(3000, np.random.default_rng(0)), window_frames=100)


def _window(profile: ReferenceProfile, rows: npt.NDArray[np.float64], seq: int) -> TelemetryWindow:
    acc = WindowAccumulator(edges_of(profile), max_frames=len(rows))
    for k, row in enumerate(rows):
        outcome = "fail" if row[P] >= 0.5 else "uncertain" if row[P] >= 0.05 else "pass"
        acc.add(outcome, row[:7], float(row[P]), 2.0, float(k))
    window = acc.close(float(len(rows)), seq=seq, model="m@1", edge="0.1.0")
    assert window is not None
    return window


def _mean_window(
    profile: ReferenceProfile, seq: int, means: dict[str, float], n: int = 100, fails: int = 10
) -> TelemetryWindow:
    """A window carrying only counts and moments, with exactly the given feature means."""
    moments = {
        name: Moments(n, n * means.get(name, profile.features[name].mean), 0.0)
        for name in FEATURE_NAMES
    }
    return TelemetryWindow(
        seq=seq,
        t0=seq,
        t1=seq + 1,
        model="m@1",
        edge="0.1.0",
        ref=edges_id(edges_of(profile)),
        counts={"pass": n - fails, "fail": fails, "uncertain": 0, "error": 0, "dropped": 0},
        moments=moments,
    )


def test_window_sigma_scales_down_to_the_calibrated_size_and_no_further() -> None:
    # Measured 0.5 over 100 frames; per-frame std 4 gives 0.4 independent: 0.5 wins.
    assert window_sigma(0.5, 4.0, 100, 100) == pytest.approx(0.5)
    assert window_sigma(0.5, 4.0, 100, 25) == pytest.approx(1.0)
    assert window_sigma(0.5, 4.0, 100, 500) == pytest.approx(0.5)
    assert window_sigma(0.3, 4.0, 100, 100) == pytest.approx(0.4)


def test_reference_defect_rate_from_the_histogram(profile: ReferenceProfile) -> None:
    counts = profile.features["p_defect"].counts
    share = sum(counts[11:]) / sum(counts)  # bins from the 0.5 edge up, overflow included
    assert reference_defect_rate(profile, 0.5) == pytest.approx(share)
    assert 0.08 < share < 0.12
    # t_fail in the middle of a bin counts that bin in proportion.
    lo = reference_defect_rate(profile, 0.95)
    hi = reference_defect_rate(profile, 0.975)
    assert 0 < hi < lo


def test_monitor_ref_is_the_accumulators_ref(profile: ReferenceProfile) -> None:
    assert DriftMonitor(profile, DECISION).ref_id == WindowAccumulator(edges_of(profile)).ref


def test_window_with_other_edges_is_skipped_and_changes_nothing(profile: ReferenceProfile) -> None:
    monitor = DriftMonitor(profile, DECISION)
    ref = profile.features["brightness"]
    # 3 window sigmas: a CUSUM sum of 2 after one window, over the limit after three.
    shifted = {"brightness": ref.mean + 3.0 * window_sigma(ref.window_mean_std, ref.std, 100, 100)}
    stranger = _mean_window(profile, 0, shifted)
    for seq in range(20):
        status = monitor.update(replace(stranger, seq=seq, ref="0123456789abcdef"))
        assert status.skipped == "ref does not match"
        assert not status.drifting and status.tests == () and status.performance is None
    # Nothing accumulated: one mildly shifted window of the right ref does not alarm.
    assert not monitor.update(_mean_window(profile, 20, shifted)).drifting


def test_repeated_seq_is_skipped(profile: ReferenceProfile) -> None:
    monitor = DriftMonitor(profile, DECISION)
    far = {"brightness": profile.features["brightness"].mean - 20.0}
    assert monitor.update(_mean_window(profile, 5, far)).drifting
    again = monitor.update(_mean_window(profile, 5, far))
    assert again.skipped == "repeated seq" and not again.drifting


@pytest.mark.parametrize(("sign", "direction"), [(1.0, "up"), (-1.0, "down")])
def test_cusum_direction_and_change_point(
    profile: ReferenceProfile, sign: float, direction: str
) -> None:
    monitor = DriftMonitor(profile, DECISION)
    ref = profile.features["brightness"]
    for seq in range(10):
        assert not monitor.update(_mean_window(profile, seq, {})).drifting
    # 2.5 window sigmas: below the limit after one window, above it after a few.
    sigma = window_sigma(ref.window_mean_std, ref.std, 100, 100)
    shift = {"brightness": ref.mean + sign * 2.5 * sigma}
    alarms: list[Finding] = []
    seq = 10
    while not alarms:
        status = monitor.update(_mean_window(profile, seq, shift))
        alarms = [a for a in status.alarms if a.feature == "brightness"]
        seq += 1
        assert seq < 20
    (alarm,) = alarms
    assert alarm.test == "cusum" and alarm.direction == direction
    assert alarm.since_seq == 10
    assert alarm.statistic > alarm.threshold == DriftConfig().cusum_h
    # The effect is the shift in per-frame reference standard deviations.
    assert alarm.effect == pytest.approx(sign * 2.5 * sigma / ref.std)


def test_cusum_reset_forgets_the_sums(profile: ReferenceProfile) -> None:
    ref = profile.features["brightness"]
    sigma = window_sigma(ref.window_mean_std, ref.std, 100, 100)
    # One window at 4 sigma: sum 3 (k = 1), under the limit 5; a second one crosses it.
    shift = {"brightness": ref.mean + 4.0 * sigma}
    monitor = DriftMonitor(profile, DECISION)
    assert not monitor.update(_mean_window(profile, 0, shift)).drifting
    assert monitor.update(_mean_window(profile, 1, shift)).drifting
    monitor = DriftMonitor(profile, DECISION)
    assert not monitor.update(_mean_window(profile, 0, shift)).drifting
    monitor.reset()
    assert not monitor.update(_mean_window(profile, 1, shift)).drifting


def test_cusum_restarts_after_an_alarm_and_goes_quiet_when_the_change_ends(
    profile: ReferenceProfile,
) -> None:
    monitor = DriftMonitor(profile, DECISION)
    far = {"brightness": profile.features["brightness"].mean + 30.0}
    for seq in range(5):
        assert monitor.update(_mean_window(profile, seq, far)).drifting  # every window
    for seq in range(5, 50):
        assert not monitor.update(_mean_window(profile, seq, {})).drifting


def test_zero_variance_feature_has_a_floor_and_never_alarms_in_control(
    profile: ReferenceProfile,
) -> None:
    assert profile.features["clipped"].std == 0.0
    monitor = DriftMonitor(profile, DECISION)
    for seq in range(1000):
        assert not monitor.update(_mean_window(profile, seq, {})).drifting
    # Floor 0.02 x bin 0.05 = 0.001: 0.7% clipped pixels is 7 floors, over h + k at once.
    status = monitor.update(_mean_window(profile, 1000, {"clipped": 0.007}))
    (alarm,) = [a for a in status.alarms if a.feature == "clipped"]
    assert alarm.direction == "up" and math.isfinite(alarm.statistic)
    assert alarm.effect is not None and math.isfinite(alarm.effect)
    # A change of a tiny fraction of the floor is ignored (k absorbs it), not amplified.
    monitor.reset()
    for seq in range(1001, 1100):
        assert not monitor.update(_mean_window(profile, seq, {"clipped": 1e-9})).drifting


def test_bernoulli_cusum_both_directions(profile: ReferenceProfile) -> None:
    monitor = DriftMonitor(profile, DECISION)
    assert monitor.baseline == pytest.approx(reference_defect_rate(profile, 0.5))
    up = [monitor.update(_mean_window(profile, s, {}, fails=25)) for s in range(3)]
    found = [a for st in up for a in st.alarms if a.test == "bernoulli_cusum"]
    assert found and found[0].direction == "up" and found[0].feature == "defect_rate"
    assert found[0].since_seq == 0 and found[0].effect == pytest.approx(0.25 - monitor.baseline)
    monitor.reset()
    down = [monitor.update(_mean_window(profile, s, {}, fails=0)) for s in range(10, 30)]
    found = [a for st in down for a in st.alarms if a.test == "bernoulli_cusum"]
    assert found and found[0].direction == "down"


def test_configured_baseline_replaces_the_reference_rate(profile: ReferenceProfile) -> None:
    monitor = DriftMonitor(profile, DECISION, DriftConfig(baseline_defect_rate=0.02))
    assert monitor.baseline == 0.02
    statuses = [monitor.update(_mean_window(profile, s, {}, fails=10)) for s in range(5)]
    assert any(a.direction == "up" for st in statuses for a in st.alarms)


def test_histogram_tests_run_on_windows_of_500_frames_or_more(profile: ReferenceProfile) -> None:
    rng = np.random.default_rng(3)
    monitor = DriftMonitor(profile, DECISION)
    small = monitor.update(_window(profile, _rows(400, rng), 0))
    assert small.tests == () and small.effects  # histograms, effect sizes, no tests
    status = monitor.update(_window(profile, _rows(500, rng), 1))
    tested = {(f.feature, f.test) for f in status.tests}
    with_histograms = {f.feature for f in status.effects}
    assert tested == {(name, t) for name in with_histograms for t in ("chi2", "ks")}
    assert all(f.p_value is not None and 0.0 <= f.p_value <= 1.0 for f in status.tests)
    assert not status.drifting


def test_effect_sizes_alarm_only_with_a_significant_test(profile: ReferenceProfile) -> None:
    rng = np.random.default_rng(4)
    monitor = DriftMonitor(profile, DECISION)
    calm = monitor.update(_window(profile, _rows(1000, rng), 0))
    assert calm.effects and not calm.drifting
    drifted = monitor.update(_window(profile, _rows(1000, rng, brightness=60.0), 1))
    tests = {a.test for a in drifted.alarms if a.feature == "brightness"}
    assert {"chi2", "ks", "psi", "js", "wasserstein"} <= tests
    for alarm in drifted.alarms:
        if alarm.test in ("psi", "js", "wasserstein"):
            assert any(
                a.feature == alarm.feature and a.test in ("chi2", "ks") for a in drifted.alarms
            )


def test_effect_thresholds_scale_with_window_size(profile: ReferenceProfile) -> None:
    small = calibrate_effect_thresholds(profile, 100, np.random.default_rng(0))
    large = calibrate_effect_thresholds(profile, 2000, np.random.default_rng(0))
    for name in ("brightness", "contrast", "p_defect"):
        assert small[name].psi > large[name].psi > 0
        assert small[name].wasserstein > large[name].wasserstein > 0
    # A fixed PSI of 0.1 is below chance level for 100-frame windows and far above it
    # for 2,000-frame ones.
    assert small["brightness"].psi > 0.1 > 5 * large["brightness"].psi
    # Reproducible from the seed.
    again = calibrate_effect_thresholds(profile, 100, np.random.default_rng(0))
    assert again == small


def test_calibrated_thresholds_hold_chance_windows_to_a_few_percent(
    profile: ReferenceProfile,
) -> None:
    t = calibrate_effect_thresholds(profile, 500, np.random.default_rng(1))["brightness"]
    ref = np.asarray(profile.features["brightness"].counts, dtype=np.float64)
    rng = np.random.default_rng(2)
    over = 0
    for _ in range(400):
        w = rng.multinomial(500, ref / ref.sum())
        r = rng.multinomial(int(ref.sum()), ref / ref.sum())
        over += psi(w.tolist(), r.tolist()) > t.psi
    assert over / 400 < 0.05


def test_performance_is_valid_in_control_and_invalid_under_input_drift(
    profile: ReferenceProfile,
) -> None:
    rng = np.random.default_rng(6)
    monitor = DriftMonitor(profile, DECISION)
    calm = monitor.update(_window(profile, _rows(500, rng), 0))
    assert calm.performance is not None and calm.performance.valid
    assert calm.performance.accuracy > 0.95 and calm.performance.frames == 500
    dark = monitor.update(_window(profile, _rows(500, rng, brightness=50.0), 1))
    assert dark.performance is not None and not dark.performance.valid
    assert dark.performance.reason is not None and "brightness" in dark.performance.reason


@pytest.mark.parametrize(
    "bad",
    [
        {"cusum_h": 0.0},
        {"bernoulli_ratio": 1.0},
        {"baseline_defect_rate": 0.0},
        {"alpha": 1.0},
        {"effect_draws": 1},
        {"cusum_features": ("brightness", "hue")},
    ],
)
def test_config_refuses_bad_values(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        DriftConfig(**bad)  # type: ignore[arg-type]


def test_status_drifting_is_any_alarm() -> None:
    assert not DriftStatus(0, (), (), None).drifting


@pytest.mark.parametrize("bundle", ["reference-onnx", "reference-tflite"])
def test_monitor_on_the_committed_reference_profiles(bundle: str) -> None:
    path = Path(__file__).resolve().parents[2] / "models" / bundle / "bundle.json"
    manifest = parse_manifest(path.read_bytes())
    assert manifest.reference is not None
    monitor = DriftMonitor(manifest.reference, manifest.decision)
    assert monitor.ref_id == edges_id(edges_of(manifest.reference))
    assert 0.05 < monitor.baseline < 0.15  # the reference split's defect rate is 0.1
    # A window of exactly the reference means is in control for every detector.
    status = monitor.update(_mean_window(manifest.reference, 0, {}, fails=10))
    assert not status.drifting and status.skipped is None
