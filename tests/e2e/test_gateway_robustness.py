"""The filter never breaks traffic: byte-identical streams, malformed input,
cardinality floods, bad configuration, error classification.

Upstreams here are `RawUpstream` scripts, so chunk boundaries and bytes are
exactly what the test wrote; what the client receives through Envoy with the
filter must equal those bytes.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import shutil
import socket
import subprocess
import time

import pytest

from harness import SHELL, http_request, parse_exposition, post_json, sse_events, stream_timed, wait_until
from raw_upstream import RawUpstream, Script
from stack import plugin_config, remove_filter, set_plugin_config, start_envoy, start_sim, hcm_of

CHAT = "/v1/chat/completions"


def _event(content: str, **extra) -> bytes:
    chunk = {"object": "chat.completion.chunk", "model": "mistral-7b", "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}]}
    chunk.update(extra)
    return b"data: " + json.dumps(chunk, ensure_ascii=False).encode() + b"\n\n"


def _usage_event(prompt: int, completion: int) -> bytes:
    return b"data: " + json.dumps({"choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}}).encode() + b"\n\n"


SSE = {"content-type": "text/event-stream"}
JSON = {"content-type": "application/json"}


def adversarial_stream() -> list[bytes]:
    """An SSE body cut at the worst places: inside UTF-8 characters, between
    CR and LF, inside `data:` and inside JSON strings."""
    body = (
        b": keep-alive\r\n\r\n"
        + _event("Hé").replace(b"\n", b"\r\n")
        + _event("日本語")
        + _event("😀 ok")
        + b"event: message\ndata: " + json.dumps({"choices": [{"delta": {"content": "multi"}}]}).encode() + b"\ndata: \n\n"
        + _usage_event(11, 4)
        + b"data: [DONE]\n\n"
    )
    cuts = sorted({3, 17, 18, 40, 41, 42, 60, 61, 62, 63, 90, body.index("日".encode()) + 1, body.index("😀".encode()) + 2, body.index(b"\r\n") + 1, len(body) - 5})
    chunks, last = [], 0
    for c in cuts:
        chunks.append(body[last:c])
        last = c
    chunks.append(body[last:])
    return [c for c in chunks if c]


@pytest.fixture
def upstream():
    with RawUpstream() as up:
        yield up


def test_streamed_body_is_byte_identical_with_and_without_filter(logdir, wasm_path, upstream):
    chunks = adversarial_stream()
    upstream.script(CHAT, Script(200, SSE, chunks, delays=[0.01] * len(chunks)))
    with_filter = start_envoy(logdir, stable_port=upstream.port, name="with")
    without = start_envoy(logdir, stable_port=upstream.port, name="without", edit=remove_filter)
    try:
        payload = {"model": "mistral-7b", "messages": [], "stream": True}
        _, h1, b1, t1 = stream_timed(with_filter.url + CHAT, payload, headers={"x-tenant-id": "acme"})
        _, h2, b2, t2 = stream_timed(without.url + CHAT, payload, headers={"x-tenant-id": "acme"})
        expected = b"".join(chunks)
        assert b1 == expected
        assert b2 == expected
        # Not buffered: the body arrived in several reads spread over time.
        assert len(t1) > 3 and t1[-1][0] - t1[0][0] > 0.05
        with_filter.flush_wait()
        scrape = parse_exposition(with_filter.stats_prometheus())
        # The filter understood the adversarial stream: 4 content events,
        # usage 11/4 reported, nothing malformed.
        assert scrape.value("llm_gateway_tokens_total", token_type="prompt", source="usage") == 11
        assert scrape.value("llm_gateway_tokens_total", token_type="completion", source="usage") == 4
        assert scrape.value("llm_gateway_parse_errors_total") == 0
        assert scrape.value("llm_gateway_time_to_first_token_milliseconds_count") == 1
    finally:
        with_filter.stop()
        without.stop()


SWEEP = {
    # name: (script, parse-error kind it must raise, or None)
    "malformed_events": (
        Script(200, SSE, [_event("a"), b"data: {not json\n\n", b"data: \x00\x01\x02\n\n", _event("b"), b"data: [DONE]\n\n"]),
        "sse_event",
    ),
    "binary_garbage_sse": (Script(200, SSE, [bytes(random.Random(7).randrange(256) for _ in range(65536))]), None),
    "huge_event": (Script(200, SSE, [b"data: {\"choices\":[{\"delta\":{\"content\":\"" + b"x" * (2 << 20) + b"\"}}]}\n\n", b"data: [DONE]\n\n"]), None),
    "deep_nesting": (Script(200, SSE, [b"data: " + b"[" * 5000 + b"]" * 5000 + b"\n\n"]), "sse_event"),
    "no_done_cut_mid_event": (Script(200, SSE, [_event("a"), b"data: {\"choices\":[{\"delta\":"]), None),
    "json_garbage": (Script(200, JSON, [b"\xff\xfe{\"usage\": nope"], content_length=True), "response_json"),
    "gzip_json": (
        Script(200, {**JSON, "content-encoding": "gzip"}, [gzip.compress(b'{"usage":{"prompt_tokens":5,"completion_tokens":1}}')], content_length=True),
        None,
    ),
    "cr_only_and_bom": (Script(200, SSE, [b"\xef\xbb", b"\xbfdata: " + json.dumps({"choices": [{"delta": {"content": "x"}}]}).encode() + b"\r\r", b"data: [DONE]\r\r"]), None),
    "comments_only": (Script(200, SSE, [b": ping\n\n"] * 50), None),
    "error_status_text_body": (Script(503, {"content-type": "text/plain"}, [b"upstream exploded"], content_length=True), None),
}


def test_malformed_input_sweep_passes_through_unharmed(logdir, wasm_path, upstream):
    for name, (script, _) in SWEEP.items():
        upstream.script(f"/sweep/{name}{CHAT}", script)

    def sweep_route(cfg):
        routes = hcm_of(cfg)["route_config"]["virtual_hosts"][0]["routes"]
        routes.insert(0, {"name": "chat", "match": {"prefix": "/sweep/"}, "route": {"cluster": "llm_stable", "timeout": "30s"}})

    envoy = start_envoy(logdir, stable_port=upstream.port, edit=sweep_route)
    try:
        for name, (script, _) in SWEEP.items():
            payload = {"model": "mistral-7b", "messages": [], "stream": True}
            status, headers, body, _ = stream_timed(envoy.url + f"/sweep/{name}{CHAT}", payload, headers={"x-tenant-id": "sweep"})
            if name == "no_done_cut_mid_event":
                assert body == script.body, name
            else:
                assert status == script.status, name
                assert body == script.body, f"{name}: body changed ({len(body)} vs {len(script.body)} bytes)"

        # Request-side abuse: malformed JSON, a 1 MiB prompt, a non-UTF-8
        # tenant, and a tenant trying to inject label fields.
        upstream.script(CHAT, Script(200, JSON, [b'{"usage":{"prompt_tokens":1,"completion_tokens":1}}'], content_length=True))
        r = http_request("POST", envoy.url + CHAT, body=b'{"model": "mistral-7b", "messages": [', headers={"content-type": "application/json", "x-tenant-id": "sweep"})
        assert r[0] == 200
        big = {"model": "mistral-7b", "messages": [{"role": "user", "content": "é" * (512 * 1024)}]}
        assert post_json(envoy.url + CHAT, big, headers={"x-tenant-id": "sweep"}).status == 200
        assert upstream.received[-1].body == json.dumps(big).encode(), "request body forwarded unchanged"
        raw = (
            b"POST " + CHAT.encode() + b" HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"x-tenant-id: \xff\xfe\xe9t\xe9\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}"
        )
        s = socket.create_connection(("127.0.0.1", envoy.listen_port))
        s.sendall(raw)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
        s.close()
        assert reply.startswith(b"HTTP/1.1 200"), reply[:100]
        assert post_json(envoy.url + CHAT, {"messages": []}, headers={"x-tenant-id": "a=.=b;.;model=.=x"}).status == 200

        envoy.flush_wait()
        scrape = parse_exposition(envoy.stats_prometheus())
        kinds = {s.labels["kind"]: s.value for s in scrape.series("llm_gateway_parse_errors_total")}
        assert kinds.get("sse_event", 0) >= 3  # two malformed events + deep nesting
        assert kinds.get("response_json", 0) >= 1
        assert kinds.get("request_json", 0) >= 1
        assert scrape.value("llm_gateway_responses_unparsed_total", reason="compressed") == 1
        # Every request was counted (the VM never died), labels stayed well-formed.
        total = scrape.value("llm_gateway_requests_total")
        assert total == len(SWEEP) + 4
        tenants = {s.labels["tenant"] for s in scrape.series("llm_gateway_requests_total")}
        assert "a_._b_._model_._x" in tenants
        assert tenants <= {"sweep", "a_._b_._model_._x", "unknown"} | {t for t in tenants if t.startswith("_")}
        for s in scrape.series("llm_gateway_requests_total"):
            assert s.labels["model"] in {"mistral-7b", "other", "unknown"}
        # One log line per kind of bad input, not one per request.
        log = (logdir / "envoy.log").read_text()
        assert log.count("counted in llm_gateway_parse_errors_total{kind=\"sse_event\"}") <= 2  # once per worker VM
        assert "panic" not in log
    finally:
        envoy.stop()


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is installed by .ci/run")
def test_cardinality_flood_stays_within_the_tenant_cap(logdir, wasm_path):
    cap = 50
    n_per_thread = 50_010  # wrk may drop a request in flight when a thread stops

    def edit(cfg):
        plugin = plugin_config(cfg)
        plugin["tenant"]["max_values"] = cap
        set_plugin_config(cfg, plugin)
        routes = hcm_of(cfg)["route_config"]["virtual_hosts"][0]["routes"]
        routes.insert(0, {
            "name": "flood",
            "match": {"path": "/flood/v1/chat/completions"},
            "direct_response": {"status": 200, "body": {"inline_string": '{"model":"mistral-7b","usage":{"prompt_tokens":3,"completion_tokens":1}}'}},
            "response_headers_to_add": [{"header": {"key": "content-type", "value": "application/json"}}],
        })

    envoy = start_envoy(logdir, stable_port=1, edit=edit)
    script = logdir / "flood.lua"
    script.write_text(
        """
local threads = {}
function setup(thread) thread:set("tid", #threads) table.insert(threads, thread) end
function init(args) limit = tonumber(args[1]) n = 0 end
request = function()
  n = n + 1
  return wrk.format("POST", "/flood/v1/chat/completions",
    {["x-tenant-id"] = "tenant-" .. tid .. "-" .. n, ["content-type"] = "application/json"},
    '{"model":"mistral-7b","messages":[]}')
end
response = function(status, headers, body)
  if n >= limit then wrk.thread:stop() end
end
"""
    )
    rss_before = envoy.proc.rss_bytes()
    try:
        out = subprocess.run(
            ["wrk", "-t2", "-c8", "-d60s", "-s", str(script), envoy.url, "--", str(n_per_thread)],
            capture_output=True, text=True, timeout=120,
        )
        assert out.returncode == 0, out.stderr
        envoy.flush_wait()
        scrape = parse_exposition(envoy.stats_prometheus())
        total = scrape.value("llm_gateway_requests_total")
        assert total >= 100_000
        tenants = {s.labels["tenant"] for s in scrape.series("llm_gateway_requests_total")}
        assert len(tenants) == cap + 1, "cap admitted tenants plus `other`"
        assert "other" in tenants
        assert scrape.one("llm_gateway_label_overflow_total", label="tenant").value == total - cap
        series = [s for s in scrape.samples if s.name.startswith("llm_gateway_")]
        assert len(series) < 1000, f"{len(series)} llm_gateway samples"
        growth = envoy.proc.rss_bytes() - rss_before
        print(f"flood: {int(total)} requests, {len(series)} samples, Envoy RSS growth {growth / 2**20:.1f} MiB")
    finally:
        envoy.stop()


def test_invalid_configuration_is_refused_with_the_field_named(logdir, wasm_path):
    with pytest.raises((TimeoutError, RuntimeError)) as err:
        start_envoy(logdir, stable_port=1, edit=lambda c: set_plugin_config(c, {"tracing": {"cluster": "otel", "sample_ratio": 2}}))
    log = (logdir / "envoy.log").read_text()
    assert "plugin configuration field `tracing.sample_ratio`: must be between 0 and 1" in log
    # Envoy's own refusal, as each shell's host words it.
    refused = {"wasm": ("Unable to create Wasm plugin tokentap", "failed to load"), "module": ("Failed to initialize dynamic module",)}
    assert any(line in log for line in refused[SHELL]), log[-2000:]


def test_include_usage_injection_makes_streams_exact(logdir, wasm_path):
    sim = start_sim(logdir, "--ttft-ms", "20", "--itl-ms", "2")

    def edit(cfg):
        plugin = plugin_config(cfg)
        plugin["usage"] = {"inject_include_usage": True}
        set_plugin_config(cfg, plugin)

    envoy = start_envoy(logdir, stable_port=sim.port, edit=edit)
    try:
        payload = {"model": "mistral-7b", "messages": [{"role": "user", "content": "count me"}], "max_tokens": 6, "stream": True}
        status, _, body, _ = stream_timed(envoy.url + CHAT, payload, headers={"x-tenant-id": "acme"})
        assert status == 200
        events = [json.loads(e) for e in body.split(b"\n\n") if e.startswith(b"data: {") for e in [e[6:]]]
        usage = [e["usage"] for e in events if e.get("usage")]
        assert usage and usage[0]["completion_tokens"] == 6, "the client received the usage chunk"
        # A request that already asks for usage is left alone.
        payload["stream_options"] = {"include_usage": True}
        assert stream_timed(envoy.url + CHAT, payload, headers={"x-tenant-id": "acme"})[0] == 200
        envoy.flush_wait()
        scrape = parse_exposition(envoy.stats_prometheus())
        assert scrape.one("llm_gateway_usage_injections_total", result="injected").value == 1
        assert scrape.one("llm_gateway_usage_injections_total", result="not_needed").value == 1
        assert scrape.value("llm_gateway_tokens_total", token_type="completion", source="usage") == 12
        assert scrape.value("llm_gateway_tokens_total", source="estimated") == 0
    finally:
        envoy.stop()
        sim.stop()


@pytest.mark.wasm_only(
    "a JWT claim sits in a nested metadata struct, which the module ABI (v0.1/v0.2 get_metadata_string) cannot "
    "read; the module refuses a nested tenant.metadata.path at load (test_module.py covers one-key metadata)"
)
def test_tenant_from_jwt_claim_ignores_a_spoofed_header(logdir, wasm_path):
    """Trust model: with `tenant.metadata`, the tenant comes from the verified
    JWT that Envoy's jwt_authn put in dynamic metadata; a client-sent
    `x-tenant-id` has no effect."""
    import base64
    import hashlib
    import hmac

    secret = b"tokentap-test-secret-0123456789abcdef"

    def b64(b: bytes) -> str:
        return base64.urlsafe_b64encode(b).rstrip(b"=").decode()

    def jwt(claims: dict) -> str:
        header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "k1"}).encode())
        payload = b64(json.dumps(claims).encode())
        sig = hmac.new(secret, f"{header}.{payload}".encode(), hashlib.sha256).digest()
        return f"{header}.{payload}.{b64(sig)}"

    jwks = json.dumps({"keys": [{"kty": "oct", "kid": "k1", "alg": "HS256", "k": b64(secret)}]})
    sim = start_sim(logdir, "--ttft-ms", "5")

    def edit(cfg):
        plugin = plugin_config(cfg)
        plugin["tenant"] = {"metadata": {"namespace": "envoy.filters.http.jwt_authn", "path": ["jwt_payload", "tenant"]}}
        set_plugin_config(cfg, plugin)
        hcm = hcm_of(cfg)
        hcm["http_filters"].insert(0, {
            "name": "envoy.filters.http.jwt_authn",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
                "providers": {"platform": {
                    "issuer": "https://auth.llm-platform.example",
                    "local_jwks": {"inline_string": jwks},
                    "payload_in_metadata": "jwt_payload",
                    "forward": False,
                }},
                "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "platform"}}],
            },
        })

    envoy = start_envoy(logdir, stable_port=sim.port, edit=edit)
    try:
        chat = {"model": "mistral-7b", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
        token = jwt({"iss": "https://auth.llm-platform.example", "tenant": "acme", "exp": int(time.time()) + 600})
        r = post_json(envoy.url + CHAT, chat, headers={"authorization": f"Bearer {token}", "x-tenant-id": "globex"})
        assert r.status == 200, r.body
        assert post_json(envoy.url + CHAT, chat, headers={"x-tenant-id": "globex"}).status == 401
        envoy.flush_wait()
        scrape = parse_exposition(envoy.stats_prometheus())
        tenants = {s.labels["tenant"]: s.value for s in scrape.series("llm_gateway_requests_total")}
        assert tenants.get("acme") == 1
        assert "globex" not in tenants
    finally:
        envoy.stop()
        sim.stop()


def test_active_requests_gauge_tracks_streams_in_flight(logdir, wasm_path):
    sim = start_sim(logdir, "--ttft-ms", "10", "--itl-ms", "100")
    envoy = start_envoy(logdir, stable_port=sim.port)
    try:
        import threading

        payload = {"model": "mistral-7b", "messages": [{"role": "user", "content": "slow"}], "max_tokens": 20, "stream": True}
        results = []

        def stream():
            status, _, body, _ = stream_timed(envoy.url + CHAT, payload, headers={"x-tenant-id": "acme"})
            results.append((status, sse_events(body)))

        threads = [threading.Thread(target=stream) for _ in range(3)]
        for t in threads:
            t.start()

        def active():
            scrape = parse_exposition(envoy.stats_prometheus())
            return scrape.value("llm_gateway_active_requests", route="chat") == 3

        wait_until(active, timeout=5, what="3 active requests")
        for t in threads:
            t.join()
        # Each stream ran to its end: role event, 16 tokens (the simulator's
        # default output, shorter than max_tokens), [DONE].
        assert [(status, len(events), events[-1]) for status, events in results] == [(200, 18, b"[DONE]")] * 3
        envoy.flush_wait()  # the filter publishes its metrics on its tick
        scrape = parse_exposition(envoy.stats_prometheus())
        assert scrape.value("llm_gateway_active_requests", route="chat") == 0
    finally:
        envoy.stop()
        sim.stop()
