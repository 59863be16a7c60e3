#![allow(clippy::unwrap_used)]

use super::*;
use crate::host::HttpView;
use crate::labels::LocalAdmission;
use crate::testing::{FakeStats, FakeView, MS};
use crate::trace::ResourceBuilder;
use std::cell::{Cell, RefCell};
use std::rc::Rc;

/// One HTTP stream as the filter sees it, recording what the lifecycle asks.
#[derive(Default)]
struct FakeStream {
    view: FakeView,
    request_body: Vec<u8>,
    response_chunk: Vec<u8>,
    /// Header and property reads, by name.
    reads: RefCell<Vec<String>>,
    set_headers: Vec<(String, String)>,
    removed_headers: Vec<String>,
    state: Vec<(String, Vec<u8>)>,
    replaced_body: Option<Vec<u8>>,
}

impl FakeStream {
    fn new(view: FakeView) -> Self {
        Self {
            view,
            ..Self::default()
        }
    }
    fn reads(&self, name: &str) -> usize {
        self.reads.borrow().iter().filter(|r| *r == name).count()
    }
}

impl HttpView for FakeStream {
    fn request_header(&self, name: &str) -> Option<Vec<u8>> {
        self.reads.borrow_mut().push(name.to_string());
        self.view.request_header(name)
    }
    fn response_header(&self, name: &str) -> Option<Vec<u8>> {
        self.view.response_header(name)
    }
    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        self.reads.borrow_mut().push(path.join("."));
        self.view.property(path)
    }
}

impl StreamHost for FakeStream {
    fn request_body(&self, start: usize, len: usize) -> Option<Vec<u8>> {
        self.request_body
            .get(start..start + len)
            .map(<[u8]>::to_vec)
    }
    fn response_body(&self, start: usize, len: usize) -> Option<Vec<u8>> {
        self.response_chunk
            .get(start..start + len)
            .map(<[u8]>::to_vec)
    }
    fn replace_request_body(&mut self, _len: usize, body: &[u8]) {
        self.replaced_body = Some(body.to_vec());
    }
    fn set_request_header(&mut self, name: &str, value: &str) {
        self.set_headers.push((name.into(), value.into()));
    }
    fn remove_request_header(&mut self, name: &str) {
        self.removed_headers.push(name.into());
    }
    fn set_filter_state(&mut self, key: &str, value: &[u8]) {
        self.state.push((key.into(), value.to_vec()));
    }
}

/// Log lines, shared with the test.
#[derive(Clone, Default)]
struct Lines(Rc<RefCell<Vec<String>>>);

impl Log for Lines {
    fn log(&self, _: LogLevel, message: &str) {
        self.0.borrow_mut().push(message.to_string());
    }
}

fn gateway(config: &str) -> (Gateway<FakeStats>, Lines) {
    let config = Config::parse(config.as_bytes()).unwrap();
    let tracer = config
        .tracing
        .as_ref()
        .map(|t| Tracer::new(t, 7, ResourceBuilder::new().build()).unwrap());
    let lines = Lines::default();
    let g = Gateway::new(
        config,
        Box::new(LocalAdmission::default()),
        FakeStats::default(),
        tracer,
        Box::new(lines.clone()),
    );
    (g, lines)
}

const CONFIG: &str = r#"{"tenant":{"header":"x-tenant-id"},"models":["mistral-7b"],
    "routes":{"chat":{"route_class":"interactive","team":"platform-ai"}}}"#;

fn chat_view(tenant: &str) -> FakeView {
    FakeView::default()
        .req(":path", "/v1/chat/completions")
        .req(":method", "POST")
        .req("x-tenant-id", tenant)
        .prop("xds.route_name", b"chat")
        .prop("xds.cluster_name", b"vllm_stable")
        .resp(":status", "200")
        .resp("content-type", "application/json")
}

const CHAT_REQUEST: &[u8] =
    br#"{"model":"mistral-7b","messages":[{"role":"user","content":"hi"}]}"#;
const CHAT_RESPONSE: &[u8] =
    br#"{"model":"mistral-7b","usage":{"prompt_tokens":11,"completion_tokens":5}}"#;

const LABELS: &str = "route=.=chat;.;tenant=.=42;.;model=.=mistral-7b;.;route_class=.=interactive;.;team=.=platform-ai;.;backend=.=vllm_stable;.;";
const ACTIVE: &str =
    "route=.=chat;.;route_class=.=interactive;.;team=.=platform-ai;.;llm_gateway_active_requests";

/// Drives a whole non-streamed chat request through the gateway.
fn chat(g: &mut Gateway<FakeStats>, stream: &mut FakeStream) {
    stream.request_body = CHAT_REQUEST.to_vec();
    stream.response_chunk = CHAT_RESPONSE.to_vec();
    let mut s = g.request_headers(stream, &(10 * MS)).unwrap();
    let n = CHAT_REQUEST.len();
    assert_eq!(
        g.request_body(&mut s, stream, n, true),
        BodyAction::Continue
    );
    g.response_headers(&mut s, stream, &(30 * MS), false);
    g.response_body(&mut s, stream, CHAT_RESPONSE.len(), true, &(35 * MS));
    g.finish(s, stream, &(36 * MS));
}

#[test]
fn a_chat_request_is_recorded_once_and_published_on_the_tick() {
    let (mut g, lines) = gateway(CONFIG);
    let mut stream = FakeStream::new(chat_view("42"));
    chat(&mut g, &mut stream);
    let requests = format!("{LABELS}status=.=200;.;llm_gateway_requests_total");
    assert!(
        g.metrics_host().names.is_empty(),
        "no host call for metrics before the tick"
    );
    g.tick(40 * MS, &mut NoExports);
    let stats = g.metrics_host();
    assert_eq!(stats.value(&requests), 1);
    let tokens =
        format!("{LABELS}token_type=.=completion;.;source=.=usage;.;llm_gateway_tokens_total");
    assert_eq!(stats.value(&tokens), 5);
    assert_eq!(stats.value(ACTIVE), 0, "+1 and -1 within one tick");
    // Envoy attributes: the route at request headers, the cluster once at
    // the end; a clean response reads no details or flags.
    assert_eq!(stream.reads("xds.route_name"), 1);
    assert_eq!(stream.reads("xds.cluster_name"), 1);
    assert_eq!(stream.reads("response.code_details"), 0);
    assert!(lines.0.borrow().is_empty(), "{:?}", lines.0.borrow());
}

#[test]
fn filter_state_is_written_once_with_json_types() {
    let (mut g, _) = gateway(CONFIG);
    let mut stream = FakeStream::new(chat_view("42"));
    chat(&mut g, &mut stream);
    assert_eq!(stream.state.len(), 1);
    let (key, value) = &stream.state[0];
    assert_eq!(key, "tokentap");
    let json: serde_json::Value = serde_json::from_slice(value).unwrap();
    assert_eq!(
        json["tenant"],
        serde_json::json!("42"),
        "a numeric tenant stays a string"
    );
    assert_eq!(json["prompt_tokens"], serde_json::json!(11));
    assert_eq!(json["streamed"], serde_json::json!(false));
    assert_eq!(json["ttfb_ms"], serde_json::json!(20));
}

#[test]
fn filter_state_fields_mode_writes_one_key_per_value() {
    let (mut g, _) = gateway(&CONFIG.replacen('{', r#"{"filter_state":"fields","#, 1));
    let mut stream = FakeStream::new(chat_view("42"));
    chat(&mut g, &mut stream);
    let keys: Vec<&str> = stream.state.iter().map(|(k, _)| k.as_str()).collect();
    assert!(keys.contains(&"tokentap.tenant"), "{keys:?}");
    let ttfb = stream
        .state
        .iter()
        .find(|(k, _)| k == "tokentap.ttfb_ms")
        .map(|(_, v)| v.clone());
    assert_eq!(ttfb.as_deref(), Some(&b"20"[..]));
}

#[test]
fn a_request_the_filter_ignores_costs_one_header_read() {
    let (mut g, _) = gateway(CONFIG);
    let stream_view = FakeView::default()
        .req(":path", "/healthz")
        .prop("xds.route_name", b"chat");
    let mut stream = FakeStream::new(stream_view);
    assert!(g.request_headers(&mut stream, &PanickyClock).is_none());
    assert_eq!(*stream.reads.borrow(), vec![":path".to_string()]);
    g.tick(MS, &mut NoExports);
    assert!(g.metrics_host().names.is_empty());
}

/// The clock must not be read for requests the filter ignores.
struct PanickyClock;

impl Clock for PanickyClock {
    fn now_nanos(&self) -> u64 {
        unreachable!("clock read for an ignored request")
    }
}

#[test]
fn an_aborted_stream_is_completed_at_the_log_callback() {
    let (mut g, _) = gateway(CONFIG);
    let view = chat_view("acme")
        .resp("content-type", "text/event-stream")
        .prop("response.code_details", b"downstream_remote_disconnect")
        .prop("response.flags", &(1u64 << 28).to_le_bytes());
    let mut stream = FakeStream::new(view);
    stream.response_chunk =
        b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\n\n".to_vec();
    let mut s = g.request_headers(&mut stream, &0u64).unwrap();
    g.request_body(&mut s, &mut stream, 0, true);
    g.response_headers(&mut s, &mut stream, &MS, false);
    let n = stream.response_chunk.len();
    g.response_body(&mut s, &mut stream, n, false, &(2 * MS));
    assert!(stream.state.is_empty(), "nothing before the end");
    g.finish(s, &mut stream, &(3 * MS));
    g.tick(4 * MS, &mut NoExports);
    let errors = "route=.=chat;.;tenant=.=acme;.;model=.=unknown;.;route_class=.=interactive;.;team=.=platform-ai;.;backend=.=vllm_stable;.;error_type=.=client_abort;.;llm_gateway_errors_total";
    assert_eq!(g.metrics_host().value(errors), 1);
    assert_eq!(stream.state.len(), 1, "filter state for access logs");
}

#[test]
fn include_usage_rewrite_holds_the_body_then_replaces_it() {
    let (mut g, _) =
        gateway(&CONFIG.replacen('{', r#"{"usage":{"inject_include_usage":true},"#, 1));
    let mut stream = FakeStream::new(chat_view("acme"));
    stream.request_body = br#"{"model":"mistral-7b","stream":true,"messages":[]}"#.to_vec();
    let mut s = g.request_headers(&mut stream, &0u64).unwrap();
    assert_eq!(stream.removed_headers, vec!["content-length".to_string()]);
    assert_eq!(
        g.request_body(&mut s, &mut stream, 10, false),
        BodyAction::Pause
    );
    let n = stream.request_body.len();
    assert_eq!(
        g.request_body(&mut s, &mut stream, n, true),
        BodyAction::Continue
    );
    let body: serde_json::Value = serde_json::from_slice(&stream.replaced_body.unwrap()).unwrap();
    assert_eq!(
        body["stream_options"]["include_usage"],
        serde_json::json!(true)
    );
}

#[test]
fn include_usage_gives_up_past_the_buffer_limit() {
    let config = CONFIG.replacen(
        '{',
        r#"{"usage":{"inject_include_usage":true,"max_request_buffer_bytes":1024},"#,
        1,
    );
    let (mut g, _) = gateway(&config);
    let mut stream = FakeStream::new(chat_view("acme"));
    let padding = "x".repeat(2000);
    stream.request_body =
        format!(r#"{{"model":"mistral-7b","stream":true,"messages":[],"user":"{padding}"}}"#)
            .into_bytes();
    let mut s = g.request_headers(&mut stream, &0u64).unwrap();
    assert_eq!(
        g.request_body(&mut s, &mut stream, 500, false),
        BodyAction::Pause
    );
    let n = stream.request_body.len();
    assert_eq!(
        g.request_body(&mut s, &mut stream, n, false),
        BodyAction::Continue
    );
    assert!(stream.replaced_body.is_none());
}

#[test]
fn stages_stop_the_work_where_asked() {
    let (mut g, _) = gateway(CONFIG);
    g.set_stage(Stage::Headers);
    let mut stream = FakeStream::new(chat_view("42"));
    chat(&mut g, &mut stream);
    g.tick(40 * MS, &mut NoExports);
    let requests = format!("{LABELS}status=.=200;.;llm_gateway_requests_total");
    assert!(!g.metrics_host().defined(&requests));
    assert_eq!(g.metrics_host().value(ACTIVE), 0);
    assert!(stream.state.is_empty());
    assert_eq!(Stage::parse("record"), Some(Stage::Record));
    assert_eq!(Stage::parse("everything"), None);
}

/// Remembers exports; refuses them when `refuse` is set.
#[derive(Default)]
struct Exports {
    sent: Vec<Vec<u8>>,
    refuse: bool,
    next_token: Cell<u32>,
}

impl ExportSender for Exports {
    fn send(&mut self, _: &ExportTarget, body: &[u8]) -> Option<u32> {
        if self.refuse {
            return None;
        }
        self.sent.push(body.to_vec());
        self.next_token.set(self.next_token.get() + 1);
        Some(self.next_token.get())
    }
}

const TRACED: &str = r#"{"tenant":{"header":"x-tenant-id"},
    "tracing":{"cluster":"otel","sample_ratio":1.0,"flush_interval_ms":100}}"#;

#[test]
fn spans_are_exported_on_the_tick_and_results_counted() {
    let (mut g, _) = gateway(TRACED);
    assert_eq!(g.tick_period_ms(), TRACING_TICK_MS);
    let mut stream = FakeStream::new(chat_view("acme"));
    chat(&mut g, &mut stream);
    assert!(stream.set_headers.iter().any(|(k, _)| k == "traceparent"));
    let mut exports = Exports::default();
    g.tick(10_000 * MS, &mut exports);
    g.tick(10_100 * MS, &mut exports);
    assert_eq!(
        exports.sent.len(),
        1,
        "one batch once the flush interval passed"
    );
    g.export_response(1, Some(200), || None);
    g.export_response(99, Some(200), || None);
    g.tick(10_200 * MS, &mut exports);
    let stats = g.metrics_host();
    assert_eq!(stats.value("llm_gateway_spans_exported_total"), 1);
    assert_eq!(
        stats.value("result=.=ok;.;llm_gateway_span_exports_total"),
        1
    );
    let state: serde_json::Value = serde_json::from_slice(&stream.state[0].1).unwrap();
    assert!(state["trace_id"].is_string());
}

#[test]
fn refused_exports_drop_spans_with_a_reason_and_one_log_line() {
    let (mut g, lines) = gateway(TRACED);
    let mut exports = Exports {
        refuse: true,
        ..Exports::default()
    };
    for i in 0..2 {
        let mut stream = FakeStream::new(chat_view("acme"));
        chat(&mut g, &mut stream);
        g.tick((10_000 + i * 1000) * MS, &mut exports);
        g.tick((10_500 + i * 1000) * MS, &mut exports);
    }
    g.tick(20_000 * MS, &mut exports);
    let dropped = "reason=.=dispatch_failed;.;llm_gateway_spans_dropped_total";
    assert_eq!(g.metrics_host().value(dropped), 2);
    let logged = lines.0.borrow();
    assert_eq!(
        logged
            .iter()
            .filter(|l| l.contains("cannot send spans"))
            .count(),
        1
    );
}

#[test]
fn malformed_input_is_counted_and_logged_once() {
    let (mut g, lines) = gateway(CONFIG);
    for _ in 0..3 {
        let mut stream = FakeStream::new(chat_view("acme"));
        stream.request_body = b"\x00\x01 not json".to_vec();
        stream.response_chunk = CHAT_RESPONSE.to_vec();
        let mut s = g.request_headers(&mut stream, &0u64).unwrap();
        let n = stream.request_body.len();
        g.request_body(&mut s, &mut stream, n, true);
        g.response_headers(&mut s, &mut stream, &MS, false);
        g.response_body(&mut s, &mut stream, CHAT_RESPONSE.len(), true, &(2 * MS));
        g.finish(s, &mut stream, &(3 * MS));
    }
    g.tick(4 * MS, &mut NoExports);
    assert_eq!(
        g.metrics_host()
            .value("kind=.=request_json;.;llm_gateway_parse_errors_total"),
        3
    );
    assert_eq!(lines.0.borrow().len(), 1, "{:?}", lines.0.borrow());
}

#[test]
fn draining_sends_queued_spans_before_the_flush_interval() {
    let (mut g, _) = gateway(TRACED);
    let mut stream = FakeStream::new(chat_view("acme"));
    chat(&mut g, &mut stream);
    let mut exports = Exports::default();
    // The first tick starts the flush interval: nothing is due yet.
    g.tick(10_000 * MS, &mut exports);
    assert!(exports.sent.is_empty());
    g.tick_and_drain(10_001 * MS, &mut exports);
    assert_eq!(exports.sent.len(), 1, "the queued span leaves at once");
    g.tick_and_drain(10_002 * MS, &mut exports);
    assert_eq!(exports.sent.len(), 1, "nothing queued, nothing sent");
}

#[test]
fn an_abandoned_session_gives_back_its_in_flight_gauge_and_records_nothing() {
    let (mut g, _) = gateway(CONFIG);
    let mut stream = FakeStream::new(chat_view("acme"));
    let s = g.request_headers(&mut stream, &(10 * MS)).unwrap();
    g.tick(20 * MS, &mut NoExports);
    assert_eq!(g.metrics_host().value(ACTIVE), 1);
    g.abandon(s);
    g.tick(30 * MS, &mut NoExports);
    assert_eq!(g.metrics_host().value(ACTIVE), 0);
    assert!(
        !g.metrics_host()
            .names
            .iter()
            .any(|(_, n)| n.ends_with("llm_gateway_requests_total")),
        "no request recorded"
    );
    assert!(stream.state.is_empty(), "no filter state");
}
