"""Processes and load generation for `bench/gateway.py`.

Upstreams (a `direct_response` Envoy, the SSE responder, optionally llm-sim),
the counting OTLP sink, and one `wrk` run with the CPU accounting around it.
Everything binds to or connects to 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import harness
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

BENCH = Path(__file__).resolve().parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
#: Distinct tenants the load cycles through (x-tenant-id: bench-<i>).
TENANTS = 8
#: Slack on top of wrk's own -d before a run is declared hung.
WRK_GRACE_S = 30


# --- CPU and load accounting -----------------------------------------------------


def loadavg() -> float:
    return os.getloadavg()[0]


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, all threads (/proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy, all cores (/proc/stat)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:9]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values) - idle) / CLK_TCK


def children_cpu_seconds() -> float:
    """CPU of reaped children (wrk), user + system."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


# --- upstreams -------------------------------------------------------------------


@dataclass
class Upstream:
    name: str
    proc: harness.Proc
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def build_sse_upstream(out_dir: Path) -> Path:
    """Compiles `gateway_sse_upstream.rs` (std only) with plain rustc when stale."""
    source = BENCH / "gateway_sse_upstream.rs"
    binary = out_dir / "gateway_sse_upstream"
    if binary.exists() and binary.stat().st_mtime >= source.stat().st_mtime:
        return binary
    rustc = shutil.which("rustc")
    if rustc is None:
        raise SystemExit("rustc not found: needed to build bench/gateway_sse_upstream.rs")
    out_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [rustc, "--edition", "2021", "-C", "opt-level=3", str(source), "-o", str(binary)],
        check=True,
        timeout=300,
    )
    return binary


def start_sse_upstream(tmp: Path, binary: Path, events: int, gap_us: int = 0) -> Upstream:
    port = harness.free_port()
    name = "sse-upstream" if gap_us == 0 else f"sse-upstream-gap{gap_us}"
    proc = harness.Proc(
        name, [binary, "--port", str(port), "--events", str(events), "--gap-us", str(gap_us)], tmp / f"{name}.log"
    ).start()

    def listening() -> bool:
        if not proc.alive():
            raise RuntimeError(f"sse upstream exited:\n{proc.logs()}")
        return "listening on" in proc.logs()

    harness.wait_until(listening, timeout=10, what="sse upstream")
    label = "gateway_sse_upstream" if gap_us == 0 else f"gateway_sse_upstream --gap-us {gap_us}"
    return Upstream(label, proc, port)


FAST_UPSTREAM_YAML = """\
admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }}
static_resources:
  listeners:
  - name: fast
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: fast
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                direct_response:
                  status: 200
                  body: {{ inline_string: {body} }}
                response_headers_to_add:
                - header: {{ key: content-type, value: application/json }}
                  append_action: OVERWRITE_IF_EXISTS_OR_ADD
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"""


def start_fast_upstream(tmp: Path, response: dict) -> Upstream:
    """A second Envoy answering every request with `response` as JSON
    (`direct_response`): much cheaper per request than the proxy under test."""
    port, admin = harness.free_port(), harness.free_port()
    path = tmp / "fast-upstream.yaml"
    path.write_text(FAST_UPSTREAM_YAML.format(admin=admin, port=port, body=json.dumps(json.dumps(response))))
    proc = harness.Proc(
        "fast-upstream",
        [
            harness.envoy_binary(),
            "-c",
            path,
            "--concurrency",
            "1",
            "--base-id",
            str(harness.next_base_id()),
            "--log-level",
            "warning",
        ],
        tmp / "fast-upstream.log",
    ).start()
    harness.wait_http_ok(f"http://127.0.0.1:{admin}/ready", proc, timeout=30)
    return Upstream("envoy direct_response", proc, port)


def start_llm_sim(tmp: Path, binary: Path, output_tokens: int) -> Upstream:
    """llm-sim with no simulated latency, for the upstream comparison only."""
    port = harness.free_port()
    proc = harness.Proc(
        "llm-sim",
        [
            binary,
            "--listen",
            f"127.0.0.1:{port}",
            "--model",
            "mistral-7b",
            "--ttft-ms",
            "0",
            "--itl-ms",
            "0",
            "--max-num-seqs",
            "256",
            "--default-output-tokens",
            str(output_tokens),
        ],
        tmp / "llm-sim.log",
    ).start()
    harness.wait_http_ok(f"http://127.0.0.1:{port}/health", proc)
    return Upstream("llm-sim", proc, port)


# --- OTLP sink -------------------------------------------------------------------


class OtlpSink:
    """Counts OTLP/HTTP trace exports and the spans in them, keeping nothing
    else (`tests/e2e/otlp_receiver.py` keeps every span: too much under load).
    Bodies are decoded by the `opentelemetry-proto` package, so a malformed
    export is noticed."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = 0
        self.spans = 0
        self.bytes = 0
        self.bad = 0
        sink = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                body = self.rfile.read(length)
                request = ExportTraceServiceRequest()
                try:
                    request.ParseFromString(body)
                    spans = sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
                    ok = True
                except Exception:  # noqa: BLE001 - any decode failure is a bad export
                    spans, ok = 0, False
                with sink.lock:
                    sink.requests += 1
                    sink.spans += spans
                    sink.bytes += length
                    sink.bad += 0 if ok else 1
                self.send_response(200 if ok else 400)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

        class Server(ThreadingHTTPServer):
            daemon_threads = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- one wrk run -----------------------------------------------------------------


@dataclass
class Target:
    """What one wrk run is aimed at."""

    variant: str
    url: str
    path: str
    body_file: Path
    #: The process whose CPU is "the proxy" (the upstream itself for direct runs).
    proxy_pid: int | None
    upstream_pid: int


@dataclass
class Run:
    """One wrk run against one variant."""

    variant: str
    connections: int
    #: 0-based measured repetition; WARMUP or REFERENCE otherwise.
    rep: int
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    proxy_cpu_s: float
    upstream_cpu_s: float
    wrk_cpu_s: float
    #: This Python process (the OTLP sink lives here).
    bench_cpu_s: float
    #: Every other process on the machine: the other engineers' builds.
    others_cpu_s: float
    load_before: float
    load_after: float

    @property
    def proxy_us_per_request(self) -> float:
        return self.proxy_cpu_s / self.requests * 1e6 if self.requests else float("nan")


WARMUP = -1
REFERENCE = -2


def run_wrk(target: Target, connections: int, seconds: int, rep: int) -> Run:
    """One bounded wrk run (1 thread) with CPU accounting of every party."""
    env = dict(os.environ)
    env.update(
        GATEWAY_BENCH_BODY_FILE=str(target.body_file),
        GATEWAY_BENCH_PATH=target.path,
        GATEWAY_BENCH_TENANTS=str(TENANTS),
    )
    cmd = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{seconds}s",
        "--timeout",
        "5s",
        "-s",
        str(BENCH / "gateway_wrk.lua"),
        target.url + target.path,
    ]

    def cpu(pid: int | None) -> float:
        return proc_cpu_seconds(pid) if pid is not None else 0.0

    load_before = loadavg()
    children0, busy0, own0 = children_cpu_seconds(), machine_busy_seconds(), cpu(os.getpid())
    proxy0, upstream0 = cpu(target.proxy_pid), cpu(target.upstream_pid)
    try:
        done = subprocess.run(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, timeout=seconds + WRK_GRACE_S
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"wrk did not finish within {seconds + WRK_GRACE_S} s: {cmd}") from None
    proxy1, upstream1 = cpu(target.proxy_pid), cpu(target.upstream_pid)
    children1, busy1, own1 = children_cpu_seconds(), machine_busy_seconds(), cpu(os.getpid())
    load_after = loadavg()
    out = done.stdout.decode(errors="replace")
    line = next((l for l in out.splitlines() if l.startswith("GATEWAY_BENCH_RESULT ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed (rc {done.returncode}):\n{out}")
    r = json.loads(line.split(" ", 1)[1])
    elapsed = r["duration_us"] / 1e6
    wrk_cpu = children1 - children0
    proxy_cpu, upstream_cpu = proxy1 - proxy0, upstream1 - upstream0
    if target.proxy_pid == target.upstream_pid:
        upstream_cpu = 0.0  # a direct run: the upstream is the only server
    errors = sum(r[k] for k in ("errors_connect", "errors_read", "errors_write", "errors_timeout", "errors_status"))
    return Run(
        variant=target.variant,
        connections=connections,
        rep=rep,
        requests=r["requests"],
        seconds=elapsed,
        rps=r["requests"] / elapsed if elapsed else 0.0,
        p50_ms=r["p50_us"] / 1000,
        p99_ms=r["p99_us"] / 1000,
        errors=errors,
        proxy_cpu_s=proxy_cpu,
        upstream_cpu_s=upstream_cpu,
        wrk_cpu_s=wrk_cpu,
        bench_cpu_s=own1 - own0,
        others_cpu_s=max(0.0, (busy1 - busy0) - proxy_cpu - upstream_cpu - wrk_cpu - (own1 - own0)),
        load_before=load_before,
        load_after=load_after,
    )
