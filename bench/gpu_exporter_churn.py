#!/usr/bin/env python3
"""gpu-exporter at node scale: pod churn with runtime targets.

Runs the release `gpu-exporter` against the workspace fakes (8 fake GPUs,
fake kubelet, fake Kubernetes API) with N pods on the node (default 100,
500 and 1,000), 32 of them inference runtimes whose metrics (the vLLM
fixture, 27 KB) are served by one stub HTTP server here that counts the
scrapes. The exporter runs with `--collect-interval 1s` and the default
5 s runtime scrape interval (32 targets: 6.4 scrapes/s configured).

For each N:
- idle: CPU of the exporter over a window with no pod events, then
  /metrics latency (back-to-back scrapes on one kept-alive connection);
- churn: pods replaced at `--rate` per second (a DELETE and an ADD: two
  watch events each), one of them a runtime pod every second (a new UID,
  so a new scrape target); CPU over the same window, then /metrics
  latency while the churn goes on.
CPU per pod event = (churn CPU - idle CPU) / events; CPU is on-CPU time of
every exporter thread from /proc/<pid>/task/*/schedstat. Runtime scrapes
per second are counted by the stub over the churn windows.

`--soak SECONDS` adds one long churn run at `--soak-pods` pods sampling
RSS, series count and runtime scrapes/s every 30 s (flatness over time).

The exporter runs at normal priority; the fakes and this driver share the
machine with it, so figures carry the machine's noise.

Usage: python3 bench/gpu_exporter_churn.py [--no-build] [--pods 100,500,1000]
       [--rate 50] [--window 20] [--scrapes 200] [--soak 600] [--json out.json]
       [--quick]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "e2e"))
sys.path.insert(0, str(REPO / "bench"))

from gpu_exporter import cpu_seconds, memory_kib, nvml_scenario, pct, uuid  # noqa: E402

GPUS = 8
RUNTIMES = 32
RUNTIME_INTERVAL_S = 5.0
VLLM_BODY = (REPO / "gpu-exporter" / "runtime" / "tests" / "fixtures" / "vllm.prom").read_bytes()


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--no-build", action="store_true", help="use release binaries already built")
    p.add_argument("--pods", default="100,500,1000", help="pods on the node, comma-separated")
    p.add_argument("--rate", type=float, default=50.0, help="pod replacements per second (2 events each)")
    p.add_argument("--window", type=float, default=20.0, help="seconds of each CPU window")
    p.add_argument("--scrapes", type=int, default=200, help="scrapes per latency sample")
    p.add_argument("--soak", type=float, default=0.0, help="seconds of the long churn run (0: none)")
    p.add_argument("--soak-pods", type=int, default=500)
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--quick", action="store_true", help="smoke run: 100 and 1,000 pods, 5 s windows, no soak")
    args = p.parse_args()
    if args.quick:
        args.pods, args.window, args.scrapes, args.soak = "100,1000", 5.0, 50, 0.0
    return args


def build() -> None:
    cmd = ["cargo", "build", "--release", "-p", "tokentap-gpu-exporter", "-p", "tokentap-fakes",
           "-p", "tokentap-fake-nvml"]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)


# ------------------------------------------------------------ stub runtime


class StubRuntime:
    """One HTTP server standing in for every runtime pod; counts scrapes."""

    def __init__(self) -> None:
        stub = self
        self.count = 0
        self.lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802 (http.server's name)
                with stub.lock:
                    stub.count += 1
                self.send_response(200)
                self.send_header("content-type", "text/plain; version=0.0.4")
                self.send_header("content-length", str(len(VLLM_BODY)))
                self.end_headers()
                self.wfile.write(VLLM_BODY)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def scrapes(self) -> int:
        with self.lock:
            return self.count

    def stop(self) -> None:
        self.server.shutdown()


# ------------------------------------------------------------------- pods


def pod(i: int, generation: int, runtime_port: int) -> dict:
    """Pod `i` of the node; the first RUNTIMES are inference runtimes (the
    first GPUS of them hold a GPU). `generation` renames a replaced pod."""
    runtime = i < RUNTIMES
    name = f"{'vllm' if runtime else 'app'}-{i}-g{generation}"
    labels = {"workload.k8sllm.io/model": f"model-{i % 4}", "workload.k8sllm.io/team": f"team-{i % 3}"}
    p = {"name": name, "namespace": "llm" if runtime else "apps", "labels": labels,
         "containers": [{"name": "main", "ports": [{"name": "http", "containerPort": 8000}]}]}
    if runtime:
        labels.update({"app.kubernetes.io/part-of": "llm-platform",
                       "inference.networking.k8s.io/engine-type": "vllm"})
        p.update({"podIP": "127.0.0.1", "annotations": {"prometheus.io/port": str(runtime_port)}})
    return p


class Churn:
    """Replaces pods through the fake API's admin endpoints at a fixed rate
    (one runtime pod per second among them); GPU holders are left alone so
    attribution stays stable."""

    def __init__(self, api_url: str, pods: int, rate: float, runtime_port: int) -> None:
        host, port = api_url.split("://", 1)[1].rsplit(":", 1)
        self.conn = http.client.HTTPConnection(host, int(port), timeout=10)
        self.pods, self.rate, self.runtime_port = pods, rate, runtime_port
        self.generation = [0] * pods
        self.events = 0
        self.stop_flag = threading.Event()
        self.thread: threading.Thread | None = None

    def _call(self, method: str, path: str, body: dict | None = None) -> None:
        data = json.dumps(body).encode() if body is not None else None
        self.conn.request(method, path, body=data, headers={"content-type": "application/json"})
        resp = self.conn.getresponse()
        resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{method} {path}: {resp.status}")

    def _replace(self, i: int) -> None:
        old = pod(i, self.generation[i], self.runtime_port)
        self._call("DELETE", f"/admin/pods/{old['namespace']}/{old['name']}")
        self.generation[i] += 1
        self._call("POST", "/admin/pods", pod(i, self.generation[i], self.runtime_port))
        self.events += 2

    def _run(self) -> None:
        others = list(range(RUNTIMES, self.pods))
        churned_runtimes = list(range(GPUS, RUNTIMES))
        per_second = max(1, int(self.rate))
        n = 0
        start = time.monotonic()
        while not self.stop_flag.is_set():
            if n % per_second == 0:
                i = churned_runtimes[(n // per_second) % len(churned_runtimes)]
            else:
                i = others[n % len(others)]
            self._replace(i)
            n += 1
            delay = start + n / self.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stop_flag.set()
        if self.thread:
            self.thread.join()


# --------------------------------------------------------------- measuring


def scrape_latencies(port: int, count: int) -> tuple[list[float], list[int]]:
    """Back-to-back GET /metrics on one kept-alive connection: (seconds,
    sample lines per scrape)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    times, series = [], []
    try:
        for _ in range(count):
            t0 = time.perf_counter()
            conn.request("GET", "/metrics")
            resp = conn.getresponse()
            body = resp.read()
            times.append(time.perf_counter() - t0)
            series.append(sum(1 for line in body.splitlines() if line and not line.startswith(b"#")))
    finally:
        conn.close()
    return times, series


def cpu_window(pid: int, seconds: float) -> float:
    c0 = cpu_seconds(pid)
    time.sleep(seconds)
    return cpu_seconds(pid) - c0


def start_stack(work: Path, pods: int, stub: StubRuntime, tag: str):
    from exporter_stack import NvmlScenario, allocation, start_exporter, start_fake_kube_api, start_fake_kubelet

    scenario = NvmlScenario(work / f"nvml-{tag}.json")
    scenario.write(nvml_scenario())
    kube = start_fake_kube_api(work, [pod(i, 0, stub.port) for i in range(pods)], name=f"kube-{tag}")
    kubelet = start_fake_kubelet(
        work, [allocation("llm", f"vllm-{i}-g0", "main", "nvidia.com/gpu", uuid(i)) for i in range(GPUS)],
        name=f"kubelet-{tag}")
    exporter = start_exporter(work, scenario=scenario, kubelet=kubelet, kube_api=kube, interval="1s",
                              runtime=True, runtime_interval=f"{RUNTIME_INTERVAL_S:g}s", name=f"exporter-{tag}")
    exporter.scrape_when(
        lambda s: s.value("llm_gpu_exporter_node_pods") == pods and s.value("llm_runtime_targets") == RUNTIMES
        and len(s.series("llm_runtime_up")) == RUNTIMES, timeout=60, what=f"{pods} pods and {RUNTIMES} runtime targets")
    return kube, kubelet, exporter


def run_scale(work: Path, pods: int, args, stub: StubRuntime) -> dict:
    kube, kubelet, exporter = start_stack(work, pods, stub, f"n{pods}")
    pid = exporter.proc.pid
    try:
        time.sleep(RUNTIME_INTERVAL_S + 2)  # every target scraped, connections pooled
        idle_cpu = cpu_window(pid, args.window)
        idle_lat, idle_series = scrape_latencies(exporter.port, args.scrapes)

        churn = Churn(kube.url, pods, args.rate, stub.port)
        churn.start()
        time.sleep(2.0)
        e0, s0, t0 = churn.events, stub.scrapes(), time.monotonic()
        churn_cpu = cpu_window(pid, args.window)
        e1 = churn.events
        churn_lat, churn_series = scrape_latencies(exporter.port, args.scrapes)
        s1, t1 = stub.scrapes(), time.monotonic()
        churn.stop()
        events = e1 - e0
        mem = memory_kib(pid)
        final = exporter.scrape()
        return {
            "pods": pods,
            "events_per_s": events / args.window,
            "idle_cpu_cores": idle_cpu / args.window,
            "churn_cpu_cores": churn_cpu / args.window,
            "cpu_us_per_event": (churn_cpu - idle_cpu) / events * 1e6 if events else float("nan"),
            "cpu_us_per_event_gross": churn_cpu / events * 1e6 if events else float("nan"),
            "idle_scrape_p50_ms": pct(idle_lat, 0.5) * 1e3,
            "idle_scrape_p99_ms": pct(idle_lat, 0.99) * 1e3,
            "churn_scrape_p50_ms": pct(churn_lat, 0.5) * 1e3,
            "churn_scrape_p99_ms": pct(churn_lat, 0.99) * 1e3,
            "series_idle": max(idle_series),
            "series_churn_min": min(churn_series),
            "series_churn_max": max(churn_series),
            "runtime_scrapes_per_s": (s1 - s0) / (t1 - t0),
            "runtime_targets_end": final.value("llm_runtime_targets"),
            "rss_mib": mem["VmRSS"] / 1024,
            "peak_rss_mib": mem["VmHWM"] / 1024,
        }
    finally:
        for p in (exporter, kubelet, kube):
            p.stop()


def run_soak(work: Path, args, stub: StubRuntime) -> list[dict]:
    kube, kubelet, exporter = start_stack(work, args.soak_pods, stub, "soak")
    pid = exporter.proc.pid
    timeline = []
    churn = Churn(kube.url, args.soak_pods, args.rate, stub.port)
    try:
        churn.start()
        start = time.monotonic()
        last_scrapes, last_t = stub.scrapes(), start
        while time.monotonic() - start < args.soak:
            time.sleep(30.0)
            now, scrapes = time.monotonic(), stub.scrapes()
            lat, series = scrape_latencies(exporter.port, 5)
            mem = memory_kib(pid)
            timeline.append({
                "t_s": round(now - start),
                "rss_mib": mem["VmRSS"] / 1024,
                "peak_rss_mib": mem["VmHWM"] / 1024,
                "series": series[-1],
                "runtime_scrapes_per_s": (scrapes - last_scrapes) / (now - last_t),
                "events": churn.events,
                "scrape_ms_max_of_5": max(lat) * 1e3,
            })
            print(f"  soak {timeline[-1]}", flush=True)
            last_scrapes, last_t = scrapes, now
    finally:
        churn.stop()
        for p in (exporter, kubelet, kube):
            p.stop()
    return timeline


def main() -> int:
    args = parse_args()
    os.environ["TOKENTAP_PROFILE"] = "release"
    os.environ.setdefault("CARGO_TARGET_DIR", str(REPO / "target"))
    if not args.no_build:
        build()
    configured = RUNTIMES / RUNTIME_INTERVAL_S
    print(f"load average before: {os.getloadavg()}; cores: {os.cpu_count()}", flush=True)
    stub = StubRuntime()
    results, soak = [], []
    try:
        with tempfile.TemporaryDirectory(prefix="tokentap-churn-") as tmp:
            for pods in [int(p) for p in args.pods.split(",") if p]:
                row = run_scale(Path(tmp), pods, args, stub)
                print(f"  {row}", flush=True)
                results.append(row)
            if args.soak > 0:
                soak = run_soak(Path(tmp), args, stub)
    finally:
        stub.stop()
    print(f"load average after: {os.getloadavg()}")
    print(f"\nrate={args.rate}/s replacements window={args.window}s scrapes={args.scrapes} "
          f"runtime targets={RUNTIMES} configured runtime scrapes/s={configured:.1f}")
    cols = ["pods", "events_per_s", "idle_cpu_cores", "churn_cpu_cores", "cpu_us_per_event", "idle_scrape_p50_ms",
            "idle_scrape_p99_ms", "churn_scrape_p50_ms", "churn_scrape_p99_ms", "series_idle", "series_churn_min",
            "series_churn_max", "runtime_scrapes_per_s", "rss_mib", "peak_rss_mib"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in results:
        print("| " + " | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    if soak:
        print("\n| t (s) | RSS MiB | peak RSS MiB | series | runtime scrapes/s | events |")
        print("|---|---|---|---|---|---|")
        for s in soak:
            print(f"| {s['t_s']} | {s['rss_mib']:.2f} | {s['peak_rss_mib']:.2f} | {s['series']} | "
                  f"{s['runtime_scrapes_per_s']:.2f} | {s['events']} |")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "results": results, "soak": soak}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
