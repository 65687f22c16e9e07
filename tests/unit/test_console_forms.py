"""The console's "start a rollout" form: waves, targets, gates and their error messages."""

from __future__ import annotations

import pytest

from fleet_server.console.forms import FormError, parse_rollout_form, parse_waves
from fleet_server.domain.rollout import GateLimits, RolloutTarget, WaveSpec


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1, 10%, 50%, 100%", (1, 10.0, 50.0, 100.0)),
        ("100%", (100.0,)),
        ("2;100 %", (2, 100.0)),
        ("  5 ,12.5%,100% ", (5, 12.5, 100.0)),
    ],
)
def test_parse_waves(text: str, expected: tuple[int | float, ...]) -> None:
    want = tuple(
        WaveSpec(devices=v) if isinstance(v, int) else WaveSpec(percent=v) for v in expected
    )
    assert parse_waves(text) == want


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "at least one wave"),
        ("one", "'one' is neither"),
        ("0", "at least 1"),
        ("150%", r"\(0, 100\]"),
        ("1.5", "whole number"),
        (",".join(["1"] * 21), "at most 20"),
    ],
    ids=["empty", "word", "zero-devices", "over-100", "fraction", "too-many"],
)
def test_parse_waves_names_the_bad_wave(text: str, message: str) -> None:
    with pytest.raises(FormError, match=message) as caught:
        parse_waves(text)
    assert str(caught.value).startswith("waves:")


def test_parse_rollout_form_builds_the_service_arguments() -> None:
    form = parse_rollout_form(
        {
            "release": "reference-onnx@1.1.0",
            "group": "line-1",
            "profile": "rpi4",
            "site": "",
            "devices": "cam-001, cam-002",
            "waves": "1, 100%",
            "pause_s": "30",
            "auto_rollback": "on",
            "min_agreement": "0.95",
            "min_frames": "200",
            "max_p99_latency_ms": "",
        }
    )
    assert form.release == "reference-onnx@1.1.0"
    assert form.target == RolloutTarget(
        groups=("line-1",), profiles=("rpi4",), devices=("cam-001", "cam-002")
    )
    assert form.waves == (WaveSpec(devices=1), WaveSpec(percent=100.0))
    assert form.pause_s == 30.0
    assert form.auto_rollback is True
    assert form.gates == GateLimits(min_agreement=0.95, min_frames=200)


def test_parse_rollout_form_defaults() -> None:
    form = parse_rollout_form({"release": "m@1", "waves": "100%"})
    assert form.target == RolloutTarget()
    assert form.gates == GateLimits()
    assert form.pause_s == 0.0
    assert form.auto_rollback is False


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"release": ""}, "release: choose"),
        ({"release": "m@1", "group": "line 1"}, "group: 'line 1'"),
        ({"release": "m@1", "devices": "ok, <bad>"}, "devices: '<bad>'"),
        ({"release": "m@1", "pause_s": "soon"}, "pause_s: 'soon' is not a number"),
        ({"release": "m@1", "pause_s": "-1"}, "pause_s: must be"),
        ({"release": "m@1", "pause_s": "inf"}, "pause_s: 'inf' is not a finite"),
        ({"release": "m@1", "min_frames": "2.5"}, "min_frames: must be a whole"),
        ({"release": "m@1", "min_agreement": "2"}, "min_agreement"),
        ({"release": "m@1", "waves": ""}, "waves:"),
    ],
    ids=[
        "no-release",
        "bad-group",
        "bad-device",
        "pause-word",
        "pause-negative",
        "pause-inf",
        "frames-fraction",
        "agreement-range",
        "no-waves",
    ],
)
def test_parse_rollout_form_names_the_bad_field(fields: dict[str, str], message: str) -> None:
    with pytest.raises(FormError, match=message):
        parse_rollout_form({"waves": "100%", **fields})
