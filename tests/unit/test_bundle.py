"""Tests for edge_agent.bundle: seal a real directory, tamper with it, load it."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from edge_agent.bundle import (
    MAX_MANIFEST_BYTES,
    Bundle,
    load_bundle,
    seal_bundle,
    sha256_file,
)
from edge_agent.durable import write_atomic
from edge_agent.protocol.errors import BundleError, BundleFileError, ManifestError
from edge_agent.protocol.manifest import MANIFEST_NAME, dump_manifest

MODEL = b"\x08\x07fake-onnx-model\x00\x01\x02" * 10
GOLDEN_OK = b"\x89PNG fake ok"
GOLDEN_DEFECT = b"\x89PNG fake defect"

Tamper = Callable[[Path], None]


def _draft() -> dict[str, object]:
    return {
        "format": 1,
        "name": "reference",
        "version": "1.0.0",
        "runtime": "onnx",
        "model": "model.onnx",
        "input": {"width": 4, "height": 4, "layout": "NCHW", "dtype": "float32"},
        "output": {"labels": ["ok", "defect"], "defect_label": "defect", "activation": "softmax"},
        "decision": {"t_fail": 0.7, "t_uncertain": 0.4},
        "golden": [
            {"file": "golden/ok.png", "p_defect": 0.01},
            {"file": "golden/defect.png", "p_defect": 0.99},
        ],
    }


@pytest.fixture
def bundle_dir(tmp_path: Path) -> Path:
    root = tmp_path / "bundle"
    (root / "golden").mkdir(parents=True)
    (root / "model.onnx").write_bytes(MODEL)
    (root / "golden" / "ok.png").write_bytes(GOLDEN_OK)
    (root / "golden" / "defect.png").write_bytes(GOLDEN_DEFECT)
    seal_bundle(root, _draft())
    return root


def test_seal_lists_every_file_with_length_and_sha256(bundle_dir: Path) -> None:
    raw = json.loads((bundle_dir / MANIFEST_NAME).read_bytes())
    assert raw["files"] == {
        "golden/defect.png": {
            "length": len(GOLDEN_DEFECT),
            "sha256": hashlib.sha256(GOLDEN_DEFECT).hexdigest(),
        },
        "golden/ok.png": {
            "length": len(GOLDEN_OK),
            "sha256": hashlib.sha256(GOLDEN_OK).hexdigest(),
        },
        "model.onnx": {"length": len(MODEL), "sha256": hashlib.sha256(MODEL).hexdigest()},
    }
    assert sorted(os.listdir(bundle_dir)) == ["bundle.json", "golden", "model.onnx"]


def test_seal_then_load(bundle_dir: Path) -> None:
    bundle = load_bundle(bundle_dir)
    assert isinstance(bundle, Bundle)
    assert bundle.path == bundle_dir
    assert bundle.manifest.id == "reference@1.0.0"
    assert bundle.model_path == bundle_dir / "model.onnx"
    assert bundle.file("golden/ok.png") == bundle_dir / "golden" / "ok.png"
    with pytest.raises(KeyError, match=r"nope\.png"):
        bundle.file("nope.png")
    with pytest.raises(KeyError):
        bundle.file(MANIFEST_NAME)
    # The manifest on disk is the canonical dump of the loaded one.
    assert (bundle_dir / MANIFEST_NAME).read_bytes() == dump_manifest(bundle.manifest)


def test_load_accepts_str_path(bundle_dir: Path) -> None:
    assert load_bundle(str(bundle_dir)).manifest.model == "model.onnx"


def test_seal_returns_the_loaded_manifest(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(MODEL)
    draft = _draft()
    del draft["golden"]
    sealed = seal_bundle(tmp_path, draft)
    assert sealed.manifest == load_bundle(tmp_path).manifest


def test_reseal_is_idempotent(bundle_dir: Path) -> None:
    first = (bundle_dir / MANIFEST_NAME).read_bytes()
    seal_bundle(bundle_dir, _draft())  # must not list bundle.json itself
    assert (bundle_dir / MANIFEST_NAME).read_bytes() == first


def test_seal_replaces_files_given_in_draft(bundle_dir: Path) -> None:
    draft = _draft()
    draft["files"] = {"ghost.bin": {"length": 1, "sha256": "0" * 64}}
    manifest = seal_bundle(bundle_dir, draft).manifest
    assert set(manifest.files) == {"model.onnx", "golden/ok.png", "golden/defect.png"}


def test_seal_invalid_draft_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(MODEL)
    draft = _draft()
    draft["decision"] = {"t_fail": 0.7, "t_fial": 0.4}
    with pytest.raises(ManifestError, match=r"t_fial") as excinfo:
        seal_bundle(tmp_path, draft)
    assert str(tmp_path) in str(excinfo.value)
    assert sorted(os.listdir(tmp_path)) == ["model.onnx"]


def test_seal_refuses_draft_whose_model_is_absent(tmp_path: Path) -> None:
    (tmp_path / "other.onnx").write_bytes(MODEL)
    draft = _draft()
    del draft["golden"]
    with pytest.raises(ManifestError, match=r"'model\.onnx' is not listed"):
        seal_bundle(tmp_path, draft)
    assert not (tmp_path / MANIFEST_NAME).exists()


# --- tampering ---------------------------------------------------------------------------


def _write(rel: str, data: bytes = b"x") -> Tamper:
    def tamper(root: Path) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    return tamper


def _remove(rel: str) -> Tamper:
    return lambda root: (root / rel).unlink()


def _flip_byte(rel: str, index: int) -> Tamper:
    def tamper(root: Path) -> None:
        data = bytearray((root / rel).read_bytes())
        data[index] ^= 0x01
        (root / rel).write_bytes(bytes(data))

    return tamper


def _append(rel: str) -> Tamper:
    def tamper(root: Path) -> None:
        with (root / rel).open("ab") as f:
            f.write(b"\x00")

    return tamper


def _truncate(rel: str) -> Tamper:
    def tamper(root: Path) -> None:
        data = (root / rel).read_bytes()
        (root / rel).write_bytes(data[:-1])

    return tamper


def _replace_with_dir(rel: str) -> Tamper:
    def tamper(root: Path) -> None:
        (root / rel).unlink()
        (root / rel).mkdir()

    return tamper


def _symlink_to_copy(rel: str) -> Tamper:
    """Replace a listed file with a link to an identical copy outside the bundle."""

    def tamper(root: Path) -> None:
        outside = root.parent / "outside-copy"
        outside.write_bytes((root / rel).read_bytes())
        (root / rel).unlink()
        (root / rel).symlink_to(outside)

    return tamper


def _symlink(rel: str, target: str) -> Tamper:
    return lambda root: (root / rel).symlink_to(target)


def _edit_manifest(edit: Callable[[bytes], bytes]) -> Tamper:
    def tamper(root: Path) -> None:
        path = root / MANIFEST_NAME
        path.write_bytes(edit(path.read_bytes()))

    return tamper


def _pad_manifest_to(size: int) -> Tamper:
    # Trailing whitespace keeps the JSON valid, so only the size can refuse it.
    return _edit_manifest(lambda data: data + b" " * (size - len(data)))


def _set_in_manifest(key: str, value: object) -> Tamper:
    def edit(data: bytes) -> bytes:
        raw = json.loads(data)
        raw[key] = value
        return json.dumps(raw).encode()

    return _edit_manifest(edit)


def _replace_manifest_with_dir(root: Path) -> None:
    (root / MANIFEST_NAME).unlink()
    (root / MANIFEST_NAME).mkdir()


# (id, tamper, exact error type, texts the message must contain)
TAMPERING: list[tuple[str, Tamper, type[BundleError], tuple[str, ...]]] = [
    ("extra-file", _write("notes.txt"), BundleFileError, ("notes.txt", "not listed")),
    ("extra-hidden-file", _write(".hidden"), BundleFileError, (".hidden", "not listed")),
    ("extra-nested-file", _write("golden/extra.png"), BundleFileError, ("golden/extra.png",)),
    ("extra-deep-file", _write("a/b/c.bin"), BundleFileError, ("a/b/c.bin", "not listed")),
    ("extra-empty-file", _write("empty", b""), BundleFileError, ("empty", "not listed")),
    (
        "leftover-temp-manifest",
        _write(".bundle.json.tmp-1234"),
        BundleFileError,
        (".bundle.json.tmp-1234",),
    ),
    (
        "nested-file-named-bundle-json",
        _write("golden/bundle.json", b"{}"),
        BundleFileError,
        ("golden/bundle.json", "not listed"),
    ),
    ("model-removed", _remove("model.onnx"), BundleFileError, ("model.onnx", "missing")),
    ("golden-removed", _remove("golden/ok.png"), BundleFileError, ("golden/ok.png", "missing")),
    (
        "file-replaced-by-directory",
        _replace_with_dir("golden/defect.png"),
        BundleFileError,
        ("golden/defect.png", "missing"),
    ),
    ("first-byte-flipped", _flip_byte("model.onnx", 0), BundleFileError, ("model.onnx", "sha256")),
    ("last-byte-flipped", _flip_byte("model.onnx", -1), BundleFileError, ("model.onnx", "sha256")),
    (
        "golden-byte-flipped",
        _flip_byte("golden/ok.png", 5),
        BundleFileError,
        ("golden/ok.png", "sha256"),
    ),
    (
        "byte-appended",
        _append("model.onnx"),
        BundleFileError,
        ("model.onnx", f"length {len(MODEL) + 1}", f"({len(MODEL)})"),
    ),
    ("truncated", _truncate("golden/defect.png"), BundleFileError, ("golden/defect.png", "length")),
    (
        "listed-file-is-symlink",
        _symlink_to_copy("model.onnx"),
        BundleFileError,
        ("model.onnx", "symbolic link"),
    ),
    (
        "unlisted-symlink",
        _symlink("alias.onnx", "model.onnx"),
        BundleFileError,
        ("alias.onnx", "not listed"),
    ),
    (
        "unlisted-dangling-symlink",
        _symlink("dangling", "does-not-exist"),
        BundleFileError,
        ("dangling", "not listed"),
    ),
    (
        "manifest-invalid-json",
        _edit_manifest(lambda data: data[:-3]),
        ManifestError,
        (MANIFEST_NAME, "not valid JSON"),
    ),
    (
        "manifest-not-utf8",
        _edit_manifest(lambda data: b"\xff" + data),
        ManifestError,
        (MANIFEST_NAME, "not valid JSON"),
    ),
    (
        "manifest-unknown-key",
        _set_in_manifest("modle", "x"),
        ManifestError,
        (MANIFEST_NAME, "unknown key 'modle'"),
    ),
    (
        "manifest-lists-unsafe-path",
        _set_in_manifest("files", {"../model.onnx": {"length": 1, "sha256": "0" * 64}}),
        ManifestError,
        (MANIFEST_NAME, "'../model.onnx'"),
    ),
    (
        "manifest-over-1-mib",
        _pad_manifest_to(MAX_MANIFEST_BYTES + 1),
        ManifestError,
        (MANIFEST_NAME, "larger than"),
    ),
    ("manifest-missing", _remove(MANIFEST_NAME), BundleError, (MANIFEST_NAME,)),
    ("manifest-is-directory", _replace_manifest_with_dir, BundleError, (MANIFEST_NAME,)),
]


@pytest.mark.parametrize(
    ("tamper", "error", "needles"),
    [pytest.param(t, e, n, id=i) for i, t, e, n in TAMPERING],
)
def test_tampered_bundle_is_refused(
    bundle_dir: Path, tamper: Tamper, error: type[BundleError], needles: tuple[str, ...]
) -> None:
    load_bundle(bundle_dir)  # untampered, it loads
    tamper(bundle_dir)
    with pytest.raises(BundleError) as excinfo:
        load_bundle(bundle_dir)
    assert type(excinfo.value) is error
    for needle in needles:
        assert needle in str(excinfo.value)
    if isinstance(excinfo.value, BundleFileError):
        assert excinfo.value.path == needles[0]
        assert str(excinfo.value) == f"{excinfo.value.path}: {excinfo.value.problem}"


def test_tampering_table_ids_are_unique() -> None:
    ids = [i for i, *_ in TAMPERING]
    assert len(ids) == len(set(ids))


def test_manifest_of_exactly_the_limit_is_read(bundle_dir: Path) -> None:
    _pad_manifest_to(MAX_MANIFEST_BYTES)(bundle_dir)
    assert (bundle_dir / MANIFEST_NAME).stat().st_size == MAX_MANIFEST_BYTES
    assert load_bundle(bundle_dir).manifest.id == "reference@1.0.0"


def test_empty_directory_is_ignored(bundle_dir: Path) -> None:
    # Directories are not listed in bundle.json; only files are.
    (bundle_dir / "empty-dir").mkdir()
    assert load_bundle(bundle_dir).manifest.model == "model.onnx"


@pytest.mark.parametrize("kind", ["missing", "regular-file"])
def test_path_that_is_not_a_directory(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "bundle"
    if kind == "regular-file":
        path.write_bytes(b"{}")
    with pytest.raises(BundleError) as excinfo:
        load_bundle(path)
    assert type(excinfo.value) is BundleError
    assert str(path) in str(excinfo.value)
    assert "not a bundle directory" in str(excinfo.value)


def test_without_hash_check_a_same_length_change_passes(bundle_dir: Path) -> None:
    _flip_byte("model.onnx", 3)(bundle_dir)
    assert load_bundle(bundle_dir, verify_hashes=False).manifest.model == "model.onnx"
    with pytest.raises(BundleFileError, match="sha256"):
        load_bundle(bundle_dir)


@pytest.mark.parametrize(
    ("tamper", "needle"),
    [
        pytest.param(_append("model.onnx"), "model.onnx: length", id="appended"),
        pytest.param(_truncate("golden/ok.png"), "golden/ok.png: length", id="truncated"),
        pytest.param(_write("extra.bin"), "extra.bin: present", id="extra-file"),
        pytest.param(_remove("golden/defect.png"), "golden/defect.png: listed", id="removed"),
        pytest.param(
            _symlink_to_copy("model.onnx"), "model.onnx: is a symbolic link", id="symlink"
        ),
    ],
)
def test_without_hash_check_structure_is_still_verified(
    bundle_dir: Path, tamper: Tamper, needle: str
) -> None:
    tamper(bundle_dir)
    with pytest.raises(BundleFileError) as excinfo:
        load_bundle(bundle_dir, verify_hashes=False)
    assert str(excinfo.value).startswith(needle)


def test_sha256_file_reads_in_chunks(tmp_path: Path) -> None:
    data = bytes(range(256)) * 8193  # a little over 2 MiB: spans several chunks
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    assert sha256_file(path) == (len(data), hashlib.sha256(data).hexdigest())
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    assert sha256_file(empty) == (0, hashlib.sha256(b"").hexdigest())


# --- write_atomic ------------------------------------------------------------------------


def test_write_atomic_writes_and_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    write_atomic(target, b'{"a": 1}\n')
    assert target.read_bytes() == b'{"a": 1}\n'
    assert os.listdir(tmp_path) == ["state.json"]


def test_write_atomic_replaces_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_bytes(b"old contents, longer than the new ones")
    write_atomic(target, b"new")
    assert target.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["state.json"]


def test_write_atomic_empty_data(tmp_path: Path) -> None:
    target = tmp_path / "empty"
    write_atomic(target, b"")
    assert target.read_bytes() == b""
    assert os.listdir(tmp_path) == ["empty"]


def test_write_atomic_into_missing_directory_raises_and_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        write_atomic(tmp_path / "no-such-dir" / "state.json", b"data")
    assert os.listdir(tmp_path) == []


def test_write_atomic_failure_after_temp_file_removes_it(tmp_path: Path) -> None:
    # The temp file is written, then os.replace fails: a directory is in the way.
    target = tmp_path / "state.json"
    target.mkdir()
    (target / "keep").write_bytes(b"k")
    with pytest.raises(OSError):
        write_atomic(target, b"data")
    assert os.listdir(tmp_path) == ["state.json"]
    assert os.listdir(target) == ["keep"]
