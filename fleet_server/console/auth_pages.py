"""``/login`` and ``/logout``: console sessions for operator accounts (``Auth.login``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse, Response

from fleet_server.api.deps import SESSION_COOKIE, context
from fleet_server.auth import SESSION_TTL, Role
from fleet_server.console.web import (
    LoginRequired,
    check_origin,
    check_post,
    render,
    safe_next,
    session_of,
)

router = APIRouter(include_in_schema=False)
MAX_FIELD = 200


@router.get("/login")
def login_form(request: Request, next: str = "/") -> Response:
    try:
        session_of(request)
    except LoginRequired:
        return render(request, "login.html", None, {"next": safe_next(next), "error": None})
    return RedirectResponse(safe_next(next), 303)


@router.post("/login")
def login(
    request: Request,
    username: Annotated[str, Form()] = "",
    password: Annotated[str, Form()] = "",
    next: Annotated[str, Form()] = "/",
) -> Response:
    """Start a session and go to ``next``; a wrong name or password shows the form again
    (401) without saying which of the two was wrong."""
    check_origin(request)
    ctx = context(request)
    token = None
    if username and password and len(username) <= MAX_FIELD and len(password) <= MAX_FIELD:
        token = ctx.auth.login(username, password, now=ctx.clock())
    if token is None:
        values = {
            "next": safe_next(next),
            "error": "Wrong username or password.",
            "username": username[:MAX_FIELD],
        }
        return render(request, "login.html", None, values, status_code=401)
    response = RedirectResponse(safe_next(next), 303)
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=int(SESSION_TTL.total_seconds()),
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )
    return response


@router.get("/logout")
def logout_form(request: Request) -> Response:
    """A page with the logout button (logging out is a POST, like every change)."""
    try:
        viewer = session_of(request)
    except LoginRequired:
        return RedirectResponse("/login", 303)
    return render(request, "logout.html", viewer, {"title": "Log out"})


@router.post("/logout")
def logout(request: Request, csrf: Annotated[str, Form()] = "") -> Response:
    """End the session (the token is revoked, not only the cookie dropped)."""
    try:
        viewer = session_of(request)
    except LoginRequired:
        return RedirectResponse("/login", 303)
    check_post(request, viewer, csrf, needs=Role.VIEWER)
    ctx = context(request)
    ctx.auth.revoke(viewer.token, now=ctx.clock())
    response = RedirectResponse("/login", 303)
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
    return response
