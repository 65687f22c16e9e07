"""Broker outage under load: the fleet broker goes away for a while (5 minutes, 3 s with
``--quick``) while the line runs a fixed number of frames.

Passes when inspection went on through the outage, every frame produced has its row in
results.db (0 verdicts lost locally), the agent exits cleanly when its source ends, and
the windows the broker saw have increasing seq with no gap beyond what the spool counted
as dropped, the backlog included (``delivery.check_windows``).

``run_line_fault`` is the shared body; the partition scenario passes its own fault.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from edge_agent.protocol import topics
from hil.scenarios.delivery import PersistentBroker, check_windows, queued
from hil.scenarios.device import (
    DEVICE,
    Limits,
    LocalAgent,
    agent_toml,
    synthetic_source,
    wait_until,
)
from hil.scenarios.result import Options, Result
from tests.integration.agent_proc import Recorder, inspected

WINDOW = 50


@dataclass(frozen=True, slots=True)
class Fault:
    """``inject`` and ``heal`` the fault; ``broker`` is the address the agent dials
    (``host:port``), ``netns`` the namespace the agent runs in (None: this one)."""

    inject: Callable[[], None]
    heal: Callable[[], None]
    broker: str
    netns: str | None = None


@dataclass(frozen=True, slots=True)
class Timing:
    fps: float
    fault_s: float
    drain_s: float
    before_s: float

    @classmethod
    def of(cls, quick: bool) -> Timing:
        # Quick: a fast line so that several windows close inside a 3 s fault. Full: the
        # Raspberry Pi camera's 15 fps through a 5-minute outage.
        return cls(100.0, 3.0, 2.0, 2.0) if quick else cls(15.0, 300.0, 60.0, 30.0)

    def frames(self) -> int:
        # A few windows before the fault, the fault, the drain (frames start to count
        # once the model is loaded).
        return int(self.fps * (self.before_s + self.fault_s + self.drain_s))


def run(options: Options) -> Result:
    result = Result("broker-outage")
    broker = PersistentBroker()
    broker.start()
    try:
        fault = Fault(broker.stop, broker.start, f"{broker.host}:{broker.port}")
        run_line_fault(options, result, broker, fault, "broker stopped")
    finally:
        broker.close()
    return result


def run_line_fault(
    options: Options, result: Result, broker: PersistentBroker, fault: Fault, what: str
) -> None:
    """Run a counted, paced synthetic line against ``broker``, inject ``fault`` once two
    windows have arrived, heal it after ``Timing.fault_s``, and check every figure."""
    started = time.monotonic()
    timing = Timing.of(options.quick)
    count = timing.frames()
    limits = Limits.of_profile(options.profile, options.cpus)
    state_dir = options.work / "state"
    config = options.work / "agent.toml"
    source = synthetic_source(timing.fps, count)
    config.write_text(
        agent_toml(state_dir, profile=options.profile, source=source, broker=fault.broker),
        encoding="utf-8",
    )
    telemetry = topics.telemetry(DEVICE)
    recorder = Recorder(broker, [telemetry], client_id="hil-observer", persistent=True)
    agent = LocalAgent(config, options.work / "agent.log", limits, netns=fault.netns)

    def say(message: str) -> None:
        options.say(result.name, message)

    try:
        say(f"{count} frames at {timing.fps:g} fps under {limits.to_json()}")
        agent.start()
        if not result.check(
            wait_until(lambda: len(recorder.on(telemetry)) >= 2, 60),
            "no telemetry window reached the broker before the fault",
        ):
            return
        rows_before = inspected(state_dir)
        say(f"{what} for {timing.fault_s:g} s ({rows_before} rows so far)")
        fault.inject()
        fault_started = time.monotonic()
        spooled_max = 0
        next_report = fault_started + 30
        while (now := time.monotonic()) - fault_started < timing.fault_s:
            spooled_max = max(spooled_max, queued(state_dir))
            if now >= next_report:  # a line every 30 s through a long fault
                next_report += 30
                say(
                    f"{now - fault_started:.0f}/{timing.fault_s:g} s: "
                    f"{inspected(state_dir)} rows, {queued(state_dir)} windows spooled"
                )
            time.sleep(min(1.0, timing.fault_s / 10))
        rows_during = inspected(state_dir) - rows_before
        fault.heal()
        healed = time.monotonic()
        say(f"healed; {rows_during} rows during the fault, {spooled_max} windows spooled")
        drained = wait_until(lambda: queued(state_dir) == 0, timing.drain_s + 30)
        drain_s = time.monotonic() - healed
        say(f"backlog {'sent' if drained else 'NOT sent'} {drain_s:.1f} s after healing")
        code = agent.wait_exit(count / timing.fps + 60)
        result.check(code == 0, f"the agent exited with {code} (see {agent.log})")
        time.sleep(0.5)  # the last window, published at the stop, reaches the observer
        rows = inspected(state_dir)
        result.figures.update(
            fault=what,
            fault_s=timing.fault_s,
            fps=timing.fps,
            frames_produced=count,
            rows_in_results_db=rows,
            rows_during_fault=rows_during,
            windows_spooled_max=spooled_max,
            drain_s=round(drain_s, 2),
            limits=limits.to_json(),
        )
        result.check(
            rows_during >= 0.5 * timing.fps * timing.fault_s,
            f"inspection stalled during the fault: {rows_during} rows in {timing.fault_s} s",
        )
        result.check(rows == count, f"{count - rows} verdicts lost locally ({rows}/{count})")
        result.check(spooled_max >= 1, "no window was spooled during the fault")
        result.check(drained, "the spooled backlog was not sent after healing")
        check_windows(result, recorder.on(telemetry), state_dir)
    finally:
        agent.stop()
        recorder.close()
        result.seconds = time.monotonic() - started
