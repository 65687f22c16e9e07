"""The REST API under ``/api/v1``: one router per resource (``ROUTERS``, in the order the
OpenAPI document lists them); ``deps`` holds authentication and error mapping,
``schemas`` the request and response bodies."""

from fastapi import APIRouter

from fleet_server.api import (
    alerts,
    audit,
    devices,
    groups,
    models,
    operators,
    overview,
    releases,
    rollouts,
    telemetry,
)

ROUTERS: tuple[APIRouter, ...] = (
    overview.router,
    devices.router,
    groups.router,
    models.router,
    releases.router,
    rollouts.router,
    alerts.router,
    telemetry.router,
    audit.router,
    operators.router,
)

__all__ = ["ROUTERS"]
