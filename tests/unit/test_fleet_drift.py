"""Fleet drift views and the lone-vs-many rule (fleet_server.domain.fleet_drift)."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from fleet_server.domain.fleet_drift import (
    AlertKey,
    DeviceFinding,
    DeviceReport,
    FleetRule,
    active_reports,
    decide,
    group_views,
)

NOW = 1_800_000_000.0
RULE = FleetRule(share=0.3, min_devices=2, q=0.01)


def _alarm(feature: str = "brightness", direction: str = "down", since: int = 4) -> DeviceFinding:
    return DeviceFinding(feature, "cusum", direction, 7.0, 5.0, -2.5, None, True, since, 1000)


def _test(feature: str = "brightness", p: float = 1e-12, direction: str = "down") -> DeviceFinding:
    return DeviceFinding(feature, "chi2", direction, 90.0, 30.0, 0.3, p, False, 9, 1900)


def _report(
    device: str,
    *findings: DeviceFinding,
    line: str | None = "line-a",
    profile: str | None = "rpi5",
    model: str = "m@1",
    received: float = NOW,
) -> DeviceReport:
    return DeviceReport(device, model, line, profile, 9, received, tuple(findings))


def _quiet(device: str, line: str = "line-a") -> DeviceReport:
    # Per-window tests that are not significant: they count for BH's m, nothing else.
    return _report(device, _test(p=0.4), _test("contrast", p=0.7), line=line)


def _fleet(n: int, drifting: Mapping[str, tuple[DeviceFinding, ...]]) -> list[DeviceReport]:
    reports = []
    for i in range(1, n + 1):
        device = f"cam-{i}"
        line = "line-a" if i <= n // 2 else "line-b"
        found = drifting.get(device)
        report = _quiet(device, line) if found is None else _report(device, *found, line=line)
        reports.append(report)
    return reports


def test_one_device_drifting_alone_is_a_device_drift() -> None:
    drifts = decide(_fleet(6, {"cam-3": (_alarm(), _test())}), RULE, NOW)
    assert [d.key for d in drifts] == [AlertKey("device", "cam-3", "brightness", "down")]
    (drift,) = drifts
    assert drift.devices == ("cam-3",) and drift.group_size == 1
    assert drift.strongest.test == "cusum"  # an alarm heads the evidence
    assert drift.since == (1000, 4)


def test_many_devices_drifting_together_is_one_fleet_drift() -> None:
    up = (_alarm("contrast", "up"), _test("contrast", direction="up"))
    drifts = decide(_fleet(6, {f"cam-{i}": up for i in (1, 2, 4, 5, 6)}), RULE, NOW)
    # Broadest first: the fleet holds them all, so model, profile and lines add nothing.
    assert [d.key for d in drifts] == [AlertKey("fleet", "*", "contrast", "up")]
    assert drifts[0].devices == ("cam-1", "cam-2", "cam-4", "cam-5", "cam-6")
    assert drifts[0].group_size == 6


def test_two_of_six_are_enough_but_opposite_directions_do_not_add_up() -> None:
    two = decide(_fleet(6, {"cam-1": (_alarm(),), "cam-5": (_alarm(),)}), RULE, NOW)
    assert [d.key.scope for d in two] == ["fleet"]
    split = decide(_fleet(6, {"cam-1": (_alarm(),), "cam-5": (_alarm(direction="up"),)}), RULE, NOW)
    assert sorted(d.key for d in split) == [
        AlertKey("device", "cam-1", "brightness", "down"),
        AlertKey("device", "cam-5", "brightness", "up"),
    ]


def test_a_line_drifts_when_its_share_is_reached_but_the_fleets_is_not() -> None:
    # 12 devices, 2 drifting on line-a (2 of 6 >= 0.3) but not 0.3 of the fleet (2 < 4).
    drifts = decide(_fleet(12, {"cam-1": (_alarm(),), "cam-2": (_alarm(),)}), RULE, NOW)
    assert [d.key for d in drifts] == [AlertKey("line", "line-a", "brightness", "down")]


def test_share_and_minimum_are_configurable() -> None:
    found = {"cam-1": (_alarm(),), "cam-2": (_alarm(),)}
    strict = FleetRule(share=0.5, min_devices=2, q=0.01)
    assert {d.key.scope for d in decide(_fleet(6, found), strict, NOW)} == {"line"}
    one = FleetRule(share=0.1, min_devices=3, q=0.01)
    assert {d.key.scope for d in decide(_fleet(6, found), one, NOW)} == {"device"}
    assert RULE.needed(6) == 2 and RULE.needed(10) == 3 and RULE.needed(1) == 2


def test_tests_count_only_after_benjamini_hochberg_across_the_group() -> None:
    # p = 0.004 for one device (x2 for its two tests = 0.008): significant alone at
    # q = 0.01, not after BH among six devices (needs 0.008 <= 0.01 / 6).
    borderline = (_test(p=0.004), _test(p=0.5))
    assert decide(_fleet(6, {"cam-2": borderline}), RULE, NOW) == []
    assert [d.key.key for d in decide(_fleet(1, {"cam-1": borderline}), RULE, NOW)] == ["cam-1"]
    # Two devices each at p = 1e-9: BH rejects both, together a fleet drift.
    strong = (_test(p=1e-9),)
    drifts = decide(_fleet(6, {"cam-2": strong, "cam-6": strong}), RULE, NOW)
    assert [d.key for d in drifts] == [AlertKey("fleet", "*", "brightness", "down")]
    assert [f.test for _, found in drifts[0].evidence for f in found] == ["chi2", "chi2"]


def test_stale_reports_are_left_out() -> None:
    reports = _fleet(6, {"cam-3": (_alarm(),)})
    old = _report("cam-9", _alarm(), received=NOW - RULE.stale_after_s - 1)
    assert [r.device for r in active_reports([*reports, old], RULE, NOW)] == [
        f"cam-{i}" for i in range(1, 7)
    ]
    drifts = decide([*reports, old], RULE, NOW)
    assert [d.key.key for d in drifts] == ["cam-3"]


def test_group_views_name_every_group_broadest_first() -> None:
    reports = [
        _report("a", line="l1", profile="rpi4"),
        _report("b", line=None, profile=None, model="m@2"),
    ]
    views = group_views(reports, RULE)
    assert [(v.scope, v.key, v.devices) for v in views] == [
        ("fleet", "*", ("a", "b")),
        ("model", "m@1", ("a",)),
        ("model", "m@2", ("b",)),
        ("profile", "rpi4", ("a",)),
        ("line", "l1", ("a",)),
    ]


def test_an_open_group_alert_keeps_covering_its_devices_while_it_clears() -> None:
    # The fleet alert is open; only one device still drifts: no new device alert for it.
    fleet_key = AlertKey("fleet", "*", "brightness", "down")
    reports = _fleet(6, {"cam-3": (_alarm(),)})
    assert decide(reports, RULE, NOW, open_alerts=[fleet_key]) == []
    # Without the open alert it is a lone device.
    assert [d.key.scope for d in decide(reports, RULE, NOW)] == ["device"]


def test_a_group_drift_covers_open_device_and_narrower_alerts() -> None:
    lone = AlertKey("device", "cam-1", "brightness", "down")
    line = AlertKey("line", "line-a", "brightness", "down")
    other = AlertKey("device", "cam-1", "contrast", "up")
    found = {f"cam-{i}": (_alarm(),) for i in (1, 2, 4)}
    drifts = decide(_fleet(6, found), RULE, NOW, open_alerts=[lone, line, other])
    assert [d.key.scope for d in drifts] == ["fleet"]
    assert drifts[0].covers == (lone, line)


def test_rule_parameters_are_checked() -> None:
    with pytest.raises(ValueError, match="share"):
        FleetRule(share=0.0)
    with pytest.raises(ValueError, match="min_devices"):
        FleetRule(min_devices=0)
    with pytest.raises(ValueError, match="q must be"):
        FleetRule(q=1.0)
    with pytest.raises(ValueError, match="stale_after_s"):
        FleetRule(stale_after_s=0)
