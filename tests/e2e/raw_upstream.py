"""A scripted HTTP/1.1 upstream with byte-exact control over the response.

Tests register a `Script` per path: status, headers, and the body as a list
of chunks, each written in its own `send()` (and its own HTTP chunk) after an
optional delay. That lets a test put chunk boundaries anywhere: inside a
multi-byte UTF-8 character, between CR and LF, in the middle of `data:`.
It also records every request it received (method, path, headers, body), so
tests can check what the gateway forwarded (e.g. an injected `traceparent`).
"""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from dataclasses import dataclass, field


@dataclass
class Script:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    chunks: list[bytes] = field(default_factory=list)
    #: Seconds to wait before each chunk (same length as chunks, or empty).
    delays: list[float] = field(default_factory=list)
    #: Send `content-length` instead of chunked encoding.
    content_length: bool = False
    #: Close the connection abruptly (RST) after this many chunks.
    reset_after: int | None = None
    #: Close the connection abruptly (RST) instead of answering at all.
    reset_before_headers: bool = False

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:  # noqa: C901 - a small protocol loop
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                data = sock.recv(65536)
                if not data:
                    return
                buf += data
            head, _, buf = buf.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = {}
            for line in lines[1:]:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
            body = b""
            if "content-length" in headers:
                n = int(headers["content-length"])
                while len(buf) < n:
                    data = sock.recv(65536)
                    if not data:
                        return
                    buf += data
                body, buf = buf[:n], buf[n:]
            elif headers.get("transfer-encoding", "").lower() == "chunked":
                while True:
                    while b"\r\n" not in buf:
                        buf += sock.recv(65536)
                    size_line, _, buf = buf.partition(b"\r\n")
                    size = int(size_line.split(b";")[0], 16)
                    while len(buf) < size + 2:
                        buf += sock.recv(65536)
                    body += buf[:size]
                    buf = buf[size + 2 :]
                    if size == 0:
                        break
            server: RawUpstream = self.server.owner  # type: ignore[attr-defined]
            server._record(Received(method, path, headers, body))
            script = server.script_for(path.split("?")[0])
            if not self._respond(sock, script):
                return

    def _respond(self, sock: socket.socket, s: Script) -> bool:
        if s.reset_before_headers:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            sock.close()
            return False
        reason = {200: "OK", 429: "Too Many Requests", 500: "Internal Server Error", 503: "Service Unavailable"}.get(
            s.status, "Status"
        )
        head = [f"HTTP/1.1 {s.status} {reason}"]
        for k, v in s.headers.items():
            head.append(f"{k}: {v}")
        if s.content_length:
            head.append(f"content-length: {len(s.body)}")
        else:
            head.append("transfer-encoding: chunked")
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        for i, chunk in enumerate(s.chunks):
            if s.reset_after is not None and i >= s.reset_after:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                sock.close()
                return False
            if i < len(s.delays) and s.delays[i] > 0:
                time.sleep(s.delays[i])
            if s.content_length:
                sock.sendall(chunk)
            elif chunk:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        if not s.content_length:
            sock.sendall(b"0\r\n\r\n")
        return True


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


class RawUpstream:
    """Context manager: a scripted upstream on 127.0.0.1:<port>."""

    def __init__(self) -> None:
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.owner = self  # type: ignore[attr-defined]
        self.port = self._server.server_address[1]
        self._scripts: dict[str, Script] = {}
        self._lock = threading.Lock()
        self.received: list[Received] = []
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> "RawUpstream":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def script(self, path: str, script: Script) -> None:
        with self._lock:
            self._scripts[path] = script

    def script_for(self, path: str) -> Script:
        with self._lock:
            return self._scripts.get(
                path,
                Script(404, {"content-type": "application/json"}, [b'{"error":{"message":"no script"}}'], content_length=True),
            )

    def _record(self, r: Received) -> None:
        with self._lock:
            self.received.append(r)
