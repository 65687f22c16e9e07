"""Webhook delivery (fleet_server.webhook): retries, back-off, stored outcome."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from fleet_server.domain.alerts import OpenAlert
from fleet_server.domain.fleet_drift import AlertKey, DeviceFinding, Drift
from fleet_server.storage import AlertStore, open_database
from fleet_server.webhook import DeliveryError, WebhookSender, check_webhook_url, post_json
from tests.fleet_simulator import wait_for
from tests.mqtt_broker import free_port

URL = "http://127.0.0.1:9/retrain"
NOW = datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc)


def _alert(tmp_path: Path) -> tuple[AlertStore, int]:
    alerts = AlertStore(open_database(str(tmp_path / "fleet.db")))
    finding = DeviceFinding("brightness", "cusum", "down", 8.0, 5.0, -3.0, None, True, 4, 1000)
    drift = Drift(AlertKey("device", "cam-3", "brightness", "down"), ("cam-3",), 1,
                  (("cam-3", (finding,)),))  # fmt: skip
    (alert_id,), _ = alerts.apply([OpenAlert(drift)], lambda d: {"k": 1}, NOW, webhook=True)
    return alerts, alert_id


class _Flaky:
    """A webhook that fails ``failures`` times, then accepts."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: list[tuple[str, dict[str, object], dict[str, str], float]] = []

    def __call__(self, url: str, body: bytes, headers: dict[str, str], timeout_s: float) -> int:
        self.calls.append((url, json.loads(body), headers, timeout_s))
        if len(self.calls) <= self.failures:
            raise DeliveryError(f"POST {url}: HTTP 503 Service Unavailable")
        return 200


def test_a_failing_webhook_is_retried_with_back_off_until_it_accepts(tmp_path: Path) -> None:
    alerts, alert_id = _alert(tmp_path)
    post = _Flaky(failures=2)
    sender = WebhookSender(URL, alerts, attempts=4, backoff_s=0.05, timeout_s=1.5, post=post)
    sender.start()
    try:
        sender.notify([alert_id])
        assert wait_for(lambda: alerts.get(alert_id).webhook_status == "delivered", 5)
    finally:
        sender.stop()
    record = alerts.get(alert_id)
    assert record.webhook_attempts == 3 and record.webhook_error is None
    url, body, headers, timeout_s = post.calls[-1]
    assert (url, timeout_s) == (URL, 1.5)
    assert headers == {"X-Edgefleet-Delivery": f"{alert_id}:alert.opened"}
    assert body["event"] == "alert.opened"
    assert body["alert"] == json.loads(json.dumps(record.document()))


def test_a_dead_webhook_is_marked_failed_and_never_blocks_the_caller(tmp_path: Path) -> None:
    alerts, alert_id = _alert(tmp_path)
    url = f"http://127.0.0.1:{free_port()}/retrain"  # nothing listens there
    sender = WebhookSender(url, alerts, attempts=2, backoff_s=0.05, timeout_s=1.0)
    sender.start()
    try:
        started = time.monotonic()
        sender.enqueue(alert_id)
        assert time.monotonic() - started < 0.1
        assert wait_for(lambda: alerts.get(alert_id).webhook_status == "failed", 10)
    finally:
        sender.stop()
    record = alerts.get(alert_id)
    assert record.webhook_attempts == 2
    assert record.webhook_error is not None and url in record.webhook_error


def test_pending_events_are_sent_again_after_a_restart(tmp_path: Path) -> None:
    alerts, alert_id = _alert(tmp_path)
    sender = WebhookSender(URL, alerts, post=_Flaky(failures=0))
    assert sender.resend_pending() == 1
    sender.start()
    try:
        assert wait_for(lambda: alerts.get(alert_id).webhook_status == "delivered", 5)
    finally:
        sender.stop()
    assert alerts.pending_webhooks() == []


@pytest.mark.parametrize("url", ["ftp://host/x", "http:///nohost", "retrain", ""])
def test_webhook_urls_are_checked(url: str) -> None:
    with pytest.raises(ValueError, match="webhook URL must be http"):
        check_webhook_url(url)


def test_post_json_names_the_url_when_it_fails() -> None:
    url = f"http://127.0.0.1:{free_port()}/hook"
    with pytest.raises(DeliveryError, match=f"POST {url}"):
        post_json(url, b"{}", {}, 1.0)
