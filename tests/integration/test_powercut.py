"""The power-cut harness, short: SIGKILL a real agent process at each update phase, then
repeatedly in one candidate's health gate (it must roll back)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_agent_survives_sigkill_at_every_update_phase(tmp_path: Path) -> None:
    runs = 5  # one per phase: download, verify, stage, gate, switch
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "hil" / "powercut.py"),
            "--runs",
            str(runs),
            "--json",
            "--gate-crash-loop",
            "--keep",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout)
    assert result["runs"] == runs
    assert result["bricked"] == 0, result["bricked_runs"]
    assert result["finished"] == runs, (tmp_path / "agent.log").read_text()[-4000:]
    assert sum(result["killed_after_phase"].values()) >= runs - 1
    # Killed in the health gate of one candidate until the agent gives up on it.
    loop = result["gate_crash_loop"]
    assert loop["crashes"] == 3 and loop["bricked"] == 0
    assert loop["rolled_back"] is True
    assert loop["active_after"] == loop["active_before"]
