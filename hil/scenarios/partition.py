"""Network partition between device and broker: the harness creates a network namespace
for the agent and a veth pair to it (the host end beside the broker, the other end the
device's only interface), then takes the host end down for a while (5 minutes, 3 s with
``--quick``) and brings it back, like a switch or cable failing between line and server.
The broker and the fleet's observer stay reachable to each other on loopback.

Same checks as the broker outage (``broker_outage.run_line_fault``). Where namespaces
cannot be created (no root, no ``ip``, a container without CAP_NET_ADMIN) it falls back
to stopping the broker, and the result's ``method`` figure and notes say so.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

from hil.scenarios.broker_outage import Fault, run_line_fault
from hil.scenarios.delivery import PersistentBroker
from hil.scenarios.result import Options, Result
from tests.mqtt_broker import free_port


def ip(*args: str, netns: str | None = None) -> subprocess.CompletedProcess[str]:
    command = ["ip", *args] if netns is None else ["ip", "netns", "exec", netns, "ip", *args]
    return subprocess.run(command, capture_output=True, text=True, check=False)


def must(done: subprocess.CompletedProcess[str]) -> None:
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(done.args)}: {done.stderr.strip()}")


@dataclass(frozen=True, slots=True)
class Link:
    """A namespace ``netns`` whose interface ``inner`` (address ``device``) is the peer of
    ``outer`` (address ``host``) in this namespace."""

    netns: str
    outer: str
    inner: str
    host: str
    device: str

    @classmethod
    def create(cls) -> Link:
        """Create the namespace and the veth pair; raises ``RuntimeError`` with ip's
        message when this machine does not allow it (nothing is left behind)."""
        tag = os.getpid() % 100000
        subnet = 16 + os.getpid() % 200  # one /30 per harness process
        link = cls(f"hil{tag}", f"hilh{tag}", f"hild{tag}", f"10.213.{subnet}.1", "")
        link = cls(link.netns, link.outer, link.inner, link.host, f"10.213.{subnet}.2")
        must(ip("netns", "add", link.netns))
        try:
            must(ip("link", "add", link.outer, "type", "veth", "peer", "name", link.inner))
            must(ip("link", "set", link.inner, "netns", link.netns))
            must(ip("addr", "add", f"{link.host}/30", "dev", link.outer))
            must(ip("link", "set", link.outer, "up"))
            must(ip("addr", "add", f"{link.device}/30", "dev", link.inner, netns=link.netns))
            must(ip("link", "set", link.inner, "up", netns=link.netns))
            must(ip("link", "set", "lo", "up", netns=link.netns))
        except RuntimeError:
            link.remove()
            raise
        return link

    def cut(self) -> None:
        must(ip("link", "set", self.outer, "down"))

    def mend(self) -> None:
        must(ip("link", "set", self.outer, "up"))

    def remove(self) -> None:
        """Delete the namespace (which deletes the veth pair with it); idempotent."""
        ip("link", "del", self.outer)
        ip("netns", "del", self.netns)


def run(options: Options) -> Result:
    result = Result("partition")
    try:
        link: Link | None = Link.create()
    except (RuntimeError, FileNotFoundError) as e:
        link = None
        result.notes.append(f"no network namespace ({e}); fell back to stopping the broker")
    if link is None:
        broker = PersistentBroker()
        broker.start()
        try:
            result.figures["method"] = "broker-stopped (fallback)"
            fault = Fault(broker.stop, broker.start, f"{broker.host}:{broker.port}")
            run_line_fault(options, result, broker, fault, "broker stopped (fallback)")
        finally:
            broker.close()
        return result
    port = free_port()
    broker = PersistentBroker(extra_listeners=((link.host, port),))
    try:
        broker.start()
        result.figures["method"] = "netns+veth"
        fault = Fault(link.cut, link.mend, f"{link.host}:{port}", netns=link.netns)
        run_line_fault(options, result, broker, fault, f"veth {link.outer} down")
    finally:
        broker.close()
        link.remove()
    return result
