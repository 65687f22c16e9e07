"""Clock jump forward and backward, as far as it can be injected honestly here.

The machine's real-time clock is never moved: that would move it for every process on
the host. What is injected is what a jump leaves behind on the device: the update path's
trusted time floor (``edge_agent/update/state.py``; expiry checks use ``max(wall clock,
floor)``, and the floor only rises). Through ``hil/powercut.py``'s plant (real Mosquitto,
``fleet-server serve``, ``edge-agent run``):

- *small jump forward, then back*: the agent is stopped, its floor set to now + 1 hour
  (a clock that ran an hour ahead and was corrected), restarted, and a new version is
  assigned. It must install it (timestamp metadata lives a day) and keep the floor.
- *large jump forward, then back*: floor at now + 2 days, past the timestamp's one-day
  expiry. The device must refuse the update (the metadata looks expired to it), stay on
  its active model and keep inspecting. This is by design (a backward step cannot revive
  expired metadata) and means such a device takes no update until its clock passes
  the floor; the notes say so.

Then the agent's own wall clock, while it runs: a separate agent process (no fleet) is
started under libfaketime (``LD_PRELOAD``, the offset read from a file, the monotonic
clock left alone, as an NTP step leaves it). The offset goes from 0 to +1 hour (a jump
forward), then back to 0 (a jump backward). The agent must keep inspecting through both
(rows are added in every phase), stamp its results with the clock it sees (the rows of
the forward phase are an hour ahead), and stop cleanly. Without libfaketime (Debian
``faketime``) the scenario fails and says so.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path

from edge_agent.protocol.events import EventKind
from edge_agent.update.state import StateFile
from hil import powercut
from hil.scenarios.device import Limits, LocalAgent, agent_toml, synthetic_source, wait_until
from hil.scenarios.result import Options, Result
from tests.integration.agent_proc import inspected

LIBFAKETIME = (
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
)
REFUSAL_TIMEOUT_S = 30.0


def find_libfaketime() -> Path | None:
    for candidate in LIBFAKETIME:
        if Path(candidate).is_file():
            return Path(candidate)
    return None


def set_floor(plant: powercut.Plant, floor: float) -> None:
    """Stop the agent, write ``floor`` into its update state, start it again."""
    plant.agent.stop()
    state = StateFile(plant.work / "device" / "update" / "state.json")
    state.state.time_floor = floor
    state.save()
    plant.agent.start()
    if plant.agent.wait_started(powercut.START_TIMEOUT_S) is None:
        raise RuntimeError(f"the agent did not restart; see {plant.agent.log}")


def floor_of(plant: powercut.Plant) -> float:
    return StateFile(plant.work / "device" / "update" / "state.json").state.time_floor


def refused(plant: powercut.Plant, since: int) -> str | None:
    """The kind of the first refusal or failure after ``since`` (None if none came)."""
    deadline = time.monotonic() + REFUSAL_TIMEOUT_S
    while time.monotonic() < deadline:
        for kind in (EventKind.REFUSED, EventKind.FAILED):
            if plant.events.wait(kind, None, since, 0.1):  # type: ignore[arg-type]
                return kind.value
    return None


def last_refusal_detail(log: Path) -> str | None:
    """The ``detail`` of the agent's last ``update_refused`` log line."""
    detail = None
    for line in log.read_text(encoding="utf-8").splitlines():
        if '"update_refused"' in line:
            detail = str(json.loads(line).get("detail"))
    return detail


def run(options: Options) -> Result:
    result = Result("clock-jump")
    library = find_libfaketime()
    result.figures["libfaketime"] = None if library is None else str(library)
    if library is None:
        result.check(False, "libfaketime is not installed (apt-get install faketime)")
    else:
        jump_running_clock(options, result, library)
    plant = powercut.Plant(options.work)
    try:
        small = time.time() + 3600
        set_floor(plant, small)
        options.say(result.name, "floor +1 h: assigning 2.0.0, which must install")
        target, since = plant.publish("2.0.0")
        installed = plant.wait_finished(target, "2.0.0", since)
        kept = floor_of(plant) >= small
        result.figures.update(small_jump_installed=installed, small_jump_floor_kept=kept)
        result.check(installed, "after a +1 h jump and back the update did not install")
        result.check(kept, "the time floor went down")

        large = time.time() + 2 * 86400
        # The agent checks for updates as it starts, so the refusal may come before the
        # assignment (and is reported once): count events from before the restart.
        since = plant.events.count()
        set_floor(plant, large)
        options.say(result.name, "floor +2 d: assigning 2.0.1, which must be refused")
        plant.publish("2.0.1")
        refusal = refused(plant, since)
        active = powercut.slot_state(plant.work / "device")
        alive = plant.agent.proc is not None and plant.agent.proc.poll() is None
        result.figures.update(
            large_jump_refusal=refusal,
            large_jump_active=active,
            agent_running=alive,
        )
        result.check(refusal is not None, "after a +2 d jump the update was not refused")
        result.check(active == "2.0.0", f"the active model changed to {active}")
        result.check(alive, "the agent stopped after the refusal")
        result.notes.append(
            "a device whose clock ran more than a day ahead refuses updates until its "
            "clock passes the floor (by design: expiry uses max(wall clock, floor))"
        )
    finally:
        plant.close()
    # The log file is complete once the agent has stopped.
    result.figures["large_jump_detail"] = last_refusal_detail(plant.agent.log)
    return result


JUMP_S = 3600


def jump_running_clock(options: Options, result: Result, library: Path) -> None:
    """Jump a running agent's wall clock forward by an hour, then back (module doc)."""
    work = options.work / "running-clock"
    state_dir = work / "state"
    state_dir.mkdir(parents=True)
    config = work / "agent.toml"
    config.write_text(
        agent_toml(state_dir, profile=options.profile, source=synthetic_source(30.0)),
        encoding="utf-8",
    )
    offset = work / "offset"
    offset.write_text("+0\n", encoding="utf-8")
    env = {
        **os.environ,
        "LD_PRELOAD": str(library),
        "FAKETIME_TIMESTAMP_FILE": str(offset),
        "FAKETIME_CACHE_DURATION": "1",  # re-read the offset every second
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",  # an NTP step moves only the wall clock
    }
    agent = LocalAgent(
        config, work / "agent.log", Limits.of_profile(options.profile, options.cpus), env=env
    )
    phase_s = 3.0 if options.quick else 30.0
    rows: dict[str, int] = {}
    agent.start()
    try:
        started = wait_until(lambda: inspected(state_dir) > 0, 60.0)
        result.check(started, "the agent under libfaketime inspected nothing")
        for phase, text in (("before", "+0"), ("forward", f"+{JUMP_S}"), ("back", "+0")):
            offset.write_text(text + "\n", encoding="utf-8")
            options.say(result.name, f"running clock {text} s for {phase_s:g} s")
            before = inspected(state_dir)
            time.sleep(phase_s + 1.5)  # + the offset's cache time
            rows[phase] = inspected(state_dir) - before
            result.check(rows[phase] > 0, f"no rows were added in the {phase} phase")
        alive = agent.running
    finally:
        code = agent.stop()
    ahead = _max_ahead_s(state_dir / "results.db")
    result.figures.update(
        running_clock_rows=rows,
        running_clock_max_ahead_s=None if ahead is None else round(ahead),
        running_clock_alive=alive,
        running_clock_exit=code,
    )
    result.check(alive, "the agent stopped while its clock jumped")
    result.check(code == 0, f"the agent exited with {code} after the clock jumps")
    result.check(
        ahead is not None and ahead > JUMP_S / 2,
        "no result carries the forward-jumped time: the jump was not injected",
    )


def _max_ahead_s(db: Path) -> float | None:
    """How far the latest result time lies ahead of the real clock now."""
    with sqlite3.connect(db) as conn:
        latest = conn.execute("SELECT max(ts) FROM results").fetchone()[0]
    return None if latest is None else float(latest) - time.time()
