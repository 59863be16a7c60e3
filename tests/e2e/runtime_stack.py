"""Fixtures for the simulator and runtime-metrics suites.

`start_sim` runs the real `llm-sim` binary on a free loopback port and waits
for its readiness line; `timed_sse` reads a streaming response over a raw
socket and records when each SSE event arrived, so timing checks measure
what a client sees.

For the runtime-metrics suite (real `gpu-exporter` scraping simulator pods
registered on the fake Kubernetes API): `runtime_pod` builds such a pod in the
fake API's short form, `poll_gauges` samples the exporter and the simulator
side by side so a test can compare them at the same moment, and
`promtool_expect_resets` lets Prometheus itself judge a sampled counter.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

from harness import Proc, Scrape, bin_path, get, post_raw, scrape, wait_until

#: The platform's workload labels (README), as pod labels.
WORKLOAD_POD_LABELS = {
    "app.kubernetes.io/name": "vllm-openai",
    "app.kubernetes.io/part-of": "llm-platform",
    "workload.k8sllm.io/model": "mistral-7b",
    "workload.k8sllm.io/route-class": "interactive",
    "workload.k8sllm.io/team": "platform-ai",
}

#: The Prometheus labels those pod labels become on every `llm_runtime_*` series of the pod.
WORKLOAD_SERIES_LABELS = {"model": "mistral-7b", "route_class": "interactive", "team": "platform-ai"}

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
    sock, t0 = post_raw(url, payload, headers, timeout)
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


# ------------------------------------------------- runtime pods and sampling


def runtime_pod(
    name: str,
    port: int,
    *,
    namespace: str = "llm",
    engine: str | None = "vllm",
    container: str = "vllm",
    extra_labels: Mapping[str, str] | None = None,
) -> dict:
    """A simulator pod in the fake Kubernetes API's short form, reachable on
    127.0.0.1:`port`, found by the exporter through `prometheus.io/port`."""
    labels = dict(WORKLOAD_POD_LABELS)
    if engine is not None:
        labels["inference.networking.k8s.io/engine-type"] = engine
    labels.update(extra_labels or {})
    return {
        "name": name,
        "namespace": namespace,
        "podIP": "127.0.0.1",
        "labels": labels,
        "annotations": {"prometheus.io/port": str(port)},
        "containers": [{"name": container, "ports": [{"name": "http", "containerPort": port}]}],
    }


def sim_scrape(sim: Sim) -> Scrape:
    """The simulator's own /metrics, parsed by the reference parser."""
    return scrape(f"{sim.url}/metrics")


@dataclass
class GaugePoll:
    """One poll: the exporter's view and the runtime's own view, read back to back."""

    at: float
    exported: dict[str, float | None]
    own: dict[str, float | None]


def poll_gauges(
    exporter_scrape: Callable[[], Scrape],
    sim: Sim,
    pairs: Mapping[str, tuple[str, str]],
    pod: str,
    *,
    until: Callable[[list[GaugePoll]], bool],
    timeout: float,
    interval: float = 0.05,
) -> list[GaugePoll]:
    """Sample gauges of the exporter (`llm_runtime_*` of `pod`) and of the
    simulator (its vLLM names) alternately until `until(polls)` holds.

    `pairs` maps a short key to (exported name, runtime name). A value is None
    when the series is absent (e.g. while the runtime is down). Bounded by
    `timeout`; raises TimeoutError with the polls so far."""
    polls: list[GaugePoll] = []
    deadline = time.monotonic() + timeout
    t0 = time.monotonic()
    while time.monotonic() < deadline:
        ours = exporter_scrape()
        try:
            theirs: Scrape | None = sim_scrape(sim)
        except OSError:
            theirs = None  # the runtime is down or restarting
        exported = {}
        own = {}
        for key, (exported_name, own_name) in pairs.items():
            found = ours.series(exported_name, pod=pod)
            exported[key] = found[0].value if found else None
            own[key] = theirs.value(own_name) if theirs is not None and theirs.series(own_name) else None
        polls.append(GaugePoll(time.monotonic() - t0, exported, own))
        if until(polls):
            return polls
        time.sleep(interval)
    raise TimeoutError(f"polling {pod} timed out after {timeout}s; last polls: {polls[-10:]}")


def steps(values: Sequence[float | None]) -> list[float | None]:
    """Consecutive duplicates removed: the levels a gauge went through, in order."""
    out: list[float | None] = []
    for v in values:
        if not out or out[-1] != v:
            out.append(v)
    return out


def promtool_expect_resets(series: Mapping[str, tuple[Sequence[float], int]]) -> bool:
    """Let Prometheus judge sampled counters: for each `source` name, the
    samples (one a minute) and the `resets()` count expected over all of them.

    Runs `promtool test rules`; asserts it passed. Returns False (checked
    nothing) only when promtool is not installed."""
    promtool = shutil.which("promtool")
    if promtool is None:
        return False
    length = max(len(values) for values, _ in series.values())
    inputs = "".join(
        f"  - series: 'tokens_total{{source=\"{name}\"}}'\n"
        f"    values: '{' '.join(repr(float(v)) for v in values)}'\n"
        for name, (values, _) in series.items()
    )
    expected = "".join(
        f"    - labels: '{{source=\"{name}\"}}'\n      value: {resets}\n"
        for name, (_, resets) in sorted(series.items())
    )
    with tempfile.TemporaryDirectory() as d:
        Path(d, "rules.yml").write_text("groups: []\n")
        test = Path(d, "test.yml")
        test.write_text(
            "rule_files: [rules.yml]\nevaluation_interval: 1m\ntests:\n- interval: 1m\n"
            f"  input_series:\n{inputs}"
            "  promql_expr_test:\n"
            f"  - expr: resets(tokens_total[{length + 1}m])\n"
            f"    eval_time: {length - 1}m\n"
            f"    exp_samples:\n{expected}"
        )
        r = subprocess.run([promtool, "test", "rules", str(test)], capture_output=True, text=True, timeout=60, cwd=d)
        assert r.returncode == 0, test.read_text() + r.stdout + r.stderr
    return True
