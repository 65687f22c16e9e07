"""The operator console in a real browser: Playwright drives Debian's ``chromium`` against
the fleet server app on a real uvicorn server, over a seeded fleet (``tests/fleet_seed``).

Log in, see the fleet's numbers, open the darkening device and its charts, start a
rollout from the form, pause and abort it through the confirmation pages, and find the
result in the database and the audit log. A wrong password shows an error; a viewer sees
no mutation controls and forged POSTs (wrong role, no CSRF token, another origin) are
refused without changing anything.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.sync_api import (
    Browser,
    BrowserContext,
    Page,
    ViewportSize,
    expect,
    sync_playwright,
)
from sqlalchemy import select

from fleet_server.app import AppContext, create_app
from fleet_server.domain.rollout import GateLimits, RolloutTarget, WaveSpec
from fleet_server.storage.audit import AuditLog
from fleet_server.storage.database import Transaction, session_factory
from fleet_server.storage.schema import RolloutRow
from tests.fleet_seed import (
    CHROMIUM_ARGS,
    PASSWORDS,
    SeededFleet,
    fleet_context,
    seed_fleet,
    serve_http,
)

LAPTOP: ViewportSize = {"width": 1366, "height": 900}
TABLET: ViewportSize = {"width": 820, "height": 1180}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TIMEOUT_MS = 10_000


@dataclass(frozen=True)
class Console:
    fleet: SeededFleet
    ctx: AppContext
    base: str


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    fleet = seed_fleet(tmp_path_factory.mktemp("console") / "fleet")
    ctx = fleet_context(fleet)
    with serve_http(create_app(ctx)) as base:
        yield Console(fleet, ctx, base)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("chromium is not installed: install the Debian package `chromium`")
    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    made = browser.new_context(viewport=LAPTOP)
    made.set_default_timeout(TIMEOUT_MS)
    try:
        yield made
    finally:
        made.close()


def _login(page: Page, base: str, username: str) -> None:
    page.goto(f"{base}/")
    expect(page).to_have_url(re.compile(r"/login\?next=/$"))
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(PASSWORDS[username])
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(f"{base}/")


def _shot(page: Page, path: Path) -> None:
    page.screenshot(path=str(path), full_page=True)
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000, path


def _state(console: Console, rollout_id: int) -> str:
    with Transaction(session_factory(console.fleet.engine)(), "test") as session:
        state = session.scalar(select(RolloutRow.state).where(RolloutRow.id == rollout_id))
    assert state is not None
    return state


def test_operator_sees_the_fleet_and_a_device_with_its_charts(
    console: Console, context: BrowserContext, tmp_path: Path
) -> None:
    fleet = console.fleet
    page = context.new_page()
    _login(page, console.base, "operator")

    expect(page.locator("#stat-total .value")).to_have_text(str(len(fleet.devices)))
    expect(page.locator("#stat-online .value")).to_have_text(str(len(fleet.online)))
    expect(page.locator("#stat-offline .value")).to_have_text(str(len(fleet.offline)))
    expect(page.locator("#stat-alerts .value")).to_have_text(str(len(fleet.open_alerts)))
    assert fleet.open_alerts, "the seeded drift must have opened alerts"
    expect(page.locator("#table-models")).to_contain_text(fleet.models[0])
    expect(page.locator("#table-groups")).to_contain_text("line-1")
    expect(page.locator("#table-alerts")).to_contain_text("brightness")
    _shot(page, tmp_path / "overview.png")

    page.locator("#table-alerts").get_by_role("link", name=fleet.drifting).first.click()
    expect(page).to_have_url(f"{console.base}/devices/{fleet.drifting}")
    expect(page.get_by_role("heading", level=1)).to_contain_text(fleet.drifting)
    expect(page.locator("#device-model")).to_have_text(fleet.models[0])
    windows = fleet.windows_per_device
    for chart in ("throughput", "rates", "latency", "brightness", "contrast", "r-mean"):
        expect(page.locator(f"#chart-{chart}")).to_be_visible()
    expect(page.locator("#chart-brightness circle.pt")).to_have_count(windows)
    expect(page.locator("#chart-throughput circle.pt")).to_have_count(windows)
    expect(page.locator("#chart-rates circle.pt")).to_have_count(4 * windows)
    expect(page.locator("#chart-latency circle.pt")).to_have_count(2 * windows)
    expect(page.locator("#chart-brightness rect.band")).to_have_count(1)
    expect(page.locator("#chart-brightness polyline.line")).to_have_count(1)
    expect(page.locator("#chart-brightness text.marker-label.strong")).to_contain_text(
        "brightness down"
    )
    expect(page.locator("#table-device-alerts")).to_contain_text("brightness")
    expect(page.locator("#model-history")).to_contain_text(fleet.models[0])
    _shot(page, tmp_path / "device.png")

    # An upgraded device shows both models in its history and its gate figures.
    page.goto(f"{console.base}/devices/{fleet.devices[0]}")
    expect(page.locator("#model-history li")).to_have_count(2)
    expect(page.locator("#table-events")).to_contain_text("agreement")

    page.set_viewport_size(TABLET)
    page.goto(f"{console.base}/drift")
    drifting_row = page.locator("#heatmap tr", has=page.get_by_role("link", name=fleet.drifting))
    expect(drifting_row.locator("td.cell.alert[data-feature=brightness]")).to_have_count(1)
    expect(page.locator("#table-group-compare")).to_contain_text("line-3")
    _shot(page, tmp_path / "drift-tablet.png")
    page.goto(f"{console.base}/models")
    expect(page.locator("article.release")).to_have_count(2)
    expect(page.locator("#release-reference-onnx-1\\.1\\.0")).to_contain_text("Retrained")

    # Logging out revokes the session: the pages ask for a login again.
    page.locator("form.who").get_by_role("button", name="Log out").click()
    expect(page).to_have_url(f"{console.base}/login")
    page.goto(f"{console.base}/models")
    expect(page).to_have_url(re.compile(r"/login\?next=/models$"))


def test_operator_starts_pauses_and_aborts_a_rollout(
    console: Console, context: BrowserContext, tmp_path: Path
) -> None:
    page = context.new_page()
    _login(page, console.base, "operator")
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Rollouts").click()
    form = page.locator("#start-rollout")
    form.get_by_label("Release").select_option(console.fleet.models[1])
    form.get_by_label("Target group").select_option("line-1")
    form.get_by_label("Waves", exact=True).fill("1, 100%")
    form.get_by_label("Pause between waves (s)").fill("0")
    form.get_by_role("button", name="Start rollout").click()

    expect(page).to_have_url(re.compile(r"/rollouts/\d+$"))
    rollout_id = int(page.url.rsplit("/", 1)[1])
    expect(page.locator("#rollout-state")).to_have_text("running")
    expect(page.locator("#table-waves tbody tr")).to_have_count(2)
    expect(page.locator("#table-rollout-devices")).to_contain_text("cam-001")
    _shot(page, tmp_path / "rollout.png")

    page.locator("#action-pause").click()
    expect(page.get_by_role("heading", level=1)).to_have_text(f"Pause rollout {rollout_id}?")
    page.get_by_role("button", name="Yes, pause").click()
    expect(page.locator("#rollout-state")).to_have_text("paused")
    assert _state(console, rollout_id) == "paused"

    page.locator("#action-abort").click()
    page.get_by_role("link", name="Cancel").click()
    expect(page.locator("#rollout-state")).to_have_text("paused")
    page.locator("#action-abort").click()
    page.get_by_role("button", name="Yes, abort").click()
    expect(page.locator("#rollout-state")).to_have_text("aborted")
    expect(page.locator("#action-pause")).to_have_count(0)
    assert _state(console, rollout_id) == "aborted"

    actions = [
        (e.action, e.actor)
        for e in reversed(AuditLog(console.fleet.engine).entries(subject=f"rollout/{rollout_id}"))
    ]
    assert actions == [
        ("rollout.create", "operator"),
        ("rollout.pause", "operator"),
        ("rollout.abort", "operator"),
    ]


def test_a_wrong_password_shows_an_error(console: Console, context: BrowserContext) -> None:
    page = context.new_page()
    page.goto(f"{console.base}/login")
    page.get_by_label("Username").fill("operator")
    page.get_by_label("Password").fill("not-the-password")
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#login-error")).to_have_text("Wrong username or password.")
    expect(page.get_by_label("Username")).to_have_value("operator")
    page.goto(f"{console.base}/devices")
    expect(page).to_have_url(re.compile(r"/login\?next=/devices$"))


def test_a_viewer_sees_no_controls_and_forged_posts_are_refused(
    console: Console, context: BrowserContext
) -> None:
    ctx = console.ctx
    made = ctx.rollouts.create(
        console.fleet.models[1],
        RolloutTarget(groups=("line-2",)),
        [WaveSpec(percent=100)],
        GateLimits(),
        pause_s=0,
        auto_rollback=False,
        actor="admin",
        now=ctx.clock(),
    )
    page = context.new_page()
    _login(page, console.base, "viewer")
    page.goto(f"{console.base}/rollouts")
    expect(page.locator("#start-rollout")).to_have_count(0)
    page.goto(f"{console.base}/rollouts/{made.id}")
    expect(page.locator("#read-only")).to_be_visible()
    expect(page.locator("[id^=action-]")).to_have_count(0)
    page.goto(f"{console.base}/rollouts/{made.id}/abort")
    expect(page.get_by_role("heading", level=1)).to_have_text("Not allowed")

    # The viewer's own session and CSRF token (from the logout form) are not enough.
    page.goto(f"{console.base}/")
    csrf = page.locator("form.who input[name=csrf]").get_attribute("value")
    assert csrf
    url = f"{console.base}/rollouts/{made.id}/abort"
    refused = page.request.post(url, form={"csrf": csrf}, max_redirects=0)
    assert refused.status == 403
    assert "needs the operator role" in refused.text()

    # An operator's session without the token, or from another origin, is refused too.
    context.clear_cookies()
    _login(page, console.base, "operator")
    no_token = page.request.post(url, form={"csrf": ""}, max_redirects=0)
    assert no_token.status == 403
    page.goto(f"{console.base}/")
    operator_csrf = page.locator("form.who input[name=csrf]").get_attribute("value")
    assert operator_csrf
    cross_site = page.request.post(
        url,
        form={"csrf": operator_csrf},
        headers={"Origin": "http://attacker.example"},
        max_redirects=0,
    )
    assert cross_site.status == 403
    assert _state(console, made.id) == "running"
    assert not [
        e
        for e in AuditLog(console.fleet.engine).entries(subject=f"rollout/{made.id}")
        if e.action == "rollout.abort"
    ]
