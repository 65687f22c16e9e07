"""Tables of the fleet server's database (SQLAlchemy 2.0 typed ORM).

Every table hangs off ``Base.metadata``: later tables (model registry, rollouts) are
added by declaring more ``Base`` subclasses in their own modules, and ``create_schema``
creates whatever is missing.

- ``devices``: one row per device, from its retained ``state`` messages (and created on
  its first telemetry window if the state has not arrived yet).
- ``telemetry_windows``: every accepted window, unique per (device, seq), with the
  decoded window as JSON (the wire document; ``decode_window`` reads it back).
- ``alerts``: drift alerts with their evidence, lifecycle and webhook delivery status.
  At most one open alert per (scope, scope_key, feature, direction): a partial unique
  index (SQLite and PostgreSQL both have them).

Times are stored as timezone-aware UTC datetimes (``UtcDateTime``).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

ID_LENGTH = 64
TEXT_LENGTH = 96
WEBHOOK_STATUSES = ("none", "pending", "delivered", "failed")


class UtcDateTime(TypeDecorator[datetime]):
    """An aware UTC datetime on the way in and out, whatever the database keeps (SQLite
    keeps no zone).

    Raises (on bind):
        ValueError: a naive datetime.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value.isoformat()} given; use UTC-aware times")
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime):
            raise TypeError(f"expected a datetime from the database, got {type(value).__name__}")
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    """Declarative base of every fleet server table."""


class Device(Base):
    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    line: Mapped[str | None] = mapped_column(String(TEXT_LENGTH), index=True)
    profile: Mapped[str | None] = mapped_column(String(TEXT_LENGTH), index=True)
    model: Mapped[str | None] = mapped_column(String(TEXT_LENGTH), index=True)
    edge_version: Mapped[str | None] = mapped_column(String(TEXT_LENGTH))
    status: Mapped[str] = mapped_column(String(16), default="unknown")
    # Features the device's own drift check alarms on (from its state message).
    drift: Mapped[list[str]] = mapped_column(JSON, default=list)
    spool_queued: Mapped[int | None] = mapped_column(Integer)
    spool_dropped: Mapped[int | None] = mapped_column(Integer)
    state_ts: Mapped[int | None] = mapped_column(Integer)  # the device's clock, unix s
    first_seen: Mapped[datetime] = mapped_column(UtcDateTime)
    last_seen: Mapped[datetime] = mapped_column(UtcDateTime)


class TelemetryWindowRow(Base):
    __tablename__ = "telemetry_windows"
    __table_args__ = (UniqueConstraint("device_id", "seq", name="uq_window_device_seq"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"), index=True)
    seq: Mapped[int] = mapped_column(Integer)
    model: Mapped[str] = mapped_column(String(TEXT_LENGTH), index=True)
    ref: Mapped[str] = mapped_column(String(32))
    t0: Mapped[int] = mapped_column(Integer)
    t1: Mapped[int] = mapped_column(Integer, index=True)
    frames: Mapped[int] = mapped_column(Integer)
    window: Mapped[dict[str, Any]] = mapped_column(JSON)
    received_at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)


class AlertRow(Base):
    __tablename__ = "alerts"
    __table_args__ = (
        Index(
            "ux_alerts_open_key",
            "scope",
            "scope_key",
            "feature",
            "direction",
            unique=True,
            sqlite_where=text("resolved_at IS NULL"),
            postgresql_where=text("resolved_at IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    scope: Mapped[str] = mapped_column(String(16))  # device | line | profile | model | fleet
    scope_key: Mapped[str] = mapped_column(String(TEXT_LENGTH))
    feature: Mapped[str] = mapped_column(String(32))
    test: Mapped[str] = mapped_column(String(32))
    direction: Mapped[str] = mapped_column(String(16))
    effect: Mapped[float | None] = mapped_column(Float)
    statistic: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    p_value: Mapped[float | None] = mapped_column(Float)
    since_seq: Mapped[int] = mapped_column(Integer)
    since_t: Mapped[datetime] = mapped_column(UtcDateTime)
    devices: Mapped[list[str]] = mapped_column(JSON)
    evidence: Mapped[dict[str, Any]] = mapped_column(JSON)
    opened_at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)
    resolved_at: Mapped[datetime | None] = mapped_column(UtcDateTime, index=True)
    superseded_by: Mapped[int | None] = mapped_column(ForeignKey("alerts.id"))
    # Consecutive evaluations of the alert's scope without the drift (alerts.AlertPolicy).
    quiet: Mapped[int] = mapped_column(Integer, default=0)
    webhook_status: Mapped[str] = mapped_column(String(16), default="none")
    webhook_event: Mapped[str | None] = mapped_column(String(32))
    webhook_attempts: Mapped[int] = mapped_column(Integer, default=0)
    webhook_error: Mapped[str | None] = mapped_column(String(400))
    webhook_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
