"""``/api/v1/models``: the registry grouped by model name, with where each version runs."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request

from fleet_server.api.deps import Viewer, context, not_found
from fleet_server.api.schemas import TEXT_PATTERN, ModelOut, ReleaseOut
from fleet_server.rollouts import ReleaseView
from fleet_server.storage.schema import TEXT_LENGTH

router = APIRouter(prefix="/models", tags=["models"])


@router.get("", summary="Every model with its releases", response_model=list[ModelOut])
def list_models(request: Request, _: Viewer) -> list[ModelOut]:
    return group_models(context(request).registry.releases())


@router.get("/{name}", summary="One model with its releases", response_model=ModelOut)
def get_model(
    request: Request,
    _: Viewer,
    name: Annotated[str, Path(min_length=1, max_length=TEXT_LENGTH, pattern=TEXT_PATTERN)],
) -> ModelOut:
    found = [m for m in group_models(context(request).registry.releases()) if m.name == name]
    if not found:
        raise not_found(f"model {name!r} in the registry")
    return found[0]


def group_models(releases: list[ReleaseView]) -> list[ModelOut]:
    """Releases grouped by model name (names sorted), newest release counter first."""
    by_name: dict[str, list[ReleaseView]] = {}
    for release in releases:
        by_name.setdefault(release.name, []).append(release)
    models = []
    for name in sorted(by_name):
        chosen = sorted(by_name[name], key=lambda r: r.release_counter, reverse=True)
        models.append(
            ModelOut(
                name=name,
                releases=[ReleaseOut(**r.document()) for r in chosen],
                devices={r.version: r.running_on for r in chosen},
            )
        )
    return models
