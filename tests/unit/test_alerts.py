"""The alert lifecycle (fleet_server.domain.alerts): open, renew, quiet, resolve, fold."""

from __future__ import annotations

import pytest

from fleet_server.domain.alerts import (
    ActiveAlert,
    AlertPolicy,
    OpenAlert,
    QuietAlert,
    RenewAlert,
    ResolveAlert,
    plan_alerts,
)
from fleet_server.domain.fleet_drift import AlertKey, DeviceFinding, Drift

POLICY = AlertPolicy(resolve_after=3)
LONE = AlertKey("device", "cam-3", "brightness", "down")
FLEET = AlertKey("fleet", "*", "brightness", "down")
FINDING = DeviceFinding("brightness", "cusum", "down", 8.0, 5.0, -3.0, None, True, 4, 1000)


def _drift(key: AlertKey, covers: tuple[AlertKey, ...] = ()) -> Drift:
    return Drift(key, (key.key,), 1, ((key.key, (FINDING,)),), covers)


def test_a_new_drift_opens_an_alert_and_a_known_one_renews_it() -> None:
    assert plan_alerts([], [_drift(LONE)], {("device", "cam-3")}, POLICY) == [
        OpenAlert(_drift(LONE))
    ]
    active = [ActiveAlert(7, LONE, quiet=2)]
    assert plan_alerts(active, [_drift(LONE)], {("device", "cam-3")}, POLICY) == [
        RenewAlert(7, _drift(LONE))
    ]


def test_an_alert_resolves_after_enough_quiet_evaluations_in_a_row() -> None:
    evaluated = {("device", "cam-3")}
    assert plan_alerts([ActiveAlert(7, LONE, 0)], [], evaluated, POLICY) == [QuietAlert(7, 1)]
    assert plan_alerts([ActiveAlert(7, LONE, 1)], [], evaluated, POLICY) == [QuietAlert(7, 2)]
    assert plan_alerts([ActiveAlert(7, LONE, 2)], [], evaluated, POLICY) == [ResolveAlert(7)]


def test_alerts_of_scopes_not_evaluated_are_left_alone() -> None:
    # A window of cam-1 says nothing about cam-3's stream.
    evaluated = {("device", "cam-1"), ("fleet", "*"), ("line", "line-a")}
    assert plan_alerts([ActiveAlert(7, LONE, 2)], [], evaluated, POLICY) == []


def test_a_group_drift_folds_the_device_alert_it_covers() -> None:
    actions = plan_alerts(
        [ActiveAlert(7, LONE, 0)],
        [_drift(FLEET, covers=(LONE,))],
        {("device", "cam-4"), ("fleet", "*")},
        POLICY,
    )
    assert actions == [OpenAlert(_drift(FLEET, covers=(LONE,))), ResolveAlert(7, FLEET)]


def test_a_covered_alert_that_is_itself_a_drift_is_not_folded() -> None:
    actions = plan_alerts(
        [ActiveAlert(7, LONE, 0)],
        [_drift(FLEET, covers=(LONE,)), _drift(LONE)],
        {("device", "cam-3"), ("fleet", "*")},
        POLICY,
    )
    assert actions == [OpenAlert(_drift(FLEET, covers=(LONE,))), RenewAlert(7, _drift(LONE))]


def test_inconsistent_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="share"):
        plan_alerts([ActiveAlert(1, LONE), ActiveAlert(2, LONE)], [], set(), POLICY)
    with pytest.raises(ValueError, match="two drifts"):
        plan_alerts([], [_drift(LONE), _drift(LONE)], set(), POLICY)
    with pytest.raises(ValueError, match="resolve_after"):
        AlertPolicy(resolve_after=0)
