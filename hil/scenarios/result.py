"""What a scenario gets (``Options``) and gives back (``Result``)."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Status = Literal["pass", "fail", "unavailable"]


@dataclass(frozen=True, slots=True)
class Options:
    """How to run a scenario.

    ``quick`` scales every duration down (seconds instead of minutes) for CI; ``profile``
    names the firmware profile whose CPU and memory limits the agent runs under;
    ``work`` is an empty directory the scenario may fill; ``progress`` prints one line per
    step to stderr.
    """

    work: Path
    profile: str = "rpi4"
    quick: bool = False
    progress: bool = True
    cpus: int | None = None  # override the profile's CPU count

    def say(self, scenario: str, message: str) -> None:
        if self.progress:
            stamp = time.strftime("%H:%M:%S")
            print(f"[{stamp}] {scenario}: {message}", file=sys.stderr, flush=True)


@dataclass(slots=True)
class Result:
    """One scenario's outcome: ``status`` is ``pass``, ``fail`` or ``unavailable`` (the
    fault cannot be injected on this machine; ``notes`` say why). ``figures`` are the
    measurements behind the verdict, ``notes`` the failed checks and caveats."""

    name: str
    status: Status = "pass"
    seconds: float = 0.0
    figures: dict[str, object] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def check(self, ok: bool, failure: str) -> bool:
        """Record ``failure`` and mark the result failed unless ``ok``."""
        if not ok:
            self.status = "fail"
            self.notes.append(failure)
        return ok

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "status": self.status,
            "seconds": round(self.seconds, 1),
            "figures": self.figures,
            "notes": self.notes,
        }
