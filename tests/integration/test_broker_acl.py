"""The production Mosquitto configuration (scripts/mosquitto/) on a real broker, with
certificates from `fleet-server ca` / `fleet-server devices enroll`.

Every "cannot" is checked against a control message: the observer must receive a
message the broker handled AFTER the forbidden one, and only then is the absence of the
forbidden one taken as proof (MQTT keeps order per connection; Mosquitto routes messages
one at a time). So no check passes by waiting too briefly.
"""

from __future__ import annotations

import argparse
import os
import pwd
import signal
import socket
import ssl
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.config import load_config
from edge_agent.protocol import topics
from edge_agent.transport import MqttTransport, TlsFiles
from fleet_server.enroll import SERVER_ACCOUNT, init_ca, issue
from fleet_server.enroll_cli import add_devices_commands
from fleet_server.repository import FleetRepository, init_keys
from tests.fleet_simulator import wait_for
from tests.integration.reference import ONNX_BUNDLE
from tests.mqtt_broker import MosquittoBroker

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "scripts" / "mosquitto" / "mosquitto.conf"
ACL = ROOT / "scripts" / "mosquitto" / "acl"
WAIT_S = 10.0


def fleet_server_cli(argv: list[str]) -> int:
    """``fleet-server ca|devices ...`` through a parser holding only these commands."""
    parser = argparse.ArgumentParser(prog="fleet-server")
    add_devices_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


class TlsBroker(MosquittoBroker):
    """Mosquitto running scripts/mosquitto/mosquitto.conf, with only what a test must
    change: the port, loopback, the files' locations, no persistence, our own user."""

    def __init__(self, certs: Path, acl: Path) -> None:
        super().__init__()
        text = CONF.read_text(encoding="utf-8")
        replacements = {
            "/etc/mosquitto/certs/": f"{certs}/",
            "/etc/mosquitto/edgefleet.acl": str(acl),
            "listener 8883": f"listener {self.port} {self.host}",
        }
        for old, new in replacements.items():
            assert old in text, f"{CONF} no longer contains {old!r}"
            text = text.replace(old, new)
        text += (
            "\npersistence false\nlog_dest stderr\n"
            "log_type error\nlog_type warning\nlog_type notice\nlog_type information\n"
            f"user {pwd.getpwuid(os.geteuid()).pw_name}\n"
        )
        self._conf.write_text(text, encoding="utf-8")

    def reload(self) -> None:
        """SIGHUP: Mosquitto re-reads its configuration, ACL and CRL."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGHUP)


@dataclass(frozen=True, slots=True)
class Pki:
    ca_dir: Path
    certs: Path  # the broker's cafile, certfile, keyfile, crlfile
    server: TlsFiles
    repo: Path
    out: Path


def tls_of(bundle: Path) -> TlsFiles:
    return TlsFiles(
        bundle / "tls" / "ca.pem", bundle / "tls" / "device.pem", bundle / "tls" / "device.key"
    )


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    now = datetime.now(timezone.utc)
    ca_dir, certs = tmp_path / "ca", tmp_path / "certs"
    assert fleet_server_cli(["ca", "init", "--ca-dir", str(ca_dir)]) == 0
    assert (ca_dir / "ca.key").stat().st_mode & 0o777 == 0o600
    assert (
        fleet_server_cli(
            [
                "ca",
                "issue",
                "broker",
                "--ca-dir",
                str(ca_dir),
                "--out",
                str(certs),
                "--ip",
                "127.0.0.1",
            ]
        )
        == 0
    )
    server_dir = tmp_path / "server-tls"
    assert (
        fleet_server_cli(
            ["ca", "issue", SERVER_ACCOUNT, "--ca-dir", str(ca_dir), "--out", str(server_dir)]
        )
        == 0
    )
    (certs / "crl.pem").write_bytes((ca_dir / "crl.pem").read_bytes())
    repo = tmp_path / "repo"
    init_keys(tmp_path / "keys")
    FleetRepository(repo / "metadata", tmp_path / "keys", repo / "targets").create(now=now)
    return Pki(
        ca_dir=ca_dir,
        certs=certs,
        server=TlsFiles(
            server_dir / "ca.pem",
            server_dir / f"{SERVER_ACCOUNT}.pem",
            server_dir / f"{SERVER_ACCOUNT}.key",
        ),
        repo=repo,
        out=tmp_path / "bundles",
    )


def enroll(pki: Pki, device_id: str, broker: MosquittoBroker, *, tar: bool = False) -> Path:
    """Enroll through the CLI; return the bundle directory (a tar is unpacked first)."""
    out = pki.out / (f"{device_id}.tar.gz" if tar else device_id)
    code = fleet_server_cli(
        [
            "devices", "enroll", device_id,
            "--ca-dir", str(pki.ca_dir), "--repo", str(pki.repo),
            "--broker", f"{broker.host}:{broker.port}", "--out", str(out),
            "--source", "synthetic:", "--model", str(ONNX_BUNDLE),
        ]
    )  # fmt: skip
    assert code == 0
    if not tar:
        return out
    assert out.stat().st_mode & 0o777 == 0o600
    unpacked = pki.out / f"{device_id}-unpacked"
    with tarfile.open(out) as archive:
        members = {m.name: m.mode for m in archive.getmembers() if m.isfile()}
        archive.extractall(unpacked, filter="data")
    assert members == {
        "agent.toml": 0o644,
        "root.json": 0o644,
        "tls/ca.pem": 0o644,
        "tls/device.pem": 0o644,
        "tls/device.key": 0o600,
    }
    return unpacked


class Observer:
    """A connected client that records every message it receives."""

    def __init__(self, broker: MosquittoBroker, client_id: str, tls: TlsFiles) -> None:
        self._lock = threading.Lock()
        self.got: list[tuple[str, bytes]] = []
        self.transport = MqttTransport(
            host=broker.host, port=broker.port, client_id=client_id, tls=tls
        )
        self.transport.start()
        assert self.transport.wait_connected(WAIT_S), f"{client_id} could not connect"

    def subscribe(self, *filters: str) -> None:
        for f in filters:
            self.transport.subscribe(f, self._keep, qos=1)

    def _keep(self, topic: str, payload: bytes) -> None:
        with self._lock:
            self.got.append((topic, payload))

    def has(self, topic: str, payload: bytes) -> bool:
        with self._lock:
            return (topic, payload) in self.got

    def wait(self, topic: str, payload: bytes) -> None:
        assert wait_for(lambda: self.has(topic, payload), WAIT_S), f"never got {topic} {payload!r}"

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        delivery = self.transport.publish_tracked(topic, payload, retain=retain)
        assert delivery is not None and delivery.wait(WAIT_S), f"{topic}: no PUBACK"

    def close(self) -> None:
        self.transport.stop()


@pytest.fixture
def fleet(pki: Pki) -> Iterator[tuple[TlsBroker, dict[str, Observer], dict[str, Path]]]:
    broker = TlsBroker(pki.certs, ACL)
    with broker:
        bundles = {"A": enroll(pki, "dev-A", broker), "B": enroll(pki, "dev-B", broker, tar=True)}
        # Client ids differ from the device ids, so that a real agent (client id = its
        # device id) can join without taking over a session; the ACL goes by username.
        clients = {
            "server": Observer(broker, "fleet-server-test", pki.server),
            "A": Observer(broker, "observer-A", tls_of(bundles["A"])),
            "B": Observer(broker, "observer-B", tls_of(bundles["B"])),
        }
        clients["server"].subscribe(*(topics.device_filter(k) for k in topics.KINDS), "#")
        clients["A"].subscribe("#")
        clients["B"].subscribe(topics.data("dev-B"), topics.NOTIFY)
        _settle(clients)
        try:
            yield broker, clients, bundles
        finally:
            for c in clients.values():
                c.close()


def _settle(clients: dict[str, Observer]) -> None:
    """Wait until every subscription is in place: SUBSCRIBE is not acknowledged to the
    caller, so an allowed message on each path is repeated until it arrives."""
    paths = (
        (clients["A"], topics.telemetry("dev-A"), clients["server"]),
        (clients["server"], topics.data("dev-A"), clients["A"]),
        (clients["server"], topics.data("dev-B"), clients["B"]),
    )
    for n, (sender, topic, receiver) in enumerate(paths):
        payload = f"settle-{n}".encode()

        def arrived(
            sender: Observer = sender,
            topic: str = topic,
            payload: bytes = payload,
            receiver: Observer = receiver,
        ) -> bool:
            sender.publish(topic, payload)
            return wait_for(lambda: receiver.has(topic, payload), 0.5)

        assert wait_for(arrived, WAIT_S, interval_s=0.0), f"{topic}: subscription not ready"


def test_device_acl_on_a_real_broker(
    fleet: tuple[TlsBroker, dict[str, Observer], dict[str, Path]],
) -> None:
    _, c, _ = fleet
    server, a, b = c["server"], c["A"], c["B"]
    control = 0

    def a_control() -> None:
        """A publishes to its own telemetry (allowed); the server must receive it."""
        nonlocal control
        control += 1
        payload = f"control-{control}".encode()
        a.publish(topics.telemetry("dev-A"), payload)
        server.wait(topics.telemetry("dev-A"), payload)

    # A publishes to its own topics and the server receives each.
    for kind in ("state", "telemetry", "events", "fetch"):
        topic = getattr(topics, kind)("dev-A")
        a.publish(topic, b"own")
        server.wait(topic, b"own")

    # A cannot publish to B's topics (the server sees all of them) ...
    for kind in ("state", "telemetry", "events", "fetch"):
        topic = getattr(topics, kind)("dev-B")
        a.publish(topic, b"forged")
        a_control()
        assert not server.has(topic, b"forged"), f"A published to {topic}"
    # ... nor answer in B's name: B sees the server's answer, which came after A's.
    a.publish(topics.data("dev-B"), b"forged")
    a_control()
    server.publish(topics.data("dev-B"), b"answer")
    b.wait(topics.data("dev-B"), b"answer")
    assert not b.has(topics.data("dev-B"), b"forged")

    # A cannot publish notify: neither the server nor B receives it.
    a.publish(topics.NOTIFY, b"forged", retain=True)
    a_control()
    server.publish(topics.NOTIFY, b"real", retain=True)
    b.wait(topics.NOTIFY, b"real")
    assert not b.has(topics.NOTIFY, b"forged")
    assert not server.has(topics.NOTIFY, b"forged")

    # A (subscribed to '#') reads notify and its own data, never B's telemetry.
    a.wait(topics.NOTIFY, b"real")
    b.publish(topics.telemetry("dev-B"), b"b-window")
    server.wait(topics.telemetry("dev-B"), b"b-window")
    server.publish(topics.data("dev-A"), b"for-a")  # handled after B's telemetry
    a.wait(topics.data("dev-A"), b"for-a")
    assert not any(t == topics.telemetry("dev-B") for t, _ in a.got), a.got
    # Nor its own telemetry, nor anything of B's: only data and notify reach a device.
    assert {t for t, _ in a.got} == {topics.NOTIFY, topics.data("dev-A")}


class ConnectOutcome:
    """Connect once with raw paho and report what happened: "connected", or why not."""

    def __init__(self, broker: MosquittoBroker, client_id: str, tls: TlsFiles) -> None:
        self._done = threading.Event()
        self.result = "no answer"
        client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id)
        client.tls_set(str(tls.ca_file), str(tls.cert_file), str(tls.key_file))
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        try:
            client.connect(broker.host, broker.port, keepalive=10)
        except (ssl.SSLError, OSError) as e:
            self.result = f"refused: {e}"
            return
        client.loop_start()
        self._done.wait(WAIT_S)
        client.disconnect()
        client.loop_stop()

    def _on_connect(self, _c: mqtt.Client, _u: object, _f: object, rc: object, _p: object) -> None:
        self.result = "connected" if str(rc) == "Success" else f"refused: {rc}"
        self._done.set()

    def _on_disconnect(
        self, _c: mqtt.Client, _u: object, _f: object, rc: object, _p: object
    ) -> None:
        if self.result == "no answer":
            self.result = f"dropped: {rc}"
        self._done.set()


def tls_alert(broker: MosquittoBroker, tls: TlsFiles) -> str:
    """The TLS alert the broker answers a client certificate with ("" if none came).

    With TLS 1.3 the client's handshake completes before the broker has checked the
    client certificate; a refusal then arrives as an alert on the first read.
    """
    context = ssl.create_default_context(cafile=str(tls.ca_file))
    context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    with (
        socket.create_connection((broker.host, broker.port), timeout=WAIT_S) as raw,
        context.wrap_socket(raw, server_hostname=broker.host) as conn,
    ):
        try:
            conn.recv(1)
        except ssl.SSLError as e:
            return str(e.reason)
        except TimeoutError:
            return ""
    return ""


def test_unknown_and_revoked_certificates_cannot_connect(pki: Pki, tmp_path: Path) -> None:
    now = datetime.now(timezone.utc)
    broker = TlsBroker(pki.certs, ACL)
    with broker:
        good = enroll(pki, "dev-C", broker)
        assert ConnectOutcome(broker, "dev-C", tls_of(good)).result == "connected"

        # Same CN, signed by another CA: the handshake fails.
        other = tmp_path / "other-ca"
        init_ca(other, now)
        forged = issue(other, "dev-C", now)
        (tmp_path / "forged.pem").write_bytes(forged.cert_pem)
        (tmp_path / "forged.key").write_bytes(forged.key_pem)
        forged_tls = TlsFiles(
            good / "tls" / "ca.pem", tmp_path / "forged.pem", tmp_path / "forged.key"
        )
        outcome = ConnectOutcome(broker, "dev-C", forged_tls).result
        assert outcome.startswith(("refused", "dropped")), outcome
        assert tls_alert(broker, forged_tls) == "TLSV1_ALERT_UNKNOWN_CA"

        # Revoked: the new CRL is copied to the broker, which reloads it on SIGHUP.
        assert fleet_server_cli(["devices", "revoke", "dev-C", "--ca-dir", str(pki.ca_dir)]) == 0
        (pki.certs / "crl.pem").write_bytes((pki.ca_dir / "crl.pem").read_bytes())
        broker.reload()
        assert wait_for(lambda: "Reloading config" in broker.log_text(), WAIT_S), broker.log_text()
        outcome = ConnectOutcome(broker, "dev-C", tls_of(good)).result
        assert outcome.startswith(("refused", "dropped")), outcome
        assert tls_alert(broker, tls_of(good)) == "SSLV3_ALERT_CERTIFICATE_REVOKED"

        # Re-enrolled with --replace: a new certificate connects again.
        assert fleet_server_cli(
            [
                "devices", "enroll", "dev-C", "--ca-dir", str(pki.ca_dir),
                "--repo", str(pki.repo), "--broker", f"{broker.host}:{broker.port}",
                "--out", str(tmp_path / "dev-C-2"), "--replace",
            ]
        ) == 0  # fmt: skip
        assert ConnectOutcome(broker, "dev-C", tls_of(tmp_path / "dev-C-2")).result == "connected"


def test_enrolled_agent_and_fleet_server_over_tls(
    fleet: tuple[TlsBroker, dict[str, Observer], dict[str, Path]], pki: Pki, tmp_path: Path
) -> None:
    """A real agent on the starter config from `devices enroll` and a real `fleet-server
    serve` on its `ca issue fleet-server` certificate, through the production ACL: the
    agent's retained state reaches the server's account, and the server answers the
    agent's metadata requests on the agent's data topic."""
    broker, clients, bundles = fleet
    config = bundles["A"] / "agent.toml"
    cfg = load_config(config)
    assert cfg.device.id == "dev-A"
    assert cfg.fleet.tls_key == bundles["A"] / "tls" / "device.key"
    assert cfg.fleet.root_metadata is not None and cfg.fleet.root_metadata.is_file()
    assert cfg.fleet.tls_key.stat().st_mode & 0o777 == 0o600
    with config.open("a", encoding="utf-8") as f:
        f.write(f'\n[storage]\nstate_dir = "{tmp_path / "state"}"\n')
    server_tls = pki.server
    server = subprocess.Popen(
        [
            sys.executable, "-m", "fleet_server.cli", "serve",
            "--repo", str(pki.repo), "--keys", str(pki.repo.parent / "keys"),
            "--broker", f"{broker.host}:{broker.port}", "--client-id", "fleet-server",
            "--tls-ca", str(server_tls.ca_file), "--tls-cert", str(server_tls.cert_file),
            "--tls-key", str(server_tls.key_file),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    agent = subprocess.Popen(
        [sys.executable, "-m", "edge_agent.cli", "run", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        account, device = clients["server"], clients["A"]
        state = topics.state("dev-A")
        assert wait_for(lambda: any(t == state and b"online" in p for t, p in account.got), 30)
        # The agent asks for metadata (the server's account reads fetch) ...
        assert wait_for(lambda: any(t == topics.fetch("dev-A") for t, _ in account.got), 30)
        # ... and the server answers on the agent's data topic: "ok" with file bytes.
        data = topics.data("dev-A")
        assert wait_for(
            lambda: any(t == data and b'"status":"ok"' in p for t, p in device.got), 30
        ), device.got
    finally:
        # The agent first: an update check it has begun still gets its answers.
        agent.send_signal(signal.SIGTERM)
        _, agent_log = agent.communicate(timeout=30)
        server.send_signal(signal.SIGTERM)
        _, server_log = server.communicate(timeout=30)
    assert agent.returncode == 0, agent_log[-3000:]
    assert server.returncode == 0, server_log[-3000:]
    assert "update_failed" not in agent_log, agent_log[-3000:]
    assert "refused" not in agent_log + server_log, (agent_log + server_log)[-3000:]
