"""sd_notify: READY, WATCHDOG, STATUS and STOPPING over a real unix datagram socket, from
``ServiceNotifier`` directly and from a real ``edge-agent run`` process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from edge_agent.systemd import ServiceNotifier, socket_address, watchdog_interval
from tests.integration.reference import ONNX_BUNDLE, UNSEEN_SEED


@dataclass(slots=True)
class Counts:
    frames_in: int = 0
    dropped: int = 0
    inspected: int = 0


class NotifyListener:
    """A bound datagram socket standing in for systemd's notify socket."""

    def __init__(self, name: str) -> None:
        self.name = name  # the $NOTIFY_SOCKET value
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(socket_address(name))
        self.received: list[tuple[float, dict[str, str]]] = []

    def drain(self, timeout_s: float = 0.0) -> list[dict[str, str]]:
        """Messages that arrived (waiting up to ``timeout_s`` for the first new one)."""
        new: list[dict[str, str]] = []
        if timeout_s > 0:
            self.sock.settimeout(timeout_s)
        else:
            self.sock.setblocking(False)
        while True:
            try:
                data = self.sock.recv(4096)
            except (BlockingIOError, TimeoutError):
                return new
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.received.append((time.monotonic(), fields))
            new.append(fields)
            self.sock.setblocking(False)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(params=["path", "abstract"])
def listener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NotifyListener]:
    if request.param == "path":
        name = str(tmp_path / "notify.sock")
    else:
        name = f"@edgefleet-test-{uuid.uuid4().hex}"
    lst = NotifyListener(name)
    yield lst
    lst.close()


def test_socket_address_forms() -> None:
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("@abc") == b"\0abc"
    for bad in ("", "@", "relative/notify"):
        with pytest.raises(ValueError, match="NOTIFY_SOCKET"):
            socket_address(bad)


def test_watchdog_interval_from_environment() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}, 7) == 30.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "7"}, 7) == 30.0
    # A watchdog meant for another process (e.g. the parent of a helper) is not ours.
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "8"}, 7) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}, 7) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}, 7) is None
    assert watchdog_interval({}, 7) is None


def test_no_socket_means_no_op() -> None:
    notifier = ServiceNotifier.from_environment(env={}, pid=1)
    assert not notifier.enabled
    assert not notifier.notify("READY=1")
    notifier.beat(0.0, Counts())
    notifier.stopping()


def test_ready_then_paced_watchdog_then_stopping(listener: NotifyListener) -> None:
    env = {"NOTIFY_SOCKET": listener.name, "WATCHDOG_USEC": "2000000"}
    notifier = ServiceNotifier.from_environment(env=env, pid=1)
    assert notifier.watchdog_s == 2.0
    counts = Counts()
    notifier.beat(100.0, counts)
    assert listener.drain(1.0) == [{"READY": "1", "STATUS": "inspecting: 0 frames, 0 dropped"}]
    # Frames flow; pings come at most every half interval (1 s of the given clock).
    for step in range(1, 31):
        counts.frames_in = counts.inspected = step
        notifier.beat(100.0 + step * 0.1, counts)
    pings = listener.drain(1.0)
    assert [p["WATCHDOG"] for p in pings] == ["1", "1", "1"]  # at 101.0, 102.0, 103.0
    assert pings[-1]["STATUS"] == "inspecting: 30 frames, 0 dropped"
    notifier.stopping()
    assert listener.drain(1.0) == [{"STOPPING": "1", "STATUS": "stopping"}]
    notifier.beat(200.0, counts)  # after stopping: nothing more is sent
    assert listener.drain(0.2) == []


def test_stalled_pipeline_gets_no_ping(listener: NotifyListener) -> None:
    notifier = ServiceNotifier(socket_address(listener.name), watchdog_s=1.0)
    counts = Counts(frames_in=5, inspected=5)
    notifier.beat(0.0, counts)
    listener.drain(1.0)
    # Idle line (nothing in flight, no new results): still alive, pinged.
    notifier.beat(0.6, counts)
    assert [p.get("WATCHDOG") for p in listener.drain(1.0)] == ["1"]
    # Three frames taken, none comes out: no ping however often the loop turns.
    counts.frames_in = 8
    for i in range(1, 40):
        notifier.beat(0.6 + i * 0.1, counts)
    assert listener.drain(0.3) == []
    # Results come out again: pinged at once.
    counts.inspected = 8
    notifier.beat(4.6, counts)
    assert [p.get("WATCHDOG") for p in listener.drain(1.0)] == ["1"]


def test_unreachable_socket_does_not_raise(tmp_path: Path) -> None:
    notifier = ServiceNotifier(str(tmp_path / "nobody-listens.sock"), watchdog_s=None)
    assert not notifier.notify("READY=1")
    notifier.beat(0.0, Counts())
    notifier.stopping()


def _agent_config(tmp: Path) -> Path:
    path = tmp / "agent.toml"
    path.write_text(
        f"""
[device]
id = "notify-1"
profile = "x86-generic"

[source]
url = "synthetic:"
seed = {UNSEEN_SEED}
size = "160x120"
fps = 60

[model]
bundle = "{ONNX_BUNDLE}"

[storage]
state_dir = "{tmp / "state"}"
evidence_pass_every = 0

[log]
format = "json"
summary_interval_s = 1
""",
        encoding="utf-8",
    )
    return path


def test_agent_process_notifies_systemd(tmp_path: Path) -> None:
    """READY once the pipeline runs, WATCHDOG while frames flow (paced at half of
    WATCHDOG_USEC, with growing frame counts), STOPPING after SIGTERM, exit 0."""
    listener = NotifyListener(f"@edgefleet-agent-{uuid.uuid4().hex}")
    env = dict(os.environ, NOTIFY_SOCKET=listener.name, WATCHDOG_USEC="400000")
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge_agent.cli", "run", "--config", str(_agent_config(tmp_path))],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not any("READY" in m for _, m in listener.received):
            assert time.monotonic() < deadline, "no READY=1 from the agent"
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            listener.drain(0.5)
        ready_at = next(t for t, m in listener.received if "READY" in m)
        end = time.monotonic() + 2.0
        while time.monotonic() < end:
            listener.drain(0.2)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr[-3000:]
    listener.drain(0.5)
    listener.close()
    messages = [m for _, m in listener.received]
    assert "READY" in messages[0]
    pings = [(t, m) for t, m in listener.received if "WATCHDOG" in m]
    # 2 s of frames at one ping per 0.2 s: about 10; fewer than 6 means pings are missing,
    # more than 14 that they are not paced.
    assert 6 <= len([t for t, _ in pings if t > ready_at]) <= 14, pings
    frames = [int(m["STATUS"].split()[1]) for _, m in pings]
    assert frames == sorted(frames) and frames[-1] > frames[0] > 0, frames
    assert messages[-1] == {"STOPPING": "1", "STATUS": "stopping"}
