"""Telemetry ingest, fleet drift and alerts end to end: a real Mosquitto, a real SQLite
file, real encoded windows from ``WindowAccumulator``, a real HTTP webhook receiver.

Six simulated devices on two lines draw per-frame features from one generator; the test's
bundle carries the reference profile built from the same generator, so a device that
is not shifted is in control by construction. Seeds are fixed: the windows, and so every
detector's output per device, are the same on every run.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from edge_agent.core.features import build_reference_profile
from edge_agent.core.stats import WindowAccumulator, edges_of
from edge_agent.protocol import topics
from edge_agent.protocol.manifest import FEATURE_NAMES, ReferenceProfile
from edge_agent.protocol.state import DeviceState, Status, encode_state
from edge_agent.protocol.telemetry import TelemetryWindow, encode_window
from edge_agent.transport import MqttTransport
from fleet_server.domain.alerts import AlertPolicy
from fleet_server.domain.fleet_drift import FleetRule
from fleet_server.storage import AlertRecord, AlertStore, TelemetryStore, open_database
from fleet_server.webhook import WebhookSender
from fleet_server.workers.drift_feed import DriftFeed
from fleet_server.workers.drift_monitor import FleetDriftMonitor
from fleet_server.workers.ingest import TelemetryIngest
from fleet_server.workers.references import ReferenceLibrary
from tests.fleet_simulator import wait_for
from tests.mqtt_broker import MosquittoBroker, connect, mosquitto_broker  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "models" / "reference-onnx" / "bundle.json"
FLEET_SERVER = Path(sys.executable).with_name("fleet-server")
MODEL_NAME, MODEL_VERSION = "line-model", "1.0.0"
MODEL = f"{MODEL_NAME}@{MODEL_VERSION}"
FRAMES = 500
DEVICES = {f"cam-{i}": ("line-a" if i <= 3 else "line-b", "rpi5" if i % 2 else "rpi4")
           for i in range(1, 7)}  # fmt: skip
# Per-frame generator: (mean, std) of the normal image features.
NORMAL = {
    "brightness": (120.0, 6.0),
    "contrast": (40.0, 3.0),
    "sharpness": (6.0, 0.25),
    "r_mean": (118.0, 6.0),
    "g_mean": (121.0, 6.0),
    "b_mean": (116.0, 6.0),
}


def _rows(rng: np.random.Generator, n: int, shift: Mapping[str, float]) -> npt.NDArray[np.float64]:
    """n x 8 feature rows in wire order; ``shift`` adds to a feature's values."""
    rows = np.empty((n, len(FEATURE_NAMES)))
    for j, name in enumerate(FEATURE_NAMES):
        if name in NORMAL:
            mean, std = NORMAL[name]
            rows[:, j] = rng.normal(mean, std, n)
        elif name == "clipped":
            rows[:, j] = rng.beta(2.0, 300.0, n)
        else:  # p_defect: mostly clear passes, some clear fails
            fails = rng.random(n) < 0.1
            rows[:, j] = np.where(fails, rng.beta(20.0, 2.0, n), rng.beta(1.0, 40.0, n))
        rows[:, j] += shift.get(name, 0.0)
    return rows


def _write_bundle(directory: Path, profile: ReferenceProfile) -> None:
    manifest = json.loads(TEMPLATE.read_text(encoding="utf-8"))
    manifest.update(
        name=MODEL_NAME, version=MODEL_VERSION, reference=profile.model_dump(mode="json")
    )
    (directory / MODEL_NAME).mkdir(parents=True)
    (directory / MODEL_NAME / "bundle.json").write_text(json.dumps(manifest), encoding="utf-8")


@dataclass
class Line:
    """The simulated devices: one accumulator and one seeded generator per device."""

    profile: ReferenceProfile
    publisher: MqttTransport | None = None
    t: float = 1_800_000_000.0
    sent: list[tuple[str, bytes]] = field(default_factory=list)
    published: int = 0

    def __post_init__(self) -> None:
        self._acc = {
            d: WindowAccumulator(edges_of(self.profile), max_frames=FRAMES) for d in DEVICES
        }
        self._rng = {d: np.random.default_rng(100 + i) for i, d in enumerate(DEVICES)}

    def window(self, device: str, seq: int, shift: Mapping[str, float]) -> TelemetryWindow:
        acc, rng = self._acc[device], self._rng[device]
        rows = _rows(rng, FRAMES, shift)
        for k, row in enumerate(rows):
            p = float(min(max(row[-1], 0.0), 1.0))
            outcome = "fail" if p >= 0.5 else "uncertain" if p >= 0.05 else "pass"
            acc.add(outcome, row[:-1], p, 3.0 + k % 5, self.t + k * 0.1)
        window = acc.close(self.t + FRAMES * 0.1, seq=seq, model=MODEL, edge="0.1.0")
        assert window is not None
        return window

    def round(self, seq: int, shifts: Mapping[str, Mapping[str, float]] | None = None) -> None:
        """Every device publishes window ``seq`` (shifted as given)."""
        for device in DEVICES:
            payload = encode_window(self.window(device, seq, (shifts or {}).get(device, {})))
            self.sent.append((device, payload))
            self.publish(topics.telemetry(device), payload)
        self.t += 60.0

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        assert self.publisher is not None
        assert self.publisher.publish(topic, payload, qos=1, retain=retain)
        self.published += 1

    def publish_states(self) -> None:
        for device, (line, profile) in DEVICES.items():
            state = DeviceState(
                Status.ONLINE, ts=int(self.t), model=MODEL, edge="0.1.0", profile=profile, line=line
            )
            self.publish(topics.state(device), encode_state(state), retain=True)


class _Receiver(BaseHTTPRequestHandler):
    received: list[dict[str, Any]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append(
            {"delivery": self.headers["X-Edgefleet-Delivery"], **json.loads(body)}
        )
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def webhook() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    received: list[dict[str, Any]] = []
    handler = type("Receiver", (_Receiver,), {"received": received})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/retrain", received
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def profile() -> ReferenceProfile:
    return build_reference_profile(_rows(np.random.default_rng(7), 20_000, {}), window_frames=100)


@dataclass
class Server:
    telemetry: TelemetryStore
    alerts: AlertStore
    ingest: TelemetryIngest
    monitor: FleetDriftMonitor
    feed: DriftFeed

    def settle(self, published: int) -> None:
        """Wait until ingest has handled ``published`` messages and the drift feed has
        fed every stored window."""

        def handled() -> int:
            c = self.ingest.counters()
            return c.windows + c.duplicates + c.rejected + c.states

        assert wait_for(lambda: handled() >= published, 15), "ingest did not catch up"
        assert self.ingest.wait_idle(15)
        assert self.feed.wait_caught_up(15), "the drift feed did not catch up"

    def alerts_of(self, scope: str) -> list[AlertRecord]:
        return [a for a in self.alerts.alerts() if a.key.scope == scope]


def test_lone_and_fleet_drift_alerts_duplicates_and_bad_payloads(
    mosquitto: MosquittoBroker,
    tmp_path: Path,
    profile: ReferenceProfile,
    webhook: tuple[str, list[dict[str, Any]]],
) -> None:
    url, received = webhook
    _write_bundle(tmp_path / "bundles", profile)
    engine = open_database(f"sqlite:///{tmp_path / 'fleet.db'}")
    telemetry, alerts = TelemetryStore(engine), AlertStore(engine)
    sender = WebhookSender(url, alerts, timeout_s=2.0, backoff_s=0.1)
    monitor = FleetDriftMonitor(
        telemetry,
        alerts,
        ReferenceLibrary(bundle_dirs=[tmp_path / "bundles"]),
        rule=FleetRule(),
        policy=AlertPolicy(resolve_after=3),
        notify=sender.notify,
    )
    transport = MqttTransport(host=mosquitto.host, port=mosquitto.port, client_id="fleet-ingest")
    feed = DriftFeed(telemetry, monitor, reorder_wait_s=5.0, poll_s=0.05)
    ingest = TelemetryIngest(transport, telemetry, on_state=feed.on_state, share="fleet")
    server = Server(telemetry, alerts, ingest, monitor, feed)
    publisher = connect(mosquitto, "line-simulator")
    line = Line(profile, publisher)
    sender.start()
    feed.start(replay=500)
    ingest.start()
    transport.start()
    try:
        assert transport.wait_connected(5)
        line.publish_states()
        server.settle(line.published)

        # In control: nothing to say.
        for seq in (1, 2, 3):
            line.round(seq)
        server.settle(line.published)
        assert telemetry.count_windows() == 18 and alerts.alerts() == []
        cam4 = telemetry.device("cam-4")
        assert cam4 is not None and (cam4.line, cam4.profile, cam4.model) == (
            "line-b",
            "rpi4",
            MODEL,
        )

        # One camera's lamp dims: a device alert for it alone.
        for seq in (4, 5, 6):
            line.round(seq, {"cam-3": {"brightness": -20.0}})
        server.settle(line.published)
        (lone,) = alerts.alerts()
        assert lone.key == ("device", "cam-3", "brightness", "down")
        assert lone.resolved_at is None and lone.devices == ("cam-3",)
        assert lone.since_seq == 4 and lone.test == "cusum"
        assert lone.effect is not None and lone.effect < -2.0
        tests = {f["test"] for f in lone.evidence["devices"][0]["findings"]}
        assert {"cusum", "chi2", "ks"} <= tests
        assert wait_for(lambda: alerts.get(lone.id).webhook_status == "delivered", 5)
        opened = received[0]
        assert opened["event"] == "alert.opened" and opened["delivery"] == f"{lone.id}:alert.opened"
        assert opened["alert"]["feature"] == "brightness" and opened["alert"]["scope"] == "device"
        assert opened["alert"]["since"]["seq"] == 4
        (drifting,) = opened["alert"]["evidence"]["drifting_aggregate"]
        assert drifting["mean"] == pytest.approx(100.0, abs=1.0)
        assert drifting["reference_mean"] == pytest.approx(120.0, abs=0.5)

        # Duplicates are ignored; garbage is counted and ingest goes on.
        for device, payload in line.sent[-12:]:
            line.publish(topics.telemetry(device), payload)
        line.publish(topics.telemetry("cam-2"), b"{not json")
        # Well-formed, but a window of 10 frames may not leave a device (privacy rule).
        tiny = json.loads(line.sent[0][1])
        tiny.update(
            seq=99, counts={"pass": 10, "fail": 0, "uncertain": 0, "error": 0, "dropped": 0}
        )
        line.publish(topics.telemetry("cam-2"), json.dumps(tiny).encode())
        line.publish(topics.state("cam-2"), b'{"v": 7}')
        server.settle(line.published)
        counters = ingest.counters()
        assert counters.duplicates == 12 and counters.rejected == 3
        assert telemetry.count_windows() == 36

        # The lamp is fixed: the alert resolves after three quiet windows.
        for seq in (7, 8, 9, 10):
            line.round(seq)
        server.settle(line.published)
        lone = alerts.get(lone.id)
        assert lone.resolved_at is not None and lone.superseded_by is None
        assert wait_for(lambda: any(r["event"] == "alert.resolved" for r in received), 5)

        # A new product variant: five of six cameras see more contrast. One fleet alert.
        variant = {d: {"contrast": 10.0} for d in DEVICES if d != "cam-3"}
        for seq in (11, 12, 13):
            line.round(seq, variant)
        server.settle(line.published)
        open_now = alerts.alerts(open_only=True)
        assert [a.key for a in open_now] == [("fleet", "*", "contrast", "up")]
        (fleet,) = open_now
        assert fleet.devices == ("cam-1", "cam-2", "cam-4", "cam-5", "cam-6")
        assert fleet.evidence["group_size"] == 6 and fleet.evidence["drifting"] == 5
        # The first camera to report it looked alone for a moment: folded into the fleet.
        folded = [a for a in server.alerts_of("device") if a.key.feature == "contrast"]
        assert folded, "the first drifting camera should have looked alone"
        assert all(a.superseded_by == fleet.id and a.resolved_at is not None for a in folded)
        assert [a.key.key for a in server.alerts_of("device") if a.key.feature == "brightness"] == [
            "cam-3"
        ]
        assert wait_for(lambda: any(r["alert"]["id"] == fleet.id for r in received), 5), (
            "no webhook for the fleet alert"
        )
        views = {(v.group.scope, v.group.key): v for v in monitor.views(datetime.now(timezone.utc))}
        assert sorted(views) == [
            ("fleet", "*"),
            ("line", "line-a"),
            ("line", "line-b"),
            ("model", MODEL),
            ("profile", "rpi4"),
            ("profile", "rpi5"),
        ]
        line_b = views[("line", "line-b")]
        assert line_b.group.devices == ("cam-4", "cam-5", "cam-6")
        assert [d for d, _ in line_b.group.drifting[("contrast", "up")]] == list(
            line_b.group.devices
        )
        (fleet_sum,) = views[("fleet", "*")].aggregates.values()
        assert fleet_sum.devices == frozenset(DEVICES) and fleet_sum.frames == 6 * FRAMES
        assert fleet_sum.mean("contrast") == pytest.approx(40.0 + 10.0 * 5 / 6, abs=0.5)
        posted = next(r for r in received if r["alert"]["id"] == fleet.id)
        assert posted["alert"]["evidence"]["devices"][0]["findings"][0]["test"] in ("cusum", "chi2")

        # Back to normal: everything resolves.
        for seq in (14, 15, 16):
            line.round(seq)
        server.settle(line.published)
        assert alerts.alerts(open_only=True) == []
        assert alerts.get(fleet.id).resolved_at is not None
        assert ingest.counters().windows == 16 * 6 and monitor.fed == 16 * 6
        assert feed.counters().late == 0 and feed.lag().windows == 0
    finally:
        transport.stop()
        ingest.stop()
        feed.stop()
        sender.stop()
        publisher.stop()

    # A restart rebuilds every device's detectors from the stored windows.
    rebuilt = FleetDriftMonitor(
        telemetry, alerts, ReferenceLibrary(bundle_dirs=[tmp_path / "bundles"])
    )
    assert rebuilt.rebuild() == dict.fromkeys(DEVICES, 16)
    assert sorted(r.device for r in rebuilt.reports()) == sorted(DEVICES)
    engine.dispose()


def test_windows_of_other_edges_or_unknown_models_are_stored_but_not_monitored(
    tmp_path: Path, profile: ReferenceProfile, caplog: pytest.LogCaptureFixture
) -> None:
    _write_bundle(tmp_path / "bundles", profile)
    engine = open_database(str(tmp_path / "fleet.db"))
    monitor = FleetDriftMonitor(
        TelemetryStore(engine),
        AlertStore(engine),
        ReferenceLibrary(bundle_dirs=[tmp_path / "bundles"]),
    )
    line = Line(profile)
    now = datetime.now(timezone.utc)
    window = line.window("cam-1", 1, {})
    with caplog.at_level(logging.WARNING):
        for seq in (1, 2):
            monitor.on_window("cam-1", replace(window, seq=seq, ref="0" * 16), now)
        monitor.on_window("cam-1", replace(window, seq=3, model="other-model@2.0"), now)
    assert monitor.not_fed == 3 and monitor.fed == 0 and monitor.reports() == []
    assert caplog.text.count("are not the reference's") == 1  # once per device and model
    assert "other-model@2.0" in caplog.text and "no reference" in caplog.text
    monitor.on_window("cam-1", replace(window, seq=4), now)
    assert monitor.fed == 1 and [r.seq for r in monitor.reports()] == [4]
    engine.dispose()


def test_ingest_command_stores_windows_and_stops_on_sigterm(
    mosquitto: MosquittoBroker, tmp_path: Path, profile: ReferenceProfile
) -> None:
    _write_bundle(tmp_path / "bundles", profile)
    db = tmp_path / "fleet.db"
    proc = subprocess.Popen(
        [
            str(FLEET_SERVER),
            "ingest",
            "--broker",
            f"{mosquitto.host}:{mosquitto.port}",
            "--db",
            str(db),
            "--bundles",
            str(tmp_path / "bundles"),
            "--status-interval",
            "0.2",
        ],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    publisher = connect(mosquitto, "line-simulator")
    assert proc.stderr is not None
    pipe = proc.stderr
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(pipe.readline, "")))
    try:
        line = pipe.readline()
        while "ingesting telemetry" not in line:
            assert line, "fleet-server ingest ended before it started ingesting"
            line = pipe.readline()
        reader.start()
        Line(profile, publisher).round(1)
        telemetry = TelemetryStore(open_database(str(db)))
        assert wait_for(lambda: telemetry.count_windows() == 6, 10)
        # The drift feed reads them back and feeds the detectors (its status line).
        assert wait_for(lambda: any("drift: fed=6, late=0" in x for x in lines), 10), lines
    finally:
        publisher.stop()
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
    if reader.is_alive():
        reader.join(5)
    stderr = "".join(lines)
    assert proc.returncode == 0, stderr
    assert "SIGTERM: stopping" in stderr and "windows=6" in stderr
    assert "drift: fed=6, late=0, coalesced=0, errors=0; behind: 0 windows" in stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--db", "x.db"], "give --repo REPO or --bundles DIR (reference profiles"),
        (["--db", "x.db", "--bundles", "missing"], "--bundles missing: not a directory"),
        (["--db", "x.db", "--bundles", ".", "--webhook", "ftp://h/x"], "webhook URL"),
        (["--db", "x.db", "--bundles", ".", "--group-share", "0"], "share must be in (0, 1]"),
        (["--db", "x.db", "--no-drift", "--share", "a/b"], "--share 'a/b': a group name"),
        (["--db", "x.db", "--no-drift", "--batch", "0"], "--batch must be >= 1"),
        (["--db", "x.db", "--no-drift", "--status-interval", "0"], "--status-interval must"),
        (["--db", "nosuch://x", "--bundles", "."], "invalid database URL 'nosuch://x'"),
    ],
)
def test_ingest_command_refuses_bad_options(tmp_path: Path, args: list[str], message: str) -> None:
    result = subprocess.run(
        [str(FLEET_SERVER), "ingest", "--broker", "127.0.0.1:1", *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert f"fleet-server: error: {message}" in result.stderr
