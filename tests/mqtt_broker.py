"""A real Mosquitto broker on a free loopback port, for integration tests.

Use the class directly, or the `mosquitto_broker` fixture (fixture name ``mosquitto``)
imported explicitly into a test module::

    from tests.mqtt_broker import MosquittoBroker, mosquitto_broker  # noqa: F401
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import pytest

from edge_agent.transport import MqttTransport

MOSQUITTO = "/usr/sbin/mosquitto"


def free_port(host: str = "127.0.0.1") -> int:
    """A port that nothing listened on a moment ago (the OS picks it for a bind to 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class MosquittoBroker:
    """Runs ``mosquitto -c <generated conf>``: anonymous, no persistence, loopback only.

    Args:
        start_timeout_s: how long `start` waits for the port to accept connections.

    Raises (from `start`/`restart`):
        RuntimeError: mosquitto is not installed, exited, or did not listen in time; the
            message includes its log.
    """

    def __init__(self, *, start_timeout_s: float = 10.0) -> None:
        self.host = "127.0.0.1"
        self.port = free_port(self.host)
        self._start_timeout_s = start_timeout_s
        self._dir = Path(tempfile.mkdtemp(prefix="mosquitto-"))
        self._conf = self._dir / "mosquitto.conf"
        self._log = self._dir / "mosquitto.log"
        self._proc: subprocess.Popen[bytes] | None = None
        lines = [
            f"listener {self.port} {self.host}",
            "allow_anonymous true",
            "persistence false",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            # As root, mosquitto 2 drops to the "mosquitto" user; stay who we are.
            f"user {pwd.getpwuid(os.geteuid()).pw_name}",
        ]
        self._conf.write_text("\n".join(lines) + "\n", encoding="utf-8")

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_text(self) -> str:
        """What mosquitto wrote to stderr so far."""
        try:
            return self._log.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def start(self) -> None:
        if self.running:
            raise RuntimeError("mosquitto is already running")
        if not Path(MOSQUITTO).exists():
            raise RuntimeError(f"{MOSQUITTO} not found: apt-get install mosquitto")
        with self._log.open("ab") as log:
            # Own process group, so that stop() can end it and anything it started.
            self._proc = subprocess.Popen(
                [MOSQUITTO, "-c", str(self._conf)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        self._wait_listening()

    def _wait_listening(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self._start_timeout_s
        while True:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                raise RuntimeError(
                    f"mosquitto exited with status {code} before listening on "
                    f"{self.host}:{self.port}; its log:\n{self.log_text()}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"mosquitto did not listen on {self.host}:{self.port} within "
                    f"{self._start_timeout_s} s; its log:\n{self.log_text()}"
                )
            time.sleep(0.01)

    def stop(self) -> None:
        """Terminate the broker (SIGTERM, then SIGKILL after 5 s). Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def restart(self) -> None:
        """Stop if running, then start again on the same port (retained messages are lost)."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the broker and remove its directory."""
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> MosquittoBroker:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def connect(broker: MosquittoBroker, client_id: str) -> MqttTransport:
    """A started transport to ``broker``, connected (or the test fails)."""
    transport = MqttTransport(host=broker.host, port=broker.port, client_id=client_id)
    transport.start()
    assert transport.wait_connected(5), f"{client_id} cannot connect to the broker"
    return transport


@pytest.fixture(name="mosquitto")
def mosquitto_broker() -> Iterator[MosquittoBroker]:
    """A fresh broker for one test."""
    with MosquittoBroker() as broker:
        yield broker
