"""``/api/v1/alerts``: drift alerts, open or all, filtered and paged."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, Request

from fleet_server.api.deps import MAX_ID, Viewer, context, not_found
from fleet_server.api.schemas import AlertOut, AlertPage, DeviceId, Name
from fleet_server.domain.fleet_drift import Scope
from fleet_server.storage.alert_store import AlertRecord, AlertStore

router = APIRouter(prefix="/alerts", tags=["alerts"])

MAX_PAGE = 500


@router.get("", summary="List alerts (open ones by default)", response_model=AlertPage)
def list_alerts(
    request: Request,
    _: Viewer,
    *,
    state: Annotated[Literal["open", "resolved", "all"], Query()] = "open",
    scope: Scope | None = None,
    scope_key: Name | None = None,
    feature: Name | None = None,
    device: Annotated[DeviceId | None, Query(description="Alerts naming this device")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
) -> AlertPage:
    records = AlertStore(context(request).engine).alerts(open_only=state == "open")
    chosen = [
        r
        for r in records
        if (state != "resolved" or r.resolved_at is not None)
        and (scope is None or r.key.scope == scope)
        and (scope_key is None or r.key.key == scope_key)
        and (feature is None or r.key.feature == feature)
        and (device is None or device in r.devices)
    ]
    # Newest first: what an operator looks at.
    chosen.reverse()
    page = chosen[offset : offset + limit]
    return AlertPage(
        total=len(chosen), limit=limit, offset=offset, items=[alert_out(r) for r in page]
    )


@router.get("/{alert_id}", summary="One alert with its evidence", response_model=AlertOut)
def get_alert(
    request: Request, _: Viewer, alert_id: Annotated[int, Path(ge=1, le=MAX_ID)]
) -> AlertOut:
    try:
        record = AlertStore(context(request).engine).get(alert_id)
    except KeyError:
        raise not_found(f"alert {alert_id}") from None
    return alert_out(record)


def alert_out(record: AlertRecord) -> AlertOut:
    return AlertOut(**record.document())
