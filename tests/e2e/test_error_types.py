"""Error types through a real Envoy: every way a request can end badly that
a client can tell apart, each driven for real (a refused port, a listener
that never completes the handshake, a cluster with no endpoints, a circuit
breaker, a slow runtime, a stalled stream, a client that hangs up, an
upstream that resets before and after its headers, a rate limit, a gateway
reply), and for each: what Envoy's own access log says (flags, details), what
the client was told (status and the `error.type` of the JSON body from
envoy/tokentap.yaml's local_reply_config), and that the filter's metric label
`error_type`, its access-log value and its span's `error.type` all say the
same thing (docs/metrics.md, "Error types").
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass

from harness import free_port, parse_exposition, post_json, post_raw, wait_until
from otlp_receiver import OtlpReceiver
from raw_upstream import RawUpstream, Script
from stack import add_cluster, hcm_of, plugin_config, set_plugin_config, start_envoy, start_sim

CHAT = "/v1/chat/completions"
CHAT_BODY = {"model": "mistral-7b", "messages": [{"role": "user", "content": "x"}], "max_tokens": 8}


@dataclass
class Case:
    #: Also the tenant of its requests (the `tenant` label, `tokentap.tenant`).
    name: str
    error_type: str
    #: What Envoy's access log shows: one of its response flags (None: none
    #: set) and the start of its response code details.
    flag: str | None
    details: str
    #: HTTP status the client got (200: headers were out before it broke;
    #: None: the client had gone).
    status: int | None
    #: `error.type` of the JSON body Envoy answered with (None: the body is
    #: the runtime's, or there was none).
    body_type: str | None = None
    span_status: str = "ERROR"


CASES = [
    Case("refused", "upstream_unavailable", "UF", "upstream_reset_before_response_started{remote_connection_failure", 503, "upstream_unavailable"),
    Case("connect_timeout", "upstream_unavailable", "UF", "upstream_reset_before_response_started{connection_timeout}", 503, "upstream_unavailable"),
    Case("no_healthy", "upstream_unavailable", "UH", "no_healthy_upstream", 503, "upstream_unavailable"),
    Case("overflow", "overloaded", "UO", "upstream_reset_before_response_started{overflow}", 503, "overloaded"),
    Case("rate_limited", "rate_limited", "RL", "local_rate_limited", 429, "rate_limited", span_status="UNSET"),
    Case("route_timeout", "timeout", "UT", "response_timeout", 504, "timeout"),
    Case("idle_timeout", "timeout", "SI", "stream_idle_timeout", 200),
    Case("client_abort", "client_abort", "DC", "", None),
    Case("reset_before", "upstream_reset", "UC", "upstream_reset_before_response_started{connection_termination}", 503, "upstream_reset"),
    # A chunked body cut short is a protocol error to Envoy.
    Case("reset_after", "upstream_reset", "UPE", "upstream_reset_after_response_started{protocol_error}", 200),
    Case("denied", "gateway_reply", None, "direct_response", 403, "gateway_error"),
    Case("upstream_5xx", "upstream_5xx", None, "via_upstream", 503),
    Case("upstream_4xx", "upstream_4xx", None, "via_upstream", 429, span_status="UNSET"),
]


def _route(case: str, route: dict | None = None, **extra) -> dict:
    r = {"name": "chat", "match": {"path": CHAT, "headers": [{"name": "x-case", "string_match": {"exact": case}}]}, **extra}
    if route is not None:
        r["route"] = route
    return r


def _cluster(cfg: dict, name: str, port: int | None, **extra) -> None:
    if port is None:
        cfg["static_resources"]["clusters"].append(
            {"name": name, "type": "STATIC", "connect_timeout": "1s", "load_assignment": {"cluster_name": name, "endpoints": []}}
        )
    else:
        add_cluster(cfg, name, port)
    cfg["static_resources"]["clusters"][-1].update(extra)


def _read_all(sock: socket.socket) -> bytes:
    """Everything until the peer closes or resets (a cut stream)."""
    out = bytearray()
    try:
        while chunk := sock.recv(65536):
            out.extend(chunk)
    except ConnectionResetError:
        pass
    finally:
        sock.close()
    return bytes(out)


def _status_of(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


def test_each_local_reply_class_has_its_error_type(logdir, wasm_path):
    sim = start_sim(logdir, "--ttft-ms", "20", "--itl-ms", "20")
    # A port with nothing listening: connection refused.
    refused_port = free_port()
    # A listener whose accept queue (backlog 0) is full: Linux drops further
    # SYNs, so Envoy's connect attempt times out.
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(0)
    filler = socket.create_connection(blackhole.getsockname())
    with OtlpReceiver() as collector, RawUpstream() as raw:
        raw.script("/reset-before", Script(reset_before_headers=True))
        sse = {"content-type": "text/event-stream"}
        first = b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'
        # Headers and one event, then silence longer than the route's idle timeout.
        raw.script("/stall", Script(200, sse, [first, b"data: [DONE]\n\n"], delays=[0, 3.0]))

        def edit(cfg):
            add_cluster(cfg, "otel_collector", collector.port)
            plugin = plugin_config(cfg)
            plugin["tracing"] = {"cluster": "otel_collector", "authority": "otel-collector", "sample_ratio": 1.0, "flush_interval_ms": 200}
            set_plugin_config(cfg, plugin)
            _cluster(cfg, "refused", refused_port)
            _cluster(cfg, "blackhole", blackhole.getsockname()[1], connect_timeout="0.25s")
            _cluster(cfg, "empty", None)
            # A circuit breaker that admits no pending request: every request
            # that has to wait for a connection (the first one does) overflows.
            _cluster(cfg, "breaker", sim.port, circuit_breakers={"thresholds": [{"max_pending_requests": 0}]})
            _cluster(cfg, "raw", raw.port)
            hcm = hcm_of(cfg)
            limit = {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
                "stat_prefix": "llm_rate_limit",
            }
            filters = hcm["http_filters"]
            filters.insert(len(filters) - 1, {"name": "envoy.filters.http.local_ratelimit", "typed_config": limit})
            one_per_hour = {
                **limit,
                "token_bucket": {"max_tokens": 1, "tokens_per_fill": 1, "fill_interval": "3600s"},
                "filter_enabled": {"runtime_key": "rl_enabled", "default_value": {"numerator": 100, "denominator": "HUNDRED"}},
                "filter_enforced": {"runtime_key": "rl_enforced", "default_value": {"numerator": 100, "denominator": "HUNDRED"}},
            }
            routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
            routes[:0] = [
                _route("refused", {"cluster": "refused", "timeout": "5s"}),
                _route("connect_timeout", {"cluster": "blackhole", "timeout": "5s"}),
                _route("no_healthy", {"cluster": "empty", "timeout": "5s"}),
                _route("overflow", {"cluster": "breaker", "timeout": "5s"}),
                _route(
                    "rate_limited",
                    {"cluster": "llm_stable", "timeout": "5s"},
                    typed_per_filter_config={"envoy.filters.http.local_ratelimit": one_per_hour},
                ),
                _route("route_timeout", {"cluster": "llm_stable", "timeout": "0.2s"}),
                _route("idle_timeout", {"cluster": "raw", "timeout": "10s", "idle_timeout": "0.3s", "prefix_rewrite": "/stall"}),
                _route("reset_before", {"cluster": "raw", "timeout": "5s", "prefix_rewrite": "/reset-before"}),
                _route("denied", direct_response={"status": 403, "body": {"inline_string": "not for you"}}),
            ]

        envoy = start_envoy(logdir, stable_port=sim.port, edit=edit)
        try:
            got_status: dict[str, int | None] = {}
            got_body: dict[str, bytes] = {}

            def send(case: str, extra: dict | None = None, body: dict = CHAT_BODY) -> None:
                r = post_json(envoy.url + CHAT, body, headers={"x-tenant-id": case, "x-case": case, **(extra or {})}, timeout=10)
                got_status[case], got_body[case] = r.status, r.body

            def send_stream(case: str, extra: dict | None = None) -> None:
                sock, _ = post_raw(envoy.url + CHAT, {**CHAT_BODY, "stream": True}, {"x-tenant-id": case, "x-case": case, **(extra or {})}, timeout=10)
                got_status[case] = _status_of(_read_all(sock))

            for case in ("refused", "connect_timeout", "no_healthy", "overflow", "route_timeout", "reset_before", "denied"):
                send(case, {"x-sim-ttft-ms": "1000"} if case == "route_timeout" else None)
            # The first request takes the bucket's one token; the second is refused.
            send("rate_limited")
            assert got_status["rate_limited"] == 200, got_body["rate_limited"]
            send("rate_limited")
            send("upstream_5xx", {"x-sim-fail": "503"})
            send("upstream_4xx", {"x-sim-fail": "429"})
            send_stream("idle_timeout")
            send_stream("reset_after", {"x-sim-reset-after": "2"})
            # Client abort: read the first bytes of a slow stream, then hang up.
            sock, _ = post_raw(envoy.url + CHAT, {**CHAT_BODY, "stream": True, "max_tokens": 50}, {"x-tenant-id": "client_abort"})
            assert _status_of(sock.recv(4096)) == 200
            time.sleep(0.1)
            sock.close()
            got_status["client_abort"] = None

            # What the client was told.
            for c in CASES:
                if c.status is not None:
                    assert got_status[c.name] == c.status, (c.name, got_status[c.name], got_body.get(c.name))
                if c.body_type is not None:
                    assert json.loads(got_body[c.name])["error"]["type"] == c.body_type, (c.name, got_body[c.name])

            # What Envoy reports, and the filter's value beside it in the same log line.
            names = {c.name for c in CASES}

            def logged():
                entries = envoy.access_log_entries(at_least=1)
                return entries if names <= {e.get("tenant") for e in entries} else None

            entries = wait_until(logged, timeout=20, interval=0.5, what="an access-log entry for every case")
            for c in CASES:
                failed = [e for e in entries if e.get("tenant") == c.name and e.get("error_type")]
                assert len(failed) == 1, (c.name, [e for e in entries if e.get("tenant") == c.name])
                e = failed[0]
                flags = [] if e["flags"] in ("-", "") else e["flags"].split(",")
                if c.flag is None:
                    assert flags == [], (c.name, e)
                else:
                    assert c.flag in flags, (c.name, e)
                assert e["code_details"].startswith(c.details), (c.name, e)
                assert e["error_type"] == c.error_type, (c.name, e)

            # The metric.
            def errors():
                envoy.flush_wait()
                scrape = parse_exposition(envoy.stats_prometheus())
                got = {(s.labels["tenant"], s.labels["error_type"]): s.value for s in scrape.series("llm_gateway_errors_total")}
                return got if len(got) >= len(CASES) else None

            got = wait_until(errors, timeout=20, interval=0.5, what="an error series for every case")
            assert got == {(c.name, c.error_type): 1 for c in CASES}

            # The span.
            def spans():
                by_tenant = {}
                for s in collector.spans():
                    by_tenant.setdefault(s["attributes"].get("tokentap.tenant"), []).append(s)
                return by_tenant if names <= by_tenant.keys() else None

            by_tenant = wait_until(spans, timeout=20, interval=0.5, what="a span for every case")
            for c in CASES:
                failed = [s for s in by_tenant[c.name] if "error.type" in s["attributes"]]
                assert len(failed) == 1, (c.name, by_tenant[c.name])
                assert failed[0]["attributes"]["error.type"] == c.error_type, (c.name, failed[0])
                assert failed[0]["status"]["code"] == c.span_status, (c.name, failed[0]["status"])
            # The rate-limited tenant's first request succeeded: no error on its span.
            assert len(by_tenant["rate_limited"]) == 2
        finally:
            envoy.stop()
            sim.stop()
            filler.close()
            blackhole.close()
