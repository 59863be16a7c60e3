//! proxy-wasm shell around `tokentap-core`: it translates Envoy callbacks into
//! calls on [`RequestObserver`] and turns the finished [`RequestRecord`] into
//! Envoy stats. All decisions live in `tokentap-core`; this crate only moves
//! bytes and timestamps across the host boundary.
//!
//! Failure policy: the filter never returns anything but `Continue` for a
//! response, never pauses a response body, and answers every unexpected host
//! result by skipping the measurement, so traffic is never affected.

mod envoy;

use std::cell::RefCell;
use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};

use std::collections::HashMap;
use std::time::Duration;

use tokentap_core::config::{Config, FilterStateMode, TracingConfig};
use tokentap_core::host::Clock;
use tokentap_core::labels::{Dimension, SharedAdmission};
use tokentap_core::metrics::{Family, Labeler, MetricsRecorder, RequestLabels};
use tokentap_core::request::{RequestObserver, RequestRecord};
use tokentap_core::trace::{BatchId, ExportResult, ResourceBuilder, SpanStart};
use tokentap_core::tracer::Tracer;

use crate::envoy::{Buffer, EnvoyClock, EnvoySharedData, EnvoyStats, EnvoyView, Level};

/// Version reported in logs and span resources.
pub const PLUGIN_VERSION: &str = env!("CARGO_PKG_VERSION");

proxy_wasm::main! {{
    std::panic::set_hook(Box::new(|info| {
        envoy::log(Level::Critical, &format!("tokentap: panic: {info}"));
    }));
    proxy_wasm::set_root_context(|_context_id| -> Box<dyn RootContext> {
        Box::new(Root { shared: None, pending_exports: HashMap::new(), published_queue: 0 })
    });
}}

/// Per-VM state shared by the root context and every request.
struct Shared {
    config: Config,
    labeler: Labeler,
    recorder: MetricsRecorder<EnvoyStats>,
    tracer: Option<Tracer>,
    /// Kinds of bad input already logged once.
    logged: u32,
}

impl Shared {
    fn log_once(&mut self, bit: u32, message: impl FnOnce() -> String) {
        if self.logged & bit == 0 {
            self.logged |= bit;
            envoy::log(Level::Warn, &message());
        }
    }
}

const LOG_REQUEST_JSON: u32 = 1;
const LOG_RESPONSE_JSON: u32 = 1 << 1;
const LOG_SSE: u32 = 1 << 2;
const LOG_COMPRESSED: u32 = 1 << 3;
const LOG_HOST_ERRORS: u32 = 1 << 4;
const LOG_RAG: u32 = 1 << 5;
const LOG_EXPORT: u32 = 1 << 6;
const LOG_QUEUE_FULL: u32 = 1 << 7;

/// How often each VM looks for spans to export. VMs with an empty queue do
/// nothing on a tick, so only workers that hold spans send anything.
const TICK_MS: u64 = 100;

struct Root {
    shared: Option<Rc<RefCell<Shared>>>,
    /// In-flight exports: `dispatch_http_call` token -> batch.
    pending_exports: HashMap<u32, BatchId>,
    /// Queue length last added to the shared queue gauge by this VM.
    published_queue: u64,
}

/// Seed for span/trace ids: WASI randomness, mixed with the clock.
fn random_seed() -> u64 {
    wasi_random() ^ EnvoyClock.now_nanos().rotate_left(17)
}

#[cfg(target_arch = "wasm32")]
fn wasi_random() -> u64 {
    #[link(wasm_import_module = "wasi_snapshot_preview1")]
    extern "C" {
        fn random_get(buf: *mut u8, len: usize) -> u16;
    }
    let mut buf = [0u8; 8];
    // SAFETY: `buf` is a live 8-byte buffer; WASI fills it or leaves it zero.
    #[allow(unsafe_code)]
    unsafe {
        random_get(buf.as_mut_ptr(), buf.len());
    }
    u64::from_le_bytes(buf)
}

/// Host builds (unit tests, clippy) have no WASI; the clock alone seeds.
#[cfg(not(target_arch = "wasm32"))]
fn wasi_random() -> u64 {
    0
}

/// Resource attributes: Envoy node metadata (`xds.node.metadata`; Istio puts
/// NAME/NAMESPACE there), then `vmConfig.env` variables, then the
/// configuration's own entries.
fn resource_for(cfg: &TracingConfig) -> tokentap_core::trace::Resource {
    let env: Vec<(String, String)> = std::env::vars().collect();
    let mut node: Vec<(&'static str, String)> = Vec::new();
    for key in [
        "NAME",
        "NAMESPACE",
        "POD_NAME",
        "POD_NAMESPACE",
        "NODE_NAME",
        "CLUSTER_NAME",
    ] {
        if let Some(v) = envoy::get_property(&["xds", "node", "metadata", key]) {
            if let Ok(v) = String::from_utf8(v) {
                node.push((key, v));
            }
        }
    }
    ResourceBuilder::new()
        .service_name(&cfg.service_name)
        .pairs(node.iter().map(|(k, v)| (*k, v.as_str())))
        .pairs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .pairs(cfg.resource.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .build()
}

impl Root {
    /// Sends every batch that is due, and publishes tracing counters.
    fn export_due(&mut self, s: &mut Shared) {
        let Some(tracer) = s.tracer.as_mut() else {
            return;
        };
        let now_ms = EnvoyClock.now_nanos() / 1_000_000;
        let target = tracer.target().clone();
        while let Some((id, body)) = tracer.next_export(now_ms) {
            let headers = vec![
                (":method", "POST"),
                (":path", target.path.as_str()),
                (":authority", target.authority.as_str()),
                ("content-type", "application/x-protobuf"),
            ];
            match proxy_wasm::hostcalls::dispatch_http_call(
                &target.cluster,
                headers,
                Some(&body),
                vec![],
                Duration::from_millis(u64::from(target.timeout_ms)),
            ) {
                Ok(token) => {
                    self.pending_exports.insert(token, id);
                }
                Err(status) => {
                    tracer.on_export_result(id, ExportResult::DispatchFailed);
                    let cluster = target.cluster.clone();
                    if s.logged & LOG_EXPORT == 0 {
                        s.logged |= LOG_EXPORT;
                        envoy::log(
                            Level::Warn,
                            &format!("tokentap: cannot send spans to cluster `{cluster}` ({status:?}); spans are dropped and counted in llm_gateway_spans_dropped_total{{reason=\"dispatch_failed\"}} (logged once)"),
                        );
                    }
                }
            }
        }
        self.publish_tracing(s);
    }

    fn publish_tracing(&mut self, s: &mut Shared) {
        let Some(tracer) = s.tracer.as_mut() else {
            return;
        };
        let d = tracer.take_deltas();
        let r = &mut s.recorder;
        if d.spans_exported > 0 {
            r.add_plain(Family::SpansExported, d.spans_exported as i64);
        }
        for (id, reason, n) in [
            (0u16, "queue_full", d.dropped_queue_full),
            (1, "too_large", d.dropped_too_large),
            (2, "export_failed", d.dropped_export_failed),
            (3, "dispatch_failed", d.dropped_dispatch_failed),
            (4, "rejected", d.rejected),
        ] {
            if n > 0 {
                r.add_tagged(Family::SpansDropped, id, reason, n as i64);
            }
        }
        for (id, result, n) in [
            (0u16, "ok", d.exports_ok),
            (1, "http_error", d.exports_http_error),
            (2, "failed", d.exports_failed),
        ] {
            if n > 0 {
                r.add_tagged(Family::SpanExports, id, result, n as i64);
            }
        }
        // The gauge is shared by all VMs: add this VM's change only.
        let delta = d.queue_len as i64 - self.published_queue as i64;
        if delta != 0 {
            r.add_plain(Family::SpanQueue, delta);
            self.published_queue = d.queue_len;
        }
        if d.dropped_queue_full > 0 && s.logged & LOG_QUEUE_FULL == 0 {
            s.logged |= LOG_QUEUE_FULL;
            envoy::log(
                Level::Warn,
                "tokentap: span queue full (collector slow or down); spans are dropped and counted in llm_gateway_spans_dropped_total{reason=\"queue_full\"} (logged once)",
            );
        }
    }
}

impl Context for Root {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        let Some(id) = self.pending_exports.remove(&token_id) else {
            return;
        };
        let status = if num_headers == 0 {
            None
        } else {
            envoy::http_call_response_header(":status")
                .and_then(|v| std::str::from_utf8(&v).ok()?.trim().parse::<u16>().ok())
        };
        let result = match status {
            None => ExportResult::Failed,
            Some(code) if (200..300).contains(&code) => {
                let rejected = if body_size > 0 {
                    envoy::get_buffer(Buffer::HttpCallResponseBody, 0, body_size)
                        .and_then(|b| tokentap_core::trace::otlp::rejected_spans(&b).ok())
                        .unwrap_or(0)
                } else {
                    0
                };
                if rejected > 0 {
                    ExportResult::PartialSuccess {
                        rejected_spans: rejected,
                    }
                } else {
                    ExportResult::Ok
                }
            }
            Some(code) => ExportResult::HttpStatus(code),
        };
        if let Some(shared) = self.shared.clone() {
            let mut guard = shared.borrow_mut();
            let s = &mut *guard;
            if let Some(tracer) = s.tracer.as_mut() {
                tracer.on_export_result(id, result);
            }
            self.publish_tracing(s);
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, plugin_configuration_size: usize) -> bool {
        let bytes = if plugin_configuration_size == 0 {
            Vec::new()
        } else {
            envoy::get_buffer(Buffer::PluginConfiguration, 0, plugin_configuration_size)
                .unwrap_or_default()
        };
        let config = match Config::parse(&bytes) {
            Ok(c) => c,
            Err(e) => {
                envoy::log(
                    Level::Critical,
                    &format!("tokentap: refusing configuration: {e}"),
                );
                return false;
            }
        };
        let mut admission = SharedAdmission::new(EnvoySharedData);
        admission.initialise(&Dimension::ALL);
        let labeler = Labeler::new(&config, Box::new(admission));
        let recorder = MetricsRecorder::new(EnvoyStats, config.max_series_per_metric);
        let tracer = match &config.tracing {
            None => None,
            Some(t) => match Tracer::new(t, random_seed(), resource_for(t)) {
                Ok(tracer) => Some(tracer),
                Err(e) => {
                    envoy::log(
                        Level::Critical,
                        &format!("tokentap: refusing configuration: {e}"),
                    );
                    return false;
                }
            },
        };
        if tracer.is_some() {
            envoy::set_tick_period_ms(TICK_MS as u32);
        }
        envoy::log(
            Level::Info,
            &format!(
                "tokentap {PLUGIN_VERSION}: configured ({} LLM paths, tenant source {:?})",
                config.llm_paths.len(),
                config.tenant_source
            ),
        );
        self.shared = Some(Rc::new(RefCell::new(Shared {
            config,
            labeler,
            recorder,
            tracer,
            logged: 0,
        })));
        true
    }

    fn on_tick(&mut self) {
        if let Some(shared) = self.shared.clone() {
            let mut guard = shared.borrow_mut();
            self.export_due(&mut guard);
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Request {
            shared: self.shared.clone(),
            observer: None,
            start_labels: None,
            buffering: false,
            state_published: false,
            span: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// One HTTP stream.
struct Request {
    /// `None` when configuration failed (the filter then does nothing).
    shared: Option<Rc<RefCell<Shared>>>,
    observer: Option<RequestObserver>,
    start_labels: Option<RequestLabels>,
    buffering: bool,
    state_published: bool,
    /// The gateway span's context, when tracing is on.
    span: Option<SpanStart>,
}

impl Request {
    /// Writes filter state once the response is complete: Envoy runs the
    /// connection manager's access loggers before this filter's `on_log`,
    /// so waiting for `on_log` would be too late for them.
    fn publish_state(&mut self) {
        if self.state_published {
            return;
        }
        let (Some(observer), Some(shared)) = (self.observer.as_mut(), self.shared.as_ref()) else {
            return;
        };
        let mut guard = shared.borrow_mut();
        let s = &mut *guard;
        if s.config.filter_state == FilterStateMode::Off {
            return;
        }
        self.state_published = true;
        let now = EnvoyClock.now_nanos();
        // Envoy's final attributes are only needed to classify errors.
        let failed = observer.status().is_none_or(|code| code >= 400);
        let record = observer.record(&s.config, &EnvoyView::default(), now, failed);
        // Overflows are counted once, at `on_log`.
        let mut ignored = Vec::new();
        let labels = s.labeler.request_labels(&record, &mut ignored);
        let mut values = tokentap_core::state::filter_state(&record, &labels, &s.labeler);
        if let Some(span) = &self.span {
            values.push(("tokentap.trace_id", span.context.trace_id.to_string()));
            values.push(("tokentap.span_id", span.context.span_id.to_string()));
        }
        match s.config.filter_state {
            FilterStateMode::Summary => {
                let json = tokentap_core::state::summary_json(&values);
                envoy::set_property(&[tokentap_core::state::KEY], json.as_bytes());
            }
            FilterStateMode::Fields => {
                for (key, value) in &values {
                    envoy::set_property(&[key], value.as_bytes());
                }
            }
            FilterStateMode::Off => {}
        }
    }
}

impl Context for Request {}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let Some(shared) = self.shared.clone() else {
            return Action::Continue;
        };
        let now = EnvoyClock.now_nanos();
        let mut guard = shared.borrow_mut();
        let s = &mut *guard;
        let view = EnvoyView::default();
        let Some(observer) = RequestObserver::start(&s.config, &view, now) else {
            return Action::Continue;
        };
        let mut overflowed = Vec::new();
        let labels = s
            .labeler
            .start_labels(&s.config, observer.route_name(), &mut overflowed);
        for d in overflowed {
            s.recorder.label_overflow(d);
        }
        s.recorder.active(&labels, &s.labeler, 1);
        self.start_labels = Some(labels);
        if let Some(tracer) = s.tracer.as_mut() {
            let start = tracer.start(&view);
            if tracer.injects() {
                envoy::set_request_header("traceparent", &start.traceparent());
                if let Some(ts) = start.tracestate() {
                    envoy::set_request_header("tracestate", ts);
                }
            }
            self.span = Some(start);
        }
        if observer.wants_request_buffering() {
            // The body may grow; Envoy recomputes framing without it.
            envoy::remove_request_header("content-length");
            self.buffering = true;
        }
        self.observer = Some(observer);
        Action::Continue
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let (Some(observer), Some(shared)) = (self.observer.as_mut(), self.shared.as_ref()) else {
            return Action::Continue;
        };
        if !self.buffering {
            if body_size > 0 {
                let chunk =
                    envoy::get_buffer(Buffer::RequestBody, 0, body_size).unwrap_or_default();
                observer.request_body(&chunk, end_of_stream);
            } else if end_of_stream {
                observer.request_body(&[], true);
            }
            return Action::Continue;
        }
        // Buffering for the include_usage rewrite: `body_size` is cumulative.
        let seen = observer.request_bytes_seen() as usize;
        if body_size > seen {
            let tail =
                envoy::get_buffer(Buffer::RequestBody, seen, body_size - seen).unwrap_or_default();
            observer.request_body(&tail, false);
        }
        let max = shared.borrow().config.max_request_buffer_bytes;
        if body_size > max {
            observer.abandon_buffering();
            self.buffering = false;
            if end_of_stream {
                observer.request_body(&[], true);
            }
            return Action::Continue;
        }
        if !end_of_stream {
            return Action::Pause;
        }
        self.buffering = false;
        let body = envoy::get_buffer(Buffer::RequestBody, 0, body_size).unwrap_or_default();
        if let Some(new_body) = observer.rewrite_request(&body) {
            envoy::set_buffer(Buffer::RequestBody, 0, body_size, &new_body);
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        if let (Some(observer), Some(shared)) = (self.observer.as_mut(), self.shared.as_ref()) {
            let now = EnvoyClock.now_nanos();
            observer.response_headers(&shared.borrow().config, &EnvoyView::default(), now);
            if end_of_stream {
                observer.response_end();
                self.publish_state();
            }
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if let Some(observer) = self.observer.as_mut() {
            if observer.reads_response_body() {
                if body_size > 0 {
                    let now = EnvoyClock.now_nanos();
                    let chunk =
                        envoy::get_buffer(Buffer::ResponseBody, 0, body_size).unwrap_or_default();
                    observer.response_body(&chunk, now);
                }
            } else {
                observer.response_body_skipped(body_size);
            }
            if end_of_stream {
                observer.response_end();
                self.publish_state();
            }
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        // Aborted streams never reached end of stream: publish now, for
        // whatever reads filter state after this point.
        self.publish_state();
        let (Some(mut observer), Some(shared)) = (self.observer.take(), self.shared.clone()) else {
            return;
        };
        let now = EnvoyClock.now_nanos();
        let mut guard = shared.borrow_mut();
        let s = &mut *guard;
        let record = observer.record_final(&s.config, &EnvoyView::default(), now);
        let mut overflowed = Vec::new();
        let labels = s.labeler.request_labels(&record, &mut overflowed);
        for d in overflowed {
            s.recorder.label_overflow(d);
        }
        s.recorder.record_request(&record, &labels, &s.labeler);
        if let Some(start) = self.start_labels.take() {
            s.recorder.active(&start, &s.labeler, -1);
        }
        if let (Some(tracer), Some(span)) = (s.tracer.as_mut(), self.span.take()) {
            tracer.finish(&span, &record, &labels, &s.labeler);
        }
        log_problems(s, &record, &labels);
    }
}

/// One warning per VM and kind of bad input; the counters keep the totals.
fn log_problems(s: &mut Shared, rec: &RequestRecord, labels: &RequestLabels) {
    let route = s.labeler.text(Dimension::Route, labels.route).to_string();
    let p = rec.problems;
    if p.request_json {
        s.log_once(LOG_REQUEST_JSON, || {
            format!("tokentap: request body on route `{route}` is not valid JSON; passed through unchanged, counted in llm_gateway_parse_errors_total{{kind=\"request_json\"}} (logged once)")
        });
    }
    if p.response_json {
        s.log_once(LOG_RESPONSE_JSON, || {
            format!("tokentap: JSON response on route `{route}` could not be parsed; passed through unchanged, counted in llm_gateway_parse_errors_total{{kind=\"response_json\"}} (logged once)")
        });
    }
    if p.sse_events > 0 {
        s.log_once(LOG_SSE, || {
            format!("tokentap: {} malformed SSE event(s) on route `{route}`; stream passed through unchanged, counted in llm_gateway_parse_errors_total{{kind=\"sse_event\"}} (logged once)", p.sse_events)
        });
    }
    if rec.unparsed.is_some() {
        s.log_once(LOG_COMPRESSED, || {
            format!("tokentap: a response on route `{route}` was compressed or not JSON/SSE; token usage not read, counted in llm_gateway_responses_unparsed_total (logged once)")
        });
    }
    if p.rag_headers > 0 {
        s.log_once(LOG_RAG, || {
            format!("tokentap: unparseable x-rag-* header value(s) on route `{route}`; counted in llm_gateway_parse_errors_total{{kind=\"rag_header\"}} (logged once)")
        });
    }
    if s.recorder.host_errors > 0 {
        let n = s.recorder.host_errors;
        s.log_once(LOG_HOST_ERRORS, || {
            format!("tokentap: {n} stats host call(s) failed; affected samples were skipped (logged once)")
        });
    }
}
