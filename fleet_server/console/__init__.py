"""The operator console: server-rendered pages (Jinja2) with small static files.

``install_console(app)`` mounts ``/static`` and adds the pages: ``/login``, ``/logout``,
``/`` (fleet overview), ``/devices``, ``/devices/{id}``, ``/models``, ``/rollouts``,
``/rollouts/{id}`` with its actions, and ``/drift``. Nothing is fetched from another
origin: the stylesheet is served from ``/static`` and the charts are SVG drawn on the
server (``charts``).
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from fleet_server.console import auth_pages, pages, rollout_pages
from fleet_server.console.web import HERE, install_error_pages

__all__ = ["install_console"]


def install_console(app: FastAPI) -> None:
    """Add the console's routes, static files and error pages to ``app`` (which must
    hold an ``AppContext`` in ``app.state.ctx``)."""
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    install_error_pages(app)
    for router in (auth_pages.router, pages.router, rollout_pages.router):
        app.include_router(router)
