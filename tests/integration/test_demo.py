"""``edge-agent demo``: verdicts, summaries and the local drift check's line per window."""

from __future__ import annotations

import pytest

from edge_agent.cli import main
from tests.integration.reference import ONNX_BUNDLE


def _demo(capsys: pytest.CaptureFixture[str], *extra: str) -> list[str]:
    code = main(["demo", "--model", str(ONNX_BUNDLE), "--seconds", "5", "--fps", "0", *extra])
    assert code == 0
    return capsys.readouterr().out.splitlines()


def test_demo_in_control_line(capsys: pytest.CaptureFixture[str]) -> None:
    lines = _demo(capsys)
    checks = [line for line in lines if line.startswith("drift check, window")]
    assert len(checks) >= 3
    assert all(line.endswith("(100 frames): in control") for line in checks), checks
    summary = [line for line in lines if line.startswith("[")][-1]
    assert "accuracy vs truth 1.000" in summary and "error 0" in summary


def test_demo_darker_line_raises_the_brightness_alarm(
    capsys: pytest.CaptureFixture[str],
) -> None:
    lines = _demo(capsys, "--brightness", "0.8", "--check-frames", "60")
    checks = [line for line in lines if line.startswith("drift check, window")]
    assert checks and all("(60 frames): DRIFT" in line for line in checks), checks
    assert "brightness down (cusum, effect -" in checks[0]


def test_demo_refuses_a_check_window_under_the_privacy_floor(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--model", str(ONNX_BUNDLE), "--check-frames", "20"])
    assert exit_info.value.code == 2
    assert "--check-frames: must be a whole number >= 50" in capsys.readouterr().err
