"""A real `edge-agent run` with the local REST API, OPC UA and a separate metrics address:
files dropped into its hot folder are inspected, and every surface tells the same story
as results.db; an asyncua client reads and subscribes to the documented variables."""

from __future__ import annotations

import asyncio
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
from asyncua.client.client import Client
from asyncua.ua.uaerrors import UaError
from prometheus_client.parser import text_string_to_metric_families

from edge_agent.core.synthetic import LineConditions
from edge_agent.sources.synthetic import jpeg_frames
from tests.fleet_simulator import wait_for
from tests.integration.agent_proc import start_agent, stop_agent
from tests.integration.reference import ONNX_BUNDLE, UNSEEN_SEED
from tests.mqtt_broker import free_port

TOKEN = "line-3-controller-token"
FILES = 24
NAMESPACE = "urn:edgefleet:edge-agent"


def _config(tmp: Path, rest: int, opcua: int, metrics: int) -> Path:
    (tmp / "inbox").mkdir()
    (tmp / "api.token").write_text(TOKEN + "\n")
    path = tmp / "agent.toml"
    path.write_text(
        f"""
[device]
id = "cam-rest"

[source]
url = "folder:{tmp / "inbox"}"
settle_s = 0.05

[model]
bundle = "{ONNX_BUNDLE}"

[storage]
state_dir = "{tmp / "state"}"
evidence_pass_every = 1

[log]
format = "json"

[outputs.rest]
listen = "127.0.0.1:{rest}"
token_file = "api.token"
results_limit = 10

[outputs.opcua]
listen = "127.0.0.1:{opcua}"

[metrics]
listen = "127.0.0.1:{metrics}"
"""
    )
    return path


def _rows(state: Path) -> list[tuple[int, int, str]]:
    with sqlite3.connect(state / "results.db") as conn:
        rows = conn.execute("SELECT id, frame_id, verdict FROM results ORDER BY id")
        return [(int(i), int(f), str(v)) for i, f, v in rows]


def _counts(metrics_text: str) -> dict[str, float]:
    return {
        s.labels["outcome"]: s.value
        for family in text_string_to_metric_families(metrics_text)
        for s in family.samples
        if s.name == "edgefleet_agent_verdicts_total"
    }


class _Changes:
    def __init__(self) -> None:
        self.frame_ids: list[int] = []

    def datachange_notification(self, _node: Any, value: Any, _data: Any) -> None:
        self.frame_ids.append(int(value))


async def _opcua_session(endpoint: str, inbox: Path, state: Path) -> dict[str, Any]:
    """Connect (the server builds its address space after the line starts), subscribe to
    the frame id, drop the files, wait for the line, then read every variable."""
    for _ in range(300):
        try:
            client = Client(endpoint, timeout=5)
            await client.connect()
            break
        except (OSError, asyncio.TimeoutError, UaError):
            await asyncio.sleep(0.1)
    else:
        raise AssertionError(f"no OPC UA server at {endpoint}")
    try:
        idx = await client.get_namespace_index(NAMESPACE)
        changes = _Changes()
        subscription = await client.create_subscription(20, changes)
        await subscription.subscribe_data_change(
            client.get_node(f"ns={idx};s=EdgeAgent.LastVerdict.FrameId")
        )
        images = jpeg_frames(UNSEEN_SEED, FILES, (320, 240), LineConditions(defect_rate=0.5))
        for i, data in enumerate(images):
            (inbox / f".{i:03d}.tmp").write_bytes(data)
            (inbox / f".{i:03d}.tmp").rename(inbox / f"{i:03d}.jpg")
        total = client.get_node(f"ns={idx};s=EdgeAgent.Counters.Total")
        for _ in range(600):
            if await total.read_value() == FILES:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # one more publishing interval for the subscription
        # Browse by name too: the documented path, not only the node ids.
        outcome = await client.nodes.objects.get_child(
            [f"{idx}:EdgeAgent", f"{idx}:LastVerdict", f"{idx}:Outcome"]
        )
        values = {"Outcome": await outcome.read_value(), "changes": changes.frame_ids}
        for name in (
            "LastVerdict.FrameId",
            "LastVerdict.Label",
            "LastVerdict.PDefect",
            "LastVerdict.Timestamp",
            "Counters.Pass",
            "Counters.Fail",
            "Counters.Uncertain",
            "Counters.Error",
            "Counters.Total",
            "Model",
            "Drifting",
        ):
            values[name] = await client.get_node(f"ns={idx};s=EdgeAgent.{name}").read_value()
        return values
    finally:
        await client.disconnect()


def test_rest_opcua_and_metrics_agree_with_results_db(tmp_path: Path, sample_jpeg: bytes) -> None:
    rest, opcua, metrics = free_port(), free_port(), free_port()
    proc = start_agent(_config(tmp_path, rest, opcua, metrics))
    state = tmp_path / "state"
    auth = {"authorization": f"Bearer {TOKEN}"}
    try:
        http = httpx.Client(base_url=f"http://127.0.0.1:{rest}", headers=auth, timeout=30)

        def up() -> bool:
            try:
                return bool(http.get("/v1/status").json()["model"])
            except httpx.TransportError:
                return False

        assert wait_for(up, 60), "the REST API did not come up"
        assert http.get("/v1/status", headers={"authorization": ""}).status_code == 401
        values = asyncio.run(
            _opcua_session(f"opc.tcp://127.0.0.1:{opcua}/edgefleet/", tmp_path / "inbox", state)
        )
        assert wait_for(lambda: len(_rows(state)) == FILES, 30)
        rows = _rows(state)

        status = http.get("/v1/status").json()
        assert status["model"] == "reference-onnx@1.0.0"
        assert status["runtime"] == "onnxruntime"
        assert status["counters"]["inspected"] == FILES
        verdicts = status["counters"]["verdicts"]
        assert sum(verdicts.values()) == FILES
        assert verdicts["fail"] == sum(1 for *_, v in rows if v == "fail") > 0
        assert status["update"]["state"] == "off"
        assert status["drift"]["drifting"] is False
        assert "opcua" in status["outputs"]

        # Newest first page is bounded by results_limit; since= pages forward.
        page = http.get("/v1/results").json()
        assert [r["id"] for r in page["results"]] == [i for i, *_ in rows[-10:]]
        first = http.get("/v1/results", params={"since": 0}).json()
        assert [r["id"] for r in first["results"]] == [i for i, *_ in rows[:10]]
        after = http.get("/v1/results", params={"since": first["next_since"]}).json()
        assert [r["id"] for r in after["results"]] == [i for i, *_ in rows[10:20]]

        linked = next(r for r in first["results"] if r["evidence"])
        image = http.get(linked["evidence"])
        assert image.status_code == 200 and image.content[:2] == b"\xff\xd8"
        assert http.get("/v1/evidence/999999").status_code == 404

        jpeg = {"content-type": "image/jpeg"}
        answer = http.post("/v1/inspect", content=sample_jpeg, headers=jpeg).json()
        assert answer["outcome"] in ("pass", "fail", "uncertain")
        assert answer["model"] == "reference-onnx@1.0.0"
        broken = http.post("/v1/inspect", content=sample_jpeg[:200], headers=jpeg)
        assert broken.status_code == 200 and broken.json()["outcome"] == "error"
        assert len(_rows(state)) == FILES  # API inspections are not line results

        on_rest = _counts(http.get("/metrics").text)
        on_own = _counts(httpx.get(f"http://127.0.0.1:{metrics}/metrics").text)
        assert on_rest == on_own == {k: float(v) for k, v in verdicts.items()}
        http.close()
    finally:
        log = stop_agent(proc)

    _, last_frame, last_outcome = rows[-1]
    assert values["LastVerdict.FrameId"] == last_frame
    assert values["Outcome"] == last_outcome
    assert values["Counters.Total"] == FILES
    assert values["Counters.Fail"] == verdicts["fail"]
    assert values["Counters.Pass"] == verdicts["pass"]
    assert values["Model"] == "reference-onnx@1.0.0"
    assert values["Drifting"] is False
    assert 0.0 <= values["LastVerdict.PDefect"] <= 1.0
    assert values["changes"] and values["changes"][-1] == last_frame
    assert '"event": "rest_listening"' in log and '"event": "opcua_listening"' in log


def test_a_busy_rest_port_stops_the_agent_with_its_address(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = _config(tmp_path, port, free_port(), free_port())
        command = [sys.executable, "-m", "edge_agent.cli", "run", "--config", str(config)]
        proc = subprocess.run(command, check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"[outputs.rest] cannot listen on 127.0.0.1:{port}" in proc.stderr
