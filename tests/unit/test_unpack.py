"""Tests for edge_agent.update.unpack: a table of hostile archives, deterministic packing,
and a roundtrip of the real reference bundle."""

from __future__ import annotations

import gzip
import io
import os
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from edge_agent.bundle import load_bundle
from edge_agent.update.errors import InstallError, Reason
from edge_agent.update.unpack import pack_bundle, unpack_bundle

REFERENCE = Path(__file__).resolve().parents[2] / "models" / "reference-onnx"
MAX_BYTES = 1024 * 1024

Member = tuple[str, bytes | int]  # (name, content) or (name, tar type for non-files)


def _tar(*members: Member, fmt: int = tarfile.USTAR_FORMAT) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as archive:
        for name, content in members:
            info = tarfile.TarInfo(name)
            if isinstance(content, bytes):
                info.size = len(content)
                archive.addfile(info, io.BytesIO(content))
            else:
                info.type = bytes([content])
                info.linkname = "model.onnx" if content in (ord("1"), ord("2")) else ""
                archive.addfile(info)
    return buffer.getvalue()


def _pax_path(name: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        info = tarfile.TarInfo("harmless")
        info.pax_headers = {"path": name}
        info.size = 3
        archive.addfile(info, io.BytesIO(b"abc"))
    return buffer.getvalue()


OK = ("model.onnx", b"model")
BAD_ARCHIVES: dict[str, tuple[Callable[[], bytes], str]] = {
    "absolute": (lambda: _tar(OK, ("/etc/cron.d/x", b"x")), "'/etc/cron.d/x': absolute path"),
    "dotdot": (lambda: _tar(("../escape", b"x")), "'../escape': '..' component"),
    "nested-dotdot": (lambda: _tar(("golden/../../x", b"x")), "'golden/../../x'"),
    "dot-segment": (lambda: _tar(("./model.onnx", b"x")), "'./model.onnx': unsafe name"),
    "hidden": (lambda: _tar((".hidden", b"x")), "'.hidden': unsafe name"),
    "backslash": (lambda: _tar(("a\\..\\b", b"x")), "unsafe name"),
    "pax-path-dotdot": (lambda: _pax_path("../pax-escape"), "'../pax-escape'"),
    "symlink": (lambda: _tar(OK, ("link", tarfile.SYMTYPE[0])), "'link': not a regular"),
    "hardlink": (lambda: _tar(OK, ("hard", tarfile.LNKTYPE[0])), "'hard': not a regular"),
    "char-device": (lambda: _tar(("tty", tarfile.CHRTYPE[0])), "'tty': not a regular"),
    "block-device": (lambda: _tar(("sda", tarfile.BLKTYPE[0])), "'sda': not a regular"),
    "fifo": (lambda: _tar(("pipe", tarfile.FIFOTYPE[0])), "'pipe': not a regular"),
    "duplicate": (lambda: _tar(OK, ("model.onnx", b"other")), "'model.onnx': duplicate"),
    "dir-then-file": (
        lambda: _tar(("golden", tarfile.DIRTYPE[0]), ("golden", b"x")),
        "'golden': duplicate",
    ),
    "file-as-parent": (lambda: _tar(OK, ("model.onnx/x", b"x")), "'model.onnx/x': inside"),
    "too-many-files": (
        lambda: _tar(*[(f"f{i}", b"x") for i in range(5)]),
        "'f4': more than 4 members",
    ),
    "too-large": (
        lambda: _tar(("a", bytes(MAX_BYTES // 2)), ("b", bytes(MAX_BYTES // 2 + 1))),
        f"'b': content exceeds {MAX_BYTES} bytes",
    ),
    "truncated": (lambda: _tar(("big", os.urandom(40_000)))[:20_000], "'big': truncated"),
    "gzip": (lambda: gzip.compress(_tar(OK)), "not a valid tar"),
    "garbage": (lambda: b"definitely not a tar archive" * 40, "not a valid tar"),
    "empty-file": (lambda: b"", "not a valid tar"),
}


@pytest.mark.parametrize("case", sorted(BAD_ARCHIVES))
def test_bad_archive_is_refused_naming_the_member(tmp_path: Path, case: str) -> None:
    build, message = BAD_ARCHIVES[case]
    archive = tmp_path / "bad.tar"
    archive.write_bytes(build())
    dest = tmp_path / "out"
    with pytest.raises(InstallError) as caught:
        unpack_bundle(archive, dest, max_bytes=MAX_BYTES, max_files=4)
    assert caught.value.reason == Reason.BAD_ARCHIVE
    assert message in caught.value.message
    assert not dest.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tar"]


def test_limits_are_inclusive(tmp_path: Path) -> None:
    archive = tmp_path / "ok.tar"
    archive.write_bytes(_tar(("a", bytes(MAX_BYTES // 2)), ("sub/b", bytes(MAX_BYTES // 2))))
    unpack_bundle(archive, tmp_path / "out", max_bytes=MAX_BYTES, max_files=2)
    assert (tmp_path / "out" / "sub" / "b").stat().st_size == MAX_BYTES // 2
    assert (tmp_path / "out" / "a").stat().st_mode & 0o777 == 0o644


def test_existing_destination_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "ok.tar"
    archive.write_bytes(_tar(OK))
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError):
        unpack_bundle(archive, tmp_path / "out", max_bytes=MAX_BYTES)


def test_pack_is_deterministic(tmp_path: Path) -> None:
    pack_bundle(REFERENCE, tmp_path / "one.tar")
    # A copy with other times and modes packs to the same bytes.
    copy = tmp_path / "copy"
    shutil.copytree(REFERENCE, copy)
    for path in copy.rglob("*"):
        os.utime(path, (1_700_000_000, 1_700_000_000))
        path.chmod(0o700 if path.is_dir() else 0o600)
    pack_bundle(copy, tmp_path / "two.tar")
    assert (tmp_path / "one.tar").read_bytes() == (tmp_path / "two.tar").read_bytes()

    with tarfile.open(tmp_path / "one.tar") as archive:
        members = archive.getmembers()
    names = [m.name for m in members]
    assert names == sorted(names, key=lambda n: n.split("/"))
    assert "bundle.json" in names and "golden" in names
    for member in members:
        assert (member.mtime, member.uid, member.gid, member.uname, member.gname) == (
            0,
            0,
            0,
            "",
            "",
        )
        assert member.mode == (0o755 if member.isdir() else 0o644)
        assert member.pax_headers == {}


def test_pack_refuses_symlinks(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(REFERENCE, bundle)
    (bundle / "link").symlink_to(bundle / "model.onnx")
    with pytest.raises(ValueError, match="not a regular file"):
        pack_bundle(bundle, tmp_path / "out.tar")
    assert not (tmp_path / "out.tar").exists()


def test_reference_bundle_roundtrip(tmp_path: Path) -> None:
    archive = tmp_path / "reference.tar"
    pack_bundle(REFERENCE, archive)
    dest = tmp_path / "unpacked"
    unpack_bundle(archive, dest, max_bytes=10 * 1024 * 1024, max_files=64)
    bundle = load_bundle(dest)
    assert bundle.manifest == load_bundle(REFERENCE).manifest
    assert (dest / "model.onnx").read_bytes() == (REFERENCE / "model.onnx").read_bytes()
