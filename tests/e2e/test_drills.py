"""Failure drills (docs/operations.md, "Failure drills") against the local
stack: real Envoy + the built filter + llm-sim, all on 127.0.0.1.

Each drill makes one failure happen, bounded to a few seconds of traffic,
and checks that the gateway signals move the way the dashboard panel and the
alert that cover it expect:

* burst traffic      -> requests in flight above the runtime's batch, TTFT up
                        through queueing (LLMSlowFirstToken, LLMRuntimeSaturated)
* longer prompts     -> prompt-token histogram shifts up, TTFT up through
                        prefill (LLMSlowFirstToken)
* runtime restart    -> the stream in flight breaks (upstream_reset), requests
                        during the restart get Envoy's 503 (upstream_unavailable:
                        connection refused, not a timeout),
                        then 200s again (LLMCanaryErrorRegression when it is
                        the canary; pod restarts panel)
* vector-store outage-> llm_rag_errors_total{reason="vector_store_unreachable"},
                        clients get a JSON error, other routes unaffected
                        (LLMRAGRetrievalFailing)

Latencies are compared with wide margins against a baseline measured in the
same drill: the simulator's engine adds whole scheduling waves or whole
prefill times, far above timer noise.
"""

from __future__ import annotations

import socket
import threading
import time

from harness import parse_exposition, post_json, stream_timed, wait_until, get
from ops_stack import bucket_delta, buckets, histogram_quantile
from stack import start_envoy, start_sim

CHAT = "/v1/chat/completions"
RAG_CHAT = "/rag/v1/chat/completions"
TENANT = {"x-tenant-id": "drill"}
TTFT = "llm_gateway_time_to_first_token_milliseconds"


def _stream(envoy, content: str, max_tokens: int) -> int:
    body = {"model": "mistral-7b", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "stream": True, "stream_options": {"include_usage": True}}
    status, _, _, _ = stream_timed(envoy.url + CHAT, body, headers=TENANT, timeout=30)
    return status


def _scrape(envoy):
    return parse_exposition(envoy.stats_prometheus())


def _ttft_buckets(envoy, route: str = "chat"):
    return buckets(_scrape(envoy), TTFT, route=route)


def _active(envoy, route: str = "chat") -> float:
    """The in-flight gauge alone (a full stats dump takes ~100 ms here)."""
    r = get(f"{envoy.admin}/stats/prometheus?filter=llm_gateway_active_requests")
    return parse_exposition(r.body.decode()).value("llm_gateway_active_requests", route=route)


def test_drill_burst_traffic_queues_in_the_runtime(logdir, wasm_path):
    sim = start_sim(logdir, "--ttft-ms", "20", "--itl-ms", "20", "--max-num-seqs", "2")
    envoy = start_envoy(logdir, stable_port=sim.port)
    try:
        for i in range(3):
            assert _stream(envoy, f"baseline {i}", 12) == 200
        envoy.flush_wait()
        before = _ttft_buckets(envoy)
        baseline_p95 = histogram_quantile(0.95, before)

        # 8 streams at once on a runtime that runs 2: four scheduling waves.
        statuses: list[int] = []
        threads = [threading.Thread(target=lambda i=i: statuses.append(_stream(envoy, f"burst {i}", 12))) for i in range(8)]
        peak = {"active": 0.0, "waiting": 0.0}
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
            peak["active"] = max(peak["active"], _active(envoy))
            peak["waiting"] = max(peak["waiting"], parse_exposition(sim.metrics_text()).value("vllm:num_requests_waiting"))
            time.sleep(0.02)
        for t in threads:
            t.join(timeout=10)
        assert statuses == [200] * 8
        envoy.flush_wait()
        burst = bucket_delta(_ttft_buckets(envoy), before)
        burst_p95 = histogram_quantile(0.95, burst)

        assert peak["active"] > 2, f"in-flight requests never exceeded the batch: {peak}"
        assert peak["waiting"] >= 1, peak
        assert burst[-1][1] == 8
        # The last wave waits three waves of 20 + 11 x 20 ms before its prefill.
        assert burst_p95 >= baseline_p95 + 300, (baseline_p95, burst_p95, burst)
        assert _active(envoy) == 0
    finally:
        envoy.stop()
        sim.stop()


def test_drill_longer_prompts_raise_prompt_tokens_and_ttft(logdir, wasm_path):
    sim = start_sim(logdir, "--ttft-ms", "20", "--itl-ms", "5", "--prefill-ms-per-token", "0.2")
    envoy = start_envoy(logdir, stable_port=sim.port)
    try:
        for i in range(3):
            assert _stream(envoy, f"short {i}", 4) == 200
        envoy.flush_wait()
        s = _scrape(envoy)
        short_ttft = buckets(s, TTFT, route="chat")
        short_prompt = buckets(s, "llm_gateway_prompt_tokens", route="chat")

        # ~2000-token prompts, each distinct (no prefix-cache hit): +400 ms prefill.
        for i in range(3):
            assert _stream(envoy, f"{i} " + "the quarterly report covers every region " * 200, 4) == 200
        envoy.flush_wait()
        s = _scrape(envoy)
        long_ttft = bucket_delta(buckets(s, TTFT, route="chat"), short_ttft)
        long_prompt = bucket_delta(buckets(s, "llm_gateway_prompt_tokens", route="chat"), short_prompt)

        le = dict(short_prompt)
        assert le[16.0] == 3 and le[float("inf")] == 3, short_prompt  # short prompts: <= 16 tokens
        le = dict(long_prompt)
        assert le[1024.0] == 0 and le[4096.0] == 3, long_prompt  # long prompts: (1024, 4096] tokens
        assert histogram_quantile(0.95, long_ttft) >= histogram_quantile(0.95, short_ttft) + 200, (short_ttft, long_ttft)
        # Prompt tokens reach the token counter too (the tokens/s panel).
        assert s.value("llm_gateway_tokens_total", route="chat", token_type="prompt", source="usage") > 3 * 2000
    finally:
        envoy.stop()
        sim.stop()


def test_drill_runtime_restart_breaks_streams_then_recovers(logdir, wasm_path):
    sim = start_sim(logdir, "--supervise", "--restart-delay-ms", "1500", "--ttft-ms", "10", "--itl-ms", "100")
    envoy = start_envoy(logdir, stable_port=sim.port)
    try:
        assert post_json(envoy.url + CHAT, {"model": "mistral-7b", "messages": [], "max_tokens": 1}, headers=TENANT).status == 200
        cut: list[int] = []
        stream = threading.Thread(target=lambda: cut.append(_stream(envoy, "a long answer", 30)))
        stream.start()
        wait_until(lambda: _active(envoy) == 1, timeout=5, what="stream in flight")
        time.sleep(0.3)  # a few tokens out
        assert post_json(sim.url + "/admin/restart", {}).status == 200

        def port_closed():
            try:
                socket.create_connection(("127.0.0.1", sim.port), timeout=0.2).close()
                return False
            except OSError:
                return True

        wait_until(port_closed, timeout=5, interval=0.01, what="runtime down")
        during = [post_json(envoy.url + CHAT, {"model": "mistral-7b", "messages": [], "max_tokens": 1}, headers=TENANT, timeout=5) for _ in range(3)]
        stream.join(timeout=10)
        wait_until(lambda: get(sim.url + "/health", timeout=0.5).status == 200, timeout=10, what="runtime back")
        after = post_json(envoy.url + CHAT, {"model": "mistral-7b", "messages": [], "max_tokens": 1}, headers=TENANT)

        assert cut == [200], "the stream had started: 200, then cut"
        assert [r.status for r in during] == [503] * 3
        assert after.status == 200
        envoy.flush_wait()  # the filter publishes its metrics on its tick
        s = _scrape(envoy)
        assert s.value("llm_gateway_errors_total", route="chat", error_type="upstream_reset") == 1
        # The runtime's port is closed: nothing to reach, which is what the
        # clients were told (their 503 body says upstream_unavailable).
        assert s.value("llm_gateway_errors_total", route="chat", error_type="upstream_unavailable") == 3
        assert [r.json()["error"]["type"] for r in during] == ["upstream_unavailable"] * 3
        assert s.value("llm_gateway_requests_total", route="chat", status="503") == 3
        assert s.value("llm_gateway_requests_total", route="chat", status="200") == 3  # first, cut stream, after
        assert s.value("llm_gateway_active_requests", route="chat") == 0
    finally:
        envoy.stop()
        sim.stop()


def test_drill_vector_store_outage(logdir, wasm_path):
    sim = start_sim(logdir, "--ttft-ms", "10", "--itl-ms", "2")
    envoy = start_envoy(logdir, stable_port=sim.port, rag_port=sim.port)
    rag = {"model": "mistral-7b", "messages": [{"role": "user", "content": "what changed in the policy?"}], "max_tokens": 3}
    headers = {**TENANT, "x-rag-collection": "policies"}
    try:
        for _ in range(2):
            assert post_json(envoy.url + RAG_CHAT, rag, headers=headers).status == 200
        assert post_json(sim.url + "/admin/config", {"rag_vector_store_down": True}).status == 200
        down = [post_json(envoy.url + RAG_CHAT, rag, headers=headers) for _ in range(3)]
        plain = post_json(envoy.url + CHAT, rag, headers=TENANT)
        assert post_json(sim.url + "/admin/config", {"rag_vector_store_down": False}).status == 200
        recovered = post_json(envoy.url + RAG_CHAT, rag, headers=headers)

        for r in down:
            assert r.status == 503
            assert r.headers["content-type"].startswith("application/json")
            assert r.json()["error"]["type"] == "vector_store_unreachable"
        assert plain.status == 200, "requests without RAG are unaffected"
        assert recovered.status == 200
        envoy.flush_wait()
        s = _scrape(envoy)
        labels = {"route": "rag-chat", "collection": "policies", "model": "mistral-7b", "team": "platform-ai"}
        assert s.value("llm_rag_errors_total", reason="vector_store_unreachable", **labels) == 3
        assert s.value("llm_gateway_errors_total", route="rag-chat", error_type="upstream_5xx") == 3
        # The alert's ratio on this route: RAG errors over all requests.
        ratio = s.value("llm_rag_errors_total", route="rag-chat") / s.value("llm_gateway_requests_total", route="rag-chat")
        assert ratio == 3 / 6
        # Retrieval kept being measured for the requests that got through.
        assert s.value("llm_rag_retrieval_duration_milliseconds_count", **labels) == 3
        assert not s.series("llm_rag_errors_total", route="chat")
    finally:
        envoy.stop()
        sim.stop()
