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

use tokentap_core::config::Config;
use tokentap_core::labels::{Dimension, SharedAdmission};
use tokentap_core::metrics::{Labeler, MetricsRecorder, RequestLabels};
use tokentap_core::request::{RequestObserver, RequestRecord};

use crate::envoy::{Buffer, EnvoyClock, EnvoySharedData, EnvoyStats, EnvoyView, Level};
use tokentap_core::host::Clock;

/// Version reported in logs and span resources.
pub const PLUGIN_VERSION: &str = env!("CARGO_PKG_VERSION");

proxy_wasm::main! {{
    std::panic::set_hook(Box::new(|info| {
        envoy::log(Level::Critical, &format!("tokentap: panic: {info}"));
    }));
    proxy_wasm::set_root_context(|_context_id| -> Box<dyn RootContext> {
        Box::new(Root { shared: None })
    });
}}

/// Per-VM state shared by the root context and every request.
struct Shared {
    config: Config,
    labeler: Labeler,
    recorder: MetricsRecorder<EnvoyStats>,
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

struct Root {
    shared: Option<Rc<RefCell<Shared>>>,
}

impl Context for Root {}

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
            logged: 0,
        })));
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Request {
            shared: self.shared.clone(),
            observer: None,
            start_labels: None,
            buffering: false,
            state_published: false,
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
        if !s.config.filter_state {
            return;
        }
        self.state_published = true;
        let now = EnvoyClock.now_nanos();
        let record = observer.record(&s.config, &EnvoyView, now);
        // Overflows are counted once, at `on_log`.
        let mut ignored = Vec::new();
        let labels = s.labeler.request_labels(&record, &mut ignored);
        for (key, value) in tokentap_core::state::filter_state(&record, &labels, &s.labeler) {
            envoy::set_property(&[key], value.as_bytes());
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
        let Some(observer) = RequestObserver::start(&s.config, &EnvoyView, now) else {
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
            observer.response_headers(&shared.borrow().config, &EnvoyView, now);
            if end_of_stream {
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
        let record = observer.record(&s.config, &EnvoyView, now);
        let mut overflowed = Vec::new();
        let labels = s.labeler.request_labels(&record, &mut overflowed);
        for d in overflowed {
            s.recorder.label_overflow(d);
        }
        s.recorder.record_request(&record, &labels, &s.labeler);
        if let Some(start) = self.start_labels.take() {
            s.recorder.active(&start, &s.labeler, -1);
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
