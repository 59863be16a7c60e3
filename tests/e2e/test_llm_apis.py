"""The OpenAI Responses API and the Anthropic Messages API through the gateway.

Real Envoy with the built filter (both shells), llm-sim serving
`/v1/responses` and `/v1/messages` as vLLM does, and `RawUpstream` scripts
for what a runtime should not send. Token truth is the usage the client
received; TTFT truth is llm-sim's configured prefill time; pass-through
truth is the bytes the upstream wrote.
"""

from __future__ import annotations

import json

import pytest

from harness import parse_exposition, post_json, sse_events, stream_timed
from raw_upstream import RawUpstream, Script
from stack import hcm_of, start_envoy, start_sim

TTFT_MS = 150
ITL_MS = 5
RESPONSES, MESSAGES = "/v1/responses", "/v1/messages"
SSE = {"content-type": "text/event-stream"}
JSON = {"content-type": "application/json"}


def _responses(text: str, max_tokens: int, stream: bool) -> dict:
    return {"model": "mistral-7b", "input": [{"role": "user", "content": text}], "max_output_tokens": max_tokens, "stream": stream}


def _messages(text: str, max_tokens: int, stream: bool) -> dict:
    return {"model": "mistral-7b", "max_tokens": max_tokens, "messages": [{"role": "user", "content": text}], "stream": stream}


def client_usage(path: str, body: bytes, streamed: bool) -> tuple[int, int, int]:
    """(input, output, content events) as the client read them, parsed here
    independently of the filter. Anthropic's input is input_tokens plus the
    cache reads and writes."""
    if not streamed:
        doc = json.loads(body)
        u = doc["usage"]
        if path == RESPONSES:
            return u["input_tokens"], u["output_tokens"], 0
        return u["input_tokens"] + u.get("cache_read_input_tokens", 0) + u.get("cache_creation_input_tokens", 0), u["output_tokens"], 0
    inp = out = None
    content = 0
    for data in sse_events(body):
        ev = json.loads(data)
        t = ev["type"]
        if path == RESPONSES:
            if t.endswith(".delta") and ev.get("delta"):
                content += 1
            if t == "response.completed" and ev["response"]["usage"]:
                inp, out = ev["response"]["usage"]["input_tokens"], ev["response"]["usage"]["output_tokens"]
        else:
            if t == "message_start" and "usage" in ev["message"]:
                u = ev["message"]["usage"]
                inp = u["input_tokens"] + u.get("cache_read_input_tokens", 0) + u.get("cache_creation_input_tokens", 0)
            if t == "content_block_delta" and ev["delta"].get("text"):
                content += 1
            if t == "message_delta" and "usage" in ev:
                out = ev["usage"]["output_tokens"]
    return inp, out, content


def tokens(scrape, **match: str) -> dict[tuple[str, str], float]:
    """Token sums by (token_type, source) over the series matching `match`."""
    out: dict[tuple[str, str], float] = {}
    for s in scrape.series("llm_gateway_tokens_total", **match):
        key = (s.labels["token_type"], s.labels["source"])
        out[key] = out.get(key, 0) + s.value
    return out


@pytest.fixture
def sim_gateway(logdir, wasm_path):
    sim = start_sim(logdir, "--ttft-ms", str(TTFT_MS), "--itl-ms", str(ITL_MS), name="sim")
    envoy = start_envoy(logdir, stable_port=sim.port)
    yield envoy
    envoy.stop()
    sim.stop()


@pytest.mark.parametrize("path", [RESPONSES, MESSAGES])
def test_stream_and_non_stream_give_exact_tokens_and_ttft(sim_gateway, path):
    make = _responses if path == RESPONSES else _messages
    route = path.rsplit("/", 1)[1]
    url = sim_gateway.url + path
    want_in = want_out = 0
    streams = 0
    for i, (stream, n) in enumerate([(False, 4), (True, 6), (True, 3), (False, 2)]):
        payload = make(f"request {i} for the {route} API", n, stream)
        if stream:
            status, headers, body, _ = stream_timed(url, payload, headers={"x-tenant-id": "acme"})
            assert headers["content-type"].startswith("text/event-stream")
            streams += 1
        else:
            r = post_json(url, payload, headers={"x-tenant-id": "acme"})
            status, body = r.status, r.body
        assert status == 200, body[:300]
        inp, out, content = client_usage(path, body, stream)
        assert out == n and inp > 0
        if stream:
            assert content == n
        want_in += inp
        want_out += out

    sim_gateway.flush_wait()
    scrape = parse_exposition(sim_gateway.stats_prometheus())
    assert tokens(scrape, route=route) == {("prompt", "usage"): want_in, ("completion", "usage"): want_out}
    assert scrape.value("llm_gateway_requests_total", route=route, status="200") == 4
    assert scrape.series("llm_gateway_errors_total") == []
    assert scrape.value("llm_gateway_parse_errors_total") == 0
    for s in scrape.series("llm_gateway_requests_total", route=route):
        assert s.labels["model"] == "mistral-7b" and s.labels["route_class"] == "interactive"
    # TTFT: one sample per stream, at the first text delta: not before
    # llm-sim's prefill, and well before the response ends.
    assert scrape.value("llm_gateway_time_to_first_token_milliseconds_count", route=route) == streams
    for s in scrape.series("llm_gateway_time_to_first_token_milliseconds_bucket", route=route):
        le = float(s.labels["le"])
        if le < TTFT_MS:
            assert s.value == 0, s
        elif le >= 250:
            assert s.value == streams, s

    log = sim_gateway.access_log_entries(4)
    mine = [e for e in log if e.get("operation") == route]
    assert len(mine) == 4
    assert sorted(e["streamed"] for e in mine) == [False, False, True, True]
    for e in mine:
        assert e["model"] == "mistral-7b" and e["usage_source"] == "usage"
        if e["streamed"]:
            assert TTFT_MS <= e["ttft_ms"] < TTFT_MS + 200


# ---------------------------------------------------------------- hostile upstream


def _ev(name: str, data: dict | bytes) -> bytes:
    raw = data if isinstance(data, bytes) else json.dumps(data, ensure_ascii=False).encode()
    return b"event: " + name.encode() + b"\ndata: " + raw + b"\n\n"


def responses_body(words: list[str], usage: bool = True, error: bool = False) -> bytes:
    resp = {"id": "resp_1", "object": "response", "model": "mistral-7b", "status": "in_progress", "output": [], "usage": None}
    b = _ev("response.created", {"type": "response.created", "sequence_number": 0, "response": resp})
    for i, w in enumerate(words):
        b += _ev("response.output_text.delta", {"type": "response.output_text.delta", "sequence_number": i + 1, "item_id": "m", "output_index": 0, "content_index": 0, "delta": w})
    if error:
        return b + _ev("error", {"type": "error", "code": "server_error", "message": "engine died", "param": None, "sequence_number": 99})
    done = dict(resp, status="completed")
    if usage:
        done["usage"] = {"input_tokens": 12, "input_tokens_details": {"cached_tokens": 8}, "output_tokens": len(words), "output_tokens_details": {"reasoning_tokens": 2}, "total_tokens": 12 + len(words)}
    return b + _ev("response.completed", {"type": "response.completed", "sequence_number": 100, "response": done})


def messages_body(words: list[str], usage: bool = True, error: bool = False) -> bytes:
    start_usage = {"input_tokens": 3, "cache_read_input_tokens": 7, "cache_creation_input_tokens": 5, "output_tokens": 1}
    b = _ev("message_start", {"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant", "content": [], "model": "mistral-7b", "stop_reason": None, "usage": start_usage}})
    b += _ev("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
    b += _ev("ping", {"type": "ping"})
    for w in words:
        b += _ev("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": w}})
    if error:
        return b + _ev("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    b += _ev("content_block_stop", {"type": "content_block_stop", "index": 0})
    delta = {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None}}
    if usage:
        delta["usage"] = {"output_tokens": len(words)}
    return b + _ev("message_delta", delta) + _ev("message_stop", {"type": "message_stop"})


WORDS = ["Hé", "日本語", "😀 ok", " done"]


def _routes(cfg):
    """`/h/<case>/v1/responses` and `/h/<case>/v1/messages` reach the raw upstream on the
    responses / messages routes."""
    routes = hcm_of(cfg)["route_config"]["virtual_hosts"][0]["routes"]
    for name in ("responses", "messages"):
        routes.insert(0, {"name": name, "match": {"safe_regex": {"regex": f"/h/[^/]+/v1/{name}"}}, "route": {"cluster": "llm_stable", "timeout": "30s"}})


@pytest.fixture
def upstream():
    with RawUpstream() as up:
        yield up


def _run(envoy, case: str, path: str, stream: bool = True):
    payload = (_responses if path == RESPONSES else _messages)("hi", 16, stream)
    return stream_timed(envoy.url + f"/h/{case}{path}", payload, headers={"x-tenant-id": case})


def test_every_byte_boundary_gives_the_same_facts_and_identical_bytes(logdir, wasm_path, upstream):
    """Each body is sent split at every byte boundary (one split per
    request): the client gets the upstream's bytes, and the filter reads
    the same tokens, TTFT sample and model every time."""
    bodies = {RESPONSES: responses_body(WORDS), MESSAGES: messages_body(WORDS)}
    for path, body in bodies.items():
        for cut in range(1, len(body)):
            upstream.script(f"/h/c{cut}{path}", Script(200, SSE, [body[:cut], body[cut:]]))
    envoy = start_envoy(logdir, stable_port=upstream.port, edit=_routes)
    try:
        for path, body in bodies.items():
            for cut in range(1, len(body)):
                status, _, got, _ = _run(envoy, f"c{cut}", path)
                assert status == 200 and got == body, f"{path} cut at {cut}: body changed"
        envoy.flush_wait()
        scrape = parse_exposition(envoy.stats_prometheus())
        n_r, n_m = len(bodies[RESPONSES]) - 1, len(bodies[MESSAGES]) - 1
        assert tokens(scrape, route="responses") == {
            ("prompt", "usage"): 12 * n_r, ("completion", "usage"): 4 * n_r,
            ("cached", "usage"): 8 * n_r, ("reasoning", "usage"): 2 * n_r,
        }
        assert tokens(scrape, route="messages") == {
            ("prompt", "usage"): (3 + 7 + 5) * n_m, ("completion", "usage"): 4 * n_m,
            ("cached", "usage"): 7 * n_m, ("cache_creation", "usage"): 5 * n_m,
        }
        assert scrape.value("llm_gateway_time_to_first_token_milliseconds_count", route="responses") == n_r
        assert scrape.value("llm_gateway_time_to_first_token_milliseconds_count", route="messages") == n_m
        assert scrape.value("llm_gateway_parse_errors_total") == 0
        assert scrape.series("llm_gateway_errors_total") == []
        models = {s.labels["model"] for s in scrape.series("llm_gateway_requests_total")}
        assert models == {"mistral-7b"}
    finally:
        envoy.stop()


def test_hostile_event_shapes(logdir, wasm_path, upstream):
    cases = {
        # case: (path, script)
        "r-malformed": (RESPONSES, Script(200, SSE, [_ev("response.output_text.delta", b"{\"type\":\"response.output_text.delta\",\"delta\":\"a"), b"data: \x00\x01\xff\n\n", responses_body(WORDS)])),
        "m-malformed": (MESSAGES, Script(200, SSE, [b"event: content_block_delta\ndata: {not json\n\n", b"data: [1,2\n\n", messages_body(WORDS)])),
        "r-error": (RESPONSES, Script(200, SSE, [responses_body(WORDS[:2], error=True)])),
        "m-error": (MESSAGES, Script(200, SSE, [messages_body(WORDS[:2], error=True)])),
        "r-no-usage": (RESPONSES, Script(200, SSE, [responses_body(WORDS, usage=False)])),
        "m-no-usage": (MESSAGES, Script(200, SSE, [messages_body(WORDS, usage=False)])),
        "r-huge": (RESPONSES, Script(200, SSE, [_ev("response.output_text.delta", {"type": "response.output_text.delta", "delta": "x" * (2 << 20)}), responses_body(WORDS)])),
        "m-cut": (MESSAGES, Script(200, SSE, [messages_body(WORDS)[:-30]])),
        "r-json": (RESPONSES, Script(200, JSON, [json.dumps({"id": "resp_2", "object": "response", "status": "completed", "model": "mistral-7b", "output": [], "usage": {"input_tokens": 9, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 5, "output_tokens_details": {"reasoning_tokens": 3}, "total_tokens": 14}}).encode()], content_length=True)),
        "m-json": (MESSAGES, Script(200, JSON, [json.dumps({"id": "msg_2", "type": "message", "model": "mistral-7b", "content": [], "stop_reason": "end_turn", "usage": {"input_tokens": 6, "cache_read_input_tokens": 2, "output_tokens": 4}}).encode()], content_length=True)),
    }
    for case, (path, script) in cases.items():
        upstream.script(f"/h/{case}{path}", script)
    envoy = start_envoy(logdir, stable_port=upstream.port, edit=_routes)
    try:
        for case, (path, script) in cases.items():
            status, _, got, _ = _run(envoy, case, path, stream=script.headers is SSE)
            assert status == 200 and got == script.body, f"{case}: body changed ({len(got)} vs {len(script.body)} bytes)"
        envoy.flush_wait()
        scrape = parse_exposition(envoy.stats_prometheus())

        def tok(case):
            return tokens(scrape, tenant=case)

        # Malformed events are counted and reading goes on: usage still exact.
        assert tok("r-malformed")[("completion", "usage")] == 4
        assert tok("m-malformed")[("completion", "usage")] == 4
        kinds = {s.labels["kind"]: s.value for s in scrape.series("llm_gateway_parse_errors_total")}
        assert kinds.get("sse_event", 0) >= 4
        # Errors inside a 200 stream.
        for case in ("r-error", "m-error"):
            assert scrape.value("llm_gateway_errors_total", tenant=case, error_type="stream_error") == 1, case
        # No usage for the answer: estimated from the content events, flagged.
        assert tok("r-no-usage") == {("completion", "estimated"): 4}
        # (Messages: the prompt counts of message_start are kept, under the
        # request's one source.)
        assert tok("m-no-usage") == {
            ("prompt", "estimated"): 15, ("completion", "estimated"): 4,
            ("cached", "estimated"): 7, ("cache_creation", "estimated"): 5,
        }
        # A 2 MiB delta is one content event; the stream is still exact.
        assert tok("r-huge")[("completion", "usage")] == 4
        # Non-streamed bodies.
        assert tok("r-json") == {("prompt", "usage"): 9, ("completion", "usage"): 5, ("reasoning", "usage"): 3}
        assert tok("m-json") == {("prompt", "usage"): 8, ("completion", "usage"): 4, ("cached", "usage"): 2}
        total = scrape.value("llm_gateway_requests_total")
        assert total == len(cases)
        log = (logdir / "envoy.log").read_text()
        assert "panic" not in log
    finally:
        envoy.stop()


def test_simulator_streams_pass_through_byte_identical(logdir, wasm_path):
    """What llm-sim wrote (read directly) is what the client got through Envoy."""
    sim = start_sim(logdir, "--ttft-ms", "20", "--itl-ms", "2", name="sim")
    envoy = start_envoy(logdir, stable_port=sim.port)
    try:
        for path, make in ((RESPONSES, _responses), (MESSAGES, _messages)):
            payload = make("same prompt, same text", 5, True)
            _, _, direct, _ = stream_timed(f"http://127.0.0.1:{sim.port}{path}", payload)
            _, _, proxied, _ = stream_timed(envoy.url + path, payload, headers={"x-tenant-id": "acme"})
            # Ids differ per response; event names, order and text do not.
            def shape(b):
                return [(json.loads(d)["type"], json.loads(d).get("delta")) for d in sse_events(b)]

            assert shape(proxied) == shape(direct)
            assert len(shape(direct)) >= 5 + 4
    finally:
        envoy.stop()
        sim.stop()
