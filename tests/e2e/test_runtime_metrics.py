"""End-to-end: real llm-sim runtimes scraped by the runtime collector.

The collector runs as `llm-runtime-probe` (crate tokentap-runtime-metrics),
which is the exact scraping/normalizing code gpu-exporter embeds, fed with
pods from a JSON file instead of the Kubernetes watch. Requests go straight
to the simulators. Expected values always come from the simulator's own
/metrics, never from the collector.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading

import pytest

from harness import Proc, bin_path, get, post_json, scrape, wait_until
from runtime_stack import start_sim

WORKLOAD = {
    "app.kubernetes.io/name": "vllm-openai",
    "app.kubernetes.io/part-of": "llm-platform",
    "workload.k8sllm.io/model": "mistral-7b",
    "workload.k8sllm.io/route-class": "interactive",
    "workload.k8sllm.io/team": "platform-ai",
}


def pod(name: str, port: int, **extra_labels: str) -> dict:
    return {
        "namespace": "llm",
        "name": name,
        "uid": f"uid-{name}",
        "ip": "127.0.0.1",
        "phase": "Running",
        "ready": True,
        "labels": {**WORKLOAD, **extra_labels},
        "annotations": {"prometheus.io/port": str(port)},
        "container_ports": [],
        "restart_count": 0,
    }


def start_probe(tmp_path, pods: list[dict], interval: str = "300ms") -> tuple[Proc, str]:
    pods_file = tmp_path / "pods.json"
    pods_file.write_text(json.dumps(pods))
    cmd = [
        str(bin_path("llm-runtime-probe")),
        "--pods", str(pods_file),
        "--listen", "127.0.0.1:0",
        "--runtime-scrape-interval", interval,
        "--runtime-scrape-timeout", "1s",
    ]
    proc = Proc("llm-runtime-probe", cmd, tmp_path / "probe.log").start()
    addr = wait_until(
        lambda: (m := re.search(r"listening on (\S+)", proc.logs())) and m.group(1),
        timeout=20,
        what="probe readiness line",
    )
    return proc, f"http://{addr}/metrics"


def scrape_when(url: str, pred, timeout: float = 10, what: str = "condition"):
    """Scrape `url` until `pred(scrape)` holds; return that scrape."""
    return wait_until(lambda: (lambda m: m if pred(m) else None)(scrape(url)), timeout=timeout, what=what)


def one(scrape_, name: str, pod: str, **labels) -> float:
    found = [s for s in scrape_.series(name, pod=pod, **labels)]
    assert len(found) == 1, (name, pod, labels, scrape_.label_sets(name))
    return found[0].value


@pytest.fixture
def stack(tmp_path):
    procs = []
    sim = start_sim(
        tmp_path, "--supervise", "--restart-delay-ms", "1500", "--max-num-seqs", "1",
        "--ttft-ms", "40", "--itl-ms", "40", name="sim-a",
    )
    procs.append(sim.proc)
    pods = [pod("vllm-a", sim.port), pod("vllm-broken", 1, **{"inference.networking.k8s.io/engine-type": "vllm"})]
    probe, url = start_probe(tmp_path, pods)
    procs.append(probe)
    yield sim, url
    for p in procs:
        p.stop()


def test_labels_health_and_broken_neighbour(stack):
    sim, url = stack
    m = scrape_when(url, lambda m: m.series("llm_runtime_up", pod="vllm-a", runtime="vllm"), what="first scrape")
    up = m.series("llm_runtime_up", pod="vllm-a")[0]
    assert up.value == 1
    assert {k: up.labels[k] for k in ("namespace", "pod", "runtime", "model", "route_class", "team")} == {
        "namespace": "llm", "pod": "vllm-a", "runtime": "vllm",
        "model": "mistral-7b", "route_class": "interactive", "team": "platform-ai",
    }
    # The runtime's own model_name label is not exported.
    assert all("model_name" not in s.labels for s in m.samples)
    broken = scrape_when(
        url, lambda m: m.value("llm_runtime_scrape_errors_total", pod="vllm-broken", reason="connect") >= 1,
        what="connect errors for the broken pod",
    )
    assert one(broken, "llm_runtime_up", "vllm-broken") == 0
    assert not broken.series("llm_runtime_requests_waiting", pod="vllm-broken")
    assert one(broken, "llm_runtime_up", "vllm-a") == 1


def test_burst_raises_waiting_and_queue_time_exactly_as_the_runtime_says(stack):
    sim, url = stack
    wait_until(lambda: scrape(url).series("llm_runtime_requests_waiting", pod="vllm-a"), timeout=10, what="first scrape")
    threads = [
        threading.Thread(target=post_json, args=(sim.url + "/v1/chat/completions",
                         {"model": "mistral-7b", "messages": [{"role": "user", "content": f"burst {i}"}], "max_tokens": 12}))
        for i in range(4)
    ]
    for t in threads:
        t.start()

    # One runs, three wait; the waiting count then steps down as each finishes.
    # The collector's value must equal the simulator's own gauge.
    def agree_with_waiting():
        ours = scrape(url).value("llm_runtime_requests_waiting", pod="vllm-a")
        theirs = scrape(sim.url + "/metrics").value("vllm:num_requests_waiting")
        return ours if ours == theirs and ours >= 2 else None

    assert wait_until(agree_with_waiting, timeout=10, interval=0.05, what="waiting ≥ 2 in both") >= 2
    for t in threads:
        t.join(20)
    own = scrape(sim.url + "/metrics")
    assert own.value("vllm:request_queue_time_seconds_count") == 4
    assert own.value("vllm:request_queue_time_seconds_sum") > 1.0

    def queue_matches():
        m = scrape(url)
        return m if (
            m.value("llm_runtime_queue_time_seconds_count", pod="vllm-a") == own.value("vllm:request_queue_time_seconds_count")
            and abs(m.value("llm_runtime_queue_time_seconds_sum", pod="vllm-a") - own.value("vllm:request_queue_time_seconds_sum")) < 1e-9
        ) else None

    m = wait_until(queue_matches, timeout=10, what="queue time histogram equal to the runtime's")
    # Native vLLM buckets survive normalization.
    ours = {s.labels["le"]: s.value for s in m.series("llm_runtime_queue_time_seconds_bucket", pod="vllm-a")}
    theirs = {s.labels["le"]: s.value for s in own.series("vllm:request_queue_time_seconds_bucket")}
    assert {float(k): v for k, v in ours.items()} == {float(k): v for k, v in theirs.items()}
    assert one(m, "llm_runtime_generation_tokens_total", "vllm-a") == own.value("vllm:generation_tokens_total") == 48
    assert one(m, "llm_runtime_requests_total", "vllm-a", outcome="length") == 4


def test_restart_shows_down_then_up_and_counters_stay_rate_safe(stack):
    sim, url = stack
    chat = sim.url + "/v1/chat/completions"

    def gen(n: int):
        r = post_json(chat, {"model": "mistral-7b", "messages": [{"role": "user", "content": "x"}], "max_tokens": n})
        assert r.status == 200

    gen(5)
    samples: list[float] = []

    def counter_is(v):
        m = scrape(url)
        c = m.series("llm_runtime_generation_tokens_total", pod="vllm-a")
        if c:
            samples.append(c[0].value)
        return m if c and c[0].value == v else None

    wait_until(lambda: counter_is(5), timeout=10, what="5 tokens exported")
    assert post_json(sim.url + "/admin/restart", {}).status == 200
    down = scrape_when(url, lambda m: m.value("llm_runtime_up", pod="vllm-a") == 0 and m.series("llm_runtime_up", pod="vllm-a"),
                       what="runtime down")
    assert not down.series("llm_runtime_generation_tokens_total", pod="vllm-a"), "down runtime exports no stale counters"
    wait_until(lambda: scrape(url).value("llm_runtime_up", pod="vllm-a") == 1, timeout=15, what="runtime back up")
    assert scrape(sim.url + "/metrics").value("vllm:generation_tokens_total") == 0, "the runtime really restarted"
    gen(3)
    m = wait_until(lambda: counter_is(8), timeout=10, what="counter continues from 5 to 8")
    assert one(m, "llm_runtime_restarts_total", "vllm-a") == 1
    # Monotonic across the restart: rate()/increase() see 8 tokens, not 5 + 8.
    assert all(b >= a for a, b in zip(samples, samples[1:])), samples
    assert 5 in samples and samples[-1] == 8, samples
    check_with_promtool(samples)


def check_with_promtool(samples: list[float]) -> None:
    """If promtool is installed, let Prometheus itself confirm that the
    exported series has no counter reset across the runtime restart."""
    promtool = shutil.which("promtool")
    if promtool is None:
        return
    import tempfile
    from pathlib import Path

    values = " ".join(str(int(v)) for v in samples)
    with tempfile.TemporaryDirectory() as d:
        Path(d, "rules.yml").write_text("groups: []\n")
        test = Path(d, "test.yml")
        test.write_text(
            "rule_files: [rules.yml]\nevaluation_interval: 1m\ntests:\n- interval: 1m\n"
            f"  input_series:\n  - series: 'llm_runtime_generation_tokens_total{{pod=\"vllm-a\"}}'\n    values: '{values}'\n"
            "  promql_expr_test:\n"
            f"  - expr: resets(llm_runtime_generation_tokens_total[{len(samples) + 1}m])\n"
            f"    eval_time: {len(samples) - 1}m\n"
            "    exp_samples:\n    - labels: '{pod=\"vllm-a\"}'\n      value: 0\n"
        )
        r = subprocess.run([promtool, "test", "rules", str(test)], capture_output=True, text=True, timeout=60, cwd=d)
        assert r.returncode == 0, r.stdout + r.stderr
