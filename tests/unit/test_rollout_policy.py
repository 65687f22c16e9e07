"""The pure rollout policy: wave plans, target selection, gates, the state machine."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from fleet_server.compatibility import find_profiles
from fleet_server.domain.rollout import (
    Conflict,
    DeviceFacts,
    GateLimits,
    ReleaseFacts,
    RolloutError,
    RolloutSpec,
    RolloutTarget,
    WaveSpec,
    plan_waves,
    select_targets,
    transition,
)
from fleet_server.domain.rollout_gates import (
    DeviceHealth,
    Judgement,
    WindowTotals,
    judge_wave,
    p99_upper_ms,
)

PROFILES = find_profiles([Path(__file__).resolve().parents[2] / "firmware_profiles"])
T0 = datetime(2026, 6, 1, 12, 0, tzinfo=timezone.utc)
CANARY_PLAN = (
    WaveSpec(devices=1),
    WaveSpec(percent=10),
    WaveSpec(percent=50),
    WaveSpec(percent=100),
)


# -- waves ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("total", "plan", "sizes"),
    [
        (100, CANARY_PLAN, [1, 9, 40, 50]),
        (1, CANARY_PLAN, [1]),  # the canary is the whole fleet: later waves add nothing
        (3, CANARY_PLAN, [1, 1, 1]),  # 10 % of 3 rounds up to 1 (no new device: dropped)
        (7, CANARY_PLAN, [1, 3, 3]),  # 10 % of 7 -> 1 (dropped), 50 % -> 4, 100 % -> 7
        (30, (WaveSpec(percent=10), WaveSpec(percent=100)), [3, 27]),  # no float overshoot
        (1000, (WaveSpec(percent=100),), [1000]),
        (5, (WaveSpec(devices=2), WaveSpec(devices=10)), [2, 3]),
        (10, (WaveSpec(percent=33.3), WaveSpec(percent=100)), [4, 6]),
    ],
)
def test_wave_sizes_are_cumulative_and_round_up(
    total: int, plan: tuple[WaveSpec, ...], sizes: list[int]
) -> None:
    assert plan_waves(total, plan) == sizes
    assert sum(sizes) == total


def test_a_plan_must_reach_every_targeted_device() -> None:
    with pytest.raises(RolloutError, match="must reach all 10 targeted devices"):
        plan_waves(10, (WaveSpec(devices=1), WaveSpec(percent=50)))


def test_no_targeted_device_is_a_conflict() -> None:
    with pytest.raises(Conflict, match="no device to roll out to"):
        plan_waves(0, CANARY_PLAN)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({}, "exactly one"),
        ({"devices": 1, "percent": 10.0}, "exactly one"),
        ({"devices": 0}, "wave.devices"),
        ({"percent": 0.0}, "wave.percent"),
        ({"percent": 100.5}, "wave.percent"),
    ],
)
def test_bad_wave_specs_name_the_field(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(RolloutError, match=field):
        WaveSpec(**kwargs)  # type: ignore[arg-type]


def test_spec_needs_waves_and_a_sane_pause() -> None:
    with pytest.raises(RolloutError, match="at least one wave"):
        RolloutSpec(RolloutTarget(), (), GateLimits(), 0.0, False)
    with pytest.raises(RolloutError, match="pause_s"):
        RolloutSpec(RolloutTarget(), CANARY_PLAN, GateLimits(), -1.0, False)


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"min_agreement": 1.5}, "gates.min_agreement"),
        ({"max_p99_latency_ms": 0}, "gates.max_p99_latency_ms"),
        ({"min_frames": -1}, "gates.min_frames"),
        ({"observe_s": 1000.0}, "must be shorter than gates.timeout_s"),
        ({"bogus": 1}, "unknown key 'bogus'"),
    ],
)
def test_bad_gate_limits_name_the_field(document: dict[str, float], message: str) -> None:
    with pytest.raises(RolloutError, match=message):
        GateLimits.from_document(document)


def test_gate_limits_round_trip_through_their_document() -> None:
    limits = GateLimits(min_agreement=0.9, observe_s=5.0, min_frames=100)
    assert GateLimits.from_document(limits.document()) == limits


# -- target selection -----------------------------------------------------------------------

RELEASE = ReleaseFacts("models/m-2.tar", "m@2", "onnx", ("rpi4", "rpi5", "x86-generic"))


def _device(device_id: str, **overrides: object) -> DeviceFacts:
    base = DeviceFacts(device_id, "line-1", "plant-a", "rpi4", "m@1", True)
    return replace(base, **overrides)  # type: ignore[arg-type]


def test_selection_skips_devices_that_cannot_take_the_release_with_the_reason() -> None:
    devices = [
        _device("a"),
        _device("b", profile=None),
        _device("c", profile="jetson-nano"),  # a known profile the release is not for
        _device("d", profile="mystery-board"),
        _device("e", model="m@2"),
        _device("f", online=False),
        _device("g", line="line-2"),  # not selected by the target at all
    ]
    target = RolloutTarget(groups=("line-1",), devices=("a", "b", "c", "d", "e", "f", "zz"))
    selection = select_targets(RELEASE, target, devices, PROFILES)
    assert selection.targeted == ("a", "f")  # online first
    reasons = {s.device_id: s.reason for s in selection.skipped}
    assert set(reasons) == {"b", "c", "d", "e", "zz"}
    assert "has not reported" in reasons["b"]
    assert "not for firmware profile 'jetson-nano'" in reasons["c"]
    assert "unknown to the server" in reasons["d"]
    assert reasons["e"] == "already runs m@2"
    assert reasons["zz"] == "unknown device"


def test_a_release_needing_a_runtime_the_profile_lacks_is_skipped() -> None:
    board = PROFILES["rpi4"].model_copy(update={"name": "tflite-board", "runtimes": ["tflite"]})
    profiles = {**PROFILES, board.name: board}
    release = ReleaseFacts("models/m-2.tar", "m@2", "onnx", (board.name,))
    devices = [_device("a", profile=board.name)]
    selection = select_targets(release, RolloutTarget(), devices, profiles)
    assert selection.targeted == ()
    assert "needs runtime 'onnx'" in selection.skipped[0].reason


def test_target_kinds_are_anded_and_values_ored() -> None:
    devices = [
        _device("a", line="l1", site="s1"),
        _device("b", line="l2", site="s1"),
        _device("c", line="l1", site="s2"),
        _device("d", line="l3", site="s1"),
    ]
    target = RolloutTarget(groups=("l1", "l2"), sites=("s1",))
    assert select_targets(RELEASE, target, devices, PROFILES).targeted == ("a", "b")
    assert select_targets(RELEASE, RolloutTarget(), devices, PROFILES).targeted == (
        "a",
        "b",
        "c",
        "d",
    )
    assert (
        select_targets(RELEASE, RolloutTarget(profiles=("rpi5",)), devices, PROFILES).targeted == ()
    )


def test_target_documents_refuse_unknown_keys() -> None:
    assert RolloutTarget.from_document({"sites": ["s1"]}) == RolloutTarget(sites=("s1",))
    with pytest.raises(RolloutError, match="target: unknown key 'lines'"):
        RolloutTarget.from_document({"lines": ["l1"]})
    with pytest.raises(RolloutError, match=r"target\.groups must be a list"):
        RolloutTarget.from_document({"groups": "l1"})


# -- state machine --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "action", "after"),
    [
        ("running", "pause", "paused"),
        ("paused", "resume", "running"),
        ("running", "halt", "halted"),
        ("paused", "halt", "halted"),
        ("running", "complete", "completed"),
        ("halted", "abort", "aborted"),
        ("halted", "rollback", "rolled_back"),
        ("completed", "rollback", "rolled_back"),
    ],
)
def test_legal_transitions(state: str, action: str, after: str) -> None:
    assert transition(state, action) == after


@pytest.mark.parametrize(
    ("state", "action"),
    [
        ("running", "resume"),
        ("halted", "resume"),  # a failed gate is not resumed past
        ("completed", "pause"),
        ("completed", "abort"),
        ("aborted", "resume"),
        ("rolled_back", "rollback"),
        ("paused", "complete"),
    ],
)
def test_illegal_transitions_are_conflicts(state: str, action: str) -> None:
    with pytest.raises(Conflict, match=f"cannot {action} a rollout that is {state}"):
        transition(state, action)


def test_unknown_actions_and_states_are_errors() -> None:
    with pytest.raises(RolloutError, match="unknown rollout action 'explode'"):
        transition("running", "explode")
    with pytest.raises(RolloutError, match="unknown rollout state 'lost'"):
        transition("lost", "pause")


# -- gates ----------------------------------------------------------------------------------

LIMITS = GateLimits(observe_s=60.0, min_frames=500, timeout_s=900.0)
LATENCY_OK = (0, 0, 100, 300, 400, 200, 0, 0, 0, 0, 0, 0, 0)  # p99 in [7.5, 10) ms


def _healthy(device_id: str, **overrides: object) -> DeviceHealth:
    base = DeviceHealth(
        device_id=device_id,
        status="activated",
        activated_at=T0 + timedelta(seconds=30),
        gate_passed=True,
        gate_figures={"agreement": 0.995, "p99_latency_ms": 12.0},
        before=WindowTotals(frames=1000, fails=20, errors=1),
        after=WindowTotals(frames=1000, fails=25, errors=2, latency=LATENCY_OK),
    )
    return replace(base, **overrides)  # type: ignore[arg-type]


def _judge(
    devices: list[DeviceHealth], seconds: float = 120.0, limits: GateLimits = LIMITS
) -> Judgement:
    return judge_wave(limits, devices, started_at=T0, now=T0 + timedelta(seconds=seconds))


def test_a_healthy_wave_passes_after_its_observation() -> None:
    devices = [_healthy("a"), _healthy("b")]
    waiting = _judge(devices, seconds=80.0)  # activated at 30 s: observing until 90 s
    assert (waiting.verdict, waiting.observing) == ("wait", True)
    judged = _judge(devices)
    assert judged.verdict == "pass", judged.reason
    results = judged.documents()
    assert results["agreement"] == {
        "value": 0.995,
        "limit": 0.98,
        "passed": True,
        "detail": results["agreement"]["detail"],
    }
    assert results["p99_latency_ms"]["value"] == 12.0  # the gate figure beats 7.5 ms
    assert set(results) == {
        "activated",
        "gate_pass_rate",
        "agreement",
        "p99_latency_ms",
        "error_rate",
        "fail_rate_change",
        "new_drift_alerts",
    }


@pytest.mark.parametrize(
    ("gate", "bad"),
    [
        ("gate_pass_rate", {"gate_passed": False}),
        ("agreement", {"gate_figures": {"agreement": 0.9, "p99_latency_ms": 12.0}}),
        ("p99_latency_ms", {"gate_figures": {"agreement": 0.995, "p99_latency_ms": 80.0}}),
        (
            "p99_latency_ms",  # telemetry: the 99th percentile sits in (50, 75] ms
            {"after": WindowTotals(1000, 25, 2, (0, 0, 0, 0, 0, 0, 0, 0, 0, 900, 100, 0, 0))},
        ),
        ("error_rate", {"after": WindowTotals(1000, 25, 30, LATENCY_OK)}),
        ("fail_rate_change", {"after": WindowTotals(1000, 90, 2, LATENCY_OK)}),
        ("new_drift_alerts", {"new_drift_alerts": 1}),
    ],
)
def test_each_gate_fails_alone(gate: str, bad: dict[str, object]) -> None:
    judged = _judge([_healthy("a"), _healthy("b", **bad)])
    assert judged.verdict == "fail"
    failing = [name for name, r in judged.documents().items() if not r["passed"]]
    assert failing == [gate]
    assert gate in judged.reason


def test_a_refused_update_fails_the_wave_at_once() -> None:
    devices = [_healthy("a"), DeviceHealth("b", "failed", reason="refused: incompatible")]
    judged = _judge(devices, seconds=5.0)
    assert judged.verdict == "fail"
    assert not judged.observing
    assert "b: refused: incompatible" in judged.documents()["activated"]["detail"]


def test_a_lower_activation_limit_tolerates_one_failure() -> None:
    limits = replace(LIMITS, min_activated_fraction=0.5, min_gate_pass_rate=0.5)
    devices = [_healthy("a"), DeviceHealth("b", "rolled_back", reason="rolled back")]
    assert _judge(devices, limits=limits).verdict == "pass"


def test_devices_still_updating_are_waited_for_until_the_timeout() -> None:
    devices = [_healthy("a"), DeviceHealth("b", "assigned")]
    assert _judge(devices).verdict == "wait"
    late = _judge(devices, seconds=901.0)
    assert late.verdict == "fail"
    assert late.documents()["timeout"]["passed"] is False
    assert "1 of 2 devices never reported" in late.reason


def test_too_few_frames_wait_then_time_out() -> None:
    thin = _healthy("a", after=WindowTotals(120, 2, 0, None))
    waiting = _judge([thin])
    assert waiting.verdict == "wait"
    assert "waiting for 500 frames" in waiting.reason
    late = _judge([thin], seconds=900.0)
    assert late.verdict == "fail"
    assert "fewest: a with 120" in late.documents()["timeout"]["detail"]


def test_no_previous_model_means_no_agreement_and_no_fail_rate_change() -> None:
    fresh = _healthy("a", gate_figures={}, before=WindowTotals())
    judged = _judge([fresh])
    assert judged.verdict == "pass"
    assert judged.documents()["agreement"]["value"] is None
    assert judged.documents()["fail_rate_change"]["value"] is None


def test_p99_upper_edge() -> None:
    assert p99_upper_ms(LATENCY_OK) == 10.0
    assert p99_upper_ms((0,) * 12 + (5,)) is None  # overflow bin: unbounded
    assert p99_upper_ms((0,) * 13) is None
    assert p99_upper_ms((100,) + (0,) * 12) == 1.0


def test_window_totals_add_up() -> None:
    totals = WindowTotals().add({"pass": 90, "fail": 8, "error": 2, "dropped": 5}, [1] * 13)
    totals = totals.add({"pass": 50, "uncertain": 10}, None)
    assert totals == WindowTotals(frames=160, fails=8, errors=2, latency=(1,) * 13)
