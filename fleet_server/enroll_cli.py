"""``fleet-server ca ...`` and ``fleet-server devices ...``: the broker's private CA and
device enrollment (``fleet_server.enroll``).

``add_devices_commands(sub)`` adds both command groups to the ``fleet-server`` parser's
subcommands. Each command prints ``fleet-server: error: ...`` and returns 2 on an
``EnrollError`` itself, so it needs nothing from the caller's error handling.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone
from pathlib import Path

from fleet_server.enroll import (
    CA_CERT,
    CRL,
    DEFAULT_MODEL,
    DEFAULT_SOURCE,
    DEVICE_DAYS,
    SERVER_ACCOUNT,
    EnrollError,
    StarterConfig,
    enroll_device,
    init_ca,
    issue,
    refresh_crl,
    revoke,
)

EXIT_USAGE = 2
_RELOAD_HINT = (
    "copy {crl} to the broker's crlfile and reload it (systemctl reload mosquitto): "
    "a revoked certificate is refused from the next connection on"
)


def add_devices_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``ca {init,issue,crl}`` and ``devices {enroll,revoke}`` to ``sub``."""
    ca = sub.add_parser(
        "ca",
        help="the broker's private certificate authority",
        description="A private CA (EC P-256) for the MQTT broker, the fleet server and the "
        "devices. CA_DIR holds ca.key (keep it private), ca.pem, crl.pem and issued.json.",
    )
    ca_sub = ca.add_subparsers(dest="ca_command", required=True, metavar="ACTION")
    ca_init = ca_sub.add_parser(
        "init",
        help="create the CA",
        description="Create CA_DIR (mode 0700) with a new CA key, its certificate (valid 10 "
        "years) and an empty CRL. Refuses an existing CA.",
    )
    _ca_arg(ca_init)
    ca_init.add_argument("--name", default="edgefleet fleet CA", help="the CA's common name")
    ca_init.set_defaults(func=_cmd_ca_init)

    ca_issue = ca_sub.add_parser(
        "issue",
        help="issue the broker's or the fleet server's certificate",
        description="Issue a certificate for NAME and write OUT/NAME.pem, OUT/NAME.key "
        "(0600) and OUT/ca.pem. With --dns or --ip: a TLS server certificate for the "
        f"broker. Without: a client certificate; use NAME {SERVER_ACCOUNT!r} for the fleet "
        "server's broker account (the ACL gives that name every device's topics).",
    )
    ca_issue.add_argument("name", metavar="NAME", help="the certificate's common name")
    _ca_arg(ca_issue)
    ca_issue.add_argument("--out", type=Path, required=True, metavar="DIR")
    ca_issue.add_argument("--dns", action="append", default=[], help="broker DNS name")
    ca_issue.add_argument("--ip", action="append", default=[], help="broker IP address")
    ca_issue.add_argument("--days", type=int, default=DEVICE_DAYS, help="validity in days")
    ca_issue.add_argument(
        "--replace", action="store_true", help="revoke NAME's valid certificates first"
    )
    ca_issue.set_defaults(func=_cmd_ca_issue)

    ca_crl = ca_sub.add_parser(
        "crl",
        help="re-sign the revocation list",
        description="Re-sign CA_DIR/crl.pem with the same entries and a fresh validity.",
    )
    _ca_arg(ca_crl)
    ca_crl.set_defaults(func=_cmd_ca_crl)

    devices = sub.add_parser(
        "devices", help="enroll and revoke devices", description="Device credentials."
    )
    dev_sub = devices.add_subparsers(dest="devices_command", required=True, metavar="ACTION")
    enroll = dev_sub.add_parser(
        "enroll",
        help="issue a device's certificate and write its provisioning bundle",
        description="Issue DEVICE_ID's client certificate (EC P-256, CN = DEVICE_ID: the "
        "broker takes it as the MQTT username) and write OUT: agent.toml (a starter "
        "config with [device] id and [fleet] broker, root_metadata and tls_* relative to "
        "itself), root.json (REPO/metadata/1.root.json, the pinned TUF root) and "
        "tls/{ca.pem,device.pem,device.key}. OUT ending in .tar.gz or .tgz is written as "
        "an archive, otherwise as a directory; unpack or copy it to /etc/edge-agent on "
        "the device (scripts/install-agent.sh --bundle does). Creates the CA on first use.",
    )
    enroll.add_argument("device_id", metavar="DEVICE_ID", help="the device's id")
    _ca_arg(enroll)
    enroll.add_argument(
        "--repo", type=Path, required=True, metavar="REPO", help="repository directory"
    )
    enroll.add_argument(
        "--broker", required=True, metavar="HOST:PORT", help="the broker's TLS listener"
    )
    enroll.add_argument("--out", type=Path, required=True, metavar="OUT")
    enroll.add_argument("--profile", default="x86-generic", help="the device's firmware profile")
    enroll.add_argument(
        "--source", default=DEFAULT_SOURCE, help="the starter config's [source] url (%(default)s)"
    )
    enroll.add_argument(
        "--model",
        type=Path,
        default=DEFAULT_MODEL,
        help="the starter config's [model] bundle on the device (%(default)s)",
    )
    enroll.add_argument(
        "--replace",
        action="store_true",
        help="the device has a valid certificate already: revoke it and issue a new one",
    )
    enroll.set_defaults(func=_cmd_enroll)

    revoke_p = dev_sub.add_parser(
        "revoke",
        help="revoke a device's certificates",
        description="Add every valid certificate of DEVICE_ID to CA_DIR/crl.pem. "
        + _RELOAD_HINT.format(crl="crl.pem")
        + "; connections already open stay open until the device reconnects.",
    )
    revoke_p.add_argument("device_id", metavar="DEVICE_ID", help="the device's id")
    _ca_arg(revoke_p)
    revoke_p.set_defaults(func=_cmd_revoke)


def _ca_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ca-dir", type=Path, required=True, metavar="CA_DIR", help="the CA's directory"
    )


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _fail(e: Exception) -> int:
    print(f"fleet-server: error: {e}", file=sys.stderr)
    return EXIT_USAGE


def _cmd_ca_init(args: argparse.Namespace) -> int:
    try:
        init_ca(args.ca_dir, _now(), args.name)
    except EnrollError as e:
        return _fail(e)
    print(f"created CA {args.ca_dir / CA_CERT}")
    return 0


def _cmd_ca_issue(args: argparse.Namespace) -> int:
    from edge_agent.durable import write_atomic

    out: Path = args.out
    try:
        issued = issue(
            args.ca_dir,
            args.name,
            _now(),
            server_names=[*args.dns, *args.ip],
            days=args.days,
            replace=args.replace,
        )
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / f"{args.name}.key", issued.key_pem, mode=0o600)
        write_atomic(out / f"{args.name}.pem", issued.cert_pem, mode=0o644)
        write_atomic(out / CA_CERT, (args.ca_dir / CA_CERT).read_bytes(), mode=0o644)
    except (EnrollError, OSError) as e:
        return _fail(e)
    print(f"issued {out / (args.name + '.pem')} (serial {issued.serial:x})")
    return 0


def _cmd_ca_crl(args: argparse.Namespace) -> int:
    try:
        refresh_crl(args.ca_dir, _now())
    except EnrollError as e:
        return _fail(e)
    print(f"re-signed {args.ca_dir / CRL}")
    return 0


def _cmd_enroll(args: argparse.Namespace) -> int:
    starter = StarterConfig(
        broker=args.broker, source=args.source, model=args.model, profile=args.profile
    )
    try:
        issued = enroll_device(
            args.device_id,
            ca_dir=args.ca_dir,
            repo=args.repo,
            out=args.out,
            starter=starter,
            now=_now(),
            replace=args.replace,
        )
    except (EnrollError, OSError) as e:
        return _fail(e)
    print(f"enrolled {args.device_id} (certificate serial {issued.serial:x}): {args.out}")
    return 0


def _cmd_revoke(args: argparse.Namespace) -> int:
    try:
        serials = revoke(args.ca_dir, args.device_id, _now())
    except EnrollError as e:
        return _fail(e)
    crl = args.ca_dir / CRL
    print(f"revoked {args.device_id}: serial {', '.join(f'{s:x}' for s in serials)}")
    print(_RELOAD_HINT.format(crl=crl))
    return 0
