"""The GenAI naming (`"metrics": {"naming": "both"}`), scraped by a real
Prometheus and read the way Envoy AI Gateway's published Grafana dashboard
(`examples/monitoring/grafana-dashboard.json`) writes its queries: TTFT p95
by model, token usage rate by token type, request duration p99, error rate
by `error_type`. Every query returns labelled data, and the values agree with
the `llm_gateway_*` names recorded in the same run. Also: what Prometheus'
metadata API says each histogram family is (docs/metrics.md, "Histogram
types").

Runs once per shell (GATEWAY_SUITES): the Wasm shell needs the GenAI stats
tags (envoy/stats-tags-gen-ai.yaml); the dynamic module defines the GenAI
families at load (filters/module/src/stats.rs).
"""

from __future__ import annotations

import json
import math
import urllib.parse

import pytest
import yaml

from harness import REPO, get, post_json, stream_timed, wait_until
from ops_stack import start_prometheus
from stack import plugin_config, set_plugin_config, start_envoy, start_sim

#: Sim TTFT well inside one bucket of both namings ((0.1, 0.25] s), so
#: millisecond and microsecond recording put every sample in the same bucket.
TTFT_MS = 150
STREAMS = 4
PLAIN = 2
FAILURES = 2


def _naming(naming: str):
    def edit(config: dict) -> None:
        plugin = plugin_config(config)
        plugin["metrics"] = {"naming": naming, "provider_name": "vllm"}
        set_plugin_config(config, plugin)
        extra = yaml.safe_load((REPO / "envoy" / "stats-tags-gen-ai.yaml").read_text())["stats_tags"]
        config["stats_config"]["stats_tags"].extend(extra)

    return edit


def _chat(stream: bool) -> dict:
    body = {"model": "mistral-7b", "messages": [{"role": "user", "content": "hello there"}],
            "max_tokens": 8, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


@pytest.fixture
def stack(logdir):
    procs = []
    try:
        stable = start_sim(logdir, "--ttft-ms", str(TTFT_MS), "--itl-ms", "5", name="sim-stable")
        procs.append(stable)
        failing = start_sim(logdir, "--error-rate", "1.0", name="sim-failing")
        procs.append(failing)
        envoy = start_envoy(logdir, stable_port=stable.port, canary_port=failing.port, edit=_naming("both"))
        procs.append(envoy)
        prom = start_prometheus(logdir, {"llm-gateway-envoy": (f"127.0.0.1:{envoy.admin_port}", "/stats/prometheus")})
        procs.append(prom)
        yield envoy, prom
    finally:
        for p in reversed(procs):
            p.stop()


def _traffic(envoy) -> None:
    url = f"{envoy.url}/v1/chat/completions"
    for _ in range(STREAMS):
        status, *_ = stream_timed(url, _chat(True))
        assert status == 200
    for _ in range(PLAIN):
        assert post_json(url, _chat(False)).status == 200
    for _ in range(FAILURES):
        assert post_json(url, _chat(False), headers={"x-canary": "1"}).status >= 500


def _one(prom, expr: str) -> float:
    result = prom.query(expr)
    assert len(result) == 1, (expr, result)
    return float(result[0]["value"][1])


def _by(prom, expr: str, label: str) -> dict[str, float]:
    result = prom.query(expr)
    return {r["metric"].get(label, ""): float(r["value"][1]) for r in result}


def _scraped(prom, total: int) -> None:
    """Waits until Prometheus has scraped `total` requests under both names."""
    def done():
        a = prom.query("sum(gen_ai_server_request_duration_seconds_count)")
        b = prom.query("sum(llm_gateway_request_duration_milliseconds_count)")
        return a and b and float(a[0]["value"][1]) == total and float(b[0]["value"][1]) == total
    wait_until(done, timeout=30, interval=0.5, what=f"{total} requests scraped")


def test_ai_gateway_dashboard_queries_read_tokentap(stack):
    envoy, prom = stack
    per_round = STREAMS + PLAIN + FAILURES
    # Two rounds, each scraped: rates need two samples of a moving counter.
    _traffic(envoy)
    _scraped(prom, per_round)
    _traffic(envoy)
    _scraped(prom, 2 * per_round)

    # TTFT p95 by model (the dashboard's query, split by gen_ai_request_model).
    ttft = _by(prom, "histogram_quantile(0.95, sum by (le, gen_ai_request_model) "
                     "(rate(gen_ai_server_time_to_first_token_seconds_bucket[1m])))", "gen_ai_request_model")
    assert set(ttft) == {"mistral-7b"}, ttft
    legacy = _one(prom, "histogram_quantile(0.95, sum by (le, model) "
                        "(rate(llm_gateway_time_to_first_token_milliseconds_bucket[1m]))) / 1000")
    assert 0.1 < ttft["mistral-7b"] <= 0.25
    assert ttft["mistral-7b"] == pytest.approx(legacy, rel=1e-6)

    # Token usage rate by token type, and the totals behind it.
    rate = _by(prom, "sum by (gen_ai_token_type) (rate(gen_ai_client_token_usage_sum[1m]))", "gen_ai_token_type")
    assert rate["input"] > 0 and rate["output"] > 0, rate
    usage = _by(prom, "sum by (gen_ai_token_type) (gen_ai_client_token_usage_sum)", "gen_ai_token_type")
    tokens = _by(prom, 'sum by (token_type) (llm_gateway_tokens_total{source="usage"})', "token_type")
    assert usage["input"] == tokens["prompt"] > 0
    assert usage["output"] == tokens["completion"] > 0
    assert usage.get("cached_input", 0) == tokens.get("cached", 0)
    assert _one(prom, 'sum(gen_ai_client_token_usage_count{gen_ai_token_type="output"})') == 2 * (STREAMS + PLAIN)

    # Request duration p99 (the dashboard's query, as written).
    p99 = _one(prom, "histogram_quantile(0.99, sum(rate(gen_ai_server_request_duration_seconds_bucket[1m])) by (le))")
    p99_ms = _one(prom, "histogram_quantile(0.99, sum(rate(llm_gateway_request_duration_milliseconds_bucket[1m])) by (le))")
    assert 0 < p99 <= 81.92 and not math.isnan(p99)
    # Different bucket layouts: the two estimates agree within a factor of 2.5.
    assert p99_ms / 1000 / 2.5 <= p99 <= p99_ms / 1000 * 2.5, (p99, p99_ms)
    by_model = _by(prom, "histogram_quantile(0.99, sum by (le, gen_ai_request_model, gen_ai_provider_name, "
                         "gen_ai_operation_name) (rate(gen_ai_server_request_duration_seconds_bucket[1m])))",
                   "gen_ai_request_model")
    assert set(by_model) == {"mistral-7b"}
    # Every bucket count agrees where the layouts share a bound.
    for s, ms in (("0.01", "10"), ("+Inf", "+Inf")):
        assert _one(prom, f'sum(gen_ai_server_request_duration_seconds_bucket{{le="{s}"}})') == \
            _one(prom, f'sum(llm_gateway_request_duration_milliseconds_bucket{{le="{ms}"}})')

    # Error rate by error_type (the dashboard's error_type!="" selector).
    errors = _by(prom, 'sum by (error_type) (rate(gen_ai_server_request_duration_seconds_count{error_type!=""}[1m])) '
                       '/ ignoring(error_type) group_left sum(rate(gen_ai_server_request_duration_seconds_count[1m]))',
                 "error_type")
    assert set(errors) == {"upstream_5xx"}, errors
    # A ratio of extrapolated rates: exact only over whole counts (below).
    assert 0 < errors["upstream_5xx"] < 1
    counts = _by(prom, 'sum by (error_type) (gen_ai_server_request_duration_seconds_count{error_type!=""})', "error_type")
    legacy_errors = _by(prom, "sum by (error_type) (llm_gateway_errors_total)", "error_type")
    assert counts == legacy_errors == {"upstream_5xx": 2 * FAILURES}
    success = _one(prom, 'sum(gen_ai_server_request_duration_seconds_count{error_type=""})')
    assert success == _one(prom, 'sum(llm_gateway_requests_total{status="200"})')

    # The conventions' labels and tokentap's workload labels side by side.
    labels = prom.query('gen_ai_server_time_to_first_token_seconds_count')[0]["metric"]
    assert {k: labels.get(k) for k in ("gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model",
                                       "gen_ai_response_model", "route", "model", "route_class", "team")} == {
        "gen_ai_operation_name": "chat", "gen_ai_provider_name": "vllm", "gen_ai_request_model": "mistral-7b",
        "gen_ai_response_model": "mistral-7b", "route": "chat", "model": "mistral-7b",
        "route_class": "interactive", "team": "platform-ai"}

    # What type-aware consumers are told (docs/metrics.md, "Histogram types"):
    # Envoy's /stats/prometheus types every published histogram series as a
    # counter, in both shells.
    for family in ("gen_ai_server_request_duration_seconds", "gen_ai_server_time_to_first_token_seconds",
                   "gen_ai_server_time_per_output_token_seconds", "gen_ai_client_token_usage",
                   "llm_gateway_request_duration_milliseconds", "llm_gateway_time_to_first_token_milliseconds"):
        for suffix in ("_bucket", "_sum", "_count"):
            name = family + suffix
            r = get(f"{prom.url}/api/v1/metadata?metric={urllib.parse.quote(name)}", timeout=10)
            meta = json.loads(r.body)["data"].get(name)
            assert meta and {m["type"] for m in meta} == {"counter"}, (name, meta)
