"""Answers devices' fetch requests with chunks of published metadata and target files.

Requests arrive on ``devices/+/fetch`` and are answered on the requesting device's
``data`` topic (the device id comes from the topic, which the broker ACL ties to the
client certificate). Paths are resolved strictly inside ``metadata_dir`` / ``targets_dir``:
no ``..``, and no symlink anywhere below those directories is followed.

Whole files are kept in an LRU cache keyed by ``(path, device, inode, mtime_ns, size)``, so
a bundle that many devices fetch is read from disk once; a replaced file gets a new key.
The inode matters: metadata is replaced atomically (a new inode each time), and a
re-signed ``timestamp.json`` usually has the same size as the old one and, within the
filesystem's timestamp granularity, the same mtime.

The symlink check resolves every component of the path (several ``lstat`` calls), which
cost more than the rest of a cached chunk. So the identity ``(device, inode, mtime_ns,
size)`` of each file that passed it is remembered per path, and a later request whose one
``lstat`` of the path still shows a regular file with that identity is served from the
cache without resolving again: whatever the path goes through now, it reaches the very
file that was checked, unchanged.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from collections import Counter, OrderedDict
from pathlib import Path

from edge_agent.protocol import topics
from edge_agent.protocol.fetch_wire import (
    FetchAnswer,
    FetchRequest,
    Status,
    WireError,
    decode_request,
    encode_answer,
)
from edge_agent.transport import MqttTransport

DEFAULT_CACHE_BYTES = 64 * 1024 * 1024
VERIFIED_PATHS = 1024  # paths whose checked identity is remembered (LRU)

_CacheKey = tuple[str, int, int, int, int]
_Identity = tuple[int, int, int, int]  # st_dev, st_ino, st_mtime_ns, st_size


class ChunkServer:
    """Serves byte ranges of published files to devices over MQTT.

    Args:
        transport: the server's transport; the constructor subscribes on it.
        metadata_dir: served as ``metadata/<name>.json``.
        targets_dir: served as ``targets/<path>``.
        cache_bytes: budget of the whole-file cache; larger files are read per range.
        logger: where refused requests are logged.

    Requests are handled on the transport's network thread: a cache hit is a slice, a miss
    one file read.
    """

    def __init__(
        self,
        transport: MqttTransport,
        metadata_dir: Path,
        targets_dir: Path,
        logger: logging.Logger | None = None,
        *,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        self._transport = transport
        self._roots = {"metadata": metadata_dir.resolve(), "targets": targets_dir.resolve()}
        self._root_names = {name: str(root) for name, root in self._roots.items()}
        self._verified: OrderedDict[str, _Identity] = OrderedDict()
        self._logger = logger if logger is not None else logging.getLogger(__name__)
        self._cache_bytes = cache_bytes
        self._cache: OrderedDict[_CacheKey, bytes] = OrderedDict()
        self._cached_bytes = 0
        self._lock = threading.Lock()
        self.reads_from_disk = 0
        self.requests_served = 0
        # Bytes read from the store, by the directory of the served path ("metadata",
        # "targets/models", "targets/assignments"): a bench divides the models share by
        # the bundle size to see how often a bundle was read.
        self.bytes_read: Counter[str] = Counter()
        # Last: requests may be handled as soon as the filter is known.
        # QoS 0: the device retries a chunk itself; see edge_agent.update.mqtt_fetcher.
        transport.subscribe(topics.device_filter("fetch"), self.handle, qos=0)

    def handle(self, topic: str, payload: bytes) -> None:
        """Answer one request (the transport handler); bad requests never raise."""
        parsed = topics.parse(topic)
        if parsed is None or parsed[1] != "fetch":
            self._logger.debug("ignoring message on %r", topic)
            return
        device_id = parsed[0]
        try:
            request = decode_request(payload)
        except WireError as e:
            self._logger.info("bad fetch request from %s: %s", device_id, e)
            if e.request_id is not None:
                self._answer(device_id, FetchAnswer(e.request_id, 0, 0, "bad_request"))
            return
        self._answer(device_id, self._serve(request))

    def _serve(self, request: FetchRequest) -> FetchAnswer:
        def fail(status: Status) -> FetchAnswer:
            return FetchAnswer(request.id, request.offset, 0, status)

        try:
            content = self._read(request.path, request.offset, request.length)
        except FileNotFoundError:
            return fail("not_found")
        except OSError as e:
            self._logger.warning("cannot serve %s: %s", request.path, e)
            return fail("not_found")
        if content is None:
            return fail("bad_request")
        total, data = content
        if request.offset > total:
            return fail("bad_request")
        return FetchAnswer(request.id, request.offset, total, "ok", data)

    def _read(self, path: str, offset: int, length: int) -> tuple[int, bytes] | None:
        """``(file size, bytes)`` of the range, or None for a path outside the roots.

        Raises:
            FileNotFoundError: no such regular file (also for symlinks and directories).
            OSError: it cannot be read.
        """
        root_name, _, relative = path.partition("/")
        root = self._roots.get(root_name)
        if root is None:
            return None
        cached = self._read_verified(path, os.path.join(self._root_names[root_name], relative))
        if cached is not None:
            total, whole = cached
            return total, whole[offset : offset + length]
        candidate = root / relative
        # The wire already refused ".." and absolute paths; a resolved path that differs
        # from the plain join means a symlink somewhere below the root.
        if candidate.resolve(strict=True) != candidate:
            raise FileNotFoundError(f"{path} is reached through a symlink")
        fd = os.open(candidate, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise FileNotFoundError(f"{path} is not a regular file")
            size = info.st_size
            self._remember(path, (info.st_dev, info.st_ino, info.st_mtime_ns, size))
            if size > self._cache_bytes:
                chunk = os.pread(fd, min(length, max(size - offset, 0)), offset)
                with self._lock:
                    self.reads_from_disk += 1
                    self.bytes_read[_directory(path)] += len(chunk)
                return size, chunk
            key = (path, info.st_dev, info.st_ino, info.st_mtime_ns, size)
            with self._lock:
                data = self._cache.get(key)
                if data is not None:
                    self._cache.move_to_end(key)
            if data is None:
                data = _read_exactly(fd, size)
                with self._lock:
                    self.bytes_read[_directory(path)] += len(data)
                self._store(key, data)
        finally:
            os.close(fd)
        return size, data[offset : offset + length]

    def _read_verified(self, path: str, candidate: str) -> tuple[int, bytes] | None:
        """``(size, whole file)`` from the cache if `candidate` is still the file that passed
        the symlink check for `path`; None when it must be opened and checked again.

        Raises:
            FileNotFoundError: no such file.
        """
        info = os.lstat(candidate)
        if not stat.S_ISREG(info.st_mode):  # a symlink or a directory: the full check refuses
            return None
        identity = (info.st_dev, info.st_ino, info.st_mtime_ns, info.st_size)
        with self._lock:
            if self._verified.get(path) != identity:
                return None
            data = self._cache.get((path, *identity))
            if data is None:
                return None
            self._cache.move_to_end((path, *identity))
        return info.st_size, data

    def _remember(self, path: str, identity: _Identity) -> None:
        with self._lock:
            self._verified[path] = identity
            self._verified.move_to_end(path)
            while len(self._verified) > VERIFIED_PATHS:
                self._verified.popitem(last=False)

    def _store(self, key: _CacheKey, data: bytes) -> None:
        with self._lock:
            self.reads_from_disk += 1
            if key in self._cache:
                return
            self._cache[key] = data
            self._cached_bytes += len(data)
            while self._cached_bytes > self._cache_bytes:
                _, evicted = self._cache.popitem(last=False)
                self._cached_bytes -= len(evicted)

    def _answer(self, device_id: str, answer: FetchAnswer) -> None:
        with self._lock:
            self.requests_served += 1
        if not self._transport.publish(topics.data(device_id), encode_answer(answer), qos=0):
            self._logger.debug("answer to %s not queued (offline)", device_id)


def _directory(path: str) -> str:
    """The directory part of a served path: ``targets/models/a.tar`` -> ``targets/models``."""
    return path.rpartition("/")[0]


def _read_exactly(fd: int, size: int) -> bytes:
    """The first `size` bytes of `fd` (a file that grew since fstat is cut at `size`)."""
    parts: list[bytes] = []
    received = 0
    while received < size:
        part = os.pread(fd, min(size - received, 1 << 20), received)
        if not part:
            raise OSError(f"file shrank while reading: {received} of {size} bytes")
        parts.append(part)
        received += len(part)
    return b"".join(parts)
