"""``/api/v1/rollouts``: staged rollouts: list, inspect, preview, start and steer.

Creating and steering need the operator role; ``RolloutService`` writes each change and
its audit row in one transaction. Its errors map to HTTP in ``deps``: an unknown rollout
or release is 404, a state that forbids the action (pausing a finished rollout, no device
to roll out to) 409, a plan or gate value it refuses 422.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request, status

from fleet_server.api.deps import MAX_ID, Operator, Viewer, context
from fleet_server.api.schemas import PreviewIn, PreviewOut, RolloutIn, RolloutOut, TargetIn
from fleet_server.rollouts import GateLimits, RolloutTarget, WaveSpec

router = APIRouter(prefix="/rollouts", tags=["rollouts"])

RolloutId = Annotated[int, Path(ge=1, le=MAX_ID)]


@router.get("", summary="Rollouts, newest first", response_model=list[RolloutOut])
def list_rollouts(
    request: Request,
    _: Viewer,
    active: Annotated[bool, Query(description="Only rollouts not finished yet")] = False,
) -> list[dict[str, Any]]:
    return [r.document() for r in context(request).rollouts.list(active_only=active)]


@router.get(
    "/{rollout_id}",
    summary="One rollout with its waves, gates and devices",
    response_model=RolloutOut,
)
def get_rollout(request: Request, _: Viewer, rollout_id: RolloutId) -> dict[str, Any]:
    return context(request).rollouts.get(rollout_id).document()


@router.post(
    "/preview",
    summary="Which devices a rollout would target, and which it skips",
    response_model=PreviewOut,
)
def preview_rollout(request: Request, _: Viewer, body: PreviewIn) -> dict[str, Any]:
    return context(request).rollouts.preview(body.release, rollout_target(body.target)).document()


@router.post(
    "",
    summary="Start a rollout (operator)",
    status_code=status.HTTP_201_CREATED,
    response_model=RolloutOut,
)
def create_rollout(request: Request, who: Operator, body: RolloutIn) -> dict[str, Any]:
    ctx = context(request)
    view = ctx.rollouts.create(
        body.release,
        rollout_target(body.target),
        [WaveSpec(devices=w.devices, percent=w.percent) for w in body.waves],
        GateLimits.from_document(body.gates.model_dump(exclude_none=True)),
        pause_s=body.pause_s,
        auto_rollback=body.auto_rollback,
        actor=who.actor,
        now=ctx.clock(),
    )
    return view.document()


_STATE: dict[int | str, dict[str, Any]] = {
    409: {"description": "The rollout's state does not allow this."}
}


@router.post(
    "/{rollout_id}/pause",
    summary="Pause before the next wave (operator)",
    responses=_STATE,
    response_model=RolloutOut,
)
def pause_rollout(request: Request, who: Operator, rollout_id: RolloutId) -> dict[str, Any]:
    ctx = context(request)
    return ctx.rollouts.pause(rollout_id, actor=who.actor, now=ctx.clock()).document()


@router.post(
    "/{rollout_id}/resume",
    summary="Resume a paused rollout (operator)",
    responses=_STATE,
    response_model=RolloutOut,
)
def resume_rollout(request: Request, who: Operator, rollout_id: RolloutId) -> dict[str, Any]:
    ctx = context(request)
    return ctx.rollouts.resume(rollout_id, actor=who.actor, now=ctx.clock()).document()


@router.post(
    "/{rollout_id}/abort",
    summary="Stop a rollout; devices keep the model they run (operator)",
    responses=_STATE,
    response_model=RolloutOut,
)
def abort_rollout(request: Request, who: Operator, rollout_id: RolloutId) -> dict[str, Any]:
    ctx = context(request)
    return ctx.rollouts.abort(rollout_id, actor=who.actor, now=ctx.clock()).document()


@router.post(
    "/{rollout_id}/rollback",
    summary="Assign the previous model to every device the rollout moved (operator)",
    responses=_STATE,
    response_model=RolloutOut,
)
def rollback_rollout(request: Request, who: Operator, rollout_id: RolloutId) -> dict[str, Any]:
    ctx = context(request)
    return ctx.rollouts.rollback(rollout_id, actor=who.actor, now=ctx.clock()).document()


def rollout_target(target: TargetIn) -> RolloutTarget:
    return RolloutTarget(
        groups=tuple(target.groups),
        sites=tuple(target.sites),
        profiles=tuple(target.profiles),
        devices=tuple(target.devices),
    )
