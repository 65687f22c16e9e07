"""``FleetViews`` over a seeded fleet (real SQLite, real signed repository, alerts opened by
the real drift monitor): what the console and the API read."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from fleet_server.storage import open_database
from fleet_server.storage.database import Transaction, session_factory
from fleet_server.storage.fleet_views import FleetViews
from fleet_server.storage.schema import AlertRow
from tests.fleet_seed import DRIFTING, LINES, SEED_NOW, UPGRADED, SeededFleet, seed_fleet


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeededFleet]:
    seeded = seed_fleet(tmp_path_factory.mktemp("views") / "fleet", devices=10, windows=24)
    yield seeded
    seeded.engine.dispose()


@pytest.fixture
def views(fleet: SeededFleet) -> FleetViews:
    return FleetViews(fleet.engine, fleet.references)


def test_overview_counts_devices_models_groups_and_alerts(
    fleet: SeededFleet, views: FleetViews
) -> None:
    got = views.overview(fleet.now)
    devices = got["devices"]
    assert devices["total"] == len(fleet.devices)
    assert (devices["online"], devices["offline"], devices["unknown"]) == (
        len(fleet.online),
        len(fleet.offline),
        len(fleet.unknown),
    )
    # Offline devices went quiet a quarter of the history before now.
    assert devices["seen_5m"] == len(fleet.devices) - len(fleet.offline)
    by_model = {m["model"]: m["devices"] for m in got["by_model"]}
    assert by_model == {
        fleet.models[0]: len(fleet.devices) - len(UPGRADED),
        fleet.models[1]: len(UPGRADED),
    }
    groups = {g["group"]: g for g in got["by_group"]}
    assert set(groups) == {*LINES, None}  # the unknown device has reported no line
    assert sum(g["devices"] for g in groups.values()) == len(fleet.devices)
    assert sum(g["offline"] for g in groups.values()) == len(fleet.offline)
    assert got["open_alerts_total"] == len(fleet.open_alerts) > 0
    assert {a["key"] for a in got["open_alerts"]} == {DRIFTING}
    assert "brightness" in {a["feature"] for a in got["open_alerts"]}
    opened = [a["opened_at"] for a in got["open_alerts"]]
    assert opened == sorted(opened, reverse=True)
    assert got["rollouts"] == []


def test_devices_filters_and_pages(fleet: SeededFleet, views: FleetViews) -> None:
    rows, total = views.devices(limit=3)
    assert total == len(fleet.devices)
    assert [r["id"] for r in rows] == list(fleet.devices[:3])
    rest, _ = views.devices(limit=100, offset=3)
    assert [r["id"] for r in rest] == list(fleet.devices[3:])

    line_1, total = views.devices(group="line-1")
    assert total == len(line_1) > 0
    assert {r["group"] for r in line_1} == {"line-1"}
    offline, total = views.devices(status="offline")
    assert {r["id"] for r in offline} == set(fleet.offline)
    upgraded, _ = views.devices(model=fleet.models[1])
    assert {r["id"] for r in upgraded} == set(UPGRADED)
    assert views.devices(group="line-1", status="nothing") == ([], 0)
    drifting = next(r for r in views.devices(limit=100)[0] if r["id"] == DRIFTING)
    assert drifting["open_alerts"] == len(fleet.open_alerts)
    with pytest.raises(ValueError, match="limit must be"):
        views.devices(limit=0)
    with pytest.raises(ValueError, match="offset must be"):
        views.devices(offset=-1)


def test_device_has_model_history_and_events(fleet: SeededFleet, views: FleetViews) -> None:
    device = views.device(UPGRADED[0])
    assert device is not None
    assert device["model"] == fleet.models[1]
    assert device["previous_model"] == fleet.models[0]
    history = [(h["event"], h["model"]) for h in device["model_history"]]
    assert history == [("activated", fleet.models[1]), ("activated", fleet.models[0])]
    kinds = [e["event"] for e in device["events"]]
    assert kinds[:4] == ["activated", "gate_passed", "verified", "downloading"]
    gate = device["events"][1]
    assert gate["figures"]["agreement"] == pytest.approx(0.995)
    assert views.device("no-such-device") is None


def test_device_windows_are_the_newest_oldest_first(fleet: SeededFleet, views: FleetViews) -> None:
    windows = views.device_windows(DRIFTING, limit=10)
    assert [w["seq"] for w in windows] == list(range(fleet.windows_per_device - 10, 24))
    assert windows[-1]["t1"] == int(fleet.now.timestamp())
    last = windows[-1]
    assert last["frames"] > 0 and last["throughput"] > 0
    assert 0 < last["latency_p50_ms"] <= last["latency_p99_ms"]
    assert sum(last["rates"].values()) == pytest.approx(1.0)
    # The drifting device's brightness ends far below where it started.
    first = views.device_windows(DRIFTING, limit=fleet.windows_per_device)[0]
    assert last["means"]["brightness"] < 0.85 * first["means"]["brightness"]
    assert views.device_windows("no-such-device") == []
    with pytest.raises(ValueError, match="limit must be"):
        views.device_windows(DRIFTING, limit=0)


def test_reference_band_comes_from_the_device_model(fleet: SeededFleet, views: FleetViews) -> None:
    band = views.reference_band(DRIFTING)
    assert band is not None
    low, high = band["brightness"]
    reference = fleet.references.get(fleet.models[0])
    assert reference is not None
    assert low < reference.profile.features["brightness"].mean < high
    # Shorter windows have a wider band.
    short = views.reference_band(DRIFTING, 25)
    assert short is not None
    assert short["brightness"][1] - short["brightness"][0] > high - low
    assert FleetViews(fleet.engine).reference_band(DRIFTING) is None
    assert views.reference_band("no-such-device") is None


def test_alerts_for_device_include_group_alerts_listing_it(
    fleet: SeededFleet, views: FleetViews
) -> None:
    own = views.alerts_for_device(DRIFTING)
    assert {a["id"] for a in own} == set(fleet.open_alerts)
    assert views.alerts_for_device(fleet.devices[0]) == []
    line = fleet.line_of(fleet.devices[0])
    now = fleet.now
    with Transaction(session_factory(fleet.engine)(), "adding a line alert") as session:
        row = AlertRow(
            scope="line",
            scope_key=line,
            feature="contrast",
            test="cusum",
            direction="up",
            statistic=6.0,
            threshold=5.0,
            since_seq=3,
            since_t=now - timedelta(minutes=5),
            devices=[fleet.devices[0]],
            evidence={},
            opened_at=now,
            updated_at=now,
            quiet=0,
            webhook_status="none",
            webhook_attempts=0,
        )
        session.add(row)
        session.flush()
        line_alert = row.id
    try:
        listed = views.alerts_for_device(fleet.devices[0])
        assert [a["id"] for a in listed] == [line_alert]
        assert listed[0]["scope"] == "line"
        cells = views.heatmap(now)
        row_0 = next(r for r in cells["rows"] if r["device"] == fleet.devices[0])
        assert row_0["alerts"] == ["contrast"]
    finally:
        with Transaction(session_factory(fleet.engine)(), "removing it") as session:
            session.delete(session.get(AlertRow, line_alert))


def test_heatmap_shows_the_drifting_device_far_below_and_the_rest_near(
    fleet: SeededFleet, views: FleetViews
) -> None:
    got = views.heatmap(fleet.now)
    assert got["total"] == len(fleet.devices)
    assert got["features"][0] == "brightness"
    rows = {r["device"]: r for r in got["rows"]}
    drifting = rows[DRIFTING]
    assert drifting["cells"]["brightness"] < -5
    assert "brightness" in drifting["alerts"]
    quiet = [r for d, r in rows.items() if d != DRIFTING]
    assert all(abs(r["cells"]["brightness"]) < 4 for r in quiet)
    assert all(r["alerts"] == [] for r in quiet)
    offline = rows[fleet.offline[0]]
    assert offline["age_s"] > 60
    only = views.heatmap(fleet.now, features=["sharpness"], group="line-1", limit=2)
    assert only["features"] == ["sharpness"]
    assert len(only["rows"]) == 2 and {r["group"] for r in only["rows"]} == {"line-1"}
    assert FleetViews(fleet.engine).heatmap(fleet.now)["rows"][0]["cells"]["brightness"] is None
    with pytest.raises(ValueError, match="unknown features: colour"):
        views.heatmap(fleet.now, features=["colour"])


def test_groups_compare_fail_rates_and_feature_means(fleet: SeededFleet, views: FleetViews) -> None:
    groups = {g["group"]: g for g in views.groups()}
    assert set(groups) == {*LINES, None}
    drifting_line = fleet.line_of(DRIFTING)
    for name in LINES:
        group = groups[name]
        assert group["windows"] == group["devices"]
        assert 0.0 < group["fail_rate"] < 0.3
        assert group["means"]["brightness"] is not None
    assert groups[drifting_line]["shift"]["brightness"] < -2
    others = [groups[n]["shift"]["brightness"] for n in LINES if n != drifting_line]
    assert all(abs(s) < 3 for s in others)
    assert sum(groups[n]["models"].get(fleet.models[1], 0) for n in LINES) == len(UPGRADED)


def test_every_view_answers_on_an_empty_database(tmp_path: Path) -> None:
    engine = open_database(f"sqlite:///{tmp_path / 'empty.db'}")
    views = FleetViews(engine)
    now = SEED_NOW
    overview = views.overview(now)
    assert overview["devices"]["total"] == 0
    assert overview["by_model"] == [] and overview["open_alerts"] == []
    assert views.devices() == ([], 0)
    assert views.heatmap(now)["rows"] == []
    assert views.groups() == []
    engine.dispose()
