"""A live test camera on loopback: ffmpeg renders ``testsrc2`` and serves it over RTSP or HTTP.

``FfmpegStreamServer(kind="http")`` runs ``ffmpeg -f mpjpeg -listen 1``: ffmpeg itself is
the HTTP server and streams multipart JPEG to the first client that connects (one client
per process, as ``-listen 1`` means).

``kind="rtsp"``: the ffmpeg CLI cannot serve RTSP to a pulling client (its
``-rtsp_flags listen`` only exists for *receiving* a published stream), so ffmpeg sends
RTP/JPEG (RFC 2435) to a loopback UDP port and a small RTSP server here answers
OPTIONS/DESCRIBE/SETUP/PLAY and relays the packets interleaved on the client's TCP
connection (RTSP over TCP, RFC 2326 section 10.12). UDP transport requests get 461, which
makes FFmpeg's RTSP client retry over TCP, as it does with TCP-only cameras.

``stop()`` kills ffmpeg's process group and closes every socket, like a camera losing
power; ``start()`` brings it back on the same port. Use it as a context manager so
nothing outlives the test.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import subprocess
import threading
import time
from types import TracebackType
from typing import Literal

SDP_TEMPLATE = (
    "v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=edgefleet test camera\r\nc=IN IP4 0.0.0.0\r\n"
    "t=0 0\r\nm=video 0 RTP/AVP 26\r\na=rtpmap:26 JPEG/90000\r\na=control:track0\r\n"
)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class FfmpegStreamServer:
    """A test camera at ``url`` that can be stopped and started again on the same port."""

    def __init__(
        self,
        kind: Literal["rtsp", "http"] = "rtsp",
        *,
        fps: int = 20,
        size: tuple[int, int] = (320, 240),
        port: int | None = None,
    ) -> None:
        self.kind = kind
        self.fps = fps
        self.size = size
        self.port = port if port is not None else free_port()
        self._proc: subprocess.Popen[bytes] | None = None
        self._listener: socket.socket | None = None
        self._rtp: socket.socket | None = None
        self._clients: list[socket.socket] = []
        self._playing: list[socket.socket] = []
        self._lock = threading.Lock()  # guards the lists and sockets above
        self._send_lock = threading.Lock()  # one writer at a time on a client socket
        self._threads: list[threading.Thread] = []

    @property
    def url(self) -> str:
        if self.kind == "rtsp":
            return f"rtsp://127.0.0.1:{self.port}/live"
        return f"http://127.0.0.1:{self.port}/"

    def __enter__(self) -> FfmpegStreamServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start serving; raises ``RuntimeError`` when already running or ffmpeg fails."""
        if self._proc is not None:
            raise RuntimeError("stream server already running")
        try:
            self._start()
        except BaseException:
            self.stop()  # nothing half-started outlives a failed start
            raise

    def _start(self) -> None:
        width, height = self.size
        command = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin", "-re"]
        command += ["-f", "lavfi", "-i", f"testsrc2=size={width}x{height}:rate={self.fps}"]
        command += ["-c:v", "mjpeg", "-pix_fmt", "yuvj420p", "-q:v", "5", "-huffman", "default"]
        command += ["-force_duplicated_matrix", "1"]  # RTP/JPEG needs both tables
        if self.kind == "http":
            command += ["-f", "mpjpeg", "-listen", "1", self.url]
        else:
            self._start_rtsp_relay()
            assert self._rtp is not None
            rtp_port = self._rtp.getsockname()[1]
            command += ["-f", "rtp", f"rtp://127.0.0.1:{rtp_port}?pkt_size=1400"]
        self._proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            start_new_session=True,  # its own process group, killed whole in stop()
        )
        if self.kind == "http":
            self._wait_listening(timeout_s=5)

    def _wait_listening(self, timeout_s: float) -> None:
        """Wait for ffmpeg's listening socket without connecting: the first client is
        the only one ``-listen 1`` serves, so a probe would use it up."""
        local = f"0100007F:{self.port:04X}"  # 127.0.0.1 as /proc/net/tcp writes it
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with open("/proc/net/tcp") as table:
                for line in table.readlines()[1:]:
                    fields = line.split()
                    if fields[1] == local and fields[3] == "0A":  # 0A: LISTEN
                        return
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError(f"ffmpeg exited with {self._proc.returncode}")
            time.sleep(0.02)
        raise RuntimeError(f"ffmpeg did not listen on port {self.port} in {timeout_s} s")

    def stop(self) -> None:
        """Kill ffmpeg and drop every connection at once; safe to call twice."""
        proc, self._proc = self._proc, None
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # also ends a frozen ffmpeg
            proc.wait(timeout=5)
        with self._lock:
            sockets = [self._listener, self._rtp, *self._clients]
            self._listener, self._rtp = None, None
            self._clients, self._playing = [], []
        for sock in sockets:
            if sock is None:
                continue
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        with self._lock:
            threads, self._threads = self._threads, []
        for thread in threads:
            thread.join(timeout=5)

    def freeze(self) -> None:
        """Suspend ffmpeg: connections stay open but no frame is sent (a hung camera)."""
        self._signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self._signal(signal.SIGCONT)

    def _signal(self, signum: signal.Signals) -> None:
        if self._proc is None:
            raise RuntimeError("stream server not running")
        os.killpg(self._proc.pid, signum)

    def restart(self, pause_s: float = 0.0) -> None:
        """Stop, stay dark ``pause_s`` seconds, start again on the same port."""
        self.stop()
        time.sleep(pause_s)
        self.start()

    # RTSP relay -------------------------------------------------------------------------

    def _start_rtsp_relay(self) -> None:
        listener = socket.socket()
        rtp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with self._lock:
            self._listener, self._rtp = listener, rtp  # closed by stop() if bind fails
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(4)
        rtp.bind(("127.0.0.1", 0))
        for target, arg in ((self._accept, listener), (self._pump, rtp)):
            thread = threading.Thread(target=target, args=(arg,), daemon=True)
            with self._lock:
                self._threads.append(thread)
            thread.start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by stop()
            thread = threading.Thread(target=self._serve, args=(client,), daemon=True)
            with self._lock:
                if self._listener is not listener:  # stop() ran meanwhile
                    client.close()
                    return
                self._clients.append(client)
                self._threads.append(thread)
            thread.start()

    def _pump(self, rtp: socket.socket) -> None:
        """Relay each RTP packet from ffmpeg to every playing client on channel 0."""
        while True:
            try:
                packet = rtp.recv(65536)
            except OSError:
                return
            frame = b"$\x00" + struct.pack(">H", len(packet)) + packet
            with self._lock:
                playing = list(self._playing)
            for client in playing:
                try:
                    with self._send_lock:
                        client.sendall(frame)
                except OSError:
                    with self._lock, contextlib.suppress(ValueError):
                        self._playing.remove(client)

    def _serve(self, client: socket.socket) -> None:
        """Answer RTSP requests; skip the client's interleaved RTCP reports."""
        buffer = b""
        while True:
            try:
                chunk = client.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            buffer += chunk
            while buffer:
                if buffer[:1] == b"$":
                    if len(buffer) < 4:
                        break
                    size = struct.unpack(">H", buffer[2:4])[0]
                    if len(buffer) < 4 + size:
                        break
                    buffer = buffer[4 + size :]
                    continue
                head, sep, rest = buffer.partition(b"\r\n\r\n")
                if not sep:
                    break
                buffer = rest  # requests from FFmpeg's client carry no body
                self._answer(client, head.decode("latin-1"))

    def _answer(self, client: socket.socket, request: str) -> None:
        lines = request.split("\r\n")
        method = lines[0].split(" ", 1)[0]
        headers = {
            key.strip().lower(): value.strip()
            for key, _, value in (line.partition(":") for line in lines[1:])
        }
        status, extra, body = "200 OK", "", ""
        if method == "OPTIONS":
            extra = "Public: OPTIONS, DESCRIBE, SETUP, PLAY, TEARDOWN, GET_PARAMETER\r\n"
        elif method == "DESCRIBE":
            body = SDP_TEMPLATE
            extra = f"Content-Base: {self.url}/\r\nContent-Type: application/sdp\r\n"
        elif method == "SETUP":
            if "interleaved" not in headers.get("transport", ""):
                status = "461 Unsupported Transport"
            else:
                extra = "Transport: RTP/AVP/TCP;unicast;interleaved=0-1\r\nSession: 1\r\n"
        elif method == "PLAY":
            extra = "Session: 1\r\n"
        reply = f"RTSP/1.0 {status}\r\nCSeq: {headers.get('cseq', '0')}\r\n{extra}"
        reply += f"Content-Length: {len(body.encode())}\r\n\r\n{body}"
        with self._send_lock, contextlib.suppress(OSError):
            client.sendall(reply.encode("latin-1"))
        if method == "PLAY":
            with self._lock:
                self._playing.append(client)
