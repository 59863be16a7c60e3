#!/usr/bin/env python3
"""Gateway overhead benchmark: Envoy with vs without the tokentap filter, in
both of its shells.

Every proxy is rendered from the shipped `envoy/tokentap.yaml` by
`tests/e2e/stack.py`; they differ only in the filter entry. Variants, side by
side in the same run, `--concurrency 1`, in front of the same upstream:

  without          the filter entry removed (the baseline)
  empty wasm       the empty proxy-wasm filter (filters/probe): the floor any
                   proxy-wasm filter pays
  tokentap wasm    tokentap_filter.wasm as it ships
  empty module     the dynamic module's `empty` filter (libtokentap_module.so,
                   `filter_name: "empty"`): the floor any dynamic module pays
  tokentap module  libtokentap_module.so as it ships, the same plugin JSON

`wrk` drives them in alternation (A B C D E, E D C B A, ...), so drift on the
shared machine weighs on all alike. Reported per scenario and connection
count: median requests/s, p50/p99 latency, the throughput ratio to no filter
(median and min-max of the per-repetition ratios), the proxy's CPU time per
request and what each variant adds over no filter, the module's ratios to the
empty Wasm filter, the empty module and the Wasm build, the targets of issue
16 (met or missed; a miss never fails the run), Envoy RSS, and the builds'
sizes. Where `bench/gateway_instructions.py` left a JSON result, its
instructions per request (added over no filter) are shown beside the CPU.

Scenarios:
  chat      non-streaming chat completion; the upstream is a second Envoy
            answering with `direct_response` (JSON with usage)
  chat-long as chat, with an 8 KB prompt
  sse       streaming chat completion, 64 SSE events per response, from
            `gateway_sse_upstream`, back to back (Envoy hands the filter a
            few large chunks)
  sse-otlp  as `sse`, with tracing on (sample_ratio 1.0), spans exported to a
            local counting OTLP/HTTP sink
  sse-paced as `sse`, with 250 µs before each event: Envoy then reads, and
            the filter is called for, each event on its own
  ignored   a request that is not LLM traffic (/v1/bench/not-llm) on a route
            of its own where the filter runs: it stops at request headers

Usage:
  python bench/gateway.py --quick       # smoke check (~1.5 min): exits 0 and prints the tables
  python bench/gateway.py               # full run, about 20 minutes
  python bench/gateway.py --shells wasm # the Wasm variants only (no module needed)
  python bench/gateway.py --profile     # adds filter-on variants that skip work: a
                                        # non-LLM path, a route with the filter disabled,
                                        # filter_state off
  python bench/gateway.py --llm-sim target/release/llm-sim
                                        # also measures llm-sim alone, to compare upstreams

Exit status: 0 when every run completed without request errors and the
filter's own counters prove it processed the traffic; 1 otherwise; 2 when a
prerequisite is missing. Missing a target is reported, not an error.

Everything listens on 127.0.0.1 only; every wrk run is bounded by -d and a
subprocess timeout. Needs the release filter and probe
(`cargo build -p tokentap-filter -p tokentap-probe --target wasm32-wasip1
--release`), the module (`cargo build -p tokentap-module --profile module`;
`cargo xtask build` builds the filter and the module), `wrk`, `rustc`, and the
e2e venv (`.venv`, re-executed into automatically).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
VENV = REPO / ".venv"


def _ensure_venv() -> None:
    """Re-exec under the e2e venv when started with a bare `python`."""
    try:
        import envoy  # noqa: F401
        import prometheus_client  # noqa: F401
        import yaml  # noqa: F401
    except ImportError:
        python = VENV / "bin" / "python"
        if python.exists() and Path(sys.prefix).resolve() != VENV.resolve():
            os.execv(str(python), [str(python), *sys.argv])
        raise


_ensure_venv()

# The benchmark measures the filter as it ships: the size-tuned release build
# in the default target dir, where `cargo xtask` and the e2e suites put it.
os.environ.setdefault("TOKENTAP_WASM", str(REPO / "target" / "wasm32-wasip1" / "release" / "tokentap_filter.wasm"))
sys.path.insert(0, str(REPO / "tests" / "e2e"))
sys.path.insert(0, str(BENCH))

import gateway_report as report  # noqa: E402
import harness  # noqa: E402
import stack  # noqa: E402
from gateway_load import (  # noqa: E402
    REFERENCE,
    WARMUP,
    OtlpSink,
    Target,
    Upstream,
    build_sse_upstream,
    loadavg,
    run_wrk,
    start_fast_upstream,
    start_llm_sim,
    start_sse_upstream,
)

LLM_PATH = "/v1/chat/completions"
#: Not an LLM path for the filter (it stops at request headers). With
#: --profile it gets a route of its own with the filter on (the shipped
#: catch-all route switches the filter off, which would measure that instead).
NON_LLM_PATH = "/v1/bench/not-llm"
#: With --profile, a route added to every proxy (before the catch-all) on
#: which the filter is disabled per route (`FilterConfig.disabled`).
DISABLED_PATH = "/v1/bench/filter-disabled"
SSE_EVENTS = 64
#: The dynamic module as it ships (`cargo build -p tokentap-module --profile module`).
MODULE = harness.MODULE
#: Shells whose variants a run measures (`--shells`).
SHELLS = ("wasm", "module")
#: The benchmark probe (filters/probe): the empty filter, and host-call pricing.
PROBE_WASM = REPO / "target" / "wasm32-wasip1" / "release" / "tokentap_probe.wasm"
#: The filter built with `--features bench-stages` (`--stages`), in its own target dir.
STAGES_WASM = REPO / "target" / "bench-stages" / "wasm32-wasip1" / "release" / "tokentap_filter.wasm"
#: Where `--stages` stops the lifecycle (see `tokentap_core::lifecycle::Stage`).
STAGES = ("headers", "bodies", "record", "metrics", "full")
#: Host calls priced by `--hostcalls` (each repeated HOST_CALL_REPEAT times per request).
HOST_CALLS = ("increment", "record", "define", "header_map", "header_value", "property", "set_property", "time")
HOST_CALL_REPEAT = 200

CHAT_BODY = {
    "model": "mistral-7b",
    "messages": [{"role": "user", "content": "Say hello in one short sentence."}],
    "max_tokens": 16,
}
#: A long prompt (about 8 KB of message text), as RAG and agent traffic sends.
LONG_PROMPT = " ".join(["Context passage about saturated vLLM runtimes and queue wait."] * 130)
CHAT_LONG_BODY = {**CHAT_BODY, "messages": [{"role": "user", "content": LONG_PROMPT}]}
SSE_BODY = {**CHAT_BODY, "max_tokens": SSE_EVENTS - 3, "stream": True, "stream_options": {"include_usage": True}}
CHAT_RESPONSE = {
    "id": "chatcmpl-bench",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "mistral-7b",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello! How can I help you today?"},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 16, "total_tokens": 25, "completion_tokens": 9},
}


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    streaming: bool
    tracing: bool
    #: Pause of the SSE upstream before each event (0: back to back).
    gap_us: int = 0
    #: Request path: LLM traffic, or NON_LLM_PATH (a route of its own where the filter runs).
    path: str = LLM_PATH
    #: Request body; None: the chat body, or the streaming one for streams.
    body: dict | None = None

    @property
    def request_body(self) -> dict:
        return self.body or (SSE_BODY if self.streaming else CHAT_BODY)

    @property
    def upstream_key(self) -> str:
        return f"sse-gap{self.gap_us}" if self.streaming else "fast"


#: Pause between events in `sse-paced`: long enough that Envoy reads (and
#: the filter is called for) each event on its own, as with a real runtime.
PACED_GAP_US = 250

SCENARIOS = {
    s.name: s
    for s in (
        Scenario("chat", "non-streaming chat; JSON with usage from an Envoy direct_response", False, False),
        Scenario(
            "chat-long",
            f"as chat, with a {len(LONG_PROMPT) // 1000} KB prompt",
            False,
            False,
            body=CHAT_LONG_BODY,
        ),
        Scenario("sse", f"streaming chat, {SSE_EVENTS} SSE events per response, written back to back", True, False),
        Scenario(
            "sse-otlp", f"as sse, with tracing on (sample ratio 1.0) exporting to a local OTLP sink", True, True
        ),
        Scenario(
            "sse-paced",
            f"as sse, with {PACED_GAP_US} µs before each event, so each event is its own body callback",
            True,
            False,
            PACED_GAP_US,
        ),
        Scenario(
            "ignored",
            f"a request that is not LLM traffic ({NON_LLM_PATH}) on a route of its own where the filter runs: "
            "it stops at request headers",
            False,
            False,
            path=NON_LLM_PATH,
        ),
    )
}


@dataclass
class Variant:
    name: str
    #: Which of the scenario's proxies serves it.
    proxy: str
    envoy: stack.Envoy
    path: str
    #: The filter treats this traffic as LLM traffic (its counters must move).
    filtered: bool


# --- proxies ----------------------------------------------------------------------


def access_log_to_dev_null(config: dict) -> None:
    """Keep the shipped access log (formatting it is part of the per-request
    cost, in both variants) but not a file growing by hundreds of MB."""
    for log in stack.hcm_of(config).get("access_log", []):
        log["typed_config"]["path"] = "/dev/null"


def add_route_before_catch_all(config: dict, name: str, prefix: str, filter_off: bool = False) -> None:
    """A route to the same upstream, before the shipped catch-all (which
    switches the filter off); `filter_off` switches it off on this one too."""
    routes = stack.hcm_of(config)["route_config"]["virtual_hosts"][0]["routes"]
    if any(r.get("name") == name for r in routes):
        return
    route = {"name": name, "match": {"prefix": prefix}, "route": {"cluster": "llm_stable"}}
    if filter_off:
        route["typed_per_filter_config"] = {
            "envoy.filters.http.wasm": {"@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "disabled": True}
        }
    routes.insert(len(routes) - 1, route)


def add_disabled_route(config: dict, with_filter: bool) -> None:
    """The filter switched off per route: what a gateway can do for its
    non-LLM routes."""
    add_route_before_catch_all(config, "bench-disabled", DISABLED_PATH, filter_off=with_filter)


def add_non_llm_route(config: dict) -> None:
    """The filter on, for a path that is not LLM traffic: it runs and stops
    at request headers."""
    add_route_before_catch_all(config, "bench-not-llm", NON_LLM_PATH)


def probe_edit(probe: str = "", profile: bool = False):
    """The same proxy with the probe filter in tokentap's place: empty (`""`),
    the floor any proxy-wasm filter pays, or repeating one host call
    (`"<call>:<n>"`, see filters/probe)."""

    def edit(config: dict) -> None:
        access_log_to_dev_null(config)
        if profile:
            add_disabled_route(config, True)
            add_non_llm_route(config)
        wasm = stack.wasm_filter(config)["typed_config"]["config"]
        wasm["vm_config"]["code"]["local"]["filename"] = str(PROBE_WASM)
        wasm["vm_config"]["vm_id"] = "tokentap_probe"
        wasm["root_id"] = "tokentap_probe"
        wasm["configuration"]["value"] = probe

    return edit


def stage_edit(stage: str):
    """tokentap built with `bench-stages`, stopping after `stage`."""

    def edit(config: dict) -> None:
        proxy_edit(True)(config)
        vm = stack.wasm_filter(config)["typed_config"]["config"]["vm_config"]
        vm["code"]["local"]["filename"] = str(STAGES_WASM)
        vm["environment_variables"] = {"key_values": {"TOKENTAP_BENCH_STAGE": stage}}

    return edit


def build_stages_wasm() -> None:
    """The ablation build: same sources, the `bench-stages` feature on."""
    subprocess.run(
        ["cargo", "build", "-p", "tokentap-filter", "--target", "wasm32-wasip1", "--release",
         "--features", "bench-stages", "--target-dir", str(STAGES_WASM.parents[2])],
        cwd=REPO, check=True, timeout=900,
    )


def proxy_edit(with_filter: bool, tracing_port: int | None = None, filter_state: bool = True, profile: bool = False):
    def edit(config: dict) -> None:
        access_log_to_dev_null(config)
        if profile:
            add_disabled_route(config, with_filter)
            add_non_llm_route(config)
        if not with_filter:
            stack.remove_filter(config)
            return
        plugin = stack.plugin_config(config)
        if tracing_port is not None:
            stack.add_cluster(config, "otel_sink", tracing_port)
            plugin["tracing"] = {"cluster": "otel_sink", "authority": "otel-collector", "sample_ratio": 1.0}
        if not filter_state:
            plugin["filter_state"] = "off"
        stack.set_plugin_config(config, plugin)

    return edit


def module_edit(
    filter_name: str = "tokentap",
    tracing_port: int | None = None,
    filter_state: bool = True,
    profile: bool = False,
):
    """The same proxy with the dynamic module in the Wasm filter's place
    (`stack.use_module`: same plugin JSON, per-route switches renamed, bare
    metric names). `filter_name` "empty" is the library's empty filter: the
    floor any dynamic module pays."""

    def edit(config: dict) -> None:
        proxy_edit(True, tracing_port, filter_state=filter_state, profile=profile)(config)
        stack.use_module(config, stack.MODULE, filter_name)

    return edit


def for_scenario(scenario: Scenario, edit):
    """`edit`, plus the route of the non-LLM path where the scenario uses it."""

    def wrapped(config: dict) -> None:
        if scenario.path == NON_LLM_PATH:
            add_non_llm_route(config)
        edit(config)

    return wrapped


def gateway_counters(envoy: stack.Envoy) -> dict[str, float]:
    """The filter's own counters, read with the reference Prometheus parser."""
    s = harness.parse_exposition(envoy.stats_prometheus())
    return {
        "requests": s.value("llm_gateway_requests_total"),
        "completion_tokens": s.value("llm_gateway_tokens_total", token_type="completion"),
        "parse_errors": s.value("llm_gateway_parse_errors_total"),
        "unparsed": s.value("llm_gateway_responses_unparsed_total"),
        "spans_exported": s.value("llm_gateway_spans_exported_total"),
        "spans_dropped": s.value("llm_gateway_spans_dropped_total"),
    }


def sanity_request(name: str, url: str, body_file: Path, streaming: bool) -> str:
    """One request before the load: the target answers what we think it does."""
    payload = json.loads(body_file.read_text())
    status, _, body, reads = harness.stream_timed(url, payload, {"x-tenant-id": "bench-1"}, timeout=10)
    if status != 200:
        raise RuntimeError(f"{name}: HTTP {status} {body[:200]!r}")
    if streaming:
        events = harness.sse_events(body)
        if len(events) != SSE_EVENTS or events[-1] != b"[DONE]":
            raise RuntimeError(f"{name}: {len(events)} SSE events, expected {SSE_EVENTS}")
        return f"{name}: an idle request got {len(events)} SSE events in {len(reads)} socket read(s) at the client"
    if json.loads(body).get("usage") != CHAT_RESPONSE["usage"]:
        raise RuntimeError(f"{name}: unexpected body {body[:200]!r}")
    return f"{name}: answers the chat completion"


# --- one scenario ----------------------------------------------------------------


def run_scenario(
    scenario: Scenario,
    tmp: Path,
    upstream: Upstream,
    references: list[Upstream],
    opts: argparse.Namespace,
) -> report.ScenarioResult:
    result = report.ScenarioResult(scenario.name, scenario.description)
    body_file = tmp / f"{scenario.name}-body.json"
    body_file.write_text(json.dumps(scenario.request_body))
    sink = OtlpSink() if scenario.tracing else None
    sink_port = sink.port if sink else None
    envoys: dict[str, stack.Envoy] = {}
    llm = scenario.path == LLM_PATH

    def start(key: str, edit) -> stack.Envoy:
        envoys[key] = stack.start_envoy(
            tmp,
            stable_port=upstream.port,
            edit=for_scenario(scenario, edit),
            concurrency=1,
            name=f"{scenario.name}-{key.replace(' ', '-').replace(',', '')}",
            flush_interval="5s",
            log_level="warning",
        )
        return envoys[key]

    try:
        profile = opts.profile
        wasm, module = "wasm" in opts.shells, "module" in opts.shells
        path = scenario.path
        # The variants every scenario runs: (name, edit, LLM counters move).
        plan = [(report.BASELINE, proxy_edit(False, profile=profile), False)]
        if wasm:
            plan.append((report.EMPTY, probe_edit(profile=profile), False))
            plan.append((report.WASM, proxy_edit(True, sink_port, profile=profile), llm))
        if module:
            plan.append((report.EMPTY_MODULE, module_edit("empty", profile=profile), False))
            plan.append((report.MODULE, module_edit("tokentap", sink_port, profile=profile), llm))
        variants = [Variant(key, key, start(key, edit), path, counted) for key, edit, counted in plan]
        if opts.stages:
            for stage in STAGES:
                key = f"stage {stage}"
                variants.append(
                    Variant(key, key, start(key, stage_edit(stage)), path, llm and stage in ("metrics", "full"))
                )
        for probe in opts.probes:
            key = f"probe {probe}"
            variants.append(Variant(key, key, start(key, probe_edit(probe)), path, False))
        if opts.hostcalls and not scenario.streaming:
            for call in HOST_CALLS:
                for n in (1, HOST_CALL_REPEAT):
                    key = f"probe {call}:{n}"
                    variants.append(Variant(key, key, start(key, probe_edit(f"{call}:{n}")), path, False))
        if profile:
            no_state_edits = {}
            if wasm:
                no_state_edits[report.WASM] = proxy_edit(True, sink_port, filter_state=False, profile=True)
            if module:
                no_state_edits[report.MODULE] = module_edit("tokentap", sink_port, filter_state=False, profile=True)
            for name, no_state_edit in no_state_edits.items():
                variants.append(Variant(f"{name}, non-LLM path", name, envoys[name], NON_LLM_PATH, False))
                variants.append(Variant(f"{name}, disabled on the route", name, envoys[name], DISABLED_PATH, False))
                key = f"{name}, filter_state off"
                variants.append(Variant(key, key, start(key, no_state_edit), path, llm))
        for key, envoy in envoys.items():
            result.rss_idle[key] = envoy.proc.rss_bytes()
        for v in variants:
            result.checks.append(sanity_request(v.name, v.envoy.url + v.path, body_file, scenario.streaming))
        for ref in references:
            result.checks.append(sanity_request(f"{ref.name} alone", ref.url + LLM_PATH, body_file, scenario.streaming))
        #: Only tokentap proxies have tokentap counters.
        counters_before = {
            key: gateway_counters(e)
            for key, e in envoys.items()
            if key not in (report.BASELINE, report.EMPTY, report.EMPTY_MODULE) and not key.startswith("probe")
        }

        def target(v: Variant) -> Target:
            return Target(v.name, v.envoy.url, v.path, body_file, v.envoy.proc.pid, upstream.proc.pid)

        for conns in opts.connections:
            for v in variants:
                log_run(scenario.name, run_wrk(target(v), conns, opts.warmup, WARMUP), result)
            for rep in range(opts.reps):
                # A B C, C B A, A B C, ...: a linear drift weighs on all alike.
                for v in variants if rep % 2 == 0 else variants[::-1]:
                    log_run(scenario.name, run_wrk(target(v), conns, opts.duration, rep), result)
            for ref in references:
                alone = Target(f"{ref.name} alone", ref.url, LLM_PATH, body_file, ref.proc.pid, ref.proc.pid)
                log_run(scenario.name, run_wrk(alone, conns, opts.duration, REFERENCE), result)

        for key, envoy in envoys.items():
            result.rss_after[key] = envoy.proc.rss_bytes()
        if sink is not None:
            time.sleep(1.5)  # one more export period: queued spans reach the sink
            # The module takes the collector's answers (and counts spans as
            # exported) in a stream's hook: Envoy gives a module no worker
            # timer. One more request lets it see the last batch's answer.
            nudged = [key for key in counters_before if key.startswith(report.MODULE)]
            for key in nudged:
                sanity_request(f"{key} (nudge)", envoys[key].url + path, body_file, scenario.streaming)
            if nudged:
                time.sleep(0.5)
                result.checks.append(
                    f"{', '.join(nudged)}: one request after the load, so the module takes the last export's answer "
                    "(it reads answers in a stream's hook, having no timer of its own)"
                )
        if not llm:
            result.checks.append(
                f"{scenario.path} is not LLM traffic: the filter counts nothing for it (each proxy answered it above)"
            )
        check_filter_worked(result, variants, envoys, counters_before, scenario.streaming, sink)
    finally:
        for envoy in envoys.values():
            envoy.stop()
        if sink is not None:
            sink.stop()
    return result


def check_filter_worked(
    result: report.ScenarioResult,
    variants: list[Variant],
    envoys: dict[str, stack.Envoy],
    before: dict[str, dict[str, float]],
    streaming: bool,
    sink: OtlpSink | None,
) -> None:
    """The filter is FAIL_OPEN: with a broken VM traffic would pass untouched
    and this benchmark would measure nothing. Its counters must have moved by
    at least what wrk completed through it (in-flight requests cut at the end
    of a run may add a few)."""
    tokens_per_response = SSE_EVENTS - 3 if streaming else CHAT_RESPONSE["usage"]["completion_tokens"]
    for key, counts in before.items():
        after = gateway_counters(envoys[key])
        delta = {k: after[k] - counts[k] for k in after}
        names = {v.name for v in variants if v.proxy == key and v.filtered}
        sent = sum(r.requests for r in result.runs if r.variant in names)
        result.checks.append(
            f"{key}: the filter counted {delta['requests']:.0f} LLM requests for {sent} completed by wrk and "
            f"{delta['completion_tokens']:.0f} completion tokens (≥ {sent * tokens_per_response} expected); "
            f"parse errors {delta['parse_errors']:.0f}, unparsed responses {delta['unparsed']:.0f}"
        )
        if delta["requests"] < sent:
            result.problems.append(f"{key}: the filter counted fewer requests than completed: did the VM fail open?")
        if delta["completion_tokens"] < sent * tokens_per_response:
            result.problems.append(f"{key}: fewer completion tokens than sent: were responses read?")
        if delta["parse_errors"] or delta["unparsed"]:
            result.problems.append(f"{key}: parse errors or unparsed responses during the load")
        if sink is not None:
            result.checks.append(
                f"{key}: spans exported {delta['spans_exported']:.0f}, dropped {delta['spans_dropped']:.0f}"
            )
            if delta["spans_exported"] < sent:
                result.problems.append(f"{key}: fewer spans exported than requests completed")
            if delta["spans_dropped"]:
                result.problems.append(f"{key}: the filter dropped spans")
    if sink is not None:
        result.checks.append(
            f"OTLP sink: {sink.requests} exports, {sink.spans} spans, {sink.bytes / 1e6:.1f} MB, {sink.bad} undecodable"
        )
        if sink.bad:
            result.problems.append("the OTLP sink got undecodable exports")


def log_run(scenario: str, run, result: report.ScenarioResult) -> None:
    result.runs.append(run)
    tag = {WARMUP: "warm-up", REFERENCE: "ref"}.get(run.rep, f"rep {run.rep + 1}")
    print(
        f"  {scenario:8s} c={run.connections:<3d} {run.variant:28s} {tag:7s} "
        f"{run.rps:7.0f} rps  p50 {run.p50_ms:6.2f} ms  p99 {run.p99_ms:6.2f} ms  "
        f"proxy {run.proxy_us_per_request:4.0f} us/req  others {run.others_cpu_s / run.seconds:.2f} cores  "
        f"err {run.errors}  load {run.load_before:.2f}->{run.load_after:.2f}",
        file=sys.stderr,
        flush=True,
    )


# --- main --------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short runs, one connection count: a smoke check")
    p.add_argument("--profile", action="store_true", help="add filter-on variants that skip work")
    p.add_argument("--probes", default="", help="extra probe-filter variants, e.g. time:0,time:1 (see filters/probe)")
    p.add_argument(
        "--stages",
        action="store_true",
        help="add ablation variants: tokentap stopping after " + ", ".join(STAGES) + " (built with bench-stages)",
    )
    p.add_argument(
        "--hostcalls",
        action="store_true",
        help=f"price each host call the filter makes: probe variants repeating one call {HOST_CALL_REPEAT}x per request (chat)",
    )
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated subset of " + ",".join(SCENARIOS))
    p.add_argument("--connections", help="comma-separated wrk connection counts (default 16,64; quick: 16)")
    p.add_argument("--duration", type=int, help="seconds per measured run (default 4; quick: 1)")
    p.add_argument("--warmup", type=int, help="seconds of the discarded warm-up run (default 2; quick: 1)")
    p.add_argument("--reps", type=int, help="measured runs per variant (default 3; quick: 1)")
    p.add_argument("--llm-sim", type=Path, help="llm-sim binary: also measure it alone as an SSE upstream")
    p.add_argument(
        "--shells",
        default=",".join(SHELLS),
        help="comma-separated shells whose empty and tokentap variants run (default wasm,module)",
    )
    p.add_argument(
        "--instructions",
        default="latest",
        help="JSON of bench/gateway_instructions.py to show instructions per request beside the CPU: a path, "
        "'latest' (the newest bench/results/gateway-instructions-*.json, the default) or 'none'",
    )
    p.add_argument(
        "--out",
        type=Path,
        help="Markdown output (default bench/results/gateway-<date>[-profile].md; "
        "quick: <target>/gateway-bench/gateway-<date>-quick.md)",
    )
    opts = p.parse_args(argv)
    opts.connections = [int(c) for c in (opts.connections or ("16" if opts.quick else "16,64")).split(",")]
    opts.duration = opts.duration or (1 if opts.quick else 4)
    opts.warmup = opts.warmup or (1 if opts.quick else 2)
    opts.reps = opts.reps or (1 if opts.quick else 3)
    opts.scenarios = [s for s in opts.scenarios.split(",") if s]
    opts.probes = [s for s in opts.probes.split(",") if s]
    opts.shells = [s for s in opts.shells.split(",") if s]
    if not opts.shells or any(s not in SHELLS for s in opts.shells):
        p.error(f"--shells: one or more of {','.join(SHELLS)}")
    unknown = [s for s in opts.scenarios if s not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenario(s) {unknown}")
    if not (1 <= opts.duration <= 60 and 1 <= opts.warmup <= 30 and 1 <= opts.reps <= 20):
        p.error("duration 1-60 s, warmup 1-30 s, reps 1-20")
    if any(not 1 <= c <= 1024 for c in opts.connections):
        p.error("connections 1-1024")
    return opts


def target_dir() -> Path:
    return Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def envoy_version() -> str:
    out = subprocess.run([str(harness.envoy_binary()), "--version"], capture_output=True, text=True, timeout=30)
    # "... version: <sha>/1.40.0/Clean/RELEASE/BoringSSL"
    parts = out.stdout.split("version:")[-1].strip().split("/")
    return parts[1] if len(parts) > 1 else out.stdout.strip()


def newer_sources(artifact: Path, crates: tuple[str, ...]) -> list[Path]:
    """Sources of `crates` (under filters/) changed after `artifact` was built."""
    built = artifact.stat().st_mtime
    return [p for c in crates for p in (REPO / "filters" / c).rglob("*.rs") if p.stat().st_mtime > built]


def build_meta(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()[:12]}


def filters_dirty() -> bool:
    """Uncommitted changes under filters/: the builds are not the commit's."""
    out = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--", "filters"], capture_output=True, text=True
    ).stdout
    return bool(out.strip())


def main(argv: list[str] | None = None) -> int:
    global PROBE_WASM
    opts = parse_args(argv)
    wasm = harness.WASM
    if not wasm.exists():
        print(f"{wasm} missing: cargo build -p tokentap-filter --target wasm32-wasip1 --release", file=sys.stderr)
        return 2
    newer = newer_sources(wasm, ("core", "wasm"))
    if newer:
        print(f"warning: {len(newer)} filter source file(s) are newer than {wasm}; rebuild it", file=sys.stderr)
    module_newer: list[Path] = []
    if "module" in opts.shells:
        if not MODULE.exists():
            print(f"{MODULE} missing: cargo build -p tokentap-module --profile module (or --shells wasm)", file=sys.stderr)
            return 2
        module_newer = newer_sources(MODULE, ("core", "module"))
        if module_newer:
            print(f"warning: {len(module_newer)} source file(s) are newer than {MODULE}; rebuild it", file=sys.stderr)
    if not PROBE_WASM.exists():
        print(f"{PROBE_WASM} missing: cargo build -p tokentap-probe --target wasm32-wasip1 --release", file=sys.stderr)
        return 2
    if shutil.which("wrk") is None:
        print("wrk not found (Debian package `wrk`)", file=sys.stderr)
        return 2
    if opts.llm_sim is not None and not opts.llm_sim.exists():
        print(f"{opts.llm_sim} missing", file=sys.stderr)
        return 2
    sse_binary = build_sse_upstream(target_dir() / "gateway-bench")
    if opts.stages:
        build_stages_wasm()
    commit = subprocess.run(
        ["git", "-C", str(REPO), "log", "-1", "--format=%h", "--", "filters/core/src", "filters/wasm/src", "filters/module/src"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    now = dt.datetime.now()
    meta = {
        "mode": "quick" if opts.quick else ("profile" if opts.profile else "full"),
        "host_call_repeat": HOST_CALL_REPEAT,
        "date": now.strftime("%Y-%m-%d %H:%M"),
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model(),
        "envoy": envoy_version(),
        "wasm": wasm.name,
        "filter_commit": commit or "unknown",
        "filters_dirty": filters_dirty(),
        "wasm_stale": bool(newer),
        "module_stale": bool(module_newer),
        "shells": opts.shells,
        "load_start": loadavg(),
    }
    print(
        f"gateway benchmark ({meta['mode']}): {opts.scenarios}, connections {opts.connections}, "
        f"{opts.reps} x {opts.duration} s per variant; load {meta['load_start']:.2f}",
        file=sys.stderr,
        flush=True,
    )
    results: list[report.ScenarioResult] = []
    upstreams: list[Upstream] = []
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as tmp_name:
        tmp = Path(tmp_name)
        # Every proxy of the run loads this copy: a rebuild of the filter
        # during the run must not put two builds into one report.
        stack.WASM = tmp / wasm.name
        shutil.copyfile(wasm, stack.WASM)
        PROBE_WASM = Path(shutil.copyfile(PROBE_WASM, tmp / PROBE_WASM.name))
        meta["wasm_bytes"] = stack.WASM.stat().st_size
        meta["wasm_sha256"] = hashlib.sha256(stack.WASM.read_bytes()).hexdigest()[:12]
        if "module" in opts.shells:
            # The module too: its own directory is Envoy's search path.
            (tmp / "module").mkdir()
            stack.MODULE = Path(shutil.copyfile(MODULE, tmp / "module" / MODULE.name))
            meta["module"] = build_meta(stack.MODULE)
        try:
            by_key: dict[str, Upstream] = {}
            sim = None
            for name in opts.scenarios:
                scenario = SCENARIOS[name]
                refs: list[Upstream] = []
                upstream = by_key.get(scenario.upstream_key)
                if upstream is None:
                    # First scenario on this upstream: also measure it alone.
                    if scenario.streaming:
                        upstream = start_sse_upstream(tmp, sse_binary, SSE_EVENTS, scenario.gap_us)
                    else:
                        upstream = start_fast_upstream(tmp, CHAT_RESPONSE)
                    by_key[scenario.upstream_key] = upstream
                    upstreams.append(upstream)
                    refs.append(upstream)
                    if opts.llm_sim is not None and scenario.streaming and sim is None:
                        sim = start_llm_sim(tmp, opts.llm_sim, SSE_EVENTS - 3)
                        upstreams.append(sim)
                        refs.append(sim)
                results.append(run_scenario(scenario, tmp, upstream, refs, opts))
        finally:
            for u in upstreams:
                u.proc.stop()
    meta["load_end"] = loadavg()
    instructions = report.load_instructions(opts.instructions, BENCH / "results")
    text = report.render(results, opts, meta, instructions)
    print(text)
    if opts.out is not None:
        out = opts.out
    elif opts.quick:
        # A smoke run is not a result: keep it out of the source tree.
        out = target_dir() / "gateway-bench" / f"gateway-{now:%Y-%m-%d}-quick.md"
    else:
        suffix = "".join(f"-{k}" for k in ("profile", "stages", "hostcalls") if getattr(opts, k))
        out = BENCH / "results" / f"gateway-{now:%Y-%m-%d}{suffix}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"written to {out}", file=sys.stderr)
    problems = [p for r in results for p in r.problems]
    errors = sum(x.errors for r in results for x in r.runs)
    if problems or errors:
        print(f"{len(problems)} problem(s), {errors} request error(s): see the report", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
