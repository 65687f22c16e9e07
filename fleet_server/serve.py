"""The fleet server's publishing loop: notify devices of new metadata, keep it fresh.

``FleetPublisher`` does two things on a running transport (the ``ChunkServer`` that answers
fetch requests runs beside it on the same transport):

- every ``poll_interval_s`` it reads the published ``timestamp.json`` version and, when it
  differs from the last one announced, publishes a RETAINED notify (``edge_agent.protocol.notify``)
  on ``topics.NOTIFY``, so a device that connects later still learns about it;
- every ``refresh_interval_s`` (and once at start) it re-signs the online roles that have
  less than half of their lifetime left (``FleetRepository.refresh_expiring``), so devices
  never see expired timestamp, snapshot or director metadata while the server runs, and
  warns when ``release`` or ``targets`` (keys the server does not use) is past half its
  lifetime.

Time for the re-sign decision comes from the injected ``clock``; the loop's pacing uses the
monotonic clock and ``stop.wait``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone

from edge_agent.protocol import topics
from edge_agent.protocol.notify import encode_notify
from edge_agent.transport import MqttTransport
from fleet_server.repository import RELEASE_ROLE, TARGETS_ROLE, FleetRepository, RepositoryError

DEFAULT_POLL_INTERVAL_S = 1.0
DEFAULT_REFRESH_INTERVAL_S = 3600.0


def utc_now() -> datetime:
    """The current time, timezone-aware, in UTC."""
    return datetime.now(timezone.utc)


class FleetPublisher:
    """Announces published metadata and re-signs it before it expires.

    Args:
        transport: a started transport (it may still be connecting).
        repo: the repository to watch and re-sign; its key directory needs the director,
            snapshot and timestamp keys.
        clock: the current time (aware) for re-sign decisions and signing.
        poll_interval_s: how often the timestamp version is checked.
        refresh_interval_s: how often expiry is checked.
        logger: one line per action (notify, re-sign) and per new problem.
    """

    def __init__(
        self,
        transport: MqttTransport,
        repo: FleetRepository,
        *,
        clock: Callable[[], datetime] = utc_now,
        poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
        refresh_interval_s: float = DEFAULT_REFRESH_INTERVAL_S,
        logger: logging.Logger | None = None,
    ) -> None:
        if poll_interval_s <= 0 or refresh_interval_s <= 0:
            raise ValueError("poll and refresh intervals must be > 0")
        self._transport = transport
        self._repo = repo
        self._clock = clock
        self._poll_interval_s = poll_interval_s
        self._refresh_interval_s = refresh_interval_s
        self._logger = logger if logger is not None else logging.getLogger(__name__)
        self._announced: int | None = None
        # Per action: the problem reported at its last attempt (None after a clean one).
        self._problems: dict[str, str | None] = {}
        self._action = ""
        self._reported = False
        self._last_warning: str | None = None

    @property
    def announced_version(self) -> int | None:
        """The timestamp version of the last notify handed to the transport."""
        return self._announced

    @property
    def last_warning(self) -> str | None:
        """The most recent problem reported (logged, or repeated and not logged again)."""
        return self._last_warning

    def announce_if_changed(self) -> bool:
        """Publish a retained notify if the published timestamp version changed.

        Returns True if a notify was queued. When the transport refuses it (offline), the
        same version is tried again at the next call. After a disconnect the version is
        announced again: a restarted broker may have lost its retained messages.

        Raises:
            RepositoryError: the timestamp cannot be read.
        """
        if not self._transport.connected:
            self._announced = None
        version, _ = self._repo.timestamp_state()
        if version == self._announced:
            return False
        if not self._transport.publish(topics.NOTIFY, encode_notify(version), qos=1, retain=True):
            self._report("notify for timestamp version %d not queued (offline)", version)
            return False
        self._announced = version
        self._logger.info("notify: timestamp version %d", version)
        return True

    def refresh_if_due(self) -> list[str]:
        """Re-sign the online roles that have less than half their lifetime left now.

        Returns the re-signed roles (see ``FleetRepository.refresh_expiring``).

        Raises:
            RepositoryError: keys or metadata are missing.
        """
        now = self._clock()
        resigned = self._repo.refresh_expiring(now=now)
        for role in (RELEASE_ROLE, TARGETS_ROLE):
            # Signed with keys the server does not hold: say so while there is time.
            expires = self._repo.expires(role)
            if self._repo.policy.due(role, expires, now):
                self._report(
                    "%s.json expires %s: run 'fleet-server resign %s' with its key",
                    role,
                    expires.isoformat(timespec="seconds"),
                    role,
                )
        if resigned:
            version, expires = self._repo.timestamp_state()
            self._logger.info(
                "re-signed %s at %s: timestamp version %d expires %s",
                ", ".join(resigned),
                now.isoformat(timespec="seconds"),
                version,
                expires.isoformat(timespec="seconds"),
            )
        return resigned

    def run(self, stop: threading.Event) -> None:
        """Loop until ``stop`` is set. Repository and file problems are logged (once per
        distinct message) and retried; they never end the loop."""
        next_refresh = time.monotonic()
        while not stop.is_set():
            if time.monotonic() >= next_refresh:
                next_refresh = time.monotonic() + self._refresh_interval_s
                self._attempt("refresh", self.refresh_if_due)
            self._attempt("announce", self.announce_if_changed)
            stop.wait(self._poll_interval_s)

    def _attempt(self, name: str, action: Callable[[], object]) -> None:
        self._action, self._reported = name, False
        try:
            action()
        except (RepositoryError, OSError) as e:
            self._report("%s", e)
        if not self._reported:
            self._problems[name] = None

    def _report(self, message: str, *args: object) -> None:
        # A broker outage or a missing key would otherwise log the same line every second:
        # a problem is logged when it differs from the one at the action's last attempt.
        text = message % args
        if text != self._problems.get(self._action):
            self._logger.warning("%s", text)
        self._problems[self._action] = text
        self._last_warning = text
        self._reported = True
