"""Tests of the OTLP/HTTP test receiver itself.

Bodies are built with the Python protobuf classes (independent of the Rust
encoder), plus one body produced by the Rust encoder (the golden file shared
with `filters/core/src/trace/otlp.rs`), decoded here by the Python package.
"""

from __future__ import annotations

import gzip
import http.client
import socket
import threading
from pathlib import Path

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from otlp_receiver import PROTOBUF, TRACES_PATH, OtlpReceiver

REPO = Path(__file__).resolve().parents[2]
RUST_GOLDEN = REPO / "filters" / "core" / "src" / "trace" / "otlp_golden.hex"

TRACE_ID = bytes.fromhex("4bf92f3577b34da6a3ce929d0e0e4736")
SPAN_ID = bytes.fromhex("a1a2a3a4a5a6a7a8")
PARENT_ID = bytes.fromhex("00f067aa0ba902b7")


def kv(key: str, **value) -> KeyValue:
    return KeyValue(key=key, value=AnyValue(**value))


def sample_request(name: str = "chat mistral-7b", parent: bytes = PARENT_ID, flags: int = 0x301):
    request = ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    resource_spans.resource.attributes.extend(
        [kv("service.name", string_value="tokentap-gateway"), kv("k8s.pod.name", string_value="gw-0")]
    )
    scope_spans = resource_spans.scope_spans.add()
    scope_spans.scope.name = "tokentap"
    scope_spans.scope.version = "9.9.9"
    span = scope_spans.spans.add()
    span.trace_id = TRACE_ID
    span.span_id = SPAN_ID
    span.parent_span_id = parent
    span.trace_state = "congo=t61rcWkgMzE"
    span.flags = flags
    span.name = name
    span.kind = Span.SPAN_KIND_SERVER
    span.start_time_unix_nano = 1_700_000_000_000_000_000
    span.end_time_unix_nano = 1_700_000_001_000_000_000
    finish_reasons = AnyValue()
    finish_reasons.array_value.values.extend([AnyValue(string_value="stop")])
    nested = AnyValue()
    nested.kvlist_value.values.extend([kv("inner", int_value=1)])
    span.attributes.extend(
        [
            kv("gen_ai.request.model", string_value="mistral-7b"),
            kv("gen_ai.usage.input_tokens", int_value=42),
            kv("gen_ai.response.time_to_first_chunk", double_value=0.125),
            kv("gen_ai.request.stream", bool_value=True),
            KeyValue(key="gen_ai.response.finish_reasons", value=finish_reasons),
            KeyValue(key="nested", value=nested),
            kv("raw", bytes_value=b"\x00\x01"),
            KeyValue(key="unset"),
        ]
    )
    event = span.events.add()
    event.name = "gen_ai.first_token"
    event.time_unix_nano = 1_700_000_000_125_000_000
    event.attributes.extend([kv("gen_ai.chunk.index", int_value=0)])
    span.status.code = Status.STATUS_CODE_ERROR
    span.status.message = "upstream timeout"
    return request


def post(
    receiver: OtlpReceiver,
    body: bytes,
    *,
    path: str = TRACES_PATH,
    content_type: str = PROTOBUF,
    extra_headers: dict[str, str] | None = None,
    timeout: float = 5.0,
    conn: http.client.HTTPConnection | None = None,
) -> tuple[int, bytes]:
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", receiver.port, timeout=timeout)
    try:
        headers = {"Content-Type": content_type, **(extra_headers or {})}
        conn.request("POST", path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        if own:
            conn.close()


@pytest.fixture
def receiver():
    with OtlpReceiver() as r:
        yield r


def test_decodes_a_python_encoded_export(receiver):
    status, body = post(receiver, sample_request().SerializeToString(), extra_headers={"X-Probe": "1"})
    assert status == 200
    # The answer is a valid (empty) ExportTraceServiceResponse.
    response = ExportTraceServiceResponse.FromString(body)
    assert not response.HasField("partial_success")

    [request] = receiver.requests()
    assert (request.method, request.path, request.status) == ("POST", TRACES_PATH, 200)
    assert request.headers["content-type"] == PROTOBUF
    assert request.headers["x-probe"] == "1"
    assert request.error is None

    [span] = receiver.spans()
    assert span["trace_id"] == TRACE_ID.hex()
    assert span["span_id"] == SPAN_ID.hex()
    assert span["parent_span_id"] == PARENT_ID.hex()
    assert span["trace_state"] == "congo=t61rcWkgMzE"
    assert span["flags"] == 0x301
    assert span["sampled"] is True
    assert span["parent_is_remote"] is True
    assert span["name"] == "chat mistral-7b"
    assert span["kind"] == "SERVER"
    assert span["start_unix_nanos"] == 1_700_000_000_000_000_000
    assert span["end_unix_nanos"] == 1_700_000_001_000_000_000
    assert span["attributes"] == {
        "gen_ai.request.model": "mistral-7b",
        "gen_ai.usage.input_tokens": 42,
        "gen_ai.response.time_to_first_chunk": 0.125,
        "gen_ai.request.stream": True,
        "gen_ai.response.finish_reasons": ["stop"],
        "nested": {"inner": 1},
        "raw": b"\x00\x01",
        "unset": None,
    }
    assert span["events"] == [
        {
            "name": "gen_ai.first_token",
            "time_unix_nanos": 1_700_000_000_125_000_000,
            "attributes": {"gen_ai.chunk.index": 0},
        }
    ]
    assert span["status"] == {"code": "ERROR", "message": "upstream timeout"}
    assert span["resource"] == {"service.name": "tokentap-gateway", "k8s.pod.name": "gw-0"}
    assert span["scope"] == {"name": "tokentap", "version": "9.9.9"}
    assert span["request_index"] == 0


def test_root_and_unsampled_spans_are_flattened(receiver):
    post(receiver, sample_request(parent=b"", flags=0x100).SerializeToString())
    post(receiver, sample_request(parent=b"", flags=0).SerializeToString())
    root, legacy = receiver.spans()
    assert root["parent_span_id"] is None
    assert root["parent_is_remote"] is False
    assert root["sampled"] is False
    # Producers before OTLP 1.1 send no flags: remoteness unknown.
    assert legacy["parent_is_remote"] is None


def test_decodes_the_rust_encoder_golden_body(receiver):
    """The body `otlp.rs` pins in its golden test, decoded by the Python package."""
    body = bytes.fromhex(RUST_GOLDEN.read_text().strip())
    status, _ = post(receiver, body)
    assert status == 200
    [span] = receiver.spans()
    assert span["name"] == "chat mistral-7b"
    assert span["kind"] == "SERVER"
    assert span["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
    assert span["span_id"] == "2222222222222222"
    assert span["parent_span_id"] == "b7ad6b7169203331"
    assert span["flags"] == 0x301
    assert (span["sampled"], span["parent_is_remote"]) == (True, True)
    assert span["trace_state"] == ""
    assert (span["start_unix_nanos"], span["end_unix_nanos"]) == (1_000_000_000, 2_000_000_000)
    assert span["attributes"] == {
        "llm.model": "mistral-7b",
        "llm.prompt_tokens": 12,
        "llm.cache_hit": False,
        "rag.top_score": 0.5,
        "rag.sources": ["a", "b"],
        "error.type": "timeout",
    }
    assert span["events"] == [
        {"name": "gen_ai.first_token", "time_unix_nanos": 1_500_000_000, "attributes": {}}
    ]
    assert span["status"] == {"code": "ERROR", "message": "upstream timeout"}
    assert span["resource"] == {
        "service.name": "tokentap-gateway",
        "tokentap.plugin.version": "test",
        "k8s.pod.name": "gw-0",
    }
    assert span["scope"] == {"name": "tokentap", "version": "test"}


def test_configured_failure_status_and_recovery(receiver):
    body = sample_request().SerializeToString()
    receiver.respond_with(503)
    status, _ = post(receiver, body)
    assert status == 503
    # The attempt is recorded, decoded, but not counted as accepted.
    [failed] = receiver.requests()
    assert (failed.status, failed.accepted, len(failed.spans)) == (503, False, 1)
    assert receiver.spans() == []
    assert len(receiver.spans(include_rejected=True)) == 1

    receiver.respond_with(None)
    assert post(receiver, body)[0] == 200
    assert [s["request_index"] for s in receiver.spans()] == [1]


def test_partial_success_body(receiver):
    receiver.set_partial_success(2, "too old")
    status, body = post(receiver, sample_request().SerializeToString())
    assert status == 200
    response = ExportTraceServiceResponse.FromString(body)
    assert response.partial_success.rejected_spans == 2
    assert response.partial_success.error_message == "too old"


def test_malformed_requests_are_refused_and_recorded(receiver):
    assert post(receiver, b"\xff\xff\xff")[0] == 400
    assert post(receiver, b"", path="/v1/metrics")[0] == 404
    assert post(receiver, b"{}", content_type="application/json")[0] == 415
    conn = http.client.HTTPConnection("127.0.0.1", receiver.port, timeout=5)
    conn.request("GET", TRACES_PATH)
    assert conn.getresponse().status == 405
    conn.close()
    errors = [r.error for r in receiver.requests()]
    assert errors[0].startswith("protobuf")
    assert errors[1:] == ["path", "content-type 'application/json'", "method"]
    assert receiver.spans(include_rejected=True) == []


def test_gzip_and_chunked_bodies(receiver):
    body = sample_request().SerializeToString()
    assert post(receiver, gzip.compress(body), extra_headers={"Content-Encoding": "gzip"})[0] == 200

    # Chunked transfer encoding, written by hand in two chunks.
    with socket.create_connection(("127.0.0.1", receiver.port), timeout=5) as sock:
        half = len(body) // 2
        chunks = b"".join(
            f"{len(part):x}\r\n".encode() + part + b"\r\n" for part in (body[:half], body[half:])
        )
        sock.sendall(
            f"POST {TRACES_PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: {PROTOBUF}\r\n"
            "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n".encode()
            + chunks
            + b"0\r\n\r\n"
        )
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200")
    assert [s["name"] for s in receiver.spans()] == ["chat mistral-7b"] * 2


def test_keep_alive_connection_serves_several_exports(receiver):
    conn = http.client.HTTPConnection("127.0.0.1", receiver.port, timeout=5)
    try:
        for i in range(3):
            assert post(receiver, sample_request(name=f"s{i}").SerializeToString(), conn=conn)[0] == 200
    finally:
        conn.close()
    assert [s["name"] for s in receiver.spans()] == ["s0", "s1", "s2"]


def test_slow_collector_holds_the_answer_and_stop_interrupts_it(receiver):
    receiver.set_delay(30)
    with pytest.raises(TimeoutError):
        post(receiver, sample_request().SerializeToString(), timeout=0.3)
    # Received but never answered.
    [pending] = receiver.requests()
    assert pending.status == 0 and len(pending.spans) == 1
    assert receiver.spans(include_rejected=True) == []
    receiver.stop()  # wakes the held handler instead of waiting 30 s
    assert not receiver.running


def test_stop_refuses_connections_and_drops_keep_alive_ones(receiver):
    body = sample_request().SerializeToString()
    conn = http.client.HTTPConnection("127.0.0.1", receiver.port, timeout=5)
    assert post(receiver, body, conn=conn)[0] == 200
    port = receiver.port
    receiver.stop()
    # The established keep-alive connection is gone too.
    with pytest.raises((OSError, http.client.HTTPException)):
        post(receiver, body, conn=conn)
    conn.close()
    with pytest.raises(ConnectionRefusedError):
        post(receiver, body)

    receiver.start()
    assert receiver.port == port
    assert post(receiver, body)[0] == 200
    assert len(receiver.spans()) == 2  # history survives a restart


def test_wait_helpers(receiver):
    with pytest.raises(TimeoutError):
        receiver.wait_for_spans(1, timeout=0.2)
    threads = [
        threading.Thread(
            target=lambda i=i: post(receiver, sample_request(name=f"t{i}").SerializeToString())
        )
        for i in range(8)
    ]
    for thread in threads:
        thread.start()
    spans = receiver.wait_for_spans(8, timeout=10)
    for thread in threads:
        thread.join(timeout=10)
    assert sorted(s["name"] for s in spans) == sorted(f"t{i}" for i in range(8))
    assert len(receiver.wait_for_requests(8, timeout=1)) == 8
    receiver.clear()
    assert receiver.requests() == []


def test_url_properties(receiver):
    assert receiver.endpoint == f"http://127.0.0.1:{receiver.port}"
    assert receiver.traces_url.endswith(":%d/v1/traces" % receiver.port)
