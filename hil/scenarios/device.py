"""The device under test on this machine: ``edge-agent run`` as a real process, confined to
the CPU count and memory of a firmware profile, with its JSON log and its RSS and open
file descriptors readable while it runs.

Limits (``Limits.of_profile``): the process is pinned to the first ``threads`` CPUs of the
profile (the runtime threads the board gives the agent; one x86 core is already faster
than a Cortex-A72 core, so this is generous, not pessimistic) and its address space is
capped at the board's ``memory_mb`` with ``RLIMIT_AS``, so an allocation a real board
could not satisfy fails here as well. ``prlimit`` and ``taskset`` (util-linux) set both.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tests.integration.reference import ONNX_BUNDLE, UNSEEN_SEED

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 devices
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
PROFILES = ROOT / "firmware_profiles"
DEVICE = "hil-device-1"


@dataclass(frozen=True, slots=True)
class Limits:
    """CPUs the agent may run on and its address-space cap in MiB."""

    profile: str
    cpus: tuple[int, ...]
    memory_mb: int

    @classmethod
    def of_profile(cls, name: str, cpus: int | None = None) -> Limits:
        """Limits of ``firmware_profiles/NAME.toml``; raises ``SystemExit`` naming the
        profile when it does not exist."""
        path = PROFILES / f"{name}.toml"
        if not path.is_file():
            known = ", ".join(sorted(p.stem for p in PROFILES.glob("*.toml")))
            raise SystemExit(f"hil: no firmware profile {name!r} (known: {known})")
        profile = tomllib.loads(path.read_text(encoding="utf-8"))
        available = sorted(os.sched_getaffinity(0))
        wanted = cpus if cpus is not None else int(profile.get("threads", profile["cores"]))
        return cls(name, tuple(available[: max(1, wanted)]), int(profile["memory_mb"]))

    def to_json(self) -> dict[str, object]:
        return {"profile": self.profile, "cpus": list(self.cpus), "memory_mb": self.memory_mb}


def agent_toml(
    state_dir: Path,
    *,
    profile: str,
    source: str,
    broker: str | None = None,
    window_frames: int = 50,
    evidence_pass_every: int = 0,
) -> str:
    """The agent's config: ``source`` is the ``[source]`` body (``url = ...`` and its
    keys); ``broker`` is ``host:port`` or None for a device without a fleet."""
    fleet = f'[fleet]\nbroker = "{broker}"\n' if broker else ""
    return f"""
[device]
id = "{DEVICE}"
profile = "{profile}"
line = "hil-line"

[source]
{source}

[model]
bundle = "{ONNX_BUNDLE}"

[storage]
state_dir = "{state_dir}"
evidence_pass_every = {evidence_pass_every}

{fleet}
[telemetry]
window_frames = {window_frames}
window_s = 60
state_interval_s = 0.5

[log]
format = "json"
summary_interval_s = 1
"""


def synthetic_source(fps: float | None, count: int | None = None) -> str:
    """A synthetic line of 320x240 products; ``fps`` None runs as fast as it can."""
    lines = ['url = "synthetic:"', f"seed = {UNSEEN_SEED}", 'size = "320x240"']
    lines.append("defect_rate = 0.2")
    if fps is not None:
        lines.append(f"fps = {fps}")
    if count is not None:
        lines.append(f"count = {count}")
    return "\n".join(lines)


class LocalAgent:
    """``python -m edge_agent.cli run`` under ``limits``; ``events`` collects its JSON log
    lines (the raw log is also written to ``log``)."""

    def __init__(
        self,
        config: Path,
        log: Path,
        limits: Limits,
        netns: str | None = None,
        env: dict[str, str] | None = None,
    ):
        self.config = config
        self.log = log
        self.limits = limits
        self.netns = netns
        self.env = env  # None: this process's environment
        self.proc: subprocess.Popen[str] | None = None
        self._lock = threading.Lock()
        self._events: list[dict[str, object]] = []
        self._reader: threading.Thread | None = None

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("the agent is already running")
        command = [sys.executable, "-m", "edge_agent.cli", "run", "--config", str(self.config)]
        # prlimit and taskset set the limit and affinity and exec the next command, so the
        # agent keeps the pid the harness samples.
        cap = self.limits.memory_mb * 1024 * 1024
        cpus = ",".join(str(cpu) for cpu in self.limits.cpus)
        command = ["prlimit", f"--as={cap}", "--", "taskset", "-c", cpus, *command]
        if self.netns is not None:
            command = ["ip", "netns", "exec", self.netns, *command]
        self.proc = subprocess.Popen(
            command,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            env=self.env,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        with self.log.open("a", encoding="utf-8") as out:
            for line in self.proc.stderr:
                out.write(line)
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict):
                    with self._lock:
                        self._events.append(record)

    def events(self, name: str | None = None) -> list[dict[str, object]]:
        """Log records so far, or only those with ``event == name``."""
        with self._lock:
            return [e for e in self._events if name is None or e.get("event") == name]

    def wait_event(self, name: str, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.events(name):
                return True
            if not self.running:
                return bool(self.events(name))
            time.sleep(0.05)
        return False

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        """The agent's own pid (``ip netns exec``, ``prlimit`` and ``taskset`` each exec
        the next, so the pid stays the same)."""
        assert self.proc is not None
        return self.proc.pid

    def rss_kib(self) -> int | None:
        """Resident memory from /proc; None once the process is gone."""
        try:
            status = Path(f"/proc/{self.pid}/status").read_text(encoding="utf-8")
        except (FileNotFoundError, ProcessLookupError):
            return None
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return None

    def open_fds(self) -> int | None:
        try:
            return len(os.listdir(f"/proc/{self.pid}/fd"))
        except (FileNotFoundError, ProcessLookupError):
            return None

    def wait_exit(self, timeout_s: float) -> int | None:
        """The exit status, or None if still running after ``timeout_s``."""
        assert self.proc is not None
        try:
            code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None
        if self._reader is not None:
            self._reader.join(timeout=5)
        return code

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM, wait, SIGKILL if it hangs; the exit status (None if never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            if self.wait_exit(timeout_s) is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
        return self.wait_exit(timeout_s)


def wait_until(predicate: object, timeout_s: float, step_s: float = 0.05) -> bool:
    """Poll ``predicate`` (a callable) until it is true or ``timeout_s`` passes."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step_s)
    return bool(predicate())
