"""What every console page shares: templates, the logged-in operator, CSRF checks, errors.

Sessions: the cookie ``SESSION_COOKIE`` holds the token ``Auth.login`` returned (HttpOnly,
SameSite=Strict, Secure over HTTPS). A page without a live session redirects to
``/login?next=<path>``.

CSRF, two independent defences on every POST: the SameSite=Strict cookie (a cross-site
form post arrives without it), and a per-session token in every form (``csrf``, an HMAC
of the session token, which a page on another origin cannot read); a POST whose
``Origin`` (or, without one, ``Referer``) names another origin is refused as well.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from fleet_server.api.deps import SESSION_COOKIE, context
from fleet_server.auth import Principal, Role

HERE = Path(__file__).resolve().parent
TEMPLATES = Jinja2Templates(directory=str(HERE / "templates"))
_CSRF_CONTEXT = b"edgefleet-console-csrf-v1"


class LoginRequired(Exception):
    """No live session: the handler redirects to the login page."""

    def __init__(self, next_path: str) -> None:
        super().__init__("login required")
        self.next_path = next_path


class Refused(Exception):
    """The request is not allowed (role too low, CSRF check failed): a 403 page."""


class PageNotFound(Exception):
    """A missing device, rollout or release: a 404 page naming it."""


@dataclass(frozen=True, slots=True)
class Viewer:
    """The operator looking at a page, with the CSRF token for its forms."""

    principal: Principal
    token: str

    @property
    def csrf(self) -> str:
        return csrf_token(self.token)

    @property
    def can_operate(self) -> bool:
        return self.principal.role.allows(Role.OPERATOR)


def csrf_token(session_token: str) -> str:
    """The form token of a session (an HMAC of the session token; never stored)."""
    return hmac.new(session_token.encode(), _CSRF_CONTEXT, hashlib.sha256).hexdigest()[:40]


def session_of(request: Request) -> Viewer:
    """The live session of the request.

    Raises:
        LoginRequired: no cookie, or a session that is unknown, revoked or expired.
        StorageError: the database failed.
    """
    token = request.cookies.get(SESSION_COOKIE, "")
    ctx = context(request)
    principal = ctx.auth.verify(token, now=ctx.clock()) if token else None
    if principal is None:
        path = request.url.path
        if request.url.query:
            path += "?" + request.url.query
        raise LoginRequired(path)
    return Viewer(principal, token)


def check_post(request: Request, viewer: Viewer, form_csrf: str, *, needs: Role) -> None:
    """Refuse a POST from another origin, without the session's CSRF token, or by a role
    below ``needs``.

    Raises:
        Refused: naming which check failed.
    """
    check_origin(request)
    if not hmac.compare_digest(form_csrf.encode(), viewer.csrf.encode()):
        raise Refused("the form is stale or was not sent from this console (CSRF token)")
    if not viewer.principal.role.allows(needs):
        raise Refused(
            f"this needs the {needs.value} role; {viewer.principal.username} is "
            f"{viewer.principal.role.value}"
        )


def check_origin(request: Request) -> None:
    """Raises Refused when ``Origin`` (or ``Referer``) names another origin than the
    request's own."""
    source = request.headers.get("origin") or request.headers.get("referer")
    if not source or source == "null":
        if source == "null":
            raise Refused("a form posted from an opaque origin is not accepted")
        return
    parts = urlsplit(source)
    own = request.url
    if (parts.scheme, parts.netloc) != (own.scheme, own.netloc):
        raise Refused(f"a form posted from {parts.scheme}://{parts.netloc} is not accepted")


def safe_next(path: str | None) -> str:
    """A local path to go to after login (anything else becomes ``/``)."""
    if not path or not path.startswith("/") or path.startswith("//") or "\\" in path:
        return "/"
    return path


def render(
    request: Request,
    name: str,
    viewer: Viewer | None,
    values: dict[str, Any],
    *,
    status_code: int = 200,
) -> HTMLResponse:
    """Render template ``name`` with ``values`` plus the viewer and the current path."""
    page = {"request": request, "viewer": viewer, "path": request.url.path, **values}
    response = TEMPLATES.TemplateResponse(request, name, page, status_code=status_code)
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Referrer-Policy"] = "same-origin"
    response.headers["Content-Security-Policy"] = (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "frame-ancestors 'none'; form-action 'self'"
    )
    return response


def install_error_pages(app: FastAPI) -> None:
    """Redirect LoginRequired to the login page; render Refused and PageNotFound."""

    async def login_required(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, LoginRequired)
        return RedirectResponse(f"/login?next={quote(exc.next_path, safe='/')}", 303)

    async def refused(request: Request, exc: Exception) -> Response:
        return _error_page(request, 403, "Not allowed", str(exc))

    async def not_found(request: Request, exc: Exception) -> Response:
        return _error_page(request, 404, "Not found", str(exc))

    app.add_exception_handler(LoginRequired, login_required)
    app.add_exception_handler(Refused, refused)
    app.add_exception_handler(PageNotFound, not_found)


def _error_page(request: Request, code: int, title: str, message: str) -> Response:
    try:
        viewer: Viewer | None = session_of(request)
    except LoginRequired:
        viewer = None
    values = {"title": title, "message": message, "code": code}
    return render(request, "error.html", viewer, values, status_code=code)


# -- template filters -------------------------------------------------------------------


def _when(value: datetime | float | int | None) -> str:
    if value is None:
        return "—"
    moment = value if isinstance(value, datetime) else datetime.fromtimestamp(value, timezone.utc)
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _number(value: float | int | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}f}"


def _percent(value: float | None, digits: int = 1) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    return f"{100 * value:.{digits}f}%"


def _signed(value: float | None) -> str:
    """A shift in sigmas, signed, one decimal; a rounded zero has no sign."""
    if value is None or not math.isfinite(value):
        return "—"
    return "0.0" if abs(value) < 0.05 else f"{value:+.1f}"


def _size(value: int | None) -> str:
    if value is None:
        return "—"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


TEMPLATES.env.filters["when"] = _when
TEMPLATES.env.filters["number"] = _number
TEMPLATES.env.filters["percent"] = _percent
TEMPLATES.env.filters["size"] = _size
TEMPLATES.env.filters["signed"] = _signed
