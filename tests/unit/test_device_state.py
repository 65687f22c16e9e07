"""The retained device state message (edge_agent.protocol.state)."""

from __future__ import annotations

import json

import pytest

from edge_agent.protocol.state import (
    MAX_STATE_BYTES,
    OFFLINE,
    DeviceState,
    Status,
    decode_state,
    encode_state,
)


def test_round_trip() -> None:
    state = DeviceState(
        Status.ONLINE,
        ts=1_800_000_000,
        model="reference-onnx@1.0.0",
        edge="0.1.0",
        profile="rpi5",
        line="line-3",
        drift=("brightness", "defect_rate"),
        spool_queued=4,
        spool_dropped=1,
    )
    payload = encode_state(state)
    assert decode_state(payload) == state
    assert b" " not in payload


def test_offline_will_is_minimal() -> None:
    assert encode_state(OFFLINE) == b'{"v":1,"status":"offline"}'
    assert decode_state(encode_state(OFFLINE)) == OFFLINE


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        pytest.param(lambda d: d.update(frame=1), "unknown keys in state: frame", id="extra"),
        pytest.param(lambda d: d.update(status="asleep"), "asleep", id="status"),
        pytest.param(lambda d: d.update(v=0), "unsupported state version", id="version"),
        pytest.param(lambda d: d.update(ts=-5), "ts must be", id="ts"),
        pytest.param(lambda d: d.update(model=7), "model must be", id="model-type"),
        pytest.param(lambda d: d.update(drift=["x"] * 17), "at most 16", id="drift-long"),
        pytest.param(lambda d: d.update(spool={"queued": 1}), "spool must be", id="spool"),
        pytest.param(
            lambda d: d.update(spool={"queued": -1, "dropped": 0}), "non-negative", id="neg"
        ),
    ],
)
def test_decode_rejects_malformed_state(edit: object, message: str) -> None:
    document = json.loads(encode_state(DeviceState(Status.ONLINE, ts=1, model="m@1")))
    assert callable(edit)
    edit(document)
    with pytest.raises(ValueError, match=message):
        decode_state(json.dumps(document).encode())


def test_limits() -> None:
    with pytest.raises(ValueError, match=r"1\.\.96 characters"):
        encode_state(DeviceState(Status.ONLINE, line="x" * 97))
    with pytest.raises(ValueError, match="over 1024"):
        decode_state(b" " * (MAX_STATE_BYTES + 1))
