//! The gateway span: one per LLM request, built from the [`RequestRecord`]
//! and exported in OTLP batches (see `docs/tracing.md` for the schema).
//!
//! [`Tracer`] holds the per-VM tracing state: the sampler, the id generator,
//! the bounded export queue and the encoder. The shell calls
//! [`Tracer::start`] at request headers (to continue or start a trace and get
//! the `traceparent` to inject), [`Tracer::finish`] when the request is done,
//! and [`Tracer::next_export`] / [`Tracer::on_export_result`] from its tick.

use crate::config::{ConfigError, TracingConfig};
use crate::host::HttpView;
use crate::labels::Dimension;
use crate::metrics::{Labeler, RequestLabels};
use crate::request::{ErrorType, RequestRecord};
use crate::trace::semconv as sc;
use crate::trace::{
    Batch, BatchId, Batcher, BatcherConfig, BatcherStats, ExportResult, OtlpEncoder, PushOutcome,
    Resource, Sampler, SpanContext, SpanEvent, SpanKind, SpanRecord, SpanStart, SpanStatus,
    XoshiroIdGenerator,
};

/// Where and how batches are sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportTarget {
    pub cluster: String,
    pub authority: String,
    pub path: String,
    pub timeout_ms: u32,
}

/// Per-VM tracing state.
pub struct Tracer {
    sampler: Sampler,
    ids: XoshiroIdGenerator,
    batcher: Batcher,
    encoder: OtlpEncoder,
    target: ExportTarget,
    inject: bool,
    provider: String,
    published: BatcherStats,
}

/// Counter increments since the last call of [`Tracer::take_deltas`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TracerDeltas {
    pub spans_exported: u64,
    pub dropped_queue_full: u64,
    pub dropped_too_large: u64,
    pub dropped_export_failed: u64,
    pub dropped_dispatch_failed: u64,
    pub rejected: u64,
    pub exports_ok: u64,
    pub exports_http_error: u64,
    pub exports_failed: u64,
    pub queue_len: u64,
}

impl Tracer {
    /// `seed` comes from host randomness; `resource` from node metadata and env.
    pub fn new(cfg: &TracingConfig, seed: u64, resource: Resource) -> Result<Self, ConfigError> {
        let sampler = Sampler::new(cfg.sample_ratio).map_err(|e| ConfigError::Field {
            field: "tracing.sample_ratio".into(),
            reason: e.to_string(),
        })?;
        let batcher = Batcher::new(BatcherConfig {
            max_queue_spans: cfg.max_queue_spans as usize,
            max_queue_bytes: cfg.max_queue_bytes as usize,
            max_batch_spans: cfg.max_batch_spans as usize,
            flush_interval_ms: u64::from(cfg.flush_interval_ms),
            // Results arrive within the export timeout; expire a little after.
            in_flight_expiry_ms: u64::from(cfg.export_timeout_ms) * 2 + 1000,
            ..BatcherConfig::default()
        })
        .map_err(|e| ConfigError::Field {
            field: "tracing".into(),
            reason: e.to_string(),
        })?;
        Ok(Self {
            sampler,
            ids: XoshiroIdGenerator::from_seed(seed),
            batcher,
            encoder: OtlpEncoder::new(&resource),
            target: ExportTarget {
                cluster: cfg.cluster.clone().unwrap_or_default(),
                authority: cfg.authority.clone(),
                path: cfg.path.clone(),
                timeout_ms: cfg.export_timeout_ms,
            },
            inject: cfg.inject_traceparent,
            provider: cfg.provider_name.clone(),
            published: BatcherStats::default(),
        })
    }

    pub fn target(&self) -> &ExportTarget {
        &self.target
    }

    /// Whether to write `traceparent` upstream.
    pub fn injects(&self) -> bool {
        self.inject
    }

    /// Continues the incoming trace context, or starts a new trace.
    pub fn start(&mut self, view: &dyn HttpView) -> SpanStart {
        let traceparent = view
            .request_header("traceparent")
            .and_then(|v| String::from_utf8(v).ok());
        let tracestate = view
            .request_header("tracestate")
            .and_then(|v| String::from_utf8(v).ok());
        let parent = traceparent
            .as_deref()
            .and_then(|tp| SpanContext::from_headers(tp, tracestate.as_deref()).ok());
        self.sampler.start_span(parent.as_ref(), &mut self.ids)
    }

    /// Queues the finished span if the request was sampled.
    pub fn finish(
        &mut self,
        start: &SpanStart,
        rec: &RequestRecord,
        labels: &RequestLabels,
        labeler: &Labeler,
    ) -> Option<PushOutcome> {
        if !start.sampled {
            return None;
        }
        let span = build_span(start, rec, labels, labeler, &self.provider);
        Some(self.batcher.push(span))
    }

    /// The next batch due for export, encoded. Call until `None`.
    pub fn next_export(&mut self, now_ms: u64) -> Option<(BatchId, Vec<u8>)> {
        let Batch { id, spans, .. } = self.batcher.poll_flush(now_ms)?;
        Some((id, self.encoder.encode(&spans)))
    }

    /// A batch of whatever is queued, due or not (a shell without a timer
    /// sends what it holds before its worker goes idle). Call until `None`.
    pub fn next_export_now(&mut self, now_ms: u64) -> Option<(BatchId, Vec<u8>)> {
        let Batch { id, spans, .. } = self.batcher.take_batch(now_ms)?;
        Some((id, self.encoder.encode(&spans)))
    }

    pub fn on_export_result(&mut self, id: BatchId, result: ExportResult) {
        self.batcher.on_export_result(id, result);
    }

    pub fn stats(&self) -> BatcherStats {
        self.batcher.stats()
    }

    /// Counter increments since the previous call, for the shell's metrics.
    pub fn take_deltas(&mut self) -> TracerDeltas {
        let now = self.batcher.stats();
        let was = self.published;
        self.published = now;
        TracerDeltas {
            spans_exported: now.spans_exported - was.spans_exported,
            dropped_queue_full: now.spans_dropped_queue_full - was.spans_dropped_queue_full,
            dropped_too_large: now.spans_dropped_too_large - was.spans_dropped_too_large,
            dropped_export_failed: now.spans_dropped_export_failed
                - was.spans_dropped_export_failed,
            dropped_dispatch_failed: now.spans_dropped_dispatch_failed
                - was.spans_dropped_dispatch_failed,
            rejected: now.spans_rejected - was.spans_rejected,
            exports_ok: now.exports_ok - was.exports_ok,
            exports_http_error: now.exports_http_error - was.exports_http_error,
            exports_failed: now.exports_failed - was.exports_failed,
            queue_len: now.queue_len,
        }
    }
}

/// Builds the gateway span of a finished request.
pub fn build_span(
    start: &SpanStart,
    rec: &RequestRecord,
    labels: &RequestLabels,
    labeler: &Labeler,
    provider: &str,
) -> SpanRecord {
    let op = rec.operation.gen_ai_name();
    let name = sc::span_name(op, rec.request_model_sent.as_deref());
    let mut span = SpanRecord::new(start, name, SpanKind::Server, rec.start_ns);
    let text = |d: Dimension, id| labeler.text(d, id).to_string();

    span.set_attribute(sc::LLM_MODEL, text(Dimension::Model, labels.model));
    span.set_attribute(
        sc::LLM_ROUTE_CLASS,
        text(Dimension::RouteClass, labels.route_class),
    );
    span.set_attribute(sc::GEN_AI_OPERATION_NAME, op);
    span.set_attribute(sc::GEN_AI_PROVIDER_NAME, provider);
    if let Some(m) = &rec.request_model_sent {
        span.set_attribute(sc::GEN_AI_REQUEST_MODEL, m.clone());
    }
    if let Some(m) = &rec.response_model {
        span.set_attribute(sc::GEN_AI_RESPONSE_MODEL, m.clone());
    }
    if rec.operation.streams() {
        span.set_attribute(sc::GEN_AI_REQUEST_STREAM, rec.request_stream);
    }
    if rec.usage_source == crate::request::UsageSource::Reported {
        if let Some(p) = rec.usage.prompt_tokens {
            span.set_attribute(sc::LLM_PROMPT_TOKENS, p);
            span.set_attribute(sc::GEN_AI_USAGE_INPUT_TOKENS, p);
        }
        if let Some(c) = rec.usage.completion_tokens {
            span.set_attribute(sc::LLM_COMPLETION_TOKENS, c);
            span.set_attribute(sc::GEN_AI_USAGE_OUTPUT_TOKENS, c);
        }
        if let Some(c) = rec.usage.cached_tokens {
            span.set_attribute(sc::GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS, c);
        }
        if let Some(c) = rec.usage.cache_creation_tokens {
            span.set_attribute(sc::GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS, c);
        }
        if let Some(r) = rec.usage.reasoning_tokens {
            span.set_attribute(sc::TOKENTAP_USAGE_REASONING_TOKENS, r);
        }
    } else if rec.usage_source == crate::request::UsageSource::Estimated {
        if let Some(c) = rec.completion_tokens() {
            span.set_attribute(sc::LLM_COMPLETION_TOKENS, c);
            span.set_attribute("tokentap.usage.estimated", true);
        }
    }
    if rec.response_headers_ns.is_some() {
        span.set_attribute(sc::LLM_CACHE_HIT, rec.cache_hit.is_some());
    }
    if let Some(t) = rec.first_token_ns {
        let seconds = t.saturating_sub(rec.start_ns) as f64 / 1e9;
        span.set_attribute(sc::GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK, seconds);
        span.add_event(SpanEvent::new(sc::EVENT_FIRST_TOKEN, t));
    }
    if let Some(r) = &rec.finish_reason {
        span.set_attribute(sc::GEN_AI_RESPONSE_FINISH_REASONS, vec![r.clone()]);
    }

    if let Some(m) = &rec.method {
        span.set_attribute(sc::HTTP_REQUEST_METHOD, m.clone());
    }
    span.set_attribute(sc::HTTP_ROUTE, rec.matched_path.clone());
    if let Some(s) = rec.status {
        span.set_attribute(sc::HTTP_RESPONSE_STATUS_CODE, i64::from(s));
    }
    if let Some(p) = &rec.url_path {
        span.set_attribute(sc::URL_PATH, p.clone());
    }
    if let Some(a) = &rec.server_address {
        span.set_attribute(sc::SERVER_ADDRESS, a.clone());
    }

    if rec.tenant.is_some() {
        span.set_attribute(sc::TOKENTAP_TENANT, text(Dimension::Tenant, labels.tenant));
    }
    span.set_attribute(sc::TOKENTAP_TEAM, text(Dimension::Team, labels.team));
    if rec.cluster_name.is_some() {
        span.set_attribute(
            sc::TOKENTAP_BACKEND,
            text(Dimension::Backend, labels.backend),
        );
    }
    if rec.route_name.is_some() {
        span.set_attribute(sc::TOKENTAP_ROUTE, text(Dimension::Route, labels.route));
    }

    if rec.rag_collection.is_some() {
        span.set_attribute(
            sc::RAG_COLLECTION,
            text(Dimension::Collection, labels.collection),
        );
    }
    if let Some(k) = rec.rag_top_k {
        span.set_attribute(sc::RAG_TOP_K, k);
    }
    let rag = &rec.rag;
    if let Some(v) = rag.retrieval_ms {
        span.set_attribute("rag.retrieval.duration_ms", v);
    }
    if let Some(v) = rag.top_score {
        span.set_attribute("rag.top_score", v);
    }
    if let Some(v) = rag.sources {
        span.set_attribute("rag.sources", v);
    }
    if let Some(v) = rag.evaluation {
        span.set_attribute("rag.evaluation", v);
    }
    if let Some(v) = rag.index_age_seconds {
        span.set_attribute("rag.index_age_seconds", v);
    }
    if let Some(v) = rag.error {
        span.set_attribute("rag.error", v);
    }

    if let Some(e) = rec.error {
        let message = match (&rec.code_details, rec.status) {
            (Some(d), Some(s)) => format!("{} (HTTP {s}, {d})", e.as_str()),
            (Some(d), None) => format!("{} ({d})", e.as_str()),
            (None, Some(s)) => format!("{} (HTTP {s})", e.as_str()),
            (None, None) => e.as_str().to_string(),
        };
        if matches!(e, ErrorType::Upstream4xx | ErrorType::RateLimited) {
            // The caller's request was refused (by the runtime, or by the
            // gateway's rate limit); the gateway itself worked.
            span.set_attribute("error.type", e.as_str());
        } else {
            span.set_error(e.as_str(), message);
        }
    } else {
        span.set_status(SpanStatus::Unset);
    }
    span.end(rec.end_ns);
    span
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::labels::LocalAdmission;
    use crate::request::RequestObserver;
    use crate::testing::{FakeView, MS};
    use crate::trace::{AttrValue, ResourceBuilder};

    fn config() -> Config {
        Config::parse(
            br#"{"tenant":{"header":"x-tenant-id"},"models":["mistral-7b"],
                 "routes":{"chat":{"route_class":"interactive","team":"platform-ai"}},
                 "tracing":{"cluster":"otel","sample_ratio":1.0}}"#,
        )
        .unwrap()
    }

    fn attr<'a>(span: &'a SpanRecord, key: &str) -> Option<&'a AttrValue> {
        span.attribute(key)
    }

    #[test]
    fn streamed_request_span_carries_llm_genai_http_and_rag_attributes() {
        let cfg = config();
        let view = FakeView::default()
            .req(":path", "/v1/chat/completions?x=1")
            .req(":method", "POST")
            .req(":authority", "gateway.example:8080")
            .req("x-tenant-id", "acme")
            .req(
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            )
            .req("x-rag-collection", "handbook")
            .req("x-rag-top-k", "5")
            .prop("xds.route_name", b"chat")
            .prop("xds.cluster_name", b"vllm_canary")
            .prop("response.code_details", b"via_upstream")
            .resp(":status", "200")
            .resp("content-type", "text/event-stream")
            .resp("x-rag-retrieval-ms", "12.5")
            .resp("x-rag-evaluation", "pass");
        let mut tracer = Tracer::new(
            cfg.tracing.as_ref().unwrap(),
            7,
            ResourceBuilder::new().build(),
        )
        .unwrap();
        let start = tracer.start(&view);
        assert!(start.sampled);
        assert_eq!(
            start.context.trace_id.to_string(),
            "0af7651916cd43dd8448eb211c80319c"
        );
        assert_eq!(
            start.parent_span_id.map(|s| s.to_string()).as_deref(),
            Some("b7ad6b7169203331")
        );

        let mut obs = RequestObserver::start(&cfg, &view, &(1000 * MS)).unwrap();
        obs.request_body(br#"{"model":"mistral-7b","stream":true}"#, true);
        obs.response_headers(&cfg, &view, 1001 * MS);
        obs.response_body(
            b"data: {\"model\":\"mistral-7b\",\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n",
            1100 * MS,
        );
        obs.response_body(b"data: {\"choices\":[{\"delta\":{\"content\":\"b\"},\"finish_reason\":\"length\"}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2,\"prompt_tokens_details\":{\"cached_tokens\":0}}}\n\ndata: [DONE]\n\n", 1110 * MS);
        let rec = obs.record(&cfg, &view, 1111 * MS);
        let mut labeler = Labeler::new(&cfg, Box::new(LocalAdmission::default()));
        let (labels, _) = labeler.labels_of(&rec);
        let span = build_span(&start, &rec, &labels, &labeler, "vllm");

        assert_eq!(span.name, "chat mistral-7b");
        assert_eq!(span.kind, SpanKind::Server);
        assert_eq!(span.start_unix_nanos, 1000 * MS);
        assert_eq!(span.end_unix_nanos, 1111 * MS);
        let s = |k| attr(&span, k).and_then(|v| v.as_str()).map(str::to_string);
        let i = |k| attr(&span, k).and_then(|v| v.as_i64());
        assert_eq!(s("llm.model").as_deref(), Some("mistral-7b"));
        assert_eq!(s("llm.route_class").as_deref(), Some("interactive"));
        assert_eq!(i("llm.prompt_tokens"), Some(9));
        assert_eq!(i("llm.completion_tokens"), Some(2));
        assert_eq!(attr(&span, "llm.cache_hit"), Some(&AttrValue::Bool(false)));
        assert_eq!(s("rag.collection").as_deref(), Some("handbook"));
        assert_eq!(i("rag.top_k"), Some(5));
        assert_eq!(
            attr(&span, "rag.retrieval.duration_ms"),
            Some(&AttrValue::Double(12.5))
        );
        assert_eq!(s("rag.evaluation").as_deref(), Some("pass"));
        assert_eq!(s("gen_ai.operation.name").as_deref(), Some("chat"));
        assert_eq!(s("gen_ai.request.model").as_deref(), Some("mistral-7b"));
        assert_eq!(s("gen_ai.response.model").as_deref(), Some("mistral-7b"));
        assert_eq!(i("gen_ai.usage.input_tokens"), Some(9));
        assert_eq!(i("gen_ai.usage.cache_read.input_tokens"), Some(0));
        assert_eq!(
            attr(&span, "gen_ai.response.time_to_first_chunk"),
            Some(&AttrValue::Double(0.1))
        );
        assert_eq!(i("http.response.status_code"), Some(200));
        assert_eq!(s("http.route").as_deref(), Some("/v1/chat/completions"));
        assert_eq!(s("url.path").as_deref(), Some("/v1/chat/completions"));
        assert_eq!(s("server.address").as_deref(), Some("gateway.example"));
        assert_eq!(s("tokentap.tenant").as_deref(), Some("acme"));
        assert_eq!(s("tokentap.backend").as_deref(), Some("vllm_canary"));
        assert_eq!(span.events.len(), 1);
        assert_eq!(span.events[0].time_unix_nanos, 1100 * MS);
        assert_eq!(span.status, SpanStatus::Unset);
    }

    #[test]
    fn failures_set_error_status_and_type_and_unsampled_spans_are_not_queued() {
        let cfg = config();
        let view = FakeView::default()
            .req(":path", "/v1/chat/completions")
            .req(
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00",
            )
            .prop(
                "response.code_details",
                b"upstream_reset_after_response_started{remote_reset}",
            )
            .resp(":status", "200")
            .resp("content-type", "text/event-stream");
        let mut tracer = Tracer::new(
            cfg.tracing.as_ref().unwrap(),
            1,
            ResourceBuilder::new().build(),
        )
        .unwrap();
        let start = tracer.start(&view);
        assert!(!start.sampled, "an unsampled parent is honoured");
        let mut obs = RequestObserver::start(&cfg, &view, &0u64).unwrap();
        obs.response_headers(&cfg, &view, MS);
        let rec = obs.record(&cfg, &view, 2 * MS);
        let mut labeler = Labeler::new(&cfg, Box::new(LocalAdmission::default()));
        let (labels, _) = labeler.labels_of(&rec);
        assert_eq!(tracer.finish(&start, &rec, &labels, &labeler), None);
        assert_eq!(tracer.stats().spans_queued, 0);

        let mut sampled = start.clone();
        sampled.sampled = true;
        let span = build_span(&sampled, &rec, &labels, &labeler, "vllm");
        assert_eq!(
            attr(&span, "error.type").and_then(|v| v.as_str()),
            Some("upstream_reset")
        );
        assert!(matches!(span.status, SpanStatus::Error(_)));
    }

    #[test]
    fn batches_come_out_encoded_after_the_interval() {
        let cfg = config();
        let mut tracer = Tracer::new(
            cfg.tracing.as_ref().unwrap(),
            3,
            ResourceBuilder::new().build(),
        )
        .unwrap();
        let view = FakeView::default().req(":path", "/v1/chat/completions");
        let mut labeler = Labeler::new(&cfg, Box::new(LocalAdmission::default()));
        for _ in 0..3 {
            let start = tracer.start(&view);
            let mut obs = RequestObserver::start(&cfg, &view, &0u64).unwrap();
            let rec = obs.record(&cfg, &view, MS);
            let (labels, _) = labeler.labels_of(&rec);
            assert_eq!(
                tracer.finish(&start, &rec, &labels, &labeler),
                Some(PushOutcome::Queued)
            );
        }
        assert!(tracer.next_export(0).is_none(), "interval not elapsed");
        let (id, body) = tracer.next_export(1000).unwrap();
        assert!(!body.is_empty());
        tracer.on_export_result(id, ExportResult::HttpStatus(200));
        let d = tracer.take_deltas();
        assert_eq!((d.spans_exported, d.exports_ok, d.queue_len), (3, 1, 0));
        assert_eq!(tracer.take_deltas().spans_exported, 0);
    }
}
