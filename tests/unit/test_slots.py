"""Tests for edge_agent.update.slots with the real reference bundles: staging, activation,
bad pointers, and a child process killed at random points of stage/activate."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import signal
import time
from pathlib import Path

import pytest

from edge_agent.bundle import load_bundle
from edge_agent.update.errors import InstallError, Reason
from edge_agent.update.slots import POINTER_NAME, ReleaseInfo, SlotStore
from edge_agent.update.unpack import pack_bundle

MODELS = Path(__file__).resolve().parents[2] / "models"
ONNX = MODELS / "reference-onnx"
TFLITE = MODELS / "reference-tflite"


def _release(tar: Path, counter: int) -> ReleaseInfo:
    sha256 = hashlib.sha256(tar.read_bytes()).hexdigest()
    return ReleaseInfo(f"models/{tar.stem}.tar", sha256, counter)


@pytest.fixture
def tars(tmp_path: Path) -> dict[str, Path]:
    packed = {}
    for name, source in (("onnx", ONNX), ("tflite", TFLITE)):
        packed[name] = tmp_path / f"{name}.tar"
        pack_bundle(source, packed[name])
    return packed


@pytest.fixture
def store(tmp_path: Path, tars: dict[str, Path]) -> SlotStore:
    """Factory onnx bundle (counter 1) active in a, tflite (counter 2) staged in b."""
    store = SlotStore(tmp_path / "store")
    store.seed(ONNX, ReleaseInfo("models/reference-onnx-1.0.0.tar", "0" * 64, 1))
    store.stage(tars["tflite"], _release(tars["tflite"], 2))
    return store


def _snapshot(directory: Path) -> dict[str, tuple[int, int, int]]:
    return {
        p.relative_to(directory).as_posix(): (
            p.stat().st_ino,
            p.stat().st_mtime_ns,
            p.stat().st_size,
        )
        for p in directory.rglob("*")
    }


def test_empty_store(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = SlotStore(tmp_path / "store")
    assert store.active() is None
    assert store.standby_name() == "a"
    assert store.load_order() == []
    assert not caplog.records
    with pytest.raises(RuntimeError, match="holds no staged bundle"):
        store.activate("a")
    with pytest.raises(ValueError, match="no slot named"):
        store.activate("c")


def test_seed_installs_the_factory_bundle_once(tmp_path: Path, tars: dict[str, Path]) -> None:
    store = SlotStore(tmp_path / "store")
    seeded = store.seed(ONNX, ReleaseInfo("models/reference-onnx-1.0.0.tar", "0" * 64, 1))
    assert (seeded.slot, seeded.model_name, seeded.release_counter) == ("a", "reference-onnx", 1)
    assert load_bundle(seeded.path).manifest == load_bundle(ONNX).manifest
    assert store.active() == seeded
    assert json.loads((tmp_path / "store" / POINTER_NAME).read_bytes())["active"] == "a"
    # Not empty any more: seeding again changes nothing.
    before = _snapshot(tmp_path / "store")
    assert store.seed(TFLITE, ReleaseInfo("models/other.tar", "1" * 64, 9)) == seeded
    assert _snapshot(tmp_path / "store") == before


def test_stage_then_activate_never_touches_the_active_slot(
    store: SlotStore, tars: dict[str, Path]
) -> None:
    active = store.active()
    staged = store.slot("b")
    assert active is not None and staged is not None
    assert (active.slot, staged.slot) == ("a", "b")
    assert (staged.model_name, staged.release_counter) == ("reference-tflite", 2)
    assert staged.sha256 == _release(tars["tflite"], 2).sha256
    assert store.load_order() == [active, staged]

    assert store.activate("b") == staged
    assert store.active() == staged
    assert store.standby_name() == "a"
    assert [info.slot for info in store.load_order()] == ["b", "a"]

    # The next release goes into a; b (now active) keeps every inode, time and size.
    before = _snapshot(staged.path)
    again = store.stage(tars["onnx"], _release(tars["onnx"], 3))
    assert (again.slot, again.model_name, again.release_counter) == ("a", "reference-onnx", 3)
    assert _snapshot(staged.path) == before
    assert store.active() == staged
    assert sorted(p.name for p in store.root.iterdir()) == [POINTER_NAME, "slots"]


def test_bad_archive_leaves_the_standby_slot_empty(store: SlotStore, tmp_path: Path) -> None:
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"not a tar" * 100)
    active = store.active()
    with pytest.raises(InstallError) as caught:
        store.stage(bad, ReleaseInfo("models/bad.tar", "2" * 64, 5))
    assert caught.value.reason == Reason.BAD_ARCHIVE
    assert store.slot("b") is None
    assert store.active() == active
    assert sorted(p.name for p in store.root.iterdir()) == [POINTER_NAME, "slots"]
    with pytest.raises(RuntimeError):
        store.activate("b")


def test_archive_whose_bundle_does_not_verify_is_refused(store: SlotStore, tmp_path: Path) -> None:
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    for path in ONNX.rglob("*"):
        target = tampered / path.relative_to(ONNX)
        if path.is_dir():
            target.mkdir()
        else:
            target.write_bytes(path.read_bytes())
    with (tampered / "model.onnx").open("ab") as f:
        f.write(b"\x00")
    pack_bundle(tampered, tmp_path / "tampered.tar")
    with pytest.raises(InstallError) as caught:
        store.stage(tmp_path / "tampered.tar", ReleaseInfo("models/t.tar", "3" * 64, 6))
    assert caught.value.reason == Reason.BAD_BUNDLE
    assert "model.onnx" in caught.value.message
    assert store.slot("b") is None


def test_activate_refuses_a_slot_whose_bundle_no_longer_verifies(store: SlotStore) -> None:
    staged = store.slot("b")
    assert staged is not None
    (staged.path / "model.tflite").write_bytes(b"corrupt")
    with pytest.raises(InstallError) as caught:
        store.activate("b")
    assert caught.value.reason == Reason.BAD_BUNDLE
    active = store.active()
    assert active is not None and active.slot == "a"


BAD_POINTERS: dict[str, bytes | None] = {
    "missing": None,
    "empty": b"",
    "garbage": b"\x00\xffnot json",
    "truncated": b'{"format": 1, "act',
    "unknown-slot": b'{"format": 1, "active": "c"}',
    "extra-key": b'{"format": 1, "active": "a", "force": true}',
    "wrong-format": b'{"format": 2, "active": "a"}',
    "not-an-object": b'["a"]',
    "huge": b" " * 100_000 + b'{"format": 1, "active": "a"}',
}


@pytest.mark.parametrize("case", sorted(BAD_POINTERS))
def test_bad_pointer_falls_back_to_a_verifying_slot(
    store: SlotStore, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    store.activate("b")
    pointer = store.root / POINTER_NAME
    content = BAD_POINTERS[case]
    if content is None:
        pointer.unlink()
    else:
        pointer.write_bytes(content)
    with caplog.at_level(logging.WARNING):
        active = store.active()
    # The lowest release counter first: b (counter 2) may be an unproven candidate.
    assert active is not None and active.slot == "a"
    assert "falling back to slot a" in caplog.text
    # A slot whose bundle does not verify is never chosen.
    (store.root / "slots" / "a" / "model.onnx").write_bytes(b"rot")
    active = store.active()
    assert active is not None and active.slot == "b"
    # Repaired by the next activation.
    store.activate("b")
    caplog.clear()
    assert store.active() == store.slot("b")
    assert not caplog.records


def test_dangling_pointer_falls_back(store: SlotStore, caplog: pytest.LogCaptureFixture) -> None:
    store.activate("b")
    (store.root / "slots" / "b.json").unlink()
    with caplog.at_level(logging.WARNING):
        active = store.active()
    assert active is not None and active.slot == "a"
    assert "names slot b, which holds no bundle" in caplog.text


def test_nothing_verifies_returns_none(store: SlotStore, caplog: pytest.LogCaptureFixture) -> None:
    (store.root / POINTER_NAME).write_bytes(b"junk")
    for name in ("a", "b"):
        (store.root / "slots" / f"{name}.json").write_bytes(b"junk")
    with caplog.at_level(logging.WARNING):
        assert store.active() is None
    assert "no slot holds a bundle that verifies" in caplog.text


def _stage_and_activate_forever(root: Path, tars: list[Path], releases: list[ReleaseInfo]) -> None:
    store = SlotStore(root)
    for i in range(1_000_000):
        standby = store.standby_name()
        store.stage(tars[i % 2], releases[i % 2])
        store.activate(standby)


def test_kill_during_stage_or_activate_always_leaves_a_verifying_pointer(
    tmp_path: Path, tars: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "store"
    SlotStore(root).seed(ONNX, ReleaseInfo("models/reference-onnx-1.0.0.tar", "0" * 64, 1))
    order = [tars["tflite"], tars["onnx"]]
    releases = [_release(tars["tflite"], 2), _release(tars["onnx"], 3)]
    expected = {"reference-onnx": load_bundle(ONNX), "reference-tflite": load_bundle(TFLITE)}
    rng = random.Random(1234)
    seen_active: set[str] = set()
    mid_stage = 0
    started = time.monotonic()
    for _ in range(30):
        # fork, not a new interpreter: no start-up cost, so the kills land quickly.
        pid = os.fork()
        if pid == 0:  # the child: stage and activate until killed
            try:
                _stage_and_activate_forever(root, order, releases)
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.0, 0.15))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL

        # The pointer itself is always whole and names a slot whose bundle verifies.
        pointer = json.loads((root / POINTER_NAME).read_bytes())
        slot = pointer["active"]
        bundle = load_bundle(root / "slots" / slot)
        record = json.loads((root / "slots" / f"{slot}.json").read_bytes())
        assert record["model_name"] == bundle.manifest.name
        assert bundle.manifest == expected[bundle.manifest.name].manifest
        store = SlotStore(root)
        caplog.clear()
        active = store.active()
        assert active is not None and active.slot == slot
        assert not caplog.records  # no fallback was needed
        seen_active.add(slot)
        other = "b" if slot == "a" else "a"
        mid_stage += store.slot(other) is None
    assert seen_active == {"a", "b"}
    assert mid_stage > 0  # some kills landed inside a stage
    assert time.monotonic() - started < 30
    # The next stage clears what the kills left behind.
    store = SlotStore(root)
    store.stage(tars["onnx"], releases[1])
    assert sorted(p.name for p in root.iterdir()) == [POINTER_NAME, "slots"]
