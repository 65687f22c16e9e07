"""The demo's MQTT broker: Mosquitto when it is installed, else the embedded amqtt broker.

Both listen on loopback only, anonymous, without persistence: a broker for one machine's
demo, never for a plant (see scripts/mosquitto/ for a real configuration).
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Protocol

_START_TIMEOUT_S = 10.0


class DemoBroker(Protocol):
    host: str
    port: int
    kind: str

    def stop(self) -> None: ...


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def start_broker(workdir: Path, *, prefer_embedded: bool = False) -> DemoBroker:
    """Start a loopback broker on a free port.

    Raises:
        RuntimeError: neither broker could start (the message says why).
    """
    mosquitto = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )
    if mosquitto is not None and not prefer_embedded:
        return _Mosquitto(mosquitto, workdir)
    return _Embedded()


class _Mosquitto:
    kind = "mosquitto"

    def __init__(self, binary: str, workdir: Path) -> None:
        self.host = "127.0.0.1"
        self.port = free_port(self.host)
        conf = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"
        conf.write_text(
            "\n".join(
                [
                    f"listener {self.port} {self.host}",
                    "allow_anonymous true",
                    "persistence false",
                    "log_dest stderr",
                    "log_type error",
                    "log_type warning",
                    # As root, mosquitto 2 drops to the "mosquitto" user; stay who we are.
                    f"user {pwd.getpwuid(os.geteuid()).pw_name}",
                ]
            )
            + "\n",
            encoding="utf-8",
        )
        with self.log.open("ab") as log:
            self._proc = subprocess.Popen(
                [binary, "-c", str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # Ctrl-C reaches the demo, which stops it in order
            )
        _wait_listening(self.host, self.port, lambda: self._proc.poll() is None, self.log)

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()


class _Embedded:
    kind = "amqtt (embedded)"

    def __init__(self) -> None:
        try:
            from amqtt.broker import Broker
        except ImportError as e:
            raise RuntimeError(
                "no MQTT broker: install Mosquitto (apt-get install mosquitto) or the "
                "'demo' extra (pip install 'edgefleet[demo]')"
            ) from e
        self.host = "127.0.0.1"
        self.port = free_port(self.host)
        config: dict[str, Any] = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "sys_interval": 0,
            "auth": {"allow-anonymous": True, "plugins": ["auth_anonymous"]},
            "topic-check": {"enabled": False},
        }
        self._loop = asyncio.new_event_loop()
        self._broker = Broker(config, loop=self._loop)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="amqtt", daemon=True)
        self._thread.start()
        _wait_listening(self.host, self.port, self._thread.is_alive, None)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._broker.start())
        except Exception as e:  # noqa: BLE001 - reported by _wait_listening's caller
            self._error = e
            return
        self._loop.run_forever()

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        future = asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop)
        try:
            future.result(10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)


def _wait_listening(host: str, port: int, alive: Any, log: Path | None) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while True:
        if not alive():
            text = log.read_text(errors="replace") if log is not None and log.exists() else ""
            raise RuntimeError(f"the MQTT broker exited before listening on {port}: {text}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the MQTT broker did not listen on {host}:{port} in time")
        time.sleep(0.02)
