"""systemd service notifications (``sd_notify``) without libsystemd.

The protocol is one datagram per notification, ``KEY=VALUE`` lines, sent to the unix
socket named by ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace).
Outside systemd (``NOTIFY_SOCKET`` unset) every call is a no-op.

The agent uses it from its pipeline loop (``service.Agent.run``):

- ``READY=1`` on the first loop iteration, i.e. once the pipeline threads run (a
  ``Type=notify`` unit counts as started only then);
- ``WATCHDOG=1`` at half the interval systemd gives in ``$WATCHDOG_USEC``, but only while
  the pipeline makes progress or has nothing in flight. A pipeline that holds frames and
  returns no result stops pinging, and systemd restarts the service after ``WatchdogSec``;
- ``STATUS=...`` (frames inspected and dropped) with each ping, shown by ``systemctl status``;
- ``STOPPING=1`` when the loop ends (SIGTERM or the source ended).

A notification that cannot be sent is logged once and otherwise ignored: the line keeps
inspecting whether or not systemd listens.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from typing import Protocol

log = logging.getLogger("edge_agent.systemd")

# Without a watchdog, STATUS is refreshed this often (seconds).
STATUS_INTERVAL_S = 10.0


class PipelineCounts(Protocol):
    """What the watchdog reads from the pipeline (``pipeline.PipelineCounters``)."""

    frames_in: int
    dropped: int
    inspected: int


def socket_address(value: str) -> str | bytes:
    """The ``sendto`` address for a ``$NOTIFY_SOCKET`` value.

    ``@name`` is a socket in the abstract namespace (a leading NUL byte on the wire);
    anything else must be an absolute path.

    Raises:
        ValueError: empty, or neither ``@name`` nor an absolute path.
    """
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    raise ValueError(f"NOTIFY_SOCKET must be an absolute path or @name, got {value!r}")


def watchdog_interval(env: Mapping[str, str], pid: int) -> float | None:
    """The watchdog timeout in seconds that systemd set for process ``pid``, or None.

    None when ``$WATCHDOG_USEC`` is unset, not a positive integer, or when
    ``$WATCHDOG_PID`` names another process (the watchdog is for a parent or child).
    """
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    owner = env.get("WATCHDOG_PID", "")
    if owner and (not owner.isdigit() or int(owner) != pid):
        return None
    return int(usec) / 1_000_000


class ServiceNotifier:
    """Sends notifications to systemd and paces the pipeline's watchdog pings.

    Args:
        address: the notify socket (``socket_address``), or None to do nothing.
        watchdog_s: systemd's watchdog timeout, or None when no watchdog is armed.
    """

    def __init__(self, address: str | bytes | None, watchdog_s: float | None) -> None:
        self._address = address
        self._watchdog_s = watchdog_s
        self._ping_every = watchdog_s / 2 if watchdog_s is not None else STATUS_INTERVAL_S
        self._sock: socket.socket | None = None
        self._ready = False
        self._next_ping = 0.0
        self._inspected_at_ping = -1
        self._stall_logged = False
        self._send_failed = False

    @classmethod
    def from_environment(
        cls, env: Mapping[str, str] | None = None, pid: int | None = None
    ) -> ServiceNotifier:
        """A notifier for this process from ``$NOTIFY_SOCKET``, ``$WATCHDOG_USEC`` and
        ``$WATCHDOG_PID`` (``env`` and ``pid`` default to this process's).

        An invalid ``$NOTIFY_SOCKET`` is logged and gives a notifier that does nothing:
        the service must not fail to start over it.
        """
        env = os.environ if env is None else env
        pid = os.getpid() if pid is None else pid
        value = env.get("NOTIFY_SOCKET", "")
        if not value:
            return cls(None, None)
        try:
            address = socket_address(value)
        except ValueError as e:
            log.warning("systemd notify disabled", extra={"event": "notify_off", "reason": str(e)})
            return cls(None, None)
        return cls(address, watchdog_interval(env, pid))

    @property
    def enabled(self) -> bool:
        """A notify socket is configured."""
        return self._address is not None

    @property
    def watchdog_s(self) -> float | None:
        return self._watchdog_s

    def notify(self, *fields: str) -> bool:
        """Send ``fields`` (``KEY=VALUE`` each) as one notification; return whether it
        was sent. False when disabled or when the socket refused it (logged once)."""
        if self._address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.sendto("\n".join(fields).encode(), self._address)
        except OSError as e:
            # Only the first failure is worth a line: systemd gone, socket removed, ...
            if not self._send_failed:
                self._send_failed = True
                log.warning(
                    "systemd notification failed",
                    extra={"event": "notify_failed", "error": str(e)},
                )
            return False
        return True

    def beat(self, now: float, counts: PipelineCounts) -> None:
        """Call on every pipeline loop iteration (``now``: a monotonic clock).

        The first call sends ``READY=1``. Afterwards, at most every half watchdog interval,
        sends ``WATCHDOG=1`` with a ``STATUS`` when results came out since the last ping
        or nothing is in flight; a pipeline holding frames without results gets no ping.
        """
        if self._address is None:
            return
        if not self._ready:
            self._ready = True
            self._inspected_at_ping = counts.inspected
            self._next_ping = now + self._ping_every
            self.notify("READY=1", _status(counts))
            return
        if now < self._next_ping:
            return
        in_flight = counts.frames_in - counts.inspected - counts.dropped
        if counts.inspected == self._inspected_at_ping and in_flight > 0:
            if not self._stall_logged:
                self._stall_logged = True
                log.warning(
                    "pipeline stalled: watchdog not pinged",
                    extra={"event": "pipeline_stalled", "in_flight": in_flight},
                )
            return
        self._stall_logged = False
        self._inspected_at_ping = counts.inspected
        self._next_ping = now + self._ping_every
        if self._watchdog_s is not None:
            self.notify("WATCHDOG=1", _status(counts))
        else:
            self.notify(_status(counts))

    def stopping(self) -> None:
        """Send ``STOPPING=1`` and close the socket; later calls send nothing new."""
        if self._address is None:
            return
        self.notify("STOPPING=1", "STATUS=stopping")
        self.close()

    def close(self) -> None:
        """Close the socket and disable the notifier. Idempotent."""
        self._address = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _status(counts: PipelineCounts) -> str:
    return f"STATUS=inspecting: {counts.inspected} frames, {counts.dropped} dropped"
