"""``fleet-server ingest``: its options, and the one place that wires the ingest objects.

Database -> stores -> reference library -> drift monitor (rebuilt from stored windows)
-> webhook sender (optional) -> ingest worker on the MQTT transport; then wait for
``stop`` and take it all down in reverse order.
"""

from __future__ import annotations

import argparse
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from edge_agent.transport import MqttTransport
from fleet_server.domain.alerts import AlertPolicy
from fleet_server.domain.fleet_drift import FleetRule
from fleet_server.storage import AlertStore, TelemetryStore, open_database
from fleet_server.webhook import (
    DEFAULT_ATTEMPTS,
    DEFAULT_TIMEOUT_S,
    WebhookSender,
    check_webhook_url,
)
from fleet_server.workers.drift_monitor import DEFAULT_REPLAY_WINDOWS, FleetDriftMonitor
from fleet_server.workers.ingest import DEFAULT_REORDER_WAIT_S, TelemetryIngest
from fleet_server.workers.references import ReferenceLibrary

_CONNECT_WAIT_S = 5.0
_RULE = FleetRule()
_POLICY = AlertPolicy()

INGEST_DESCRIPTION = (
    "Subscribe to every device's telemetry and state topics, store devices and windows in "
    "the database --db (any SQLAlchemy URL, or a file path for SQLite in WAL mode; tables "
    "are created if missing), run the drift detectors per device against the reference "
    "profile of the window's model (from the released bundle in --repo, or a bundle "
    "directory given with --bundles), and open, update and resolve drift alerts per "
    "device, line, firmware profile, model and fleet. A feature drifting the same way on "
    f"at least --share (default {_RULE.share}) of a group's devices, and at least "
    f"--min-devices (default {_RULE.min_devices}), is one group alert; a device drifting "
    "alone is a device alert. With --webhook, every opened and resolved alert is POSTed "
    "there as JSON (retried with back-off; the outcome is stored with the alert). "
    "Malformed payloads are counted and logged, duplicates (same device and seq) are "
    "ignored. Logs one line per alert and the counters every minute to stderr; stops "
    "cleanly on SIGINT or SIGTERM."
)


@dataclass(frozen=True, slots=True)
class IngestOptions:
    db: str
    repo: Path | None
    bundles: tuple[Path, ...]
    webhook: str | None
    webhook_timeout_s: float
    webhook_attempts: int
    rule: FleetRule
    policy: AlertPolicy
    replay: int
    reorder_wait_s: float


def add_ingest_arguments(p: argparse.ArgumentParser) -> None:
    """The ingest options (the broker and TLS options are added by the CLI)."""
    p.add_argument("--db", required=True, metavar="URL", help="database URL or SQLite file")
    p.add_argument(
        "--repo",
        type=Path,
        metavar="REPO",
        help="repository directory: reference profiles of released bundles",
    )
    p.add_argument(
        "--bundles",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="a bundle directory, or a directory of them (repeatable)",
    )
    p.add_argument("--webhook", metavar="URL", help="POST alert events here (http/https)")
    p.add_argument(
        "--webhook-timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help="per attempt (default: %(default)s)",
    )
    p.add_argument(
        "--webhook-attempts",
        type=int,
        default=DEFAULT_ATTEMPTS,
        metavar="N",
        help="tries per event before it is marked failed (default: %(default)s)",
    )
    p.add_argument(
        "--share",
        type=float,
        default=_RULE.share,
        help="share of a group's devices for a group alert (default: %(default)s)",
    )
    p.add_argument(
        "--min-devices",
        type=int,
        default=_RULE.min_devices,
        metavar="N",
        help="devices a group alert needs at least (default: %(default)s)",
    )
    p.add_argument(
        "--fdr",
        type=float,
        default=_RULE.q,
        metavar="Q",
        help="Benjamini-Hochberg false discovery rate across devices (default: %(default)s)",
    )
    p.add_argument(
        "--stale-after",
        type=float,
        default=_RULE.stale_after_s,
        metavar="SECONDS",
        help="a device without a window for this long leaves the fleet view (default: %(default)s)",
    )
    p.add_argument(
        "--resolve-after",
        type=int,
        default=_POLICY.resolve_after,
        metavar="N",
        help="quiet evaluations in a row before an alert is resolved (default: %(default)s)",
    )
    p.add_argument(
        "--replay",
        type=int,
        default=DEFAULT_REPLAY_WINDOWS,
        metavar="N",
        help="stored windows per device replayed into the detectors at start "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--reorder-wait",
        type=float,
        default=DEFAULT_REORDER_WAIT_S,
        metavar="SECONDS",
        help="how long a gap in a device's window seqs is waited for (default: %(default)s)",
    )


def ingest_options(args: argparse.Namespace) -> IngestOptions:
    """Check the parsed options.

    Raises:
        ValueError: naming the bad option.
    """
    if args.repo is None and not args.bundles:
        raise ValueError("give --repo REPO or --bundles DIR: reference profiles come from there")
    if args.repo is not None and not (args.repo / "metadata").is_dir():
        raise ValueError(f"--repo {args.repo}: no metadata directory")
    for directory in args.bundles:
        if not directory.is_dir():
            raise ValueError(f"--bundles {directory}: not a directory")
    if args.webhook is not None:
        check_webhook_url(args.webhook)
    if args.webhook_timeout <= 0 or args.webhook_attempts < 1:
        raise ValueError("--webhook-timeout must be > 0 and --webhook-attempts >= 1")
    if args.replay < 0 or args.reorder_wait < 0:
        raise ValueError("--replay and --reorder-wait must be >= 0")
    rule = FleetRule(
        share=args.share,
        min_devices=args.min_devices,
        q=args.fdr,
        stale_after_s=args.stale_after,
    )
    return IngestOptions(
        db=args.db,
        repo=args.repo,
        bundles=tuple(args.bundles),
        webhook=args.webhook,
        webhook_timeout_s=args.webhook_timeout,
        webhook_attempts=args.webhook_attempts,
        rule=rule,
        policy=AlertPolicy(resolve_after=args.resolve_after),
        replay=args.replay,
        reorder_wait_s=args.reorder_wait,
    )


def run_ingest(
    options: IngestOptions,
    transport: MqttTransport,
    stop: threading.Event,
    logger: logging.Logger,
) -> None:
    """Run ingest on ``transport`` (not started yet) until ``stop`` is set.

    Raises:
        StorageError: the database cannot be opened or the stored windows read.
    """
    engine = open_database(options.db)
    try:
        telemetry, alerts = TelemetryStore(engine), AlertStore(engine)
        sender: WebhookSender | None = None
        if options.webhook is not None:
            sender = WebhookSender(
                options.webhook,
                alerts,
                timeout_s=options.webhook_timeout_s,
                attempts=options.webhook_attempts,
                logger=logger,
            )
        references = ReferenceLibrary(repo=options.repo, bundle_dirs=options.bundles, logger=logger)
        monitor = FleetDriftMonitor(
            telemetry,
            alerts,
            references,
            rule=options.rule,
            policy=options.policy,
            notify=None if sender is None else sender.notify,
            logger=logger,
        )
        last_seq = monitor.rebuild(options.replay)
        ingest = TelemetryIngest(
            transport,
            telemetry,
            on_window=monitor.on_window,
            on_state=monitor.on_state,
            reorder_wait_s=options.reorder_wait_s,
            logger=logger,
        )
        ingest.prime(last_seq)
        if sender is not None:
            sender.start()
            resent = sender.resend_pending()
            if resent:
                logger.info("re-sending %d pending webhook event(s)", resent)
        ingest.start()
        transport.start()
        try:
            if not transport.wait_connected(_CONNECT_WAIT_S):
                logger.warning("broker not reachable yet; retrying in the background")
            logger.info(
                "ingesting telemetry into %s", engine.url.render_as_string(hide_password=True)
            )
            stop.wait()
        finally:
            transport.stop()
            ingest.stop()
            if sender is not None:
                sender.stop()
    finally:
        engine.dispose()
