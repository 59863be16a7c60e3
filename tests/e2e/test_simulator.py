"""End-to-end checks of the real `llm-sim` binary.

Every number asserted here follows from the documented token accounting and
latency model in docs/simulator.md, not from the simulator's own output.
"""

from __future__ import annotations

import json
import math
import socket
import threading
import time

import pytest

from harness import get, http_request, post_json, scrape, wait_until
from runtime_stack import start_sim, timed_sse

MODEL = "mistral-7b"
CHAT = "/v1/chat/completions"


def text_tokens(s: str) -> int:
    return max(1, math.ceil(len(s.encode()) / 4))


def chat_tokens(*contents: str) -> int:
    return 3 + sum(4 + text_tokens(c) for c in contents)


def chat(content: str, **extra) -> dict:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}]}
    body.update(extra)
    return body


@pytest.fixture
def sim(tmp_path):
    s = start_sim(tmp_path, "--model", MODEL, "--ttft-ms", "80", "--itl-ms", "15", "--seed", "7", env={"POD_NAME": "sim-0"})
    yield s
    s.proc.stop()


def test_streaming_format_usage_and_ttft(sim):
    prompt = "Explain continuous batching in one sentence."
    st = timed_sse(sim.url + CHAT, chat(prompt, max_tokens=6, stream=True, stream_options={"include_usage": True}))
    assert st.status == 200
    assert st.headers["content-type"].startswith("text/event-stream")
    assert st.headers.get("transfer-encoding") == "chunked"
    assert st.headers.get("x-inference-pod") == "sim-0"
    assert st.complete and st.error is None
    payloads = [p for _, p in st.events]
    assert payloads[-1] == b"[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    # role-only first event, 6 token events, usage chunk
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    tokens = chunks[1:-1]
    assert len(tokens) == 6
    assert all(c["choices"][0]["delta"]["content"] for c in tokens)
    assert [c["choices"][0]["finish_reason"] for c in tokens] == [None] * 5 + ["length"]
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {
        "prompt_tokens": chat_tokens(prompt),
        "total_tokens": chat_tokens(prompt) + 6,
        "completion_tokens": 6,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    # Timing: the role event leaves at once, the first token at TTFT, then one per ITL.
    t_role = st.events[0][0]
    t_first = st.events[1][0]
    assert t_role < 0.040, t_role
    assert 0.080 <= t_first <= 0.080 + 0.015, t_first
    gaps = [b[0] - a[0] for a, b in zip(st.events[1:7], st.events[2:7])]
    for g in gaps:
        assert 0.010 <= g <= 0.025, gaps


def test_generated_text_has_multibyte_utf8(sim):
    r = post_json(sim.url + CHAT, chat("utf8 please", max_tokens=24))
    text = r.json()["choices"][0]["message"]["content"]
    assert any(len(ch.encode()) >= 3 for ch in text), text
    # Streaming splits the same text into one event per token.
    st = timed_sse(sim.url + CHAT, chat("utf8 please", max_tokens=24, stream=True))
    streamed = "".join(json.loads(p)["choices"][0]["delta"].get("content", "") for _, p in st.events[:-1])
    assert streamed == text


def test_non_streaming_usage_and_finish_reasons(sim):
    prompt = "x" * 37
    r = post_json(sim.url + CHAT, chat(prompt, max_tokens=5))
    assert r.status == 200
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["prompt_tokens"] == chat_tokens(prompt)
    assert body["usage"]["completion_tokens"] == 5
    # Fewer tokens than max_tokens: a natural stop.
    r = post_json(sim.url + CHAT, chat("short", max_tokens=50), headers={"x-sim-output-tokens": "3"})
    assert r.json()["choices"][0]["finish_reason"] == "stop"
    assert r.json()["usage"]["completion_tokens"] == 3
    # Completions API: prompt tokens are ceil(bytes / 4).
    r = post_json(sim.url + "/v1/completions", {"model": MODEL, "prompt": "abcdefghij", "max_tokens": 2})
    assert r.json()["object"] == "text_completion"
    assert r.json()["usage"]["prompt_tokens"] == 3
    # No usage when asked not to.
    r = post_json(sim.url + CHAT, chat("hi", max_tokens=2), headers={"x-sim-no-usage": "1"})
    assert "usage" not in r.json()


def test_prefix_cache_reports_cached_tokens(sim):
    prompt = "shared system prompt " * 20
    first = post_json(sim.url + CHAT, chat(prompt, max_tokens=1)).json()["usage"]
    second = post_json(sim.url + CHAT, chat(prompt, max_tokens=1)).json()["usage"]
    assert first["prompt_tokens_details"]["cached_tokens"] == 0
    n = chat_tokens(prompt)
    assert second["prompt_tokens_details"]["cached_tokens"] == (n - 1) // 16 * 16
    m = scrape(sim.url + "/metrics")
    assert m.value("vllm:prefix_cache_queries_total") == 2 * n
    assert m.value("vllm:prefix_cache_hits_total") == (n - 1) // 16 * 16


def test_errors_are_openai_shaped(sim):
    r = post_json(sim.url + CHAT, {"model": "nope", "messages": []})
    assert r.status == 404
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == 404
    r = post_json(sim.url + CHAT, chat("x"), headers={"x-sim-fail": "503"})
    assert r.status == 503
    assert r.json()["error"]["type"] == "ServiceUnavailableError"
    status, _, body = http_request("POST", sim.url + CHAT, body="{not json", headers={"content-type": "application/json"})
    assert status == 400 and "error" in json.loads(body)


def test_reset_after_n_events_aborts_the_connection(sim):
    st = timed_sse(
        sim.url + CHAT,
        chat("reset me", max_tokens=10, stream=True),
        headers={"x-sim-reset-after": "3"},
    )
    assert st.status == 200
    assert not st.complete, "chunked body must not be terminated"
    contents = [json.loads(p)["choices"][0]["delta"].get("content") for _, p in st.events]
    assert contents[0] == ""  # role event
    assert len(contents) == 1 + 3
    assert b"[DONE]" not in st.raw
    wait_until(lambda: scrape(sim.url + "/metrics").value("vllm:request_success_total", finished_reason="abort") == 1)
    assert scrape(sim.url + "/metrics").value("vllm:num_requests_running") == 0


def test_client_disconnect_aborts_the_sequence(sim):
    s = socket.create_connection(("127.0.0.1", sim.port))
    body = json.dumps(chat("bye", max_tokens=500, stream=True)).encode()
    s.sendall(
        f"POST {CHAT} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n".encode() + body
    )
    s.recv(4096)
    wait_until(lambda: scrape(sim.url + "/metrics").value("vllm:num_requests_running") == 1)
    s.close()
    wait_until(lambda: scrape(sim.url + "/metrics").value("vllm:num_requests_running") == 0, timeout=10)
    assert scrape(sim.url + "/metrics").value("vllm:request_success_total", finished_reason="abort") == 1


def test_rag_headers_and_vector_store_outage(sim):
    r = post_json(sim.url + CHAT, chat("what is kv cache?", max_tokens=2), headers={"x-rag-collection": "docs", "x-rag-top-k": "6"})
    assert r.status == 200
    h = r.headers
    assert h["x-rag-collection"] == "docs"
    assert float(h["x-rag-retrieval-ms"]) == 12.5
    assert 0.0 <= float(h["x-rag-top-score"]) <= 1.0
    assert h["x-rag-sources"] == "6"
    assert h["x-rag-evaluation"] == "pass"
    assert float(h["x-rag-index-age-seconds"]) == 3600
    # Body form, and a low score fails evaluation.
    body = chat("q", max_tokens=1)
    body["rag"] = {"collection": "kb", "top_k": 2}
    r = post_json(sim.url + CHAT, body, headers={"x-sim-rag-top-score": "0.2"})
    assert r.headers["x-rag-sources"] == "2" and r.headers["x-rag-evaluation"] == "fail"
    # No RAG headers on plain requests.
    r = post_json(sim.url + CHAT, chat("plain", max_tokens=1))
    assert "x-rag-collection" not in r.headers
    # Outage drill through the admin API.
    r = post_json(sim.url + "/admin/config", {"rag_vector_store_down": True, "rag_index_age_seconds": 99})
    assert r.status == 200 and r.json()["rag_vector_store_down"] is True
    assert get(sim.url + "/admin/config").json()["rag_index_age_seconds"] == 99
    r = post_json(sim.url + CHAT, chat("q", max_tokens=1), headers={"x-rag-collection": "docs"})
    assert r.status == 503
    assert r.headers["x-rag-error"] == "vector_store_unreachable"
    assert r.json()["error"]["type"] == "vector_store_unreachable"
    # Non-RAG traffic is unaffected.
    assert post_json(sim.url + CHAT, chat("plain", max_tokens=1)).status == 200
    assert post_json(sim.url + "/admin/config", {"bogus": 1}).status == 400


def test_admin_slow_factor_scales_latency(sim):
    base = timed_sse(sim.url + CHAT, chat("a", max_tokens=1, stream=True))
    post_json(sim.url + "/admin/config", {"slow_factor": 3})
    slow = timed_sse(sim.url + CHAT, chat("a", max_tokens=1, stream=True))
    assert 0.080 <= base.events[1][0] < 0.100
    assert 0.240 <= slow.events[1][0] < 0.265


def test_metrics_parse_and_match_vllm_names(sim):
    for i in range(3):
        post_json(sim.url + CHAT, chat(f"q{i}", max_tokens=4))
    m = scrape(sim.url + "/metrics")
    types = {
        "vllm:num_requests_running": "gauge",
        "vllm:num_requests_waiting": "gauge",
        "vllm:kv_cache_usage_perc": "gauge",
        "vllm:prefix_cache_queries": "counter",
        "vllm:prefix_cache_hits": "counter",
        "vllm:num_preemptions": "counter",
        "vllm:prompt_tokens": "counter",
        "vllm:generation_tokens": "counter",
        "vllm:request_success": "counter",
        "vllm:time_to_first_token_seconds": "histogram",
        "vllm:inter_token_latency_seconds": "histogram",
        "vllm:request_time_per_output_token_seconds": "histogram",
        "vllm:e2e_request_latency_seconds": "histogram",
        "vllm:request_queue_time_seconds": "histogram",
        "vllm:request_prefill_time_seconds": "histogram",
        "vllm:request_decode_time_seconds": "histogram",
        "vllm:iteration_tokens_total": "histogram",
        "vllm:request_prompt_tokens": "histogram",
        "vllm:request_generation_tokens": "histogram",
        "vllm:cache_config_info": "gauge",
    }
    for fam, kind in types.items():
        assert m.type_of(fam) == kind, (fam, m.type_of(fam))
    labels = {"model_name": MODEL, "engine": "0"}
    assert m.one("vllm:generation_tokens_total", **labels).value == 12
    assert m.one("vllm:prompt_tokens_total", **labels).value == sum(chat_tokens(f"q{i}") for i in range(3))
    assert m.value("vllm:request_success_total", finished_reason="length") == 3
    assert m.value("vllm:time_to_first_token_seconds_count") == 3
    assert m.value("vllm:inter_token_latency_seconds_count") == 9
    les = [s.labels["le"] for s in m.series("vllm:time_to_first_token_seconds_bucket")]
    assert les[:3] == ["0.001", "0.005", "0.01"] and les[-2:] == ["2560.0", "+Inf"]
    # TTFT of 80 ms falls in the (0.06, 0.08] or (0.08, 0.1] bucket, never below.
    assert m.one("vllm:time_to_first_token_seconds_bucket", le="0.06", **labels).value == 0
    assert m.one("vllm:time_to_first_token_seconds_bucket", le="0.1", **labels).value == 3
    assert m.series("vllm:prompt_tokens_created")
    info = m.series("vllm:cache_config_info")[0]
    assert info.labels["block_size"] == "16"
    assert "# TYPE vllm:prompt_tokens_total counter" in m.text


def test_batching_queues_beyond_max_num_seqs(tmp_path):
    s = start_sim(tmp_path, "--max-num-seqs", "2", "--ttft-ms", "50", "--itl-ms", "20", name="sim-batch")
    try:
        results = []

        def one():
            results.append(post_json(s.url + CHAT, chat("same", max_tokens=10)).json())

        threads = [threading.Thread(target=one) for _ in range(4)]
        for t in threads:
            t.start()
        seen = wait_until(
            lambda: (lambda m: m if m.value("vllm:num_requests_waiting") == 2 else None)(scrape(s.url + "/metrics")),
            timeout=5,
            interval=0.01,
            what="two waiting requests",
        )
        assert seen.value("vllm:num_requests_running") == 2
        assert seen.value("vllm:kv_cache_usage_perc") > 0
        for t in threads:
            t.join(10)
        assert len(results) == 4
        m = scrape(s.url + "/metrics")
        assert m.value("vllm:request_queue_time_seconds_count") == 4
        # Two requests waited for a whole first batch, 50 ms + 9 × 20 ms = 230 ms
        # after it started, less the few ms by which their threads started later.
        assert 0.38 <= m.value("vllm:request_queue_time_seconds_sum") <= 0.465
        assert m.value("vllm:num_requests_waiting") == 0
    finally:
        s.proc.stop()


def test_models_health_and_embeddings(tmp_path):
    s = start_sim(tmp_path, "--model", "a,b", "--model", "c", "--ttft-ms", "5", name="sim-models")
    try:
        ids = [d["id"] for d in get(s.url + "/v1/models").json()["data"]]
        assert ids == ["a", "b", "c"]
        r = post_json(s.url + "/v1/embeddings", {"model": "b", "input": ["abcd", "abcdefgh"]})
        assert r.status == 200
        assert r.json()["usage"]["prompt_tokens"] == 3
        assert len(r.json()["data"]) == 2
        assert get(s.url + "/health").status == 200
        # Metrics carry the first served name.
        post_json(s.url + CHAT, {"model": "c", "messages": [], "max_tokens": 1})
        assert scrape(s.url + "/metrics").label_sets("vllm:generation_tokens_total")[0]["model_name"] == "a"
    finally:
        s.proc.stop()


def test_supervised_restart_resets_counters(tmp_path):
    s = start_sim(tmp_path, "--supervise", "--restart-delay-ms", "300", "--ttft-ms", "5", "--itl-ms", "1", name="sim-sup")
    try:
        post_json(s.url + CHAT, chat("before", max_tokens=4))
        before = scrape(s.url + "/metrics")
        assert before.value("vllm:generation_tokens_total") == 4
        start_before = before.value("process_start_time_seconds")
        r = post_json(s.url + "/admin/restart", {})
        assert r.status == 200

        def down():
            try:
                get(s.url + "/health", timeout=0.5)
                return False
            except OSError:
                return True

        wait_until(down, timeout=5, interval=0.01, what="port closed during restart")
        wait_until(lambda: get(s.url + "/health", timeout=0.5).status == 200, timeout=10, what="restarted child")
        after = scrape(s.url + "/metrics")
        assert after.value("vllm:generation_tokens_total") == 0
        assert after.value("process_start_time_seconds") > start_before
        assert s.proc.alive(), "the supervisor itself keeps running"
        post_json(s.url + CHAT, chat("after", max_tokens=2))
        assert scrape(s.url + "/metrics").value("vllm:generation_tokens_total") == 2
    finally:
        s.proc.stop()


def test_error_and_reset_rates_are_seeded(tmp_path):
    def run(seed: str) -> list[int]:
        s = start_sim(tmp_path, "--error-rate", "0.5", "--seed", seed, "--ttft-ms", "1", "--itl-ms", "1", name=f"sim-err-{seed}-{time.monotonic_ns()}")
        try:
            return [post_json(s.url + CHAT, chat("x", max_tokens=1)).status for _ in range(20)]
        finally:
            s.proc.stop()

    a, b = run("3"), run("3")
    assert a == b
    assert 200 in a and any(x in (500, 503) for x in a)
