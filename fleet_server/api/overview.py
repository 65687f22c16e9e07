"""``/api/v1/overview``: the fleet at a glance (``FleetViews.overview``)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from fleet_server.api.deps import Viewer, context

router = APIRouter(tags=["overview"])


@router.get(
    "/overview",
    summary="Devices online/offline, by model and group; open alerts; active rollouts",
)
def overview(request: Request, _: Viewer) -> dict[str, Any]:
    ctx = context(request)
    return ctx.views.overview(ctx.clock())
