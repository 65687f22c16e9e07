"""``fleet-server operators ...`` and ``fleet-server tokens ...``: accounts for the console
and the REST API, managed from the server's shell.

- ``operators add USERNAME --role ROLE --db DB``: the password comes from
  ``--password-file FILE`` (its first line), else the ``EDGEFLEET_PASSWORD`` environment
  variable, else an interactive prompt (asked twice); never from a plain argument, which
  other users could read in the process list.
- ``operators list --db DB``: usernames and roles.
- ``tokens issue USERNAME NAME --db DB [--ttl-days N]``: prints a new API token once (the
  database keeps only its hash).

Handlers return exit codes and raise ``AuthError`` (bad username, role, password or
token name), ``StorageError`` (the database) or ``OSError`` (the password file) for the
CLI's ``main`` to print. Every change is written to the audit log with the actor ``cli``.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import select

from fleet_server.auth import Auth, AuthError, Role
from fleet_server.storage import open_database
from fleet_server.storage.database import Transaction, session_factory
from fleet_server.storage.schema import OperatorRow

PASSWORD_ENV = "EDGEFLEET_PASSWORD"
CLI_ACTOR = "cli"


def add_operator_commands(sub: argparse._SubParsersAction[Any]) -> None:
    """Register ``operators add|list`` and ``tokens issue`` on ``sub``."""
    operators = sub.add_parser(
        "operators",
        help="operator accounts (console and API)",
        description="Manage the operator accounts of the console and the REST API.",
    )
    operators_sub = operators.add_subparsers(
        dest="operators_command", required=True, metavar="ACTION"
    )
    add = operators_sub.add_parser(
        "add",
        # No abbreviations: "--password VALUE" must not pass for "--password-file".
        allow_abbrev=False,
        help="add an operator",
        description="Add an operator account. Roles: viewer reads; operator also starts "
        "and steers rollouts and edits devices; admin also manages operators and tokens. "
        f"The password (at least 8 characters) is read from --password-file, else from "
        f"${PASSWORD_ENV}, else asked for on the terminal.",
    )
    add.add_argument("username", metavar="USERNAME")
    add.add_argument("--role", required=True, choices=[r.value for r in Role])
    _db_arg(add)
    add.add_argument(
        "--password-file",
        type=Path,
        metavar="FILE",
        help="read the password from the first line of FILE",
    )
    add.set_defaults(func=cmd_operators_add)

    listing = operators_sub.add_parser(
        "list", help="list operators", description="Print every operator and its role."
    )
    _db_arg(listing)
    listing.set_defaults(func=cmd_operators_list)

    tokens = sub.add_parser(
        "tokens",
        help="API tokens",
        description="Manage the API tokens of operators.",
    )
    tokens_sub = tokens.add_subparsers(dest="tokens_command", required=True, metavar="ACTION")
    issue = tokens_sub.add_parser(
        "issue",
        help="issue an API token",
        description="Issue an API token for USERNAME, named NAME, and print it once; send "
        "it as 'Authorization: Bearer <token>'. It carries the operator's role.",
    )
    issue.add_argument("username", metavar="USERNAME")
    issue.add_argument("name", metavar="NAME", help="what the token is for, e.g. ci")
    _db_arg(issue)
    issue.add_argument(
        "--ttl-days",
        type=_positive_days,
        metavar="N",
        help="the token expires after N days (default: never)",
    )
    issue.set_defaults(func=cmd_tokens_issue)


def cmd_operators_add(args: argparse.Namespace) -> int:
    """Raises AuthError, StorageError, OSError (see the module docstring)."""
    password = read_password(args.password_file, os.environ)
    engine = open_database(args.db)
    try:
        Auth(engine).create_operator(
            args.username, password, args.role, actor=CLI_ACTOR, now=_now()
        )
    finally:
        engine.dispose()
    print(f"operator {args.username} added with role {args.role}")
    return 0


def cmd_operators_list(args: argparse.Namespace) -> int:
    """Raises StorageError."""
    engine = open_database(args.db)
    try:
        query = select(OperatorRow).order_by(OperatorRow.username)
        with Transaction(session_factory(engine)(), "listing operators") as session:
            rows = [(r.username, r.role, r.disabled) for r in session.scalars(query)]
    finally:
        engine.dispose()
    for username, role, disabled in rows:
        print("\t".join([username, role, *(["disabled"] if disabled else [])]))
    return 0


def cmd_tokens_issue(args: argparse.Namespace) -> int:
    """Raises AuthError, StorageError."""
    engine = open_database(args.db)
    ttl = None if args.ttl_days is None else timedelta(days=args.ttl_days)
    try:
        token = Auth(engine).issue_token(
            args.username, args.name, actor=CLI_ACTOR, now=_now(), ttl=ttl
        )
    finally:
        engine.dispose()
    print(token)
    return 0


def read_password(path: Path | None, environ: Mapping[str, str]) -> str:
    """The password from ``path`` (first line), else ``environ[PASSWORD_ENV]``, else the
    terminal (asked twice).

    Raises:
        OSError: the file cannot be read.
        AuthError: an empty password, no terminal to ask on, or two different answers.
    """
    if path is not None:
        lines = path.read_text(encoding="utf-8").splitlines()
        password = lines[0] if lines else ""
        if not password:
            raise AuthError(f"password file {path} is empty")
        return password
    if environ.get(PASSWORD_ENV):
        return environ[PASSWORD_ENV]
    if not sys.stdin.isatty():
        raise AuthError(
            f"no password: give --password-file FILE or set {PASSWORD_ENV} (no terminal to ask on)"
        )
    first = getpass.getpass("Password: ")
    if first != getpass.getpass("Password again: "):
        raise AuthError("the two passwords differ")
    return first


def _db_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--db",
        required=True,
        metavar="DB",
        help="the fleet database: a SQLAlchemy URL or a SQLite file path",
    )


def _positive_days(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of days: {text!r}") from None
    if not 0 < value < 36500:
        raise argparse.ArgumentTypeError(f"--ttl-days must be in (0, 36500), got {text}")
    return value


def _now() -> datetime:
    return datetime.now(timezone.utc)
