"""Power cut during an update: ``hil/powercut.py`` (real Mosquitto, ``fleet-server serve``
and ``edge-agent run``) releases and assigns new model versions and SIGKILLs the agent in
each update phase in turn; 20 runs, 1 with ``--quick``.

Passes when no run left the device bricked (the slot store always names an active,
verifying bundle and the agent comes back serving) and every update finished after the
restart. The agent here runs without the profile's CPU and memory limits: powercut.py
starts it itself (the figures say so).
"""

from __future__ import annotations

from hil import powercut
from hil.scenarios.result import Options, Result


def run(options: Options) -> Result:
    result = Result("powercut-update")
    runs = 1 if options.quick else 20
    options.say(result.name, f"{runs} updates, each interrupted by SIGKILL")
    figures = powercut.run(runs, 1, options.work, options.progress, gate_crash_loop=False)
    figures["agent_limits"] = "none (powercut.py starts its own agent)"
    result.figures.update(figures)
    result.check(figures["bricked"] == 0, f"{figures['bricked']} runs left the device bricked")
    result.check(figures["finished"] == runs, f"{figures['finished']}/{runs} updates finished")
    return result
