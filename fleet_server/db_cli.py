"""``fleet-server db``: the fleet database's schema revision (Alembic migrations).

``add_db_commands(sub)`` adds ``db upgrade``, ``db current`` and ``db stamp`` to the
``fleet-server`` parser; each command's ``func(args)`` returns the exit code and raises
StorageError (printed by ``fleet-server`` as an error, exit 2) when the database fails.
"""

from __future__ import annotations

import argparse

from fleet_server.storage.database import connect_database
from fleet_server.storage.migrate import (
    current_revision,
    head_revision,
    known_revisions,
    stamp_database,
    upgrade_database,
)

_DB_HELP = (
    "the database: a SQLAlchemy URL (sqlite:///fleet.db, "
    "postgresql+psycopg://user:password@host/dbname) or a SQLite file path"
)


def add_db_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``db`` and its actions to the ``fleet-server`` subcommands ``sub``."""
    db = sub.add_parser(
        "db",
        help="the database schema (migrations)",
        description="Show or change the schema revision of the fleet database. Every "
        "fleet-server command that opens the database upgrades it to the newest revision "
        "by itself; these commands do it ahead of time (before starting several server "
        "processes on a new version) or inspect it.",
    )
    db_sub = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")

    upgrade = db_sub.add_parser(
        "upgrade",
        help="migrate the database to the newest schema revision",
        description="Migrate the database to --revision (default: the newest) in one "
        "transaction under a migration lock, so several processes may run it at once. A "
        "database made before migrations existed (tables devices, telemetry_windows and "
        "alerts, no revision) is recorded as revision 0001 first and upgraded in place. "
        "Prints the revision reached.",
    )
    _db_arg(upgrade)
    upgrade.add_argument(
        "--revision", default="head", metavar="REV", help="target revision (default: head)"
    )
    upgrade.set_defaults(func=_cmd_upgrade)

    current = db_sub.add_parser(
        "current",
        help="print the database's schema revision",
        description="Print the database's schema revision, with '(head)' when it is the "
        "newest this version knows, or 'none' for a database never migrated. Changes "
        "nothing.",
    )
    _db_arg(current)
    current.set_defaults(func=_cmd_current)

    stamp = db_sub.add_parser(
        "stamp",
        help="record a schema revision without migrating",
        description="Record REVISION as the database's schema revision without changing "
        "any table: for a database whose tables were checked by hand against that "
        f"revision. Known revisions: {', '.join(known_revisions())}.",
    )
    stamp.add_argument("revision", metavar="REVISION", help="a known revision, or 'head'")
    _db_arg(stamp)
    stamp.set_defaults(func=_cmd_stamp)


def _db_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", required=True, metavar="URL", help=_DB_HELP)


def _cmd_upgrade(args: argparse.Namespace) -> int:
    engine = connect_database(args.db)
    try:
        before = current_revision(engine)
        after = upgrade_database(engine, args.revision)
    finally:
        engine.dispose()
    shown = engine.url.render_as_string(hide_password=True)
    change = "already at" if before == after else f"upgraded from {before or 'none'} to"
    print(f"{shown}: {change} {_describe(after)}")
    return 0


def _cmd_current(args: argparse.Namespace) -> int:
    engine = connect_database(args.db)
    try:
        revision = current_revision(engine)
    finally:
        engine.dispose()
    print(_describe(revision))
    return 0


def _cmd_stamp(args: argparse.Namespace) -> int:
    revision = head_revision() if args.revision == "head" else args.revision
    engine = connect_database(args.db)
    try:
        stamp_database(engine, revision)
    finally:
        engine.dispose()
    print(f"{engine.url.render_as_string(hide_password=True)}: stamped {_describe(revision)}")
    return 0


def _describe(revision: str | None) -> str:
    if revision is None:
        return "none"
    return f"{revision} (head)" if revision == head_revision() else revision
