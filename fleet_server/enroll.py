"""The fleet's private certificate authority and device enrollment.

Devices, the fleet server and the broker authenticate each other with TLS certificates
from one private CA (EC P-256). The broker takes a client's MQTT username from its
certificate's common name, and the ACL allows each device only its own topics, so the CN
of a device certificate IS its device id (see ``scripts/mosquitto/``).

A CA directory holds::

    ca.key        the CA's private key (0600; the directory is 0700)
    ca.pem        the CA certificate: the trust anchor for broker and clients
    crl.pem       the revocation list the broker reads (``crlfile``)
    issued.json   every certificate issued: serial, CN, usage, expiry, revocation

``enroll_device`` writes what a device needs, as a directory or a ``.tar.gz`` to unpack
into ``/etc/edge-agent``: ``agent.toml`` (a starter config whose paths are relative to
itself), ``root.json`` (the pinned TUF root, ``REPO/metadata/1.root.json``) and
``tls/{ca.pem,device.pem,device.key}``.

Every function takes the current time as an argument. Errors a user can fix raise
``EnrollError`` naming the file, device or option.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import ipaddress
import json
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edge_agent.config import split_host_port
from edge_agent.durable import fsync_dir, write_atomic
from edge_agent.protocol.topics import validate_device_id

CA_KEY = "ca.key"
CA_CERT = "ca.pem"
CRL = "crl.pem"
ISSUED = "issued.json"
# The fleet server's own broker account: never a device id (the ACL gives it every device).
SERVER_ACCOUNT = "fleet-server"
CA_DAYS = 3650
DEVICE_DAYS = 1825
# The CRL never leaves the broker host, so its nextUpdate only has to outlive the gaps
# between revocations; a short one would lock every device out when it lapses.
CRL_DAYS = 3650
# Certificates start a little in the past: a device clock a few minutes behind must not
# reject a certificate issued just now.
_BACKDATE = timedelta(minutes=10)
DEFAULT_SOURCE = "camera:/dev/video0"
DEFAULT_MODEL = Path("/opt/edgefleet/share/edgefleet/models/reference-onnx")


class EnrollError(Exception):
    """A CA or enrollment problem the operator can fix; the message names it."""


@dataclass(frozen=True, slots=True)
class Issued:
    """A certificate and its private key (PEM)."""

    common_name: str
    serial: int
    cert_pem: bytes
    key_pem: bytes


@dataclass(frozen=True, slots=True)
class _Ca:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


def init_ca(ca_dir: Path, now: datetime, name: str = "edgefleet fleet CA") -> None:
    """Create a CA in ``ca_dir`` (mode 0700): key, self-signed certificate, empty CRL.

    Raises:
        EnrollError: ``ca_dir`` already holds a CA key, or is a file.
    """
    if (ca_dir / CA_KEY).exists():
        raise EnrollError(f"CA already exists: {ca_dir / CA_KEY}")
    if ca_dir.exists() and not ca_dir.is_dir():
        raise EnrollError(f"CA directory {ca_dir} is not a directory")
    ca_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca_dir.chmod(0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    write_atomic(ca_dir / CA_KEY, _key_pem(key), mode=0o600)
    write_atomic(ca_dir / CA_CERT, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    index: dict[str, object] = {"crl_number": 0, "certificates": []}
    _write_crl(ca_dir, _Ca(key, cert), index, now)


def ca_exists(ca_dir: Path) -> bool:
    return (ca_dir / CA_KEY).is_file() and (ca_dir / CA_CERT).is_file()


def issue(
    ca_dir: Path,
    common_name: str,
    now: datetime,
    *,
    server_names: Sequence[str] = (),
    days: int = DEVICE_DAYS,
    replace: bool = False,
) -> Issued:
    """Issue a certificate for ``common_name`` with a fresh P-256 key.

    With ``server_names`` (DNS names or IP addresses) it is a TLS server certificate (the
    broker's); without, a client certificate (a device, or ``SERVER_ACCOUNT``).

    Raises:
        EnrollError: no CA in ``ca_dir``; ``common_name`` already has an unrevoked
            certificate and ``replace`` is False (with ``replace`` those are revoked).
    """
    if not common_name or "/" in common_name or len(common_name) > 64:
        raise EnrollError(f"invalid common name {common_name!r}")
    with _locked(ca_dir):
        ca, index = _load(ca_dir)
        live = _live_serials(index, common_name, now)
        if live and not replace:
            raise EnrollError(
                f"{common_name} already has a valid certificate (serial {live[0]:x}); "
                "use --replace to revoke it and issue a new one"
            )
        key = ec.generate_private_key(ec.SECP256R1())
        serial = x509.random_serial_number()
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(ca.cert.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), False
            )
        )
        if server_names:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([_general_name(n) for n in server_names]), False
            ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        else:
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False
            )
        cert = builder.sign(ca.key, hashes.SHA256())
        _revoke_serials(index, live, now)
        _certificates(index).append(
            {
                "serial": f"{serial:x}",
                "cn": common_name,
                "usage": "server" if server_names else "client",
                "not_after": cert.not_valid_after_utc.isoformat(),
                "revoked_at": None,
            }
        )
        _write_crl(ca_dir, ca, index, now)
    return Issued(common_name, serial, cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def revoke(ca_dir: Path, common_name: str, now: datetime) -> list[int]:
    """Revoke every unrevoked certificate of ``common_name`` and rewrite ``crl.pem``.

    Returns the revoked serials. The broker reads the new CRL on its next reload (SIGHUP).

    Raises:
        EnrollError: no CA in ``ca_dir``, or no unrevoked certificate for ``common_name``.
    """
    with _locked(ca_dir):
        ca, index = _load(ca_dir)
        live = _live_serials(index, common_name, now)
        if not live:
            raise EnrollError(f"no valid certificate for {common_name!r} in {ca_dir / ISSUED}")
        _revoke_serials(index, live, now)
        _write_crl(ca_dir, ca, index, now)
    return live


def refresh_crl(ca_dir: Path, now: datetime) -> None:
    """Re-sign ``crl.pem`` (same entries, new thisUpdate/nextUpdate).

    Raises:
        EnrollError: no CA in ``ca_dir``.
    """
    with _locked(ca_dir):
        ca, index = _load(ca_dir)
        _write_crl(ca_dir, ca, index, now)


@dataclass(frozen=True, slots=True)
class StarterConfig:
    """What the starter ``agent.toml`` says besides identity and fleet connection."""

    broker: str  # host:port of the fleet broker's TLS listener
    source: str = DEFAULT_SOURCE
    model: Path = DEFAULT_MODEL
    profile: str = "x86-generic"


def enroll_device(
    device_id: str,
    *,
    ca_dir: Path,
    repo: Path,
    out: Path,
    starter: StarterConfig,
    now: datetime,
    replace: bool = False,
) -> Issued:
    """Issue ``device_id``'s certificate and write its bundle to ``out``.

    ``out`` ending in ``.tar.gz`` or ``.tgz`` gets a tar archive (members at the top level,
    the key 0600); anything else a new directory. The CA is created on first use.

    Raises:
        EnrollError: invalid or reserved device id, bad broker, missing
            ``REPO/metadata/1.root.json``, ``out`` exists, or a certificate problem.
    """
    try:
        validate_device_id(device_id)
        split_host_port(starter.broker)
    except ValueError as e:
        raise EnrollError(str(e)) from e
    if device_id == SERVER_ACCOUNT:
        raise EnrollError(f"device id {SERVER_ACCOUNT!r} is reserved for the fleet server")
    root = repo / "metadata" / "1.root.json"
    try:
        root_json = root.read_bytes()
    except OSError as e:
        raise EnrollError(f"pinned TUF root {root}: {e.strerror}") from e
    if out.exists():
        raise EnrollError(f"output {out} already exists; refusing to overwrite")
    if not ca_exists(ca_dir):
        init_ca(ca_dir, now)
    issued = issue(ca_dir, device_id, now, replace=replace)
    files = {
        "agent.toml": (starter_config(device_id, starter).encode(), 0o644),
        "root.json": (root_json, 0o644),
        "tls/ca.pem": ((ca_dir / CA_CERT).read_bytes(), 0o644),
        "tls/device.pem": (issued.cert_pem, 0o644),
        "tls/device.key": (issued.key_pem, 0o600),
    }
    if out.name.endswith((".tar.gz", ".tgz")):
        _write_tar(out, files, now)
    else:
        _write_dir(out, files)
    return issued


def starter_config(device_id: str, starter: StarterConfig) -> str:
    """The starter ``agent.toml``; its fleet paths are relative to the file itself."""

    def q(text: str) -> str:
        return json.dumps(text)  # a JSON string is a valid TOML basic string

    return f"""# edge-agent configuration for {device_id}, written by `fleet-server devices enroll`.
# Relative paths are resolved against this file's directory. See scripts/agent.example.toml
# for every key.

[device]
id = {q(device_id)}
profile = {q(starter.profile)}

[source]
url = {q(starter.source)}

[model]
bundle = {q(str(starter.model))}

[fleet]
broker = {q(starter.broker)}
root_metadata = "root.json"
tls_ca = "tls/ca.pem"
tls_cert = "tls/device.pem"
tls_key = "tls/device.key"

[log]
format = "auto"
"""


# -- internals ---------------------------------------------------------------------------


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@contextlib.contextmanager
def _locked(ca_dir: Path) -> Iterator[None]:
    """Serialize changes to one CA (two enrollments at once must not lose an entry)."""
    if not ca_exists(ca_dir):
        raise EnrollError(f"no CA in {ca_dir}: run 'fleet-server ca init --ca-dir {ca_dir}'")
    with (ca_dir / ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _load(ca_dir: Path) -> tuple[_Ca, dict[str, object]]:
    try:
        key = serialization.load_pem_private_key((ca_dir / CA_KEY).read_bytes(), None)
        cert = x509.load_pem_x509_certificate((ca_dir / CA_CERT).read_bytes())
    except (OSError, ValueError) as e:
        raise EnrollError(f"CA in {ca_dir} is unreadable: {e}") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise EnrollError(f"{ca_dir / CA_KEY} is not an EC key")
    path = ca_dir / ISSUED
    try:
        index = json.loads(path.read_bytes()) if path.exists() else {}
    except (OSError, ValueError) as e:
        raise EnrollError(f"{path}: {e}") from e
    if not isinstance(index, dict) or not isinstance(index.get("certificates", []), list):
        raise EnrollError(f"{path}: not a certificate index")
    index.setdefault("crl_number", 0)
    index.setdefault("certificates", [])
    return _Ca(key, cert), index


def _certificates(index: dict[str, object]) -> list[dict[str, object]]:
    entries = index["certificates"]
    assert isinstance(entries, list)
    return entries


def _live_serials(index: dict[str, object], common_name: str, now: datetime) -> list[int]:
    return [
        int(str(e["serial"]), 16)
        for e in _certificates(index)
        if e["cn"] == common_name
        and e["revoked_at"] is None
        and datetime.fromisoformat(str(e["not_after"])) > now
    ]


def _revoke_serials(index: dict[str, object], serials: list[int], now: datetime) -> None:
    wanted = {f"{s:x}" for s in serials}
    for entry in _certificates(index):
        if entry["serial"] in wanted:
            entry["revoked_at"] = now.isoformat()


def _write_crl(ca_dir: Path, ca: _Ca, index: dict[str, object], now: datetime) -> None:
    number = int(str(index["crl_number"])) + 1
    index["crl_number"] = number
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(now - _BACKDATE)
        .next_update(now + timedelta(days=CRL_DAYS))
        .add_extension(x509.CRLNumber(number), critical=False)
    )
    for entry in _certificates(index):
        if entry["revoked_at"] is not None:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(int(str(entry["serial"]), 16))
                .revocation_date(datetime.fromisoformat(str(entry["revoked_at"])))
                .build()
            )
    crl = builder.sign(ca.key, hashes.SHA256())
    # Index first: a crash between the two leaves a CRL that the next change rewrites.
    write_atomic(ca_dir / ISSUED, json.dumps(index, indent=1).encode(), mode=0o600)
    write_atomic(ca_dir / CRL, crl.public_bytes(serialization.Encoding.PEM), mode=0o644)


def _write_dir(out: Path, files: dict[str, tuple[bytes, int]]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.mkdir(mode=0o700)  # it holds a private key
    for name, (data, mode) in files.items():
        path = out / name
        path.parent.mkdir(exist_ok=True)
        write_atomic(path, data, mode=mode)
    fsync_dir(out)


def _write_tar(out: Path, files: dict[str, tuple[bytes, int]], now: datetime) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        dirs = sorted({str(Path(name).parent) for name in files} - {"."})
        for name in dirs:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, int(now.timestamp())
            tar.addfile(info)
        for name, (data, mode) in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), mode, int(now.timestamp())
            tar.addfile(info, io.BytesIO(data))
    # The archive holds a private key: private from the first byte.
    write_atomic(out, buffer.getvalue(), mode=0o600)
