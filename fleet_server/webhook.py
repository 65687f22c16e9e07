"""POSTs alert events to a configured webhook (for instance, a retraining trigger).

Body (JSON)::

    {"event": "alert.opened" | "alert.resolved", "alert": {id, scope, scope_key,
     feature, direction, test, effect, statistic, threshold, p_value,
     since: {seq, t}, devices, opened_at, resolved_at, superseded_by, evidence}}

with the header ``X-Edgefleet-Delivery: <alert id>:<event>`` (the same on every retry,
so a receiver can drop repeats). Deliveries run on their own thread from a bounded
queue: a slow or dead webhook never holds up ingest. Each event is tried ``attempts``
times with exponential back-off; the outcome (``delivered`` or ``failed``, attempts,
last error) is written to the alert's row. Events still ``pending`` when the server
stops are sent again at the next start (``resend_pending``).
"""

from __future__ import annotations

import http.client
import json
import logging
import queue
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from datetime import datetime, timezone

from fleet_server.storage import AlertStore, StorageError

DEFAULT_TIMEOUT_S = 5.0
DEFAULT_ATTEMPTS = 4
DEFAULT_BACKOFF_S = 1.0
MAX_BACKOFF_S = 60.0
QUEUE_SIZE = 10_000


class DeliveryError(Exception):
    """One POST failed; the message names the URL and the reason."""


def check_webhook_url(url: str) -> str:
    """``url`` unchanged if it is an http(s) URL with a host.

    Raises:
        ValueError: naming the URL.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"webhook URL must be http:// or https:// with a host, got {url!r}")
    return url


def post_json(url: str, body: bytes, headers: dict[str, str], timeout_s: float) -> int:
    """POST ``body`` and return the HTTP status (2xx).

    Raises:
        DeliveryError: connection failure, timeout, or a non-2xx status.
    """
    request = urllib.request.Request(
        url,
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", "User-Agent": "edgefleet", **headers},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            status = int(response.status)
            response.read(64 * 1024)
    except urllib.error.HTTPError as e:
        raise DeliveryError(f"POST {url}: HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        raise DeliveryError(f"POST {url}: {e}") from e
    if not 200 <= status < 300:
        raise DeliveryError(f"POST {url}: HTTP {status}")
    return status


class WebhookSender:
    """Sends alert events to ``url`` from a background thread.

    Args:
        url: the webhook (checked with ``check_webhook_url``).
        alerts: where alerts are read and delivery outcomes written.
        timeout_s: per attempt.
        attempts: tries per event before it is marked failed.
        backoff_s: wait before the second try; doubled each time, at most MAX_BACKOFF_S.
        post: the POST function (tests may pass their own).

    Raises:
        ValueError: a bad URL, or attempts < 1, timeout_s or backoff_s <= 0.
    """

    def __init__(
        self,
        url: str,
        alerts: AlertStore,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        attempts: int = DEFAULT_ATTEMPTS,
        backoff_s: float = DEFAULT_BACKOFF_S,
        post: Callable[[str, bytes, dict[str, str], float], int] = post_json,
        clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
        logger: logging.Logger | None = None,
    ) -> None:
        if attempts < 1 or timeout_s <= 0 or backoff_s <= 0:
            raise ValueError("webhook attempts must be >= 1, timeout and back-off > 0")
        self.url = check_webhook_url(url)
        self._alerts = alerts
        self._timeout_s = timeout_s
        self._attempts = attempts
        self._backoff_s = backoff_s
        self._post = post
        self._clock = clock
        self._logger = logger if logger is not None else logging.getLogger(__name__)
        self._queue: queue.Queue[int] = queue.Queue(QUEUE_SIZE)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="webhook", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop after the current attempt; events not delivered stay ``pending``."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def enqueue(self, alert_id: int) -> None:
        """Send the alert's last event soon. Never blocks: with the queue full the event
        stays ``pending`` in the database (sent at the next start) and a warning is
        logged."""
        try:
            self._queue.put_nowait(alert_id)
        except queue.Full:
            self._logger.warning("webhook queue full: alert %d stays pending", alert_id)

    def notify(self, alert_ids: list[int]) -> None:
        """``enqueue`` each alert (the drift monitor's ``notify`` callback)."""
        for alert_id in alert_ids:
            self.enqueue(alert_id)

    def resend_pending(self) -> int:
        """Queue every alert whose last event is still pending; returns how many."""
        pending = self._alerts.pending_webhooks()
        for alert_id in pending:
            self.enqueue(alert_id)
        return len(pending)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                alert_id = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self._deliver(alert_id)
            except (StorageError, KeyError) as e:
                self._logger.error("webhook for alert %d: %s", alert_id, e)

    def _deliver(self, alert_id: int) -> None:
        record = self._alerts.get(alert_id)
        event = record.webhook_event or "alert.opened"
        body = json.dumps(
            {"event": event, "alert": record.document()}, separators=(",", ":"), allow_nan=False
        ).encode()
        headers = {"X-Edgefleet-Delivery": f"{alert_id}:{event}"}
        wait = self._backoff_s
        error = ""
        for attempt in range(1, self._attempts + 1):
            try:
                status = self._post(self.url, body, headers, self._timeout_s)
            except DeliveryError as e:
                error = str(e)
                self._logger.warning(
                    "webhook %s of alert %d, attempt %d/%d: %s",
                    event,
                    alert_id,
                    attempt,
                    self._attempts,
                    error,
                )
                if attempt == self._attempts or self._stop.wait(wait):
                    break
                wait = min(wait * 2.0, MAX_BACKOFF_S)
                continue
            self._alerts.record_delivery(alert_id, "delivered", attempt, None, self._clock())
            self._logger.info("webhook %s of alert %d: HTTP %d", event, alert_id, status)
            return
        if self._stop.is_set() and attempt < self._attempts:
            return  # stopping: stays pending, sent again at the next start
        self._alerts.record_delivery(alert_id, "failed", attempt, error, self._clock())
        self._logger.error("webhook %s of alert %d failed: %s", event, alert_id, error)
