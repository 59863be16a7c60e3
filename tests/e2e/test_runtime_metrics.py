"""End-to-end: runtime saturation seen by the real exporter, through Envoy.

Supervised `llm-sim` runtimes run as pods on the fake Kubernetes API; the
real `gpu-exporter` (fake NVML with one GPU, fake kubelet giving that GPU to
the pod) finds them through its pod watch and publishes `llm_runtime_*`.
Traffic goes through real Envoy with the tokentap filter. Expected values
always come from the simulator's own /metrics (its vLLM names), never from
the exporter; the gateway's own metrics are a second, independent witness.

Timing model of the burst (see docs/simulator.md): `--max-num-seqs 2`, a
200 ms prefill and 200 ms between tokens, 9 output tokens, so each request
holds its slot 200 + 8 x 200 = 1800 ms. Six concurrent requests run as three
batches of two: the waiting queue sits at 4, then 2, then 0, each level for
~1.8 s, i.e. about six exporter scrape intervals (300 ms), which is what
makes a same-moment comparison of both views possible without racing.
"""

from __future__ import annotations

import threading

import pytest

from exporter_stack import (
    NvmlScenario,
    allocation,
    start_exporter,
    start_fake_kube_api,
    start_fake_kubelet,
)
from harness import free_port, parse_exposition, post_json, sse_events, stream_timed
from runtime_stack import (
    WORKLOAD_SERIES_LABELS,
    poll_gauges,
    promtool_expect_resets,
    runtime_pod,
    sim_scrape,
    start_sim,
    steps,
)
from stack import start_envoy

POD = "vllm-a"
BROKEN = "vllm-broken"
GPU = "GPU-0f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9"

MAX_NUM_SEQS = 2
PREFILL_MS = 200
ITL_MS = 200
OUTPUT_TOKENS = 9
BURST = 6
#: Requests queued behind the running batch once the whole burst arrived.
PEAK_WAITING = BURST - MAX_NUM_SEQS

#: Labels every per-pod `llm_runtime_*` series of POD carries, exactly.
POD_LABELS = {"namespace": "llm", "pod": POD, "runtime": "vllm", **WORKLOAD_SERIES_LABELS}
#: The only labels a series may add to those (docs/runtime-metrics.md).
EXTRA_LABELS = {"le", "outcome", "reason"}


@pytest.fixture
def cluster(logdir):
    """A supervised simulator pod plus a neighbour pod whose port is closed,
    on the fake API; the exporter scraping both every 300 ms."""
    procs = []
    try:
        sim = start_sim(
            logdir, "--supervise", "--restart-delay-ms", "1500",
            "--max-num-seqs", str(MAX_NUM_SEQS), "--ttft-ms", str(PREFILL_MS), "--itl-ms", str(ITL_MS),
            name="sim-a",
        )
        procs.append(sim.proc)
        kube = start_fake_kube_api(logdir, [runtime_pod(POD, sim.port), runtime_pod(BROKEN, free_port())])
        procs.append(kube)
        kubelet = start_fake_kubelet(
            logdir,
            [allocation("llm", POD, "vllm", "nvidia.com/gpu", GPU)],
            [{"resource_name": "nvidia.com/gpu", "device_ids": [GPU]}],
        )
        procs.append(kubelet)
        scenario = NvmlScenario(logdir / "nvml.json")
        scenario.write({
            "driver_version": "550.54.15",
            "cuda_driver_version": 12040,
            "gpus": [{"uuid": GPU, "name": "NVIDIA H100 80GB HBM3", "minor_number": 0, "utilization_gpu_percent": 91}],
        })
        exporter = start_exporter(logdir, scenario=scenario, kubelet=kubelet, kube_api=kube, runtime=True)
        procs.append(exporter)
        exporter.scrape_when(
            lambda s: s.value("llm_runtime_up", pod=POD) == 1 and s.series("llm_runtime_requests_waiting", pod=POD),
            timeout=20, what="first successful scrape of the simulator pod",
        )
        yield sim, exporter
    finally:
        for p in reversed(procs):
            p.stop()


def exported(scrape, name: str, **labels) -> float:
    """The single exported sample of POD for `name` (+ extra labels)."""
    found = scrape.series(name, pod=POD, **labels)
    assert len(found) == 1, (name, labels, scrape.label_sets(name))
    return found[0].value


def runs(timeline: list[tuple[float, float | None]]) -> list[tuple[float | None, float, float]]:
    """(level, first seen, last seen) for each run of equal values in a timeline."""
    out: list[tuple[float | None, float, float]] = []
    for at, value in timeline:
        if out and out[-1][0] == value:
            out[-1] = (value, out[-1][1], at)
        else:
            out.append((value, at, at))
    return out


def buckets(scrape, name: str, **match) -> dict[float, float]:
    return {float(s.labels["le"]): s.value for s in scrape.series(name, **match)}


def test_every_series_carries_the_workload_labels_and_a_broken_neighbour_hides_nothing(cluster):
    sim, exporter = cluster
    s = exporter.scrape_when(
        lambda s: s.value("llm_runtime_scrape_errors_total", pod=BROKEN, reason="connect") >= 2
        and s.series("llm_gpu_up", pod=POD),
        what="connect errors for the broken pod and the GPU attributed",
    )
    ours = [x for x in s.samples if x.name.startswith("llm_runtime_") and x.labels.get("pod") == POD]
    names = {x.name for x in ours}
    # The whole schema is there for a healthy vLLM pod...
    for name in ("llm_runtime_up", "llm_runtime_requests_running", "llm_runtime_requests_waiting",
                 "llm_runtime_kv_cache_usage_ratio", "llm_runtime_generation_tokens_total",
                 "llm_runtime_queue_time_seconds_bucket", "llm_runtime_time_to_first_token_seconds_count",
                 "llm_runtime_requests_total", "llm_runtime_restarts_total"):
        assert name in names, name
    # ...and every one of its series has exactly the pod's identity and workload labels.
    for x in ours:
        base = {k: v for k, v in x.labels.items() if k not in EXTRA_LABELS}
        assert base == POD_LABELS, (x.name, x.labels)
    assert all("model_name" not in x.labels and "engine" not in x.labels for x in s.samples)
    assert exported(s, "llm_runtime_up") == 1
    # The GPU the kubelet gave the pod carries the same join labels.
    gpu = s.series("llm_gpu_up", gpu_uuid=GPU)
    assert len(gpu) == 1 and gpu[0].value == 1
    for key in ("namespace", "pod", "model", "route_class", "team"):
        assert gpu[0].labels[key] == POD_LABELS[key], key

    # The neighbour whose port is closed: down, says why, exports no stale
    # runtime series, and the healthy pod is still scraped.
    broken = {**POD_LABELS, "pod": BROKEN}
    assert s.one("llm_runtime_up", **broken).value == 0
    assert not s.series("llm_runtime_requests_waiting", pod=BROKEN)
    assert not s.series("llm_runtime_generation_tokens_total", pod=BROKEN)
    assert s.value("llm_runtime_scrape_errors_total", pod=POD) == 0
    assert s.one("llm_runtime_targets").value == 2
    before = s.value("llm_runtime_scrape_errors_total", pod=BROKEN)
    later = exporter.scrape_when(
        lambda x: x.value("llm_runtime_scrape_errors_total", pod=BROKEN) > before, what="another failed scrape"
    )
    assert later.value("llm_runtime_up", pod=POD) == 1


def test_burst_through_envoy_raises_waiting_and_queue_time_exactly_as_the_runtime_says(cluster, logdir, wasm_path):
    sim, exporter = cluster
    envoy = start_envoy(logdir, stable_port=sim.port)
    try:
        _burst_and_compare(sim, exporter, envoy)
    finally:
        envoy.stop()


def _burst_and_compare(sim, exporter, envoy):
    results: list[tuple[int, bytes] | BaseException] = []
    lock = threading.Lock()

    def send(i: int) -> None:
        payload = {
            "model": "mistral-7b",
            "messages": [{"role": "user", "content": f"burst request {i}"}],
            "max_tokens": OUTPUT_TOKENS,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        try:
            status, _, body, _ = stream_timed(envoy.url + "/v1/chat/completions", payload,
                                              headers={"x-tenant-id": "acme"}, timeout=30)
            out: tuple[int, bytes] | BaseException = (status, body)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            out = exc
        with lock:
            results.append(out)

    threads = [threading.Thread(target=send, args=(i,), daemon=True) for i in range(BURST)]
    for t in threads:
        t.start()

    pairs = {
        "waiting": ("llm_runtime_requests_waiting", "vllm:num_requests_waiting"),
        "running": ("llm_runtime_requests_running", "vllm:num_requests_running"),
    }

    def drained(polls) -> bool:
        last = polls[-1]
        return (
            all(not t.is_alive() for t in threads)
            and last.exported == {"waiting": 0, "running": 0}
            and last.own == {"waiting": 0, "running": 0}
        )

    polls = poll_gauges(exporter.scrape, sim, pairs, POD, until=drained, timeout=40)
    for t in threads:
        t.join(5)
    assert len(results) == BURST
    for r in results:
        assert not isinstance(r, BaseException), r
        status, body = r
        assert status == 200, body[:300]
        assert sse_events(body)[-1] == b"[DONE]"

    exp_waiting = [p.exported["waiting"] for p in polls]
    own_waiting = [p.own["waiting"] for p in polls]
    # The runtime really queued as designed, and the exporter saw the same peak.
    assert max(own_waiting) == PEAK_WAITING, steps(own_waiting)
    assert max(exp_waiting) == PEAK_WAITING, steps(exp_waiting)
    # At each plateau, a poll in which both views were read back to back and
    # agree exactly, with the full batch running.
    for level in range(PEAK_WAITING, -1, -MAX_NUM_SEQS):
        agreeing = [p for p in polls if p.exported["waiting"] == p.own["waiting"] == level
                    and p.exported["running"] == p.own["running"] == MAX_NUM_SEQS]
        assert agreeing, (level, [(round(p.at, 2), p.exported, p.own) for p in polls])
    # After the peak, the exported queue only drains (FIFO, nothing new arrives),
    # through the same plateaus the runtime went through.
    after_peak = exp_waiting[exp_waiting.index(PEAK_WAITING):]
    assert all(b <= a for a, b in zip(after_peak, after_peak[1:])), steps(after_peak)
    # A level seen for 0.7 s or more is a plateau (each lasts ~1.8 s in the
    # runtime); anything else is a scrape that caught the few milliseconds
    # between two finishing requests, held for one 300 ms scrape interval.
    timeline = [(p.at, p.exported["waiting"]) for p in polls][exp_waiting.index(PEAK_WAITING):]
    plateaus = [level for level, first, last in runs(timeline) if last - first >= 0.7]
    assert plateaus == list(range(PEAK_WAITING, -1, -MAX_NUM_SEQS)), runs(timeline)

    # Queue time: the exporter's histogram is the runtime's, bucket for bucket.
    own = sim_scrape(sim)
    assert own.value("vllm:request_queue_time_seconds_count") == BURST
    s = exporter.scrape_when(
        lambda s: s.value("llm_runtime_queue_time_seconds_count", pod=POD) == BURST
        and s.value("llm_runtime_generation_tokens_total", pod=POD) == BURST * OUTPUT_TOKENS,
        what="the finished burst exported",
    )
    assert exported(s, "llm_runtime_queue_time_seconds_count") == own.value("vllm:request_queue_time_seconds_count")
    # Exactly equal: between resets the exporter serves the runtime's own value.
    assert exported(s, "llm_runtime_queue_time_seconds_sum") == own.value("vllm:request_queue_time_seconds_sum")
    ours = buckets(s, "llm_runtime_queue_time_seconds_bucket", pod=POD)
    theirs = buckets(own, "vllm:request_queue_time_seconds_bucket")
    assert ours == theirs
    # Two requests never waited, two waited one batch (~1.8 s), two waited two (~3.6 s).
    assert theirs[0.3] == MAX_NUM_SEQS and theirs[1.5] == MAX_NUM_SEQS
    assert theirs[2.0] == 2 * MAX_NUM_SEQS and theirs[5.0] == BURST
    batch_s = (PREFILL_MS + (OUTPUT_TOKENS - 1) * ITL_MS) / 1000
    ideal_queue_sum = MAX_NUM_SEQS * (1 * batch_s + 2 * batch_s)
    assert 0.9 * ideal_queue_sum <= own.value("vllm:request_queue_time_seconds_sum") <= 1.1 * ideal_queue_sum
    # Tokens and outcomes the same way.
    assert exported(s, "llm_runtime_generation_tokens_total") == own.value("vllm:generation_tokens_total")
    assert exported(s, "llm_runtime_prompt_tokens_total") == own.value("vllm:prompt_tokens_total")
    assert exported(s, "llm_runtime_requests_total", outcome="length") == BURST
    ttft_ours = buckets(s, "llm_runtime_time_to_first_token_seconds_bucket", pod=POD)
    assert ttft_ours == buckets(own, "vllm:time_to_first_token_seconds_bucket")

    # The gateway saw the same requests, the same tokens, and the queueing in its TTFT.
    envoy.flush_wait()
    g = parse_exposition(envoy.stats_prometheus())
    requests = g.series("llm_gateway_requests_total", route="chat")
    assert [r.labels for r in requests] == [{
        "route": "chat", "tenant": "acme", "backend": "llm_stable", "status": "200", **WORKLOAD_SERIES_LABELS,
    }]
    assert requests[0].value == BURST
    assert g.value("llm_gateway_tokens_total", route="chat", token_type="completion", source="usage") == \
        exported(s, "llm_runtime_generation_tokens_total")
    assert g.value("llm_gateway_tokens_total", route="chat", token_type="prompt", source="usage") == \
        exported(s, "llm_runtime_prompt_tokens_total")
    ttft = buckets(g, "llm_gateway_time_to_first_token_milliseconds_bucket", route="chat")
    assert g.value("llm_gateway_time_to_first_token_milliseconds_count", route="chat") == BURST
    # Requests that did not queue see about the prefill time; every queued one
    # sees far more than the prefill, exactly as many as the runtime queued.
    not_queued = theirs[0.3]
    assert ttft[500.0] == not_queued
    assert BURST - ttft[1000.0] == BURST - not_queued == 4
    assert ttft[5000.0] == BURST
    ttft_sum_ms = g.value("llm_gateway_time_to_first_token_milliseconds_sum", route="chat")
    queue_sum_ms = 1000 * own.value("vllm:request_queue_time_seconds_sum")
    # Gateway TTFT = runtime queue + prefill + proxy time. Envoy's histogram
    # sum is approximated from its log-linear bins (two significant digits),
    # hence the 5 %; without the queueing the sum would be ~1.2 s, not ~12 s.
    expected_ms = queue_sum_ms + BURST * PREFILL_MS
    assert expected_ms * 0.95 <= ttft_sum_ms <= expected_ms * 1.05 + BURST * 50, (ttft_sum_ms, expected_ms)


def test_restart_shows_down_then_up_and_counters_stay_rate_safe(cluster):
    sim, exporter = cluster
    chat = sim.url + "/v1/chat/completions"

    def generate(tokens: int) -> None:
        r = post_json(chat, {"model": "mistral-7b", "messages": [{"role": "user", "content": "x"}], "max_tokens": tokens},
                      headers={"x-sim-ttft-ms": "5", "x-sim-itl-ms": "5"})
        assert r.status == 200, r.body[:300]

    history: list[dict[tuple, float]] = []
    up_seen: list[float] = []

    def record(s):
        """Every counter-like series of POD in one scrape (counters, histogram parts)."""
        row = {
            (x.name, tuple(sorted(x.labels.items()))): x.value
            for x in s.samples
            if x.labels.get("pod") == POD and x.name.startswith("llm_runtime_")
            and x.name.endswith(("_total", "_count", "_sum", "_bucket"))
        }
        history.append(row)
        up = s.series("llm_runtime_up", pod=POD)
        up_seen.append(up[0].value if up else -1)
        return s

    tokens_key = ("llm_runtime_generation_tokens_total", tuple(sorted(POD_LABELS.items())))

    def tokens_exported(want):
        def check(s):
            record(s)
            return history[-1].get(tokens_key) == want
        return check

    generate(5)
    before = exporter.scrape_when(tokens_exported(5), what="5 tokens exported")
    start_before = exported(before, "llm_runtime_process_start_time_seconds")
    raw_tokens = [sim_scrape(sim).value("vllm:generation_tokens_total")]
    assert raw_tokens == [5]

    restarted_at = len(history)
    assert post_json(sim.url + "/admin/restart", {}).status == 200
    down = exporter.scrape_when(lambda s: record(s) and s.value("llm_runtime_up", pod=POD) == 0
                                and s.series("llm_runtime_up", pod=POD), what="runtime down")
    assert not down.series("llm_runtime_generation_tokens_total", pod=POD), "a down runtime exports no stale counters"
    assert not down.series("llm_runtime_requests_waiting", pod=POD)
    assert down.value("llm_runtime_scrape_errors_total", pod=POD, reason="connect") >= 1
    exporter.scrape_when(lambda s: record(s) and s.value("llm_runtime_up", pod=POD) == 1, timeout=15, what="runtime back up")
    own = sim_scrape(sim)
    assert own.value("vllm:generation_tokens_total") == 0, "the runtime really restarted from zero"
    raw_tokens.append(0)

    generate(3)
    raw_tokens.append(sim_scrape(sim).value("vllm:generation_tokens_total"))
    assert raw_tokens == [5, 0, 3]
    after = exporter.scrape_when(tokens_exported(8), what="exported counter continues 5 -> 8")
    assert exported(after, "llm_runtime_restarts_total") == 1
    assert exported(after, "llm_runtime_process_start_time_seconds") > start_before
    assert exported(after, "llm_runtime_requests_total", outcome="length") == 2
    assert exported(after, "llm_runtime_queue_time_seconds_count") == 2

    # up went 1 -> 0 -> 1 in the exporter.
    assert steps(up_seen) == [1, 0, 1], steps(up_seen)
    # No exported counter ever went down across the restart (absent while down),
    # so rate()/increase() see what the runtime did: 8 tokens, not 5 + 8 or a reset.
    keys = set().union(*history)
    for key in keys:
        seq = [row[key] for row in history if key in row]
        assert all(b >= a for a, b in zip(seq, seq[1:])), (key, seq)
    # The runtime counts tokens as it generates them, so a scrape may catch a
    # request half done; what matters is where each side of the restart ends.
    before_restart = [row[tokens_key] for row in history[:restarted_at] if tokens_key in row]
    after_restart = [row[tokens_key] for row in history[restarted_at:] if tokens_key in row]
    assert before_restart[-1] == 5 and all(0 <= v <= 5 for v in before_restart), before_restart
    assert after_restart[-1] == 8 and all(5 <= v <= 8 for v in after_restart), after_restart
    tokens = before_restart + after_restart
    # Prometheus agrees: no reset in the exported series, one in the runtime's own.
    promtool_expect_resets({"exported": (steps(tokens), 0), "runtime": (raw_tokens, 1)})
