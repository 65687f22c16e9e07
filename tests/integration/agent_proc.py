"""`edge-agent run` as a real process with telemetry, and a subscriber that keeps every
message, for the telemetry and privacy tests."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from tests.fleet_simulator import wait_for
from tests.integration.reference import ONNX_BUNDLE, UNSEEN_SEED
from tests.mqtt_broker import MosquittoBroker

DEVICE = "line-cam-1"


def agent_config(
    tmp: Path,
    broker: MosquittoBroker,
    *,
    window_frames: int,
    fps: float | None,
    fleet: str = "",
    count: int | None = None,
) -> Path:
    """A config for a paced synthetic line sending telemetry to ``broker``."""
    path = tmp / "agent.toml"
    count_line = f"count = {count}" if count is not None else ""
    fps_line = f"fps = {fps}" if fps is not None else ""  # unset: as fast as it can
    path.write_text(
        f"""
[device]
id = "{DEVICE}"
profile = "x86-generic"
line = "line-1"

[source]
url = "synthetic:"
seed = {UNSEEN_SEED}
size = "320x240"
{fps_line}
defect_rate = 0.2
{count_line}

[model]
bundle = "{ONNX_BUNDLE}"

[storage]
state_dir = "{tmp / "state"}"
evidence_pass_every = 0

[fleet]
broker = "{broker.host}:{broker.port}"
{fleet}

[telemetry]
window_frames = {window_frames}
window_s = 60
state_interval_s = 0.5

[log]
format = "json"
summary_interval_s = 1
"""
    )
    return path


def start_agent(config: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "edge_agent.cli", "run", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def stop_agent(proc: subprocess.Popen[str], *, signal_it: bool = True) -> str:
    """SIGTERM (unless ``signal_it`` is False: the source ends by itself), wait, and
    return the agent's log (stderr); the agent must exit 0."""
    if signal_it and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr[-4000:]
    return stderr


def inspected(state_dir: Path) -> int:
    """Rows in results.db (frames inspected and committed); 0 before the schema exists."""
    db = state_dir / "results.db"
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db) as conn:
            return int(conn.execute("SELECT count(*) FROM results").fetchone()[0])
    except sqlite3.OperationalError as e:
        if "no such table" in str(e):
            return 0
        raise


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    payload: bytes
    retain: bool


class Recorder:
    """A raw paho client subscribed to ``filters`` that keeps every message it receives.

    ``persistent=True`` keeps its session on the broker (clean_session False, QoS 1), so
    a broker with persistence queues messages for it while it is reconnecting.
    """

    def __init__(
        self,
        broker: MosquittoBroker,
        filters: list[str],
        *,
        client_id: str = "recorder",
        persistent: bool = False,
    ) -> None:
        self._lock = threading.Lock()
        self.messages: list[Message] = []
        self._subscribed = threading.Event()
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=not persistent,
        )
        client.reconnect_delay_set(min_delay=0.05, max_delay=0.2)  # type: ignore[arg-type]
        client.on_connect = lambda c, _u, _f, _rc, _p: c.subscribe([(f, 1) for f in filters])
        client.on_subscribe = lambda _c, _u, _m, _rc, _p: self._subscribed.set()
        client.on_message = self._on_message
        client.connect(broker.host, broker.port, keepalive=30)
        client.loop_start()
        self._client = client
        assert self._subscribed.wait(5), "recorder could not subscribe"

    def _on_message(self, _client: mqtt.Client, _userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append(Message(msg.topic, bytes(msg.payload), bool(msg.retain)))

    def snapshot(self) -> list[Message]:
        with self._lock:
            return list(self.messages)

    def on(self, topic: str) -> list[bytes]:
        return [m.payload for m in self.snapshot() if m.topic == topic]

    def wait(self, predicate: object, timeout_s: float) -> None:
        assert callable(predicate)
        assert wait_for(lambda: bool(predicate()), timeout_s), "timed out waiting for messages"

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
