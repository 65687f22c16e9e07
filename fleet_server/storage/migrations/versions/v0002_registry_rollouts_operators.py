"""The registry, staged rollouts, update events, operators, tokens and the audit log;
devices get a site and their previous model; seq and clock columns become 64-bit.

Revision ID: 0002
Revises: 0001

Window seqs count milliseconds since the epoch, beyond a 32-bit INTEGER on PostgreSQL.
SQLite's INTEGER already holds 64 bits, so there the columns stay as they are (the
schema declares them ``BigInteger`` with an ``Integer`` variant for SQLite): no rebuild
of the window table on upgrade.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_ID = 64
_TEXT = 96
# (table, column, nullable) of the columns that become 64-bit.
_WIDENED = (
    ("devices", "state_ts", True),
    ("telemetry_windows", "seq", False),
    ("telemetry_windows", "t0", False),
    ("telemetry_windows", "t1", False),
    ("alerts", "since_seq", False),
)


def _utc() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def _id() -> sa.Column[int]:
    return sa.Column("id", sa.Integer(), autoincrement=True, nullable=False)


def upgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("site", sa.String(_TEXT), nullable=True))
        batch.add_column(sa.Column("previous_model", sa.String(_TEXT), nullable=True))
        batch.create_index("ix_devices_site", ["site"])
    if op.get_context().dialect.name != "sqlite":
        for table, column, nullable in _WIDENED:
            op.alter_column(
                table,
                column,
                type_=sa.BigInteger(),
                existing_type=sa.Integer(),
                existing_nullable=nullable,
            )
    _create_registry()
    _create_rollouts()
    _create_events_and_operators()


def _create_registry() -> None:
    op.create_table(
        "releases",
        _id(),
        sa.Column("target_path", sa.String(200), nullable=False),
        sa.Column("name", sa.String(_TEXT), nullable=False),
        sa.Column("version", sa.String(_TEXT), nullable=False),
        sa.Column("runtime", sa.String(32), nullable=False),
        sa.Column("profiles", sa.JSON(), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("release_counter", sa.Integer(), nullable=False),
        sa.Column("model_card", sa.JSON(), nullable=False),
        sa.Column("released_at", _utc(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name", "version", name="uq_release_name_version"),
        sa.UniqueConstraint("target_path"),
    )
    op.create_index("ix_releases_name", "releases", ["name"])
    op.create_index("ix_releases_released_at", "releases", ["released_at"])


def _create_rollouts() -> None:
    op.create_table(
        "rollouts",
        _id(),
        sa.Column("release_id", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("target", sa.JSON(), nullable=False),
        sa.Column("plan", sa.JSON(), nullable=False),
        sa.Column("gates", sa.JSON(), nullable=False),
        sa.Column("pause_s", sa.Float(), nullable=False),
        sa.Column("auto_rollback", sa.Boolean(), nullable=False),
        sa.Column("current_wave", sa.Integer(), nullable=False),
        sa.Column("reason", sa.String(400), nullable=True),
        sa.Column("created_by", sa.String(_TEXT), nullable=False),
        sa.Column("created_at", _utc(), nullable=False),
        sa.Column("updated_at", _utc(), nullable=False),
        sa.ForeignKeyConstraint(["release_id"], ["releases.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    for column in ("created_at", "release_id", "state"):
        op.create_index(f"ix_rollouts_{column}", "rollouts", [column])

    op.create_table(
        "rollout_waves",
        _id(),
        sa.Column("rollout_id", sa.Integer(), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("gate_results", sa.JSON(), nullable=False),
        sa.Column("started_at", _utc(), nullable=True),
        sa.Column("finished_at", _utc(), nullable=True),
        sa.ForeignKeyConstraint(["rollout_id"], ["rollouts.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("rollout_id", "number", name="uq_wave_rollout_number"),
    )
    op.create_index("ix_rollout_waves_rollout_id", "rollout_waves", ["rollout_id"])

    op.create_table(
        "rollout_devices",
        _id(),
        sa.Column("rollout_id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.String(_ID), nullable=False),
        sa.Column("wave", sa.Integer(), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(400), nullable=True),
        sa.Column("previous_target", sa.String(200), nullable=True),
        sa.Column("assigned_at", _utc(), nullable=True),
        sa.Column("activated_at", _utc(), nullable=True),
        sa.ForeignKeyConstraint(["rollout_id"], ["rollouts.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("rollout_id", "device_id", name="uq_rollout_device"),
    )
    for column in ("device_id", "rollout_id", "status"):
        op.create_index(f"ix_rollout_devices_{column}", "rollout_devices", [column])


def _create_events_and_operators() -> None:
    op.create_table(
        "update_events",
        _id(),
        sa.Column("device_id", sa.String(_ID), nullable=False),
        sa.Column("event", sa.String(32), nullable=False),
        sa.Column("ts", sa.Float(), nullable=False),
        sa.Column("target", sa.String(200), nullable=True),
        sa.Column("sha256", sa.String(64), nullable=True),
        sa.Column("percent", sa.Integer(), nullable=True),
        sa.Column("reason", sa.String(64), nullable=True),
        sa.Column("detail", sa.String(400), nullable=True),
        sa.Column("figures", sa.JSON(), nullable=False),
        sa.Column("received_at", _utc(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "ix_update_events_device_received", "update_events", ["device_id", "received_at"]
    )
    op.create_index("ix_update_events_event", "update_events", ["event"])
    op.create_index("ix_update_events_target", "update_events", ["target"])

    op.create_table(
        "operators",
        _id(),
        sa.Column("username", sa.String(_TEXT), nullable=False),
        sa.Column("password_hash", sa.String(200), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("disabled", sa.Boolean(), nullable=False),
        sa.Column("created_at", _utc(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("username"),
    )
    op.create_table(
        "api_tokens",
        _id(),
        sa.Column("operator_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("name", sa.String(_TEXT), nullable=False),
        sa.Column("token_sha256", sa.String(64), nullable=False),
        sa.Column("created_at", _utc(), nullable=False),
        sa.Column("expires_at", _utc(), nullable=True),
        sa.Column("revoked_at", _utc(), nullable=True),
        sa.Column("last_used_at", _utc(), nullable=True),
        sa.ForeignKeyConstraint(["operator_id"], ["operators.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("token_sha256"),
    )
    op.create_index("ix_api_tokens_operator_id", "api_tokens", ["operator_id"])

    op.create_table(
        "audit_log",
        _id(),
        sa.Column("at", _utc(), nullable=False),
        sa.Column("actor", sa.String(_TEXT), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("subject", sa.String(200), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    for column in ("action", "actor", "at"):
        op.create_index(f"ix_audit_log_{column}", "audit_log", [column])


def downgrade() -> None:
    for table in (
        "audit_log",
        "api_tokens",
        "operators",
        "update_events",
        "rollout_devices",
        "rollout_waves",
        "rollouts",
        "releases",
    ):
        op.drop_table(table)
    if op.get_context().dialect.name != "sqlite":
        for table, column, nullable in _WIDENED:
            op.alter_column(
                table,
                column,
                type_=sa.Integer(),
                existing_type=sa.BigInteger(),
                existing_nullable=nullable,
            )
    with op.batch_alter_table("devices") as batch:
        batch.drop_index("ix_devices_site")
        batch.drop_column("previous_model")
        batch.drop_column("site")
