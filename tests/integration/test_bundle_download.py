"""`BundleDownloader` against a real Mosquitto: the real `ChunkServer`, or small responders
that lie about the total, duplicate, reorder or go silent."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from edge_agent.protocol import topics
from edge_agent.protocol.fetch_wire import (
    CHUNK_SIZE,
    FetchAnswer,
    WireError,
    decode_request,
    encode_answer,
)
from edge_agent.transport import MqttTransport
from edge_agent.update.download import BundleDownloader
from edge_agent.update.errors import Reason, TransferError
from edge_agent.update.mqtt_fetcher import MqttFetcher
from edge_agent.update.requests import AnswerRouter
from fleet_server.workers.chunk_server import ChunkServer
from tests.mqtt_broker import MosquittoBroker, connect, mosquitto_broker  # noqa: F401
from tests.tmpfs import small_tmpfs

DEVICE = "dev-1"
TARGET = "models/defect-1.0.0.tar"
FETCH_FILTER = topics.device_filter("fetch")


@dataclass
class Link:
    server: ChunkServer
    server_transport: MqttTransport
    device_transport: MqttTransport
    targets: Path
    work: Path

    def publish(self, content: bytes) -> str:
        """Serve `content` as TARGET; return its sha256."""
        path = self.targets / TARGET
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        return hashlib.sha256(content).hexdigest()

    def downloader(self, **options: float) -> BundleDownloader:
        return BundleDownloader(
            self.device_transport,
            DEVICE,
            self.work,
            window=int(options.get("window", 16)),
            request_timeout_s=options.get("request_timeout_s", 0.5),
            retries=int(options.get("retries", 3)),
            min_bytes_per_s=options.get("min_bytes_per_s", 64 * 1024),
            min_deadline_s=options.get("min_deadline_s", 10.0),
        )

    def respond_with(self, handler: Callable[[str, bytes], None]) -> None:
        """Put `handler` in the ChunkServer's place (one handler per filter)."""
        self.server_transport.subscribe(FETCH_FILTER, handler, qos=0)

    def answer(self, answer: FetchAnswer) -> None:
        assert self.server_transport.publish(topics.data(DEVICE), encode_answer(answer), qos=0)


@pytest.fixture
def link(mosquitto: MosquittoBroker, tmp_path: Path) -> Iterator[Link]:
    metadata = tmp_path / "published" / "metadata"
    targets = tmp_path / "published" / "targets"
    metadata.mkdir(parents=True)
    targets.mkdir()
    (metadata / "timestamp.json").write_bytes(b"{}")
    server_transport = connect(mosquitto, "fleet-server")
    device_transport = connect(mosquitto, DEVICE)
    server = ChunkServer(server_transport, metadata, targets)
    # Wait until the server's subscription is in place (it travels on another connection).
    probe = MqttFetcher(device_transport, DEVICE, request_timeout_s=0.1, retries=50)
    assert probe.download_bytes("mqtt:metadata/timestamp.json", 100) == b"{}"
    try:
        yield Link(server, server_transport, device_transport, targets, tmp_path / "work")
    finally:
        device_transport.stop()
        server_transport.stop()


class Gate:
    """Forwards requests to the real server until `allowed` runs out, then drops them."""

    def __init__(self, server: ChunkServer, allowed: int) -> None:
        self.server = server
        self.allowed = allowed

    def __call__(self, topic: str, payload: bytes) -> None:
        if self.allowed > 0:
            self.allowed -= 1
            self.server.handle(topic, payload)


class MemoryResponder:
    """Answers every request from `content` in memory: the server side at its cheapest."""

    def __init__(self, link: Link, content: bytes) -> None:
        self.link = link
        self.content = content

    def __call__(self, _topic: str, payload: bytes) -> None:
        request = decode_request(payload)
        data = self.content[request.offset : request.offset + request.length]
        self.link.answer(FetchAnswer(request.id, request.offset, len(self.content), "ok", data))


def _claimed_chunks_match(work: Path, sha256: str, content: bytes) -> int:
    """Check every chunk the bitmap claims against `content`; return how many it claims."""
    if not (work / f"{sha256}.bitmap").exists():
        return 0  # killed before the first flush: nothing is claimed
    bitmap = (work / f"{sha256}.bitmap").read_bytes()[16:]
    part = (work / f"{sha256}.part").read_bytes()
    assert len(part) == len(content)
    claimed = [i for i in range(-(-len(content) // CHUNK_SIZE)) if bitmap[i >> 3] >> (i & 7) & 1]
    for i in claimed:
        span = slice(i * CHUNK_SIZE, (i + 1) * CHUNK_SIZE)
        assert part[span] == content[span], f"bitmap claims chunk {i} but it is not on disk"
    return len(claimed)


def _raw_pubsub_mb_s(link: Link, total: int) -> float:
    """MB/s of publishing `total` bytes in 64 KiB QoS 0 messages server -> device."""
    topic = topics.PREFIX + "bench/raw"
    done = threading.Event()
    got = [0]

    def on_message(_topic: str, payload: bytes) -> None:
        got[0] += len(payload)
        if got[0] >= total:
            done.set()

    link.device_transport.subscribe(topic, on_message, qos=0)
    time.sleep(0.2)  # the SUBSCRIBE reaches the broker
    payload = os.urandom(CHUNK_SIZE)
    started = time.monotonic()
    for _ in range(total // CHUNK_SIZE):
        assert link.server_transport.publish(topic, payload, qos=0)
    assert done.wait(30), f"raw pub/sub got {got[0]} of {total} bytes"
    return total / (time.monotonic() - started) / 1e6


def test_complete_download_is_fast_and_verified(link: Link) -> None:
    content = os.urandom(32 * 1024 * 1024 + 12345)
    sha256 = link.publish(content)
    calls: list[tuple[int, int]] = []
    downloader = link.downloader()
    started = time.monotonic()
    path = downloader.download(TARGET, len(content), sha256, lambda r, t: calls.append((r, t)))
    elapsed = time.monotonic() - started
    assert path == link.work / f"{sha256}.tar"
    assert path.read_bytes() == content
    assert sorted(p.name for p in link.work.iterdir()) == [path.name]
    chunks = -(-len(content) // CHUNK_SIZE)
    assert downloader.stats.bytes_received == len(content)
    assert downloader.stats.chunks_received == chunks
    # Throttled progress, monotonic, ending at the full length.
    assert calls[-1] == (len(content), len(content))
    assert len(calls) < chunks / 8
    assert [r for r, _ in calls] == sorted(r for r, _ in calls)

    # The same bytes from a responder that serves from memory (no per-request path checks),
    # and as a one-way stream of raw publishes: what the broker and paho allow on this box.
    lean = link.downloader()
    link.respond_with(MemoryResponder(link, content))
    lean.discard(sha256)
    started = time.monotonic()
    lean.download(TARGET, len(content), sha256)
    lean_elapsed = time.monotonic() - started
    link.respond_with(link.server.handle)
    download_mb_s = len(content) / elapsed / 1e6
    lean_mb_s = len(content) / lean_elapsed / 1e6
    raw_mb_s = _raw_pubsub_mb_s(link, len(content) // CHUNK_SIZE * CHUNK_SIZE)
    print(
        f"\nbundle download of {len(content) / 1e6:.1f} MB: ChunkServer {download_mb_s:.0f} MB/s "
        f"({elapsed:.2f} s, {downloader.stats.bitmap_flushes} bitmap flushes); "
        f"memory responder {lean_mb_s:.0f} MB/s; raw MQTT pub/sub {raw_mb_s:.0f} MB/s; "
        f"ratios {download_mb_s / raw_mb_s:.2f} / {lean_mb_s / raw_mb_s:.2f}"
    )
    # Loose floors (a shared 2-core machine): the reported figures are well above them.
    assert download_mb_s > 15
    assert lean_mb_s > 0.1 * raw_mb_s

    # A complete, verified file is returned without a single request.
    again = link.downloader()
    assert again.download(TARGET, len(content), sha256) == path
    assert again.stats.requests_sent == 0
    assert again.partial_bytes(sha256) == len(content)
    # The metadata fetcher still shares the device's data topic.
    fetcher = MqttFetcher(link.device_transport, DEVICE)
    assert fetcher.download_bytes("mqtt:metadata/timestamp.json", 100) == b"{}"
    again.discard(sha256)
    assert list(link.work.iterdir()) == []


def test_cut_transfer_resumes_with_only_the_missing_chunks(link: Link) -> None:
    content = os.urandom(4 * 1024 * 1024 + 777)
    sha256 = link.publish(content)
    chunks = -(-len(content) // CHUNK_SIZE)
    link.respond_with(Gate(link.server, chunks // 2))
    first = link.downloader(request_timeout_s=0.2, retries=1)
    with pytest.raises(TransferError) as caught:
        first.download(TARGET, len(content), sha256)
    assert caught.value.reason == Reason.TRANSPORT
    assert _claimed_chunks_match(link.work, sha256, content) == chunks // 2
    assert first.partial_bytes(sha256) == chunks // 2 * CHUNK_SIZE

    link.respond_with(link.server.handle)
    second = link.downloader()
    assert second.download(TARGET, len(content), sha256).read_bytes() == content
    assert second.stats.resumed_bytes == chunks // 2 * CHUNK_SIZE
    assert second.stats.bytes_requested <= 0.55 * len(content)
    assert not (link.work / f"{sha256}.bitmap").exists()


def test_stalled_server_is_too_slow_then_resumes(link: Link) -> None:
    content = os.urandom(2 * 1024 * 1024)
    sha256 = link.publish(content)
    link.respond_with(Gate(link.server, 5))
    stalled = link.downloader(
        request_timeout_s=0.2, retries=100, min_bytes_per_s=1e9, min_deadline_s=1.0
    )
    started = time.monotonic()
    with pytest.raises(TransferError) as caught:
        stalled.download(TARGET, len(content), sha256)
    assert caught.value.reason == Reason.TOO_SLOW
    assert time.monotonic() - started < 2.0
    assert _claimed_chunks_match(link.work, sha256, content) == 5

    link.respond_with(link.server.handle)
    resumed = link.downloader()
    assert resumed.download(TARGET, len(content), sha256).read_bytes() == content
    assert resumed.stats.bytes_requested == len(content) - 5 * CHUNK_SIZE


def test_trickling_server_is_too_slow(link: Link) -> None:
    content = os.urandom(2 * 1024 * 1024)
    sha256 = link.publish(content)

    def trickle(topic: str, payload: bytes) -> None:
        time.sleep(0.03)  # about 2 MB/s, steadily: every request is answered in time
        link.server.handle(topic, payload)

    link.respond_with(trickle)
    downloader = link.downloader(min_bytes_per_s=8 * 1024 * 1024, min_deadline_s=0.5)
    started = time.monotonic()
    with pytest.raises(TransferError) as caught:
        downloader.download(TARGET, len(content), sha256)
    assert caught.value.reason == Reason.TOO_SLOW
    assert "resumable" in caught.value.message
    assert 0.5 <= time.monotonic() - started < 1.5
    assert 0 < downloader.stats.bytes_received < len(content)
    assert downloader.stats.retries == 0
    assert downloader.partial_bytes(sha256) == downloader.stats.bytes_received


@pytest.mark.parametrize("extra", [4 * CHUNK_SIZE, -CHUNK_SIZE - 1], ids=["longer", "shorter"])
def test_server_total_differs_from_signed_length(link: Link, extra: int) -> None:
    signed = os.urandom(1024 * 1024 + 5)
    served = os.urandom(len(signed) + extra)
    link.publish(served)  # a server streaming another length, as far as it is asked
    sha256 = hashlib.sha256(signed).hexdigest()
    downloader = link.downloader()
    with pytest.raises(TransferError) as caught:
        downloader.download(TARGET, len(signed), sha256)
    assert caught.value.reason == Reason.LENGTH_MISMATCH
    assert downloader.stats.bytes_received == 0
    assert all(p.stat().st_size <= len(signed) for p in link.work.iterdir())


def test_flipped_byte_is_a_hash_mismatch_and_leaves_nothing(link: Link) -> None:
    content = bytearray(os.urandom(1024 * 1024))
    sha256 = hashlib.sha256(content).hexdigest()
    content[len(content) // 3] ^= 0x01
    link.publish(bytes(content))
    with pytest.raises(TransferError) as caught:
        link.downloader().download(TARGET, len(content), sha256)
    assert caught.value.reason == Reason.HASH_MISMATCH
    assert list(link.work.iterdir()) == []


def test_not_found_is_a_transport_error(link: Link) -> None:
    with pytest.raises(TransferError) as caught:
        link.downloader().download("models/none.tar", 100, "0" * 64)
    assert caught.value.reason == Reason.TRANSPORT
    assert "does not have targets/models/none.tar" in caught.value.message


REPO = Path(__file__).resolve().parents[2]
CHILD = """
import sys
from pathlib import Path
from edge_agent.transport import MqttTransport
from edge_agent.update.download import BundleDownloader
host, port, work, target, length, sha256 = sys.argv[1:]
transport = MqttTransport(host=host, port=int(port), client_id="killed-downloader")
transport.start()
assert transport.wait_connected(5)
print("ready", flush=True)
BundleDownloader(transport, "dev-1", Path(work)).download(target, int(length), sha256)
"""


def test_kill_9_mid_transfer_then_resume_fetches_only_unclaimed_chunks(
    link: Link, mosquitto: MosquittoBroker
) -> None:
    content = os.urandom(24 * 1024 * 1024 + 3)
    sha256 = link.publish(content)
    bitmap = link.work / f"{sha256}.bitmap"

    def slow(topic: str, payload: bytes) -> None:
        time.sleep(0.002)  # about 30 MB/s, so that three runs do not finish the file
        link.server.handle(topic, payload)

    link.respond_with(slow)
    rng = random.Random(99)
    claimed = 0
    for _ in range(3):
        before = bitmap.read_bytes() if bitmap.exists() else b""
        args = [mosquitto.host, str(mosquitto.port), str(link.work), TARGET]
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, *args, str(len(content)), sha256],
            cwd=REPO,
            stdout=subprocess.PIPE,
        )
        assert child.stdout is not None
        assert child.stdout.readline() == b"ready\n"
        # Once the child has flushed its bitmap, kill it somewhere in the next few chunks.
        deadline = time.monotonic() + 10
        while (
            not bitmap.exists() or bitmap.read_bytes() == before
        ) and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.05))
        child.kill()
        assert child.wait() == -signal.SIGKILL
        child.stdout.close()
        now_claimed = _claimed_chunks_match(link.work, sha256, content)
        assert now_claimed > claimed
        claimed = now_claimed
    assert claimed < -(-len(content) // CHUNK_SIZE)

    link.respond_with(link.server.handle)
    resumed = link.downloader()
    assert resumed.download(TARGET, len(content), sha256).read_bytes() == content
    assert resumed.stats.resumed_bytes == claimed * CHUNK_SIZE
    assert resumed.stats.bytes_requested == len(content) - claimed * CHUNK_SIZE


class Scrambler:
    """Answers every request twice, shuffled with others, plus strays and wrong sizes."""

    def __init__(self, link: Link, content: bytes) -> None:
        self.link = link
        self.content = content
        self.queued: list[FetchAnswer] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.random = random.Random(7)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def __call__(self, _topic: str, payload: bytes) -> None:
        try:
            request = decode_request(payload)
        except WireError:
            return
        total = len(self.content)
        chunk = self.content[request.offset : request.offset + request.length]
        answer = FetchAnswer(request.id, request.offset, total, "ok", chunk)
        wrong_size = FetchAnswer(request.id, request.offset, total, "ok", chunk[:-1])
        stray = FetchAnswer("abcdef", request.offset, total, "ok", chunk)
        with self.lock:
            self.queued += [answer, answer, wrong_size, stray]

    def _run(self) -> None:
        while not self.stop.wait(0.005):
            with self.lock:
                batch, self.queued = self.queued, []
            self.random.shuffle(batch)
            for answer in batch:
                self.link.answer(answer)


def test_duplicated_and_reordered_answers_are_harmless(link: Link) -> None:
    content = os.urandom(3 * 1024 * 1024 + 99)
    sha256 = hashlib.sha256(content).hexdigest()
    scrambler = Scrambler(link, content)
    link.respond_with(scrambler)
    router = AnswerRouter.shared(link.device_transport, DEVICE)
    ignored_before = router.ignored
    chunks = -(-len(content) // CHUNK_SIZE)
    try:
        downloader = link.downloader(request_timeout_s=2.0)
        assert downloader.download(TARGET, len(content), sha256).read_bytes() == content
        # Per chunk a duplicate, a short copy and a stray: refused by the downloader, or by
        # the router once the chunk's id is answered (the last ones arrive after the end).
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            ignored = downloader.stats.ignored_answers + router.ignored - ignored_before
            if ignored >= 3 * chunks:
                break
            time.sleep(0.01)
    finally:
        scrambler.stop.set()
        scrambler.thread.join()
    assert downloader.stats.bytes_received == len(content)
    # QoS 0 on a loaded machine may lose the odd junk answer, and a retried chunk adds
    # some: what matters is that the junk reached the device and none of it was taken.
    assert ignored >= 2 * chunks
    assert downloader.stats.ignored_answers > 0


def _small_tmpfs(where: Path) -> contextlib.AbstractContextManager[Path]:
    return small_tmpfs(where, "1m")


@contextlib.contextmanager
def _file_size_limit(where: Path) -> Iterator[Path]:
    # Without root: RLIMIT_FSIZE makes fallocate fail with EFBIG, which is also DISK_FULL.
    where.mkdir()
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024 * 1024, old_limit[1]))
    try:
        yield where
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)


@pytest.mark.parametrize("limit", [_small_tmpfs, _file_size_limit], ids=["tmpfs", "rlimit"])
def test_full_disk_fails_early_and_leaves_nothing(
    link: Link, tmp_path: Path, limit: Callable[[Path], contextlib.AbstractContextManager[Path]]
) -> None:
    content = os.urandom(2 * 1024 * 1024)
    sha256 = link.publish(content)
    with limit(tmp_path / "small") as work:
        downloader = BundleDownloader(link.device_transport, DEVICE, work)
        with pytest.raises(TransferError) as caught:
            downloader.download(TARGET, len(content), sha256)
        assert caught.value.reason == Reason.DISK_FULL
        assert downloader.stats.requests_sent == 0
        assert list(work.iterdir()) == []
