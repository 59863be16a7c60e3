//! The request lifecycle, owned by the core: one [`Gateway`] per VM and one
//! [`Session`] per LLM request. The proxy-wasm shell only forwards Envoy's
//! callbacks with the host seam ([`StreamHost`], [`Clock`]); every decision
//! (what is LLM traffic, buffering for the usage rewrite, labels, metrics,
//! spans, filter state, what to log) is made here, so the tests, the native
//! benchmark and Envoy drive the same code.
//!
//! Cost model: a request the filter ignores costs one read of its headers. An LLM
//! request is turned into a record once, when its response ends (or when
//! Envoy logs an aborted stream); labels are resolved once; metrics go to
//! the VM-side [`MetricStore`] and reach Envoy on the tick.
//!
//! ```
//! use tokentap_core::config::Config;
//! use tokentap_core::host::{HttpView, Log, LogLevel, StreamHost};
//! use tokentap_core::labels::LocalAdmission;
//! use tokentap_core::lifecycle::Gateway;
//! # use tokentap_core::host::{HostError, MetricKind, MetricsHost};
//! # #[derive(Default)] struct Stats(Vec<String>, Vec<i64>);
//! # impl MetricsHost for Stats {
//! #     fn define(&mut self, _: MetricKind, n: &str) -> Result<u32, HostError> { self.0.push(n.into()); self.1.push(0); Ok(self.0.len() as u32 - 1) }
//! #     fn increment(&mut self, id: u32, d: i64) -> Result<(), HostError> { self.1[id as usize] += d; Ok(()) }
//! #     fn record(&mut self, id: u32, v: u64) -> Result<(), HostError> { self.1[id as usize] = v as i64; Ok(()) }
//! # }
//! # struct Quiet;
//! # impl Log for Quiet { fn log(&self, _: LogLevel, _: &str) {} }
//! # #[derive(Default)] struct Stream;
//! # impl HttpView for Stream {
//! #     fn request_header(&self, n: &str) -> Option<Vec<u8>> { (n == ":path").then(|| b"/v1/chat/completions".to_vec()) }
//! #     fn response_header(&self, n: &str) -> Option<Vec<u8>> { (n == ":status").then(|| b"200".to_vec()) }
//! #     fn property(&self, _: &[&str]) -> Option<Vec<u8>> { None }
//! # }
//! # impl StreamHost for Stream {
//! #     fn request_body(&self, _: usize, _: usize) -> Option<Vec<u8>> { None }
//! #     fn response_body(&self, _: usize, _: usize) -> Option<Vec<u8>> { None }
//! #     fn replace_request_body(&mut self, _: usize, _: &[u8]) {}
//! #     fn set_request_header(&mut self, _: &str, _: &str) {}
//! #     fn remove_request_header(&mut self, _: &str) {}
//! #     fn set_filter_state(&mut self, _: &str, _: &[u8]) {}
//! # }
//! let config = Config::parse(b"{}").unwrap();
//! let mut gateway = Gateway::new(config, Box::new(LocalAdmission::default()), Stats::default(), None, Box::new(Quiet));
//! let mut stream = Stream;
//! let mut session = gateway.request_headers(&mut stream, &1_000_000u64).unwrap();
//! gateway.response_headers(&mut session, &mut stream, &2_000_000u64, true);
//! gateway.finish(session, &mut stream, &3_000_000u64);
//! gateway.tick(3_000_000, &mut tokentap_core::lifecycle::NoExports);
//! assert!(gateway.metrics_host().0.iter().any(|n| n.ends_with("status=.=200;.;llm_gateway_requests_total")));
//! ```

use crate::config::{Config, FilterStateMode};
use crate::host::{Clock, Log, LogLevel, MetricsHost, StreamHost};
use crate::labels::{AdmissionControl, Dimension};
use crate::metrics::store::{LabelValue, MetricStore, Series};
use crate::metrics::{record_request, Family, Labeler, Overflowed, RequestLabels};
use crate::request::{RequestObserver, RequestRecord};
use crate::state;
use crate::trace::{BatchId, ExportResult, SpanStart};
use crate::tracer::{ExportTarget, Tracer};
use crate::vocab::{SpanDropReason, SpanExportResult, Vocabulary};

mod logs;

use logs::LogOnce;

/// Tick period when only metrics need publishing: values are visible in
/// Envoy's stats within this delay.
pub const METRICS_TICK_MS: u32 = 250;
/// Tick period with tracing on (span batches are due every flush interval).
pub const TRACING_TICK_MS: u32 = 100;

/// How far the lifecycle runs. Production runs [`Stage::Full`]; the others
/// exist for the benchmark's ablations (which part of the work costs what).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    /// Classify the request and resolve its start labels; nothing after.
    Headers,
    /// Also read request and response bodies.
    Bodies,
    /// Also build the record and resolve every label.
    Record,
    /// Also record metrics.
    Metrics,
    /// Also filter state and spans.
    #[default]
    Full,
}

impl Stage {
    /// Parses a stage name (`headers`, `bodies`, `record`, `metrics`, `full`).
    pub fn parse(name: &str) -> Option<Stage> {
        Some(match name.trim() {
            "headers" => Stage::Headers,
            "bodies" => Stage::Bodies,
            "record" => Stage::Record,
            "metrics" => Stage::Metrics,
            "full" => Stage::Full,
            _ => return None,
        })
    }
}

/// What the shell answers Envoy for a request body callback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyAction {
    Continue,
    /// Hold the body (only while buffering for the `include_usage` rewrite).
    Pause,
}

/// Sends an OTLP export; returns the host's call token, `None` if refused.
pub trait ExportSender {
    fn send(&mut self, target: &ExportTarget, body: &[u8]) -> Option<u32>;
}

/// An [`ExportSender`] for gateways without tracing.
pub struct NoExports;

impl ExportSender for NoExports {
    fn send(&mut self, _: &ExportTarget, _: &[u8]) -> Option<u32> {
        None
    }
}

/// One LLM request in flight.
pub struct Session {
    observer: RequestObserver,
    start: RequestLabels,
    span: Option<SpanStart>,
    /// The record was made and published.
    done: bool,
}

/// Per-VM state: configuration, labels, metrics, tracing.
pub struct Gateway<M> {
    config: Config,
    labeler: Labeler,
    store: MetricStore,
    stats: M,
    tracer: Option<Tracer>,
    /// In-flight exports: host call token -> batch.
    pending_exports: crate::labels::FxHashMap<u32, BatchId>,
    /// This VM's span queue length last added to the shared gauge.
    published_queue: u64,
    log: Box<dyn Log>,
    logged: LogOnce,
    stage: Stage,
}

impl<M: MetricsHost> Gateway<M> {
    pub fn new(
        config: Config,
        admission: Box<dyn AdmissionControl>,
        stats: M,
        tracer: Option<Tracer>,
        log: Box<dyn Log>,
    ) -> Self {
        Self {
            labeler: Labeler::new(&config, admission),
            store: MetricStore::new(config.max_series_per_metric),
            config,
            stats,
            tracer,
            pending_exports: Default::default(),
            published_queue: 0,
            log,
            logged: LogOnce::default(),
            stage: Stage::Full,
        }
    }

    /// Runs only part of the lifecycle (benchmark ablations).
    pub fn set_stage(&mut self, stage: Stage) {
        self.stage = stage;
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The metrics host (tests read what was published).
    pub fn metrics_host(&self) -> &M {
        &self.stats
    }

    /// The metrics host, for shells whose host needs per-call context
    /// (a dynamic module publishes through the stream at hand).
    pub fn metrics_host_mut(&mut self) -> &mut M {
        &mut self.stats
    }

    /// How often the shell must call [`Gateway::tick`].
    pub fn tick_period_ms(&self) -> u32 {
        if self.tracer.is_some() {
            TRACING_TICK_MS
        } else {
            METRICS_TICK_MS
        }
    }

    /// Request headers: a [`Session`] for LLM traffic, `None` for anything
    /// else (which then costs nothing more).
    pub fn request_headers(
        &mut self,
        host: &mut dyn StreamHost,
        clock: &dyn Clock,
    ) -> Option<Session> {
        let observer = RequestObserver::start(&self.config, &*host, clock)?;
        let route = observer.route_name();
        let workload = self
            .config
            .workload_ref(route.and_then(|r| std::str::from_utf8(r).ok()), None);
        let route_label = route.map(|r| self.config.route_label(r));
        let mut overflowed = Overflowed::default();
        let start = self
            .labeler
            .start_labels(route_label, &workload, &mut overflowed);
        self.count_overflows(overflowed);
        self.active(&start, 1);
        let span = self.start_span(host);
        if observer.wants_request_buffering() && self.stage >= Stage::Bodies {
            // The body may grow; Envoy recomputes framing without it.
            host.remove_request_header("content-length");
        }
        Some(Session {
            observer,
            start,
            span,
            done: false,
        })
    }

    fn start_span(&mut self, host: &mut dyn StreamHost) -> Option<SpanStart> {
        let tracer = self.tracer.as_mut().filter(|_| self.stage == Stage::Full)?;
        let start = tracer.start(&*host);
        if tracer.injects() {
            host.set_request_header("traceparent", &start.traceparent());
            if let Some(ts) = start.tracestate() {
                host.set_request_header("tracestate", ts);
            }
        }
        Some(start)
    }

    /// A request body callback; `body_size` is what Envoy holds now (all of
    /// it while the filter pauses, the chunk otherwise).
    pub fn request_body(
        &mut self,
        s: &mut Session,
        host: &mut dyn StreamHost,
        body_size: usize,
        end_of_stream: bool,
    ) -> BodyAction {
        if self.stage < Stage::Bodies {
            return BodyAction::Continue;
        }
        if !s.observer.wants_request_buffering() {
            if body_size > 0 {
                host.visit_request_body(body_size, &mut |chunk| {
                    s.observer.request_body(chunk, false);
                });
            }
            if end_of_stream {
                s.observer.request_body(&[], true);
            }
            return BodyAction::Continue;
        }
        self.buffered_request_body(s, host, body_size, end_of_stream)
    }

    /// Buffering for the `include_usage` rewrite: `body_size` is cumulative,
    /// so only the unseen tail is read until the end, bounded by
    /// `usage.max_request_buffer_bytes`.
    fn buffered_request_body(
        &mut self,
        s: &mut Session,
        host: &mut dyn StreamHost,
        body_size: usize,
        end_of_stream: bool,
    ) -> BodyAction {
        let seen = usize::try_from(s.observer.request_bytes_seen()).unwrap_or(usize::MAX);
        if body_size > seen {
            let tail = host
                .request_body(seen, body_size - seen)
                .unwrap_or_default();
            s.observer.request_body(&tail, false);
        }
        if body_size > self.config.max_request_buffer_bytes {
            s.observer.abandon_buffering();
            if end_of_stream {
                s.observer.request_body(&[], true);
            }
            return BodyAction::Continue;
        }
        if !end_of_stream {
            return BodyAction::Pause;
        }
        let body = host.request_body(0, body_size).unwrap_or_default();
        if let Some(new_body) = s.observer.rewrite_request(&body) {
            host.replace_request_body(body_size, &new_body);
        }
        BodyAction::Continue
    }

    /// Response headers.
    pub fn response_headers(
        &mut self,
        s: &mut Session,
        host: &mut dyn StreamHost,
        clock: &dyn Clock,
        end_of_stream: bool,
    ) {
        if self.stage < Stage::Bodies || s.done {
            return;
        }
        let now = clock.now_nanos();
        s.observer.response_headers(&self.config, &*host, now);
        if end_of_stream {
            s.observer.response_end();
            self.complete(s, host, now);
        }
    }

    /// A response body chunk: read (never held) when the response is JSON or
    /// an event stream, only counted otherwise.
    pub fn response_body(
        &mut self,
        s: &mut Session,
        host: &mut dyn StreamHost,
        body_size: usize,
        end_of_stream: bool,
        clock: &dyn Clock,
    ) {
        if self.stage < Stage::Bodies || s.done {
            return;
        }
        let reads = s.observer.reads_response_body();
        let now = if reads || end_of_stream {
            clock.now_nanos()
        } else {
            0
        };
        if !reads {
            s.observer.response_body_skipped(body_size);
        } else if body_size > 0 {
            host.visit_response_body(body_size, &mut |chunk| {
                s.observer.response_body(chunk, now);
            });
        }
        if end_of_stream {
            s.observer.response_end();
            self.complete(s, host, now);
        }
    }

    /// Drops a session without telemetry (the shell could not finish it,
    /// e.g. after a caught panic): only its in-flight gauge is taken back.
    pub fn abandon(&mut self, mut s: Session) {
        if !s.done {
            s.done = true;
            self.active(&s.start, -1);
        }
    }

    /// Envoy's log callback: completes requests whose response never ended
    /// (client aborts, upstream resets).
    pub fn finish(&mut self, mut s: Session, host: &mut dyn StreamHost, clock: &dyn Clock) {
        if !s.done {
            self.complete(&mut s, host, clock.now_nanos());
        }
    }

    /// The one place a request becomes telemetry: record, labels, metrics,
    /// filter state, span, logs.
    fn complete(&mut self, s: &mut Session, host: &mut dyn StreamHost, now: u64) {
        s.done = true;
        self.active(&s.start, -1);
        if self.stage < Stage::Record {
            return;
        }
        let rec = s.observer.record(&self.config, &*host, now);
        let mut overflowed = Overflowed::default();
        let labels = self.labeler.request_labels(&s.start, &rec, &mut overflowed);
        if self.stage < Stage::Metrics {
            return;
        }
        self.count_overflows(overflowed);
        record_request(&mut self.store, &rec, &labels, &self.labeler, now);
        if self.stage < Stage::Full {
            return;
        }
        self.publish_state(host, &rec, &labels, s.span.as_ref());
        if let (Some(tracer), Some(span)) = (self.tracer.as_mut(), s.span.as_ref()) {
            tracer.finish(span, &rec, &labels, &self.labeler);
        }
        self.log_problems(&rec, &labels);
    }

    fn publish_state(
        &self,
        host: &mut dyn StreamHost,
        rec: &RequestRecord,
        labels: &RequestLabels,
        span: Option<&SpanStart>,
    ) {
        let mode = self.config.filter_state;
        if mode == FilterStateMode::Off {
            return;
        }
        let values = state::filter_state(rec, labels, &self.labeler, span);
        match mode {
            FilterStateMode::Summary => {
                host.set_filter_state(state::KEY, state::summary_json(&values).as_bytes());
            }
            FilterStateMode::Fields => {
                for (name, value) in &values {
                    host.set_filter_state(&state::field_key(name), value.plain().as_bytes());
                }
            }
            FilterStateMode::Off => {}
        }
    }

    fn active(&mut self, start: &RequestLabels, delta: i64) {
        let v = [Dimension::Route, Dimension::RouteClass, Dimension::Team].map(|d| LabelValue {
            id: start.get(d),
            text: self.labeler.text(d, start.get(d)),
        });
        self.store
            .add(&Series::new(Family::ActiveRequests, &v), delta);
    }

    fn count_overflows(&mut self, overflowed: Overflowed) {
        for d in overflowed.iter() {
            let v = [LabelValue {
                id: d as u16,
                text: d.label_name(),
            }];
            self.store.add(&Series::new(Family::LabelOverflow, &v), 1);
        }
    }

    /// The VM's tick: sends span batches that are due and publishes every
    /// metric change since the last tick.
    pub fn tick(&mut self, now_ns: u64, sender: &mut dyn ExportSender) {
        self.export_due(now_ns / 1_000_000, sender, false);
        self.publish();
    }

    /// [`Gateway::tick`] that also sends every queued span, due or not: for
    /// a shell with no timer of its own, when nothing may call it for a
    /// while (a dynamic module's worker with no request in flight).
    pub fn tick_and_drain(&mut self, now_ns: u64, sender: &mut dyn ExportSender) {
        self.export_due(now_ns / 1_000_000, sender, true);
        self.publish();
    }

    /// Tracer counters and every metric change since the last tick, to Envoy.
    fn publish(&mut self) {
        self.publish_tracing();
        self.store.flush(&mut self.stats);
        if self.store.host_errors > 0 {
            let n = self.store.host_errors;
            self.warn_once(LogOnce::HOST_ERRORS, || {
                format!("tokentap: {n} stats host call(s) failed; those series stay pending and are retried (logged once)")
            });
        }
    }

    fn export_due(&mut self, now_ms: u64, sender: &mut dyn ExportSender, drain: bool) {
        let Some(tracer) = self.tracer.as_mut() else {
            return;
        };
        let target = tracer.target().clone();
        let mut refused = false;
        let next = |t: &mut Tracer| {
            if drain {
                t.next_export_now(now_ms)
            } else {
                t.next_export(now_ms)
            }
        };
        while let Some((id, body)) = next(tracer) {
            match sender.send(&target, &body) {
                Some(token) => {
                    self.pending_exports.insert(token, id);
                }
                None => {
                    tracer.on_export_result(id, ExportResult::DispatchFailed);
                    refused = true;
                }
            }
        }
        if refused {
            self.warn_once(LogOnce::EXPORT, || {
                format!("tokentap: cannot send spans to cluster `{}`; spans are dropped and counted in llm_gateway_spans_dropped_total{{reason=\"dispatch_failed\"}} (logged once)", target.cluster)
            });
        }
    }

    /// The answer to an export: `status` is `None` when the call failed
    /// (no answer, timeout); `body` is read only for a 2xx.
    pub fn export_response(
        &mut self,
        token: u32,
        status: Option<u16>,
        body: impl FnOnce() -> Option<Vec<u8>>,
    ) {
        let Some(id) = self.pending_exports.remove(&token) else {
            return;
        };
        let result = match status {
            None => ExportResult::Failed,
            Some(code) if (200..300).contains(&code) => {
                let rejected = body()
                    .and_then(|b| crate::trace::otlp::rejected_spans(&b).ok())
                    .unwrap_or(0);
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
        if let Some(tracer) = self.tracer.as_mut() {
            tracer.on_export_result(id, result);
        }
        self.publish_tracing();
    }

    /// Tracer counters into the metric store.
    fn publish_tracing(&mut self) {
        let Some(tracer) = self.tracer.as_mut() else {
            return;
        };
        let d = tracer.take_deltas();
        let store = &mut self.store;
        if d.spans_exported > 0 {
            store.add(
                &Series::new(Family::SpansExported, &[]),
                clamp(d.spans_exported),
            );
        }
        let dropped = [
            (SpanDropReason::QueueFull, d.dropped_queue_full),
            (SpanDropReason::TooLarge, d.dropped_too_large),
            (SpanDropReason::ExportFailed, d.dropped_export_failed),
            (SpanDropReason::DispatchFailed, d.dropped_dispatch_failed),
            (SpanDropReason::Rejected, d.rejected),
        ];
        add_by_label(store, Family::SpansDropped, &dropped);
        let exports = [
            (SpanExportResult::Ok, d.exports_ok),
            (SpanExportResult::HttpError, d.exports_http_error),
            (SpanExportResult::Failed, d.exports_failed),
        ];
        add_by_label(store, Family::SpanExports, &exports);
        // The gauge is shared by all VMs: add this VM's change only.
        let delta = clamp(d.queue_len) - clamp(self.published_queue);
        if delta != 0 {
            store.add(&Series::new(Family::SpanQueue, &[]), delta);
            self.published_queue = d.queue_len;
        }
        if d.dropped_queue_full > 0 {
            self.warn_once(LogOnce::QUEUE_FULL, || {
                "tokentap: span queue full (collector slow or down); spans are dropped and counted in llm_gateway_spans_dropped_total{reason=\"queue_full\"} (logged once)".to_string()
            });
        }
    }

    fn warn_once(&mut self, kind: LogOnce, message: impl FnOnce() -> String) {
        if self.logged.first(kind) {
            self.log.log(LogLevel::Warn, &message());
        }
    }
}

fn add_by_label<V: Vocabulary>(store: &mut MetricStore, family: Family, counts: &[(V, u64)]) {
    for (value, n) in counts {
        if *n > 0 {
            let v = [LabelValue {
                id: value.id(),
                text: value.as_str(),
            }];
            store.add(&Series::new(family, &v), clamp(*n));
        }
    }
}

fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A fixed time is a clock (tests, and callers that already read it).
impl Clock for u64 {
    fn now_nanos(&self) -> u64 {
        *self
    }
}

#[cfg(test)]
mod tests;
