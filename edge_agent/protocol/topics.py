"""MQTT topic names (v1): the only place topic strings are built or taken apart.

Layout (see ARCHITECTURE.md, "MQTT topics (v1)")::

    edgefleet/v1/devices/{id}/state       retained; the last will says offline
    edgefleet/v1/devices/{id}/telemetry   aggregate windows, QoS 1
    edgefleet/v1/devices/{id}/events      update progress and results
    edgefleet/v1/devices/{id}/fetch       device -> server: metadata and chunk requests
    edgefleet/v1/devices/{id}/data        server -> device: answers
    edgefleet/v1/notify                   retained: new metadata is available

Pure and stdlib-only: imported by the agent, the server and the broker ACL generator.
"""

from __future__ import annotations

import re
from typing import Final, Literal, get_args

Kind = Literal["state", "telemetry", "events", "fetch", "data"]
KINDS: Final[tuple[Kind, ...]] = get_args(Kind)

PREFIX: Final = "edgefleet/v1/"
NOTIFY: Final = PREFIX + "notify"

_DEVICES: Final = PREFIX + "devices/"
# Same rule as the device config model. fullmatch, not `$`: Python's `$` also matches
# before a trailing newline, which would let "dev\n" through.
_DEVICE_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def validate_device_id(device_id: str) -> str:
    """Return `device_id` unchanged if it may appear in a topic.

    Raises:
        ValueError: not 1-64 characters of ``A-Z a-z 0-9 . _ -`` starting with a letter or
            digit (so never ``/``, ``+``, ``#``, empty, or a leading ``.``).
    """
    if not isinstance(device_id, str) or _DEVICE_ID.fullmatch(device_id) is None:
        raise ValueError(f"invalid device id: {device_id!r}")
    return device_id


def _device_topic(device_id: str, kind: Kind) -> str:
    return f"{_DEVICES}{validate_device_id(device_id)}/{kind}"


def state(device_id: str) -> str:
    """Retained online/offline state of one device (also its last-will topic)."""
    return _device_topic(device_id, "state")


def telemetry(device_id: str) -> str:
    """Aggregate telemetry windows published by one device."""
    return _device_topic(device_id, "telemetry")


def events(device_id: str) -> str:
    """Update progress and results published by one device."""
    return _device_topic(device_id, "events")


def fetch(device_id: str) -> str:
    """Metadata and chunk requests from one device to the server."""
    return _device_topic(device_id, "fetch")


def data(device_id: str) -> str:
    """Answers from the server to one device."""
    return _device_topic(device_id, "data")


def device_filter(kind: Kind) -> str:
    """Subscription filter matching `kind` for every device, e.g. for the server's ingest.

    Raises:
        ValueError: `kind` is not one of `KINDS`.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown topic kind: {kind!r}")
    return f"{_DEVICES}+/{kind}"


def parse(topic: str) -> tuple[str, Kind] | None:
    """Split a per-device topic into ``(device_id, kind)``.

    Returns None for anything else: `NOTIFY`, foreign prefixes, unknown kinds, extra
    levels, wildcards or an invalid device id. Never raises.
    """
    if not topic.startswith(_DEVICES):
        return None
    parts = topic[len(_DEVICES) :].split("/")
    if len(parts) != 2:
        return None
    device_id, kind = parts
    if _DEVICE_ID.fullmatch(device_id) is None:
        return None
    for known in KINDS:
        if kind == known:
            return device_id, known
    return None
