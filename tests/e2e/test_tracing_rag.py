"""Prompt-path context end to end: OTLP spans from the filter, decoded by the
independent Python `opentelemetry-proto` package; W3C propagation through
Envoy to the runtime; RAG signals; collector outages.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import time

import pytest

from harness import parse_exposition, post_json, stream_timed, wait_until
from otlp_receiver import OtlpReceiver
from raw_upstream import RawUpstream, Script
from stack import add_cluster, hcm_of, plugin_config, set_plugin_config, start_envoy, start_sim

CHAT = "/v1/chat/completions"
TTFT_MS = 120
ITL_MS = 10
PARENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN = "00f067aa0ba902b7"


def tracing_edit(collector_port: int, **tracing):
    def edit(cfg):
        add_cluster(cfg, "otel_collector", collector_port)
        plugin = plugin_config(cfg)
        plugin["tracing"] = {
            "cluster": "otel_collector",
            "authority": "otel-collector",
            "sample_ratio": 1.0,
            "flush_interval_ms": 200,
            "resource": {"deployment.environment": "e2e"},
            **tracing,
        }
        set_plugin_config(cfg, plugin)

    return edit


def _chat(content: str, max_tokens: int, stream: bool) -> dict:
    body = {"model": "mistral-7b", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def _usage_of(body: bytes, streamed: bool) -> dict:
    if not streamed:
        return json.loads(body)["usage"]
    for block in body.split(b"\n\n"):
        if block.startswith(b"data: {"):
            event = json.loads(block[6:])
            if event.get("usage"):
                return event["usage"]
    raise AssertionError("no usage in stream")


def test_spans_carry_every_attribute_and_continue_the_incoming_trace(logdir, wasm_path):
    with OtlpReceiver() as collector:
        sim = start_sim(logdir, "--ttft-ms", str(TTFT_MS), "--itl-ms", str(ITL_MS))
        envoy = start_envoy(logdir, stable_port=sim.port, edit=tracing_edit(collector.port))
        try:
            # Warm up connections and the VMs so timings below are steady.
            for _ in range(2):
                assert post_json(envoy.url + CHAT, _chat("warm up", 1, False), headers={"x-tenant-id": "warmup"}).status == 200
            headers = {"x-tenant-id": "acme", "traceparent": f"00-{PARENT_TRACE}-{PARENT_SPAN}-01", "tracestate": "vendor=abc"}
            r = post_json(envoy.url + CHAT, _chat("non streaming", 4, False), headers=headers)
            assert r.status == 200
            usage_json = _usage_of(r.body, False)
            status, _, body, _ = stream_timed(envoy.url + CHAT, _chat("streaming", 6, True), headers={"x-tenant-id": "globex"})
            assert status == 200
            usage_stream = _usage_of(body, True)

            spans = [s for s in collector.wait_for_spans(4) if s["attributes"]["tokentap.tenant"] != "warmup"]
            by_stream = {s["attributes"]["gen_ai.request.stream"]: s for s in spans}
            plain, streamed = by_stream[False], by_stream[True]

            for span, usage, tenant in ((plain, usage_json, "acme"), (streamed, usage_stream, "globex")):
                a = span["attributes"]
                assert span["name"] == "chat mistral-7b"
                assert span["kind"] == "SERVER"
                assert a["llm.model"] == "mistral-7b"
                assert a["llm.route_class"] == "interactive"
                assert a["llm.prompt_tokens"] == usage["prompt_tokens"]
                assert a["llm.completion_tokens"] == usage["completion_tokens"]
                assert a["llm.cache_hit"] is False
                assert a["gen_ai.operation.name"] == "chat"
                assert a["gen_ai.provider.name"] == "vllm"
                assert a["gen_ai.request.model"] == "mistral-7b"
                assert a["gen_ai.response.model"] == "mistral-7b"
                assert a["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
                assert a["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
                assert a["gen_ai.usage.cache_read.input_tokens"] == usage["prompt_tokens_details"]["cached_tokens"]
                assert a["gen_ai.response.finish_reasons"] == ["length"]
                assert a["http.request.method"] == "POST"
                assert a["http.route"] == CHAT
                assert a["http.response.status_code"] == 200
                assert a["url.path"] == CHAT
                assert a["tokentap.tenant"] == tenant
                assert a["tokentap.team"] == "platform-ai"
                assert a["tokentap.backend"] == "llm_stable"
                assert a["tokentap.route"] == "chat"
                assert span["status"]["code"] == "UNSET"
                res = span["resource"]
                assert res["service.name"] == "tokentap-gateway"
                assert res["tokentap.plugin.version"]
                assert res["deployment.environment"] == "e2e"
                assert res["k8s.pod.name"] == "llm-gateway-local"  # Envoy node metadata NAME
                assert res["k8s.namespace.name"] == "llm-platform"

            # Parent/child with the incoming traceparent; tracestate kept.
            assert plain["trace_id"] == PARENT_TRACE
            assert plain["parent_span_id"] == PARENT_SPAN
            assert plain["parent_is_remote"] is True
            assert plain["trace_state"] == "vendor=abc"
            # A request without traceparent starts a new trace.
            assert streamed["parent_span_id"] is None
            assert streamed["trace_id"] != PARENT_TRACE

            # Timings agree with the simulator's configured delays.
            a = streamed["attributes"]
            ttft_s = a["gen_ai.response.time_to_first_chunk"]
            assert TTFT_MS / 1000 <= ttft_s <= (TTFT_MS + 10) / 1000
            (event,) = streamed["events"]
            assert event["name"] == "gen_ai.first_token"
            assert abs((event["time_unix_nanos"] - streamed["start_unix_nanos"]) / 1e9 - ttft_s) < 1e-6
            duration_ms = (streamed["end_unix_nanos"] - streamed["start_unix_nanos"]) / 1e6
            expected = TTFT_MS + (6 - 1) * ITL_MS
            assert expected <= duration_ms <= expected + 15, duration_ms
            plain_ms = (plain["end_unix_nanos"] - plain["start_unix_nanos"]) / 1e6
            assert TTFT_MS + 3 * ITL_MS <= plain_ms <= TTFT_MS + 3 * ITL_MS + 15
            assert "gen_ai.response.time_to_first_chunk" not in plain["attributes"]

            # Every export carried spans: VMs with nothing queued send nothing.
            assert all(req.spans for req in collector.requests())
            # The access log carries the same ids (filter state).
            log = [e for e in envoy.access_log_entries(4) if e["tenant"] != "warmup"]
            assert {e["trace_id"] for e in log} == {plain["trace_id"], streamed["trace_id"]}
            assert {e["span_id"] for e in log} == {plain["span_id"], streamed["span_id"]}
        finally:
            envoy.stop()
            sim.stop()


def test_upstream_receives_traceparent_naming_the_gateway_span(logdir, wasm_path):
    with OtlpReceiver() as collector, RawUpstream() as upstream:
        upstream.script(CHAT, Script(200, {"content-type": "application/json"}, [b'{"model":"mistral-7b","usage":{"prompt_tokens":3,"completion_tokens":1}}'], content_length=True))
        envoy = start_envoy(logdir, stable_port=upstream.port, edit=tracing_edit(collector.port, sample_ratio=0.0))
        try:
            # Sampled parent: honoured even with ratio 0 for new traces.
            post_json(envoy.url + CHAT, {"messages": []}, headers={"traceparent": f"00-{PARENT_TRACE}-{PARENT_SPAN}-01"})
            # Unsampled parent: no span, but the context still propagates.
            unsampled = "5bf92f3577b34da6a3ce929d0e0e4736"
            post_json(envoy.url + CHAT, {"messages": []}, headers={"traceparent": f"00-{unsampled}-{PARENT_SPAN}-00"})
            # No parent and ratio 0: a new, unsampled trace.
            post_json(envoy.url + CHAT, {"messages": []})
            spans = collector.wait_for_spans(1)
            time.sleep(0.6)
            assert len(collector.spans()) == 1, "only the sampled request is recorded"
            (span,) = spans
            got = [r.headers.get("traceparent") for r in upstream.received]
            assert got[0] == f"00-{PARENT_TRACE}-{span['span_id']}-01"
            version, trace, parent, flags = got[1].split("-")
            assert (trace, flags) == (unsampled, "00") and parent != PARENT_SPAN
            version, trace, parent, flags = got[2].split("-")
            assert flags == "00" and trace not in (PARENT_TRACE, unsampled)
        finally:
            envoy.stop()


def test_rag_signals_become_metrics_and_span_attributes(logdir, wasm_path):
    with OtlpReceiver() as collector:
        rag = start_sim(logdir, "--ttft-ms", "20", "--rag-retrieval-ms", "12.5", "--rag-index-age-seconds", "5400", name="rag-api")
        envoy = start_envoy(logdir, stable_port=rag.port, rag_port=rag.port, edit=tracing_edit(collector.port))
        try:
            url = envoy.url + "/rag" + CHAT
            for top_k in (3, 5):
                r = post_json(url, _chat("what is our GPU quota policy?", 4, False), headers={"x-tenant-id": "acme", "x-rag-collection": "handbook", "x-rag-top-k": str(top_k)})
                assert r.status == 200, r.body
            # Body fields work too (rag.collection / rag.top_k).
            body = {**_chat("body fields", 2, False), "rag": {"collection": "runbooks", "top_k": 2}}
            assert post_json(url, body, headers={"x-tenant-id": "acme"}).status == 200

            # Vector-store outage: a clear JSON error and a counted reason.
            assert post_json(rag.url + "/admin/config", {"rag_vector_store_down": True}).status == 200
            r = post_json(url, _chat("during outage", 2, False), headers={"x-tenant-id": "acme", "x-rag-collection": "handbook"})
            assert r.status == 503
            assert r.json()["error"]["type"] == "vector_store_unreachable"

            envoy.flush_wait()
            scrape = parse_exposition(envoy.stats_prometheus())
            base = {"route": "rag-chat", "model": "mistral-7b", "route_class": "interactive", "team": "platform-ai", "backend": "rag_api"}
            assert scrape.one("llm_rag_retrieval_duration_milliseconds_count", **base, collection="handbook").value == 2
            assert scrape.one("llm_rag_sources_count", **base, collection="handbook").value == 2
            assert scrape.one("llm_rag_sources_count", **base, collection="runbooks").value == 1
            assert scrape.one("llm_rag_evaluations_total", **base, collection="handbook", result="pass").value == 2
            assert scrape.one("llm_rag_index_age_seconds", **base, collection="handbook").value == 5400
            assert scrape.one("llm_rag_errors_total", **base, collection="handbook", reason="vector_store_unreachable").value == 1
            # top score 0.87 -> 87 (score x 100): in the (80, 90] bucket.
            buckets = {s.labels["le"]: s.value for s in scrape.series("llm_rag_top_score_bucket", collection="handbook")}
            assert buckets["80"] == 0 and buckets["90"] == 2
            assert scrape.value("llm_gateway_errors_total", route="rag-chat", error_type="upstream_5xx") == 1

            spans = collector.wait_for_spans(4)
            handbook = [s for s in spans if s["attributes"].get("rag.collection") == "handbook" and s["attributes"].get("http.response.status_code") == 200]
            assert sorted(s["attributes"]["rag.top_k"] for s in handbook) == [3, 5]
            a = handbook[0]["attributes"]
            assert a["rag.retrieval.duration_ms"] == 12.5
            assert a["rag.top_score"] == pytest.approx(0.87)
            assert a["rag.evaluation"] == "pass"
            assert a["rag.index_age_seconds"] == 5400
            body_span = [s for s in spans if s["attributes"].get("rag.collection") == "runbooks"][0]
            assert body_span["attributes"]["rag.top_k"] == 2
            failed = [s for s in spans if s["attributes"].get("rag.error")][0]
            assert failed["attributes"]["rag.error"] == "vector_store_unreachable"
            assert failed["attributes"]["error.type"] == "upstream_5xx"
            assert failed["status"]["code"] == "ERROR"
        finally:
            envoy.stop()
            rag.stop()


def test_gateway_generated_failures_are_openai_style_json(logdir, wasm_path):
    envoy = start_envoy(logdir, stable_port=1)
    try:
        r = post_json(envoy.url + CHAT, _chat("nobody home", 2, False))
        assert r.status == 503
        assert r.headers["content-type"] == "application/json"
        err = r.json()["error"]
        assert err["type"] == "upstream_unavailable" and err["code"] == 503
        assert "unavailable" in err["message"]
        envoy.flush_wait()
        scrape = parse_exposition(envoy.stats_prometheus())
        assert scrape.value("llm_gateway_errors_total", error_type="upstream_unavailable") == 1
    finally:
        envoy.stop()


def _latencies(url: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.monotonic()
        r = post_json(url, {"model": "mistral-7b", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}, headers={"x-tenant-id": "acme"})
        assert r.status == 200
        out.append(time.monotonic() - t)
    return out


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is installed by .ci/run")
def test_collector_outage_costs_no_latency_and_no_memory(logdir, wasm_path):
    """Collector down for the whole test: requests succeed at unchanged
    latency (vs. the same Envoy config without tracing, same run), spans are
    dropped and counted, and Envoy's memory stays flat."""
    from harness import free_port

    dead = free_port()  # nothing listens here

    def flood_route(cfg):
        routes = hcm_of(cfg)["route_config"]["virtual_hosts"][0]["routes"]
        routes.insert(0, {
            "name": "chat",
            "match": {"path": "/flood/v1/chat/completions"},
            "direct_response": {"status": 200, "body": {"inline_string": '{"model":"mistral-7b","usage":{"prompt_tokens":3,"completion_tokens":1}}'}},
            "response_headers_to_add": [{"header": {"key": "content-type", "value": "application/json"}}],
        })

    def with_dead_collector(cfg):
        tracing_edit(dead, flush_interval_ms=100)(cfg)
        flood_route(cfg)

    sim = start_sim(logdir, "--ttft-ms", "15", "--itl-ms", "1")
    traced = start_envoy(logdir, stable_port=sim.port, edit=with_dead_collector, name="traced")
    plain = start_envoy(logdir, stable_port=sim.port, edit=flood_route, name="plain")
    try:
        # Latency, interleaved so drift hits both the same.
        a, b = [], []
        for _ in range(4):
            a += _latencies(traced.url + CHAT, 10)
            b += _latencies(plain.url + CHAT, 10)
        med_traced, med_plain = statistics.median(a), statistics.median(b)
        print(f"median latency: dead collector {med_traced*1000:.1f} ms, no tracing {med_plain*1000:.1f} ms")
        assert med_traced - med_plain < 0.010, "a dead collector must not slow requests down"

        # Memory: push many spans at a dead collector; RSS must stay flat.
        script = logdir / "flood.lua"
        script.write_text('wrk.method="POST"\nwrk.body=\'{"model":"mistral-7b","messages":[]}\'\nwrk.headers["content-type"]="application/json"\n')

        def flood(seconds: int) -> None:
            out = subprocess.run(["wrk", "-t1", "-c8", f"-d{seconds}s", "-s", str(script), traced.url + "/flood/v1/chat/completions"], capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr

        flood(3)
        rss_warm = traced.proc.rss_bytes()
        flood(8)
        rss_after = traced.proc.rss_bytes()
        traced.flush_wait()
        scrape = parse_exposition(traced.stats_prometheus())
        total = scrape.value("llm_gateway_requests_total")
        dropped = {s.labels["reason"]: s.value for s in scrape.series("llm_gateway_spans_dropped_total")}
        queued = scrape.value("llm_gateway_span_queue_spans")
        print(f"outage: {int(total)} requests, dropped {dropped}, queued {queued}, RSS {rss_warm/2**20:.1f} -> {rss_after/2**20:.1f} MiB")
        assert total > 5000
        assert scrape.value("llm_gateway_spans_exported_total") == 0
        assert sum(dropped.values()) + queued >= total - 2 * 256 * 2, "every span is dropped, queued or in flight"
        assert dropped.get("export_failed", 0) + dropped.get("queue_full", 0) > 0
        assert rss_after - rss_warm < 8 * 2**20, "memory stays flat while spans are dropped"
        # Envoy answers a refused connection with its own 503, so the
        # exports count as http_error (a timeout would count as failed).
        failed_exports = scrape.value("llm_gateway_span_exports_total", result="http_error") + scrape.value("llm_gateway_span_exports_total", result="failed")
        assert failed_exports > 0
        assert scrape.value("llm_gateway_span_exports_total", result="ok") == 0
    finally:
        traced.stop()
        plain.stop()
        sim.stop()


@pytest.mark.wasm_only(
    "the module applies a collector's answers at its worker's next request (Envoy gives modules no worker "
    "timer); test_module.py::test_collector_answers_reach_the_counters_at_the_next_request covers it"
)
def test_collector_answering_5xx_is_counted(logdir, wasm_path):
    with OtlpReceiver() as collector:
        collector.respond_with(503)
        sim = start_sim(logdir, "--ttft-ms", "5")
        envoy = start_envoy(logdir, stable_port=sim.port, edit=tracing_edit(collector.port))
        try:
            for _ in range(5):
                assert post_json(envoy.url + CHAT, _chat("x", 1, False)).status == 200
            collector.wait_for_requests(1)

            def counted():
                scrape = parse_exposition(envoy.stats_prometheus())
                return scrape.value("llm_gateway_spans_dropped_total", reason="export_failed") == 5 and scrape

            scrape = wait_until(counted, timeout=10, what="5 spans dropped after 503s")
            assert scrape.value("llm_gateway_span_exports_total", result="http_error") >= 1
            collector.respond_with(None)
            assert post_json(envoy.url + CHAT, _chat("x", 1, False)).status == 200
            wait_until(lambda: parse_exposition(envoy.stats_prometheus()).value("llm_gateway_spans_exported_total") == 1, timeout=10, what="recovery")
        finally:
            envoy.stop()
            sim.stop()
