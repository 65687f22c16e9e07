"""``fleet-server``: keys, the signed repository, releases, assignments, and the server.

A repository directory REPO holds what devices may read: ``REPO/metadata`` (TUF metadata)
and ``REPO/targets`` (bundles and assignments). Private keys live in a separate directory
KEYS, never inside REPO. User errors print ``fleet-server: error: ...`` naming the bad
file, key or argument, and exit 2.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType

from edge_agent.config import ConfigError, load_profile
from edge_agent.protocol import topics
from edge_agent.protocol.errors import BundleError
from edge_agent.transport import MqttTransport, TlsFiles
from fleet_server.auth import AuthError
from fleet_server.compatibility import (
    CompatibilityError,
    check_assignment,
)
from fleet_server.db_cli import add_db_commands
from fleet_server.enroll_cli import add_devices_commands
from fleet_server.ingest_service import (
    INGEST_DESCRIPTION,
    add_ingest_arguments,
    ingest_options,
    run_ingest,
)
from fleet_server.operators_cli import add_operator_commands
from fleet_server.releasing import release_bundle
from fleet_server.repository import (
    DIRECTOR_ROLE,
    RELEASE_ROLE,
    TARGETS_ROLE,
    FleetRepository,
    RepositoryError,
    assignment_path,
    init_keys,
    load_signers,
    release_path,
)
from fleet_server.serve import DEFAULT_REFRESH_INTERVAL_S
from fleet_server.storage import StorageError

EXIT_USAGE = 2
_CONNECT_WAIT_S = 5.0
_PROFILES_HELP = (
    "Firmware profiles are read from $EDGE_AGENT_PROFILES (a path list), "
    "/etc/edge-agent/profiles, the installed share/edgefleet/firmware_profiles and the "
    "source checkout's firmware_profiles/, first match by name wins."
)


class UsageError(Exception):
    """Bad command-line input: printed as ``fleet-server: error: ...``, exit 2."""


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except (
        UsageError,
        RepositoryError,
        BundleError,
        ConfigError,
        CompatibilityError,
        StorageError,
        AuthError,
        OSError,
    ) as e:
        print(f"fleet-server: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    return code


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fleet-server",
        description="Fleet server: signs model releases and device assignments into a TUF "
        "repository (REPO/metadata, REPO/targets) and serves it to devices over MQTT; with "
        "a database it also stores telemetry, raises drift alerts, runs staged rollouts and "
        "serves the REST API and the operator console. 'fleet-server demo' runs it all on "
        "this machine with three agents.",
        epilog="First use: 'fleet-server keys init --keys KEYS --repo REPO', then copy "
        "REPO/metadata/1.root.json onto every device at provisioning.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    keys = sub.add_parser("keys", help="signing keys", description="Manage signing keys.")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    keys_init = keys_sub.add_parser(
        "init",
        help="create every role's keys (and, with --repo, the repository)",
        description="Create fresh ed25519 keys for every role: root (3, threshold 2), "
        "targets (1, offline: it only delegates), release (1), director (1), snapshot (1), "
        "timestamp (1). KEYS is created with mode 0700 and each key file with 0600; an "
        "existing non-empty KEYS is refused. With --repo, also create the repository as "
        "'repo init' does. Move the root and targets keys offline afterwards: only "
        "'release' needs the release key, 'assign' and 'serve' need director, snapshot "
        "and timestamp.",
    )
    _keys_arg(keys_init)
    keys_init.add_argument(
        "--repo", type=Path, metavar="REPO", help="also create version 1 metadata in REPO"
    )
    keys_init.set_defaults(func=_cmd_keys_init)

    repo = sub.add_parser("repo", help="the signed repository", description="Manage REPO.")
    repo_sub = repo.add_subparsers(dest="repo_command", required=True, metavar="ACTION")
    repo_init = repo_sub.add_parser(
        "init",
        help="create version 1 of every role's metadata",
        description="Sign version 1 of root, targets, release, director, snapshot and "
        "timestamp into REPO/metadata (and create REPO/targets), then print the path of "
        "REPO/metadata/1.root.json: the trusted root to install on devices at provisioning. "
        "Refuses an existing repository and a KEYS directory that overlaps REPO.",
    )
    _repo_args(repo_init)
    repo_init.set_defaults(func=_cmd_repo_init)

    release = sub.add_parser(
        "release",
        help="publish a model bundle",
        description="Verify BUNDLE_DIR (bundle.json and exactly the files it lists), pack "
        "it as a deterministic tar and publish it as models/NAME-VERSION.tar in the release "
        "role, with runtime (from bundle.json), compatible profiles and a release counter "
        "(one more than the model's highest so far). Releasing the same bundle again "
        "changes nothing and prints the same counter; the same NAME@VERSION with other "
        "bytes or profiles is refused. Prints the target path and the release counter. "
        + _PROFILES_HELP,
    )
    release.add_argument("bundle_dir", type=Path, metavar="BUNDLE_DIR", help="bundle directory")
    _repo_args(release)
    release.add_argument(
        "--profiles",
        metavar="P1,P2",
        help="comma-separated firmware profiles the release is for (each must list the "
        "bundle's runtime); default: every known profile that lists it",
    )
    release.set_defaults(func=_cmd_release)

    assign = sub.add_parser(
        "assign",
        help="tell a device which released model to run",
        description="Sign assignments/DEVICE_ID in the director role, pointing at the "
        "released MODEL@VERSION. Refused (exit 2) when that release is not for the device's "
        "firmware profile or the profile lacks its runtime. There is no device registry "
        "yet: give the device's profile with --profile. " + _PROFILES_HELP,
    )
    assign.add_argument("device_id", metavar="DEVICE_ID", help="the device's id")
    assign.add_argument("model", metavar="MODEL@VERSION", help="a released bundle, name@version")
    _repo_args(assign)
    assign.add_argument(
        "--profile",
        required=True,
        help="the device's firmware profile: a name (e.g. rpi5) or a .toml path",
    )
    assign.set_defaults(func=_cmd_assign)

    resign = sub.add_parser(
        "resign",
        help="re-sign one role's metadata before it expires",
        description="Re-sign ROLE's metadata unchanged with a fresh expiry, then snapshot "
        "and timestamp. 'serve' re-signs director, snapshot and timestamp by itself; "
        "release (30 days, the release key) and targets (365 days, the offline targets "
        "key) need this command. Root rotation is not supported yet.",
    )
    resign.add_argument(
        "role",
        choices=[TARGETS_ROLE, RELEASE_ROLE, DIRECTOR_ROLE, "snapshot", "timestamp"],
        metavar="ROLE",
        help="one of targets, release, director, snapshot, timestamp",
    )
    _repo_args(resign)
    resign.set_defaults(func=_cmd_resign)

    serve = sub.add_parser(
        "serve",
        help="serve the repository to devices over MQTT",
        description="Connect to the MQTT broker, answer devices' fetch requests from "
        "REPO/metadata and REPO/targets, publish a retained notify "
        '({"timestamp_version":N}) on ' + topics.NOTIFY + " whenever the published "
        "timestamp changes (checked every second), and re-sign timestamp, snapshot and "
        "director when less than half of their lifetime remains (checked every "
        "--timestamp-refresh seconds and at start). Logs one line per action to stderr; "
        "stops cleanly on SIGINT or SIGTERM.",
    )
    _repo_args(serve)
    serve.add_argument("--broker", required=True, metavar="HOST:PORT", help="the MQTT broker")
    serve.add_argument("--client-id", default="fleet-server", help="MQTT client id")
    serve.add_argument("--tls-ca", type=Path, metavar="PEM", help="the broker's CA certificate")
    serve.add_argument("--tls-cert", type=Path, metavar="PEM", help="this server's certificate")
    serve.add_argument("--tls-key", type=Path, metavar="PEM", help="this server's private key")
    serve.add_argument(
        "--timestamp-refresh",
        type=_positive_seconds,
        default=DEFAULT_REFRESH_INTERVAL_S,
        metavar="SECONDS",
        help="how often to check whether metadata needs re-signing (default: %(default)s)",
    )
    serve.add_argument(
        "--db",
        metavar="URL",
        help="database URL or SQLite file: also run telemetry ingest and drift alerts, the "
        "devices' update events, the rollout driver and (with --http) the API and console",
    )
    serve.add_argument(
        "--http",
        metavar="HOST:PORT",
        help="serve the REST API (/api/v1, /docs) and the console here (needs --db); "
        "e.g. 127.0.0.1:8080",
    )
    serve.add_argument(
        "--no-ingest",
        action="store_true",
        help="with --db: leave telemetry to separate `fleet-server ingest` processes",
    )
    serve.set_defaults(func=_cmd_serve)

    demo = sub.add_parser(
        "demo",
        help="the whole loop on this machine: broker, server, console, three agents",
        description="Start a loopback MQTT broker (Mosquitto when installed, otherwise the "
        "embedded amqtt broker), a signed repository with the reference model, the fleet "
        "server with its console, and three edge agents inspecting synthetic lines; one "
        "line's lighting darkens over a few minutes. A second model version is released "
        "and rolled out in two waves, gated on the devices' health; the drift alert for "
        "the darkening line appears in the console. Prints the console address and the "
        "login, then one line per event. Ctrl-C stops everything cleanly.",
    )
    demo.add_argument(
        "--model",
        type=Path,
        default=Path("models/reference-onnx"),
        help="the bundle the agents start with (default: %(default)s)",
    )
    demo.add_argument(
        "--port", type=int, default=8080, help="console port on 127.0.0.1 (default: 8080)"
    )
    demo.add_argument(
        "--minutes", type=float, default=0.0, help="stop after this long (default: Ctrl-C)"
    )
    demo.add_argument(
        "--darken-minutes",
        type=float,
        default=3.0,
        help="how long line-3's lighting takes to darken (default: %(default)s)",
    )
    demo.add_argument("--fps", type=float, default=8.0, help="frames per second per line (8)")
    demo.add_argument(
        "--embedded-broker", action="store_true", help="use amqtt even if Mosquitto exists"
    )
    demo.add_argument(
        "--keep", action="store_true", help="keep the working directory (logs, database)"
    )
    demo.set_defaults(func=_cmd_demo)

    ingest = sub.add_parser(
        "ingest",
        help="store device telemetry, watch fleet drift, raise alerts",
        description=INGEST_DESCRIPTION,
    )
    ingest.add_argument("--broker", required=True, metavar="HOST:PORT", help="the MQTT broker")
    ingest.add_argument("--client-id", default="fleet-ingest", help="MQTT client id")
    ingest.add_argument("--tls-ca", type=Path, metavar="PEM", help="the broker's CA certificate")
    ingest.add_argument("--tls-cert", type=Path, metavar="PEM", help="this server's certificate")
    ingest.add_argument("--tls-key", type=Path, metavar="PEM", help="this server's private key")
    add_ingest_arguments(ingest)
    ingest.set_defaults(func=_cmd_ingest)

    add_operator_commands(sub)
    add_db_commands(sub)
    add_devices_commands(sub)
    return p


def _keys_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keys", required=True, type=Path, metavar="KEYS", help="private key directory")


def _repo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--repo",
        required=True,
        type=Path,
        metavar="REPO",
        help="repository directory (REPO/metadata, REPO/targets)",
    )
    _keys_arg(p)


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from e
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {text!r}")
    return value


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _open_repository(repo: Path, keys: Path) -> FleetRepository:
    repo_path, keys_path = repo.resolve(), keys.resolve()
    if (
        repo_path == keys_path
        or keys_path.is_relative_to(repo_path)
        or repo_path.is_relative_to(keys_path)
    ):
        raise UsageError(f"key directory {keys} must not overlap repository {repo}")
    return FleetRepository(repo / "metadata", keys, repo / "targets")


def _create_repository(repo: Path, keys: Path) -> None:
    fleet = _open_repository(repo, keys)
    fleet.create(now=_now())
    print(f"created repository {repo}")
    print(f"root metadata for provisioning devices: {fleet.metadata_dir / '1.root.json'}")


def _cmd_keys_init(args: argparse.Namespace) -> int:
    if args.repo is not None:
        # Refuse an overlap or an existing repository before creating keys.
        root = _open_repository(args.repo, args.keys).metadata_dir / "root.json"
        if root.exists():
            raise UsageError(f"repository already exists: {root}")
    init_keys(args.keys)
    print(f"created keys in {args.keys}")
    if args.repo is not None:
        _create_repository(args.repo, args.keys)
    return 0


def _cmd_repo_init(args: argparse.Namespace) -> int:
    _create_repository(args.repo, args.keys)
    return 0


def _cmd_release(args: argparse.Namespace) -> int:
    requested = None
    if args.profiles is not None:
        requested = [name.strip() for name in args.profiles.split(",") if name.strip()]
    fleet = _open_repository(args.repo, args.keys)
    try:
        released = release_bundle(fleet, args.bundle_dir, now=_now(), profiles=requested)
    except ValueError as e:  # a name or file type a device would refuse to unpack
        raise UsageError(f"cannot pack {args.bundle_dir}: {e}") from e
    print(
        f"released {released.target_path} "
        f"release_counter={released.release_counter} runtime={released.runtime} "
        f"profiles={','.join(released.profiles)}"
    )
    return 0


def _cmd_assign(args: argparse.Namespace) -> int:
    name, sep, version = args.model.partition("@")
    if not sep or not name or not version:
        raise UsageError(f"expected MODEL@VERSION, got {args.model!r}")
    try:
        device_id = topics.validate_device_id(args.device_id)
    except ValueError as e:
        raise UsageError(str(e)) from e
    profile = load_profile(args.profile)
    fleet = _open_repository(args.repo, args.keys)
    target = release_path(name, version)
    released = fleet.released(target)
    if released is None:
        raise UsageError(f"{args.model} is not released (no {target} in release.json)")
    check_assignment(args.model, released.custom, profile)
    fleet.assign(device_id, target, now=_now())
    print(f"assigned {assignment_path(device_id)} -> {target}")
    return 0


def _cmd_resign(args: argparse.Namespace) -> int:
    fleet = _open_repository(args.repo, args.keys)
    fleet.resign(args.role, now=_now())
    print(f"re-signed {args.role}.json: expires {fleet.expires(args.role).isoformat()}")
    return 0


def _cmd_ingest(args: argparse.Namespace) -> int:
    try:
        options = ingest_options(args)
    except ValueError as e:
        raise UsageError(str(e)) from e
    host, port = _parse_broker(args.broker)
    tls = _tls_files(args.tls_ca, args.tls_cert, args.tls_key)
    logger, stop = _logger_and_stop_on_signals()
    transport = MqttTransport(host=host, port=port, client_id=args.client_id, tls=tls)
    run_ingest(options, transport, stop, logger)
    logger.info("stopped")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from fleet_server.ingest_service import default_ingest_options
    from fleet_server.server import ServerOptions, start_server

    host, port = _parse_broker(args.broker)
    tls = _tls_files(args.tls_ca, args.tls_cert, args.tls_key)
    if args.http is not None and args.db is None:
        raise UsageError("--http needs --db: the API and console read the database")
    http = None if args.http is None else _parse_address("--http", args.http)
    fleet = _open_repository(args.repo, args.keys)
    fleet.timestamp_state()  # refuse a missing repository before connecting
    for role in (DIRECTOR_ROLE, "snapshot", "timestamp"):
        load_signers(args.keys, role)  # re-signing needs them: fail now, not in an hour
    options = ServerOptions(
        refresh_interval_s=args.timestamp_refresh,
        db=args.db,
        http=http,
        ingest=None
        if args.db is None or args.no_ingest
        else default_ingest_options(args.db, args.repo),
    )
    logger, stop = _logger_and_stop_on_signals()
    transport = MqttTransport(host=host, port=port, client_id=args.client_id, tls=tls)
    with ExitStack() as stack:
        _running, publisher = start_server(options, transport, fleet, stack, logger)
        logger.info("serving %s to devices via %s:%d", args.repo, host, port)
        publisher.run(stop)
    logger.info("stopped")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from fleet_server.demo import DemoOptions, run_demo

    if not (args.model / "bundle.json").is_file():
        raise UsageError(f"--model {args.model}: no bundle.json (run from the source checkout)")
    if not 0 < args.port < 65536:
        raise UsageError(f"--port must be 1-65535, got {args.port}")
    options = DemoOptions(
        model=args.model,
        http_port=args.port,
        minutes=args.minutes,
        fps=args.fps,
        darken_minutes=args.darken_minutes,
        embedded_broker=args.embedded_broker,
        keep=args.keep,
    )
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    run_demo(options, stop, sys.stdout)
    return 0


def _logger_and_stop_on_signals() -> tuple[logging.Logger, threading.Event]:
    """Log to stderr; an Event set by SIGINT or SIGTERM."""
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logger = logging.getLogger("fleet_server")
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        logger.info("%s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    return logger, stop


def _parse_broker(text: str) -> tuple[str, int]:
    return _parse_address("--broker", text)


def _parse_address(option: str, text: str) -> tuple[str, int]:
    host, sep, port_text = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")  # [::1]:1883
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise UsageError(f"{option} must be HOST:PORT, got {text!r}")
    return host, int(port_text)


def _tls_files(ca: Path | None, cert: Path | None, key: Path | None) -> TlsFiles | None:
    given = {"--tls-ca": ca, "--tls-cert": cert, "--tls-key": key}
    if all(path is None for path in given.values()):
        return None
    for option, path in given.items():
        if path is None:
            raise UsageError(f"{option} is missing: give all of --tls-ca, --tls-cert, --tls-key")
    for option, path in given.items():
        if path is not None and not path.is_file():
            raise UsageError(f"{option} {path}: no such file")
    if ca is None or cert is None or key is None:  # checked above; for the type checker
        raise UsageError("give all of --tls-ca, --tls-cert, --tls-key")
    return TlsFiles(ca_file=ca, cert_file=cert, key_file=key)


if __name__ == "__main__":
    sys.exit(main())
