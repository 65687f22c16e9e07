"""Soak: the 24-hour run compressed into a shorter one at the maximum frame rate (an
unpaced synthetic line; 1 hour, 8 s with ``--quick``), with the agent's resident memory
and open file descriptors sampled every second (every 0.4 s with ``--quick``).

Passes when, after the warm-up (the first 40 % of the run: model load, caches, SQLite
pages, the first windows), memory grows by at most ``max(RSS_TOLERANCE_MIB, 5 %)`` from
the median of the first half of the remaining samples to the median of the second half,
and the open descriptors by at most ``FD_TOLERANCE``, and the agent is still inspecting.
"""

from __future__ import annotations

import statistics
import time

from hil.scenarios.device import Limits, LocalAgent, agent_toml, synthetic_source, wait_until
from hil.scenarios.result import Options, Result
from tests.integration.agent_proc import inspected

WARMUP_SHARE = 0.4
RSS_TOLERANCE_MIB = 8.0
FD_TOLERANCE = 2


def run(options: Options) -> Result:
    result = Result("soak")
    duration_s, step_s = (8.0, 0.4) if options.quick else (3600.0, 1.0)
    limits = Limits.of_profile(options.profile, options.cpus)
    state_dir = options.work / "state"
    config = options.work / "agent.toml"
    toml = agent_toml(state_dir, profile=options.profile, source=synthetic_source(None))
    config.write_text(toml, encoding="utf-8")
    agent = LocalAgent(config, options.work / "agent.log", limits)
    agent.start()
    rss: list[int] = []
    fds: list[int] = []
    try:
        if not result.check(
            wait_until(lambda: inspected(state_dir) > 0, 60), "the agent did not inspect"
        ):
            return result
        started = time.monotonic()
        rows_at_start = inspected(state_dir)
        next_report = started + 60
        while (now := time.monotonic()) - started < duration_s:
            sample_rss, sample_fds = agent.rss_kib(), agent.open_fds()
            if sample_rss is None or sample_fds is None:
                break
            rss.append(sample_rss)
            fds.append(sample_fds)
            if now >= next_report:
                next_report += 60
                options.say(
                    result.name,
                    f"{now - started:.0f}/{duration_s:.0f} s: RSS {sample_rss / 1024:.1f} MiB, "
                    f"{sample_fds} fds, {inspected(state_dir)} rows",
                )
            time.sleep(step_s)
        elapsed = time.monotonic() - started
        rows = inspected(state_dir) - rows_at_start
        alive = agent.running
        code = agent.stop()
    finally:
        agent.stop()
    settled = len(rss) - int(len(rss) * WARMUP_SHARE)
    result.check(settled >= 4, f"only {len(rss)} samples: the agent exited early ({code})")
    if settled < 4:
        return result
    half = settled // 2
    early_rss, late_rss = rss[-settled:][:half], rss[-settled:][half:]
    early_fds, late_fds = fds[-settled:][:half], fds[-settled:][half:]
    growth_mib = (statistics.median(late_rss) - statistics.median(early_rss)) / 1024
    base_mib = statistics.median(early_rss) / 1024
    tolerance_mib = max(RSS_TOLERANCE_MIB, 0.05 * base_mib)
    fd_growth = max(late_fds) - max(early_fds)
    result.figures.update(
        seconds=round(elapsed, 1),
        samples=len(rss),
        fps=round(rows / elapsed, 1),
        rows=rows,
        rss_start_mib=round(rss[0] / 1024, 1),
        rss_after_warmup_mib=round(base_mib, 1),
        rss_end_mib=round(statistics.median(late_rss) / 1024, 1),
        rss_growth_mib=round(growth_mib, 2),
        rss_tolerance_mib=round(tolerance_mib, 1),
        fds_after_warmup=max(early_fds),
        fds_end=max(late_fds),
        exit_status=code,
    )
    result.check(alive and code == 0, f"the agent was not running at the end ({code})")
    result.check(
        growth_mib <= tolerance_mib,
        f"memory grew {growth_mib:.1f} MiB after warm-up (tolerance {tolerance_mib:.1f})",
    )
    result.check(fd_growth <= FD_TOLERANCE, f"open descriptors grew by {fd_growth}")
    return result
