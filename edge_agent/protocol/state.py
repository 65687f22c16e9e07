"""The retained device state on ``devices/{id}/state``: compact JSON, one schema.

``{"v": 1, "status": "online", "ts": <unix s>, "model": "name@version", "edge": "0.1.0",
"profile": "rpi4", "line": "line-3", "drift": ["brightness", ...],
"spool": {"queued": 3, "dropped": 0}}``; only ``v`` and ``status`` are always present.
The broker publishes ``{"v":1,"status":"offline"}`` as the device's last will.

``drift`` names the features (or ``defect_rate``) the device's own drift check is
alarming on; ``spool`` counts telemetry windows waiting for the broker and dropped from
a full spool. Nothing here describes a frame.

Pure and stdlib-only; ``decode_state`` raises only ``ValueError``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from edge_agent.protocol.wire import load_document, text_field

VERSION: Final = 1
MAX_STATE_BYTES: Final = 1024
_MAX_DRIFT: Final = 16
_KEYS: Final = frozenset(
    ("v", "status", "ts", "model", "edge", "profile", "line", "drift", "spool")
)


class Status(StrEnum):
    ONLINE = "online"
    OFFLINE = "offline"


@dataclass(frozen=True, slots=True)
class DeviceState:
    status: Status
    ts: int | None = None
    model: str | None = None
    edge: str | None = None
    profile: str | None = None
    line: str | None = None
    drift: tuple[str, ...] = ()
    spool_queued: int | None = None
    spool_dropped: int | None = None


OFFLINE: Final = DeviceState(Status.OFFLINE)


def encode_state(state: DeviceState) -> bytes:
    """Compact JSON bytes.

    Raises:
        ValueError: a text over 96 characters, more than 16 drift names, or over
            MAX_STATE_BYTES.
    """
    document: dict[str, object] = {"v": VERSION, "status": state.status.value}
    if state.ts is not None:
        document["ts"] = state.ts
    for key, value in (
        ("model", state.model),
        ("edge", state.edge),
        ("profile", state.profile),
        ("line", state.line),
    ):
        if value is not None:
            document[key] = text_field(value, key)
    if state.drift:
        if len(state.drift) > _MAX_DRIFT:
            raise ValueError(f"at most {_MAX_DRIFT} drift names")
        document["drift"] = [text_field(name, "drift") for name in state.drift]
    if state.spool_queued is not None or state.spool_dropped is not None:
        document["spool"] = {
            "queued": state.spool_queued or 0,
            "dropped": state.spool_dropped or 0,
        }
    payload = json.dumps(document, separators=(",", ":")).encode()
    if len(payload) > MAX_STATE_BYTES:
        raise ValueError(f"state of {len(payload)} bytes is over {MAX_STATE_BYTES}")
    return payload


def decode_state(payload: bytes) -> DeviceState:
    """Parse and validate a state message (server side and the privacy test).

    Raises:
        ValueError: oversize, not JSON, unknown keys, wrong types.
    """
    document = load_document(
        payload, what="state", max_bytes=MAX_STATE_BYTES, keys=_KEYS, version=VERSION
    )
    status = Status(str(document.get("status")))
    ts = document.get("ts")
    if ts is not None and (type(ts) is not int or ts < 0):
        raise ValueError("ts must be a non-negative integer")
    texts = {
        k: None if document.get(k) is None else text_field(document.get(k), k)
        for k in ("model", "edge", "profile", "line")
    }
    drift = document.get("drift", [])
    if not isinstance(drift, list) or len(drift) > _MAX_DRIFT:
        raise ValueError(f"drift must be a list of at most {_MAX_DRIFT} names")
    spool = document.get("spool")
    queued = dropped = None
    if spool is not None:
        if not isinstance(spool, dict) or set(spool) != {"queued", "dropped"}:
            raise ValueError("spool must be {queued, dropped}")
        queued, dropped = spool["queued"], spool["dropped"]
        if type(queued) is not int or type(dropped) is not int or min(queued, dropped) < 0:
            raise ValueError("spool counts must be non-negative integers")
    return DeviceState(
        status=status,
        ts=ts,
        model=texts["model"],
        edge=texts["edge"],
        profile=texts["profile"],
        line=texts["line"],
        drift=tuple(text_field(name, "drift") for name in drift),
        spool_queued=queued,
        spool_dropped=dropped,
    )
