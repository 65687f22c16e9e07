"""Operator accounts, roles and tokens (API tokens and console sessions).

Roles are ordered: ``viewer`` reads, ``operator`` also starts and steers rollouts and edits
devices, ``admin`` also manages operators and tokens. A token is 32 random bytes, shown
once; the database keeps only its SHA-256, so a stolen database yields no usable token.
Passwords are hashed with scrypt (stdlib, salted, parameters stored with the hash).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from sqlalchemy import Engine, select

from fleet_server.storage.audit import record_audit
from fleet_server.storage.database import Transaction, session_factory
from fleet_server.storage.schema import TEXT_LENGTH, ApiTokenRow, OperatorRow

SESSION_TTL = timedelta(hours=12)
MIN_PASSWORD_CHARS = 8
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1


class Role(StrEnum):
    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return _RANKS[self]

    def allows(self, needed: Role) -> bool:
        """True when this role may do what ``needed`` may."""
        return self.rank >= needed.rank


_RANKS = {Role.VIEWER: 0, Role.OPERATOR: 1, Role.ADMIN: 2}


class AuthError(ValueError):
    """A bad username, password, role or token request; the message says which."""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is asking: the operator behind a verified token or session."""

    operator_id: int
    username: str
    role: Role
    token_name: str

    @property
    def actor(self) -> str:
        """The name written to the audit log."""
        if self.token_name == "session":
            return self.username
        return f"{self.username}:{self.token_name}"


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(
        password.encode(), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P, dklen=32
    )
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${salt.hex()}${digest.hex()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        kind, n, r, p, salt, digest = stored.split("$")
        if kind != "scrypt":
            return False
        got = hashlib.scrypt(
            password.encode(),
            salt=bytes.fromhex(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=len(digest) // 2,
        )
    except ValueError:
        return False
    return hmac.compare_digest(got.hex(), digest)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Auth:
    """Operators and tokens in the fleet database. Thread-safe (a session per call).

    Raises (every method):
        StorageError: the database failed.
    """

    def __init__(self, engine: Engine) -> None:
        self._sessions = session_factory(engine)

    def create_operator(
        self, username: str, password: str, role: Role | str, *, actor: str, now: datetime
    ) -> int:
        """Add an operator and return its id.

        Raises:
            AuthError: empty or too long username, short password, unknown role, or the
                username is taken.
        """
        role = _role(role)
        if not username or len(username) > TEXT_LENGTH or not username.isprintable():
            raise AuthError(f"username must be 1-{TEXT_LENGTH} printable characters")
        if len(password) < MIN_PASSWORD_CHARS:
            raise AuthError(f"password must have at least {MIN_PASSWORD_CHARS} characters")
        with self._transaction(f"adding operator {username}") as session:
            if session.scalar(select(OperatorRow.id).where(OperatorRow.username == username)):
                raise AuthError(f"operator {username!r} already exists")
            row = OperatorRow(
                username=username,
                password_hash=hash_password(password),
                role=role.value,
                disabled=False,
                created_at=now,
            )
            session.add(row)
            session.flush()
            record_audit(
                session, actor, "operator.create", f"operator/{username}", {"role": role}, now
            )
            return row.id

    def has_operators(self) -> bool:
        with self._transaction("counting operators") as session:
            return session.scalar(select(OperatorRow.id).limit(1)) is not None

    def login(self, username: str, password: str, *, now: datetime) -> str | None:
        """A new console session token for a correct username and password, else None."""
        with self._transaction(f"logging in {username}") as session:
            row = session.scalar(select(OperatorRow).where(OperatorRow.username == username))
            if row is None or row.disabled or not verify_password(password, row.password_hash):
                return None
            token = secrets.token_urlsafe(32)
            session.add(
                ApiTokenRow(
                    operator_id=row.id,
                    kind="session",
                    name="session",
                    token_sha256=token_digest(token),
                    created_at=now,
                    expires_at=now + SESSION_TTL,
                )
            )
            record_audit(session, username, "operator.login", f"operator/{username}", {}, now)
            return token

    def issue_token(
        self,
        username: str,
        name: str,
        *,
        actor: str,
        now: datetime,
        ttl: timedelta | None = None,
    ) -> str:
        """A new API token for ``username`` (shown once; only its hash is kept).

        Raises:
            AuthError: unknown operator or an empty token name.
        """
        if not name or len(name) > TEXT_LENGTH or name == "session":
            raise AuthError(f"token name must be 1-{TEXT_LENGTH} characters, not 'session'")
        with self._transaction(f"issuing a token for {username}") as session:
            row = session.scalar(select(OperatorRow).where(OperatorRow.username == username))
            if row is None:
                raise AuthError(f"no operator {username!r}")
            token = secrets.token_urlsafe(32)
            session.add(
                ApiTokenRow(
                    operator_id=row.id,
                    kind="api",
                    name=name,
                    token_sha256=token_digest(token),
                    created_at=now,
                    expires_at=None if ttl is None else now + ttl,
                )
            )
            record_audit(session, actor, "token.issue", f"operator/{username}", {"name": name}, now)
            return token

    def verify(self, token: str, *, now: datetime) -> Principal | None:
        """The principal behind a live token or session, else None."""
        if not token:
            return None
        with self._transaction("checking a token") as session:
            found = session.execute(
                select(ApiTokenRow, OperatorRow)
                .join(OperatorRow, OperatorRow.id == ApiTokenRow.operator_id)
                .where(ApiTokenRow.token_sha256 == token_digest(token))
            ).first()
            if found is None:
                return None
            tok, op = found
            if tok.revoked_at is not None or op.disabled:
                return None
            if tok.expires_at is not None and tok.expires_at <= now:
                return None
            tok.last_used_at = now
            return Principal(op.id, op.username, Role(op.role), tok.name)

    def revoke(self, token: str, *, now: datetime) -> bool:
        """Revoke a token or end a session; True if it was live."""
        with self._transaction("revoking a token") as session:
            tok = session.scalar(
                select(ApiTokenRow).where(ApiTokenRow.token_sha256 == token_digest(token))
            )
            if tok is None or tok.revoked_at is not None:
                return False
            tok.revoked_at = now
            return True

    def _transaction(self, what: str) -> Transaction:
        return Transaction(self._sessions(), what)


def _role(role: Role | str) -> Role:
    try:
        return Role(role)
    except ValueError:
        raise AuthError(
            f"unknown role {role!r}; expected one of {', '.join(r.value for r in Role)}"
        ) from None
