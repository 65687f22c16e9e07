"""Fault-injection scenarios of the hardware-in-the-loop harness (``hil/run.py``).

Each scenario is a function ``(Options) -> Result`` registered in ``SCENARIOS`` under its
name. A scenario starts what it needs (broker, stream server, agent process with the
profile's limits), injects one fault, and returns a pass/fail result with figures; it
never raises for a failed check (that is ``status="fail"`` with the reason in ``notes``),
only for a harness that cannot run at all (a missing tool, a broker that will not start:
``RuntimeError``, ``OSError``, ``SystemExit``), which ``hil/run.py`` reports as a failure.
"""

from __future__ import annotations

from collections.abc import Callable

from hil.scenarios.result import Options, Result

Scenario = Callable[[Options], Result]


def registry() -> dict[str, Scenario]:
    """Scenario name -> function, in the order they are run by ``all``."""
    # Imported here: hil.scenarios.result stays importable without the agent's packages.
    from hil.scenarios import (
        broker_outage,
        camera_stream,
        clock_jump,
        disk_full,
        partition,
        powercut_update,
        soak,
    )

    return {
        "broker-outage": broker_outage.run,
        "disk-full": disk_full.run,
        "clock-jump": clock_jump.run,
        "camera-stream": camera_stream.run,
        "powercut-update": powercut_update.run,
        "partition": partition.run,
        "soak": soak.run,
    }


__all__ = ["Options", "Result", "Scenario", "registry"]
