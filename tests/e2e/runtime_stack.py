"""Fixtures for the simulator and runtime-metrics suites.

`start_sim` runs the real `llm-sim` binary on a free loopback port and waits
for its readiness line; `timed_sse` reads a streaming response over a raw
socket and records when each SSE event arrived, so timing checks measure
what a client sees.
"""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from harness import Proc, bin_path, get, wait_until

_LISTENING = re.compile(r"llm-sim listening on (\S+)")


@dataclass
class Sim:
    proc: Proc
    addr: str

    @property
    def url(self) -> str:
        return f"http://{self.addr}"

    @property
    def port(self) -> int:
        return int(self.addr.rsplit(":", 1)[1])


def start_sim(log_dir: Path, *args: str, env: Mapping[str, str] | None = None, name: str = "llm-sim") -> Sim:
    """Start `llm-sim --listen 127.0.0.1:0 ARGS` and wait until it serves /health."""
    cmd = [str(bin_path("llm-sim")), "--listen", "127.0.0.1:0", *args]
    proc = Proc(name, cmd, log_dir / f"{name}.log", env=dict(env or {})).start()

    def listening():
        if not proc.alive():
            raise RuntimeError(f"{name} exited early:\n{proc.logs()}")
        m = _LISTENING.search(proc.logs(tail=400))
        return m.group(1) if m else None

    addr = wait_until(listening, timeout=20, what=f"{name} readiness line")
    sim = Sim(proc, addr)
    wait_until(lambda: get(f"{sim.url}/health", timeout=1).status == 200, timeout=20, what=f"{name} /health")
    return sim


@dataclass
class TimedStream:
    status: int
    headers: dict[str, str]
    raw: bytes
    #: (seconds since the request was sent, SSE data payload) per event.
    events: list[tuple[float, bytes]]
    #: True when the body ended with the chunked terminator.
    complete: bool
    #: The exception that ended reading, if the peer reset the connection.
    error: BaseException | None


def timed_sse(url: str, payload: dict, headers: Mapping[str, str] | None = None, timeout: float = 30.0) -> TimedStream:
    """POST and time every SSE event as it arrives (HTTP/1.1, chunked)."""
    u = urllib.parse.urlsplit(url)
    body = json.dumps(payload).encode()
    hdrs = {"host": f"{u.hostname}:{u.port}", "content-type": "application/json", "content-length": str(len(body))}
    hdrs.update(headers or {})
    req = f"POST {u.path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items()) + "connection: close\r\n\r\n"
    sock = socket.create_connection((u.hostname, u.port), timeout=timeout)
    t0 = time.monotonic()
    sock.sendall(req.encode() + body)
    raw = bytearray()
    reads: list[tuple[float, int]] = []  # (time, end offset)
    error = None
    deadline = t0 + timeout
    try:
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            raw.extend(chunk)
            reads.append((time.monotonic() - t0, len(raw)))
    except (ConnectionResetError, BrokenPipeError) as exc:
        error = exc
    finally:
        sock.close()
    data = bytes(raw)
    head_end = data.find(b"\r\n\r\n")
    head = data[:head_end].decode("latin-1").split("\r\n")
    status = int(head[0].split()[1])
    resp_headers = {}
    for line in head[1:]:
        k, _, v = line.partition(":")
        resp_headers[k.strip().lower()] = v.strip()

    def arrival(offset: int) -> float:
        for t, end in reads:
            if offset < end:
                return t
        return reads[-1][0]

    # De-chunk while remembering where each payload byte sat in `raw`.
    payload_bytes = bytearray()
    payload_pos: list[int] = []
    i = head_end + 4
    complete = False
    while i < len(data):
        j = data.find(b"\r\n", i)
        if j < 0:
            break
        try:
            size = int(data[i:j].split(b";")[0], 16)
        except ValueError:
            break
        if size == 0:
            complete = True
            break
        start = j + 2
        piece = data[start : start + size]
        payload_bytes.extend(piece)
        payload_pos.extend(range(start, start + len(piece)))
        if len(piece) < size:
            break
        i = start + size + 2
    events = []
    pos = 0
    text = bytes(payload_bytes)
    while True:
        k = text.find(b"data: ", pos)
        if k < 0:
            break
        end = text.find(b"\n\n", k)
        if end < 0:
            break
        events.append((arrival(payload_pos[k]), text[k + 6 : end]))
        pos = end + 2
    return TimedStream(status, resp_headers, data, events, complete, error)
