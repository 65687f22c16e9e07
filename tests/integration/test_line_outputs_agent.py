"""The agent's [outputs]: one MQTT message per verdict to the plant broker and a reject
pulse per fail verdict, from a real `edge-agent run`; bad output config is named."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from edge_agent.cli import main
from tests.integration.agent_proc import Recorder, start_agent, stop_agent
from tests.integration.reference import ONNX_BUNDLE, UNSEEN_SEED
from tests.mqtt_broker import MosquittoBroker, mosquitto_broker  # noqa: F401

TOPIC = "plant/line-3/verdicts"
FRAMES = 240


def _config(tmp: Path, outputs: str) -> Path:
    path = tmp / "agent.toml"
    path.write_text(
        f"""
[device]
id = "cam-outputs"

[source]
url = "synthetic:"
seed = {UNSEEN_SEED}
size = "640x480"
count = {FRAMES}

[model]
bundle = "{ONNX_BUNDLE}"

[storage]
state_dir = "{tmp / "state"}"
evidence_pass_every = 0

[log]
format = "json"

{outputs}
"""
    )
    return path


def _verdicts(state_dir: Path) -> list[tuple[int, str]]:
    with sqlite3.connect(state_dir / "results.db") as conn:
        rows = conn.execute("SELECT frame_id, verdict FROM results ORDER BY frame_id")
        return [(int(f), str(v)) for f, v in rows]


def test_every_verdict_reaches_the_plant_broker_and_fails_pulse_the_reject(
    mosquitto: MosquittoBroker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(
        tmp_path,
        f"""
[outputs.mqtt]
broker = "{mosquitto.host}:{mosquitto.port}"
topic = "{TOPIC}"
qos = 1

[outputs.reject]
chip = "simulated"
line = 17
delay_ms = 5
pulse_ms = 1
""",
    )
    assert main(["check", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "reject      1 ms pulse on line 17 of simulated, 5 ms after capture, on fail" in out
    assert f"verdicts    to {mosquitto.host}:{mosquitto.port} topic '{TOPIC}', QoS 1" in out
    recorder = Recorder(mosquitto, [TOPIC], client_id="plant-scada")
    try:
        log = stop_agent(start_agent(config), signal_it=False)  # the source ends by itself
        recorder.wait(lambda: len(recorder.on(TOPIC)) >= FRAMES, 10)
    finally:
        recorder.close()
    verdicts = _verdicts(tmp_path / "state")
    assert len(verdicts) == FRAMES
    messages = [json.loads(p) for p in recorder.on(TOPIC)]
    assert [(m["frame"], m["outcome"]) for m in messages] == verdicts
    events = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    closed = {e["output"]: e for e in events if e.get("event") == "output_closed"}
    assert set(closed) == {"gpio-reject", "mqtt-verdicts"}
    fails = sum(1 for _, v in verdicts if v == "fail")
    assert fails > 0
    reject = closed["gpio-reject"]
    assert reject["drained"] is True and reject["dropped"] == 0
    assert reject["reject_requested"] == fails
    assert reject["reject_pulses"] + reject["reject_merged"] == fails
    assert closed["mqtt-verdicts"]["delivered"] == FRAMES


@pytest.mark.parametrize(
    ("outputs", "message"),
    [
        pytest.param(
            '[outputs.mqtt]\nbroker = "127.0.0.1:1883"\ntopic = "plant/#"',
            "[outputs] mqtt.topic",
            id="wildcard-topic",
        ),
        pytest.param(
            '[outputs.mqtt]\nbroker = "nowhere"\ntopic = "plant/v"',
            "[outputs] mqtt.broker",
            id="broker-without-port",
        ),
        pytest.param(
            '[outputs.reject]\nchip = "simulated"\nline = 1\noutcomes = []',
            "[outputs] reject.outcomes",
            id="no-outcomes",
        ),
        pytest.param(
            '[outputs.reject]\nchip = "simulated"\nline = 1\npulse_ms = 0',
            "[outputs] reject.pulse_ms",
            id="zero-pulse",
        ),
    ],
)
def test_bad_output_config_names_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], outputs: str, message: str
) -> None:
    config = _config(tmp_path, outputs)
    assert main(["check", "--config", str(config)]) != 0
    captured = capsys.readouterr()
    assert message in captured.out + captured.err


def test_a_missing_gpio_chip_stops_the_agent_with_its_name(tmp_path: Path) -> None:
    config = _config(tmp_path, '[outputs.reject]\nchip = "/dev/gpiochip-none"\nline = 4')
    proc = start_agent(config)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "[outputs.reject]" in stderr and "/dev/gpiochip-none" in stderr
