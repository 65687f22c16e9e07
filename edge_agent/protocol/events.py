"""Update events a device publishes on ``devices/{id}/events``: compact JSON, one schema.

``{"v": 1, "event": "<kind>", "ts": <unix s>, "target": "models/...", "sha256": "<hex>",
"percent": <0..100>, "reason": "<Reason>", "detail": "<sentence>", "figures": {...}}``;
only ``v``, ``event`` and ``ts`` are always present. ``figures`` holds the health gate's
measured numbers (names to finite numbers). Nothing in an event describes a frame.

Pure and stdlib-only; ``decode_event`` raises only ``ValueError``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final

from edge_agent.protocol.wire import load_document

VERSION: Final = 1
MAX_EVENT_BYTES: Final = 2048
MAX_DETAIL_CHARS: Final = 400


class EventKind(StrEnum):
    CHECKING = "checking"
    DOWNLOADING = "downloading"
    VERIFIED = "verified"
    STAGED = "staged"
    GATE_STARTED = "gate_started"
    GATE_PASSED = "gate_passed"
    GATE_FAILED = "gate_failed"
    ACTIVATED = "activated"
    ROLLED_BACK = "rolled_back"
    REFUSED = "refused"
    FAILED = "failed"  # retryable: transport, too slow (the download resumes later)


_KEYS: Final = frozenset(
    {"v", "event", "ts", "target", "sha256", "percent", "reason", "detail", "figures"}
)


@dataclass(frozen=True, slots=True)
class UpdateEvent:
    event: EventKind
    ts: float
    target: str | None = None
    sha256: str | None = None
    percent: int | None = None
    reason: str | None = None
    detail: str | None = None
    figures: dict[str, float] = field(default_factory=dict)


def encode_event(event: UpdateEvent) -> bytes:
    """Compact JSON bytes; ``detail`` is cut to MAX_DETAIL_CHARS.

    Raises:
        ValueError: a figure is not finite, or the result is over MAX_EVENT_BYTES.
    """
    document: dict[str, object] = {"v": VERSION, "event": event.event.value, "ts": event.ts}
    for key, value in (
        ("target", event.target),
        ("sha256", event.sha256),
        ("percent", event.percent),
        ("reason", event.reason),
        ("detail", None if event.detail is None else event.detail[:MAX_DETAIL_CHARS]),
    ):
        if value is not None:
            document[key] = value
    if event.figures:
        if not all(math.isfinite(v) for v in event.figures.values()):
            raise ValueError(f"figures must be finite: {event.figures}")
        document["figures"] = {k: round(v, 6) for k, v in sorted(event.figures.items())}
    payload = json.dumps(document, separators=(",", ":"), allow_nan=False).encode()
    if len(payload) > MAX_EVENT_BYTES:
        raise ValueError(f"event of {len(payload)} bytes is over {MAX_EVENT_BYTES}")
    return payload


def decode_event(payload: bytes) -> UpdateEvent:
    """Parse and validate an event (the server side and the privacy test use this).

    Raises:
        ValueError: oversize, not JSON, unknown keys or event kind, wrong types.
    """
    # Any: every field is checked below, one by one.
    document: dict[str, Any] = load_document(
        payload, what="event", max_bytes=MAX_EVENT_BYTES, keys=_KEYS, version=VERSION
    )
    kind = EventKind(document["event"])
    ts = document["ts"]
    if not isinstance(ts, int | float) or isinstance(ts, bool):
        raise ValueError("ts must be a number")
    strings = {k: document.get(k) for k in ("target", "sha256", "reason", "detail")}
    for key, value in strings.items():
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{key} must be a string")
    percent = document.get("percent")
    if percent is not None and (type(percent) is not int or not 0 <= percent <= 100):
        raise ValueError("percent must be an integer 0..100")
    raw_figures = document.get("figures", {})
    if not isinstance(raw_figures, dict):
        raise ValueError("figures must be an object")
    figures: dict[str, float] = {}
    for name, value in raw_figures.items():
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ValueError(f"figure {name!r} must be a number")
        figures[str(name)] = float(value)
    return UpdateEvent(
        event=kind,
        ts=float(ts),
        target=strings["target"],
        sha256=strings["sha256"],
        percent=percent,
        reason=strings["reason"],
        detail=strings["detail"],
        figures=figures,
    )
