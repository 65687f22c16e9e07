"""An offline line (no broker at all) still raises its local drift alarm: a log line,
``state_dir/drift.json`` and ``edge-agent status``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent.cli import main
from tests.integration.reference import ONNX_BUNDLE, UNSEEN_SEED


def _config(tmp_path: Path, brightness: float) -> Path:
    # 640x480: the size of the reference split, so brightness 1.0 is in control.
    path = tmp_path / "agent.toml"
    path.write_text(
        f"""
[device]
id = "offline-cam"

[source]
url = "synthetic:"
seed = {UNSEEN_SEED}
size = "640x480"
brightness = {brightness}
count = 400

[model]
bundle = "{ONNX_BUNDLE}"

[storage]
state_dir = "{tmp_path / "state"}"
evidence_pass_every = 0

[telemetry]
window_frames = 80
check_frames = 80

[log]
format = "json"
"""
    )
    return path


def _run(config: Path) -> list[dict[str, object]]:
    done = subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]


@pytest.mark.parametrize(("brightness", "drifting"), [(1.0, False), (1.6, True)])
def test_offline_line_raises_the_local_alarm(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], brightness: float, drifting: bool
) -> None:
    config = _config(tmp_path, brightness)
    assert main(["check", "--config", str(config)]) == 0
    assert "telemetry   windows of 80 frames or 60 s (local drift check only, no broker)" in (
        capsys.readouterr().out
    )
    events = _run(config)
    drift_lines = [e for e in events if e.get("event") == "drift"]
    assert bool(drift_lines) is drifting
    state = json.loads((tmp_path / "state" / "drift.json").read_text())
    assert state["drifting"] is drifting and state["last_window"] == 4
    assert main(["status", "--config", str(config), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["drift"] == state and status["spool"] is None  # no broker: no spool
    assert main(["status", "--config", str(config)]) == 0
    text = capsys.readouterr().out
    if drifting:
        assert {"brightness"} <= set(state["features"])
        assert drift_lines[0]["feature"] in state["features"]
        assert {"test", "effect"} <= set(drift_lines[0])
        assert "DRIFTING: " in text and "brightness (cusum up" in text
    else:
        assert state["features"] == [] and "drift       none" in text
