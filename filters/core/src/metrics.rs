//! The metric catalogue and its encoding into Envoy stat names.
//!
//! proxy-wasm metrics have no labels, so each label travels inside the stat
//! name, in Istio's encoding: `key=.=value;.;` fields before the metric name,
//!
//! ```text
//! route=.=chat;.;tenant=.=acme;.;model=.=mistral-7b;.;...;.;llm_gateway_requests_total
//! ```
//!
//! Envoy stores it as `wasmcustom.<that>`; one `stats_tags` regex per label,
//! `(key=\.=(.*?);\.;)`, cuts the field out of the name and turns it into a
//! real tag, so `/stats/prometheus` shows `llm_gateway_requests_total{route=
//! "chat",tenant="acme",...}`. Istio's `extraStatTags` generates exactly those
//! regexes; plain Envoy and Envoy Gateway get them from `envoy/`.
//!
//! Every series is defined once per VM and its id cached by the interned ids
//! of its label values, so the hot path never formats a name twice. Series
//! per family are budgeted; past the budget, request-derived labels collapse
//! to `other` so totals stay right while cardinality stays flat.

use crate::config::Config;
use crate::host::{MetricKind, MetricsHost};
use crate::labels::{
    AdmissionControl, Dimension, FxHashMap, LabelTable, Resolved, ValueId, OVERFLOW, OVERFLOW_ID,
};
use crate::request::{ErrorType, Injection, RequestRecord, UsageSource};

/// A label of a metric family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LabelKey {
    Dim(Dimension),
    /// HTTP status code.
    Status,
    ErrorType,
    /// `prompt`, `completion`, `cached`.
    TokenType,
    /// `usage` or `estimated`.
    Source,
    /// `prompt` (runtime prefix cache) or `response` (cache header).
    Cache,
    /// Name of a label that overflowed.
    Label,
    /// Kind of malformed input.
    Kind,
    /// Reason (unparsed body, RAG error).
    Reason,
    /// Result (usage injection, RAG evaluation).
    Result,
}

impl LabelKey {
    pub fn name(self) -> &'static str {
        match self {
            LabelKey::Dim(d) => d.label_name(),
            LabelKey::Status => "status",
            LabelKey::ErrorType => "error_type",
            LabelKey::TokenType => "token_type",
            LabelKey::Source => "source",
            LabelKey::Cache => "cache",
            LabelKey::Label => "label",
            LabelKey::Kind => "kind",
            LabelKey::Reason => "reason",
            LabelKey::Result => "result",
        }
    }
}

const ROUTE: LabelKey = LabelKey::Dim(Dimension::Route);
const TENANT: LabelKey = LabelKey::Dim(Dimension::Tenant);
const MODEL: LabelKey = LabelKey::Dim(Dimension::Model);
const ROUTE_CLASS: LabelKey = LabelKey::Dim(Dimension::RouteClass);
const TEAM: LabelKey = LabelKey::Dim(Dimension::Team);
const BACKEND: LabelKey = LabelKey::Dim(Dimension::Backend);
const COLLECTION: LabelKey = LabelKey::Dim(Dimension::Collection);

/// Workload labels without tenant (latency/size histograms).
const W: &[LabelKey] = &[ROUTE, MODEL, ROUTE_CLASS, TEAM, BACKEND];
const WT_STATUS: &[LabelKey] = &[
    ROUTE,
    TENANT,
    MODEL,
    ROUTE_CLASS,
    TEAM,
    BACKEND,
    LabelKey::Status,
];
const WT_ERROR: &[LabelKey] = &[
    ROUTE,
    TENANT,
    MODEL,
    ROUTE_CLASS,
    TEAM,
    BACKEND,
    LabelKey::ErrorType,
];
const WT_TOKENS: &[LabelKey] = &[
    ROUTE,
    TENANT,
    MODEL,
    ROUTE_CLASS,
    TEAM,
    BACKEND,
    LabelKey::TokenType,
    LabelKey::Source,
];
const WT_CACHE: &[LabelKey] = &[
    ROUTE,
    TENANT,
    MODEL,
    ROUTE_CLASS,
    TEAM,
    BACKEND,
    LabelKey::Cache,
];
const W_RAG: &[LabelKey] = &[ROUTE, MODEL, ROUTE_CLASS, TEAM, BACKEND, COLLECTION];
const W_RAG_RESULT: &[LabelKey] = &[
    ROUTE,
    MODEL,
    ROUTE_CLASS,
    TEAM,
    BACKEND,
    COLLECTION,
    LabelKey::Result,
];
const W_RAG_REASON: &[LabelKey] = &[
    ROUTE,
    MODEL,
    ROUTE_CLASS,
    TEAM,
    BACKEND,
    COLLECTION,
    LabelKey::Reason,
];

/// Most labels any family has.
pub const MAX_LABELS: usize = 8;

/// One metric family of the catalogue.
#[derive(Clone, Copy, Debug)]
pub struct FamilyDef {
    pub name: &'static str,
    pub kind: MetricKind,
    pub labels: &'static [LabelKey],
    /// Unit, for the documentation.
    pub unit: &'static str,
    pub help: &'static str,
}

macro_rules! families {
    ($($variant:ident => $name:literal, $kind:ident, $labels:expr, $unit:literal, $help:literal;)*) => {
        /// Every metric family the filter emits.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum Family { $($variant,)* }

        impl Family {
            pub const ALL: &'static [Family] = &[$(Family::$variant,)*];

            pub fn def(self) -> FamilyDef {
                match self {
                    $(Family::$variant => FamilyDef {
                        name: $name,
                        kind: MetricKind::$kind,
                        labels: $labels,
                        unit: $unit,
                        help: $help,
                    },)*
                }
            }
        }
    };
}

families! {
    RequestsTotal => "llm_gateway_requests_total", Counter, WT_STATUS, "requests",
        "LLM requests by route, tenant, workload, backend and HTTP status (recorded at access-log time).";
    ErrorsTotal => "llm_gateway_errors_total", Counter, WT_ERROR, "requests",
        "Failed LLM requests by error type.";
    TokensTotal => "llm_gateway_tokens_total", Counter, WT_TOKENS, "tokens",
        "Tokens by type (prompt, completion, cached) and source (usage = reported by the runtime, estimated = counted content events).";
    CacheHitsTotal => "llm_gateway_cache_hits_total", Counter, WT_CACHE, "requests",
        "Requests served with a cache hit (prompt = cached_tokens > 0; response = configured cache header).";
    ActiveRequests => "llm_gateway_active_requests", Gauge, &[ROUTE, ROUTE_CLASS, TEAM], "requests",
        "LLM requests in flight through this proxy.";
    RequestDuration => "llm_gateway_request_duration_milliseconds", Histogram, W, "ms",
        "Total request duration, request headers to end of response.";
    TimeToFirstByte => "llm_gateway_time_to_first_byte_milliseconds", Histogram, W, "ms",
        "Request headers to response headers.";
    TimeToFirstToken => "llm_gateway_time_to_first_token_milliseconds", Histogram, W, "ms",
        "Streams only: request headers to the first SSE event carrying generated content.";
    TimePerOutputToken => "llm_gateway_time_per_output_token_milliseconds", Histogram, W, "ms",
        "Streams only: (last token - first token) / (completion tokens - 1).";
    OutputTokensPerSecond => "llm_gateway_output_tokens_per_second", Histogram, W, "tokens/s",
        "Completion tokens per second: from the first token to the end for streams, over the whole request otherwise.";
    RequestBytes => "llm_gateway_request_bytes", Histogram, W, "bytes",
        "Request body size.";
    ResponseBytes => "llm_gateway_response_bytes", Histogram, W, "bytes",
        "Response body size.";
    PromptTokens => "llm_gateway_prompt_tokens", Histogram, W, "tokens",
        "Prompt tokens per request (reported usage only).";
    CompletionTokens => "llm_gateway_completion_tokens", Histogram, W, "tokens",
        "Completion tokens per request (reported or estimated).";
    LabelOverflow => "llm_gateway_label_overflow_total", Counter, &[LabelKey::Label], "values",
        "Label values collapsed to `other` because they were not allowed or over the cap.";
    SeriesOverflow => "llm_gateway_series_overflow_total", Counter, &[], "series",
        "Label combinations collapsed because a family reached limits.max_series_per_metric.";
    ParseErrors => "llm_gateway_parse_errors_total", Counter, &[LabelKey::Kind], "events",
        "Malformed input seen (and passed through unharmed): request_json, response_json, sse_event, rag_header.";
    ResponsesUnparsed => "llm_gateway_responses_unparsed_total", Counter, &[LabelKey::Reason], "responses",
        "Successful responses whose body was not read: compressed, content_type.";
    UsageInjections => "llm_gateway_usage_injections_total", Counter, &[LabelKey::Result], "requests",
        "Outcome of the optional include_usage rewrite: injected, not_needed, too_large, invalid.";
    RagRetrievalDuration => "llm_rag_retrieval_duration_milliseconds", Histogram, W_RAG, "ms",
        "Retrieval latency reported by the RAG API (x-rag-retrieval-ms).";
    RagTopScore => "llm_rag_top_score", Histogram, W_RAG, "score x 100",
        "Best retrieval score, recorded as score x 100 (Envoy histograms take integers).";
    RagSources => "llm_rag_sources", Histogram, W_RAG, "sources",
        "Sources passed to the model.";
    RagEvaluations => "llm_rag_evaluations_total", Counter, W_RAG_RESULT, "requests",
        "RAG evaluation results: pass, fail, skipped, other.";
    RagIndexAge => "llm_rag_index_age_seconds", Gauge, W_RAG, "s",
        "Index age last reported by the RAG API (x-rag-index-age-seconds).";
    RagErrors => "llm_rag_errors_total", Counter, W_RAG_REASON, "requests",
        "Retrieval failures by reason (x-rag-error).";
    SpansExported => "llm_gateway_spans_exported_total", Counter, &[], "spans",
        "Spans accepted by the collector.";
    SpansDropped => "llm_gateway_spans_dropped_total", Counter, &[LabelKey::Reason], "spans",
        "Spans dropped: queue_full, export_failed, dispatch_failed.";
    SpanExports => "llm_gateway_span_exports_total", Counter, &[LabelKey::Result], "requests",
        "OTLP export calls by result: ok, http_error, failed.";
    SpanQueue => "llm_gateway_span_queue_spans", Gauge, &[], "spans",
        "Spans waiting for export in this VM.";
}

/// The catalogue as a Markdown table (kept in `docs/metrics.md`; a test
/// fails when the two drift apart).
pub fn markdown_table() -> String {
    let mut out =
        String::from("| name | type | unit | labels | what and when |\n|---|---|---|---|---|\n");
    for f in Family::ALL {
        let d = f.def();
        let kind = match d.kind {
            MetricKind::Counter => "counter",
            MetricKind::Gauge => "gauge",
            MetricKind::Histogram => "histogram",
        };
        let labels: Vec<&str> = d.labels.iter().map(|l| l.name()).collect();
        let labels = if labels.is_empty() {
            "—".to_string()
        } else {
            format!("`{}`", labels.join("`, `"))
        };
        out.push_str(&format!(
            "| `{}` | {} | {} | {} | {} |\n",
            d.name, kind, d.unit, labels, d.help
        ));
    }
    out
}

/// A label value for one series: its interned id and its text.
#[derive(Clone, Copy, Debug)]
pub struct LabelValue<'a> {
    pub id: u16,
    pub text: &'a str,
}

/// Label values of one request after admission.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequestLabels {
    pub route: ValueId,
    pub tenant: ValueId,
    pub model: ValueId,
    pub route_class: ValueId,
    pub team: ValueId,
    pub backend: ValueId,
    pub collection: ValueId,
}

impl RequestLabels {
    fn get(&self, d: Dimension) -> ValueId {
        match d {
            Dimension::Route => self.route,
            Dimension::Tenant => self.tenant,
            Dimension::Model => self.model,
            Dimension::RouteClass => self.route_class,
            Dimension::Team => self.team,
            Dimension::Backend => self.backend,
            Dimension::Collection => self.collection,
        }
    }
}

/// Owns the label tables and the admission control of one VM.
pub struct Labeler {
    tables: Vec<LabelTable>,
    admission: Box<dyn AdmissionControl>,
}

impl Labeler {
    pub fn new(config: &Config, admission: Box<dyn AdmissionControl>) -> Self {
        let tables = Dimension::ALL
            .iter()
            .map(|&d| {
                let adm = config
                    .admissions
                    .get(&d)
                    .cloned()
                    .unwrap_or(crate::labels::Admission::Static(Vec::new()));
                LabelTable::new(d, adm, config.max_value_length)
            })
            .collect();
        Self { tables, admission }
    }

    fn table(&self, d: Dimension) -> &LabelTable {
        // `tables` is built from `Dimension::ALL`, in order.
        &self.tables[d as usize]
    }

    pub fn text(&self, d: Dimension, id: ValueId) -> &str {
        self.table(d).value(id)
    }

    /// Resolves a raw value, reporting an overflow to `overflowed`.
    pub fn resolve(
        &mut self,
        d: Dimension,
        raw: Option<&[u8]>,
        overflowed: &mut Vec<Dimension>,
    ) -> ValueId {
        let table = &mut self.tables[d as usize];
        let r: Resolved = table.resolve(raw, self.admission.as_mut());
        if r.overflowed {
            overflowed.push(d);
        }
        r.id
    }

    /// Labels of the in-flight gauge, known at request headers.
    pub fn start_labels(
        &mut self,
        config: &Config,
        route_name: Option<&[u8]>,
        overflowed: &mut Vec<Dimension>,
    ) -> RequestLabels {
        let route = self.resolve(
            Dimension::Route,
            route_name.map(|r| config.route_label(r)),
            overflowed,
        );
        let route_str = route_name.and_then(|r| std::str::from_utf8(r).ok());
        let w = config.workload_for(route_str, None);
        RequestLabels {
            route,
            route_class: self.resolve(
                Dimension::RouteClass,
                w.route_class.as_deref().map(str::as_bytes),
                overflowed,
            ),
            team: self.resolve(
                Dimension::Team,
                w.team.as_deref().map(str::as_bytes),
                overflowed,
            ),
            ..RequestLabels::default()
        }
    }

    /// All labels of a finished request.
    pub fn request_labels(
        &mut self,
        rec: &RequestRecord,
        overflowed: &mut Vec<Dimension>,
    ) -> RequestLabels {
        let model = rec.request_model.as_ref().or(rec.response_model.as_ref());
        RequestLabels {
            route: self.resolve(Dimension::Route, rec.route_label.as_deref(), overflowed),
            tenant: self.resolve(Dimension::Tenant, rec.tenant.as_deref(), overflowed),
            model: self.resolve(Dimension::Model, model.map(|m| m.as_bytes()), overflowed),
            route_class: self.resolve(
                Dimension::RouteClass,
                rec.route_class.as_deref().map(str::as_bytes),
                overflowed,
            ),
            team: self.resolve(
                Dimension::Team,
                rec.team.as_deref().map(str::as_bytes),
                overflowed,
            ),
            backend: self.resolve(Dimension::Backend, rec.backend_label.as_deref(), overflowed),
            collection: self.resolve(
                Dimension::Collection,
                rec.rag_collection.as_deref().map(str::as_bytes),
                overflowed,
            ),
        }
    }
}

/// Appends the stat name of a series: fields first, then the metric name.
pub fn encode_stat_name(out: &mut String, name: &str, labels: &[(&str, &str)]) {
    for (k, v) in labels {
        out.push_str(k);
        out.push_str("=.=");
        out.push_str(v);
        out.push_str(";.;");
    }
    out.push_str(name);
}

type SeriesKey = (u8, [u16; MAX_LABELS]);

/// Defines, caches and updates series through a [`MetricsHost`].
pub struct MetricsRecorder<H> {
    host: H,
    series: FxHashMap<SeriesKey, u32>,
    per_family: [u32; 64],
    max_series_per_family: u32,
    name_buf: String,
    /// Host calls that failed (for the shell's one-time log).
    pub host_errors: u64,
}

/// Non-dimension label values: small enums with fixed texts.
fn enum_text(key: LabelKey, id: u16) -> &'static str {
    match key {
        LabelKey::ErrorType => ErrorType::ALL
            .get(id as usize)
            .map(|e| e.as_str())
            .unwrap_or(OVERFLOW),
        LabelKey::TokenType => ["prompt", "completion", "cached"]
            .get(id as usize)
            .copied()
            .unwrap_or(OVERFLOW),
        LabelKey::Source => ["usage", "estimated"]
            .get(id as usize)
            .copied()
            .unwrap_or(OVERFLOW),
        LabelKey::Cache => ["prompt", "response"]
            .get(id as usize)
            .copied()
            .unwrap_or(OVERFLOW),
        _ => OVERFLOW,
    }
}

/// A series to update: the family plus one value per label of the family.
pub struct Series<'a> {
    pub family: Family,
    /// (id, text) per label, in the family's label order.
    pub values: &'a [LabelValue<'a>],
}

impl<H: MetricsHost> MetricsRecorder<H> {
    pub fn new(host: H, max_series_per_family: u32) -> Self {
        Self {
            host,
            series: FxHashMap::default(),
            per_family: [0; 64],
            max_series_per_family,
            name_buf: String::with_capacity(256),
            host_errors: 0,
        }
    }

    pub fn host(&self) -> &H {
        &self.host
    }

    pub fn host_mut(&mut self) -> &mut H {
        &mut self.host
    }

    /// Distinct series defined so far, across families.
    pub fn series_count(&self) -> usize {
        self.series.len()
    }

    /// The metric id of a series, defining it on first use. Returns the id
    /// and whether the series had to collapse because of the budget.
    fn id_for(&mut self, s: &Series<'_>) -> Option<(u32, bool)> {
        let def = s.family.def();
        let mut key: SeriesKey = (s.family as u8, [0; MAX_LABELS]);
        for (i, v) in s.values.iter().enumerate().take(MAX_LABELS) {
            key.1[i] = v.id;
        }
        if let Some(&id) = self.series.get(&key) {
            return Some((id, false));
        }
        let fam = s.family as usize;
        let mut collapsed = false;
        let mut texts: [&str; MAX_LABELS] = [""; MAX_LABELS];
        for (i, v) in s.values.iter().enumerate().take(MAX_LABELS) {
            texts[i] = v.text;
        }
        if self.per_family[fam] >= self.max_series_per_family {
            // Collapse the request-derived labels; that series is always allowed.
            collapsed = true;
            for (i, l) in def.labels.iter().enumerate().take(MAX_LABELS) {
                if matches!(
                    l,
                    LabelKey::Dim(
                        Dimension::Route
                            | Dimension::Tenant
                            | Dimension::Model
                            | Dimension::Backend
                            | Dimension::Collection
                    )
                ) {
                    key.1[i] = OVERFLOW_ID;
                    texts[i] = OVERFLOW;
                }
            }
            if let Some(&id) = self.series.get(&key) {
                return Some((id, true));
            }
        }
        self.name_buf.clear();
        let pairs: Vec<(&str, &str)> = def
            .labels
            .iter()
            .zip(texts.iter())
            .map(|(l, t)| (l.name(), *t))
            .collect();
        encode_stat_name(&mut self.name_buf, def.name, &pairs);
        match self.host.define(def.kind, &self.name_buf) {
            Ok(id) => {
                self.series.insert(key, id);
                if !collapsed {
                    self.per_family[fam] += 1;
                }
                Some((id, collapsed))
            }
            Err(_) => {
                self.host_errors += 1;
                None
            }
        }
    }

    fn note_collapse(&mut self, collapsed: bool) {
        if collapsed {
            self.add(
                &Series {
                    family: Family::SeriesOverflow,
                    values: &[],
                },
                1,
            );
        }
    }

    /// Adds `delta` to a counter or gauge.
    pub fn add(&mut self, s: &Series<'_>, delta: i64) {
        if let Some((id, collapsed)) = self.id_for(s) {
            if self.host.increment(id, delta).is_err() {
                self.host_errors += 1;
            }
            if collapsed && s.family != Family::SeriesOverflow {
                self.note_collapse(true);
            }
        }
    }

    /// Records a histogram sample, or sets a gauge.
    pub fn record(&mut self, s: &Series<'_>, value: u64) {
        if let Some((id, collapsed)) = self.id_for(s) {
            if self.host.record(id, value).is_err() {
                self.host_errors += 1;
            }
            self.note_collapse(collapsed);
        }
    }

    /// Counts a label overflow.
    pub fn label_overflow(&mut self, d: Dimension) {
        let v = [LabelValue {
            id: d as u16,
            text: d.label_name(),
        }];
        self.add(
            &Series {
                family: Family::LabelOverflow,
                values: &v,
            },
            1,
        );
    }

    /// Adds to a family whose only label is a fixed text (`kind`, `reason`, `result`).
    pub fn add_tagged(&mut self, family: Family, tag_id: u16, tag: &str, delta: i64) {
        let v = [LabelValue {
            id: tag_id,
            text: tag,
        }];
        self.add(&Series { family, values: &v }, delta);
    }

    /// Adds to a family with no labels.
    pub fn add_plain(&mut self, family: Family, delta: i64) {
        self.add(
            &Series {
                family,
                values: &[],
            },
            delta,
        );
    }

    /// Sets a gauge with no labels.
    pub fn set_plain(&mut self, family: Family, value: u64) {
        self.record(
            &Series {
                family,
                values: &[],
            },
            value,
        );
    }

    /// Emits every metric of a finished request.
    pub fn record_request(
        &mut self,
        rec: &RequestRecord,
        labels: &RequestLabels,
        labeler: &Labeler,
    ) {
        let dim_value = |d: Dimension| LabelValue {
            id: labels.get(d),
            text: labeler.text(d, labels.get(d)),
        };
        let w = [
            dim_value(Dimension::Route),
            dim_value(Dimension::Model),
            dim_value(Dimension::RouteClass),
            dim_value(Dimension::Team),
            dim_value(Dimension::Backend),
        ];
        let wt = [
            dim_value(Dimension::Route),
            dim_value(Dimension::Tenant),
            dim_value(Dimension::Model),
            dim_value(Dimension::RouteClass),
            dim_value(Dimension::Team),
            dim_value(Dimension::Backend),
        ];
        let with = |extra: &[LabelValue<'static>]| -> Vec<LabelValue<'_>> {
            let mut v: Vec<LabelValue<'_>> = wt.to_vec();
            v.extend_from_slice(extra);
            v
        };

        // Requests by status.
        let mut status_buf = [0u8; 3];
        let status_text = status_text(rec.status, &mut status_buf);
        let status_id = rec.status.filter(|s| (100..600).contains(s)).unwrap_or(0);
        let mut v: Vec<LabelValue<'_>> = wt.to_vec();
        v.push(LabelValue {
            id: status_id,
            text: status_text,
        });
        self.add(
            &Series {
                family: Family::RequestsTotal,
                values: &v,
            },
            1,
        );

        if let Some(e) = rec.error {
            let v = with(&[LabelValue {
                id: e as u16,
                text: enum_text(LabelKey::ErrorType, e as u16),
            }]);
            self.add(
                &Series {
                    family: Family::ErrorsTotal,
                    values: &v,
                },
                1,
            );
        }

        // Tokens.
        let source = match rec.usage_source {
            UsageSource::Reported => Some(0u16),
            UsageSource::Estimated => Some(1),
            UsageSource::None => None,
        };
        if let Some(src) = source {
            let counts = [
                (0u16, rec.usage.prompt_tokens),
                (1, rec.completion_tokens()),
                (2, rec.usage.cached_tokens),
            ];
            for (tt, n) in counts {
                if let Some(n) = n.filter(|n| *n > 0) {
                    let v = with(&[
                        LabelValue {
                            id: tt,
                            text: enum_text(LabelKey::TokenType, tt),
                        },
                        LabelValue {
                            id: src,
                            text: enum_text(LabelKey::Source, src),
                        },
                    ]);
                    self.add(
                        &Series {
                            family: Family::TokensTotal,
                            values: &v,
                        },
                        n.min(i64::MAX as u64) as i64,
                    );
                }
            }
        }
        if let Some(hit) = rec.cache_hit {
            let id = hit as u16;
            let v = with(&[LabelValue {
                id,
                text: hit.as_str(),
            }]);
            self.add(
                &Series {
                    family: Family::CacheHitsTotal,
                    values: &v,
                },
                1,
            );
        }

        // Latency and size histograms.
        let hist = |fam: Family| Series {
            family: fam,
            values: &w,
        };
        let mut samples: Vec<(Family, u64)> = vec![
            (Family::RequestDuration, rec.duration_ms()),
            (Family::RequestBytes, rec.request_bytes),
            (Family::ResponseBytes, rec.response_bytes),
        ];
        if let Some(v) = rec.ttfb_ms() {
            samples.push((Family::TimeToFirstByte, v));
        }
        if let Some(v) = rec.ttft_ms() {
            samples.push((Family::TimeToFirstToken, v));
        }
        if let Some(v) = rec.tpot_ms() {
            samples.push((Family::TimePerOutputToken, v));
        }
        if let Some(v) = rec.output_tokens_per_second() {
            samples.push((Family::OutputTokensPerSecond, v));
        }
        if rec.usage_source == UsageSource::Reported {
            if let Some(p) = rec.usage.prompt_tokens {
                samples.push((Family::PromptTokens, p));
            }
        }
        if let Some(c) = rec.completion_tokens() {
            samples.push((Family::CompletionTokens, c));
        }
        for (fam, value) in samples {
            self.record(&hist(fam), value);
        }

        // Malformed input and unparsed bodies.
        let p = &rec.problems;
        if p.request_json {
            self.add_tagged(Family::ParseErrors, 0, "request_json", 1);
        }
        if p.response_json {
            self.add_tagged(Family::ParseErrors, 1, "response_json", 1);
        }
        if p.sse_events > 0 {
            self.add_tagged(Family::ParseErrors, 2, "sse_event", p.sse_events as i64);
        }
        if p.rag_headers > 0 {
            self.add_tagged(Family::ParseErrors, 3, "rag_header", p.rag_headers as i64);
        }
        if let Some(u) = rec.unparsed {
            self.add_tagged(Family::ResponsesUnparsed, u as u16, u.as_str(), 1);
        }
        let inj = match rec.injection {
            Injection::NotAttempted => None,
            Injection::Injected => Some((0, "injected")),
            Injection::NotNeeded => Some((1, "not_needed")),
            Injection::TooLarge => Some((2, "too_large")),
            Injection::Invalid => Some((3, "invalid")),
        };
        if let Some((id, text)) = inj {
            self.add_tagged(Family::UsageInjections, id, text, 1);
        }

        // RAG signals.
        let rag = &rec.rag;
        if rag.present() || rec.rag_collection.is_some() {
            let mut wr: Vec<LabelValue<'_>> = w.to_vec();
            wr.push(dim_value(Dimension::Collection));
            if let Some(ms) = rag.retrieval_ms {
                self.record(
                    &Series {
                        family: Family::RagRetrievalDuration,
                        values: &wr,
                    },
                    ms.round() as u64,
                );
            }
            if let Some(score) = rag.top_score {
                self.record(
                    &Series {
                        family: Family::RagTopScore,
                        values: &wr,
                    },
                    (score * 100.0).round() as u64,
                );
            }
            if let Some(n) = rag.sources {
                self.record(
                    &Series {
                        family: Family::RagSources,
                        values: &wr,
                    },
                    n,
                );
            }
            if let Some(age) = rag.index_age_seconds {
                self.record(
                    &Series {
                        family: Family::RagIndexAge,
                        values: &wr,
                    },
                    age.round() as u64,
                );
            }
            if let Some(result) = rag.evaluation {
                let mut v = wr.clone();
                v.push(LabelValue {
                    id: rag_index(&crate::rag::EVALUATIONS, result),
                    text: result,
                });
                self.add(
                    &Series {
                        family: Family::RagEvaluations,
                        values: &v,
                    },
                    1,
                );
            }
            if let Some(reason) = rag.error {
                let mut v = wr.clone();
                v.push(LabelValue {
                    id: rag_index(&crate::rag::ERROR_REASONS, reason),
                    text: reason,
                });
                self.add(
                    &Series {
                        family: Family::RagErrors,
                        values: &v,
                    },
                    1,
                );
            }
        }
    }

    /// Changes the in-flight gauge.
    pub fn active(&mut self, labels: &RequestLabels, labeler: &Labeler, delta: i64) {
        let v = [
            LabelValue {
                id: labels.route,
                text: labeler.text(Dimension::Route, labels.route),
            },
            LabelValue {
                id: labels.route_class,
                text: labeler.text(Dimension::RouteClass, labels.route_class),
            },
            LabelValue {
                id: labels.team,
                text: labeler.text(Dimension::Team, labels.team),
            },
        ];
        self.add(
            &Series {
                family: Family::ActiveRequests,
                values: &v,
            },
            delta,
        );
    }
}

fn rag_index(set: &[&str], v: &str) -> u16 {
    set.iter()
        .position(|s| *s == v)
        .map(|i| i as u16 + 2)
        .unwrap_or(OVERFLOW_ID)
}

fn status_text(status: Option<u16>, buf: &mut [u8; 3]) -> &str {
    match status.filter(|s| (100..600).contains(s)) {
        Some(s) => {
            buf[0] = b'0' + (s / 100) as u8;
            buf[1] = b'0' + (s / 10 % 10) as u8;
            buf[2] = b'0' + (s % 10) as u8;
            std::str::from_utf8(buf).unwrap_or(OVERFLOW)
        }
        None if status.is_none() => crate::labels::UNKNOWN,
        None => OVERFLOW,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::HostError;
    use crate::labels::LocalAdmission;
    use crate::request::tests::FakeView;
    use crate::request::RequestObserver;
    use std::collections::HashMap;

    /// Envoy's stats as far as the filter can see them: names and values.
    #[derive(Default)]
    pub(crate) struct FakeStats {
        pub names: Vec<(MetricKind, String)>,
        pub values: HashMap<u32, i64>,
        pub samples: HashMap<u32, Vec<u64>>,
    }

    impl MetricsHost for FakeStats {
        fn define(&mut self, kind: MetricKind, name: &str) -> Result<u32, HostError> {
            self.names.push((kind, name.to_string()));
            Ok(self.names.len() as u32 - 1)
        }
        fn increment(&mut self, id: u32, delta: i64) -> Result<(), HostError> {
            *self.values.entry(id).or_default() += delta;
            Ok(())
        }
        fn record(&mut self, id: u32, value: u64) -> Result<(), HostError> {
            self.samples.entry(id).or_default().push(value);
            Ok(())
        }
    }

    impl FakeStats {
        fn id(&self, name: &str) -> Option<u32> {
            self.names
                .iter()
                .position(|(_, n)| n == name)
                .map(|i| i as u32)
        }
        pub fn counter(&self, name: &str) -> i64 {
            self.id(name)
                .and_then(|i| self.values.get(&i).copied())
                .unwrap_or(0)
        }
        pub fn samples(&self, name: &str) -> Vec<u64> {
            self.id(name)
                .and_then(|i| self.samples.get(&i).cloned())
                .unwrap_or_default()
        }
    }

    const MS: u64 = 1_000_000;

    fn config() -> Config {
        Config::parse(
            br#"{"tenant":{"header":"x-tenant-id","max_values":3},"models":["mistral-7b"],
                 "routes":{"chat":{"route_class":"interactive","team":"platform-ai"}},
                 "defaults":{"model":"mistral-7b"}}"#,
        )
        .unwrap()
    }

    fn finished(tenant: &str, status: &str) -> RequestRecord {
        let cfg = config();
        let view = FakeView::default()
            .req(":path", "/v1/chat/completions")
            .req(":method", "POST")
            .req("x-tenant-id", tenant)
            .prop("xds.route_name", b"chat")
            .prop("xds.cluster_name", b"vllm_stable")
            .prop("response.code_details", b"via_upstream")
            .resp(":status", status)
            .resp("content-type", "application/json");
        let mut obs = RequestObserver::start(&cfg, &view, 0).unwrap();
        obs.request_body(br#"{"model":"mistral-7b","messages":[]}"#, true);
        obs.response_headers(&cfg, &view, 40 * MS);
        obs.response_body(
            br#"{"model":"mistral-7b","usage":{"prompt_tokens":11,"completion_tokens":5,"total_tokens":16}}"#,
            50 * MS,
        );
        obs.record_final(&cfg, &view, 55 * MS)
    }

    const LABELS: &str = "route=.=chat;.;tenant=.=acme;.;model=.=mistral-7b;.;route_class=.=interactive;.;team=.=platform-ai;.;backend=.=vllm_stable;.;";

    #[test]
    fn stat_names_carry_every_label_in_istio_encoding() {
        let cfg = config();
        let mut labeler = Labeler::new(&cfg, Box::new(LocalAdmission::default()));
        let mut rec = MetricsRecorder::new(FakeStats::default(), 100);
        let r = finished("acme", "200");
        let mut over = Vec::new();
        let labels = labeler.request_labels(&r, &mut over);
        assert!(over.is_empty());
        rec.record_request(&r, &labels, &labeler);
        let stats = rec.host();
        assert_eq!(
            stats.counter(&format!(
                "{LABELS}status=.=200;.;llm_gateway_requests_total"
            )),
            1
        );
        assert_eq!(
            stats.counter(&format!(
                "{LABELS}token_type=.=prompt;.;source=.=usage;.;llm_gateway_tokens_total"
            )),
            11
        );
        assert_eq!(
            stats.counter(&format!(
                "{LABELS}token_type=.=completion;.;source=.=usage;.;llm_gateway_tokens_total"
            )),
            5
        );
        let w = "route=.=chat;.;model=.=mistral-7b;.;route_class=.=interactive;.;team=.=platform-ai;.;backend=.=vllm_stable;.;";
        assert_eq!(
            stats.samples(&format!("{w}llm_gateway_request_duration_milliseconds")),
            vec![55]
        );
        assert_eq!(
            stats.samples(&format!("{w}llm_gateway_time_to_first_byte_milliseconds")),
            vec![40]
        );
        // A non-streamed response has no time to first token.
        assert!(stats
            .samples(&format!("{w}llm_gateway_time_to_first_token_milliseconds"))
            .is_empty());
        // Series are defined once and reused.
        let before = rec.series_count();
        rec.record_request(&r, &labels, &labeler);
        assert_eq!(rec.series_count(), before);
        assert_eq!(
            rec.host().counter(&format!(
                "{LABELS}status=.=200;.;llm_gateway_requests_total"
            )),
            2
        );
    }

    #[test]
    fn errors_are_labelled_by_type() {
        let cfg = config();
        let mut labeler = Labeler::new(&cfg, Box::new(LocalAdmission::default()));
        let mut rec = MetricsRecorder::new(FakeStats::default(), 100);
        let r = finished("acme", "503");
        let mut over = Vec::new();
        let labels = labeler.request_labels(&r, &mut over);
        rec.record_request(&r, &labels, &labeler);
        assert_eq!(
            rec.host().counter(&format!(
                "{LABELS}error_type=.=upstream_5xx;.;llm_gateway_errors_total"
            )),
            1
        );
    }

    #[test]
    fn tenant_flood_stays_within_the_cap() {
        let cfg = config();
        let mut labeler = Labeler::new(&cfg, Box::new(LocalAdmission::default()));
        let mut rec = MetricsRecorder::new(FakeStats::default(), 10_000);
        let mut overflow = 0;
        for i in 0..2000 {
            let r = finished(&format!("tenant-{i}"), "200");
            let mut over = Vec::new();
            let labels = labeler.request_labels(&r, &mut over);
            overflow += over.len();
            for d in over {
                rec.label_overflow(d);
            }
            rec.record_request(&r, &labels, &labeler);
        }
        let tenants: std::collections::BTreeSet<String> = rec
            .host()
            .names
            .iter()
            .filter(|(_, n)| n.ends_with("llm_gateway_requests_total"))
            .map(|(_, n)| n.split(";.;").nth(1).unwrap_or("").to_string())
            .collect();
        // cap (3) + other
        assert_eq!(tenants.len(), 4, "{tenants:?}");
        assert!(tenants.contains("tenant=.=other"));
        assert_eq!(overflow, 2000 - 3);
        assert_eq!(
            rec.host()
                .counter("label=.=tenant;.;llm_gateway_label_overflow_total"),
            (2000 - 3) as i64
        );
    }

    #[test]
    fn series_budget_collapses_request_labels_and_counts_it() {
        let cfg = Config::parse(
            br#"{"tenant":{"header":"x-tenant-id","max_values":1000},"limits":{"max_series_per_metric":10}}"#,
        )
        .unwrap();
        let mut labeler = Labeler::new(&cfg, Box::new(LocalAdmission::default()));
        let mut rec = MetricsRecorder::new(FakeStats::default(), cfg.max_series_per_metric);
        for i in 0..50 {
            let r = finished(&format!("t{i}"), "200");
            let mut over = Vec::new();
            let labels = labeler.request_labels(&r, &mut over);
            rec.record_request(&r, &labels, &labeler);
        }
        let requests: Vec<&String> = rec
            .host()
            .names
            .iter()
            .map(|(_, n)| n)
            .filter(|n| n.ends_with("llm_gateway_requests_total"))
            .collect();
        assert_eq!(requests.len(), 11, "10 series plus the collapsed one");
        let total: i64 = requests.iter().map(|n| rec.host().counter(n)).sum();
        assert_eq!(total, 50, "no request is lost");
        assert!(requests.iter().any(|n| n
            .starts_with("route=.=other;.;tenant=.=other;.;model=.=other;.;")
            && n.ends_with("backend=.=other;.;status=.=200;.;llm_gateway_requests_total")));
        // requests_total: 40 collapsed; tokens_total (prompt + completion per
        // tenant): 5 tenants fit in 10 series, 45 x 2 collapsed.
        assert_eq!(
            rec.host().counter("llm_gateway_series_overflow_total"),
            40 + 90
        );
    }

    #[test]
    fn docs_metrics_md_holds_the_current_catalogue() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/metrics.md");
        let doc = std::fs::read_to_string(path).unwrap();
        let table = markdown_table();
        assert!(
            doc.contains(&table),
            "docs/metrics.md is out of date; replace its gateway table with:\n{table}"
        );
    }

    #[test]
    fn every_family_name_follows_prometheus_conventions() {
        for f in Family::ALL {
            let d = f.def();
            assert!(d.name.starts_with("llm_gateway_") || d.name.starts_with("llm_rag_"));
            if d.kind == MetricKind::Counter {
                assert!(d.name.ends_with("_total"), "{}", d.name);
            } else {
                assert!(!d.name.ends_with("_total"), "{}", d.name);
            }
            assert!(d.labels.len() <= MAX_LABELS);
        }
    }
}
