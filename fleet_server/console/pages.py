"""The console's read pages: fleet overview, devices, one device, models, drift.

Every page needs a live session (``web.session_of``); the data comes from ``FleetViews``
and the ``Registry`` in the app context, the same queries the REST API serves.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from markupsafe import Markup

from fleet_server.api.deps import context
from fleet_server.console.charts import heat_class
from fleet_server.console.device_charts import device_charts
from fleet_server.console.web import PageNotFound, render, session_of
from fleet_server.storage.fleet_views import MAX_PAGE, STATUSES

router = APIRouter(include_in_schema=False)
PAGE_SIZE = 50
CHART_WINDOWS = 120
_FILTER = Annotated[str | None, Query(max_length=96)]


@router.get("/")
def overview(request: Request) -> Response:
    viewer = session_of(request)
    ctx = context(request)
    data = ctx.views.overview(ctx.clock())
    return render(request, "overview.html", viewer, {"title": "Fleet", "o": data})


@router.get("/devices")
def devices(
    request: Request,
    *,
    group: _FILTER = None,
    site: _FILTER = None,
    profile: _FILTER = None,
    model: _FILTER = None,
    status: _FILTER = None,
    page: Annotated[int, Query(ge=1, le=MAX_PAGE * 1000)] = 1,
) -> Response:
    viewer = session_of(request)
    ctx = context(request)
    filters = {
        "group": group or None,
        "site": site or None,
        "profile": profile or None,
        "model": model or None,
        "status": status or None,
    }
    rows, total = ctx.views.devices(**filters, limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE)
    overview = ctx.views.overview(ctx.clock())
    values: dict[str, Any] = {
        "title": "Devices",
        "rows": rows,
        "total": total,
        "page": page,
        "pages": max(1, -(-total // PAGE_SIZE)),
        "filters": filters,
        "groups": [g["group"] for g in overview["by_group"] if g["group"]],
        "models": [m["model"] for m in overview["by_model"] if m["model"]],
        "statuses": STATUSES,
        "query": {k: v for k, v in filters.items() if v},
    }
    return render(request, "devices.html", viewer, values)


@router.get("/devices/{device_id}")
def device(request: Request, device_id: str) -> Response:
    viewer = session_of(request)
    ctx = context(request)
    views = ctx.views
    found = views.device(device_id)
    if found is None:
        raise PageNotFound(f"no device {device_id!r}")
    windows = views.device_windows(device_id, CHART_WINDOWS)
    frames = sorted(w["frames"] for w in windows)
    typical = frames[len(frames) // 2] if frames else None
    bands = views.reference_band(device_id, typical)
    alerts = views.alerts_for_device(device_id)
    charts = device_charts(windows, bands, alerts)
    values = {
        "title": f"Device {device_id}",
        "d": found,
        "windows": windows,
        "latest": windows[-1] if windows else None,
        "alerts": alerts,
        "charts": [(c.id, c.heading, Markup(c.svg)) for c in charts],
        "has_reference": bands is not None,
    }
    return render(request, "device.html", viewer, values)


@router.get("/models")
def models(request: Request) -> Response:
    viewer = session_of(request)
    ctx = context(request)
    releases = ctx.registry.releases()
    overview = ctx.views.overview(ctx.clock())
    running = {m["model"]: m for m in overview["by_model"]}
    values = {
        "title": "Models",
        "releases": sorted(releases, key=lambda r: (r.name, -r.release_counter)),
        "running": running,
    }
    return render(request, "models.html", viewer, values)


@router.get("/drift")
def drift(request: Request, group: _FILTER = None) -> Response:
    viewer = session_of(request)
    ctx = context(request)
    heatmap = ctx.views.heatmap(ctx.clock(), group=group or None)
    groups = ctx.views.groups()
    for row in heatmap["rows"]:
        row["classes"] = {f: heat_class(v) for f, v in row["cells"].items()}
    for g in groups:
        g["classes"] = {f: heat_class(v) for f, v in g["shift"].items()}
    values = {
        "title": "Drift",
        "heatmap": heatmap,
        "groups": groups,
        "group": group or None,
        "group_names": [g["group"] for g in groups if g["group"]],
    }
    return render(request, "drift.html", viewer, values)
