"""scripts/bench_outputs.py runs end to end on a tiny workload and reports its keys as
finite positive numbers (the goals are for a full run, not checked here)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KEYS = (
    "outputs_ratio",
    "inspect_p50_ms",
    "inspect_p99_ms",
    "reject_p99_ms",
    "fps_on",
    "fps_off",
    "local_p99_ms",
)


def test_bench_outputs_reports_every_key() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "bench_outputs.py"),
            "--rounds=1",
            "--window=1",
            "--requests=20",
            "--reject-frames=60",
            "--json",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout)
    for key in KEYS:
        assert math.isfinite(result[key]) and result[key] > 0, (key, result[key])
    # The overhead is a difference of two p99s and may come out negative on a quiet run.
    assert math.isfinite(result["inspect_overhead_p99_ms"])
    on = [r for r in result["runs"] if r["mode"] == "on"]
    assert on and all(r["rest_polls"] > 0 and r["mqtt_messages"] > 0 for r in on)
    assert all(r["opcua_changes"] > 0 for r in on)
    assert result["reject_pulses"] >= 1
