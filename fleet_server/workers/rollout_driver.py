"""The rollout driver: a thread that steps every rollout and keeps the registry in step.

Every ``interval_s`` it calls ``RolloutService.tick(now)`` (assign due waves, judge gates,
halt, roll back, complete: all decisions live there, and all state in the database, so a
restarted server continues where it stopped) and logs what that did. When the signed
``release`` role changes (a ``fleet-server release`` from the ML team's side), it mirrors
the new releases into the registry table. A database or repository failure is logged and
retried on the next step; it never ends the thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from fleet_server.repository import FleetRepository, RepositoryError
from fleet_server.rollouts import Registry, RolloutError, RolloutService
from fleet_server.storage import StorageError

DEFAULT_INTERVAL_S = 1.0


class RolloutDriver:
    """``start`` runs the loop on its own thread; ``stop`` ends it (idempotent).

    Args:
        service: the rollouts to step.
        registry: mirrored from ``repository`` when its release role changes.
        repository: the signed repository (None: no registry mirroring).
        clock: the current time, aware UTC.
        interval_s: seconds between steps.
        logger: one line per action and per failure.
    """

    def __init__(
        self,
        service: RolloutService,
        registry: Registry,
        repository: FleetRepository | None,
        *,
        clock: Callable[[], datetime],
        interval_s: float = DEFAULT_INTERVAL_S,
        logger: logging.Logger,
    ) -> None:
        self._service = service
        self._registry = registry
        self._repository = repository
        self._clock = clock
        self._interval_s = interval_s
        self._logger = logger
        self._release_stamp: tuple[int, int] | None = None
        self._last_error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rollout-driver", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def step(self) -> None:
        """One step: mirror new releases, then tick the rollouts."""
        try:
            self._sync_registry()
            for line in self._service.tick(self._clock()):
                self._logger.info("rollout: %s", line)
        except (StorageError, RepositoryError, RolloutError, OSError) as e:
            message = f"rollout step failed: {e}"
            if message != self._last_error:  # once per distinct failure, not every second
                self._logger.warning("%s", message)
            self._last_error = message
        else:
            self._last_error = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.step()
            self._stop.wait(self._interval_s)

    def _sync_registry(self) -> None:
        if self._repository is None:
            return
        stamp = _file_stamp(self._repository.metadata_dir / "release.json")
        if stamp is None or stamp == self._release_stamp:
            return
        added = self._registry.sync(self._repository, now=self._clock())
        self._release_stamp = stamp
        if added:
            self._logger.info("registry: %d new release(s) from the signed release role", added)


def _file_stamp(path: Path) -> tuple[int, int] | None:
    """(mtime_ns, size) of a file, None when it is missing."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size
