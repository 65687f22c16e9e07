"""What the local REST API serves, without the web framework: inspections on demand,
recent results, evidence files, the client-address rule.

Inspections asked for over the API run on the API's **own Inspector** (its own runtime
session, opened from the bundle the line uses), one request at a time behind a lock:

- the line's runtime is used only by the pipeline's inference thread (a LiteRT
  interpreter is not thread-safe, and the pipeline takes no lock that a request could
  share), so a request never waits for a frame and a frame never waits for a request;
- one request at a time bounds what the API can take from the line to one inference's
  threads, however many controllers ask at once.

When the line's model changes (an update swapped it in), the next request reopens the
API's inspector from the new bundle. An API inspection is answered, counted
(``api_inspections``) and nothing else: it is not written to results.db, not offered to
the line outputs (a controller that triggers an inspection handles its answer itself).

results.db is read through its own read-only connection per request (WAL: readers never
block the agent's writer).
"""

from __future__ import annotations

import ipaddress
import math
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent.inspect import Inspector
from edge_agent.metrics import AgentView
from edge_agent.sinks.outputs import VerdictEvent


class ApiUnavailable(Exception):
    """The agent is not ready to serve this (still starting, or stopping)."""


def is_local_client(host: str | None) -> bool:
    """True when ``host`` is a loopback or private (RFC 1918, ULA, link-local) address.

    An unknown or unparsable address is not local: evidence images stay in the plant.
    """
    if not host:
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback or address.is_private or address.is_link_local


class ApiInspector:
    """Inspections for the API on their own Inspector (module docstring: why).

    Args:
        open_model: opens a bundle directory the way the line does (thresholds applied).
        line_bundle: the bundle directory the line uses now; None before the line runs.
        view: the agent's view; API verdicts are counted in its ``api_stats``.
    """

    def __init__(
        self,
        open_model: Callable[[Path], Inspector],
        line_bundle: Callable[[], Path | None],
        view: AgentView,
    ) -> None:
        self._open_model, self._line_bundle = open_model, line_bundle
        self._view = view
        self._lock = threading.Lock()
        self._inspector: Inspector | None = None
        self._seq = 0

    def inspect(self, data: bytes, received_at: float) -> VerdictEvent:
        """Inspect encoded image bytes; an unusable image gives an ``error`` verdict.

        ``frame`` in the answer is the API's own request counter, ``ts`` the receipt time.

        Raises:
            ApiUnavailable: the line has no model yet.
            BundleError, ModelLoadError: the line's bundle cannot be reopened (named).
        """
        with self._lock:
            inspector = self._current()
            self._seq += 1
            verdict = inspector.inspect_bytes(data, frame_id=self._seq)
        self._view.api_stats.add(verdict.outcome.value, verdict.latency_ms)
        return VerdictEvent(
            frame_id=verdict.frame_id,
            captured_at=received_at,
            outcome=verdict.outcome,
            label=verdict.label,
            p_defect=None if math.isnan(verdict.p_defect) else verdict.p_defect,
            latency_ms=verdict.latency_ms,
            model=inspector.manifest.id,
            error=verdict.error,
        )

    def warm_up(self) -> None:
        """Open the inspector now, so the first request does not pay for it."""
        with self._lock:
            self._current()

    def close(self) -> None:
        with self._lock:
            if self._inspector is not None:
                self._inspector.close()
                self._inspector = None

    def _current(self) -> Inspector:
        bundle = self._line_bundle()
        if bundle is None:
            raise ApiUnavailable("the line has no model yet")
        if self._inspector is None or self._inspector.bundle.path != bundle:
            fresh = self._open_model(bundle)
            if self._inspector is not None:
                self._inspector.close()
            self._inspector = fresh
        return self._inspector


@dataclass(frozen=True, slots=True)
class ResultRow:
    id: int
    frame_id: int
    ts: float
    source: str
    model: str
    p_defect: float | None
    outcome: str
    latency_ms: float
    error: str | None
    evidence: str | None  # relative to the evidence root


_ROW = "id, frame_id, ts, source, model, p_defect, verdict, latency_ms, error, evidence"


class ResultsReader:
    """Read-only queries on results.db (its own connection per call, any thread).

    Raises (every method):
        ApiUnavailable: results.db does not exist yet or cannot be read.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def recent(self, since: float | None, limit: int) -> list[ResultRow]:
        """Rows with ``ts > since`` oldest first, at most ``limit``; without ``since``
        the newest ``limit`` rows, oldest first."""
        if since is None:
            sql = f"SELECT * FROM (SELECT {_ROW} FROM results ORDER BY ts DESC, id DESC LIMIT ?)"
            rows = self._query(sql + " ORDER BY ts, id", (limit,))
        else:
            sql = f"SELECT {_ROW} FROM results WHERE ts > ? ORDER BY ts, id LIMIT ?"
            rows = self._query(sql, (since, limit))
        return [ResultRow(*row) for row in rows]

    def evidence_of(self, result_id: int) -> str | None:
        """The evidence path of result ``result_id``; None if no such row or no image."""
        rows = self._query("SELECT evidence FROM results WHERE id = ?", (result_id,))
        return None if not rows or rows[0][0] is None else str(rows[0][0])

    def _query(self, sql: str, args: tuple[object, ...]) -> list[tuple[Any, ...]]:
        if not self.path.exists():
            raise ApiUnavailable("no results yet")
        try:
            conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=2.0)
        except sqlite3.Error as e:
            raise ApiUnavailable(f"results database: {e}") from e
        try:
            rows: list[tuple[Any, ...]] = conn.execute(sql, args).fetchall()
            return rows
        except sqlite3.Error as e:
            raise ApiUnavailable(f"results database: {e}") from e
        finally:
            conn.close()


def row_document(row: ResultRow) -> dict[str, object]:
    """One result as JSON (the keys of a VerdictEvent where they exist, pure)."""
    return {
        "id": row.id,
        "frame": row.frame_id,
        "ts": round(row.ts, 6),
        "source": row.source,
        "outcome": row.outcome,
        "p": None if row.p_defect is None else round(row.p_defect, 6),
        "latency_ms": round(row.latency_ms, 3),
        "model": row.model,
        "error": row.error,
        "evidence": None if row.evidence is None else f"/v1/evidence/{row.id}",
    }


def evidence_file(root: Path, relative: str) -> Path | None:
    """``root / relative`` if it is a file inside ``root`` (no escape by ``..``)."""
    base = root.resolve()
    path = (base / relative).resolve()
    if not path.is_relative_to(base) or not path.is_file():
        return None
    return path
