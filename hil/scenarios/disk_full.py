"""Disk full: the agent's state directory is a small tmpfs (the device's data partition);
once the line runs, a filler file takes every free byte, stays a while, then is removed.

Passes when nothing committed before the disk filled is lost (results.db still holds at
least those rows and passes ``PRAGMA integrity_check``) and the agent either kept running
and inspects again once space is back, or stopped with a non-zero status and an error
log line that says why. Needs root for ``mount -t tmpfs``; without it the result is
``unavailable`` with mount's message.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
import time
from pathlib import Path

from hil.scenarios.device import Limits, LocalAgent, agent_toml, synthetic_source, wait_until
from hil.scenarios.result import Options, Result
from tests.integration.agent_proc import inspected

SIZE = "16m"
CHUNK = 64 * 1024


def fill(directory: Path) -> int:
    """Write ``directory/filler`` until the file system is full; the bytes written."""
    written = 0
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        # Unbuffered writes, smaller and smaller, so not even a page is left free.
        for size in (CHUNK, 4096, 512, 1):
            block = b"\0" * size
            try:
                while True:
                    written += os.write(fd, block)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
    finally:
        os.close(fd)
    return written


def integrity(db: Path) -> str:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])


def run(options: Options) -> Result:
    result = Result("disk-full")
    state_dir = options.work / "state"
    state_dir.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={SIZE}", "tmpfs", str(state_dir)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        result.status = "unavailable"
        result.notes.append(f"cannot mount a tmpfs (needs root): {mounted.stderr.strip()}")
        return result
    try:
        full_in_state(options, result, state_dir)
    finally:
        subprocess.run(["umount", "--lazy", str(state_dir)], check=True)
    return result


def full_in_state(options: Options, result: Result, state_dir: Path) -> None:
    full_s = 2.0 if options.quick else 120.0
    limits = Limits.of_profile(options.profile, options.cpus)
    config = options.work / "agent.toml"
    toml = agent_toml(state_dir, profile=options.profile, source=synthetic_source(100.0))
    config.write_text(toml, encoding="utf-8")
    agent = LocalAgent(config, options.work / "agent.log", limits)

    def say(message: str) -> None:
        options.say(result.name, message)

    agent.start()
    try:
        if not result.check(
            wait_until(lambda: inspected(state_dir) >= 200, 60), "the agent did not inspect"
        ):
            return
        filled = fill(state_dir)
        rows_at_full = inspected(state_dir)
        say(f"disk full ({filled // 1024} KiB filler) at {rows_at_full} rows; {full_s:g} s")
        time.sleep(full_s)
        alive_while_full = agent.running
        rows_while_full = inspected(state_dir) - rows_at_full
        (state_dir / "filler").unlink()
        say(f"space freed; agent {'running' if alive_while_full else 'stopped'}")
        rows_freed = inspected(state_dir)
        recovered = agent.running and wait_until(
            lambda: inspected(state_dir) > rows_freed + 100 or not agent.running, full_s + 10
        )
        recovered = recovered and inspected(state_dir) > rows_freed + 100
        alive_at_end = agent.running
        code = agent.stop()
        rows_final = inspected(state_dir)
        errors = [e for e in agent.events() if e.get("level") in ("error", "critical")]
        # The stop is clean when a structured error line names the results or the disk,
        # and no Python traceback went to the log instead.
        stop_reasons = [
            str(e.get("msg")) for e in errors if "results" in str(e) and "evidence" not in str(e)
        ]
        traceback = "Traceback (most recent call last)" in agent.log.read_text(encoding="utf-8")
        result.figures.update(
            tmpfs=SIZE,
            filler_kib=filled // 1024,
            rows_at_full=rows_at_full,
            rows_while_full=rows_while_full,
            alive_while_full=alive_while_full,
            recovered_after_freeing=recovered,
            rows_final=rows_final,
            exit_status=code,
            error_events=sorted({str(e.get("event")) for e in errors}),
            stop_reason=stop_reasons[0][:200] if stop_reasons else None,
            uncaught_traceback=traceback,
            integrity=integrity(state_dir / "results.db"),
        )
        result.check(rows_final >= rows_at_full, f"rows lost: {rows_at_full} -> {rows_final}")
        result.check(result.figures["integrity"] == "ok", "results.db failed integrity_check")
        if alive_at_end:
            result.check(recovered, "the agent runs but did not inspect once space was back")
            result.check(code == 0, f"the agent exited with {code} on SIGTERM")
        else:
            result.check(code not in (0, None), "the agent stopped but exited 0")
            result.check(
                bool(stop_reasons) and not traceback,
                "the agent stopped without a structured error line saying why"
                + (" (an uncaught traceback instead)" if traceback else ""),
            )
    finally:
        agent.stop()
