#!/usr/bin/env python3
"""The whole local tokentap stack, for `cargo xtask demo` and `cargo xtask up`.

Started here, all on 127.0.0.1, with the same process helpers the e2e tests
use (`tests/e2e/`):

  llm-sim x3        stable :8000, canary :8001 (a slower build), RAG API :8002
  Envoy + filter    listener :10000, admin :9901 (`envoy/tokentap.yaml`)
  OTLP receiver     :4318, stands in for an OpenTelemetry Collector
  gpu-exporter      a free port (printed), on the fake libnvidia-ml.so (2 H100s), a fake
                    kubelet PodResources socket and a fake Kubernetes API that
                    lists the three simulator pods with the platform's labels
  Prometheus        :9090 (`up` only, when `prometheus` is installed): the shipped
                    scrape jobs and rules (tests/e2e/observability_stack.py)

`demo` sends a mix of traffic and prints what the gateway, the exporter and
the trace receiver saw, then stops everything. `up` keeps the stack running
until Ctrl-C; point any OpenAI client at http://127.0.0.1:10000/v1, and run
the failure drills against it with `cargo xtask drill` (demo/drill.py).

The fake GPUs' utilization follows the running batch of the runtime on each
(15% idle, 100% with a full batch of 4); their memory stays at what vLLM
allocates at start. The runtimes prefill at 0.5 ms per uncached prompt token
on top of their base time to first token, so longer prompts cost time.

`up` writes `<run dir>/stack.json` (addresses of every part), which
demo/drill.py reads to find the stack. `--free-ports` and `--run-dir` let
tests run it beside other stacks.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "e2e"))

from exporter_stack import (  # noqa: E402
    WORKLOAD_LABELS,
    NvmlScenario,
    allocation,
    start_exporter,
    start_fake_kube_api,
    start_fake_kubelet,
)
from harness import SHELL, Scrape, free_port, get, parse_exposition, post_json, scrape, stream_timed  # noqa: E402
from observability_stack import (  # noqa: E402
    TimeScale,
    dashboard_links,
    incident_panels,
    needs_cluster,
    prometheus_binary,
    prometheus_config,
    start_prometheus,
)
from otlp_receiver import OtlpReceiver  # noqa: E402
from stack import add_cluster, plugin_config, set_plugin_config, start_envoy, start_sim  # noqa: E402

GIB = 1 << 30
GPU_STABLE = "GPU-0d1b4c2a-6f3e-4a8b-9c1d-2e3f4a5b6c01"
GPU_CANARY = "GPU-0d1b4c2a-6f3e-4a8b-9c1d-2e3f4a5b6c02"

PORTS = {"envoy": 10000, "admin": 9901, "stable": 8000, "canary": 8001, "rag": 8002, "otlp": 4318, "prometheus": 9090}
#: The runtimes' largest batch (llm-sim --max-num-seqs).
MAX_NUM_SEQS = 4
PROMETHEUS_MISSING = ("prometheus not on PATH (Debian package `prometheus`): starting without Prometheus, "
                      "its alerts and the dashboard links; `cargo xtask drill` needs it")


def pods(stable: int, canary: int, rag: int) -> list[dict]:
    def pod(name: str, port: int, route_class: str = "interactive") -> dict:
        labels = {**WORKLOAD_LABELS, "workload.k8sllm.io/route-class": route_class, "inference.networking.k8s.io/engine-type": "vllm"}
        return {
            "name": name,
            "namespace": "llm",
            "podIP": "127.0.0.1",
            "labels": labels,
            "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": str(port)},
            "containers": [{"name": "vllm", "ports": [{"name": "http", "containerPort": port}]}],
        }

    return [pod("vllm-stable-0", stable), pod("vllm-canary-0", canary), pod("rag-api-0", rag)]


def telemetry_pods(admin: int, exporter: int) -> list[dict]:
    """The gateway and gpu-exporter as pods of the fake API, labelled as the
    packages deploy them (k8s/gateway/istio, k8s/gpu-exporter), so the
    shipped scrape jobs llm-gateway-istio and gpu-exporter select them. The
    gateway pod leaves out `app.kubernetes.io/part-of: llm-platform`, which
    would make gpu-exporter take it for a runtime."""
    return [
        {"name": "llm-ingressgateway-0", "namespace": "istio-ingress", "podIP": "127.0.0.1",
         "labels": {"app.kubernetes.io/name": "llm-ingressgateway", "istio": "llm-ingressgateway"},
         "containers": [{"name": "istio-proxy", "ports": [{"name": "http-envoy-prom", "containerPort": admin}]}]},
        {"name": "gpu-exporter-0", "namespace": "tokentap-system", "podIP": "127.0.0.1",
         "labels": {"app.kubernetes.io/name": "gpu-exporter", "app.kubernetes.io/part-of": "tokentap"},
         "containers": [{"name": "gpu-exporter", "ports": [{"name": "metrics", "containerPort": exporter}]}]},
    ]


def gpu_scenario() -> dict:
    def gpu(uuid: str, minor: int, util: int, mem_gib: int, temp: int) -> dict:
        return {
            "uuid": uuid,
            "name": "NVIDIA H100 80GB HBM3",
            "minor_number": minor,
            "utilization_gpu_percent": util,
            "utilization_memory_percent": util // 2,
            "memory_total_bytes": 80 * GIB,
            "memory_used_bytes": mem_gib * GIB,
            "temperature_celsius": temp,
            "power_usage_milliwatts": 450_000 + 1000 * util,
            "power_limit_milliwatts": 700_000,
            "energy_millijoules_per_second": 450_000,
        }

    return {
        "driver_version": "550.54.15",
        "cuda_driver_version": 12040,
        "gpus": [gpu(GPU_STABLE, 0, 71, 62, 64), gpu(GPU_CANARY, 1, 58, 74, 69)],
    }


class Stack:
    def __init__(self, run_dir: Path, fixed_ports: bool, prometheus: bool = False) -> None:
        self.dir = run_dir
        self.fixed = fixed_ports
        self.procs: list = []
        self.collector = OtlpReceiver(port=PORTS["otlp"] if fixed_ports else 0)
        self.want_prometheus = prometheus
        self.prometheus = None
        self.stopping = threading.Event()

    def port(self, name: str) -> int | None:
        return PORTS[name] if self.fixed else None

    def start(self) -> "Stack":
        d = self.dir
        self.collector.start()
        # Supervised, so the runtime-restart drill (POST /admin/restart)
        # brings the runtime back, as Kubernetes would.
        common = ["--itl-ms", "8", "--prefill-ms-per-token", "0.5", "--max-num-seqs", str(MAX_NUM_SEQS), "--kv-cache-tokens", "16384", "--supervise"]
        self.stable = start_sim(d, "--ttft-ms", "120", *common, name="sim-stable", port=self.port("stable"), env={"POD_NAME": "vllm-stable-0"})
        self.canary = start_sim(d, "--ttft-ms", "260", "--seed", "2", *common, name="sim-canary", port=self.port("canary"), env={"POD_NAME": "vllm-canary-0"})
        self.rag = start_sim(d, "--ttft-ms", "90", "--seed", "3", *common, name="sim-rag", port=self.port("rag"), env={"POD_NAME": "rag-api-0"})
        self.procs += [self.stable, self.canary, self.rag]

        collector_port = self.collector.port

        def edit(cfg: dict) -> None:
            add_cluster(cfg, "otel_collector", collector_port)
            plugin = plugin_config(cfg)
            plugin["tracing"] = {"cluster": "otel_collector", "authority": "otel-collector", "sample_ratio": 1.0, "flush_interval_ms": 500}
            set_plugin_config(cfg, plugin)

        self.envoy = start_envoy(
            d,
            stable_port=self.stable.port,
            canary_port=self.canary.port,
            rag_port=self.rag.port,
            edit=edit,
            listen_port=self.port("envoy"),
            admin_port=self.port("admin"),
            flush_interval="1s",
        )
        self.procs.append(self.envoy)

        self.kube = start_fake_kube_api(d, pods(self.stable.port, self.canary.port, self.rag.port))
        self.kubelet = start_fake_kubelet(
            d,
            [
                allocation("llm", "vllm-stable-0", "vllm", "nvidia.com/gpu", GPU_STABLE),
                allocation("llm", "vllm-canary-0", "vllm", "nvidia.com/gpu", GPU_CANARY),
            ],
        )
        self.procs += [self.kube, self.kubelet]
        self.scenario = NvmlScenario(d / "nvml-scenario.json", gpu_scenario())
        self.scenario.write()
        self.exporter = start_exporter(d, scenario=self.scenario, kubelet=self.kubelet, kube_api=self.kube, interval="1s", runtime=True)
        self.procs.append(self.exporter)
        threading.Thread(target=self._gpu_load, daemon=True).start()
        if self.want_prometheus:
            self._start_prometheus()
        return self

    def _gpu_load(self) -> None:
        """Each fake GPU's utilization follows its runtime's running batch."""
        last: dict[int, int] = {}
        while not self.stopping.wait(1.0):
            for index, sim in ((0, self.stable), (1, self.canary)):
                try:
                    running = parse_exposition(sim.metrics_text()).value("vllm:num_requests_running")
                except Exception:  # noqa: BLE001 - the runtime is restarting: no batch
                    running = 0
                util = round(15 + 85 * min(running, MAX_NUM_SEQS) / MAX_NUM_SEQS)
                if last.get(index) != util:
                    self.scenario.gpu(index)["utilization_gpu_percent"] = util
                    self.scenario.gpu(index)["utilization_memory_percent"] = util // 2
                    last[index] = util
                    self.scenario.write()

    def _start_prometheus(self) -> None:
        if prometheus_binary() is None:
            print(f"xtask: {PROMETHEUS_MISSING}", flush=True)
            return
        for pod in telemetry_pods(self.envoy.admin_port, self.exporter.port):
            self.kube.add_pod(pod)
        self.prometheus = start_prometheus(self.dir, self.prometheus_config(TimeScale()), PORTS["prometheus"] if self.fixed else free_port(),
                                           TimeScale())
        self.procs.append(self.prometheus)

    def cluster_pods(self) -> list[dict]:
        """Every pod object the fake Kubernetes API serves."""
        return get(f"{self.kube.url}/api/v1/pods").json()["items"]

    def prometheus_config(self, time_scale: TimeScale) -> dict:
        return prometheus_config(self.dir, self.cluster_pods(), time_scale)

    def describe(self) -> dict:
        """What demo/drill.py needs to find and drive this stack."""
        return {
            "pid": os.getpid(),
            "run_dir": str(self.dir),
            "envoy": self.envoy.url,
            "admin": self.envoy.admin,
            "exporter": self.exporter.url,
            "kube_api": self.kube.url,
            "runtimes": {"stable": self.stable.url, "canary": self.canary.url, "rag": self.rag.url},
            "max_num_seqs": MAX_NUM_SEQS,
            "prometheus": self.prometheus.url if self.prometheus else None,
            "prometheus_config": str(self.prometheus.config_path) if self.prometheus else None,
        }

    def stop(self) -> None:
        self.stopping.set()
        for p in reversed(self.procs):
            try:
                p.stop()
            except Exception:  # noqa: BLE001 - best effort on shutdown
                pass
        self.collector.stop()


def send_traffic(url: str) -> dict:
    """A mix of the platform's traffic; returns what the clients saw."""
    chat = "/v1/chat/completions"
    seen = {"requests": 0, "errors": 0}

    def req(path: str, body: dict, tenant: str, **headers: str) -> int:
        h = {"x-tenant-id": tenant, **headers}
        if body.get("stream"):
            status = stream_timed(url + path, body, headers=h)[0]
        else:
            status = post_json(url + path, body, headers=h).status
        seen["requests"] += 1
        seen["errors"] += status >= 400
        return status

    def msg(text: str, n: int, stream: bool) -> dict:
        b = {"model": "mistral-7b", "messages": [{"role": "user", "content": text}], "max_tokens": n, "stream": stream}
        if stream:
            b["stream_options"] = {"include_usage": True}
        return b

    runbook = "Summarise the on-call runbook for saturated inference runtimes. " * 6
    for i in range(3):
        req(chat, msg(runbook, 24, True), "acme")  # repeated prompt: prefix-cache hits
        req(chat, msg(f"question {i}", 16, False), "globex")
        req("/v1/completions", {"model": "mistral-7b", "prompt": f"batch job {i}", "max_tokens": 32}, "globex")
    for i in range(3):
        req(chat, msg(f"canary question {i}", 16, True), "acme", **{"x-canary": "1"})
    req("/v1/embeddings", {"model": "mistral-7b", "input": ["embed me", "and me"]}, "globex")
    for top_k in (3, 5):
        req("/rag" + chat, msg("what is our GPU quota policy?", 12, False), "acme", **{"x-rag-collection": "handbook", "x-rag-top-k": str(top_k)})
    req(chat, msg("this one fails", 4, False), "globex", **{"x-sim-fail": "503"})

    # A burst: more concurrent streams than the runtime's batch (4), so
    # requests queue in the runtime and time to first token grows.
    threads = [threading.Thread(target=req, args=(chat, msg(f"burst {i}", 48, True), "acme")) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return seen


def quantile(s: Scrape, family: str, q: float, **match: str) -> float | None:
    """Histogram quantile from cumulative buckets (linear interpolation)."""
    buckets: dict[float, float] = {}
    for smp in s.series(family + "_bucket", **match):
        le = float(smp.labels["le"])
        buckets[le] = buckets.get(le, 0) + smp.value
    if not buckets:
        return None
    edges = sorted(buckets)
    total = buckets[edges[-1]]
    if total == 0:
        return None
    rank, prev_le, prev_n = q * total, 0.0, 0.0
    for le in edges:
        n = buckets[le]
        if n >= rank:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * ((rank - prev_n) / max(n - prev_n, 1e-9))
        prev_le, prev_n = le, n
    return None


def report(stack: Stack, seen: dict) -> None:
    time.sleep(2.5)  # one stats flush (1 s) and one exporter pass (1 s)
    g = parse_exposition(stack.envoy.stats_prometheus())
    shell = "dynamic module libtokentap_module.so" if SHELL == "module" else "proxy-wasm tokentap_filter.wasm"
    print(f"\n== What the gateway saw (Envoy /stats/prometheus, tokentap filter: {shell}) ==")
    print(f"{'route':<12}{'tenant':<9}{'backend':<12}{'status':<7}{'requests':>9}")
    for smp in sorted(g.series("llm_gateway_requests_total"), key=lambda x: (x.labels["route"], x.labels["tenant"], x.labels["backend"], x.labels["status"])):
        l = smp.labels
        print(f"{l['route']:<12}{l['tenant']:<9}{l['backend']:<12}{l['status']:<7}{int(smp.value):>9}")
    print(f"\n{'route':<12}{'backend':<12}{'TTFT p50 ms':>12}{'TTFT p95 ms':>12}{'TPOT p50 ms':>12}{'tok/s p50':>10}")
    keys = sorted({(s.labels["route"], s.labels["backend"]) for s in g.series("llm_gateway_time_to_first_token_milliseconds_count")})
    for route, backend in keys:
        m = {"route": route, "backend": backend}
        cells = [quantile(g, "llm_gateway_time_to_first_token_milliseconds", 0.5, **m), quantile(g, "llm_gateway_time_to_first_token_milliseconds", 0.95, **m),
                 quantile(g, "llm_gateway_time_per_output_token_milliseconds", 0.5, **m), quantile(g, "llm_gateway_output_tokens_per_second", 0.5, **m)]
        print(f"{route:<12}{backend:<12}" + "".join(f"{(c or 0):>12.0f}" if i < 3 else f"{(c or 0):>10.0f}" for i, c in enumerate(cells)))
    tokens = {}
    for smp in g.series("llm_gateway_tokens_total"):
        key = f"{smp.labels['token_type']} ({smp.labels['source']})"
        tokens[key] = tokens.get(key, 0) + smp.value
    print("\ntokens: " + ", ".join(f"{k}={int(v)}" for k, v in sorted(tokens.items())))
    print("cache hits: " + ", ".join(f"{s.labels['cache']}={int(s.value)}" for s in g.series("llm_gateway_cache_hits_total")) or "none")
    print("errors: " + (", ".join(f"{s.labels['route']}/{s.labels['error_type']}={int(s.value)}" for s in g.series("llm_gateway_errors_total")) or "none"))
    for smp in g.series("llm_rag_evaluations_total"):
        print(f"RAG: collection={smp.labels['collection']} evaluation={smp.labels['result']} x{int(smp.value)}, "
              f"retrieval p50 {quantile(g, 'llm_rag_retrieval_duration_milliseconds', 0.5, collection=smp.labels['collection']):.1f} ms, "
              f"index age {int(g.value('llm_rag_index_age_seconds', collection=smp.labels['collection']))} s")
    print(f"(clients sent {seen['requests']} requests, {seen['errors']} answered with an error)")

    e = stack.exporter.scrape()
    print("\n== What gpu-exporter saw (fake NVML + kubelet PodResources + Kubernetes API) ==")
    print(f"{'gpu':<4}{'pod':<16}{'model':<12}{'route_class':<13}{'team':<13}{'util':>6}{'mem used':>10}{'temp':>6}")
    for smp in sorted(e.series("llm_gpu_utilization_ratio"), key=lambda x: x.labels.get("gpu", "")):
        l = smp.labels
        mem = e.value("llm_gpu_memory_used_bytes", gpu_uuid=l["gpu_uuid"])
        temp = e.value("llm_gpu_temperature_celsius", gpu_uuid=l["gpu_uuid"])
        print(f"{l.get('gpu', ''):<4}{l.get('pod', ''):<16}{l.get('model', ''):<12}{l.get('route_class', ''):<13}{l.get('team', ''):<13}"
              f"{smp.value * 100:>5.0f}%{mem / GIB:>8.1f}Gi{temp:>5.0f}C")
    print(f"\n{'runtime pod':<16}{'up':>3}{'running':>9}{'waiting':>9}{'kv cache':>10}{'queue mean s':>14}{'gen tokens':>12}")
    for smp in sorted(e.series("llm_runtime_up"), key=lambda x: x.labels["pod"]):
        pod = smp.labels["pod"]
        n = e.value("llm_runtime_queue_time_seconds_count", pod=pod)
        queue = e.value("llm_runtime_queue_time_seconds_sum", pod=pod) / n if n else 0.0
        print(f"{pod:<16}{int(smp.value):>3}{e.value('llm_runtime_requests_running', pod=pod):>9.0f}{e.value('llm_runtime_requests_waiting', pod=pod):>9.0f}"
              f"{e.value('llm_runtime_kv_cache_usage_ratio', pod=pod) * 100:>9.1f}%{queue:>14.3f}{e.value('llm_runtime_generation_tokens_total', pod=pod):>12.0f}")

    spans = stack.collector.wait_for_spans(1, timeout=10)
    print(f"\n== Traces: {len(spans)} gateway spans received over OTLP/HTTP ==")
    sample = next((s for s in spans if s["attributes"].get("rag.collection")), spans[0])
    print(f"sample span `{sample['name']}` trace={sample['trace_id']} duration={(sample['end_unix_nanos'] - sample['start_unix_nanos']) / 1e6:.0f} ms")
    for k, v in sorted(sample["attributes"].items()):
        print(f"  {k} = {v}")


def up_banner(stack: Stack) -> str:
    d = stack.describe()
    rt = d["runtimes"]
    lines = [
        f"tokentap stack is up (logs in {stack.dir}):",
        f"  OpenAI-compatible endpoint  {stack.envoy.url}/v1   (tenant header: x-tenant-id, canary: x-canary: 1)",
        f"  gateway metrics             {stack.envoy.admin}/stats/prometheus",
        f"  GPU + runtime metrics       {stack.exporter.url}/metrics",
        f"  OTLP traces                 received on 127.0.0.1:{stack.collector.port} (count printed on exit)",
        f"  runtimes (llm-sim)          stable {rt['stable']}  canary {rt['canary']}  RAG {rt['rag']}  (admin API: docs/simulator.md)",
    ]
    if stack.prometheus:
        prom = stack.prometheus.url
        lines += [
            f"  Prometheus                  {prom}  (shipped scrape jobs and k8s/observability/rules.yaml, unchanged)",
            f"  alerts                      {prom}/alerts",
            "LLM incident dashboard, one Prometheus graph per panel (k8s/observability/dashboards/llm-incident.json):",
        ]
        cluster = {p["title"] for p in incident_panels() if needs_cluster(p)}
        for title, url in dashboard_links(prom):
            note = "  (kube-state-metrics / cAdvisor: no data without a cluster)" if title in cluster else ""
            lines += [f"  {title}{note}", f"    {url}"]
    lines += [
        "Try:",
        f"  curl -s {stack.envoy.url}/v1/chat/completions -H 'x-tenant-id: acme' -H 'content-type: application/json' \\",
        """       -d '{"model":"mistral-7b","messages":[{"role":"user","content":"hi"}],"stream":true}'""",
        "  cargo xtask drill burst        # or long-prompts, runtime-restart, vector-store-outage, all",
        "Ctrl-C stops everything.",
    ]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["demo", "up"])
    ap.add_argument("--run-dir", type=Path, help="where `up` keeps logs, configs and stack.json (default .tokentap/run)")
    ap.add_argument("--free-ports", action="store_true", help="free ports instead of the fixed ones (tests)")
    args = ap.parse_args()
    if args.mode == "up":
        run_dir = args.run_dir or REPO / ".tokentap" / "run"
    else:
        run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="tokentap-demo-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    state = run_dir / "stack.json"
    stack = Stack(run_dir, fixed_ports=not args.free_ports, prometheus=args.mode == "up")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stack.start()
        if args.mode == "demo":
            seen = send_traffic(stack.envoy.url)
            report(stack, seen)
            print(f"\nlogs and configs: {run_dir}")
            return 0
        state.write_text(json.dumps(stack.describe(), indent=1))
        print("\n" + up_banner(stack), flush=True)
        try:
            while not stop.wait(1):
                for p in stack.procs:
                    proc = getattr(p, "proc", p)
                    if hasattr(proc, "alive") and not proc.alive():
                        print(f"{proc.name} exited; see {proc.log_path}")
                        return 1
        except KeyboardInterrupt:
            pass
        print(f"\nstopping ({len(stack.collector.spans())} spans received)")
        return 0
    finally:
        state.unlink(missing_ok=True)
        stack.stop()


if __name__ == "__main__":
    sys.exit(main())
