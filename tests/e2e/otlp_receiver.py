"""A small OTLP/HTTP trace receiver for the end-to-end suites.

It stands in for an OpenTelemetry Collector (none with an OTLP receiver can
be installed here, see `shared/reference/feasibility.md` §6c). Bodies are
decoded with the `opentelemetry-proto` Python package, so what the filter's
Rust encoder produces is checked by an independent implementation.

Use it in-process, on a free 127.0.0.1 port::

    with OtlpReceiver() as collector:
        ... point Envoy's trace cluster at 127.0.0.1:collector.port ...
        spans = collector.wait_for_spans(1)
        assert spans[0]["name"] == "chat mistral-7b"

Failure modes for resilience tests: `respond_with(503)` answers every export
with that status, `set_delay(seconds)` holds each answer, `stop()` closes the
port and every open connection (a crashed collector), `start()` brings it
back on the same port.

Run standalone (`python tests/e2e/otlp_receiver.py --port 4318`) it prints
every received span as a JSON line, for demos and manual debugging.
"""

from __future__ import annotations

import argparse
import gzip
import json
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

TRACES_PATH = "/v1/traces"
PROTOBUF = "application/x-protobuf"

#: OTLP `Span.flags` bits (trace-flags byte, then parent-remoteness bits).
FLAG_SAMPLED = 0x01
FLAG_HAS_IS_REMOTE = 0x100
FLAG_IS_REMOTE = 0x200

#: Request bodies larger than this are refused (413), like a collector's limit.
MAX_BODY_BYTES = 16 * 1024 * 1024


# --- decoding -----------------------------------------------------------------


def any_value_to_python(value: AnyValue) -> Any:
    """An OTLP `AnyValue` as a plain Python value (None when unset)."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value_to_python(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return attributes_to_dict(value.kvlist_value.values)
    return getattr(value, kind)


def attributes_to_dict(attributes: list[KeyValue]) -> dict[str, Any]:
    return {kv.key: any_value_to_python(kv.value) for kv in attributes}


def _enum_suffix(name: str, prefix: str) -> str:
    return name[len(prefix) :] if name.startswith(prefix) else name


def flatten_span(
    span: Span, resource: dict[str, Any], scope: dict[str, str], request_index: int
) -> dict[str, Any]:
    """One span as a dict with hex ids and Python attribute values."""
    flags = span.flags
    if flags & FLAG_HAS_IS_REMOTE:
        parent_is_remote: bool | None = bool(flags & FLAG_IS_REMOTE)
    else:
        parent_is_remote = None
    return {
        "trace_id": span.trace_id.hex(),
        "span_id": span.span_id.hex(),
        "parent_span_id": span.parent_span_id.hex() or None,
        "trace_state": span.trace_state,
        "flags": flags,
        "sampled": bool(flags & FLAG_SAMPLED),
        "parent_is_remote": parent_is_remote,
        "name": span.name,
        "kind": _enum_suffix(Span.SpanKind.Name(span.kind), "SPAN_KIND_"),
        "start_unix_nanos": span.start_time_unix_nano,
        "end_unix_nanos": span.end_time_unix_nano,
        "attributes": attributes_to_dict(span.attributes),
        "dropped_attributes_count": span.dropped_attributes_count,
        "events": [
            {
                "name": event.name,
                "time_unix_nanos": event.time_unix_nano,
                "attributes": attributes_to_dict(event.attributes),
            }
            for event in span.events
        ],
        "dropped_events_count": span.dropped_events_count,
        "status": {
            "code": _enum_suffix(Status.StatusCode.Name(span.status.code), "STATUS_CODE_"),
            "message": span.status.message,
        },
        "resource": resource,
        "scope": scope,
        "request_index": request_index,
    }


def flatten_request(request: ExportTraceServiceRequest, request_index: int = 0) -> list[dict]:
    spans = []
    for resource_spans in request.resource_spans:
        resource = attributes_to_dict(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            scope = {"name": scope_spans.scope.name, "version": scope_spans.scope.version}
            for span in scope_spans.spans:
                spans.append(flatten_span(span, resource, scope, request_index))
    return spans


# --- recording ----------------------------------------------------------------


@dataclass
class RecordedRequest:
    """One HTTP request as received, and what the receiver answered."""

    index: int
    method: str
    path: str
    #: Header names lowercased; repeated headers joined with ", ".
    headers: dict[str, str]
    body: bytes
    #: Status the receiver answered with (0: connection dropped, no answer).
    status: int = 0
    spans: list[dict] = field(default_factory=list)
    #: Why the body was not decoded, if it was not.
    error: str | None = None
    received_at: float = 0.0

    @property
    def accepted(self) -> bool:
        return 200 <= self.status < 300


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, receiver: "OtlpReceiver"):
        self.receiver = receiver
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as Envoy's cluster uses it
    timeout = 30  # idle keep-alive connections do not hold a thread forever
    server: _Server

    def setup(self) -> None:
        super().setup()
        with self.server.connections_lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            with self.server.connections_lock:
                self.server.connections.discard(self.connection)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib name)
        pass  # tests read `requests()`; keep pytest output clean

    def do_POST(self) -> None:  # noqa: N802 (stdlib name)
        self.server.receiver._handle(self)

    def do_GET(self) -> None:  # noqa: N802
        self.server.receiver._handle(self)

    do_PUT = do_GET

    def read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            total = 0
            while True:
                size_line = self.rfile.readline(1024)
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                total += size
                if total > MAX_BODY_BYTES:
                    raise ValueError("body too large")
                chunks.append(self.rfile.read(size))
                self.rfile.readline(1024)  # CRLF after each chunk
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            raise ValueError("body too large")
        return self.rfile.read(length) if length else b""

    def answer(self, status: int, body: bytes = b"", content_type: str = "text/plain") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class OtlpReceiver:
    """OTLP/HTTP receiver on 127.0.0.1, served from a background thread."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.host = host
        self._port = port
        self._lock = threading.Condition()
        self._requests: list[RecordedRequest] = []
        self._status_override: int | None = None
        self._delay_s = 0.0
        self._partial_success: tuple[int, str] | None = None
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ---

    def start(self) -> "OtlpReceiver":
        """Starts serving; after `stop()`, serves again on the same port."""
        if self._server is not None:
            return self
        self._stopping.clear()
        self._server = _Server((self.host, self._port), self)
        self._port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"otlp-receiver:{self._port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Closes the port and drops every open connection, answering nothing
        to requests in progress: to a client this looks like a crashed collector."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        with server.connections_lock:
            connections = list(server.connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "OtlpReceiver":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def port(self) -> int:
        return self._port

    @property
    def endpoint(self) -> str:
        """Base URL, e.g. for an `OTEL_EXPORTER_OTLP_ENDPOINT`."""
        return f"http://{self.host}:{self._port}"

    @property
    def traces_url(self) -> str:
        return self.endpoint + TRACES_PATH

    # --- behaviour switches ---

    def respond_with(self, status: int | None) -> None:
        """Answer every export with `status` (e.g. 503); None restores 200."""
        with self._lock:
            self._status_override = status

    def set_delay(self, seconds: float) -> None:
        """Hold every answer this long (a slow collector); 0 disables."""
        with self._lock:
            self._delay_s = max(0.0, seconds)

    def set_partial_success(self, rejected_spans: int | None, message: str = "") -> None:
        """Answer 200 with an OTLP partial-success body rejecting this many spans."""
        with self._lock:
            self._partial_success = None if rejected_spans is None else (rejected_spans, message)

    # --- inspection ---

    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def spans(self, include_rejected: bool = False) -> list[dict]:
        """Spans from answered requests, oldest first; by default only those
        the receiver accepted (2xx), i.e. what a collector would have kept."""
        return [
            span
            for request in self.requests()
            if request.accepted or (include_rejected and request.status)
            for span in request.spans
        ]

    def clear(self) -> None:
        with self._lock:
            self._requests.clear()

    def wait_for_requests(self, count: int, timeout: float = 10.0) -> list[RecordedRequest]:
        """Blocks until `count` requests were answered; TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while sum(1 for r in self._requests if r.status) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"{count} OTLP requests expected, "
                        f"{sum(1 for r in self._requests if r.status)} answered"
                    )
                self._lock.wait(left)
            return list(self._requests)

    def wait_for_spans(self, count: int, timeout: float = 10.0) -> list[dict]:
        """Blocks until `count` spans were accepted; TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                accepted = [s for r in self._requests if r.accepted for s in r.spans]
                if len(accepted) >= count:
                    return accepted
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{count} spans expected, {len(accepted)} received")
                self._lock.wait(left)

    # --- request handling (server threads) ---

    def _handle(self, handler: _Handler) -> None:
        headers: dict[str, str] = {}
        for name, value in handler.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        with self._lock:
            record = RecordedRequest(
                index=len(self._requests),
                method=handler.command,
                path=handler.path,
                headers=headers,
                body=b"",
                received_at=time.time(),
            )
            self._requests.append(record)
            delay, override, partial = self._delay_s, self._status_override, self._partial_success

        status, body, content_type = self._decode(handler, record)
        if status == 200:
            if partial is not None:
                response = ExportTraceServiceResponse()
                response.partial_success.rejected_spans = partial[0]
                response.partial_success.error_message = partial[1]
                body = response.SerializeToString()
            if override is not None:
                status, body, content_type = override, f"configured {override}".encode(), "text/plain"

        if delay and self._stopping.wait(delay):
            handler.close_connection = True
            return  # stopped while holding the answer: the client sees a reset
        # Recorded before the answer goes out, so a client that has its
        # response always finds the request recorded.
        with self._lock:
            record.status = status
            self._lock.notify_all()
        try:
            handler.answer(status, body, content_type)
        except OSError:
            handler.close_connection = True
            with self._lock:
                record.status = 0

    def _decode(self, handler: _Handler, record: RecordedRequest) -> tuple[int, bytes, str]:
        try:
            raw = handler.read_body()
        except ValueError as error:
            record.error = str(error)
            handler.close_connection = True
            return 413, b"body too large", "text/plain"
        record.body = raw
        if handler.command != "POST":
            record.error = "method"
            return 405, b"POST only", "text/plain"
        if handler.path.split("?")[0] != TRACES_PATH:
            record.error = "path"
            return 404, b"not found", "text/plain"
        content_type = record.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != PROTOBUF:
            record.error = f"content-type {content_type!r}"
            return 415, b"application/x-protobuf only", "text/plain"
        if record.headers.get("content-encoding", "").lower() == "gzip":
            try:
                raw = gzip.decompress(raw)
            except (OSError, EOFError) as error:
                record.error = f"gzip: {error}"
                return 400, b"bad gzip", "text/plain"
        request = ExportTraceServiceRequest()
        try:
            request.ParseFromString(raw)
        except DecodeError as error:
            record.error = f"protobuf: {error}"
            return 400, b"bad protobuf", "text/plain"
        record.spans = flatten_request(request, record.index)
        return 200, ExportTraceServiceResponse().SerializeToString(), PROTOBUF


# --- standalone ---------------------------------------------------------------


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    raise TypeError(type(value).__name__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=4318)
    parser.add_argument("--status", type=int, help="answer every export with this status")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds to hold each answer")
    args = parser.parse_args(argv)
    receiver = OtlpReceiver(port=args.port).start()
    receiver.respond_with(args.status)
    receiver.set_delay(args.delay)
    print(f"listening on {receiver.traces_url}", file=sys.stderr, flush=True)
    printed = 0
    try:
        while True:
            try:
                spans = receiver.wait_for_spans(printed + 1, timeout=1.0)
            except TimeoutError:
                continue
            for span in spans[printed:]:
                print(json.dumps(span, default=_json_default), flush=True)
            printed = len(spans)
    except KeyboardInterrupt:
        pass
    finally:
        receiver.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
