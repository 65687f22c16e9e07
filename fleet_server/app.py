"""The fleet server's HTTP application: the REST API under ``/api/v1`` and the console.

``create_app(ctx)`` builds a FastAPI app around an ``AppContext`` (the database engine and
the services every handler uses; handlers read it from ``request.app.state.ctx``). It
serves one router per resource under ``/api/v1``, the OpenAPI document at
``/openapi.json``, its browsable form at ``/docs``, ``/healthz`` for probes and, with
``console=True``, the operator console.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from sqlalchemy import Engine, text
from sqlalchemy.exc import SQLAlchemyError

from fleet_server.api import ROUTERS
from fleet_server.api.deps import install_error_handlers
from fleet_server.auth import Auth
from fleet_server.repository import FleetRepository
from fleet_server.rollouts import Registry, RolloutService
from fleet_server.storage.fleet_views import FleetViews

API_PREFIX = "/api/v1"
API_VERSION = "1"


@dataclass(frozen=True)
class AppContext:
    """What the HTTP handlers use; built once per server process.

    ``clock`` returns aware UTC times. ``repository`` is the signed repository when this
    server holds the keys to mirror it (``POST /api/v1/releases/sync``), else None.
    """

    engine: Engine
    auth: Auth
    rollouts: RolloutService
    registry: Registry
    views: FleetViews
    clock: Callable[[], datetime]
    repository: FleetRepository | None = None


def create_app(ctx: AppContext, *, console: bool = True) -> FastAPI:
    """The application: every ``/api/v1`` router, ``/docs``, ``/openapi.json``,
    ``/healthz`` and, with ``console``, the console pages (``fleet_server.console``)."""
    app = FastAPI(
        title="edgefleet fleet server",
        version=API_VERSION,
        description="Devices, groups, the model registry, staged rollouts, drift alerts, "
        "telemetry summaries and the audit log of an edgefleet fleet. Every request needs "
        "a token (`Authorization: Bearer <token>`) or a console session; reading needs the "
        "viewer role, changing anything the operator role, managing operators the admin "
        "role.",
        docs_url="/docs",
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    app.state.ctx = ctx
    install_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router, prefix=API_PREFIX)

    @app.get("/healthz", tags=["health"], summary="Liveness and database check")
    def healthz() -> JSONResponse:
        try:
            with ctx.engine.connect() as connection:
                connection.execute(text("SELECT 1"))
        except SQLAlchemyError as e:
            return JSONResponse(
                {"status": "unavailable", "detail": f"database: {e}"}, status_code=503
            )
        return JSONResponse({"status": "ok"})

    if console:
        from fleet_server.console import install_console

        install_console(app)
    return app
