"""Rollout pages: the list with the "start a rollout" form, one rollout's waves, gates and
devices, and the operator's actions (pause, resume, abort, roll back).

Every action goes through a confirmation page (``GET /rollouts/{id}/{action}``) whose
form POSTs it; the POST needs the operator role and passes ``web.check_post`` (origin and
CSRF token). Changes go through ``RolloutService`` with the operator as the actor, which
writes the audit log in the same transaction.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Form, Path, Request
from fastapi.responses import RedirectResponse, Response

from fleet_server.api.deps import MAX_ID, context
from fleet_server.auth import Role
from fleet_server.console.forms import GATE_FIELDS, FormError, parse_rollout_form
from fleet_server.console.web import PageNotFound, Refused, Viewer, check_post, render, session_of
from fleet_server.domain.rollout import GateLimits, NotFound, RolloutError
from fleet_server.rollouts import RolloutView

router = APIRouter(include_in_schema=False)
ACTIONS = {
    "pause": ("Pause", "New waves stop starting; devices already updated keep the release."),
    "resume": ("Resume", "The rollout carries on with its current wave."),
    "abort": ("Abort", "The rollout stops for good; devices keep what they run now."),
    "rollback": (
        "Roll back",
        "Every device this rollout updated is assigned its previous release again.",
    ),
}
_Field = Annotated[str, Form(max_length=2000)]
_Id = Annotated[int, Path(ge=1, le=MAX_ID)]


@router.get("/rollouts")
def rollouts(request: Request) -> Response:
    viewer = session_of(request)
    return _list_page(request, viewer, {}, None)


@router.post("/rollouts")
def start_rollout(
    request: Request,
    *,
    csrf: _Field = "",
    release: _Field = "",
    group: _Field = "",
    site: _Field = "",
    profile: _Field = "",
    devices: _Field = "",
    waves: _Field = "",
    pause_s: _Field = "",
    auto_rollback: _Field = "",
    min_agreement: _Field = "",
    max_p99_latency_ms: _Field = "",
    max_error_rate: _Field = "",
    max_fail_rate_change: _Field = "",
    observe_s: _Field = "",
    min_frames: _Field = "",
) -> Response:
    """Create a rollout from the form; on an error show the form again with the message
    (422), the fields kept."""
    viewer = session_of(request)
    check_post(request, viewer, csrf, needs=Role.OPERATOR)
    fields = {
        "release": release,
        "group": group,
        "site": site,
        "profile": profile,
        "devices": devices,
        "waves": waves,
        "pause_s": pause_s,
        "auto_rollback": auto_rollback,
        "min_agreement": min_agreement,
        "max_p99_latency_ms": max_p99_latency_ms,
        "max_error_rate": max_error_rate,
        "max_fail_rate_change": max_fail_rate_change,
        "observe_s": observe_s,
        "min_frames": min_frames,
    }
    ctx = context(request)
    try:
        parsed = parse_rollout_form(fields)
        view = ctx.rollouts.create(
            parsed.release,
            parsed.target,
            parsed.waves,
            parsed.gates,
            pause_s=parsed.pause_s,
            auto_rollback=parsed.auto_rollback,
            actor=viewer.principal.actor,
            now=ctx.clock(),
        )
    except (FormError, RolloutError) as e:
        return _list_page(request, viewer, fields, str(e), status=422)
    return RedirectResponse(f"/rollouts/{view.id}", 303)


@router.get("/rollouts/{rollout_id}")
def rollout(request: Request, rollout_id: _Id) -> Response:
    viewer = session_of(request)
    view = _get(request, rollout_id)
    values = {
        "title": f"Rollout {rollout_id}",
        "r": view.document(),
        "view": view,
        "actions": _allowed(view.state),
    }
    return render(request, "rollout.html", viewer, values)


@router.get("/rollouts/{rollout_id}/{action}")
def confirm(request: Request, rollout_id: _Id, action: str) -> Response:
    """The confirmation step of an action."""
    viewer = session_of(request)
    if action not in ACTIONS:
        raise PageNotFound(f"no rollout action {action!r}")
    if not viewer.can_operate:
        raise Refused(
            f"{action} needs the operator role; {viewer.principal.username} is "
            f"{viewer.principal.role.value}"
        )
    view = _get(request, rollout_id)
    label, effect = ACTIONS[action]
    values = {
        "title": f"{label} rollout {rollout_id}?",
        "view": view,
        "action": action,
        "label": label,
        "effect": effect,
    }
    return render(request, "confirm.html", viewer, values)


@router.post("/rollouts/{rollout_id}/{action}")
def act(
    request: Request,
    rollout_id: _Id,
    action: str,
    csrf: _Field = "",
) -> Response:
    viewer = session_of(request)
    if action not in ACTIONS:
        raise PageNotFound(f"no rollout action {action!r}")
    check_post(request, viewer, csrf, needs=Role.OPERATOR)
    ctx = context(request)
    service = ctx.rollouts
    do = {
        "pause": service.pause,
        "resume": service.resume,
        "abort": service.abort,
        "rollback": service.rollback,
    }[action]
    try:
        do(rollout_id, actor=viewer.principal.actor, now=ctx.clock())
    except NotFound as e:
        raise PageNotFound(str(e)) from e
    except RolloutError as e:
        view = _get(request, rollout_id)
        values = {
            "title": f"Rollout {rollout_id}",
            "r": view.document(),
            "view": view,
            "actions": _allowed(view.state),
            "error": f"{ACTIONS[action][0]} refused: {e}",
        }
        return render(request, "rollout.html", viewer, values, status_code=409)
    return RedirectResponse(f"/rollouts/{rollout_id}", 303)


def _list_page(
    request: Request,
    viewer: Viewer,
    fields: dict[str, str],
    error: str | None,
    *,
    status: int = 200,
) -> Response:
    ctx = context(request)
    overview = ctx.views.overview(ctx.clock())
    releases = sorted(ctx.registry.releases(), key=lambda r: (r.name, -r.release_counter))
    profiles = sorted({p for r in releases for p in r.profiles})
    defaults = GateLimits()
    values: dict[str, Any] = {
        "title": "Rollouts",
        "rollouts": ctx.rollouts.list(),
        "releases": releases,
        "groups": [g["group"] for g in overview["by_group"] if g["group"]],
        "profiles": profiles,
        "fields": {"waves": "1, 50%, 100%", "pause_s": "60", **fields},
        "gate_defaults": {name: getattr(defaults, name) for name in GATE_FIELDS},
        "error": error,
    }
    return render(request, "rollouts.html", viewer, values, status_code=status)


def _get(request: Request, rollout_id: int) -> RolloutView:
    try:
        return context(request).rollouts.get(rollout_id)
    except NotFound as e:
        raise PageNotFound(str(e)) from e


def _allowed(state: str) -> list[str]:
    """Actions that make sense in ``state`` (the service still has the last word)."""
    return {
        "pending": ["pause", "abort"],
        "running": ["pause", "abort", "rollback"],
        "paused": ["resume", "abort", "rollback"],
        "halted": ["resume", "abort", "rollback"],
        "completed": ["rollback"],
    }.get(state, [])
