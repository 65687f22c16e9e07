"""``fleet-server ingest``: its options, and the one place that wires the ingest objects.

``start_ingest`` (also used by ``fleet-server serve``): stores -> reference library ->
drift monitor -> drift feed (rebuilt from stored windows, then tailing the table) ->
webhook sender (optional) -> ingest worker on the MQTT transport; leaving the context
takes it all down in reverse order. ``run_ingest`` is the command: the database, then
``start_ingest``, then the transport, until ``stop``.
"""

from __future__ import annotations

import argparse
import logging
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine

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
from fleet_server.workers.drift_feed import DriftFeed
from fleet_server.workers.drift_monitor import DEFAULT_REPLAY_WINDOWS, FleetDriftMonitor
from fleet_server.workers.ingest import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_BATCH_WAIT_S,
    DEFAULT_SHARE_GROUP,
    DEFAULT_STATUS_INTERVAL_S,
    TelemetryIngest,
)
from fleet_server.workers.references import ReferenceLibrary

DEFAULT_REORDER_WAIT_S = 5.0
_CONNECT_WAIT_S = 5.0
_RULE = FleetRule()
_POLICY = AlertPolicy()

INGEST_DESCRIPTION = (
    "Subscribe to every device's telemetry and state topics, store devices and windows in "
    "the database --db (any SQLAlchemy URL, or a file path for SQLite in WAL mode; tables "
    "are created if missing), run the drift detectors per device against the reference "
    "profile of the window's model (from the released bundle in --repo, or a bundle "
    "directory given with --bundles), and open, update and resolve drift alerts per "
    "device, line, firmware profile, model and fleet. Telemetry is a shared subscription "
    f"(--share GROUP, default {DEFAULT_SHARE_GROUP!r}; '' for a plain one): several ingest "
    "processes with the same group split the windows between them. Windows are stored in "
    "batches (--batch, --batch-wait), one transaction each; duplicates (same device and "
    "seq, whichever process stored it) are ignored and counted. Drift detection reads "
    "the stored windows back in each device's seq order on its own thread, so it never "
    "slows storing down; run it in exactly one process per database and give the others "
    "--no-drift. A feature drifting the same way on at least --group-share (default "
    f"{_RULE.share}) of a group's devices, and at least --min-devices (default "
    f"{_RULE.min_devices}), is one group alert; a device drifting alone is a device "
    "alert. With --webhook, every opened and resolved alert is POSTed there as JSON "
    "(retried with back-off; the outcome is stored with the alert). Malformed payloads "
    "are counted and logged. Logs one line per alert and the counters (with how far "
    "drift detection is behind) every minute to stderr; stops cleanly on SIGINT or "
    "SIGTERM."
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
    share: str | None = None  # shared subscription group; None: plain subscription
    batch_size: int = DEFAULT_BATCH_SIZE
    batch_wait_s: float = DEFAULT_BATCH_WAIT_S
    drift: bool = True  # run the drift feed and alerts in this process
    status_interval_s: float = DEFAULT_STATUS_INTERVAL_S


def default_ingest_options(
    db: str, repo: Path | None, *, share: str | None = None
) -> IngestOptions:
    """Ingest with every default, for a server that runs it in-process (``serve``, the
    demo). A plain subscription unless ``share`` is given: it works with any broker."""
    return IngestOptions(
        db=db,
        repo=repo,
        bundles=(),
        webhook=None,
        webhook_timeout_s=DEFAULT_TIMEOUT_S,
        webhook_attempts=DEFAULT_ATTEMPTS,
        rule=_RULE,
        policy=_POLICY,
        replay=DEFAULT_REPLAY_WINDOWS,
        reorder_wait_s=DEFAULT_REORDER_WAIT_S,
        share=share,
    )


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
        default=DEFAULT_SHARE_GROUP,
        metavar="GROUP",
        help="shared subscription group for telemetry; '' for a plain subscription "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--batch",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        metavar="N",
        help="most windows stored in one transaction (default: %(default)s)",
    )
    p.add_argument(
        "--batch-wait",
        type=float,
        default=DEFAULT_BATCH_WAIT_S,
        metavar="SECONDS",
        help="how long a started batch waits for more windows (default: %(default)s)",
    )
    p.add_argument(
        "--status-interval",
        type=float,
        default=DEFAULT_STATUS_INTERVAL_S,
        metavar="SECONDS",
        help="how often the counters and the drift lag are logged (default: %(default)s)",
    )
    p.add_argument(
        "--no-drift",
        action="store_true",
        help="only store: no drift detection or alerts here (another process runs them)",
    )
    p.add_argument(
        "--group-share",
        type=float,
        default=_RULE.share,
        metavar="FRACTION",
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
    if args.repo is None and not args.bundles and not args.no_drift:
        raise ValueError(
            "give --repo REPO or --bundles DIR (reference profiles come from there), or --no-drift"
        )
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
    if args.batch < 1 or args.batch_wait < 0:
        raise ValueError("--batch must be >= 1 and --batch-wait >= 0")
    if args.status_interval <= 0:
        raise ValueError("--status-interval must be > 0")
    if any(c in args.share for c in "/+#"):
        raise ValueError(f"--share {args.share!r}: a group name has no '/', '+' or '#'")
    rule = FleetRule(
        share=args.group_share,
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
        share=args.share or None,
        batch_size=args.batch,
        batch_wait_s=args.batch_wait,
        drift=not args.no_drift,
        status_interval_s=args.status_interval,
    )


@dataclass(frozen=True, slots=True)
class RunningIngest:
    """Handles on started ingest (for status, tests and benchmarks)."""

    telemetry: TelemetryStore
    ingest: TelemetryIngest
    feed: DriftFeed | None


@contextmanager
def start_ingest(
    options: IngestOptions,
    transport: MqttTransport,
    engine: Engine,
    logger: logging.Logger,
) -> Iterator[RunningIngest]:
    """Start ingest (and, with ``options.drift``, the drift feed and webhook sender) on
    ``transport``, which the caller starts afterwards and stops before leaving.

    Raises:
        StorageError: the stored windows cannot be read (the drift feed's rebuild).
    """
    with ExitStack() as stack:
        telemetry = TelemetryStore(engine)
        feed: DriftFeed | None = None
        if options.drift:
            alerts = AlertStore(engine)
            sender: WebhookSender | None = None
            if options.webhook is not None:
                sender = WebhookSender(
                    options.webhook,
                    alerts,
                    timeout_s=options.webhook_timeout_s,
                    attempts=options.webhook_attempts,
                    logger=logger,
                )
            references = ReferenceLibrary(
                repo=options.repo, bundle_dirs=options.bundles, logger=logger
            )
            monitor = FleetDriftMonitor(
                telemetry,
                alerts,
                references,
                rule=options.rule,
                policy=options.policy,
                notify=None if sender is None else sender.notify,
                logger=logger,
            )
            if sender is not None:
                sender.start()
                stack.callback(sender.stop)
                resent = sender.resend_pending()
                if resent:
                    logger.info("re-sending %d pending webhook event(s)", resent)
            feed = DriftFeed(
                telemetry,
                monitor,
                reorder_wait_s=options.reorder_wait_s,
                yield_to=lambda: ingest.backlog() > options.batch_size,
                status_interval_s=options.status_interval_s,
                logger=logger,
            )
        # Built before the feed starts: the feed's yield_to reads its backlog.
        ingest = TelemetryIngest(
            transport,
            telemetry,
            on_state=None if feed is None else feed.on_state,
            share=options.share,
            batch_size=options.batch_size,
            batch_wait_s=options.batch_wait_s,
            status_interval_s=options.status_interval_s,
            logger=logger,
        )
        if feed is not None:
            feed.start(options.replay)
            stack.callback(feed.stop)
        ingest.start()
        stack.callback(ingest.stop)
        yield RunningIngest(telemetry, ingest, feed)


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
        with start_ingest(options, transport, engine, logger):
            transport.start()
            try:
                if not transport.wait_connected(_CONNECT_WAIT_S):
                    logger.warning("broker not reachable yet; retrying in the background")
                logger.info(
                    "ingesting telemetry into %s%s",
                    engine.url.render_as_string(hide_password=True),
                    "" if options.share is None else f" (shared subscription {options.share})",
                )
                stop.wait()
            finally:
                transport.stop()
    finally:
        engine.dispose()
