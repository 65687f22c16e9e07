"""``fleet-server demo`` end to end, on a faster clock: a real broker, the fleet server
with its console, three real agent processes. The rollout of the second version must
complete on line-1 and line-2, and line-3's darkening must raise a drift alert."""

from __future__ import annotations

import io
import threading
import urllib.request
from pathlib import Path

from fleet_server.demo import DemoOptions, DemoProgress, run_demo
from tests.fleet_simulator import wait_for

ONNX_BUNDLE = Path(__file__).resolve().parents[2] / "models" / "reference-onnx"


def test_demo_rolls_out_and_raises_the_drift_alert() -> None:
    options = DemoOptions(
        model=ONNX_BUNDLE,
        http_port=0,
        fps=8.0,
        darken_minutes=0.75,
        rollout_after_s=15.0,
        pause_s=3.0,
        observe_s=3.0,
        min_frames=50,
        window_frames=50,
        password="demo-password",
    )
    stop = threading.Event()
    out = io.StringIO()
    result: list[DemoProgress] = []
    thread = threading.Thread(target=lambda: result.append(run_demo(options, stop, out)))
    thread.start()
    try:
        assert wait_for(lambda: "console: http://" in out.getvalue(), 60), out.getvalue()
        url = out.getvalue().split("console: ")[1].split()[0]
        with urllib.request.urlopen(f"{url}/login", timeout=10) as page:
            assert page.status == 200
            assert b"password" in page.read().lower()

        def done() -> bool:
            text = out.getvalue()
            return "completed, wave 2/2" in text and "line-3-cam brightness down" in text

        assert wait_for(done, 240, interval_s=0.5), out.getvalue()
    finally:
        stop.set()
        thread.join(120)
    assert not thread.is_alive()
    text = out.getvalue()
    assert "devices online: 3/3" in text
    assert "rolled_back" not in text and "halted" not in text, text
    assert result and result[0].rollout_state == "completed, wave 2/2"
    assert result[0].alerts is not None
    assert all("line-1" not in alert and "line-2" not in alert for alert in result[0].alerts)
