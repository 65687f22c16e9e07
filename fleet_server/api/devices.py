"""``/api/v1/devices``: the inventory, one device with its model history, operator edits."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, Request
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from fleet_server.api.deps import Operator, Viewer, context, not_found
from fleet_server.api.schemas import (
    DEVICE_ID_PATTERN,
    DeviceDetail,
    DeviceOut,
    DevicePage,
    DevicePatch,
    ModelChange,
    Name,
    UpdateEventOut,
)
from fleet_server.storage.audit import record_audit
from fleet_server.storage.database import Transaction, session_factory
from fleet_server.storage.schema import ID_LENGTH, Device, ReleaseRow, UpdateEventRow

router = APIRouter(prefix="/devices", tags=["devices"])

MAX_PAGE = 500
EVENTS_SHOWN = 50
HISTORY = 200
MODEL_EVENTS = ("activated", "rolled_back")
DevicePath = Annotated[str, Path(max_length=ID_LENGTH, pattern=DEVICE_ID_PATTERN)]


@router.get("", summary="List devices, filtered and paged", response_model=DevicePage)
def list_devices(
    request: Request,
    _: Viewer,
    *,
    group: Annotated[Name | None, Query(description="The device's line.")] = None,
    site: Name | None = None,
    profile: Name | None = None,
    model: Annotated[Name | None, Query(description="name@version, or a name")] = None,
    status: Literal["online", "offline", "unknown"] | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
) -> DevicePage:
    query = select(Device)
    if group is not None:
        query = query.where(Device.line == group)
    if site is not None:
        query = query.where(Device.site == site)
    if profile is not None:
        query = query.where(Device.profile == profile)
    if model is not None:
        # "name" matches every version of the model; "name@version" one version.
        query = query.where(
            Device.model == model
            if "@" in model
            else Device.model.startswith(f"{model}@", autoescape=True)
        )
    if status is not None:
        query = query.where(Device.status == status)
    with _transaction(request, "listing devices") as session:
        total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
        rows = session.scalars(query.order_by(Device.id).limit(limit).offset(offset))
        items = [device_out(row) for row in rows]
    return DevicePage(total=total, limit=limit, offset=offset, items=items)


@router.get(
    "/{device_id}", summary="One device with its model history", response_model=DeviceDetail
)
def get_device(request: Request, _: Viewer, device_id: DevicePath) -> DeviceDetail:
    with _transaction(request, f"reading device {device_id}") as session:
        row = session.get(Device, device_id)
        if row is None:
            raise not_found(f"device {device_id!r}")
        events = _events(session, device_id, kinds=None, limit=EVENTS_SHOWN)
        history = [
            ModelChange(at=e.received_at, event=e.event, target=e.target, model=e.model)
            for e in reversed(_events(session, device_id, kinds=MODEL_EVENTS, limit=HISTORY))
        ]
        return DeviceDetail(**device_out(row).model_dump(), model_history=history, events=events)


@router.patch(
    "/{device_id}",
    summary="Set a device's site or line (operator)",
    response_model=DeviceOut,
)
def patch_device(
    request: Request, who: Operator, device_id: DevicePath, patch: DevicePatch
) -> DeviceOut:
    ctx = context(request)
    now = ctx.clock()
    with _transaction(request, f"editing device {device_id}") as session:
        row = session.get(Device, device_id)
        if row is None:
            raise not_found(f"device {device_id!r}")
        changes: dict[str, object] = {}
        for field in sorted(patch.model_fields_set):
            value = getattr(patch, field)
            old = getattr(row, field)
            if value != old:
                setattr(row, field, value)
                changes[field] = {"from": old, "to": value}
        if changes:
            record_audit(session, who.actor, "device.update", f"device/{device_id}", changes, now)
        return device_out(row)


def device_out(row: Device) -> DeviceOut:
    """The API form of a device row."""
    return DeviceOut(
        id=row.id,
        group=row.line,
        site=row.site,
        profile=row.profile,
        model=row.model,
        previous_model=row.previous_model,
        edge_version=row.edge_version,
        status=row.status,
        drift=list(row.drift or ()),
        spool_queued=row.spool_queued,
        spool_dropped=row.spool_dropped,
        first_seen=row.first_seen,
        last_seen=row.last_seen,
    )


def _events(
    session: Session, device_id: str, *, kinds: tuple[str, ...] | None, limit: int
) -> list[UpdateEventOut]:
    """The device's latest update events (of ``kinds``, None: all), newest first, with the
    released model named."""
    query = (
        select(UpdateEventRow, ReleaseRow.name, ReleaseRow.version)
        .outerjoin(ReleaseRow, ReleaseRow.target_path == UpdateEventRow.target)
        .where(UpdateEventRow.device_id == device_id)
    )
    if kinds is not None:
        query = query.where(UpdateEventRow.event.in_(kinds))
    rows = session.execute(query.order_by(UpdateEventRow.id.desc()).limit(limit))
    return [
        UpdateEventOut(
            id=e.id,
            event=e.event,
            ts=e.ts,
            received_at=e.received_at,
            target=e.target,
            model=None if name is None else f"{name}@{version}",
            sha256=e.sha256,
            percent=e.percent,
            reason=e.reason,
            detail=e.detail,
            figures=dict(e.figures or {}),
        )
        for e, name, version in rows
    ]


def _transaction(request: Request, what: str) -> Transaction:
    return Transaction(session_factory(context(request).engine)(), what)
