//! OTLP/HTTP protobuf encoding of finished spans.
//!
//! One request per batch: `ExportTraceServiceRequest` with a single
//! `ResourceSpans` (this gateway) holding a single `ScopeSpans`
//! (`tokentap`). The message types come from `opentelemetry-proto`; only
//! their prost encoding is used, nothing of the OTel SDK, to keep the
//! `.wasm` small. [`span_encoded_len`] mirrors prost's wire layout so the
//! batcher can bound its queue in bytes without encoding every span twice.

use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{
    any_value, AnyValue, ArrayValue, InstrumentationScope, KeyValue,
};
use opentelemetry_proto::tonic::resource::v1::Resource as ProtoResource;
use opentelemetry_proto::tonic::trace::v1::{
    span, status, ResourceSpans, ScopeSpans, Span, SpanFlags, Status,
};
use prost::encoding::encoded_len_varint;
use prost::Message;
use thiserror::Error;

use super::semconv;
use super::span::{AttrValue, Attribute, Resource, SpanKind, SpanRecord, SpanStatus};

/// Path of the OTLP/HTTP traces endpoint on the collector.
pub const OTLP_TRACES_PATH: &str = "/v1/traces";
/// Content type of the request body (and of a protobuf response).
pub const CONTENT_TYPE_PROTOBUF: &str = "application/x-protobuf";

/// A collector response body that is not a valid `ExportTraceServiceResponse`.
#[derive(Debug, Error)]
#[error("invalid OTLP export response: {0}")]
pub struct ResponseDecodeError(#[from] prost::DecodeError);

/// Encodes batches for one resource. Built once per VM: the resource and
/// scope are converted once, not per batch.
#[derive(Clone, Debug)]
pub struct OtlpEncoder {
    resource: ProtoResource,
    scope: InstrumentationScope,
}

impl OtlpEncoder {
    pub fn new(resource: &Resource) -> Self {
        OtlpEncoder {
            resource: ProtoResource {
                attributes: resource.attributes.iter().map(key_value).collect(),
                ..Default::default()
            },
            scope: InstrumentationScope {
                name: semconv::SCOPE_NAME.to_owned(),
                version: env!("CARGO_PKG_VERSION").to_owned(),
                ..Default::default()
            },
        }
    }

    /// Overrides the instrumentation scope version (default: this crate's
    /// version), e.g. with the filter's build id.
    pub fn with_scope_version(mut self, version: &str) -> Self {
        self.scope.version = version.to_owned();
        self
    }

    /// The request message for `spans` (mostly useful to tests and tools).
    pub fn to_request(&self, spans: &[SpanRecord]) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(self.resource.clone()),
                scope_spans: vec![ScopeSpans {
                    scope: Some(self.scope.clone()),
                    spans: spans.iter().map(span_to_proto).collect(),
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        }
    }

    /// The HTTP body for `spans` (`application/x-protobuf`).
    pub fn encode(&self, spans: &[SpanRecord]) -> Vec<u8> {
        self.to_request(spans).encode_to_vec()
    }

    /// Bytes of a request carrying no spans; a batch's body is at most this
    /// plus the sum of [`span_encoded_len`] plus 6 bytes of length prefixes.
    pub fn envelope_len(&self) -> usize {
        self.to_request(&[]).encoded_len()
    }
}

/// Rejected-span count from a collector's `200 OK` body (OTLP partial
/// success); an empty body means everything was accepted.
pub fn rejected_spans(response_body: &[u8]) -> Result<u64, ResponseDecodeError> {
    let response = ExportTraceServiceResponse::decode(response_body)?;
    Ok(response
        .partial_success
        .map_or(0, |p| u64::try_from(p.rejected_spans).unwrap_or(0)))
}

// === conversion ===

/// OTLP `Span.flags`: the W3C flags in bits 0-7, then "parent remoteness is
/// known" (bit 8, always: we know it) and "parent is remote" (bit 9).
pub fn otlp_span_flags(span: &SpanRecord) -> u32 {
    let mut flags = u32::from(span.flags.known_bits().0) | SpanFlags::ContextHasIsRemoteMask as u32;
    if span.parent_is_remote {
        flags |= SpanFlags::ContextIsRemoteMask as u32;
    }
    flags
}

fn proto_kind(kind: SpanKind) -> span::SpanKind {
    match kind {
        SpanKind::Internal => span::SpanKind::Internal,
        SpanKind::Server => span::SpanKind::Server,
        SpanKind::Client => span::SpanKind::Client,
        SpanKind::Producer => span::SpanKind::Producer,
        SpanKind::Consumer => span::SpanKind::Consumer,
    }
}

fn any_value(value: &AttrValue) -> AnyValue {
    let value = match value {
        AttrValue::Str(s) => any_value::Value::StringValue(s.clone()),
        AttrValue::Int(i) => any_value::Value::IntValue(*i),
        AttrValue::Double(d) => any_value::Value::DoubleValue(*d),
        AttrValue::Bool(b) => any_value::Value::BoolValue(*b),
        AttrValue::StrArray(items) => any_value::Value::ArrayValue(ArrayValue {
            values: items
                .iter()
                .map(|s| AnyValue {
                    value: Some(any_value::Value::StringValue(s.clone())),
                })
                .collect(),
        }),
    };
    AnyValue { value: Some(value) }
}

fn key_value(attribute: &Attribute) -> KeyValue {
    KeyValue {
        key: attribute.key.to_string(),
        value: Some(any_value(&attribute.value)),
        ..Default::default()
    }
}

/// Converts one span to its OTLP message.
pub fn span_to_proto(record: &SpanRecord) -> Span {
    let status = match &record.status {
        SpanStatus::Unset => None,
        SpanStatus::Ok => Some(Status {
            message: String::new(),
            code: status::StatusCode::Ok as i32,
        }),
        SpanStatus::Error(message) => Some(Status {
            message: message.clone(),
            code: status::StatusCode::Error as i32,
        }),
    };
    Span {
        trace_id: record.trace_id.0.to_vec(),
        span_id: record.span_id.0.to_vec(),
        trace_state: record.trace_state.clone(),
        parent_span_id: record
            .parent_span_id
            .map(|id| id.0.to_vec())
            .unwrap_or_default(),
        flags: otlp_span_flags(record),
        name: record.name.clone(),
        kind: proto_kind(record.kind) as i32,
        start_time_unix_nano: record.start_unix_nanos,
        end_time_unix_nano: record.end_unix_nanos,
        attributes: record.attributes.iter().map(key_value).collect(),
        dropped_attributes_count: record.dropped_attributes_count,
        events: record
            .events
            .iter()
            .map(|event| span::Event {
                time_unix_nano: event.time_unix_nanos,
                name: event.name.to_string(),
                attributes: event.attributes.iter().map(key_value).collect(),
                dropped_attributes_count: 0,
            })
            .collect(),
        dropped_events_count: record.dropped_events_count,
        links: Vec::new(),
        dropped_links_count: 0,
        status,
    }
}

// === encoded size ===
//
// Proto3 rules as prost applies them: scalar fields equal to their default
// are skipped, `oneof` members and present sub-messages are always written.
// Every field tag used here is below 16, so its key is one byte, except
// `Span.flags` (tag 16, two bytes).

fn len_delimited(body: usize) -> usize {
    1 + encoded_len_varint(body as u64) + body
}

fn string_field(s: &str) -> usize {
    if s.is_empty() {
        0
    } else {
        len_delimited(s.len())
    }
}

fn varint_field(v: u64) -> usize {
    if v == 0 {
        0
    } else {
        1 + encoded_len_varint(v)
    }
}

fn fixed64_field(v: u64) -> usize {
    if v == 0 {
        0
    } else {
        9
    }
}

fn any_value_body_len(value: &AttrValue) -> usize {
    match value {
        AttrValue::Str(s) => len_delimited(s.len()),
        AttrValue::Int(i) => 1 + encoded_len_varint(*i as u64),
        AttrValue::Double(_) => 9,
        AttrValue::Bool(_) => 2,
        AttrValue::StrArray(items) => len_delimited(
            items
                .iter()
                .map(|s| len_delimited(len_delimited(s.len())))
                .sum(),
        ),
    }
}

fn attributes_len(attributes: &[Attribute]) -> usize {
    attributes
        .iter()
        .map(|a| len_delimited(string_field(&a.key) + len_delimited(any_value_body_len(&a.value))))
        .sum()
}

/// Exact number of bytes `span` adds to an encoded request: its
/// `ScopeSpans.spans` entry, key and length prefix included.
pub fn span_encoded_len(record: &SpanRecord) -> usize {
    let ids = len_delimited(16)
        + len_delimited(8)
        + record.parent_span_id.map_or(0, |_| len_delimited(8));
    let flags = if otlp_span_flags(record) == 0 {
        0
    } else {
        2 + 4
    };
    let events: usize = record
        .events
        .iter()
        .map(|e| {
            len_delimited(
                fixed64_field(e.time_unix_nanos)
                    + string_field(&e.name)
                    + attributes_len(&e.attributes),
            )
        })
        .sum();
    let status = match &record.status {
        SpanStatus::Unset => 0,
        SpanStatus::Ok => len_delimited(varint_field(status::StatusCode::Ok as u64)),
        SpanStatus::Error(message) => {
            len_delimited(string_field(message) + varint_field(status::StatusCode::Error as u64))
        }
    };
    let body = ids
        + string_field(&record.trace_state)
        + flags
        + string_field(&record.name)
        + varint_field(proto_kind(record.kind) as u64)
        + fixed64_field(record.start_unix_nanos)
        + fixed64_field(record.end_unix_nanos)
        + attributes_len(&record.attributes)
        + varint_field(u64::from(record.dropped_attributes_count))
        + events
        + varint_field(u64::from(record.dropped_events_count))
        + status;
    len_delimited(body)
}

#[cfg(test)]
mod tests {
    use super::super::context::{SpanContext, TraceFlags};
    use super::super::ids::XoshiroIdGenerator;
    use super::super::sampler::Sampler;
    use super::super::span::{ResourceBuilder, SpanEvent};
    use super::*;
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    use opentelemetry_proto::tonic::trace::v1::span::SpanKind as ProtoKind;
    use proptest::prelude::*;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn gateway_span() -> SpanRecord {
        let parent = SpanContext::from_headers(PARENT, Some("congo=t61rcWkgMzE")).unwrap();
        let start =
            Sampler::always().start_span(Some(&parent), &mut XoshiroIdGenerator::from_seed(11));
        let mut span = SpanRecord::new(
            &start,
            semconv::span_name("chat", Some("mistral-7b")),
            SpanKind::Server,
            1_700_000_000_000_000_000,
        );
        span.set_attribute(semconv::GEN_AI_OPERATION_NAME, "chat");
        span.set_attribute(semconv::GEN_AI_REQUEST_MODEL, "mistral-7b");
        span.set_attribute(semconv::GEN_AI_REQUEST_STREAM, true);
        span.set_attribute(semconv::GEN_AI_USAGE_INPUT_TOKENS, 42u64);
        span.set_attribute(semconv::GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK, 0.125);
        span.set_attribute(
            semconv::GEN_AI_RESPONSE_FINISH_REASONS,
            vec!["stop".to_owned()],
        );
        span.set_attribute(semconv::HTTP_RESPONSE_STATUS_CODE, 200i64);
        span.add_event(
            SpanEvent::new(semconv::EVENT_FIRST_TOKEN, 1_700_000_000_125_000_000)
                .with_attribute("gen_ai.chunk.index", 0i64),
        );
        span.set_status(SpanStatus::Ok);
        span.end(1_700_000_001_000_000_000);
        span
    }

    fn encoder() -> OtlpEncoder {
        OtlpEncoder::new(
            &ResourceBuilder::new()
                .pairs([("POD_NAME", "gw-0"), ("POD_NAMESPACE", "llm")])
                .build(),
        )
    }

    #[test]
    fn round_trips_through_prost_decoding() {
        let span = gateway_span();
        let body = encoder().encode(std::slice::from_ref(&span));
        let request = ExportTraceServiceRequest::decode(body.as_slice()).unwrap();
        assert_eq!(request.resource_spans.len(), 1);
        let resource_spans = &request.resource_spans[0];
        let resource = resource_spans.resource.as_ref().unwrap();
        let resource_attr = |k: &str| {
            resource
                .attributes
                .iter()
                .find(|a| a.key == k)
                .and_then(|a| a.value.clone())
                .and_then(|v| v.value)
        };
        assert_eq!(
            resource_attr("service.name"),
            Some(Value::StringValue("tokentap-gateway".into()))
        );
        assert_eq!(
            resource_attr("k8s.pod.name"),
            Some(Value::StringValue("gw-0".into()))
        );
        let scope_spans = &resource_spans.scope_spans[0];
        let scope = scope_spans.scope.as_ref().unwrap();
        assert_eq!(scope.name, "tokentap");
        assert_eq!(scope.version, env!("CARGO_PKG_VERSION"));

        let decoded = &scope_spans.spans[0];
        assert_eq!(decoded.trace_id, span.trace_id.0.to_vec());
        assert_eq!(decoded.span_id, span.span_id.0.to_vec());
        assert_eq!(hex(&decoded.parent_span_id), "00f067aa0ba902b7");
        assert_eq!(decoded.trace_state, "congo=t61rcWkgMzE");
        assert_eq!(decoded.name, "chat mistral-7b");
        assert_eq!(decoded.kind, ProtoKind::Server as i32);
        // sampled + has-is-remote + is-remote
        assert_eq!(decoded.flags, 0x01 | 0x100 | 0x200);
        assert_eq!(decoded.start_time_unix_nano, 1_700_000_000_000_000_000);
        assert_eq!(decoded.end_time_unix_nano, 1_700_000_001_000_000_000);
        let attr = |k: &str| {
            decoded
                .attributes
                .iter()
                .find(|a| a.key == k)
                .and_then(|a| a.value.clone())
                .and_then(|v| v.value)
        };
        assert_eq!(attr("gen_ai.request.stream"), Some(Value::BoolValue(true)));
        assert_eq!(attr("gen_ai.usage.input_tokens"), Some(Value::IntValue(42)));
        assert_eq!(
            attr("gen_ai.response.time_to_first_chunk"),
            Some(Value::DoubleValue(0.125))
        );
        match attr("gen_ai.response.finish_reasons") {
            Some(Value::ArrayValue(array)) => assert_eq!(
                array.values[0].value,
                Some(Value::StringValue("stop".into()))
            ),
            other => panic!("finish_reasons: {other:?}"),
        }
        assert_eq!(decoded.events.len(), 1);
        assert_eq!(decoded.events[0].name, "gen_ai.first_token");
        assert_eq!(decoded.events[0].time_unix_nano, 1_700_000_000_125_000_000);
        assert_eq!(decoded.status.as_ref().map(|s| s.code), Some(1));
    }

    #[test]
    fn root_span_flags_say_parent_is_known_local() {
        let start = Sampler::always().start_span(None, &mut XoshiroIdGenerator::from_seed(1));
        let span = SpanRecord::new(&start, "chat", SpanKind::Server, 1);
        let proto = span_to_proto(&span);
        assert_eq!(proto.flags, 0x01 | 0x100);
        assert!(proto.parent_span_id.is_empty());
        assert_eq!(proto.status, None);
    }

    #[test]
    fn error_status_carries_message() {
        let mut span = gateway_span();
        span.set_error("upstream_503", "upstream answered 503");
        let proto = span_to_proto(&span);
        let status = proto.status.unwrap();
        assert_eq!(status.code, status::StatusCode::Error as i32);
        assert_eq!(status.message, "upstream answered 503");
    }

    #[test]
    fn span_len_is_exact_for_the_gateway_span() {
        let span = gateway_span();
        let encoder = encoder();
        let one = encoder.encode(std::slice::from_ref(&span)).len();
        let empty = encoder.envelope_len();
        let estimate = empty + span_encoded_len(&span);
        // Only the outer length prefixes can grow.
        assert!(
            one >= estimate && one <= estimate + 6,
            "{one} vs {estimate}"
        );
        assert_eq!(
            span_encoded_len(&span),
            len_delimited(span_to_proto(&span).encoded_len())
        );
    }

    #[test]
    fn partial_success_is_read() {
        use opentelemetry_proto::tonic::collector::trace::v1::ExportTracePartialSuccess;
        assert_eq!(rejected_spans(&[]).unwrap(), 0);
        let body = ExportTraceServiceResponse {
            partial_success: Some(ExportTracePartialSuccess {
                rejected_spans: 3,
                error_message: "too old".into(),
            }),
        }
        .encode_to_vec();
        assert_eq!(rejected_spans(&body).unwrap(), 3);
        assert!(rejected_spans(&[0xff, 0xff]).is_err());
    }

    // --- an independent check: walk the wire format by hand ---

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn read_varint(buf: &[u8], pos: &mut usize) -> u64 {
        let mut value = 0u64;
        let mut shift = 0;
        loop {
            let byte = buf[*pos];
            *pos += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return value;
            }
            shift += 7;
        }
    }

    /// (field number, wire type, payload) of each top-level field in `buf`.
    fn fields(buf: &[u8]) -> Vec<(u64, u64, Vec<u8>)> {
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < buf.len() {
            let key = read_varint(buf, &mut pos);
            let (field, wire) = (key >> 3, key & 7);
            let payload = match wire {
                0 => {
                    let start = pos;
                    read_varint(buf, &mut pos);
                    buf[start..pos].to_vec()
                }
                1 => {
                    pos += 8;
                    buf[pos - 8..pos].to_vec()
                }
                2 => {
                    let len = read_varint(buf, &mut pos) as usize;
                    pos += len;
                    buf[pos - len..pos].to_vec()
                }
                5 => {
                    pos += 4;
                    buf[pos - 4..pos].to_vec()
                }
                other => panic!("unexpected wire type {other}"),
            };
            out.push((field, wire, payload));
        }
        out
    }

    fn field(buf: &[u8], number: u64) -> Vec<u8> {
        fields(buf)
            .into_iter()
            .find(|(f, _, _)| *f == number)
            .map(|(_, _, p)| p)
            .unwrap_or_else(|| panic!("field {number} missing"))
    }

    #[test]
    fn hand_decoded_wire_format_matches_the_otlp_schema() {
        let span = gateway_span();
        let body = encoder().encode(std::slice::from_ref(&span));
        // ExportTraceServiceRequest.resource_spans = 1
        let resource_spans = field(&body, 1);
        // ResourceSpans.scope_spans = 2, ScopeSpans.scope = 1 / spans = 2
        let scope_spans = field(&resource_spans, 2);
        let scope = field(&scope_spans, 1);
        assert_eq!(field(&scope, 1), b"tokentap");
        let raw_span = field(&scope_spans, 2);
        assert_eq!(field(&raw_span, 1), span.trace_id.0.to_vec()); // trace_id
        assert_eq!(field(&raw_span, 2), span.span_id.0.to_vec()); // span_id
        assert_eq!(field(&raw_span, 3), b"congo=t61rcWkgMzE"); // trace_state
        assert_eq!(hex(&field(&raw_span, 4)), "00f067aa0ba902b7"); // parent_span_id
        assert_eq!(field(&raw_span, 5), b"chat mistral-7b"); // name
        assert_eq!(field(&raw_span, 6), vec![2]); // kind SERVER
        let start = u64::from_le_bytes(field(&raw_span, 7).try_into().unwrap());
        assert_eq!(start, 1_700_000_000_000_000_000); // fixed64
        let flags = u32::from_le_bytes(field(&raw_span, 16).try_into().unwrap());
        assert_eq!(flags, 0x301); // fixed32, tag 16
                                  // First attribute: KeyValue{key=1, value=2 AnyValue{string_value=1}}
        let first_attr = field(&raw_span, 9);
        assert_eq!(field(&first_attr, 1), b"gen_ai.operation.name");
        assert_eq!(field(&field(&first_attr, 2), 1), b"chat");
        // Status.code = 3
        assert_eq!(field(&field(&raw_span, 15), 3), vec![1]);
    }

    /// A fixed span whose encoding is pinned in `otlp_golden.hex`, which
    /// `tests/e2e/test_otlp_receiver.py` also decodes with the Python
    /// `opentelemetry-proto` package and checks field by field. If the
    /// encoding changes on purpose, regenerate the file and rerun that test.
    fn golden_span() -> SpanRecord {
        let header = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let parent = SpanContext::from_headers(header, None).unwrap();
        let start = Sampler::always().start_span(Some(&parent), &mut FixedIds);
        let mut span = SpanRecord::new(&start, "chat mistral-7b", SpanKind::Server, 1_000_000_000);
        span.set_attribute(semconv::LLM_MODEL, "mistral-7b");
        span.set_attribute(semconv::LLM_PROMPT_TOKENS, 12i64);
        span.set_attribute(semconv::LLM_CACHE_HIT, false);
        span.set_attribute(semconv::RAG_TOP_SCORE, 0.5);
        span.set_attribute(semconv::RAG_SOURCES, vec!["a".to_owned(), "b".to_owned()]);
        span.add_event(SpanEvent::new(semconv::EVENT_FIRST_TOKEN, 1_500_000_000));
        span.set_error("timeout", "upstream timeout");
        span.end(2_000_000_000);
        span
    }

    struct FixedIds;
    impl super::super::ids::IdGenerator for FixedIds {
        fn trace_id(&mut self) -> super::super::context::TraceId {
            super::super::context::TraceId([0x11; 16])
        }
        fn span_id(&mut self) -> super::super::context::SpanId {
            super::super::context::SpanId([0x22; 8])
        }
    }

    const RUST_GOLDEN_HEX: &str = include_str!("otlp_golden.hex");

    #[test]
    fn golden_encoding_is_stable() {
        let resource = ResourceBuilder::new()
            .attribute(semconv::TOKENTAP_PLUGIN_VERSION, "test")
            .pairs([("POD_NAME", "gw-0")])
            .build();
        let body = OtlpEncoder::new(&resource)
            .with_scope_version("test")
            .encode(&[golden_span()]);
        assert_eq!(
            hex(&body),
            RUST_GOLDEN_HEX.trim(),
            "encoding changed: regenerate otlp_golden.hex, rerun test_otlp_receiver.py"
        );
    }

    #[test]
    fn unknown_flags_are_not_exported() {
        let mut span = gateway_span();
        span.flags = TraceFlags(0xfd);
        assert_eq!(otlp_span_flags(&span) & 0xff, 0x01);
    }

    fn arb_value() -> impl Strategy<Value = AttrValue> {
        prop_oneof![
            ".{0,40}".prop_map(AttrValue::Str),
            any::<i64>().prop_map(AttrValue::Int),
            any::<f64>().prop_map(AttrValue::Double),
            any::<bool>().prop_map(AttrValue::Bool),
            proptest::collection::vec(".{0,10}", 0..4).prop_map(AttrValue::StrArray),
        ]
    }

    fn arb_status() -> impl Strategy<Value = SpanStatus> {
        prop_oneof![
            Just(SpanStatus::Unset),
            Just(SpanStatus::Ok),
            ".{0,30}".prop_map(SpanStatus::Error),
        ]
    }

    prop_compose! {
        fn arb_span()(
            seed in any::<u64>(),
            with_parent in any::<bool>(),
            name in ".{0,40}",
            kind in 0usize..5,
            start in any::<u64>(),
            len in any::<u32>(),
            attrs in proptest::collection::vec(("[a-z._]{0,20}", arb_value()), 0..12),
            events in proptest::collection::vec((any::<u64>(), "[a-z._]{0,16}", proptest::collection::vec(("[a-z]{1,8}", arb_value()), 0..3)), 0..4),
            status in arb_status(),
            state in proptest::option::of("[a-z]{1,8}=[a-z0-9]{1,8}"),
        ) -> SpanRecord {
            let mut ids = XoshiroIdGenerator::from_seed(seed);
            let parent = with_parent.then(|| SpanContext::from_headers(PARENT, state.as_deref()).unwrap());
            let started = Sampler::always().start_span(parent.as_ref(), &mut ids);
            let kinds = [SpanKind::Internal, SpanKind::Server, SpanKind::Client, SpanKind::Producer, SpanKind::Consumer];
            let mut span = SpanRecord::new(&started, name, kinds[kind], start);
            for (k, v) in attrs {
                span.set_attribute(k, v);
            }
            for (time, name, attrs) in events {
                let mut event = SpanEvent::new(name, time);
                for (k, v) in attrs {
                    event = event.with_attribute(k, v);
                }
                span.add_event(event);
            }
            span.set_status(status);
            span.end(start.saturating_add(u64::from(len)));
            span
        }
    }

    proptest! {
        #[test]
        fn span_len_matches_prost_exactly(span in arb_span()) {
            prop_assert_eq!(
                span_encoded_len(&span),
                len_delimited(span_to_proto(&span).encoded_len())
            );
        }

        #[test]
        fn batches_round_trip_and_size_bound_holds(
            spans in proptest::collection::vec(arb_span(), 0..6),
        ) {
            let encoder = encoder();
            let body = encoder.encode(&spans);
            let estimate = encoder.envelope_len() + spans.iter().map(span_encoded_len).sum::<usize>();
            prop_assert!(body.len() >= estimate && body.len() <= estimate + 6);
            let decoded = ExportTraceServiceRequest::decode(body.as_slice()).unwrap();
            let decoded_spans = &decoded.resource_spans[0].scope_spans[0].spans;
            prop_assert_eq!(decoded_spans.len(), spans.len());
            for (proto, record) in decoded_spans.iter().zip(&spans) {
                // NaN != NaN, so compare re-encodings rather than messages.
                prop_assert_eq!(proto.encode_to_vec(), span_to_proto(record).encode_to_vec());
                prop_assert_eq!(&proto.name, &record.name);
                prop_assert_eq!(&proto.trace_id, &record.trace_id.0.to_vec());
                prop_assert_eq!(proto.attributes.len(), record.attributes.len());
            }
        }
    }
}
