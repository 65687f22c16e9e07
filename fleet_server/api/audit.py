"""``/api/v1/audit``: the audit log (who changed what, when), newest first."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request

from fleet_server.api.deps import Viewer, context
from fleet_server.api.schemas import TEXT_PATTERN, AuditOut
from fleet_server.storage.audit import AuditLog
from fleet_server.storage.schema import TEXT_LENGTH

router = APIRouter(prefix="/audit", tags=["audit"])

MAX_ENTRIES = 1000


@router.get("", summary="The latest audit entries", response_model=list[AuditOut])
def list_audit(
    request: Request,
    _: Viewer,
    limit: Annotated[int, Query(ge=1, le=MAX_ENTRIES)] = 100,
    subject: Annotated[
        str | None,
        Query(max_length=200, pattern=TEXT_PATTERN, description="e.g. rollout/3, device/cam-7"),
    ] = None,
    actor: Annotated[str | None, Query(max_length=TEXT_LENGTH, pattern=TEXT_PATTERN)] = None,
) -> list[AuditOut]:
    entries = AuditLog(context(request).engine).entries(limit=limit, subject=subject, actor=actor)
    return [
        AuditOut(
            id=e.id, at=e.at, actor=e.actor, action=e.action, subject=e.subject, detail=e.detail
        )
        for e in entries
    ]
