#!/usr/bin/env python3
"""Writes the hand-made seed inputs into corpus/<target>/seed-*.

Run from anywhere: `python3 filters/core/fuzz/make_seeds.py`. The seeds are
realistic inputs (vLLM chat/completion streams with and without usage, CRLF
and CR line ends, comments, [DONE], error events, split UTF-8, huge strings,
deep nesting, the plugin configuration from envoy/tokentap.yaml, W3C
traceparent examples). The fuzzer grows the corpus from them; `cargo fuzz
cmin` then keeps what adds coverage (see docs/fuzzing.md).

Streaming targets (sse_stream, json_scan, request_body) read a split-point
header first (see `split_input` in src/checks.rs): one byte with the number of
split points, then two little-endian bytes per point.
"""

import json
import pathlib
import re
import struct

ROOT = pathlib.Path(__file__).resolve().parent
REPO = ROOT.parents[2]
CORPUS = ROOT / "corpus"


def header(cuts):
    assert len(cuts) <= 7
    return bytes([len(cuts)]) + b"".join(struct.pack("<H", c) for c in cuts)


def write(target, name, data):
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / f"seed-{name}").write_bytes(data)


def split_seed(target, name, payload, cuts=()):
    """Writes the payload whole and, when cut points are given, split."""
    write(target, name, header([]) + payload)
    if cuts:
        write(target, name + "-split", header(list(cuts)) + payload)


def cuts_inside(payload, needles, limit=7):
    """Cut points inside each needle occurrence (mid multi-byte char, mid CRLF)."""
    out = []
    for n in needles:
        i = payload.find(n)
        if i >= 0:
            out.append(i + max(1, len(n) // 2))
    return sorted(set(out))[:limit]


# --------------------------------------------------------------- sse_stream

def chunk(delta, finish=None, model="mistral-7b", extra=None):
    obj = {
        "id": "chatcmpl-7f3a",
        "object": "chat.completion.chunk",
        "created": 1730000000,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    if extra:
        obj.update(extra)
    return "data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n\n"


def chat_stream(tokens, usage, eol="\n"):
    s = chunk({"role": "assistant", "content": ""})
    for t in tokens:
        s += chunk({"content": t})
    s += chunk({}, finish="stop")
    if usage:
        s += "data: " + json.dumps({
            "id": "chatcmpl-7f3a", "object": "chat.completion.chunk", "created": 1730000000,
            "model": "mistral-7b", "choices": [],
            "usage": {"prompt_tokens": 21, "total_tokens": 21 + len(tokens),
                      "completion_tokens": len(tokens),
                      "prompt_tokens_details": {"cached_tokens": 16}},
        }, separators=(",", ":")) + "\n\n"
    s += "data: [DONE]\n\n"
    return s.replace("\n", eol).encode()


def sse_seeds():
    t = "sse_stream"
    words = ["Hel", "lo", ",", " wörld", " 日本語", " 😀", "!"]
    s = chat_stream(words, True)
    split_seed(t, "chat-usage", s, cuts_inside(s, ["ö".encode(), "日".encode(), "😀".encode(), b"data: [D", b"\n\n", b"prompt_tokens\":2"]))
    split_seed(t, "chat-no-usage", chat_stream(words, False))
    s = chat_stream(words, True, "\r\n")
    split_seed(t, "chat-crlf", s, cuts_inside(s, [b"\r\n\r\n", b"\r\n", "😀".encode()]))
    split_seed(t, "chat-cr", chat_stream(words[:3], True, "\r"))
    s = b": keep-alive\n\n" + chat_stream(words[:2], False).replace(b"\n\ndata: {", b"\n\n: ping\n\ndata: {", 1)
    split_seed(t, "comments", s, [3, 20])
    err = ("data: " + json.dumps({"error": {"object": "error", "message": "CUDA out of memory",
           "type": "InternalServerError", "param": None, "code": 500}}) + "\n\n").encode()
    s = chat_stream(words[:2], False).replace(b"data: [DONE]\n\n", err)
    split_seed(t, "error-event", s, cuts_inside(s, [b"\"error\"", b"Internal"]))
    # Legacy completions stream (choices[].text), vLLM style.
    s = b""
    for w in ["The", " quick", " fox"]:
        s += ("data: " + json.dumps({"id": "cmpl-1", "object": "text_completion", "created": 1,
              "model": "mistral-7b", "choices": [{"index": 0, "text": w, "logprobs": None,
              "finish_reason": None, "stop_reason": None}]}) + "\n\n").encode()
    s += ("data: " + json.dumps({"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "mistral-7b",
          "choices": [{"index": 0, "text": "", "finish_reason": "length"}],
          "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}) + "\n\n").encode()
    s += b"data: [DONE]\n\n"
    split_seed(t, "completions", s, [1, 7, 60])
    # Reasoning and tool calls.
    s = (chunk({"role": "assistant", "reasoning_content": "think"}) +
         chunk({"reasoning": "more"}) +
         chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\":"}}]}) +
         chunk({"function_call": {"name": "f"}}) +
         chunk({}, finish="tool_calls") + "data: [DONE]\n\n").encode()
    split_seed(t, "reasoning-tools", s)
    # Anthropic-style named events.
    s = (b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"claude\",\"usage\":{\"input_tokens\":25,\"output_tokens\":1,\"cache_read_input_tokens\":3}}}\n\n"
         b"event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n"
         b"event: ping\ndata: {\"type\": \"ping\"}\n\n"
         b"event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":15}}\n\n"
         b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n")
    split_seed(t, "anthropic", s, [5, 40])
    # Anthropic Messages API, as Anthropic documents it: thinking, tool use,
    # cache fields, an error event.
    s = (b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"model\":\"mistral-7b\",\"content\":[],\"usage\":{\"input_tokens\":3,\"cache_creation_input_tokens\":5,\"cache_read_input_tokens\":7,\"output_tokens\":1}}}\n\n"
         b"event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"thinking\",\"thinking\":\"\"}}\n\n"
         b"event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"thinking_delta\",\"thinking\":\"hmm \\u00e9\"}}\n\n"
         b"event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":1,\"content_block\":{\"type\":\"tool_use\",\"id\":\"t\",\"name\":\"f\",\"input\":{}}}\n\n"
         b"event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"a\\\":\"}}\n\n"
         + "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":2,\"delta\":{\"type\":\"text_delta\",\"text\":\"日本 😀\"}}\n\n".encode()
         + b"event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"tool_use\"},\"usage\":{\"output_tokens\":9}}\n\n"
         b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n")
    split_seed(t, "anthropic-messages", s, cuts_inside(s, ["日".encode(), "😀".encode(), b"thinking_delta", b"output_tokens\":9"]))
    # OpenAI Responses API, vLLM style.
    resp = {"id": "resp_1", "object": "response", "model": "mistral-7b", "status": "in_progress", "output": [], "usage": None}
    s = ("event: response.created\ndata: " + json.dumps({"type": "response.created", "sequence_number": 0, "response": resp}) + "\n\n").encode()
    for i, (kind, w) in enumerate([("output_text", "Hé"), ("reasoning_text", "think"), ("function_call_arguments", "{\"x\":"), ("output_text", "")]):
        s += (f"event: response.{kind}.delta\ndata: " + json.dumps({"type": f"response.{kind}.delta", "sequence_number": i + 1, "item_id": "m", "output_index": 0, "content_index": 0, "delta": w}, ensure_ascii=False) + "\n\n").encode()
    done = dict(resp, status="incomplete", incomplete_details={"reason": "max_output_tokens"},
                usage={"input_tokens": 12, "input_tokens_details": {"cached_tokens": 8}, "output_tokens": 3,
                       "output_tokens_details": {"reasoning_tokens": 1}, "total_tokens": 15})
    s += ("event: response.incomplete\ndata: " + json.dumps({"type": "response.incomplete", "sequence_number": 9, "response": done}) + "\n\n").encode()
    s += b"event: error\ndata: {\"type\":\"error\",\"code\":\"server_error\",\"message\":\"x\",\"param\":null,\"sequence_number\":10}\n\n"
    split_seed(t, "openai-responses", s, cuts_inside(s, ["é".encode(), b"response.output_text.delta", b"input_tokens\":1", b"\n\n"]))
    failed = ("data: " + json.dumps({"type": "response.failed", "response": dict(resp, status="failed", error={"code": "rate_limit_exceeded", "message": "x"})}) + "\n\n").encode()
    split_seed(t, "openai-responses-failed", failed + b"data: {\"type\":\"response.output_text.delta\",\"delta\":\"cut", [10])
    # A huge content string and deep nesting inside one event.
    big = "x" * 20000 + "é" * 500
    s = chunk({"content": big}).encode() + b"data: [DONE]\n\n"
    split_seed(t, "huge-string", s, [100, 10000, 20050])
    deep = "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}],\"x\":" + "[" * 300 + "]" * 300 + "}\n\n"
    split_seed(t, "deep-nesting", deep.encode())
    deep_ok = "data: {\"a\":" + "[" * 100 + "1" + "]" * 100 + ",\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n"
    split_seed(t, "deep-valid", deep_ok.encode())
    # Multi-line data, odd fields, BOM, DONE variants, malformed and cut events.
    s = (b"\xef\xbb\xbfdata: {\"choices\":\ndata: [{\"delta\":{\"content\":\"a\"}}]}\n\n"
         b"id: 7\nretry: 1000\n\n"
         b"event: x\n\n"
         b"data\n\n"
         b"data:{not json\n\n"
         b"data: \xff\xfe\n\n"
         b"verylongfieldname: 1\n\n"
         b"data:[DONE]\n\n"
         b"data:  [DONE] \n\n"
         b"data: {\"usage\":{\"completion_tokens\":4}")
    split_seed(t, "odd-framing", s, [1, 2, 30, 60])
    s = b"\xef\xbb" + chat_stream(["a"], False)
    split_seed(t, "partial-bom", s, [1])
    s = b"data: {\"usage\":{\"prompt_tokens\":1e3,\"completion_tokens\":-1,\"total_tokens\":1.5,\"prompt_tokens_details\":{\"cached_tokens\":\"7\"}}}\n\n"
    split_seed(t, "usage-odd-numbers", s)
    split_seed(t, "empty", b"")
    split_seed(t, "only-eols", b"\r\n\r\r\n\n\r")


# ---------------------------------------------------------------- json_scan

def json_seeds():
    t = "json_scan"
    resp = json.dumps({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1730000000, "model": "mistral-7b",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Bonjour, ça va? 😀",
                     "tool_calls": []}, "logprobs": None, "finish_reason": "stop", "stop_reason": None}],
        "usage": {"prompt_tokens": 9, "total_tokens": 13, "completion_tokens": 4,
                  "prompt_tokens_details": {"cached_tokens": 0},
                  "completion_tokens_details": {"reasoning_tokens": 2}},
        "prompt_logprobs": None,
    }, ensure_ascii=False).encode()
    split_seed(t, "chat-response", resp, cuts_inside(resp, ["ç".encode(), "😀".encode(), b"usage", b"13"]))
    split_seed(t, "error-response", json.dumps({"object": "error", "message": "The model `gpt-4` does not exist.",
               "type": "NotFoundError", "param": None, "code": 404}).encode())
    split_seed(t, "openai-error", b'{"error":{"message":"Rate limit","type":"rate_limit_error","code":"rate_limit_exceeded"}}')
    split_seed(t, "anthropic-response", b'{"id":"msg_1","type":"message","model":"claude","content":[{"type":"text","text":"Hi"}],"stop_reason":"end_turn","usage":{"input_tokens":10,"output_tokens":2,"cache_read_input_tokens":4}}')
    s = rb'{"k\u00e9y":"a\"b\\c\/d\b\f\n\r\t\u0000\u00e9\ud83d\ude00 \ud83dx \ude00 \uD83D\uDE00"}'
    split_seed(t, "escapes", s, cuts_inside(s, [rb"\u00e9", rb"\ud83d\ude00", rb"\\c"]))
    split_seed(t, "numbers", b'[0,-0,1.5e3,-2E-2,12345678901234567890123,1e400,-9223372036854775808,18446744073709551615,0.1,1.0]')
    split_seed(t, "bad-numbers", b'[01,1.,-,1e,--1,1.2.3,+1]')
    split_seed(t, "deep-300", b"[" * 300 + b"]" * 300)
    split_seed(t, "deep-129", b"{\"a\":" * 129 + b"1" + b"}" * 129)
    split_seed(t, "deep-9", b'{"a":{"b":{"c":{"d":{"e":{"f":{"g":{"h":{"i":"deep"}}}}}}}}}')
    split_seed(t, "long-key", ('{"' + "k" * 70 + '":{"model":"x"},"' + "é" * 40 + '":1,"model":"y"}').encode())
    long = ("é" * 200 + "😀").encode()
    s = b'{"v":"' + long + b'"}'
    split_seed(t, "long-string", s, [6 + 127, 6 + 128, 6 + 129])
    split_seed(t, "invalid-utf8", b'{"model":"m\xc3\x28\xff","k\xe2\x82":1}')
    split_seed(t, "control-char", b'{"a":"x\x01y"}')
    split_seed(t, "trailing", b'{} {}')
    split_seed(t, "trailing-ws", b' \t\r\n{"a":[true,false,null]} \n')
    for name, doc in [("top-number", b"1234"), ("top-string", b'"s"'), ("top-true", b"true"),
                      ("bad-literal", b"[tru]"), ("unterminated", b'{"a":"b'),
                      ("mismatched", b'{"a":[1}]'), ("whitespace", b"   "), ("empty", b"")]:
        split_seed(t, name, doc)


# ------------------------------------------------------------- request_body

def request_seeds():
    t = "request_body"
    base = {"model": "mistral-7b", "messages": [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Explain \"model\": KV caches in 3 words ✨"}],
            "stream": True, "max_tokens": 64, "temperature": 0.2}
    s = json.dumps(base, ensure_ascii=False).encode()
    split_seed(t, "chat-stream", s, cuts_inside(s, [b"model", "✨".encode(), b"true"]))
    split_seed(t, "chat-include-usage-false", json.dumps({**base, "stream_options": {"include_usage": False, "continuous_usage_stats": True}}).encode())
    split_seed(t, "chat-include-usage-true", json.dumps({**base, "stream_options": {"include_usage": True}}).encode())
    split_seed(t, "chat-stream-options-empty", json.dumps({**base, "stream_options": {}}).encode())
    split_seed(t, "chat-no-stream", json.dumps({**base, "stream": False}).encode())
    split_seed(t, "rag", json.dumps({**base, "rag": {"collection": "hr-handbook", "top_k": "5"}}).encode())
    split_seed(t, "rag-numeric", json.dumps({**base, "rag": {"collection": "a b;c=d", "top_k": 8}}).encode())
    split_seed(t, "max-completion", b'{"model":"m","max_completion_tokens":1e2,"stream":true}')
    split_seed(t, "completions", json.dumps({"model": "mistral-7b", "prompt": ["a", "b"], "stream": True,
               "max_tokens": 16, "logprobs": 1}).encode())
    split_seed(t, "escaped-keys", rb' {"mo\u0064el":"m","str\u0065am":true}')
    split_seed(t, "stream-options-null", json.dumps({**base, "stream_options": None}).encode())
    split_seed(t, "stream-options-array", b'{"stream":true,"stream_options":[]}')
    split_seed(t, "empty-object", b"{ }")
    split_seed(t, "ws-object", b"\n\t {\"stream\":true}\n")
    split_seed(t, "array", b'[{"model":"m"}]')
    split_seed(t, "dup-keys", b'{"model":"a","model":"b","stream":false,"stream":true}')
    split_seed(t, "long-model", json.dumps({"model": " " * 10 + "m" * 300, "stream": True}).encode())
    split_seed(t, "empty", b"")
    split_seed(t, "invalid", b'{"model":"m","stream":tru')


# ------------------------------------------------------------ plugin_config

def config_seeds():
    t = "plugin_config"
    yaml_text = (REPO / "envoy" / "tokentap.yaml").read_text()
    m = re.search(r"value: \|\n((?:\s{20}.*\n)+)", yaml_text)
    if m:
        write(t, "envoy-tokentap", m.group(1).encode())
    cfgs = {
        "empty-object": {},
        "tracing": {"tracing": {"cluster": "otel", "sample_ratio": 0.25, "authority": "collector:4318",
                                "resource": {"k8s.cluster.name": "prod"}, "max_batch_spans": 64}},
        "tenant-metadata": {"tenant": {"metadata": {"namespace": "envoy.filters.http.jwt_authn",
                                                    "path": ["payload", "tenant"]}, "allowed": ["acme", "globex"]}},
        "rag": {"rag": {"collection_header": "X-Collection", "collection_field": "rag.collection",
                        "top_k_field": "retrieval.top_k", "collections": ["handbook", "wiki"],
                        "response_header_prefix": "X-RAG-"}},
        "paths": {"llm_paths": ["/openai/v1/chat/completions", {"path": "/gen", "operation": "text_completion"},
                                {"path": "/embed"}], "replace_default_paths": True},
        "limits": {"limits": {"max_value_length": 8, "max_routes": 1, "max_series_per_metric": 10},
                   "usage": {"inject_include_usage": True, "max_request_buffer_bytes": 1024},
                   "cache_hit_header": {"name": "x-cache", "values": ["HIT"]}, "filter_state": False},
        "bad-ratio": {"tracing": {"cluster": "otel", "sample_ratio": 2}},
        "bad-both-tenants": {"tenant": {"header": "x-t", "metadata": {"namespace": "n", "path": ["p"]}}},
        "bad-header": {"tenant": {"header": "x tenant"}},
        "bad-unknown-field": {"tenantz": {}},
        "bad-label": {"models": ["mistral 7b"]},
        "bad-no-paths": {"replace_default_paths": True},
        "bad-batch": {"tracing": {"cluster": "c", "max_batch_spans": 10, "max_queue_spans": 5}},
        "bad-field-path": {"rag": {"collection_field": "a..b"}},
    }
    for name, c in cfgs.items():
        write(t, name, json.dumps(c, indent=1).encode())
    write(t, "empty", b"")
    write(t, "ws", b"  \n ")
    write(t, "not-json", b"tenant: x")
    write(t, "dup-key", b'{"models":["a"],"models":["b"]}')


# ------------------------------------------------------------ trace_context

def trace_seeds():
    t = "trace_context"
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    ts = "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"
    for name, value in [
        ("valid", tp + "\n" + ts),
        ("valid-no-state", tp),
        ("ows", " \t" + tp + "\t \n  " + ts + " "),
        ("unsampled", tp[:-2] + "00"),
        ("unknown-flags", tp[:-2] + "ff"),
        ("future-version", "cc" + tp[2:] + "-what-the-future-holds"),
        ("future-version-bad", "cc" + tp[2:] + "xyz"),
        ("version-ff", "ff" + tp[2:]),
        ("v00-extra", tp + "-01"),
        ("uppercase", tp.upper()),
        ("zero-trace", "00-" + "0" * 32 + "-00f067aa0ba902b7-01"),
        ("zero-span", "00-4bf92f3577b34da6a3ce929d0e0e4736-" + "0" * 16 + "-01"),
        ("bad-delims", tp.replace("-", "_")),
        ("short", tp[:-1]),
        ("state-33", tp + "\n" + ",".join(f"k{i}=v" for i in range(33))),
        ("state-long", tp + "\n" + "a=" + "b" * 600),
        ("state-bad-member", tp + "\n" + "foo,bar=1"),
        ("state-empty-members", tp + "\n" + "a=1,, ,\tb=2"),
        ("state-nonascii", tp + "\n" + "a=é"),
        ("multibyte", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0é"),
    ]:
        write(t, name, value.encode())


# -------------------------------------------------------------- rag_headers

def rag_seeds():
    t = "rag_headers"
    write(t, "contract", bytes([0x7F, 63]) + b"12.5\n0.87\n4\n3600\nPASS\ntimeout\nhr-handbook")
    write(t, "bad-values", bytes([0x7F, 7]) + b"fast\n-1\nNaN\ninf\nmeh\ndisk on fire\n  ")
    write(t, "partial", bytes([0b0100101, 0]) + b" 1e3 \n\n4.9\n\n\n\nwiki")
    write(t, "unicode", bytes([0x7F, 255]) + "１２\n0.5\n3\n1\nSKIPPED\n\u00a0timeout\ncol;lection=x é".encode() + b"\xff")
    write(t, "many-tenants", bytes([0x40, 2]) + b"\n".join(f"tenant-{i}".encode() for i in range(40)))


def main():
    sse_seeds()
    json_seeds()
    request_seeds()
    config_seeds()
    trace_seeds()
    rag_seeds()
    for d in sorted(CORPUS.iterdir()):
        files = list(d.iterdir())
        print(f"{d.name}: {len(files)} files, {sum(f.stat().st_size for f in files)} bytes")


if __name__ == "__main__":
    main()
