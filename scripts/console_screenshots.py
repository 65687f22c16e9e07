"""Screenshots of the operator console's main pages, for the README and docs/console.md.

    python scripts/console_screenshots.py [--out docs/screenshots]

Seeds a fleet (``tests/fleet_seed.py``: devices on three lines, a darkening device with
its drift alerts, two releases) in a temporary directory, starts a rollout of the newer
release to ``line-1`` and lets it assign its canary wave, serves the console on a free
loopback port and drives Debian's ``chromium`` with Playwright: it logs in as the
operator and saves ``<page>-laptop.png`` (1366x900) and ``<page>-tablet.png`` (820x1180)
for each page. Exits 2 when chromium is missing.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for tests.fleet_seed, when run as a script

from playwright.sync_api import Page, sync_playwright  # noqa: E402

from fleet_server.app import create_app  # noqa: E402
from fleet_server.domain.rollout import GateLimits, RolloutTarget, WaveSpec  # noqa: E402
from tests.fleet_seed import (  # noqa: E402
    CHROMIUM_ARGS,
    DRIFTING,
    PASSWORDS,
    fleet_context,
    seed_fleet,
    serve_http,
)

SIZES = {"laptop": (1366, 900), "tablet": (820, 1180)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    args = parser.parse_args(argv)
    chromium = shutil.which("chromium")
    if chromium is None:
        print("chromium not found: install the Debian package 'chromium'", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="console-shots-") as tmp:
        fleet = seed_fleet(Path(tmp) / "fleet", devices=18, windows=60)
        ctx = fleet_context(fleet)
        rollout = ctx.rollouts.create(
            fleet.models[1],
            RolloutTarget(groups=("line-1",)),
            [WaveSpec(devices=1), WaveSpec(percent=50), WaveSpec(percent=100)],
            GateLimits(),
            pause_s=300,
            auto_rollback=True,
            actor="operator",
            now=ctx.clock(),
        )
        ctx.rollouts.tick(ctx.clock())
        pages = {
            "overview": "/",
            "devices": "/devices",
            "device": f"/devices/{DRIFTING}",
            "models": "/models",
            "rollout": f"/rollouts/{rollout.id}",
            "drift": "/drift",
        }
        with serve_http(create_app(ctx)) as base, sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            try:
                for size, (width, height) in SIZES.items():
                    page = browser.new_page(viewport={"width": width, "height": height})
                    _login(page, base)
                    for name, path in pages.items():
                        page.goto(base + path)
                        target = args.out / f"{name}-{size}.png"
                        page.screenshot(path=str(target), full_page=True)
                        print(
                            f"{target.relative_to(ROOT) if target.is_relative_to(ROOT) else target}"
                        )
                    page.close()
            finally:
                browser.close()
    return 0


def _login(page: Page, base: str) -> None:
    page.goto(base + "/login")
    page.get_by_label("Username").fill("operator")
    page.get_by_label("Password").fill(PASSWORDS["operator"])
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(base + "/")


if __name__ == "__main__":
    sys.exit(main())
