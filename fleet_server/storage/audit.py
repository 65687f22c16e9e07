"""The audit log: one row per change, written in the same transaction as the change.

``record_audit(session, actor, action, subject, detail, now)`` is called by every store
method that changes something on an operator's behalf; ``AuditLog`` reads the rows back.
Actions are ``<resource>.<verb>`` (``rollout.pause``); subjects are ``<resource>/<id>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from fleet_server.storage.database import Transaction, session_factory
from fleet_server.storage.schema import AuditRow


@dataclass(frozen=True, slots=True)
class AuditEntry:
    id: int
    at: datetime
    actor: str
    action: str
    subject: str
    detail: dict[str, Any]


def record_audit(  # noqa: PLR0917 - the six facts of one row, always given in this order
    session: Session,
    actor: str,
    action: str,
    subject: str,
    detail: dict[str, Any],
    now: datetime,
) -> None:
    """Add an audit row to ``session`` (committed with the change it describes)."""
    session.add(AuditRow(at=now, actor=actor, action=action, subject=subject, detail=detail))


class AuditLog:
    """Reads the audit log, newest first.

    Raises:
        StorageError: the database failed.
    """

    def __init__(self, engine: Engine) -> None:
        self._sessions = session_factory(engine)

    def entries(
        self, *, limit: int = 100, subject: str | None = None, actor: str | None = None
    ) -> list[AuditEntry]:
        query = select(AuditRow).order_by(AuditRow.id.desc()).limit(limit)
        if subject is not None:
            query = query.where(AuditRow.subject == subject)
        if actor is not None:
            query = query.where(AuditRow.actor == actor)
        with Transaction(self._sessions(), "reading the audit log") as session:
            return [
                AuditEntry(r.id, r.at, r.actor, r.action, r.subject, dict(r.detail))
                for r in session.scalars(query)
            ]
