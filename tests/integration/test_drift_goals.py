"""The drift goals of issue 5 on streams from the synthetic line (tests/drift_streams.py).

Fewer frames and runs than ``scripts/bench_drift.py`` (which does G1 over 2 million
frames), but every goal is asserted. Frames are rendered once per session: real frames,
fitted by the ONNX reference bundle's preprocessor, features and P(defect) measured.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from edge_agent.bundle import load_bundle
from edge_agent.core.drift import DriftConfig, DriftMonitor, reference_defect_rate
from edge_agent.protocol.manifest import Decision, ReferenceProfile
from edge_agent.protocol.telemetry import decode_window, encode_window
from tests.drift_streams import (
    FAMILY_NAMES,
    ONNX_BUNDLE,
    LineSimulator,
    Measured,
    Mix,
    check_cbpe,
    detection_delays,
    measure_line,
    run_in_control,
)

pytestmark = pytest.mark.slow

PLAN = {
    "normal": (1500, 250),
    "bright98": (300, 40),
    "bright95": (300, 40),
    "bright90": (300, 40),
    "bright80": (300, 40),
    "bright70": (300, 40),
    "variant_b": (300, 40),
}
ARL0_GOAL = 100_000
SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_drift.py"


@pytest.fixture(scope="session")
def measured() -> dict[str, Measured]:
    return measure_line(PLAN, workers=2)


@pytest.fixture(scope="session")
def reference() -> tuple[ReferenceProfile, Decision]:
    manifest = load_bundle(ONNX_BUNDLE).manifest
    assert manifest.reference is not None
    return manifest.reference, manifest.decision


def _sim(
    measured: dict[str, Measured], ref: tuple[ReferenceProfile, Decision], n: int
) -> LineSimulator:
    return LineSimulator(measured, ref[0], ref[1], window_frames=n)


def _normal(ref: tuple[ReferenceProfile, Decision]) -> Mix:
    return Mix.of("normal", reference_defect_rate(ref[0], ref[1].t_fail))


@pytest.mark.parametrize("window_frames", [500, 100])
def test_g1_in_control_false_alarms(
    measured: dict[str, Measured], reference: tuple[ReferenceProfile, Decision], window_frames: int
) -> None:
    frames = 200_000
    monitor = DriftMonitor(*reference)
    run = run_in_control(
        _sim(measured, reference, window_frames),
        monitor,
        _normal(reference),
        frames,
        np.random.default_rng(1),
    )
    assert run.frames == frames
    # ARL0 >= 10^5 frames per family: at most 2 false alarms in 2 x 10^5 frames.
    for family in FAMILY_NAMES:
        assert run.arl0(family) >= ARL0_GOAL, (family, run.alarms)


def test_g1_defect_rate_at_a_two_percent_baseline(
    measured: dict[str, Measured], reference: tuple[ReferenceProfile, Decision]
) -> None:
    monitor = DriftMonitor(*reference, DriftConfig(baseline_defect_rate=0.02))
    sim = _sim(measured, reference, 100)
    run = run_in_control(sim, monitor, Mix.of("normal", 0.02), 200_000, np.random.default_rng(2))
    assert run.arl0("bernoulli_cusum") >= ARL0_GOAL, run.alarms


def test_g2_brightness_drops(
    measured: dict[str, Measured], reference: tuple[ReferenceProfile, Decision]
) -> None:
    rng = np.random.default_rng(3)
    monitor = DriftMonitor(*reference)
    normal = _normal(reference)
    p = normal.defect_rate
    w500, w100 = _sim(measured, reference, 500), _sim(measured, reference, 100)
    d30 = detection_delays(w500, monitor, normal, Mix.of("bright70", p), runs=30, rng=rng)
    assert d30.share_within(500) >= 0.95
    d5 = detection_delays(w100, monitor, normal, Mix.of("bright95", p), runs=40, rng=rng)
    assert d5.median <= 200
    d2 = detection_delays(w500, monitor, normal, Mix.of("bright98", p), runs=40, rng=rng)
    assert d2.mean <= 2000
    # Runs with a false alarm before the change: about 0.5 expected at the G1 rate.
    assert d30.false_before + d5.false_before + d2.false_before <= 3


def test_g3_defect_rate(
    measured: dict[str, Measured], reference: tuple[ReferenceProfile, Decision]
) -> None:
    # Windows of 100 frames: an alarm comes at the end of a window, so a 250-frame goal
    # cannot be met with 500-frame windows (docs/drift.md).
    rng = np.random.default_rng(4)
    monitor = DriftMonitor(*reference, DriftConfig(baseline_defect_rate=0.02))
    sim = _sim(measured, reference, 100)
    two = Mix.of("normal", 0.02)
    bern = frozenset({"bernoulli_cusum"})
    d4 = detection_delays(sim, monitor, two, Mix.of("normal", 0.04), runs=80, rng=rng, tests=bern)
    assert d4.mean <= 1000
    d10 = detection_delays(sim, monitor, two, Mix.of("normal", 0.10), runs=60, rng=rng, tests=bern)
    assert d10.mean <= 250


def test_g4_unseen_variant(
    measured: dict[str, Measured], reference: tuple[ReferenceProfile, Decision]
) -> None:
    normal = _normal(reference)
    variant = Mix((("normal", 0.5), ("variant_b", 0.5)), normal.defect_rate)
    delays = detection_delays(
        _sim(measured, reference, 500),
        DriftMonitor(*reference),
        normal,
        variant,
        runs=20,
        rng=np.random.default_rng(5),
    )
    assert delays.mean <= 500


@pytest.mark.parametrize("condition", ["normal", "bright90", "bright80", "bright70"])
def test_g6_cbpe_within_three_points_or_flagged(
    measured: dict[str, Measured], reference: tuple[ReferenceProfile, Decision], condition: str
) -> None:
    normal = _normal(reference)
    check = check_cbpe(
        _sim(measured, reference, 2000),
        DriftMonitor(*reference),
        normal,
        Mix.of(condition, normal.defect_rate),
        windows=4,
        rng=np.random.default_rng(6),
    )
    assert len(check.truths) == 4
    assert check.holds(0.03)
    if condition == "normal":
        assert all(check.valid)  # no drift: the estimate must be usable, not just flagged
    else:
        assert not any(check.valid)  # a 10% drop or more is input drift


def test_simulated_windows_are_real_wire_windows(
    measured: dict[str, Measured], reference: tuple[ReferenceProfile, Decision]
) -> None:
    sim = _sim(measured, reference, 500)
    window = next(sim.windows([(_normal(reference), 500)], np.random.default_rng(7))).window
    assert decode_window(encode_window(window)) == window
    assert window.frames == 500 and window.p_sum is not None


def _load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_drift", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_bench_reports_every_key(
    measured: dict[str, Measured], capsys: pytest.CaptureFixture[str]
) -> None:
    bench = _load_bench()
    args = bench.parse_args(
        ["--json", "--frames", "10000", "--runs", "3", "--cbpe-windows", "2", "--cost-frames", "30"]
    )
    result = bench.run_goals(measured, args)
    keys = {
        "arl0_frames",
        "delay_brightness_30",
        "delay_brightness_5_median",
        "delay_brightness_2_mean",
        "delay_defect_4_mean",
        "delay_defect_10_mean",
        "delay_variant_mean",
        "feature_cost_share",
        "bytes_per_window",
        "bytes_per_day",
        "arl0_by_family",
        "g6_cbpe",
        "goals",
    }
    assert keys <= set(result)
    assert 0 < result["feature_cost_share"] < 1
    assert 500 < result["bytes_per_window"] <= 2048
    assert result["bytes_per_day"] == pytest.approx(
        86_400 / (500 / 30) * result["bytes_per_window"]
    )
    json.dumps(result)
    bench.print_table(result, args)
    out = capsys.readouterr().out
    assert "arl0_frames" in out and ("PASS" in out or "MISS" in out)
