"""A python-tuf fetcher whose transport is MQTT: files come in 64 KiB chunks on request.

URLs are ``mqtt:metadata/<name>.json`` and ``mqtt:targets/<path>`` (build the Updater with
``metadata_base_url="mqtt:metadata/"`` and ``target_base_url="mqtt:targets/"``). Each chunk
is asked for on ``topics.fetch(device_id)`` with a fresh correlation id and answered on
``topics.data(device_id)``; see `edge_agent.protocol.fetch_wire`.

The length cap is not enforced here: ``FetcherInterface.download_file`` counts the bytes
this generator yields and stops at the signed length. This fetcher bounds time instead:
per-chunk timeouts with retries, and a minimum-throughput deadline for the whole file.

Answers are matched to requests by the `AnswerRouter` shared by every fetcher and
`BundleDownloader` of the same ``(transport, device_id)``, so several may coexist.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Iterator
from urllib.parse import unquote

from tuf.api.exceptions import DownloadError, DownloadHTTPError
from tuf.ngclient.fetcher import FetcherInterface

from edge_agent.protocol import topics
from edge_agent.protocol.fetch_wire import (
    CHUNK_SIZE,
    FetchAnswer,
    FetchRequest,
    WireError,
    validate_path,
)
from edge_agent.transport import MqttTransport
from edge_agent.update.requests import AnswerRouter, new_request_id

URL_SCHEME = "mqtt:"


class MqttFetcher(FetcherInterface):
    """Fetch files chunk by chunk from the fleet server over one MQTT transport.

    Args:
        transport: a started transport (it may still be connecting).
        device_id: whose ``fetch``/``data`` topics to use.
        request_timeout_s: how long to wait for one chunk's answer.
        retries: further attempts per chunk after a timeout.
        min_bytes_per_s, min_deadline_s: the whole file must arrive within
            ``max(min_deadline_s, total / min_bytes_per_s)`` seconds.
        logger: where timeouts and offline requests are logged (debug).

    Raises (from ``fetch`` and the iterator it returns):
        DownloadHTTPError: status 404 when the server does not have the file.
        DownloadError: bad URL, server refusal, timeouts, a too-slow or inconsistent file.
    """

    def __init__(
        self,
        transport: MqttTransport,
        device_id: str,
        *,
        request_timeout_s: float = 5.0,
        retries: int = 3,
        min_bytes_per_s: float = 64 * 1024,
        min_deadline_s: float = 10.0,
        logger: logging.Logger | None = None,
    ) -> None:
        if request_timeout_s <= 0 or retries < 0 or min_bytes_per_s <= 0 or min_deadline_s <= 0:
            raise ValueError("timeouts and throughput must be positive, retries >= 0")
        self._router = AnswerRouter.shared(transport, topics.validate_device_id(device_id))
        self._request_timeout_s = request_timeout_s
        self._retries = retries
        self._min_bytes_per_s = min_bytes_per_s
        self._min_deadline_s = min_deadline_s
        self._logger = logger if logger is not None else logging.getLogger(__name__)

    def _fetch(self, url: str) -> Iterator[bytes]:
        # Checked before the generator starts: fetch() wraps only what _fetch raises
        # directly, and the generator's own errors must already be DownloadErrors.
        path = _path_of(url)
        return self._chunks(url, path)

    def _chunks(self, url: str, path: str) -> Iterator[bytes]:
        started = time.monotonic()
        deadline = started + self._min_deadline_s
        offset = 0
        total: int | None = None
        while total is None or offset < total:
            answer = self._request(url, path, offset, deadline)
            if answer.status == "not_found":
                raise DownloadHTTPError(f"not found: {url}", 404)
            if answer.status != "ok":
                raise DownloadError(f"server refused the request for {url}: {answer.status}")
            if total is None:
                total = answer.total
                budget = max(self._min_deadline_s, total / self._min_bytes_per_s)
                deadline = started + budget
            elif answer.total != total:
                raise DownloadError(f"{url} changed size during the download")
            if answer.offset != offset:
                raise DownloadError(f"{url}: answer for offset {answer.offset}, asked {offset}")
            expected = min(CHUNK_SIZE, total - offset)
            if len(answer.data) != expected:
                raise DownloadError(
                    f"{url}: chunk at {offset} has {len(answer.data)} bytes, expected {expected}"
                )
            offset += expected
            yield answer.data

    def _request(self, url: str, path: str, offset: int, deadline: float) -> FetchAnswer:
        """Ask for one chunk, retrying on timeout; a fresh correlation id per attempt."""
        for attempt in range(1 + self._retries):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DownloadError(f"{url}: too slow, deadline passed at offset {offset}")
            request_id = new_request_id()
            inbox: queue.SimpleQueue[FetchAnswer] = queue.SimpleQueue()
            self._router.register(request_id, inbox.put)
            try:
                if not self._router.send(FetchRequest(request_id, path, offset, CHUNK_SIZE)):
                    self._logger.debug("fetch request for %s not queued (offline)", url)
                try:
                    return inbox.get(timeout=min(self._request_timeout_s, remaining))
                except queue.Empty:
                    self._logger.debug(
                        "no answer for %s at %d (attempt %d)", url, offset, attempt + 1
                    )
            finally:
                self._router.unregister(request_id)
        raise DownloadError(
            f"{url}: no answer at offset {offset} after {1 + self._retries} attempts"
        )


def _path_of(url: str) -> str:
    if not url.startswith(URL_SCHEME):
        raise DownloadError(f"not an {URL_SCHEME} URL: {url!r}")
    try:
        return validate_path(unquote(url[len(URL_SCHEME) :]))
    except WireError as e:
        raise DownloadError(f"refusing URL {url!r}: {e}") from e
