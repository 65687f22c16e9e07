"""The update path's own small persistent state, one JSON file written atomically.

- ``counters``: the highest release counter installed per model name (never lowered).
- ``blocklist``: sha256 -> reason, for bundles that failed the gate or crashed it.
- ``pending``: the candidate being gated and how many times the agent started a gate for
  it; a crash during the gate leaves the count raised, so a crash loop ends in a rollback.
- ``time_floor``: the latest time the device has trusted. Expiry checks use
  ``max(wall clock, floor)``, so setting the clock backwards cannot revive expired
  metadata.

A missing file is a fresh device. A corrupt one is kept aside (``.corrupt``) and replaced
by a fresh state, except that the time floor then starts at the file's mtime.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edge_agent.durable import write_atomic

log = logging.getLogger("edge_agent.update")

MAX_BLOCKLIST = 256


@dataclass(slots=True)
class Pending:
    sha256: str
    target: str
    attempts: int = 0


@dataclass(slots=True)
class UpdateState:
    counters: dict[str, int] = field(default_factory=dict)
    blocklist: dict[str, str] = field(default_factory=dict)
    pending: Pending | None = None
    time_floor: float = 0.0  # Unix seconds

    def to_json(self) -> bytes:
        document: dict[str, Any] = {
            "counters": self.counters,
            "blocklist": self.blocklist,
            "pending": None
            if self.pending is None
            else {
                "sha256": self.pending.sha256,
                "target": self.pending.target,
                "attempts": self.pending.attempts,
            },
            "time_floor": self.time_floor,
        }
        return json.dumps(document, sort_keys=True, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes) -> UpdateState:
        """Raises ValueError (or KeyError/TypeError) on a malformed document."""
        document = json.loads(data)
        counters = {str(k): int(v) for k, v in dict(document["counters"]).items()}
        blocklist = {str(k): str(v) for k, v in dict(document["blocklist"]).items()}
        raw = document["pending"]
        pending = (
            None
            if raw is None
            else Pending(str(raw["sha256"]), str(raw["target"]), int(raw["attempts"]))
        )
        return cls(counters, blocklist, pending, float(document["time_floor"]))


class StateFile:
    """Loads and saves `UpdateState` at ``path``; every change is saved before it counts."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.state = self._load()

    def _load(self) -> UpdateState:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return UpdateState()
        try:
            return UpdateState.from_json(data)
        except (ValueError, KeyError, TypeError) as e:
            aside = self.path.with_name(self.path.name + ".corrupt")
            os.replace(self.path, aside)
            log.error(
                "update state unreadable; starting fresh",
                extra={"event": "state_corrupt", "file": str(self.path), "error": str(e)},
            )
            return UpdateState(time_floor=aside.stat().st_mtime)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, self.state.to_json())

    def trusted_now(self, wall: float | None = None) -> datetime:
        """``max(wall clock, floor)`` as an aware datetime; raises the floor and saves it."""
        now = time.time() if wall is None else wall
        if now > self.state.time_floor:
            self.state.time_floor = now
            self.save()
        return datetime.fromtimestamp(self.state.time_floor, timezone.utc)

    def raise_counter(self, model: str, counter: int) -> None:
        if counter > self.state.counters.get(model, 0):
            self.state.counters[model] = counter
            self.save()

    def block(self, sha256: str, reason: str) -> None:
        blocklist = self.state.blocklist
        blocklist[sha256] = reason
        while len(blocklist) > MAX_BLOCKLIST:
            del blocklist[next(iter(blocklist))]
        self.save()

    def begin_attempt(self, sha256: str, target: str) -> int:
        """Count one more gate attempt for ``sha256`` (saved before the gate starts)."""
        pending = self.state.pending
        if pending is None or pending.sha256 != sha256:
            pending = Pending(sha256, target)
        pending.attempts += 1
        self.state.pending = pending
        self.save()
        return pending.attempts

    def clear_pending(self) -> None:
        if self.state.pending is not None:
            self.state.pending = None
            self.save()
