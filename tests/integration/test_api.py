"""The REST API over a real SQLite file and a real signed repository (api_fixtures):
authentication and roles, each resource, validation messages, and the audit trail."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from fleet_server.app import create_app
from fleet_server.auth import Auth, AuthError
from fleet_server.operators_cli import PASSWORD_ENV, add_operator_commands, read_password
from fleet_server.storage.audit import AuditLog
from tests.integration.api_fixtures import (
    DEVICES,
    NEW,
    OLD,
    PASSWORD,
    SeededApi,
    build_seeded,
    copy_seeded,
)

API = "/api/v1"
Call = tuple[str, str, Any]
MUTATIONS: list[Call] = [
    ("patch", f"{API}/devices/dev-01", {"site": "site-9"}),
    ("post", f"{API}/releases/sync", None),
    ("post", f"{API}/rollouts", {"release": NEW, "waves": [{"percent": 100}]}),
    ("post", f"{API}/rollouts/1/pause", None),
    ("post", f"{API}/rollouts/1/resume", None),
    ("post", f"{API}/rollouts/1/abort", None),
    ("post", f"{API}/rollouts/1/rollback", None),
]
ADMIN_ONLY: list[Call] = [
    ("get", f"{API}/operators", None),
    ("post", f"{API}/operators", {"username": "x", "password": PASSWORD, "role": "viewer"}),
    ("post", f"{API}/operators/viewer/tokens", {"name": "ci"}),
]
READS = [
    f"{API}/overview",
    f"{API}/devices",
    f"{API}/devices/dev-00",
    f"{API}/groups",
    f"{API}/models",
    f"{API}/releases",
    f"{API}/rollouts",
    f"{API}/alerts",
    f"{API}/telemetry/devices/dev-00",
    f"{API}/telemetry/groups/line-a",
    f"{API}/audit",
]


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("seeded")
    build_seeded(root)
    return root


@pytest.fixture
def api(template: Path, tmp_path: Path) -> SeededApi:
    """A fresh copy of the seeded fleet for a test that changes it."""
    return copy_seeded(template, tmp_path / "fleet")


@pytest.fixture(scope="module")
def reader(template: Path, tmp_path_factory: pytest.TempPathFactory) -> SeededApi:
    """One copy shared by the tests that change nothing (reads and refused requests)."""
    return copy_seeded(template, tmp_path_factory.mktemp("reader"))


def _call(seeded: SeededApi, role: str | None, method: str, url: str, body: Any) -> Any:
    client = seeded.client(role)
    return client.request(method.upper(), url, json=body)


# -- authentication and roles --------------------------------------------------------------


@pytest.mark.parametrize("url", READS)
def test_every_read_needs_credentials_and_a_viewer_may_read(reader: SeededApi, url: str) -> None:
    anonymous = reader.client().get(url)
    assert anonymous.status_code == 401
    assert anonymous.headers["www-authenticate"] == "Bearer"
    assert "Bearer" in anonymous.json()["detail"]
    assert reader.client("viewer").get(url).status_code == 200


@pytest.mark.parametrize(("method", "url", "body"), [*MUTATIONS, *ADMIN_ONLY])
def test_a_viewer_cannot_change_anything(
    reader: SeededApi, method: str, url: str, body: Any
) -> None:
    response = _call(reader, "viewer", method, url, body)
    assert response.status_code == 403
    needed = "admin" if (method, url, body) in ADMIN_ONLY else "operator"
    assert response.json()["detail"] == f"this needs the {needed} role; 'viewer' is viewer"
    assert [
        e.action for e in AuditLog(reader.engine).entries() if e.actor.startswith("viewer")
    ] == []


@pytest.mark.parametrize(("method", "url", "body"), ADMIN_ONLY)
def test_an_operator_cannot_manage_operators(
    reader: SeededApi, method: str, url: str, body: Any
) -> None:
    response = _call(reader, "operator", method, url, body)
    assert response.status_code == 403
    assert "needs the admin role" in response.json()["detail"]


def test_unknown_and_revoked_tokens_are_refused(api: SeededApi) -> None:
    bad = api.client()
    bad.headers["Authorization"] = "Bearer not-a-token"
    assert bad.get(f"{API}/devices").status_code == 401
    assert api.client("operator").get(f"{API}/devices").status_code == 200
    assert api.ctx.auth.revoke(api.tokens["operator"], now=api.now)
    response = api.client("operator").get(f"{API}/devices")
    assert response.status_code == 401
    assert response.json()["detail"] == "the token is unknown, revoked or expired"


def test_the_console_session_cookie_authenticates(api: SeededApi) -> None:
    from fleet_server.api.deps import SESSION_COOKIE

    session = api.ctx.auth.login("operator", PASSWORD, now=api.now)
    assert session is not None
    client = api.client()
    client.cookies.set(SESSION_COOKIE, session)
    response = client.patch(f"{API}/devices/dev-02", json={"site": "site-7"})
    assert response.status_code == 200
    assert AuditLog(api.engine).entries(subject="device/dev-02")[0].actor == "operator"
    same_site = client.post(f"{API}/rollouts/1/pause", headers={"Origin": "http://testserver"})
    assert same_site.status_code == 404  # authenticated: only the rollout is missing
    forged = client.patch(
        f"{API}/devices/dev-02", json={"site": "x"}, headers={"Origin": "http://evil.example"}
    )
    assert forged.status_code == 403
    assert "cross-site request refused" in forged.json()["detail"]
    assert client.get(f"{API}/devices/dev-02").json()["site"] == "site-7"


# -- devices and groups --------------------------------------------------------------------


def test_devices_are_filtered_and_paged(reader: SeededApi) -> None:
    client = reader.client("viewer")
    everything = client.get(f"{API}/devices").json()
    assert everything["total"] == len(DEVICES)
    assert [d["id"] for d in everything["items"]] == list(DEVICES)
    page = client.get(f"{API}/devices", params={"limit": 5, "offset": 10}).json()
    assert (page["total"], [d["id"] for d in page["items"]]) == (12, ["dev-10", "dev-11"])
    line_b = client.get(f"{API}/devices", params={"group": "line-b", "status": "offline"})
    assert [d["id"] for d in line_b.json()["items"]] == ["dev-07", "dev-11"]
    by_model = client.get(f"{API}/devices", params={"model": "reference-onnx"}).json()
    assert by_model["total"] == 12
    assert client.get(f"{API}/devices", params={"model": NEW}).json()["total"] == 0
    assert client.get(f"{API}/devices", params={"model": "reference"}).json()["total"] == 0
    site = client.get(f"{API}/devices", params={"site": "site-1", "profile": "x86-generic"})
    assert site.json()["total"] == 6


def test_a_device_shows_its_model_history_and_events(reader: SeededApi) -> None:
    device = reader.client("viewer").get(f"{API}/devices/dev-00").json()
    assert (device["group"], device["site"], device["model"]) == ("line-a", "site-1", OLD)
    assert [h["event"] for h in device["model_history"]] == ["activated"]
    assert device["model_history"][0]["model"] == OLD
    assert [e["event"] for e in device["events"]] == ["activated", "gate_passed", "verified"]
    assert device["events"][1]["figures"] == {"agreement": 0.99, "p99_latency_ms": 12.5}
    missing = reader.client("viewer").get(f"{API}/devices/dev-99")
    assert (missing.status_code, missing.json()) == (404, {"detail": "no device 'dev-99'"})


def test_an_operator_edits_a_device_and_the_change_is_audited(api: SeededApi) -> None:
    response = api.client("operator").patch(
        f"{API}/devices/dev-01", json={"site": "site-9", "line": "line-c"}
    )
    assert response.status_code == 200
    assert (response.json()["site"], response.json()["group"]) == ("site-9", "line-c")
    entry = AuditLog(api.engine).entries(subject="device/dev-01")[0]
    assert (entry.actor, entry.action) == ("operator:tests", "device.update")
    assert entry.detail == {
        "line": {"from": "line-a", "to": "line-c"},
        "site": {"from": "site-1", "to": "site-9"},
    }
    cleared = api.client("operator").patch(f"{API}/devices/dev-01", json={"site": None})
    assert cleared.json()["site"] is None


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({}, "send at least one of: site, line"),
        ({"colour": "red"}, "body.colour: Extra inputs are not permitted"),
        ({"site": ""}, "body.site: String should have at least 1 character"),
        ({"line": None}, "line cannot be cleared"),
        ({"site": "x" * 97}, "body.site: String should have at most 96 characters"),
    ],
)
def test_bad_device_edits_are_refused_naming_the_field(
    reader: SeededApi, body: dict[str, Any], named: str
) -> None:
    response = reader.client("operator").patch(f"{API}/devices/dev-01", json=body)
    assert response.status_code == 422
    assert named in response.json()["detail"]
    assert response.json()["errors"][0]["loc"][0] == "body"
    assert AuditLog(reader.engine).entries(subject="device/dev-01") == []


def test_groups_count_devices_online_and_offline(reader: SeededApi) -> None:
    groups = reader.client("viewer").get(f"{API}/groups").json()
    assert [(g["name"], g["devices"], g["online"], g["offline"]) for g in groups] == [
        ("line-a", 6, 5, 1),
        ("line-b", 6, 4, 2),
    ]
    assert groups[0]["models"] == {OLD: 6}
    assert groups[1]["sites"] == ["site-2"]
    assert reader.client("viewer").get(f"{API}/groups/line-z").status_code == 404


# -- telemetry, alerts, overview -----------------------------------------------------------


def test_device_telemetry_is_a_series_with_rates_and_latency(reader: SeededApi) -> None:
    series = reader.client("viewer").get(f"{API}/telemetry/devices/dev-00", params={"limit": 3})
    windows = series.json()["windows"]
    assert [w["seq"] for w in windows] == [3, 4, 5]
    first = windows[0]
    assert first["frames"] == 200
    assert first["rates"]["fail"] == pytest.approx(16 / 200)
    # 50 frames below 7.5 ms, 80 in [7.5, 10): the median is 50/80 into that bin.
    assert first["latency_p50_ms"] == pytest.approx(7.5 + 2.5 * 50 / 80)
    assert first["latency_p99_ms"] == 100.0  # in the overflow bin: its lower edge
    assert first["means"]["brightness"] == pytest.approx(0.48)


def test_group_telemetry_adds_up_its_devices(reader: SeededApi) -> None:
    response = reader.client("viewer").get(
        f"{API}/telemetry/groups/line-a", params={"since_s": 150}
    )
    summary = response.json()
    # Windows received 0, 1 and 2 minutes before now are inside 150 s.
    assert [d["windows"] for d in summary["devices"]] == [3] * 6
    assert summary["total"]["windows"] == 18
    assert summary["total"]["counts"]["fail"] == 18 * 16
    assert summary["total"]["means"]["brightness"] == pytest.approx(0.49)
    assert summary["total"]["latency_p50_ms"] == pytest.approx(7.5 + 2.5 * 50 / 80)
    assert summary["truncated"] is False


def test_alerts_are_listed_filtered_and_shown(reader: SeededApi) -> None:
    client = reader.client("viewer")
    open_alerts = client.get(f"{API}/alerts").json()
    assert [(a["scope"], a["scope_key"]) for a in open_alerts["items"]] == [("device", "dev-03")]
    every = client.get(f"{API}/alerts", params={"state": "all"}).json()
    assert every["total"] == 2
    resolved = client.get(f"{API}/alerts", params={"state": "resolved", "device": "dev-07"})
    assert [a["scope_key"] for a in resolved.json()["items"]] == ["line-b"]
    one = client.get(f"{API}/alerts/{open_alerts['items'][0]['id']}").json()
    assert one["evidence"] == {"windows": 3}
    assert client.get(f"{API}/alerts/999").json() == {"detail": "no alert 999"}
    bad = client.get(f"{API}/alerts", params={"scope": "planet"})
    assert bad.status_code == 422
    assert "query.scope" in bad.json()["detail"]


def test_the_overview_counts_the_fleet(reader: SeededApi) -> None:
    overview = reader.client("viewer").get(f"{API}/overview").json()
    assert overview["devices"]["online"] == 9
    assert overview["devices"]["offline"] == 3


@pytest.mark.parametrize(
    ("url", "named"),
    [
        (f"{API}/devices?limit=0", "query.limit: Input should be greater than or equal to 1"),
        (f"{API}/devices?limit=100000", "query.limit: Input should be less than or equal"),
        (f"{API}/devices?status=sleeping", "query.status: Input should be 'online'"),
        (f"{API}/alerts/abc", "path.alert_id: Input should be a valid integer"),
        (f"{API}/rollouts/0", "path.rollout_id: Input should be greater than or equal to 1"),
        (f"{API}/audit?limit=-1", "query.limit"),
        (f"{API}/devices/bad%00id", "path.device_id: String should match pattern"),
        (f"{API}/groups/line%01a", "path.name: String should match pattern"),
        (f"{API}/devices?site=" + "s" * 97, "query.site: String should have at most 96"),
    ],
)
def test_bad_queries_are_refused_naming_the_parameter(
    reader: SeededApi, url: str, named: str
) -> None:
    response = reader.client("viewer").get(url)
    assert response.status_code == 422
    assert named in response.json()["detail"]


# -- registry and rollouts -----------------------------------------------------------------


def test_models_group_the_registry_releases(reader: SeededApi) -> None:
    client = reader.client("viewer")
    releases = client.get(f"{API}/releases").json()
    assert sorted(r["model"] for r in releases) == [OLD, NEW]
    models = client.get(f"{API}/models").json()
    assert [m["name"] for m in models] == ["reference-onnx"]
    assert [r["version"] for r in models[0]["releases"]] == ["1.1.0", "1.0.0"]
    assert models[0]["devices"] == {"1.1.0": 0, "1.0.0": 12}
    one = client.get(f"{API}/releases/{NEW}").json()
    assert one["target_path"] == "models/reference-onnx-1.1.0.tar"
    assert client.get(f"{API}/models/nothing").status_code == 404
    assert client.get(f"{API}/releases/nothing@9").status_code == 404


def test_syncing_the_registry_is_audited_and_needs_a_repository(api: SeededApi) -> None:
    response = api.client("operator").post(f"{API}/releases/sync")
    assert (response.status_code, response.json()) == (200, {"added": 0})
    entry = AuditLog(api.engine).entries(subject="releases")[0]
    assert (entry.action, entry.actor) == ("release.sync", "operator:tests")
    unsigned = replace(api, app=create_app(replace(api.ctx, repository=None), console=False))
    refused = unsigned.client("operator").post(f"{API}/releases/sync")
    assert refused.status_code == 409
    assert "no signed repository" in refused.json()["detail"]


def test_a_rollout_is_previewed_started_steered_and_audited(api: SeededApi) -> None:
    client = api.client("operator")
    target = {"groups": ["line-a"]}
    preview = client.post(f"{API}/rollouts/preview", json={"release": NEW, "target": target})
    assert preview.status_code == 200, preview.text
    assert sorted(preview.json()["targeted"]) == list(DEVICES[:6])
    created = client.post(
        f"{API}/rollouts",
        json={
            "release": NEW,
            "target": target,
            "waves": [{"devices": 1}, {"percent": 100}],
            "gates": {"min_agreement": 0.95, "observe_s": 10},
            "pause_s": 30,
            "auto_rollback": True,
        },
    )
    assert created.status_code == 201, created.text
    rollout = created.json()
    assert rollout["model"] == NEW
    assert rollout["gates"]["min_agreement"] == 0.95
    assert rollout["created_by"] == "operator:tests"
    url = f"{API}/rollouts/{rollout['id']}"
    assert client.get(url).json()["id"] == rollout["id"]
    assert [r["id"] for r in client.get(f"{API}/rollouts", params={"active": True}).json()] == [
        rollout["id"]
    ]
    assert client.post(f"{url}/pause").json()["state"] == "paused"
    assert client.post(f"{url}/resume").json()["state"] != "paused"
    assert client.post(f"{url}/abort").json()["state"] == "aborted"
    again = client.post(f"{url}/pause")
    assert again.status_code == 409
    actions = [e.action for e in AuditLog(api.engine).entries(subject=f"rollout/{rollout['id']}")]
    assert {"rollout.create", "rollout.pause", "rollout.resume", "rollout.abort"} <= set(actions)


@pytest.mark.parametrize(
    ("body", "status", "named"),
    [
        ({"release": NEW, "waves": []}, 422, "body.waves: List should have at least 1 item"),
        (
            {"release": NEW, "waves": [{"devices": 1, "percent": 50}]},
            422,
            "exactly one of 'devices' or 'percent'",
        ),
        ({"release": NEW, "waves": [{"percent": 101}]}, 422, "body.waves.0.percent"),
        ({"release": NEW, "waves": [{"percent": 100}], "gates": {"speed": 1}}, 422, "speed"),
        (
            {"release": NEW, "waves": [{"percent": 100}], "gates": {"observe_s": 999}},
            422,
            "observe_s",
        ),
        ({"release": NEW, "waves": [{"devices": 2}]}, 422, "waves"),
        ({"release": "nothing@1", "waves": [{"percent": 100}]}, 404, "nothing@1"),
        (
            {"release": NEW, "waves": [{"percent": 100}], "target": {"groups": ["line-z"]}},
            409,
            "no device",
        ),
    ],
)
def test_bad_rollouts_are_refused_naming_the_problem(
    reader: SeededApi, body: dict[str, Any], status: int, named: str
) -> None:
    response = reader.client("operator").post(f"{API}/rollouts", json=body)
    assert response.status_code == status, response.text
    assert named in response.json()["detail"]
    assert reader.client("viewer").get(f"{API}/rollouts").json() == []


def test_steering_an_unknown_rollout_is_404(reader: SeededApi) -> None:
    response = reader.client("operator").post(f"{API}/rollouts/77/pause")
    assert response.status_code == 404
    assert "77" in response.json()["detail"]


# -- operators, tokens, audit --------------------------------------------------------------


def test_an_admin_adds_an_operator_and_issues_a_token(api: SeededApi) -> None:
    admin = api.client("admin")
    created = admin.post(
        f"{API}/operators", json={"username": "dana", "password": PASSWORD, "role": "operator"}
    )
    assert created.status_code == 201
    assert (created.json()["username"], created.json()["role"]) == ("dana", "operator")
    issued = admin.post(f"{API}/operators/dana/tokens", json={"name": "ci", "ttl_s": 3600})
    assert issued.status_code == 201
    token = issued.json()["token"]
    principal = api.ctx.auth.verify(token, now=api.now)
    assert principal is not None and principal.actor == "dana:ci"
    listed = {o["username"]: o for o in admin.get(f"{API}/operators").json()}
    assert [t["name"] for t in listed["dana"]["tokens"]] == ["ci"]
    actions = [(e.action, e.subject) for e in AuditLog(api.engine).entries(actor="admin:tests")]
    assert actions[:2] == [("token.issue", "operator/dana"), ("operator.create", "operator/dana")]
    audit = api.client("viewer").get(f"{API}/audit", params={"actor": "admin:tests"}).json()
    assert [a["action"] for a in audit][:2] == ["token.issue", "operator.create"]


@pytest.mark.parametrize(
    ("body", "status", "named"),
    [
        ({"username": "admin", "password": PASSWORD, "role": "viewer"}, 409, "'admin' exists"),
        ({"username": "eve", "password": "short", "role": "viewer"}, 422, "body.password"),
        ({"username": "eve", "password": PASSWORD, "role": "root"}, 422, "body.role"),
        ({"username": "e\u2028ve", "password": PASSWORD, "role": "viewer"}, 400, "printable"),
    ],
)
def test_bad_operators_are_refused(
    api: SeededApi, body: dict[str, Any], status: int, named: str
) -> None:
    response = api.client("admin").post(f"{API}/operators", json=body)
    assert response.status_code == status, response.text
    assert named in response.json()["detail"]


def test_a_token_for_an_unknown_operator_is_404(reader: SeededApi) -> None:
    response = reader.client("admin").post(f"{API}/operators/nobody/tokens", json={"name": "ci"})
    assert (response.status_code, response.json()) == (404, {"detail": "no operator 'nobody'"})


def test_docs_openapi_and_health_are_served(reader: SeededApi) -> None:
    client = reader.client()
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    paths = set(spec["paths"])
    for url in READS:
        template = url.replace("dev-00", "{device_id}").replace("line-a", "{name}")
        assert template in paths
    assert "HTTPBearer" in spec["components"]["securitySchemes"]


def test_the_api_is_the_same_with_the_console_installed(reader: SeededApi) -> None:
    with_console = replace(reader, app=create_app(reader.ctx))
    api_paths = {p for p in reader.client().get("/openapi.json").json()["paths"]}
    assert api_paths <= set(with_console.client().get("/openapi.json").json()["paths"])
    assert with_console.client("viewer").get(f"{API}/devices").json()["total"] == 12
    assert with_console.client().get(f"{API}/devices").status_code == 401


# -- the operators CLI ---------------------------------------------------------------------


def _cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fleet-server")
    add_operator_commands(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_the_cli_adds_an_operator_and_issues_a_token(
    api: SeededApi, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = str(tmp_path / "fleet" / "fleet.db")
    secret = tmp_path / "password"
    secret.write_text(PASSWORD + "\n")
    args = _cli(
        [
            "operators",
            "add",
            "lee",
            "--role",
            "operator",
            "--db",
            db,
            "--password-file",
            str(secret),
        ]
    )
    assert args.func(args) == 0
    args = _cli(["tokens", "issue", "lee", "laptop", "--db", db, "--ttl-days", "1"])
    assert args.func(args) == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]
    principal = Auth(api.engine).verify(token, now=api.now)
    assert principal is not None and (principal.username, principal.role) == ("lee", "operator")
    assert AuditLog(api.engine).entries(actor="cli")[0].action == "token.issue"
    assert api.ctx.auth.login("lee", PASSWORD, now=api.now) is not None
    args = _cli(["operators", "list", "--db", db])
    assert args.func(args) == 0
    assert "lee\toperator" in capsys.readouterr().out.splitlines()


def test_the_cli_reads_the_password_from_the_environment_never_an_argument(
    tmp_path: Path,
) -> None:
    assert read_password(None, {PASSWORD_ENV: "from-env-123"}) == "from-env-123"
    empty = tmp_path / "empty"
    empty.write_text("")
    with pytest.raises(AuthError, match="is empty"):
        read_password(empty, {})
    with pytest.raises(SystemExit):
        _cli(["operators", "add", "lee", "--role", "operator", "--db", "x", "--password", "p"])


def test_the_cli_refuses_a_duplicate_operator(api: SeededApi, tmp_path: Path) -> None:
    args = _cli(
        [
            "operators",
            "add",
            "admin",
            "--role",
            "viewer",
            "--db",
            str(tmp_path / "fleet" / "fleet.db"),
        ]
    )
    with pytest.MonkeyPatch.context() as env:
        env.setenv(PASSWORD_ENV, PASSWORD)
        with pytest.raises(AuthError, match="already exists"):
            args.func(args)
