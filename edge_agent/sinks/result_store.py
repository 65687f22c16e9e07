"""Keeps the line running while results.db cannot commit (disk full, I/O errors).

The agent stores each verdict through ``GuardedResults``. When a commit fails, the batch
stays buffered in ``ResultsDB`` and a commit is retried at most every ``retry_s``; the
line goes on inspecting and the line outputs still get every verdict. One structured
error is logged when commits start failing (``event=results_db_failed``) and one line when
they work again (``event=results_db_recovered``). While the buffer holds more than
``max_unstored`` records, the oldest are given up (``event=results_lost``, counted): a
hot-folder file whose result was given up is never acknowledged, so it stays in the inbox
and is inspected again after the agent restarts; a live camera's result is lost.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from edge_agent.sinks.results_db import ResultRecord, ResultsDB, ResultsDBError

log = logging.getLogger("edge_agent.results")

DEFAULT_RETRY_S = 1.0
DEFAULT_MAX_UNSTORED = 2000


class GuardedResults:
    """``add``/``flush`` as on ``ResultsDB``, but a failed commit never raises.

    ``take_given_up`` returns the records given up since the last call, for the caller
    to forget (not acknowledge) their frames.
    """

    def __init__(
        self,
        db: ResultsDB,
        *,
        clock: Callable[[], float],
        retry_s: float = DEFAULT_RETRY_S,
        max_unstored: int = DEFAULT_MAX_UNSTORED,
    ) -> None:
        self._db = db
        self._clock = clock
        self._retry_s = retry_s
        self._max_unstored = max_unstored
        self._failing_since: float | None = None
        self._next_try = 0.0
        self._given_up: list[ResultRecord] = []
        self.lost = 0

    @property
    def failing(self) -> bool:
        return self._failing_since is not None

    def add(self, record: ResultRecord) -> list[ResultRecord]:
        """Store ``record``; returns the records committed by this call."""
        if not self.failing:
            return self._attempt(lambda: self._db.add(record))
        self._db.buffer(record)
        self._bound()
        if self._clock() < self._next_try:
            return []
        return self._attempt(self._db.flush)

    def flush(self) -> list[ResultRecord]:
        """Commit what is buffered (while failing: at most every ``retry_s``)."""
        if self.failing and self._clock() < self._next_try:
            return []
        return self._attempt(self._db.flush)

    def take_given_up(self) -> list[ResultRecord]:
        given_up, self._given_up = self._given_up, []
        return given_up

    def _attempt(self, commit: Callable[[], list[ResultRecord]]) -> list[ResultRecord]:
        try:
            committed = commit()
        except ResultsDBError as e:
            now = self._clock()
            if self._failing_since is None:
                self._failing_since = now
                log.error(
                    "results.db cannot commit; inspection goes on, results wait in memory",
                    extra={"event": "results_db_failed", "path": str(e.path),
                           "reason": str(e), "buffered": self._db.buffered},
                )  # fmt: skip
            self._next_try = now + self._retry_s
            self._bound()
            return []
        if self._failing_since is not None:
            log.info(
                "results.db commits again",
                extra={"event": "results_db_recovered", "committed": len(committed),
                       "failed_for_s": round(self._clock() - self._failing_since, 1),
                       "lost": self.lost},
            )  # fmt: skip
            self._failing_since = None
        return committed

    def _bound(self) -> None:
        excess = self._db.buffered - self._max_unstored
        if excess <= 0:
            return
        dropped = self._db.drop_oldest(excess)
        if self.lost == 0 or (self.lost + len(dropped)) // 1000 > self.lost // 1000:
            log.error(
                "results.db still cannot commit: oldest results given up",
                extra={"event": "results_lost", "lost": self.lost + len(dropped),
                       "buffered": self._db.buffered},
            )  # fmt: skip
        self.lost += len(dropped)
        self._given_up.extend(dropped)
