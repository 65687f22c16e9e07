"""The first release's tables: devices, telemetry windows, drift alerts.

Revision ID: 0001
Revises: none

Exactly what ``Base.metadata.create_all`` made before migrations existed, so that such a
database is stamped ``0001`` and upgraded in place (``migrate.upgrade_database``).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_ID = 64
_TEXT = 96


def _utc() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "devices",
        sa.Column("id", sa.String(_ID), nullable=False),
        sa.Column("line", sa.String(_TEXT), nullable=True),
        sa.Column("profile", sa.String(_TEXT), nullable=True),
        sa.Column("model", sa.String(_TEXT), nullable=True),
        sa.Column("edge_version", sa.String(_TEXT), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("drift", sa.JSON(), nullable=False),
        sa.Column("spool_queued", sa.Integer(), nullable=True),
        sa.Column("spool_dropped", sa.Integer(), nullable=True),
        sa.Column("state_ts", sa.Integer(), nullable=True),
        sa.Column("first_seen", _utc(), nullable=False),
        sa.Column("last_seen", _utc(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    for column in ("line", "model", "profile"):
        op.create_index(f"ix_devices_{column}", "devices", [column])

    op.create_table(
        "telemetry_windows",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("device_id", sa.String(_ID), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("model", sa.String(_TEXT), nullable=False),
        sa.Column("ref", sa.String(32), nullable=False),
        sa.Column("t0", sa.Integer(), nullable=False),
        sa.Column("t1", sa.Integer(), nullable=False),
        sa.Column("frames", sa.Integer(), nullable=False),
        sa.Column("window", sa.JSON(), nullable=False),
        sa.Column("received_at", _utc(), nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("device_id", "seq", name="uq_window_device_seq"),
    )
    for column in ("device_id", "model", "received_at", "t1"):
        op.create_index(f"ix_telemetry_windows_{column}", "telemetry_windows", [column])

    op.create_table(
        "alerts",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("scope", sa.String(16), nullable=False),
        sa.Column("scope_key", sa.String(_TEXT), nullable=False),
        sa.Column("feature", sa.String(32), nullable=False),
        sa.Column("test", sa.String(32), nullable=False),
        sa.Column("direction", sa.String(16), nullable=False),
        sa.Column("effect", sa.Float(), nullable=True),
        sa.Column("statistic", sa.Float(), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("p_value", sa.Float(), nullable=True),
        sa.Column("since_seq", sa.Integer(), nullable=False),
        sa.Column("since_t", _utc(), nullable=False),
        sa.Column("devices", sa.JSON(), nullable=False),
        sa.Column("evidence", sa.JSON(), nullable=False),
        sa.Column("opened_at", _utc(), nullable=False),
        sa.Column("updated_at", _utc(), nullable=False),
        sa.Column("resolved_at", _utc(), nullable=True),
        sa.Column("superseded_by", sa.Integer(), nullable=True),
        sa.Column("quiet", sa.Integer(), nullable=False),
        sa.Column("webhook_status", sa.String(16), nullable=False),
        sa.Column("webhook_event", sa.String(32), nullable=True),
        sa.Column("webhook_attempts", sa.Integer(), nullable=False),
        sa.Column("webhook_error", sa.String(400), nullable=True),
        sa.Column("webhook_at", _utc(), nullable=True),
        sa.ForeignKeyConstraint(["superseded_by"], ["alerts.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_alerts_opened_at", "alerts", ["opened_at"])
    op.create_index("ix_alerts_resolved_at", "alerts", ["resolved_at"])
    # At most one open alert per key: a partial unique index (SQLite and PostgreSQL).
    op.create_index(
        "ux_alerts_open_key",
        "alerts",
        ["scope", "scope_key", "feature", "direction"],
        unique=True,
        sqlite_where=sa.text("resolved_at IS NULL"),
        postgresql_where=sa.text("resolved_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_table("alerts")
    op.drop_table("telemetry_windows")
    op.drop_table("devices")
