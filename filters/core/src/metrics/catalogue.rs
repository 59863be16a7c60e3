//! Every metric family the filter emits, declared once: name, kind, labels,
//! unit, help and (for histograms) bucket bounds. `docs/metrics.md` holds the
//! table [`markdown_table`] renders; a test fails when they drift apart.

use crate::config::Naming;
use crate::host::MetricKind;
use crate::labels::Dimension;
use crate::vocab::{
    self, CacheHit, ErrorType, GenAiTokenType, InjectionResult, ParseErrorKind, RagError,
    RagEvaluation, SpanDropReason, SpanExportResult, TokenSource, TokenType, Unparsed,
};

/// A label of a metric family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LabelKey {
    Dim(Dimension),
    /// HTTP status code.
    Status,
    ErrorType,
    TokenType,
    TokenSource,
    Cache,
    /// Name of a label dimension that overflowed.
    Label,
    ParseErrorKind,
    Unparsed,
    Injection,
    SpanDrop,
    SpanExport,
    RagEvaluation,
    RagError,
    /// `gen_ai.operation.name`: the request's API (`chat`, ...).
    GenAiOperation,
    /// `gen_ai.provider.name`: configured (`metrics.provider_name`).
    GenAiProvider,
    /// `gen_ai.request.model`: the `model` label's value.
    GenAiRequestModel,
    /// `gen_ai.response.model`: the response's `model`, bounded like `model`.
    GenAiResponseModel,
    /// `gen_ai.token.type`.
    GenAiTokenType,
}

impl LabelKey {
    /// The Prometheus label name.
    pub fn name(self) -> &'static str {
        match self {
            LabelKey::Dim(d) => d.label_name(),
            LabelKey::Status => "status",
            LabelKey::ErrorType => "error_type",
            LabelKey::TokenType => "token_type",
            LabelKey::TokenSource => "source",
            LabelKey::Cache => "cache",
            LabelKey::Label => "label",
            LabelKey::ParseErrorKind => "kind",
            LabelKey::Unparsed | LabelKey::SpanDrop | LabelKey::RagError => "reason",
            LabelKey::Injection | LabelKey::SpanExport | LabelKey::RagEvaluation => "result",
            LabelKey::GenAiOperation => "gen_ai_operation_name",
            LabelKey::GenAiProvider => "gen_ai_provider_name",
            LabelKey::GenAiRequestModel => "gen_ai_request_model",
            LabelKey::GenAiResponseModel => "gen_ai_response_model",
            LabelKey::GenAiTokenType => "gen_ai_token_type",
        }
    }

    /// The closed set of values, for labels that have one.
    pub fn values(self) -> Option<Vec<&'static str>> {
        Some(match self {
            LabelKey::Dim(_)
            | LabelKey::Status
            | LabelKey::GenAiOperation
            | LabelKey::GenAiProvider
            | LabelKey::GenAiRequestModel
            | LabelKey::GenAiResponseModel => return None,
            LabelKey::GenAiTokenType => vocab::values::<GenAiTokenType>(),
            LabelKey::ErrorType => vocab::values::<ErrorType>(),
            LabelKey::TokenType => vocab::values::<TokenType>(),
            LabelKey::TokenSource => vocab::values::<TokenSource>(),
            LabelKey::Cache => vocab::values::<CacheHit>(),
            LabelKey::Label => Dimension::ALL.iter().map(|d| d.label_name()).collect(),
            LabelKey::ParseErrorKind => vocab::values::<ParseErrorKind>(),
            LabelKey::Unparsed => vocab::values::<Unparsed>(),
            LabelKey::Injection => vocab::values::<InjectionResult>(),
            LabelKey::SpanDrop => vocab::values::<SpanDropReason>(),
            LabelKey::SpanExport => vocab::values::<SpanExportResult>(),
            LabelKey::RagEvaluation => vocab::values::<RagEvaluation>(),
            LabelKey::RagError => vocab::values::<RagError>(),
        })
    }

    /// Whether the value comes from requests (and collapses to `other` when
    /// the family's series budget is spent).
    pub fn request_derived(self) -> bool {
        matches!(
            self,
            LabelKey::GenAiRequestModel | LabelKey::GenAiResponseModel
        ) || matches!(
            self,
            LabelKey::Dim(
                Dimension::Route
                    | Dimension::Tenant
                    | Dimension::Model
                    | Dimension::Backend
                    | Dimension::Collection
            )
        )
    }
}

const ROUTE: LabelKey = LabelKey::Dim(Dimension::Route);
const TENANT: LabelKey = LabelKey::Dim(Dimension::Tenant);
const MODEL: LabelKey = LabelKey::Dim(Dimension::Model);
const ROUTE_CLASS: LabelKey = LabelKey::Dim(Dimension::RouteClass);
const TEAM: LabelKey = LabelKey::Dim(Dimension::Team);
const BACKEND: LabelKey = LabelKey::Dim(Dimension::Backend);
const COLLECTION: LabelKey = LabelKey::Dim(Dimension::Collection);

/// The workload labels, without tenant: latency and size histograms.
const WORKLOAD: &[LabelKey] = &[ROUTE, MODEL, ROUTE_CLASS, TEAM, BACKEND];
/// Workload labels with the RAG collection.
const WORKLOAD_COLLECTION: &[LabelKey] = &[ROUTE, MODEL, ROUTE_CLASS, TEAM, BACKEND, COLLECTION];

const REQUESTS_BY_STATUS: &[LabelKey] = &[
    ROUTE,
    TENANT,
    MODEL,
    ROUTE_CLASS,
    TEAM,
    BACKEND,
    LabelKey::Status,
];
const ERRORS_BY_TYPE: &[LabelKey] = &[
    ROUTE,
    TENANT,
    MODEL,
    ROUTE_CLASS,
    TEAM,
    BACKEND,
    LabelKey::ErrorType,
];
const TOKENS_BY_TYPE: &[LabelKey] = &[
    ROUTE,
    TENANT,
    MODEL,
    ROUTE_CLASS,
    TEAM,
    BACKEND,
    LabelKey::TokenType,
    LabelKey::TokenSource,
];
const CACHE_HITS: &[LabelKey] = &[
    ROUTE,
    TENANT,
    MODEL,
    ROUTE_CLASS,
    TEAM,
    BACKEND,
    LabelKey::Cache,
];
const RAG_EVALUATIONS: &[LabelKey] = &[
    ROUTE,
    MODEL,
    ROUTE_CLASS,
    TEAM,
    BACKEND,
    COLLECTION,
    LabelKey::RagEvaluation,
];
const RAG_ERRORS: &[LabelKey] = &[
    ROUTE,
    MODEL,
    ROUTE_CLASS,
    TEAM,
    BACKEND,
    COLLECTION,
    LabelKey::RagError,
];

/// The GenAI duration histograms: tokentap's workload labels, then the
/// conventions' attributes in their Prometheus form (`error_type` empty,
/// i.e. absent, on success). Workload first: the `model` tag regex matches
/// the leftmost `model=.=`, which must be the `model` field, not the end of
/// `gen_ai_request_model=.=`.
const GEN_AI_DURATION: &[LabelKey] = &[
    ROUTE,
    MODEL,
    ROUTE_CLASS,
    TEAM,
    BACKEND,
    LabelKey::GenAiOperation,
    LabelKey::GenAiProvider,
    LabelKey::GenAiRequestModel,
    LabelKey::GenAiResponseModel,
    LabelKey::ErrorType,
];
/// The GenAI token-usage histogram.
const GEN_AI_TOKENS: &[LabelKey] = &[
    ROUTE,
    MODEL,
    ROUTE_CLASS,
    TEAM,
    BACKEND,
    LabelKey::GenAiOperation,
    LabelKey::GenAiProvider,
    LabelKey::GenAiRequestModel,
    LabelKey::GenAiResponseModel,
    LabelKey::GenAiTokenType,
];

/// Most labels any family has.
pub const MAX_LABELS: usize = 11;

/// Bucket upper bounds (the `+Inf` bucket is implicit).
const LATENCY_MS: &[u64] = &[
    1, 5, 10, 20, 40, 60, 80, 100, 250, 500, 750, 1000, 2500, 5000, 7500, 10000, 15000, 20000,
    30000, 45000, 60000,
];
const DURATION_MS: &[u64] = &[
    5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 20000, 30000, 60000, 120000, 300000,
];
const PER_TOKEN_MS: &[u64] = &[
    1, 2, 5, 10, 15, 20, 25, 30, 40, 50, 75, 100, 150, 200, 300, 400, 500, 750, 1000, 2500,
];
const TOKENS_PER_S: &[u64] = &[
    1, 2, 5, 10, 20, 30, 40, 50, 75, 100, 150, 200, 300, 500, 1000, 2000,
];
const BYTES: &[u64] = &[
    64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216,
];
const TOKENS: &[u64] = &[1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144];
const RAG_MS: &[u64] = &[1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000];
const SCORE_X100: &[u64] = &[10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 100];
const SOURCES: &[u64] = &[1, 2, 3, 4, 5, 8, 10, 16, 32];
const NONE: &[u64] = &[];

/// GenAI seconds histograms are recorded in microseconds (bounds below are
/// the conventions' seconds x 10^6, exact) and published in seconds.
pub const MICROS_PER_SECOND: u64 = 1_000_000;
/// `gen_ai.server.request.duration` (and `gen_ai.client.operation.duration`):
/// 0.01, 0.02, ... 81.92 s.
const GEN_AI_DURATION_US: &[u64] = &[
    10_000, 20_000, 40_000, 80_000, 160_000, 320_000, 640_000, 1_280_000, 2_560_000, 5_120_000,
    10_240_000, 20_480_000, 40_960_000, 81_920_000,
];
/// `gen_ai.server.time_to_first_token`: the conventions' 0.001 ... 10 s,
/// extended with 15, 20, 30, 45, 60 s as Envoy AI Gateway does.
const GEN_AI_TTFT_US: &[u64] = &[
    1_000, 5_000, 10_000, 20_000, 40_000, 60_000, 80_000, 100_000, 250_000, 500_000, 750_000,
    1_000_000, 2_500_000, 5_000_000, 7_500_000, 10_000_000, 15_000_000, 20_000_000, 30_000_000,
    45_000_000, 60_000_000,
];
/// `gen_ai.server.time_per_output_token`: 0.01 ... 2.5 s.
const GEN_AI_TPOT_US: &[u64] = &[
    10_000, 25_000, 50_000, 75_000, 100_000, 150_000, 200_000, 300_000, 400_000, 500_000, 750_000,
    1_000_000, 2_500_000,
];
/// `gen_ai.client.token.usage`: 1, 4, ... 67108864 tokens.
const GEN_AI_TOKENS_BOUNDS: &[u64] = &[
    1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864,
];

/// One metric family of the catalogue.
#[derive(Clone, Copy, Debug)]
pub struct FamilyDef {
    pub name: &'static str,
    pub kind: MetricKind,
    pub labels: &'static [LabelKey],
    /// Unit, for the documentation.
    pub unit: &'static str,
    pub help: &'static str,
    /// Histogram bucket upper bounds (empty for counters and gauges).
    pub buckets: &'static [u64],
}

macro_rules! families {
    ($($variant:ident => $name:literal, $kind:ident, $labels:expr, $unit:literal, $buckets:expr, $help:literal;)*) => {
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
                        buckets: $buckets,
                    },)*
                }
            }
        }
    };
}

families! {
    RequestsTotal => "llm_gateway_requests_total", Counter, REQUESTS_BY_STATUS, "requests", NONE,
        "LLM requests by route, tenant, workload, backend and HTTP status (recorded when the request ends).";
    ErrorsTotal => "llm_gateway_errors_total", Counter, ERRORS_BY_TYPE, "requests", NONE,
        "Failed LLM requests by error type.";
    TokensTotal => "llm_gateway_tokens_total", Counter, TOKENS_BY_TYPE, "tokens", NONE,
        "Tokens by type and source (usage = reported by the runtime, estimated = counted content events).";
    CacheHitsTotal => "llm_gateway_cache_hits_total", Counter, CACHE_HITS, "requests", NONE,
        "Requests served with a cache hit (prompt = cached_tokens > 0; response = configured cache header).";
    ActiveRequests => "llm_gateway_active_requests", Gauge, &[ROUTE, ROUTE_CLASS, TEAM], "requests", NONE,
        "LLM requests in flight through this proxy.";
    RequestDuration => "llm_gateway_request_duration_milliseconds", Histogram, WORKLOAD, "ms", DURATION_MS,
        "Total request duration, request headers to end of response.";
    TimeToFirstByte => "llm_gateway_time_to_first_byte_milliseconds", Histogram, WORKLOAD, "ms", LATENCY_MS,
        "Request headers to response headers.";
    TimeToFirstToken => "llm_gateway_time_to_first_token_milliseconds", Histogram, WORKLOAD, "ms", LATENCY_MS,
        "Streams only: request headers to the first SSE event carrying generated content.";
    TimePerOutputToken => "llm_gateway_time_per_output_token_milliseconds", Histogram, WORKLOAD, "ms", PER_TOKEN_MS,
        "Streams only: (last token - first token) / (completion tokens - 1).";
    OutputTokensPerSecond => "llm_gateway_output_tokens_per_second", Histogram, WORKLOAD, "tokens/s", TOKENS_PER_S,
        "Completion tokens per second: from the first token to the end for streams, over the whole request otherwise.";
    RequestBytes => "llm_gateway_request_bytes", Histogram, WORKLOAD, "bytes", BYTES,
        "Request body size.";
    ResponseBytes => "llm_gateway_response_bytes", Histogram, WORKLOAD, "bytes", BYTES,
        "Response body size.";
    PromptTokens => "llm_gateway_prompt_tokens", Histogram, WORKLOAD, "tokens", TOKENS,
        "Prompt tokens per request (reported usage only).";
    CompletionTokens => "llm_gateway_completion_tokens", Histogram, WORKLOAD, "tokens", TOKENS,
        "Completion tokens per request (reported or estimated).";
    LabelOverflow => "llm_gateway_label_overflow_total", Counter, &[LabelKey::Label], "values", NONE,
        "Label values collapsed to `other` because they were not allowed or over the cap.";
    SeriesOverflow => "llm_gateway_series_overflow_total", Counter, &[], "series", NONE,
        "Label combinations collapsed because a family reached limits.max_series_per_metric.";
    ParseErrors => "llm_gateway_parse_errors_total", Counter, &[LabelKey::ParseErrorKind], "events", NONE,
        "Malformed input seen (and passed through unharmed).";
    ResponsesUnparsed => "llm_gateway_responses_unparsed_total", Counter, &[LabelKey::Unparsed], "responses", NONE,
        "Successful responses whose body was not read.";
    UsageInjections => "llm_gateway_usage_injections_total", Counter, &[LabelKey::Injection], "requests", NONE,
        "Outcome of the optional include_usage rewrite.";
    RagRetrievalDuration => "llm_rag_retrieval_duration_milliseconds", Histogram, WORKLOAD_COLLECTION, "ms", RAG_MS,
        "Retrieval latency reported by the RAG API (x-rag-retrieval-ms).";
    RagTopScore => "llm_rag_top_score", Histogram, WORKLOAD_COLLECTION, "score x 100", SCORE_X100,
        "Best retrieval score, recorded as score x 100 (integer buckets).";
    RagSources => "llm_rag_sources", Histogram, WORKLOAD_COLLECTION, "sources", SOURCES,
        "Sources passed to the model.";
    RagEvaluations => "llm_rag_evaluations_total", Counter, RAG_EVALUATIONS, "requests", NONE,
        "RAG evaluation results (x-rag-evaluation).";
    RagIndexAge => "llm_rag_index_age_seconds", Gauge, WORKLOAD_COLLECTION, "s", NONE,
        "Index age last reported by the RAG API (x-rag-index-age-seconds); stops changing without traffic.";
    RagIndexLastUpdate => "llm_rag_index_last_update_timestamp_seconds", Gauge, WORKLOAD_COLLECTION, "unix s", NONE,
        "When the index was last updated (request time minus x-rag-index-age-seconds): alert on time() minus it, which keeps ageing without traffic.";
    RagErrors => "llm_rag_errors_total", Counter, RAG_ERRORS, "requests", NONE,
        "Retrieval failures by reason (x-rag-error).";
    SpansExported => "llm_gateway_spans_exported_total", Counter, &[], "spans", NONE,
        "Spans accepted by the collector.";
    SpansDropped => "llm_gateway_spans_dropped_total", Counter, &[LabelKey::SpanDrop], "spans", NONE,
        "Spans dropped, by reason.";
    SpanExports => "llm_gateway_span_exports_total", Counter, &[LabelKey::SpanExport], "requests", NONE,
        "OTLP export calls by result.";
    SpanQueue => "llm_gateway_span_queue_spans", Gauge, &[], "spans", NONE,
        "Spans waiting for export, summed over the proxy's VMs.";
    GenAiRequestDuration => "gen_ai_server_request_duration_seconds", Histogram, GEN_AI_DURATION, "s", GEN_AI_DURATION_US,
        "GenAI naming: `gen_ai.server.request.duration`, as llm_gateway_request_duration_milliseconds (every request, failures with `error_type`).";
    GenAiTimeToFirstToken => "gen_ai_server_time_to_first_token_seconds", Histogram, GEN_AI_DURATION, "s", GEN_AI_TTFT_US,
        "GenAI naming: `gen_ai.server.time_to_first_token`, as llm_gateway_time_to_first_token_milliseconds (streams only).";
    GenAiTimePerOutputToken => "gen_ai_server_time_per_output_token_seconds", Histogram, GEN_AI_DURATION, "s", GEN_AI_TPOT_US,
        "GenAI naming: `gen_ai.server.time_per_output_token`, as llm_gateway_time_per_output_token_milliseconds (streams only).";
    GenAiTokenUsage => "gen_ai_client_token_usage", Histogram, GEN_AI_TOKENS, "tokens", GEN_AI_TOKENS_BOUNDS,
        "GenAI naming: `gen_ai.client.token.usage`, tokens per request and type as reported in `usage` (never estimated).";
}

impl Family {
    /// Whether the family is published under `naming`: the GenAI families
    /// replace tokentap's latency and token histograms; every other family
    /// is published in every naming.
    pub fn published(self, naming: Naming) -> bool {
        use Family::*;
        match self {
            RequestDuration | TimeToFirstToken | TimePerOutputToken | PromptTokens
            | CompletionTokens => naming.llm_gateway(),
            GenAiRequestDuration
            | GenAiTimeToFirstToken
            | GenAiTimePerOutputToken
            | GenAiTokenUsage => naming.gen_ai(),
            _ => true,
        }
    }

    /// Recorded units per published unit: the GenAI seconds histograms are
    /// recorded in microseconds; everything else as published.
    pub fn scale(self) -> u64 {
        use Family::*;
        match self {
            GenAiRequestDuration | GenAiTimeToFirstToken | GenAiTimePerOutputToken => {
                MICROS_PER_SECOND
            }
            _ => 1,
        }
    }

    /// The `le` label of a bucket bound, in the published unit (`0.01`).
    pub fn le(self, bound: u64) -> String {
        let scale = self.scale();
        let whole = bound / scale;
        let frac = bound % scale;
        if frac == 0 {
            return whole.to_string();
        }
        let digits = scale.ilog10() as usize;
        let frac = format!("{frac:0digits$}");
        format!("{whole}.{}", frac.trim_end_matches('0'))
    }
}

/// The catalogue as a Markdown table (kept in `docs/metrics.md`; a test
/// fails when the two drift apart). Closed label sets list their values.
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
        let mut help = d.help.to_string();
        for l in d.labels {
            if let Some(values) = l.values() {
                help.push_str(&format!(" `{}`: {}.", l.name(), values.join(", ")));
            }
        }
        out.push_str(&format!(
            "| `{}` | {} | {} | {} | {} |\n",
            d.name, kind, d.unit, labels, help
        ));
    }
    out
}
