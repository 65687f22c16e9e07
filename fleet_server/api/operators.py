"""``/api/v1/operators``: operator accounts and their API tokens (admin only).

Creating an operator and issuing a token are audited by ``Auth`` in the same transaction.
A username that exists gives 409; a bad username or password gives 400.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Request, status
from sqlalchemy import select

from fleet_server.api.deps import Admin, context, not_found
from fleet_server.api.schemas import (
    TEXT_PATTERN,
    IssuedToken,
    OperatorIn,
    OperatorOut,
    TokenIn,
    TokenOut,
)
from fleet_server.storage.database import Transaction, session_factory
from fleet_server.storage.schema import TEXT_LENGTH, ApiTokenRow, OperatorRow

router = APIRouter(prefix="/operators", tags=["operators"])

Username = Annotated[str, Path(min_length=1, max_length=TEXT_LENGTH, pattern=TEXT_PATTERN)]


@router.get("", summary="Every operator with its API tokens", response_model=list[OperatorOut])
def list_operators(request: Request, _: Admin) -> list[OperatorOut]:
    return _operators(request, None)


@router.post(
    "",
    summary="Add an operator",
    status_code=status.HTTP_201_CREATED,
    response_model=OperatorOut,
)
def create_operator(request: Request, who: Admin, body: OperatorIn) -> OperatorOut:
    ctx = context(request)
    if _operators(request, body.username):
        raise HTTPException(status.HTTP_409_CONFLICT, f"operator {body.username!r} exists")
    ctx.auth.create_operator(
        body.username, body.password, body.role, actor=who.actor, now=ctx.clock()
    )
    return _operators(request, body.username)[0]


@router.post(
    "/{username}/tokens",
    summary="Issue an API token (shown once)",
    status_code=status.HTTP_201_CREATED,
    response_model=IssuedToken,
)
def issue_token(request: Request, who: Admin, username: Username, body: TokenIn) -> IssuedToken:
    ctx = context(request)
    if not _operators(request, username):
        raise not_found(f"operator {username!r}")
    ttl = None if body.ttl_s is None else timedelta(seconds=body.ttl_s)
    token = ctx.auth.issue_token(username, body.name, actor=who.actor, now=ctx.clock(), ttl=ttl)
    return IssuedToken(username=username, name=body.name, token=token)


def _operators(request: Request, only: str | None) -> list[OperatorOut]:
    query = select(OperatorRow).order_by(OperatorRow.username)
    if only is not None:
        query = query.where(OperatorRow.username == only)
    sessions = session_factory(context(request).engine)
    with Transaction(sessions(), "listing operators") as session:
        operators = list(session.scalars(query))
        tokens = session.scalars(
            select(ApiTokenRow)
            .where(
                ApiTokenRow.kind == "api",
                ApiTokenRow.operator_id.in_([op.id for op in operators]),
            )
            .order_by(ApiTokenRow.id)
        )
        by_operator: dict[int, list[TokenOut]] = {}
        for t in tokens:
            by_operator.setdefault(t.operator_id, []).append(
                TokenOut(
                    name=t.name,
                    kind=t.kind,
                    created_at=t.created_at,
                    expires_at=t.expires_at,
                    revoked_at=t.revoked_at,
                    last_used_at=t.last_used_at,
                )
            )
    return [
        OperatorOut(
            id=op.id,
            username=op.username,
            role=op.role,
            disabled=op.disabled,
            created_at=op.created_at,
            tokens=by_operator.get(op.id, []),
        )
        for op in operators
    ]
