"""``/api/v1/telemetry``: aggregate windows as numbers people read.

Per device: the last ``limit`` windows as a series (each window through
``window_summary.summarize_window``: counts, rates, throughput, latency p50/p99 from the
latency histogram, feature means). Per group: the windows the group's devices sent in
the last ``since_s`` seconds (server receive time), added up in total and per device
(``summarize_windows``: latency percentiles from the summed histograms, means weighted by
each window's frame count). At most ``MAX_GROUP_WINDOWS`` windows, the newest, are read.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from sqlalchemy import select

from edge_agent.protocol.manifest import FEATURE_NAMES
from edge_agent.protocol.telemetry import LATENCY_EDGES_MS, VERDICT_COUNTS
from fleet_server.api.deps import Viewer, context, not_found
from fleet_server.api.schemas import (
    DEVICE_ID_PATTERN,
    TEXT_PATTERN,
    DeviceSummary,
    DeviceTelemetry,
    GroupTelemetry,
    Summary,
    WindowPoint,
)
from fleet_server.storage.database import Transaction, session_factory
from fleet_server.storage.schema import ID_LENGTH, TEXT_LENGTH, Device, TelemetryWindowRow
from fleet_server.storage.window_summary import OUTCOMES, counts_of, latency_quantile
from fleet_server.storage.window_summary import summarize_window as summarize_one

router = APIRouter(prefix="/telemetry", tags=["telemetry"])

MAX_SERIES = 1000
MAX_GROUP_WINDOWS = 20_000
MAX_SINCE_S = 30 * 24 * 3600


@router.get(
    "/devices/{device_id}",
    summary="A device's latest windows as a series",
    response_model=DeviceTelemetry,
)
def device_series(
    request: Request,
    _: Viewer,
    device_id: Annotated[str, Path(max_length=ID_LENGTH, pattern=DEVICE_ID_PATTERN)],
    limit: Annotated[int, Query(ge=1, le=MAX_SERIES)] = 60,
) -> DeviceTelemetry:
    with _transaction(request, f"reading windows of {device_id}") as session:
        if session.get(Device, device_id) is None:
            raise not_found(f"device {device_id!r}")
        documents = list(
            session.scalars(
                select(TelemetryWindowRow.window)
                .where(TelemetryWindowRow.device_id == device_id)
                .order_by(TelemetryWindowRow.seq.desc())
                .limit(limit)
            )
        )
    points = [WindowPoint(**summarize_one(d)) for d in reversed(documents)]
    return DeviceTelemetry(device=device_id, windows=points)


@router.get(
    "/groups/{name}",
    summary="A group's recent windows added up, in total and per device",
    response_model=GroupTelemetry,
)
def group_summary(
    request: Request,
    _: Viewer,
    name: Annotated[str, Path(min_length=1, max_length=TEXT_LENGTH, pattern=TEXT_PATTERN)],
    since_s: Annotated[int, Query(ge=1, le=MAX_SINCE_S)] = 3600,
) -> GroupTelemetry:
    since = context(request).clock() - timedelta(seconds=since_s)
    with _transaction(request, f"reading windows of group {name}") as session:
        devices = list(session.scalars(select(Device.id).where(Device.line == name)))
        if not devices:
            raise not_found(f"group {name!r} (no device reports that line)")
        rows = list(
            session.execute(
                select(TelemetryWindowRow.device_id, TelemetryWindowRow.window)
                .join(Device, Device.id == TelemetryWindowRow.device_id)
                .where(Device.line == name, TelemetryWindowRow.received_at >= since)
                .order_by(TelemetryWindowRow.received_at.desc())
                .limit(MAX_GROUP_WINDOWS + 1)
            )
        )
    truncated = len(rows) > MAX_GROUP_WINDOWS
    by_device: dict[str, list[Mapping[str, Any]]] = {d: [] for d in sorted(devices)}
    for device_id, document in rows[:MAX_GROUP_WINDOWS]:
        by_device[device_id].append(document)
    return GroupTelemetry(
        group=name,
        since=since,
        truncated=truncated,
        total=summarize_windows(d for docs in by_device.values() for d in docs),
        devices=[
            DeviceSummary(device=d, **summarize_windows(docs).model_dump())
            for d, docs in by_device.items()
        ],
    )


def summarize_windows(documents: Iterable[Mapping[str, Any]]) -> Summary:
    """The sum of some stored windows (wire documents): counts, rates, latency p50/p99 of
    the summed latency histograms, and feature means from the summed moments (each
    window weighted by the frames its moments cover). Odd or missing fields are left out
    of the sums, as ``window_summary`` does."""
    windows = 0
    counts = dict.fromkeys(VERDICT_COUNTS, 0)
    latency = [0] * (len(LATENCY_EDGES_MS) + 1)
    has_latency = False
    frames_of = dict.fromkeys(FEATURE_NAMES, 0)
    sum_of = dict.fromkeys(FEATURE_NAMES, 0.0)
    for document in documents:
        windows += 1
        for key, count in counts_of(document).items():
            counts[key] += count
        raw = document.get("latency")
        if isinstance(raw, list) and len(raw) == len(latency):
            has_latency = True
            latency = [
                a + (b if isinstance(b, int) else 0) for a, b in zip(latency, raw, strict=True)
            ]
        moments = document.get("moments")
        for feature in FEATURE_NAMES:
            value = moments.get(feature) if isinstance(moments, Mapping) else None
            if (
                isinstance(value, list)
                and len(value) == 3
                and isinstance(value[0], int)
                and isinstance(value[1], int | float)
            ):
                frames_of[feature] += value[0]
                sum_of[feature] += float(value[1])
    frames = sum(counts[k] for k in OUTCOMES)
    return Summary(
        windows=windows,
        frames=frames,
        counts=counts,
        rates={k: (counts[k] / frames if frames else None) for k in OUTCOMES},
        latency_p50_ms=latency_quantile(latency, 0.5) if has_latency else None,
        latency_p99_ms=latency_quantile(latency, 0.99) if has_latency else None,
        means={f: (sum_of[f] / n if n else None) for f, n in frames_of.items()},
    )


def _transaction(request: Request, what: str) -> Transaction:
    return Transaction(session_factory(context(request).engine)(), what)
