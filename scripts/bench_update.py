"""Update-path benchmarks, measured side by side in one run on a loopback Mosquitto.

- transfer vs raw: a random bundle-sized file through `ChunkServer` and `BundleDownloader`
  (the agent's real path: requests, chunk answers, part file, bitmap, sha256) vs the same
  bytes published raw in 64 KiB QoS 0 messages from one transport to another;
- resume: a transfer cut at half its chunks (the server goes silent, the downloader gives
  up with short timeouts), then a new downloader resumes: the share of bytes re-requested;
- hot swap: ONNX reference -> LiteRT reference in a running pipeline at a paced 30 fps,
  the largest result gap around the swap vs the median gap, and frames lost.

Prints one JSON object (``--json``: nothing else on stdout; otherwise progress on stderr).

Usage: scripts/bench_update.py [--json] [--size-mb 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for tests.mqtt_broker, when run as a script

from edge_agent.inspect import Inspector  # noqa: E402
from edge_agent.pipeline import Inspection, Pipeline  # noqa: E402
from edge_agent.protocol import topics  # noqa: E402
from edge_agent.protocol.fetch_wire import CHUNK_SIZE  # noqa: E402
from edge_agent.sources.synthetic import SyntheticLine  # noqa: E402
from edge_agent.transport import MqttTransport  # noqa: E402
from edge_agent.update.download import BundleDownloader  # noqa: E402
from edge_agent.update.errors import TransferError  # noqa: E402
from edge_agent.update.mqtt_fetcher import MqttFetcher  # noqa: E402
from fleet_server.workers.chunk_server import ChunkServer  # noqa: E402
from tests.integration.reference import ONNX_BUNDLE, TFLITE_BUNDLE, UNSEEN_SEED  # noqa: E402
from tests.mqtt_broker import MosquittoBroker  # noqa: E402

MB = 1024 * 1024
DEVICE = "bench-dev"
TARGET = "models/bench-1.0.0.tar"
RAW_TOPIC = "bench/raw"
RAW_WINDOW = 256  # messages the raw publisher may run ahead of the subscriber (no QoS 0 drops)
CONNECT_TIMEOUT_S = 10.0
RAW_TIMEOUT_S = 120.0
SWAP_FRAMES, SWAP_AFTER, SWAP_FPS = 180, 90, 30.0
GAP_WINDOW = 5  # results either side of the switch searched for the largest gap
GOALS = {
    "transfer_ratio": 0.5,
    "transfer_mb_s": 50.0,
    "resume_refetch_share": 0.55,
    "swap_gap_ratio": 2.0,
}

Report = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class Rig:
    """A broker with a fleet server (ChunkServer) and a device transport connected to it."""

    broker: MosquittoBroker
    server: ChunkServer
    server_transport: MqttTransport
    device_transport: MqttTransport
    targets: Path


def connect(broker: MosquittoBroker, client_id: str) -> MqttTransport:
    """A started, connected transport.

    Raises:
        RuntimeError: no connection within CONNECT_TIMEOUT_S.
    """
    transport = MqttTransport(host=broker.host, port=broker.port, client_id=client_id)
    transport.start()
    if not transport.wait_connected(CONNECT_TIMEOUT_S):
        transport.stop()
        raise RuntimeError(f"{client_id} cannot connect to the broker")
    return transport


def publish_target(targets: Path, size: int, seed: int) -> tuple[int, str]:
    """Write `size` random bytes as TARGET under `targets`; return (length, sha256)."""
    content = random_bytes(size, seed)
    path = targets / TARGET
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return len(content), hashlib.sha256(content).hexdigest()


def random_bytes(size: int, seed: int) -> bytes:
    # SHA-256 in counter mode: deterministic, incompressible, fast enough for tens of MB.
    blocks = (
        hashlib.sha256(seed.to_bytes(8, "big") + i.to_bytes(8, "big")).digest()
        for i in range(-(-size // 32))
    )
    return b"".join(blocks)[:size]


def open_rig(broker: MosquittoBroker, root: Path) -> Rig:
    metadata = root / "published" / "metadata"
    targets = root / "published" / "targets"
    metadata.mkdir(parents=True)
    targets.mkdir()
    (metadata / "timestamp.json").write_bytes(b"{}")
    server_transport = connect(broker, "bench-fleet-server")
    device_transport = connect(broker, DEVICE)
    server = ChunkServer(server_transport, metadata, targets)
    # The server's subscription travels on another connection: wait until it answers.
    probe = MqttFetcher(device_transport, DEVICE, request_timeout_s=0.1, retries=50)
    if probe.download_bytes("mqtt:metadata/timestamp.json", 100) != b"{}":
        raise RuntimeError("the chunk server does not answer")
    return Rig(broker, server, server_transport, device_transport, targets)


def measure_transfer(rig: Rig, work: Path, length: int, sha256: str) -> float:
    """MB/s of one full download into a fresh `work` dir (hash verified by the downloader)."""
    downloader = BundleDownloader(rig.device_transport, DEVICE, work)
    started = time.perf_counter()
    downloader.download(TARGET, length, sha256)
    elapsed = time.perf_counter() - started
    downloader.discard(sha256)
    return length / MB / elapsed


def measure_raw(broker: MosquittoBroker, content: bytes) -> float:
    """MB/s of `content` in CHUNK_SIZE QoS 0 messages until the subscriber has every byte.

    Raises:
        RuntimeError: the subscriber did not get every byte within RAW_TIMEOUT_S.
    """
    view = memoryview(content)
    chunks = [bytes(view[i : i + CHUNK_SIZE]) for i in range(0, len(content), CHUNK_SIZE)]
    publisher = connect(broker, "bench-raw-pub")
    subscriber = connect(broker, "bench-raw-sub")
    try:
        lock = threading.Condition()
        state = {"bytes": 0, "messages": 0}  # written on the subscriber's network thread
        probe = b"probe"

        def on_message(_topic: str, payload: bytes) -> None:
            if payload == probe:
                state["probe"] = 1
            else:
                state["bytes"] += len(payload)
                state["messages"] += 1
            with lock:
                lock.notify_all()

        subscriber.subscribe(RAW_TOPIC, on_message, qos=0)
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while "probe" not in state:  # until the subscription is in place
            if time.monotonic() > deadline:
                raise RuntimeError("the raw subscriber never got a message")
            publisher.publish(RAW_TOPIC, probe, qos=0)
            time.sleep(0.02)
        time.sleep(0.1)  # let stray probes drain before the clock starts
        state["bytes"] = state["messages"] = 0
        started = time.perf_counter()
        deadline = time.monotonic() + RAW_TIMEOUT_S
        for sent, chunk in enumerate(chunks):
            with lock:
                while sent - state["messages"] >= RAW_WINDOW:
                    if not lock.wait(timeout=max(deadline - time.monotonic(), 0.0)):
                        raise RuntimeError("raw subscriber stalled")
            publisher.publish(RAW_TOPIC, chunk, qos=0)
        with lock:
            while state["bytes"] < len(content):
                if not lock.wait(timeout=max(deadline - time.monotonic(), 0.0)):
                    raise RuntimeError(f"raw subscriber got {state['bytes']} of {len(content)}")
        return len(content) / MB / (time.perf_counter() - started)
    finally:
        subscriber.stop()
        publisher.stop()


class Gate:
    """Forwards requests to the real server until `allowed` runs out, then drops them."""

    def __init__(self, server: ChunkServer, allowed: int) -> None:
        self.server = server
        self.allowed = allowed

    def __call__(self, topic: str, payload: bytes) -> None:
        if self.allowed > 0:
            self.allowed -= 1
            self.server.handle(topic, payload)


def measure_resume(rig: Rig, work: Path, length: int, sha256: str) -> dict[str, object]:
    """Cut a transfer at half its chunks, resume it; the share of bytes asked for again."""
    chunk_count = -(-length // CHUNK_SIZE)
    fetch_filter = topics.device_filter("fetch")
    rig.server_transport.subscribe(fetch_filter, Gate(rig.server, chunk_count // 2), qos=0)
    cut = BundleDownloader(
        rig.device_transport,
        DEVICE,
        work,
        request_timeout_s=0.2,
        retries=1,
        min_deadline_s=2.0,
    )
    try:
        cut.download(TARGET, length, sha256)
        raise RuntimeError("the gated transfer finished; it should have been cut")
    except TransferError as e:
        reason = e.reason.value
    finally:
        rig.server_transport.subscribe(fetch_filter, rig.server.handle, qos=0)
    resumed = BundleDownloader(rig.device_transport, DEVICE, work)
    resumed.download(TARGET, length, sha256)
    resumed.discard(sha256)
    stats = resumed.stats
    return {
        "resume_refetch_share": stats.bytes_requested / length,
        "resume_cut_reason": reason,
        "resume_resumed_bytes": stats.resumed_bytes,
        "resume_requested_bytes": stats.bytes_requested,
    }


def warmed(bundle: Path) -> Inspector:
    inspector = Inspector.open(bundle)
    frame = next(iter(SyntheticLine(seed=UNSEEN_SEED, count=1, encode_jpeg=True)))
    if frame.data is None:
        raise RuntimeError("the synthetic line gave no JPEG")
    for _ in range(20):  # a new model is warmed up before it is swapped in
        inspector.inspect_bytes(frame.data)
    return inspector


def measure_swap() -> dict[str, object]:
    """Hot swap ONNX -> LiteRT at a paced 30 fps (as tests/integration/test_pipeline_swap)."""
    onnx, tflite = warmed(ONNX_BUNDLE), warmed(TFLITE_BUNDLE)
    try:
        line = SyntheticLine(
            seed=UNSEEN_SEED, size=(640, 480), fps=SWAP_FPS, count=SWAP_FRAMES, encode_jpeg=True
        )
        pipeline = Pipeline(onnx, decode_workers=1, queue_size=8, drop_oldest=line.live)
        due = threading.Event()
        results: list[Inspection] = []
        arrivals: list[float] = []

        def swapper() -> None:
            due.wait()
            pipeline.swap(tflite)

        thread = threading.Thread(target=swapper)
        thread.start()
        try:
            for r in pipeline.run(line):
                arrivals.append(time.perf_counter())
                results.append(r)
                if len(results) == SWAP_AFTER:
                    due.set()
        finally:
            due.set()
            thread.join()
    finally:
        onnx.close()
        tflite.close()
    ids = {r.frame.frame_id for r in results if r.verdict.error is None}
    lost = sum(1 for i in range(SWAP_FRAMES) if i not in ids)
    switches = [
        i for i in range(1, len(results)) if results[i].inspector is not results[i - 1].inspector
    ]
    switch = switches[0] if switches else len(results) - 1
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    median = statistics.median(gaps)
    near = gaps[max(0, switch - GAP_WINDOW) : switch + GAP_WINDOW]
    return {
        "swap_gap_ratio": max(near) / median,
        "swap_lost_frames": lost,
        "swap_max_gap_ms": max(near) * 1000,
        "swap_median_gap_ms": median * 1000,
        "swap_switch_frame": switch,
    }


def run_bench(size_mb: float, rounds: int, report: Report) -> dict[str, object]:
    """Every measurement in one run; the dict that `main` prints."""
    size = int(size_mb * MB)
    result: dict[str, object] = {"size_mb": size_mb, "rounds": rounds, "statistic": "median"}
    with MosquittoBroker() as broker, tempfile.TemporaryDirectory(prefix="bench-update-") as tmp:
        root = Path(tmp)
        rig = open_rig(broker, root)
        try:
            length, sha256 = publish_target(rig.targets, size, seed=1)
            content = (rig.targets / TARGET).read_bytes()
            # Untimed: the server reads the file into its cache once, as for the first of
            # many devices fetching a bundle.
            measure_transfer(rig, root / "work-warmup", length, sha256)
            transfers: list[float] = []
            raws: list[float] = []
            for i in range(rounds):
                transfers.append(measure_transfer(rig, root / f"work-{i}", length, sha256))
                raws.append(measure_raw(broker, content))
                report(f"round {i + 1}: transfer {transfers[-1]:.1f} MB/s, raw {raws[-1]:.1f} MB/s")
            transfer, raw = statistics.median(transfers), statistics.median(raws)
            result.update(
                transfer_mb_s=round(transfer, 1),
                raw_mb_s=round(raw, 1),
                transfer_ratio=round(transfer / raw, 3),
                transfer_rounds_mb_s=[round(t, 1) for t in transfers],
                raw_rounds_mb_s=[round(r, 1) for r in raws],
                server_reads_from_disk=rig.server.reads_from_disk,
            )
            result.update(measure_resume(rig, root / "work-resume", length, sha256))
            report(f"resume re-fetched {result['resume_refetch_share']:.3f} of the bytes")
        finally:
            rig.device_transport.stop()
            rig.server_transport.stop()
    result.update(measure_swap())
    report(f"swap gap ratio {result['swap_gap_ratio']:.2f}, lost {result['swap_lost_frames']}")
    result["goals"] = goals(result)
    return result


def goals(result: dict[str, object]) -> dict[str, bool]:
    def value(key: str) -> float:
        v = result[key]
        assert isinstance(v, int | float)
        return float(v)

    return {
        "transfer_ratio": value("transfer_ratio") >= GOALS["transfer_ratio"],
        "transfer_mb_s": value("transfer_mb_s") >= GOALS["transfer_mb_s"],
        "resume_refetch_share": value("resume_refetch_share") <= GOALS["resume_refetch_share"],
        "swap_gap_ratio": value("swap_gap_ratio") <= GOALS["swap_gap_ratio"],
        "swap_lost_frames": value("swap_lost_frames") == 0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--json", action="store_true", help="only the JSON object on stdout")
    parser.add_argument("--size-mb", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    if args.size_mb <= 0 or args.rounds < 1:
        parser.error("need --size-mb > 0 and --rounds >= 1")

    def report(line: str) -> None:
        if not args.json:
            print(line, file=sys.stderr, flush=True)

    result = run_bench(args.size_mb, args.rounds, report)
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
