"""`fleet-server ca` / `devices` on real files: certificates, CRL, refusals."""

from __future__ import annotations

import argparse
from datetime import datetime, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fleet_server.enroll_cli import add_devices_commands


def cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    parser = argparse.ArgumentParser(prog="fleet-server")
    add_devices_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code: int = args.func(args)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    (tmp_path / "repo" / "metadata").mkdir(parents=True)
    (tmp_path / "repo" / "metadata" / "1.root.json").write_text('{"signed": {"version": 1}}')
    return tmp_path / "repo"


def enroll_args(tmp_path: Path, repo: Path, device: str, out: str) -> list[str]:
    return [
        "devices", "enroll", device, "--ca-dir", str(tmp_path / "ca"), "--repo", str(repo),
        "--broker", "mqtt.plant:8883", "--out", str(tmp_path / out),
    ]  # fmt: skip


def test_enroll_creates_ca_and_a_device_certificate(
    tmp_path: Path, repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, said = cli(enroll_args(tmp_path, repo, "cam-1", "cam-1"), capsys)
    assert code == 0, said
    ca_dir, out = tmp_path / "ca", tmp_path / "cam-1"
    assert ca_dir.stat().st_mode & 0o777 == 0o700
    assert (ca_dir / "ca.key").stat().st_mode & 0o777 == 0o600
    assert out.stat().st_mode & 0o777 == 0o700
    assert (out / "tls" / "device.key").stat().st_mode & 0o777 == 0o600
    ca = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
    cert = x509.load_pem_x509_certificate((out / "tls" / "device.pem").read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "cam-1"
    assert cert.issuer == ca.subject
    cert.verify_directly_issued_by(ca)
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert (out / "root.json").read_bytes() == (repo / "metadata" / "1.root.json").read_bytes()
    assert 'broker = "mqtt.plant:8883"' in (out / "agent.toml").read_text()


REFUSALS = {
    "reserved id": ("fleet-server", None, "reserved for the fleet server"),
    "invalid id": ("bad/id", None, "invalid device id"),
    "output exists": ("cam-2", "existing-out", "already exists; refusing to overwrite"),
    "no pinned root": ("cam-2", "no-root", "1.root.json"),
    "enrolled already": ("cam-2", "enrolled", "already has a valid certificate"),
}


@pytest.mark.parametrize("case", REFUSALS.values(), ids=REFUSALS.keys())
def test_enroll_refuses(
    tmp_path: Path,
    repo: Path,
    capsys: pytest.CaptureFixture[str],
    case: tuple[str, str | None, str],
) -> None:
    device, prepare, message = case
    if prepare == "existing-out":
        (tmp_path / "out").mkdir()
    elif prepare == "no-root":
        (repo / "metadata" / "1.root.json").unlink()
    elif prepare == "enrolled":
        assert cli(enroll_args(tmp_path, repo, device, "first"), capsys)[0] == 0
    code, said = cli(enroll_args(tmp_path, repo, device, "out"), capsys)
    assert code == 2
    assert said.startswith("fleet-server: error: ") and message in said, said
    assert not (tmp_path / "out" / "tls").exists()


def test_revoke_and_replace(tmp_path: Path, repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca_dir = tmp_path / "ca"
    assert cli(enroll_args(tmp_path, repo, "cam-3", "one"), capsys)[0] == 0
    first = x509.load_pem_x509_certificate((tmp_path / "one/tls/device.pem").read_bytes())
    assert cli([*enroll_args(tmp_path, repo, "cam-3", "two"), "--replace"], capsys)[0] == 0
    crl = x509.load_pem_x509_crl((ca_dir / "crl.pem").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(first.serial_number) is not None
    second = x509.load_pem_x509_certificate((tmp_path / "two/tls/device.pem").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(second.serial_number) is None

    code, said = cli(["devices", "revoke", "cam-3", "--ca-dir", str(ca_dir)], capsys)
    assert code == 0 and f"{second.serial_number:x}" in said
    crl = x509.load_pem_x509_crl((ca_dir / "crl.pem").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(second.serial_number) is not None
    ca = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
    assert crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    assert crl.next_update_utc is not None
    assert crl.next_update_utc > datetime.now(timezone.utc)

    code, said = cli(["devices", "revoke", "cam-3", "--ca-dir", str(ca_dir)], capsys)
    assert code == 2 and "no valid certificate for 'cam-3'" in said
    code, said = cli(["ca", "init", "--ca-dir", str(ca_dir)], capsys)
    assert code == 2 and "CA already exists" in said
