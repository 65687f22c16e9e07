"""What every ``/api/v1`` handler shares: the app context, authentication, error bodies.

Authentication: an API token as ``Authorization: Bearer <token>``, or the console's
session cookie ``SESSION_COOKIE`` (the token ``Auth.login`` returned). ``require(role)``
is the dependency that checks it: missing or dead credentials give 401 with
``WWW-Authenticate: Bearer``; a role too low gives 403 naming the role needed.

Errors: every 4xx and 5xx body is ``{"detail": "<sentence>"}``. Request validation errors
(422) keep FastAPI's list of field locations under ``errors`` and put a readable sentence
naming each bad field in ``detail``. Errors of the layers below are mapped here once:
rollouts ``NotFound`` -> 404, ``Conflict`` -> 409, other ``RolloutError`` -> 422,
``AuthError`` -> 400, ``StorageError`` and ``RepositoryError`` (signing failed) -> 503.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import urlsplit

from fastapi import Depends, FastAPI, HTTPException, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyCookie, HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from fleet_server.auth import AuthError, Principal, Role
from fleet_server.repository import RepositoryError
from fleet_server.rollouts import Conflict, NotFound, RolloutError
from fleet_server.storage.database import StorageError

if TYPE_CHECKING:
    from fleet_server.app import AppContext

SESSION_COOKIE = "edgefleet_session"
# Bounds every integer the API takes: ids are 32-bit in PostgreSQL's INTEGER columns.
MAX_ID = 2**31 - 1

_bearer = HTTPBearer(auto_error=False, description="An API token (fleet-server tokens issue).")
_cookie = APIKeyCookie(
    name=SESSION_COOKIE, auto_error=False, description="The console's session cookie."
)


def context(request: Request) -> AppContext:
    """The ``AppContext`` that ``create_app`` stored on the application."""
    ctx: AppContext = request.app.state.ctx
    return ctx


def principal_of(request: Request, token: str | None) -> Principal | None:
    """The live principal behind ``token`` (None for no token or a dead one).

    Raises:
        StorageError: the database failed.
    """
    if not token:
        return None
    ctx = context(request)
    return ctx.auth.verify(token, now=ctx.clock())


def require(role: Role) -> Callable[..., Principal]:
    """A dependency that returns the caller's ``Principal`` if its role allows ``role``.

    A change (any method but GET, HEAD, OPTIONS) authenticated by the session cookie must
    come from the server's own pages: a browser sends the cookie along with a form another
    site posts here, but it also sends that site's ``Origin``, which is refused.

    Raises (as HTTP errors):
        401: no credentials, or a token that is unknown, revoked or expired.
        403: the caller's role is below ``role``, or a cross-site change by cookie.
    """

    def dependency(
        request: Request,
        bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
        cookie: Annotated[str | None, Depends(_cookie)],
    ) -> Principal:
        token = bearer.credentials if bearer is not None else cookie
        if bearer is None and token and not _same_site(request):
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                f"cross-site request refused: Origin {request.headers.get('origin')!r} is not "
                f"this server; send the token as 'Authorization: Bearer <token>' instead",
            )
        if not token:
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                "authentication required: send 'Authorization: Bearer <token>' "
                f"or the {SESSION_COOKIE} cookie",
                headers={"WWW-Authenticate": "Bearer"},
            )
        principal = principal_of(request, token)
        if principal is None:
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                "the token is unknown, revoked or expired",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not principal.role.allows(role):
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                f"this needs the {role.value} role; {principal.username!r} is "
                f"{principal.role.value}",
            )
        return principal

    dependency.__name__ = f"require_{role.value}"
    return dependency


def _same_site(request: Request) -> bool:
    """False for a change whose ``Origin`` header names another host than ``Host``."""
    if request.method in {"GET", "HEAD", "OPTIONS"}:
        return True
    origin = request.headers.get("origin")
    if origin is None:  # not sent by a browser: no cookie was added on a site's behalf
        return True
    return urlsplit(origin).netloc == request.headers.get("host")


Viewer = Annotated[Principal, Depends(require(Role.VIEWER))]
Operator = Annotated[Principal, Depends(require(Role.OPERATOR))]
Admin = Annotated[Principal, Depends(require(Role.ADMIN))]


def not_found(what: str) -> HTTPException:
    """A 404 whose detail names what is missing, e.g. ``not_found("device 'cam-9'")``."""
    return HTTPException(status.HTTP_404_NOT_FOUND, f"no {what}")


def describe_validation(errors: Sequence[Any]) -> str:
    """One sentence naming every bad field: ``body.waves.0.percent: Input should be ...``."""
    parts = []
    for error in errors:
        loc = ".".join(str(p) for p in error.get("loc", ()))
        parts.append(f"{loc or 'request'}: {error.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    """Map errors to ``{"detail": ...}`` bodies (see the module docstring)."""

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        return JSONResponse(
            {"detail": _text(exc.detail)}, status_code=exc.status_code, headers=exc.headers
        )

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = [
            {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": e.get("type")}
            for e in exc.errors()
        ]
        return JSONResponse(
            {"detail": describe_validation(errors), "errors": errors},
            status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
        )

    def mapped(code: int) -> Callable[[Request, Exception], Any]:
        async def handler(request: Request, exc: Exception) -> JSONResponse:
            return JSONResponse({"detail": str(exc) or type(exc).__name__}, status_code=code)

        return handler

    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(NotFound, mapped(status.HTTP_404_NOT_FOUND))
    app.add_exception_handler(Conflict, mapped(status.HTTP_409_CONFLICT))
    app.add_exception_handler(RolloutError, mapped(status.HTTP_422_UNPROCESSABLE_CONTENT))
    app.add_exception_handler(AuthError, mapped(status.HTTP_400_BAD_REQUEST))
    app.add_exception_handler(StorageError, mapped(status.HTTP_503_SERVICE_UNAVAILABLE))
    app.add_exception_handler(RepositoryError, mapped(status.HTTP_503_SERVICE_UNAVAILABLE))


def _text(detail: Any) -> str:
    return detail if isinstance(detail, str) else str(detail)
