"""Schemathesis against the REST API's own OpenAPI document: no 5xx on any input.

Covers every operation ``/openapi.json`` lists (every ``/api/v1`` route and
``/healthz``), called in-process over ASGI on a seeded app (``api_fixtures``: real SQLite
file, real signed repository) with an admin token, so each request passes authentication
and reaches validation and the handler, mutations included. For each operation
Schemathesis generates ``EXAMPLES`` conforming inputs and ``EXAMPLES`` non-conforming ones
(wrong types, out-of-range numbers, unknown or missing keys, odd strings in paths,
queries and bodies), then, for operations with path parameters, ``EXAMPLES`` more with
the path naming seeded rows (a device, a group, a release, a rollout, an alert, an
operator), so that generated queries and bodies reach real work. The one check is
``not_a_server_error``. Generation is derandomized, so a failure repeats on every run;
every failing operation is reported together, with the input Hypothesis shrank it to.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import APIOperation, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import Failure, FailureGroup
from schemathesis.core.result import Ok

from tests.integration.api_fixtures import NEW, SeededApi, seeded_api

EXAMPLES = 15
# Path parameters that name seeded rows (the fixture's rollout is number 1).
KNOWN: dict[str, Any] = {
    "device_id": "dev-00",
    "name": "line-a",
    "key": NEW,
    "rollout_id": 1,
    "alert_id": 1,
    "username": "viewer",
}
ROUTER_TAGS = {
    *("overview", "devices", "groups", "models", "releases"),
    *("rollouts", "alerts", "telemetry", "audit", "operators"),
}


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> SeededApi:
    api = seeded_api(tmp_path_factory.mktemp("schemathesis"))
    # A rollout to steer, so that its id is a known path parameter.
    created = api.client("operator").post(
        "/api/v1/rollouts", json={"release": NEW, "waves": [{"percent": 100}]}
    )
    assert created.status_code == 201, created.text
    return api


def test_no_input_makes_a_server_error(seeded: SeededApi) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", seeded.app)
    schema.config.generation.update(with_security_parameters=False)
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), f"the API's own schema does not load: {result.err()}"
        operations.append(result.ok())
    assert len(operations) >= 20
    failures: list[str] = []
    for operation in operations:
        names = [p.name for p in operation.path_parameters]
        runs: list[tuple[str, GenerationMode, dict[str, Any] | None]] = [
            ("positive", GenerationMode.POSITIVE, None),
            ("negative", GenerationMode.NEGATIVE, None),
        ]
        if names:
            # Generated ids rarely exist: once more with existing ones, so queries and
            # bodies reach the handlers' work on real rows.
            runs.append(("existing", GenerationMode.POSITIVE, {n: KNOWN[n] for n in names}))
        for label, mode, fixed in runs:
            try:
                _fuzz(operation, mode, fixed, seeded.tokens["admin"])
            except (Failure, FailureGroup) as e:
                failures.append(f"{operation.label} ({label}): {e}")
            except Unsatisfiable:
                # No parameter and no body: there is no non-conforming input to make.
                assert mode is GenerationMode.NEGATIVE, operation.label
                assert not names and not list(operation.body), operation.label
    assert failures == []


def _fuzz(
    operation: APIOperation[Any, Any, Any, Any],
    mode: GenerationMode,
    path_parameters: dict[str, Any] | None,
    token: str,
) -> None:
    """Call ``operation`` with EXAMPLES generated inputs; raises the check's Failure."""
    headers = {"Authorization": f"Bearer {token}"}

    @given(case=operation.as_strategy(generation_mode=mode, path_parameters=path_parameters))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def call(case: schemathesis.Case[Any]) -> None:
        case.call_and_validate(headers=headers, checks=[not_a_server_error])

    call()


def test_the_schema_lists_every_router(seeded: SeededApi, tmp_path: Path) -> None:
    spec = seeded.client().get("/openapi.json").json()
    tags = {tag for path in spec["paths"].values() for op in path.values() for tag in op["tags"]}
    assert tags >= ROUTER_TAGS
