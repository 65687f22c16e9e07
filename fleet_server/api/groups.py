"""``/api/v1/groups``: device groups (a group is the production line devices report)."""

from __future__ import annotations

from collections import Counter
from typing import Annotated

from fastapi import APIRouter, Path, Request
from sqlalchemy import select

from fleet_server.api.deps import Viewer, context, not_found
from fleet_server.api.schemas import TEXT_PATTERN, GroupOut
from fleet_server.storage.database import Transaction, session_factory
from fleet_server.storage.schema import TEXT_LENGTH, Device

router = APIRouter(prefix="/groups", tags=["groups"])

GroupPath = Annotated[str, Path(min_length=1, max_length=TEXT_LENGTH, pattern=TEXT_PATTERN)]


@router.get("", summary="Every group with device counts and models", response_model=list[GroupOut])
def list_groups(request: Request, _: Viewer) -> list[GroupOut]:
    return _groups(request, None)


@router.get("/{name}", summary="One group", response_model=GroupOut)
def get_group(request: Request, _: Viewer, name: GroupPath) -> GroupOut:
    found = _groups(request, name)
    if not found:
        raise not_found(f"group {name!r} (no device reports that line)")
    return found[0]


def _groups(request: Request, only: str | None) -> list[GroupOut]:
    query = select(Device.line, Device.status, Device.model, Device.site).where(
        Device.line.is_not(None)
    )
    if only is not None:
        query = query.where(Device.line == only)
    sessions = session_factory(context(request).engine)
    with Transaction(sessions(), "listing groups") as session:
        rows = list(session.execute(query))
    totals: Counter[str] = Counter()
    online: Counter[str] = Counter()
    models: dict[str, Counter[str]] = {}
    sites: dict[str, set[str]] = {}
    for line, status, model, site in rows:
        if line is None:  # excluded by the query; narrows the type
            continue
        totals[line] += 1
        online[line] += status == "online"
        if model is not None:
            models.setdefault(line, Counter())[model] += 1
        if site is not None:
            sites.setdefault(line, set()).add(site)
    return [
        GroupOut(
            name=line,
            devices=totals[line],
            online=online[line],
            offline=totals[line] - online[line],
            models=dict(sorted(models.get(line, Counter()).items())),
            sites=sorted(sites.get(line, ())),
        )
        for line in sorted(totals)
    ]
