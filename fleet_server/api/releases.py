"""``/api/v1/releases``: the registry's released bundles, and mirroring the signed
release role into it (``POST /releases/sync``, operator, audited as ``release.sync``)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Request, status

from fleet_server.api.deps import Operator, Viewer, context
from fleet_server.api.schemas import RELEASE_KEY_LENGTH, TEXT_PATTERN, ReleaseOut, SyncOut
from fleet_server.storage.audit import record_audit
from fleet_server.storage.database import Transaction, session_factory

router = APIRouter(prefix="/releases", tags=["releases"])


@router.get(
    "",
    summary="Every release, as the signed release role lists them",
    response_model=list[ReleaseOut],
)
def list_releases(request: Request, _: Viewer) -> list[dict[str, Any]]:
    return [r.document() for r in context(request).registry.releases()]


@router.post(
    "/sync",
    summary="Mirror the signed release role into the registry (operator)",
    response_model=SyncOut,
    responses={409: {"description": "This server has no signed repository to read."}},
)
def sync_releases(request: Request, who: Operator) -> SyncOut:
    ctx = context(request)
    if ctx.repository is None:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            "this server has no signed repository to sync the registry from",
        )
    now = ctx.clock()
    added = ctx.registry.sync(ctx.repository, now=now)
    with Transaction(session_factory(ctx.engine)(), "auditing a registry sync") as session:
        record_audit(session, who.actor, "release.sync", "releases", {"added": added}, now)
    return SyncOut(added=added)


@router.get(
    "/{key:path}",
    summary="One release by id, name@version or target path",
    response_model=ReleaseOut,
)
def get_release(
    request: Request,
    _: Viewer,
    key: Annotated[str, Path(min_length=1, max_length=RELEASE_KEY_LENGTH, pattern=TEXT_PATTERN)],
) -> dict[str, Any]:
    return context(request).registry.release(key).document()
