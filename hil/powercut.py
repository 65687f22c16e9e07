"""Power-cut test of the update path: SIGKILL the agent mid-update, restart, check.

Runs a real Mosquitto, a real ``fleet-server serve`` and a real ``edge-agent run`` (each a
separate process) on loopback. Each run releases and assigns a new model version, waits
for the agent to reach one of the update's phases (download, verified, staged, health
gate, switch), kills it with SIGKILL at a random moment shortly after, restarts it and
checks that:

- the slot store still names an active slot whose bundle verifies, and the agent comes
  back serving frames (not bricked);
- the update then finishes (the new version is activated) or is retried.

Prints ``{"runs": N, "bricked": 0, "finished": ...}`` (more with ``--json``).

Usage: hil/powercut.py --runs N [--json] [--seed S] [--keep DIR] [--gate-crash-loop]
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for tests.mqtt_broker, when run as a script

from edge_agent.bundle import copy_bundle, load_bundle  # noqa: E402
from edge_agent.protocol import topics  # noqa: E402
from edge_agent.protocol.errors import BundleError  # noqa: E402
from edge_agent.protocol.events import EventKind, UpdateEvent, decode_event  # noqa: E402
from edge_agent.transport import MqttTransport  # noqa: E402
from edge_agent.update.slots import SlotStore  # noqa: E402
from tests.mqtt_broker import MosquittoBroker  # noqa: E402

DEVICE = "powercut-1"
PROFILE = "x86-generic"
FACTORY = ROOT / "models" / "reference-onnx"
# The phase whose event arms the kill, and how long after it the kill may come (s).
PHASES: dict[str, tuple[EventKind, float]] = {
    "download": (EventKind.DOWNLOADING, 0.05),
    "verify": (EventKind.VERIFIED, 0.02),
    "stage": (EventKind.STAGED, 0.05),
    "gate": (EventKind.GATE_STARTED, 0.6),
    "switch": (EventKind.GATE_PASSED, 0.01),
}
GATE_MAX_ATTEMPTS = 3
START_TIMEOUT_S = 40.0
FINISH_TIMEOUT_S = 60.0


def bin_path(name: str) -> str:
    """The console script next to this interpreter (the project's venv)."""
    candidate = Path(sys.executable).with_name(name)
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if found is None:
        raise SystemExit(f"powercut: {name} not found next to {sys.executable} or on PATH")
    return found


def fleet(*args: str) -> str:
    done = subprocess.run(
        [bin_path("fleet-server"), *args], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"powercut: fleet-server {' '.join(args)} failed:\n{done.stderr}")
    return done.stdout


@dataclass
class Agent:
    """One ``edge-agent run`` process and the JSON log lines it writes."""

    config: Path
    log: Path
    proc: subprocess.Popen[str] | None = None
    lines: queue.Queue[dict[str, object]] = field(default_factory=queue.Queue)

    def start(self) -> None:
        self.lines = queue.Queue()
        self.proc = subprocess.Popen(
            [bin_path("edge-agent"), "run", "--config", str(self.config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert self.proc.stderr is not None
        threading.Thread(target=self._read, args=(self.proc.stderr,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        with self.log.open("a", encoding="utf-8") as log:
            for line in stream:
                log.write(line)
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict):
                    self.lines.put(record)

    def wait_started(self, timeout_s: float) -> str | None:
        """The model the agent started with, or None if it did not start in time."""
        deadline = time.monotonic() + timeout_s
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                record = self.lines.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                if self.proc is not None and self.proc.poll() is not None:
                    return None
                continue
            if record.get("event") == "started":
                return str(record.get("model"))
        return None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


class Events:
    """The device's update events, as the fleet sees them on the broker."""

    def __init__(self, broker: MosquittoBroker) -> None:
        self._lock = threading.Lock()
        self._events: list[UpdateEvent] = []
        self.transport = MqttTransport(host=broker.host, port=broker.port, client_id="observer")
        self.transport.subscribe(topics.events(DEVICE), self._on_event, qos=1)
        self.transport.start()
        if not self.transport.wait_connected(10):
            raise SystemExit("powercut: cannot connect to the broker")

    def _on_event(self, _topic: str, payload: bytes) -> None:
        with self._lock:
            self._events.append(decode_event(payload))

    def count(self) -> int:
        with self._lock:
            return len(self._events)

    def wait(self, kind: EventKind, target: str, since: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if any(e.event == kind and e.target == target for e in self._events[since:]):
                    return True
            time.sleep(0.005)
        return False


def slot_state(state_dir: Path) -> str | None:
    """The active model version if the slot store is consistent, else None (bricked)."""
    active = SlotStore(state_dir / "update").active()
    if active is None:
        return None
    try:
        load_bundle(active.path)
    except BundleError:
        return None
    return active.model_version


def write_config(work: Path, broker: MosquittoBroker, repo: Path) -> Path:
    config = work / "agent.toml"
    config.write_text(
        f"""
[device]
id = "{DEVICE}"
profile = "{PROFILE}"

[source]
url = "synthetic:"
fps = 30
size = "320x240"
seed = 7

[model]
bundle = "{FACTORY}"

[storage]
state_dir = "{work / "device"}"
evidence_pass_every = 0

[fleet]
broker = "{broker.host}:{broker.port}"
root_metadata = "{repo / "metadata" / "1.root.json"}"
poll_interval_s = 2
gate_frames = 20
gate_timeout_s = 30
gate_max_attempts = {GATE_MAX_ATTEMPTS}

[log]
format = "json"
summary_interval_s = 60
""",
        encoding="utf-8",
    )
    return config


class Plant:
    """Broker, fleet server, event observer and one agent process, in ``work``."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.keys, self.repo = work / "keys", work / "repo"
        self.name = load_bundle(FACTORY).manifest.name
        fleet("keys", "init", "--keys", str(self.keys), "--repo", str(self.repo))
        self.broker = MosquittoBroker()
        self.broker.start()
        self.server = subprocess.Popen(
            [
                bin_path("fleet-server"),
                "serve",
                "--repo",
                str(self.repo),
                "--keys",
                str(self.keys),
                "--broker",
                f"{self.broker.host}:{self.broker.port}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=(work / "fleet-server.log").open("w"),
            start_new_session=True,
        )
        self.events = Events(self.broker)
        self.agent = Agent(write_config(work, self.broker, self.repo), work / "agent.log")
        self.agent.start()
        if self.agent.wait_started(START_TIMEOUT_S) is None:
            self.close()
            raise SystemExit(f"powercut: the agent did not start; see {self.agent.log}")

    def publish(self, version: str) -> tuple[str, int]:
        """Release and assign ``version``; return its target and the event count before."""
        bundle = copy_bundle(FACTORY, self.work / "bundles" / version, version=version)
        keys = ("--repo", str(self.repo), "--keys", str(self.keys))
        fleet("release", str(bundle.path), *keys)
        since = self.events.count()
        fleet("assign", DEVICE, f"{self.name}@{version}", *keys, "--profile", PROFILE)
        shutil.rmtree(bundle.path)
        return f"models/{self.name}-{version}.tar", since

    def restart(self) -> tuple[str | None, str | None]:
        """SIGKILL the agent, look at the slot store, start it again.

        Returns (active version on disk, model the agent started with); None means broken.
        """
        self.agent.kill()
        consistent = slot_state(self.work / "device")
        self.agent.start()
        return consistent, self.agent.wait_started(START_TIMEOUT_S)

    def wait_finished(self, target: str, version: str, since: int) -> bool:
        """True once ``version`` is the active slot and reported, or active for a while.

        An ``activated`` event published just before a SIGKILL may die with the process
        (QoS 1 is queued in the agent); the slot pointer on disk is the ground truth.
        """
        deadline = time.monotonic() + FINISH_TIMEOUT_S
        while time.monotonic() < deadline:
            if slot_state(self.work / "device") == version:
                return True
            if self.events.wait(EventKind.ACTIVATED, target, since, 0.2):
                return slot_state(self.work / "device") == version
        return False

    def close(self) -> None:
        self.agent.stop()
        self.events.transport.stop()
        self.server.terminate()
        self.server.wait(timeout=15)
        self.broker.close()


def run_powercuts(plant: Plant, runs: int, seed: int, progress: bool) -> dict[str, object]:
    rng = random.Random(seed)
    bricked: list[dict[str, object]] = []
    finished = 0
    phases = dict.fromkeys(PHASES, 0)
    started = time.monotonic()
    for index in range(runs):
        version = f"2.0.{index}"
        target, since = plant.publish(version)
        phase = list(PHASES)[index % len(PHASES)]
        kind, spread = PHASES[phase]
        armed = plant.events.wait(kind, target, since, FINISH_TIMEOUT_S)
        time.sleep(rng.uniform(0.0, spread))
        phases[phase] += int(armed)
        consistent, model = plant.restart()
        if consistent is None or model is None:
            bricked.append({"run": index, "phase": phase, "slot": consistent, "model": model})
            plant.restart()
        done = plant.wait_finished(target, version, since)
        finished += int(done)
        if progress:
            print(
                f"run {index + 1}/{runs}: killed after {kind.value} "
                f"({'seen' if armed else 'not seen'}), came back with {model}, "
                f"update {'finished' if done else 'not finished'}",
                file=sys.stderr,
            )
    return {
        "runs": runs,
        "bricked": len(bricked),
        "finished": finished,
        "killed_after_phase": phases,
        "bricked_runs": bricked,
        "seconds": round(time.monotonic() - started, 1),
    }


def run_gate_crash_loop(plant: Plant, attempts: int) -> dict[str, object]:
    """Kill the agent during the health gate of the same candidate, again and again: after
    ``attempts`` (the config's gate_max_attempts) it must roll back and blocklist it."""
    before = slot_state(plant.work / "device")
    target, since = plant.publish("9.9.9")
    crashes = 0
    bricked = 0
    for _ in range(attempts):
        if not plant.events.wait(EventKind.GATE_STARTED, target, since, FINISH_TIMEOUT_S):
            break
        since = plant.events.count()
        consistent, model = plant.restart()
        crashes += 1
        bricked += int(consistent is None or model is None)
    rolled_back = plant.events.wait(EventKind.ROLLED_BACK, target, since, FINISH_TIMEOUT_S)
    return {
        "crashes": crashes,
        "bricked": bricked,
        "rolled_back": rolled_back,
        "active_before": before,
        "active_after": slot_state(plant.work / "device"),
    }


def run(
    runs: int, seed: int, work: Path, progress: bool, gate_crash_loop: bool
) -> dict[str, object]:
    plant = Plant(work)
    try:
        result = run_powercuts(plant, runs, seed, progress)
        if gate_crash_loop:
            result["gate_crash_loop"] = run_gate_crash_loop(plant, GATE_MAX_ATTEMPTS)
    finally:
        plant.close()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Kill the agent with SIGKILL at random moments of an update and check "
        "it always comes back serving a valid model and finishes the update."
    )
    parser.add_argument("--runs", type=int, default=20, help="updates to interrupt (default 20)")
    parser.add_argument("--seed", type=int, default=1, help="random seed for kill moments")
    parser.add_argument("--json", action="store_true", help="print the full result as JSON")
    parser.add_argument("--keep", type=Path, help="work in this directory and keep it")
    parser.add_argument(
        "--gate-crash-loop",
        action="store_true",
        help="afterwards, kill the agent in the health gate of one candidate until it rolls back",
    )
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        result = run(args.runs, args.seed, args.keep, not args.json, args.gate_crash_loop)
    else:
        with tempfile.TemporaryDirectory(prefix="powercut-") as work:
            result = run(args.runs, args.seed, Path(work), not args.json, args.gate_crash_loop)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(json.dumps({k: result[k] for k in ("runs", "bricked", "finished")}))
    loop = result.get("gate_crash_loop")
    loop_ok = not isinstance(loop, dict) or (loop["rolled_back"] and loop["bricked"] == 0)
    return 0 if result["bricked"] == 0 and loop_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
