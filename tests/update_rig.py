"""A whole device on the update path, for end-to-end update tests.

`DeviceRig` wires the real pieces the agent uses (`TrustClient` over `MqttFetcher`,
`BundleDownloader`, `SlotStore`, `StateFile`, `UpdateManager`) to a `FleetSimulator`
served by a (tampering) `ChunkServer` over a real Mosquitto, and runs a real `Pipeline` on
a synthetic line in a thread, offering every inspected frame to the manager and swapping
models the way the agent does. Tests call ``run_once`` and then look at events, slots,
trust state and the line's results.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.bundle import copy_bundle, load_bundle
from edge_agent.inspect import Inspector
from edge_agent.pipeline import Inspection, Pipeline
from edge_agent.protocol import topics
from edge_agent.protocol.events import EventKind, UpdateEvent, decode_event
from edge_agent.sources.synthetic import SyntheticLine
from edge_agent.update.download import BundleDownloader
from edge_agent.update.gate import GateLimits
from edge_agent.update.manager import UpdateManager, UpdateSettings
from edge_agent.update.mqtt_fetcher import MqttFetcher
from edge_agent.update.slots import ReleaseInfo, SlotStore
from edge_agent.update.state import StateFile
from edge_agent.update.trust import DeviceFacts, Release, TrustClient
from edge_agent.update.unpack import pack_bundle
from tests.fleet_simulator import FleetSimulator, TamperingChunkServer, wait_for
from tests.integration.reference import ONNX_BUNDLE, UNSEEN_SEED
from tests.mqtt_broker import MosquittoBroker, connect

DEVICE = "dev-1"
PROFILE = "x86-generic"
MODEL = "reference-onnx"
FACTS = DeviceFacts(DEVICE, PROFILE, frozenset({"onnx", "tflite"}))
# Gate limits for tests: a short shadow run, limits a loaded CI machine meets.
TEST_GATE = GateLimits(
    max_latency_ms=2000.0,
    max_memory_mb=16384.0,
    shadow_frames=30,
    min_agreement=0.9,
    timeout_s=60.0,
)


def make_bundle(
    dest: Path, version: str, edit: Callable[[dict[str, Any], Path], None] | None = None
) -> Path:
    """A copy of the ONNX reference bundle as ``version``, optionally edited, re-sealed."""
    return copy_bundle(ONNX_BUNDLE, dest, version=version, edit=edit).path


def tar_bytes(bundle_dir: Path) -> bytes:
    out = bundle_dir.with_suffix(".tar")
    pack_bundle(bundle_dir, out)
    return out.read_bytes()


@dataclass
class Line:
    """A real pipeline on a paced synthetic line, feeding the manager like the agent."""

    pipeline: Pipeline
    source: SyntheticLine
    results: list[Inspection] = field(default_factory=list)
    manager: UpdateManager | None = None
    failure: BaseException | None = None
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="line", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for item in self.pipeline.run(self.source):
                self.results.append(item)
                if self.manager is not None:
                    self.manager.offer(item.frame, item.verdict)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.failure = e

    def stop(self) -> None:
        self.source.close()
        self.pipeline.stop()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def models(self) -> list[str]:
        """Model ids in the order they served, each once."""
        seen: list[str] = []
        for item in list(self.results):
            if not seen or seen[-1] != item.model:
                seen.append(item.model)
        return seen

    def errors(self) -> int:
        return sum(1 for item in list(self.results) if item.verdict.error is not None)

    def frame_ids_complete(self) -> bool:
        ids = [item.frame.frame_id for item in list(self.results)]
        return ids == list(range(len(ids)))


class DeviceRig:
    """A device with factory bundle ``MODEL@1`` (release counter 1) in slot a."""

    def __init__(
        self,
        broker: MosquittoBroker,
        tmp: Path,
        *,
        gate: GateLimits = TEST_GATE,
        max_attempts: int = 3,
        downloader_options: dict[str, Any] | None = None,
    ) -> None:
        self.tmp = tmp
        self.broker = broker
        self.sim = FleetSimulator(tmp / "served")
        self.v1_dir = make_bundle(tmp / "bundles" / "v1", "1")
        self.v1 = self.release(self.v1_dir, counter=1)
        self.sim.assign(DEVICE, self.v1)
        self.sim.publish()
        self.server_transport = connect(broker, "fleet-server")
        self.transport = connect(broker, DEVICE)
        self.server = TamperingChunkServer(
            self.server_transport, self.sim.metadata_dir, self.sim.targets_dir
        )
        # Wait until the server's subscription is in place.
        MqttFetcher(self.transport, DEVICE, request_timeout_s=0.1, retries=50).download_bytes(
            "mqtt:metadata/1.root.json", 512_000
        )
        self.wire_events: list[UpdateEvent] = []
        self.transport.subscribe(topics.events(DEVICE), self._on_event, qos=1)
        self.home = tmp / "device"
        self.slots = SlotStore(self.home / "slots")
        v1_info = self.sim.md["release"].signed.targets[self.v1]
        self.slots.seed(self.v1_dir, ReleaseInfo(self.v1, v1_info.hashes["sha256"], 1))
        self.state = StateFile(self.home / "state.json")
        self.state.raise_counter(MODEL, 1)
        self.trust = TrustClient(
            self.home / "trust",
            self.sim.bootstrap_root,
            MqttFetcher(self.transport, DEVICE, request_timeout_s=0.5, retries=2),
            FACTS,
        )
        options: dict[str, Any] = {"request_timeout_s": 0.5, "retries": 3, "min_deadline_s": 5.0}
        options.update(downloader_options or {})
        self.downloader = BundleDownloader(
            self.transport, DEVICE, self.home / "downloads", **options
        )
        active = self.slots.active()
        assert active is not None
        inspector = Inspector.open(active.path)
        self.line = Line(
            Pipeline(inspector, decode_workers=1, drop_oldest=True),
            SyntheticLine(seed=UNSEEN_SEED, size=(320, 240), fps=60.0, encode_jpeg=True),
        )
        self.manager = UpdateManager(
            transport=self.transport,
            device_id=DEVICE,
            trust=self.trust,
            downloader=self.downloader,
            slots=self.slots,
            state=self.state,
            open_model=Inspector.open,
            swap=self.line.pipeline.swap,
            settings=UpdateSettings(gate=gate, max_attempts=max_attempts),
        )
        self.line.manager = self.manager
        self.line.start()
        assert wait_for(lambda: len(self.line.results) >= 5, 20), "the line does not run"
        # The device trusts the current metadata and runs what it is assigned.
        assert self.run_once() is None
        self.trust_baseline = self.trust_files()
        assert self.trust_baseline, "no trusted metadata after the first check"

    def _on_event(self, _topic: str, payload: bytes) -> None:
        self.wire_events.append(decode_event(payload))

    # -- fleet side -----------------------------------------------------------------------

    def release(
        self,
        bundle_dir: Path,
        *,
        counter: int,
        runtime: str = "onnx",
        profiles: tuple[str, ...] = (PROFILE,),
    ) -> str:
        manifest = load_bundle(bundle_dir, verify_hashes=False).manifest
        return self.sim.add_release(
            manifest.name,
            manifest.version,
            tar_bytes(bundle_dir),
            counter=counter,
            runtime=runtime,
            profiles=profiles,
        )

    def offer_version(
        self,
        version: str,
        *,
        counter: int,
        edit: Callable[[dict[str, Any], Path], None] | None = None,
    ) -> str:
        """Release ``MODEL@version`` (optionally edited), assign it, publish."""
        bundle = make_bundle(self.tmp / "bundles" / version, version, edit)
        path = self.release(bundle, counter=counter)
        self.sim.assign(DEVICE, path)
        self.sim.publish()
        return path

    # -- device side ----------------------------------------------------------------------

    def run_once(self) -> Release | None:
        return self.manager.run_once()

    def kinds(self) -> list[EventKind]:
        return [event.event for event in self.manager.events]

    def last(self, kind: EventKind) -> UpdateEvent:
        matching = [event for event in self.manager.events if event.event == kind]
        assert matching, f"no {kind.value} event in {self.kinds()}"
        return matching[-1]

    def active_version(self) -> str:
        active = self.slots.active()
        assert active is not None
        return active.model_version

    def trust_files(self) -> dict[str, bytes]:
        root = self.trust.trusted_dir()
        if root is None:
            return {}
        return {
            str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink()
        }

    def serving(self, version: str, frames: int = 10) -> bool:
        """True once ``frames`` more frames came out of the line, all from ``version``."""
        start = len(self.line.results)
        wait_for(lambda: len(self.line.results) >= start + frames, 20)
        recent = self.line.results[start:]
        return len(recent) >= frames and all(
            item.model == f"{MODEL}@{version}" and item.verdict.error is None for item in recent
        )

    def close(self) -> None:
        self.manager.stop()
        self.line.stop()
        self.line.pipeline.inspector.close()
        self.transport.stop()
        self.server_transport.stop()


def device_rig(broker: MosquittoBroker, tmp: Path, **kwargs: Any) -> Iterator[DeviceRig]:
    rig = DeviceRig(broker, tmp, **kwargs)
    try:
        yield rig
    finally:
        rig.close()
