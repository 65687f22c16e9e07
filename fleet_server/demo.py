"""``fleet-server demo``: the whole loop on one machine, with embedded defaults.

A loopback broker (Mosquitto, or the embedded amqtt broker), a signed repository with the
reference model released as 1.0.0, the fleet server (chunk server, ingest and drift
monitor, rollout driver, REST API and console) and three real ``edge-agent run``
processes inspecting synthetic lines. The lighting of ``line-3`` darkens over a few
minutes. After ``rollout_after_s`` the ML team's side releases 1.0.1 (the same network
re-sealed under a new version: the demo shows the rollout mechanics, not a better model)
and a rollout takes it to the fleet in two waves, a canary and then everyone, gated on
the devices' health-gate figures and telemetry. The drift alert for line-3 appears in the
console. Ctrl-C stops the agents, the server and the broker, in that order.
"""

from __future__ import annotations

import logging
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

from edge_agent.bundle import copy_bundle
from edge_agent.transport import MqttTransport
from fleet_server.auth import Role
from fleet_server.demo_broker import start_broker
from fleet_server.ingest_service import default_ingest_options
from fleet_server.releasing import release_bundle
from fleet_server.repository import FleetRepository, init_keys
from fleet_server.rollouts import GateLimits, RolloutTarget, WaveSpec
from fleet_server.server import RunningServer, ServerOptions, start_server
from fleet_server.storage.fleet_views import FleetViews

DEVICES = (
    # id, line, seed, brightness at the end of the ramp (None: steady light)
    ("line-1-cam", "line-1", 11, None),
    ("line-2-cam", "line-2", 12, None),
    ("line-3-cam", "line-3", 13, 0.55),
)
NEW_VERSION = "1.0.1"
ROLLOUT_GROUPS = ("line-1", "line-2")


@dataclass(frozen=True, slots=True)
class DemoOptions:
    model: Path
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    minutes: float = 0.0  # 0: until Ctrl-C
    fps: float = 8.0
    darken_minutes: float = 3.0
    rollout_after_s: float = 45.0
    pause_s: float = 20.0
    observe_s: float = 20.0
    min_frames: int = 100
    window_frames: int = 100
    embedded_broker: bool = False
    keep: bool = False
    password: str | None = None


@dataclass
class DemoProgress:
    """What the demo has seen so far (read by tests and printed to the user)."""

    online: int = 0
    rollout_id: int | None = None
    rollout_state: str | None = None
    alerts: list[str] | None = None


def run_demo(options: DemoOptions, stop: threading.Event, out: TextIO) -> DemoProgress:
    """Run until ``stop`` is set (or ``options.minutes`` pass); return what was seen.

    Raises:
        RuntimeError: no broker could start.
        OSError: the console port is taken, or files cannot be written.
        StorageError, RepositoryError, BundleError: the server could not be set up.
    """
    workdir = Path(tempfile.mkdtemp(prefix="edgefleet-demo-"))
    progress = DemoProgress(alerts=[])
    logger = _logger(workdir / "server.log")
    say = _printer(out)
    say(f"working directory {workdir} (server.log, agent logs)")
    with ExitStack() as stack:
        if not options.keep:
            stack.callback(shutil.rmtree, workdir, True)
        broker = start_broker(workdir, prefer_embedded=options.embedded_broker)
        stack.callback(broker.stop)
        say(f"broker: {broker.kind} on {broker.host}:{broker.port}")
        fleet = _repository(workdir, options.model)
        transport = MqttTransport(host=broker.host, port=broker.port, client_id="fleet-server")
        server_options = ServerOptions(
            refresh_interval_s=3600.0,
            db=str(workdir / "fleet.db"),
            http=(options.http_host, options.http_port),
            ingest=default_ingest_options(str(workdir / "fleet.db"), workdir / "repo"),
        )
        running, publisher = start_server(server_options, transport, fleet, stack, logger)
        publisher_thread = threading.Thread(target=publisher.run, args=(stop,), daemon=True)
        publisher_thread.start()
        password = _operator(running, options.password)
        assert running.http is not None
        say(f"console: http://{running.http.host}:{running.http.port}  login: admin / {password}")
        agents = _start_agents(workdir, options, broker.host, broker.port, fleet)
        stack.callback(_stop_agents, agents)
        say(
            f"{len(agents)} agents inspecting synthetic lines at {options.fps:g} fps; "
            f"line-3's lighting darkens over {options.darken_minutes:g} min"
        )
        _watch(
            options, running, fleet=fleet, workdir=workdir, progress=progress, stop=stop, say=say
        )
        say("stopping: agents, server, broker")
    publisher_thread.join(5)
    return progress


def _watch(
    options: DemoOptions,
    running: RunningServer,
    *,
    fleet: FleetRepository,
    workdir: Path,
    progress: DemoProgress,
    stop: threading.Event,
    say: Any,
) -> None:
    context = running.context
    assert context is not None
    views = FleetViews(context.engine)
    started = time.monotonic()
    deadline = started + options.minutes * 60 if options.minutes > 0 else None
    seen_alerts: set[int] = set()
    while not stop.wait(1.0):
        now = datetime.now(timezone.utc)
        overview = views.overview(now)
        online = int(overview["devices"]["online"])
        if online != progress.online:
            progress.online = online
            say(f"devices online: {online}/{len(DEVICES)}")
        if progress.rollout_id is None and time.monotonic() - started >= options.rollout_after_s:
            progress.rollout_id = _release_and_roll_out(options, context, fleet, workdir, say)
        if progress.rollout_id is not None:
            view = context.rollouts.get(progress.rollout_id)
            state = f"{view.state}, wave {view.current_wave + 1}/{len(view.waves)}"
            if state != progress.rollout_state:
                progress.rollout_state = state
                say(f"rollout {view.id} of {view.model}: {state}")
        for alert in overview["open_alerts"]:
            if alert["id"] not in seen_alerts:
                seen_alerts.add(alert["id"])
                text = (
                    f"drift alert: {alert['scope']} {alert['key']} "
                    f"{alert['feature']} {alert['direction']}"
                )
                assert progress.alerts is not None
                progress.alerts.append(text)
                say(text)
        if deadline is not None and time.monotonic() >= deadline:
            return


def _release_and_roll_out(
    options: DemoOptions, context: Any, fleet: FleetRepository, workdir: Path, say: Any
) -> int:
    def card(draft: dict[str, Any], _dest: Path) -> None:
        draft["description"] = (
            str(draft.get("description", "")) + " Re-released as " + NEW_VERSION + "."
        )

    bundle = copy_bundle(
        options.model, workdir / f"bundle-{NEW_VERSION}", version=NEW_VERSION, edit=card
    )
    now = datetime.now(timezone.utc)
    released = release_bundle(fleet, bundle.path, now=now)
    context.registry.sync(fleet, now=now)
    say(f"released {released.model} (release counter {released.release_counter})")
    gates = GateLimits(
        observe_s=options.observe_s,
        min_frames=options.min_frames,
        max_p99_latency_ms=1000.0,  # a loaded demo machine, not a line's budget
        timeout_s=600.0,
    )
    # line-3 stays out: a gate cannot tell a model that fails more from a line that got
    # darker at the same time, so a drifting line is no place for a canary.
    view = context.rollouts.create(
        released.model,
        RolloutTarget(groups=ROLLOUT_GROUPS),
        [WaveSpec(devices=1), WaveSpec(percent=100)],
        gates,
        pause_s=options.pause_s,
        auto_rollback=True,
        actor="admin",
        now=now,
    )
    say(
        f"rollout {view.id}: {released.model} to {', '.join(ROLLOUT_GROUPS)} in 2 waves "
        "(a canary, then the rest); line-3 is left out while its lighting drifts"
    )
    return int(view.id)


def _repository(workdir: Path, model: Path) -> FleetRepository:
    keys, repo = workdir / "keys", workdir / "repo"
    init_keys(keys)
    fleet = FleetRepository(repo / "metadata", keys, repo / "targets")
    now = datetime.now(timezone.utc)
    fleet.create(now=now)
    release_bundle(fleet, model, now=now)
    return fleet


def _operator(running: RunningServer, password: str | None) -> str:
    context = running.context
    assert context is not None
    chosen = password or secrets.token_urlsafe(9)
    context.auth.create_operator(
        "admin", chosen, Role.ADMIN, actor="demo", now=datetime.now(timezone.utc)
    )
    return chosen


def _start_agents(
    workdir: Path, options: DemoOptions, host: str, port: int, fleet: FleetRepository
) -> list[subprocess.Popen[bytes]]:
    agents = []
    ramp = max(1, int(options.darken_minutes * 60 * options.fps))
    for device_id, line, seed, dark in DEVICES:
        state = workdir / device_id
        state.mkdir()
        drift = f"brightness_end = {dark}\nramp_frames = {ramp}" if dark is not None else ""
        config = state / "agent.toml"
        config.write_text(
            f"""
[device]
id = "{device_id}"
profile = "x86-generic"
line = "{line}"

[source]
url = "synthetic:"
seed = {seed}
size = "640x480"
fps = {options.fps}
defect_rate = 0.1
{drift}

[model]
bundle = "{options.model.resolve()}"

[storage]
state_dir = "{state}"

[fleet]
broker = "{host}:{port}"
root_metadata = "{fleet.metadata_dir / "1.root.json"}"
gate_frames = 60

[telemetry]
window_frames = {options.window_frames}
window_s = 60
check_frames = {options.window_frames}
state_interval_s = 2

[log]
format = "json"
summary_interval_s = 10
""",
            encoding="utf-8",
        )
        with (state / "agent.log").open("ab") as log:
            agents.append(
                subprocess.Popen(
                    [sys.executable, "-m", "edge_agent.cli", "run", "--config", str(config)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,  # Ctrl-C goes to the demo, which stops them
                )
            )
    return agents


def _stop_agents(agents: list[subprocess.Popen[bytes]]) -> None:
    for proc in agents:
        if proc.poll() is None:
            proc.terminate()
    for proc in agents:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _logger(path: Path) -> logging.Logger:
    """Every log line of this process (server, ingest, migrations) goes to ``path``: the
    terminal shows only the demo's own lines."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    return logging.getLogger("fleet_server")


def _printer(out: TextIO) -> Any:
    started = time.monotonic()

    def say(text: str) -> None:
        print(f"[{time.monotonic() - started:6.1f} s] {text}", file=out, flush=True)

    return say
