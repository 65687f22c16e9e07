"""Line-output benchmarks: what the outputs cost the line, and how fast they answer.

- ``outputs_ratio``: frames/s of a real ``edge-agent run`` with every output on (REST API
  polled by a client for /v1/status and /v1/results, local MQTT verdicts to a real
  Mosquitto with a subscriber, a simulated GPIO reject, OPC UA with a subscribed client)
  divided by frames/s with none, in one run, alternating on and off. Throughput is
  counted from results.db over a fixed window after every client is connected (capture
  times of the committed rows), so start-up and shut-down do not count.
- ``inspect_p50_ms``, ``inspect_p99_ms``: ``POST /v1/inspect`` of one JPEG, measured by
  the client (keep-alive), against an idle agent; ``inspect_overhead_p99_ms`` is that p99
  minus the p99 of the same image inspected in this process the way ``edge-agent infer``
  does (``Inspector.inspect_bytes``, same runtime options), alternating request by request.
- ``reject_p99_ms``: capture time of a fail frame to the start of its pulse on a
  simulated reject line (``delay_ms = 0``), in this process with the agent's own builders
  (``open_outputs``, ``Pipeline``) and the MQTT verdicts on, a paced synthetic line.

Usage: scripts/bench_outputs.py [--rounds R] [--window S] [--requests N]
       [--reject-frames N] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import logging
import math
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for tests.mqtt_broker, when run as a script

import httpx  # noqa: E402
import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from edge_agent.config import MqttOutputSection, OutputsSection, RejectSection  # noqa: E402
from edge_agent.core.synthetic import LineConditions  # noqa: E402
from edge_agent.inspect import Inspector  # noqa: E402
from edge_agent.line_outputs import open_outputs  # noqa: E402
from edge_agent.pipeline import Pipeline  # noqa: E402
from edge_agent.runtimes import RuntimeOptions  # noqa: E402
from edge_agent.sinks.gpio import SimulatedRejectLine  # noqa: E402
from edge_agent.sources.synthetic import SyntheticLine, jpeg_frames  # noqa: E402
from tests.mqtt_broker import MosquittoBroker, free_port  # noqa: E402

MODEL = ROOT / "models" / "reference-onnx"
TOPIC = "plant/bench/verdicts"
SEED = 424242
READY_TIMEOUT_S = 60.0


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) by nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


# -- throughput with outputs on and off ---------------------------------------------------


def agent_config(work: Path, broker: MosquittoBroker | None, ports: tuple[int, int]) -> Path:
    """A synthetic line as fast as it renders; all outputs on when ``broker`` is given."""
    outputs = ""
    if broker is not None:
        outputs = f"""
[outputs.rest]
listen = "127.0.0.1:{ports[0]}"

[outputs.opcua]
listen = "127.0.0.1:{ports[1]}"

[outputs.mqtt]
broker = "{broker.host}:{broker.port}"
topic = "{TOPIC}"

[outputs.reject]
chip = "simulated"
line = 7
delay_ms = 20
pulse_ms = 5
"""
    path = work / "agent.toml"
    path.write_text(
        f"""
[device]
id = "bench-outputs"

[source]
url = "synthetic:"
seed = {SEED}
size = "640x480"
defect_rate = 0.2

[model]
bundle = "{MODEL}"

[storage]
state_dir = "{work / "state"}"
evidence_pass_every = 0

[telemetry]
enabled = false

[log]
format = "json"
level = "warning"
{outputs}
"""
    )
    return path


def committed(state_dir: Path, since: float = 0.0, until: float = math.inf) -> int:
    db = state_dir / "results.db"
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            sql = "SELECT count(*) FROM results WHERE ts >= ? AND ts < ?"
            return int(conn.execute(sql, (since, min(until, 1e12))).fetchone()[0])
    except sqlite3.OperationalError:
        return 0  # the schema is being created


def wait_until(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


@dataclass
class Clients:
    """The plant's side while the outputs are on; counts what each received."""

    rest_polls: int = 0
    mqtt_messages: int = 0
    opcua_changes: int = 0
    stop: threading.Event = field(default_factory=threading.Event)


def poll_rest(base: str, clients: Clients, interval_s: float) -> None:
    with httpx.Client(base_url=base, timeout=10.0) as http:
        since = None
        while not clients.stop.is_set():
            http.get("/v1/status").raise_for_status()
            params: dict[str, float] = {} if since is None else {"since": since}
            answer = http.get("/v1/results", params=params)
            answer.raise_for_status()
            since = answer.json()["next_since"]
            clients.rest_polls += 1
            clients.stop.wait(interval_s)


def subscribe_opcua(endpoint: str, clients: Clients, ready: threading.Event) -> None:
    from asyncua.client.client import Client
    from asyncua.ua.uaerrors import UaError

    class Handler:
        def datachange_notification(self, _node: Any, _value: Any, _data: Any) -> None:
            clients.opcua_changes += 1

    async def run() -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:  # the agent's server builds its address space after the line starts
            try:
                client = Client(endpoint, timeout=5)
                await client.connect()
                break
            except (OSError, asyncio.TimeoutError, UaError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
        try:
            idx = await client.get_namespace_index("urn:edgefleet:edge-agent")
            nodes = [
                client.get_node(f"ns={idx};s=EdgeAgent.LastVerdict.{name}")
                for name in ("FrameId", "Outcome", "PDefect")
            ]
            subscription = await client.create_subscription(50, Handler())
            await subscription.subscribe_data_change(nodes)
            ready.set()
            while not clients.stop.is_set():
                await asyncio.sleep(0.05)
        finally:
            await client.disconnect()

    asyncio.run(run())


@contextmanager
def mqtt_subscriber(broker: MosquittoBroker, clients: Clients) -> Iterator[None]:
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="scada")
    subscribed = threading.Event()

    def on_message(_c: mqtt.Client, _u: object, _m: mqtt.MQTTMessage) -> None:
        clients.mqtt_messages += 1

    client.on_connect = lambda c, _u, _f, _rc, _p: c.subscribe(TOPIC, 0)
    client.on_subscribe = lambda _c, _u, _m, _rc, _p: subscribed.set()
    client.on_message = on_message
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        if not subscribed.wait(10):
            raise RuntimeError("the MQTT subscriber could not subscribe")
        yield
    finally:
        client.disconnect()
        client.loop_stop()


def run_line(broker: MosquittoBroker | None, window_s: float, poll_s: float) -> dict[str, float]:
    """One agent run; frames/s over ``window_s`` once the line and its clients are up."""
    with tempfile.TemporaryDirectory(prefix="bench-outputs-") as tmp:
        work = Path(tmp)
        ports = (free_port(), free_port())
        config = agent_config(work, broker, ports)
        clients = Clients()
        threads: list[threading.Thread] = []
        proc = subprocess.Popen(
            [sys.executable, "-m", "edge_agent.cli", "run", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            wait_until(lambda: committed(work / "state") > 0, READY_TIMEOUT_S, "the line")
            if broker is not None:
                ready = threading.Event()
                endpoint = f"opc.tcp://127.0.0.1:{ports[1]}/edgefleet/"
                threads = [
                    threading.Thread(
                        target=poll_rest, args=(f"http://127.0.0.1:{ports[0]}", clients, poll_s)
                    ),
                    threading.Thread(target=subscribe_opcua, args=(endpoint, clients, ready)),
                ]
                with mqtt_subscriber(broker, clients):
                    for t in threads:
                        t.start()
                    wait_until(ready.is_set, READY_TIMEOUT_S, "the OPC UA subscription")
                    fps = measure(work / "state", window_s)
            else:
                fps = measure(work / "state", window_s)
        finally:
            clients.stop.set()
            for t in threads:
                t.join(timeout=10)
            proc.send_signal(signal.SIGTERM)
            _, stderr = proc.communicate(timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"agent exited {proc.returncode}: {stderr[-2000:]}")
        return {
            "fps": fps,
            "rest_polls": clients.rest_polls,
            "mqtt_messages": clients.mqtt_messages,
            "opcua_changes": clients.opcua_changes,
        }


def measure(state_dir: Path, window_s: float) -> float:
    time.sleep(0.5)  # settle: the clients' first requests are not the steady state
    t0 = time.time()
    time.sleep(window_s)
    t1 = time.time()
    # Rows are committed in small batches; wait for the window's last ones.
    time.sleep(0.5)
    return committed(state_dir, t0, t1) / (t1 - t0)


# -- POST /v1/inspect vs in-process inspection --------------------------------------------


def inspect_latency(requests: int) -> dict[str, float]:
    image = jpeg_frames(SEED, 1, (640, 480), LineConditions(defect_rate=1.0))[0]
    with tempfile.TemporaryDirectory(prefix="bench-inspect-") as tmp:
        work = Path(tmp)
        (work / "inbox").mkdir()
        port = free_port()
        config = work / "agent.toml"
        config.write_text(
            f"""
[device]
id = "bench-inspect"

[source]
url = "folder:{work / "inbox"}"

[model]
bundle = "{MODEL}"

[storage]
state_dir = "{work / "state"}"

[telemetry]
enabled = false

[log]
level = "warning"

[outputs.rest]
listen = "127.0.0.1:{port}"
"""
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "edge_agent.cli", "run", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        local = Inspector.open(MODEL, RuntimeOptions(threads=1))  # the profile's options
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30.0) as http:

                def model_ready() -> bool:
                    try:
                        return bool(http.get("/v1/status").json()["model"])
                    except httpx.TransportError:
                        return False

                wait_until(model_ready, READY_TIMEOUT_S, "the REST API")
                headers = {"content-type": "image/jpeg"}
                for _ in range(5):  # warm both sides up
                    http.post("/v1/inspect", content=image, headers=headers).raise_for_status()
                    local.inspect_bytes(image)
                rest_ms, local_ms = [], []
                for _ in range(requests):
                    started = time.perf_counter()
                    answer = http.post("/v1/inspect", content=image, headers=headers)
                    rest_ms.append((time.perf_counter() - started) * 1000.0)
                    answer.raise_for_status()
                    started = time.perf_counter()
                    local.inspect_bytes(image)
                    local_ms.append((time.perf_counter() - started) * 1000.0)
        finally:
            local.close()
            proc.send_signal(signal.SIGTERM)
            _, stderr = proc.communicate(timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"agent exited {proc.returncode}: {stderr[-2000:]}")
    return {
        "inspect_p50_ms": percentile(rest_ms, 0.5),
        "inspect_p99_ms": percentile(rest_ms, 0.99),
        "local_p50_ms": percentile(local_ms, 0.5),
        "local_p99_ms": percentile(local_ms, 0.99),
        "inspect_overhead_p99_ms": percentile(rest_ms, 0.99) - percentile(local_ms, 0.99),
    }


# -- capture to reject pulse --------------------------------------------------------------


def reject_latency(broker: MosquittoBroker, frames: int, fps: float) -> dict[str, float]:
    """Capture of each fail frame to the start of the next pulse, on the monotonic clock."""
    section = OutputsSection(
        reject=RejectSection(chip="simulated", line=7, delay_ms=0.0, pulse_ms=1.0),
        mqtt=MqttOutputSection(broker=f"{broker.host}:{broker.port}", topic=TOPIC),
    )
    outputs = open_outputs(section, "bench-reject")
    assert outputs is not None and outputs.reject is not None
    line = outputs.reject.line
    assert isinstance(line, SimulatedRejectLine)
    inspector = Inspector.open(MODEL, RuntimeOptions(threads=1))
    source = SyntheticLine(
        seed=SEED,
        size=(640, 480),
        conditions=LineConditions(defect_rate=0.3),
        fps=fps,
        count=frames,
        encode_jpeg=True,
    )
    captures: list[float] = []
    wall_minus_mono = time.time() - time.monotonic()
    try:
        for item in Pipeline(inspector, decode_workers=2, drop_oldest=True).run(source):
            outputs.offer_inspection(item)  # first, as in the agent's loop
            if item.verdict.outcome.value == "fail":
                # The wall-clock capture stamp on the monotonic clock, as the scheduler does.
                captures.append(item.frame.timestamp - wall_minus_mono)
    finally:
        outputs.close()
        inspector.close()
    starts = [start for start, _ in line.pulses()]
    latencies = []
    for captured in captures:
        i = bisect.bisect_left(starts, captured)
        if i < len(starts):
            latencies.append((starts[i] - captured) * 1000.0)
    if not latencies:
        raise RuntimeError("no fail verdict was pulsed")
    return {
        "reject_p50_ms": percentile(latencies, 0.5),
        "reject_p99_ms": percentile(latencies, 0.99),
        "reject_pulses": float(len(starts)),
        "reject_fails": float(len(captures)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="on/off pairs (default 2)")
    parser.add_argument("--window", type=float, default=5.0, help="seconds counted per run")
    parser.add_argument("--poll", type=float, default=0.1, help="REST poll interval, s")
    parser.add_argument("--requests", type=int, default=300, help="POST /v1/inspect count")
    parser.add_argument("--reject-frames", type=int, default=500, help="frames, reject part")
    parser.add_argument("--reject-fps", type=float, default=50.0, help="pace, reject part")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    # asyncua's client logs session and subscription details as warnings.
    logging.getLogger("asyncua").setLevel(logging.ERROR)
    with MosquittoBroker() as broker:
        on: list[float] = []
        off: list[float] = []
        runs: list[dict[str, Any]] = []
        for r in range(args.rounds):
            for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
                run = run_line(broker if mode == "on" else None, args.window, args.poll)
                (on if mode == "on" else off).append(run["fps"])
                runs.append({"mode": mode, **run})
        result: dict[str, Any] = {
            "outputs_ratio": statistics.median(on) / statistics.median(off),
            "fps_on": statistics.median(on),
            "fps_off": statistics.median(off),
        }
        result.update(inspect_latency(args.requests))
        result.update(reject_latency(broker, args.reject_frames, args.reject_fps))
    result["runs"] = runs
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            if key != "runs":
                print(f"{key:26s} {value:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
