"""Tables of the fleet server's database (SQLAlchemy 2.0 typed ORM).

Every table hangs off ``Base.metadata``. Each change here needs its Alembic revision in
``fleet_server/storage/migrations/versions`` (``open_database`` migrates to the newest);
``python -m fleet_server.storage.migrations check`` lists changes that lack one.

- ``devices``: one row per device, from its retained ``state`` messages (and created on
  its first telemetry window if the state has not arrived yet).
- ``telemetry_windows``: every accepted window, unique per (device, seq), with the
  decoded window as JSON (the wire document; ``decode_window`` reads it back).
- ``alerts``: drift alerts with their evidence, lifecycle and webhook delivery status.
  At most one open alert per (scope, scope_key, feature, direction): a partial unique
  index (SQLite and PostgreSQL both have them).
- ``releases``: the model registry, mirrored from the signed ``release`` role (one row per
  released bundle target) with the bundle's model card.
- ``rollouts``, ``rollout_waves``, ``rollout_devices``: staged rollouts, their waves with
  the gate figures, and every targeted or skipped device with its progress.
- ``update_events``: the devices' update events (``devices/{id}/events``), as sent.
- ``operators``, ``api_tokens``: operator accounts and their tokens (API tokens and
  console sessions; only a SHA-256 of each token is stored).
- ``audit_log``: every change made through the API, the console or the CLI: who, what,
  when.

Times are stored as timezone-aware UTC datetimes (``UtcDateTime``).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
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

# Window seqs count milliseconds since the epoch (beyond a 32-bit INTEGER on PostgreSQL).
# SQLite's INTEGER already holds 64 bits: keeping it there spares a SQLite fleet database
# a rebuild of its largest table on upgrade (see docs/adr/0012).
BigInt = BigInteger().with_variant(Integer(), "sqlite")


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
    # The device's group: the production line it reports in its state.
    line: Mapped[str | None] = mapped_column(String(TEXT_LENGTH), index=True)
    # Set by an operator (the device does not know its site).
    site: Mapped[str | None] = mapped_column(String(TEXT_LENGTH), index=True)
    profile: Mapped[str | None] = mapped_column(String(TEXT_LENGTH), index=True)
    model: Mapped[str | None] = mapped_column(String(TEXT_LENGTH), index=True)
    # The model the device ran before ``model`` (kept when the state reports a new one).
    previous_model: Mapped[str | None] = mapped_column(String(TEXT_LENGTH))
    edge_version: Mapped[str | None] = mapped_column(String(TEXT_LENGTH))
    status: Mapped[str] = mapped_column(String(16), default="unknown")
    # Features the device's own drift check alarms on (from its state message).
    drift: Mapped[list[str]] = mapped_column(JSON, default=list)
    spool_queued: Mapped[int | None] = mapped_column(Integer)
    spool_dropped: Mapped[int | None] = mapped_column(Integer)
    state_ts: Mapped[int | None] = mapped_column(BigInt)  # the device's clock, unix s
    first_seen: Mapped[datetime] = mapped_column(UtcDateTime)
    last_seen: Mapped[datetime] = mapped_column(UtcDateTime)


class TelemetryWindowRow(Base):
    __tablename__ = "telemetry_windows"
    __table_args__ = (UniqueConstraint("device_id", "seq", name="uq_window_device_seq"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"), index=True)
    seq: Mapped[int] = mapped_column(BigInt)
    model: Mapped[str] = mapped_column(String(TEXT_LENGTH), index=True)
    ref: Mapped[str] = mapped_column(String(32))
    t0: Mapped[int] = mapped_column(BigInt)
    t1: Mapped[int] = mapped_column(BigInt, index=True)
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
    since_seq: Mapped[int] = mapped_column(BigInt)
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


class ReleaseRow(Base):
    """A released bundle (``models/<name>-<version>.tar``) as the ``release`` role lists it."""

    __tablename__ = "releases"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_release_name_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    target_path: Mapped[str] = mapped_column(String(200), unique=True)
    name: Mapped[str] = mapped_column(String(TEXT_LENGTH), index=True)
    version: Mapped[str] = mapped_column(String(TEXT_LENGTH))
    runtime: Mapped[str] = mapped_column(String(32))
    profiles: Mapped[list[str]] = mapped_column(JSON)
    size: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    release_counter: Mapped[int] = mapped_column(Integer)
    # The bundle's model card (bundle.json's descriptive fields), shown in the console.
    model_card: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    released_at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)


class RolloutRow(Base):
    __tablename__ = "rollouts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    release_id: Mapped[int] = mapped_column(ForeignKey("releases.id"), index=True)
    # pending | running | paused | halted | completed | aborted | rolled_back
    state: Mapped[str] = mapped_column(String(16), index=True)
    # {"groups": [...], "sites": [...], "profiles": [...], "devices": [...]}
    target: Mapped[dict[str, Any]] = mapped_column(JSON)
    # The wave plan as given, e.g. [{"devices": 1}, {"percent": 10}, {"percent": 100}].
    plan: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    # Gate thresholds (names to numbers); see fleet_server.domain.rollout.
    gates: Mapped[dict[str, Any]] = mapped_column(JSON)
    pause_s: Mapped[float] = mapped_column(Float)
    auto_rollback: Mapped[bool] = mapped_column(default=False)
    current_wave: Mapped[int] = mapped_column(Integer, default=0)
    reason: Mapped[str | None] = mapped_column(String(400))
    created_by: Mapped[str] = mapped_column(String(TEXT_LENGTH))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)


class RolloutWaveRow(Base):
    __tablename__ = "rollout_waves"
    __table_args__ = (UniqueConstraint("rollout_id", "number", name="uq_wave_rollout_number"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    rollout_id: Mapped[int] = mapped_column(ForeignKey("rollouts.id"), index=True)
    number: Mapped[int] = mapped_column(Integer)  # 0-based
    size: Mapped[int] = mapped_column(Integer)
    # pending | assigned | observing | passed | failed | rolled_back | aborted
    state: Mapped[str] = mapped_column(String(16))
    # Gate name -> {"value": x, "limit": y, "passed": bool, "detail": "..."}
    gate_results: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class RolloutDeviceRow(Base):
    __tablename__ = "rollout_devices"
    __table_args__ = (UniqueConstraint("rollout_id", "device_id", name="uq_rollout_device"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    rollout_id: Mapped[int] = mapped_column(ForeignKey("rollouts.id"), index=True)
    device_id: Mapped[str] = mapped_column(String(ID_LENGTH), index=True)
    wave: Mapped[int | None] = mapped_column(Integer)  # None: skipped
    # skipped | pending | assigned | activated | failed | rolled_back
    status: Mapped[str] = mapped_column(String(16), index=True)
    reason: Mapped[str | None] = mapped_column(String(400))
    # The model the device ran before the rollout (what a rollback assigns again).
    previous_target: Mapped[str | None] = mapped_column(String(200))
    assigned_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    activated_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class UpdateEventRow(Base):
    __tablename__ = "update_events"
    __table_args__ = (Index("ix_update_events_device_received", "device_id", "received_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(ID_LENGTH))
    event: Mapped[str] = mapped_column(String(32), index=True)
    ts: Mapped[float] = mapped_column(Float)  # the device's clock
    target: Mapped[str | None] = mapped_column(String(200), index=True)
    sha256: Mapped[str | None] = mapped_column(String(64))
    percent: Mapped[int | None] = mapped_column(Integer)
    reason: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[str | None] = mapped_column(String(400))
    figures: Mapped[dict[str, float]] = mapped_column(JSON, default=dict)
    received_at: Mapped[datetime] = mapped_column(UtcDateTime)


class OperatorRow(Base):
    __tablename__ = "operators"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    username: Mapped[str] = mapped_column(String(TEXT_LENGTH), unique=True)
    password_hash: Mapped[str] = mapped_column(String(200))
    role: Mapped[str] = mapped_column(String(16))  # viewer | operator | admin
    disabled: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)


class ApiTokenRow(Base):
    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    operator_id: Mapped[int] = mapped_column(ForeignKey("operators.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # api | session
    name: Mapped[str] = mapped_column(String(TEXT_LENGTH))
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    last_used_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class AuditRow(Base):
    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)
    actor: Mapped[str] = mapped_column(String(TEXT_LENGTH), index=True)
    action: Mapped[str] = mapped_column(String(64), index=True)  # e.g. rollout.pause
    subject: Mapped[str] = mapped_column(String(200))  # e.g. rollout/3, device/cam-7
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
