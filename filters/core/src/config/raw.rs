//! The configuration document as operators write it: serde types with
//! their defaults. `compile.rs` validates it into [`super::Config`].

use std::collections::BTreeMap;

use serde::Deserialize;

use super::Operation;

/// An extra LLM path: a string, or `{ "path": ..., "operation": ... }`.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum LlmPathSpec {
    Path(String),
    Detailed {
        path: String,
        #[serde(default)]
        operation: Option<Operation>,
    },
}

/// Where the tenant comes from.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// A request header. Trusted only when the edge sets (or strips) it.
    #[serde(default)]
    pub header: Option<String>,
    /// Dynamic metadata written by an authenticating filter, e.g. the claims
    /// that `jwt_authn` stores with `payload_in_metadata`.
    #[serde(default)]
    pub metadata: Option<MetadataSource>,
    /// Static allowlist; when set, any other tenant is `other`.
    #[serde(default)]
    pub allowed: Option<Vec<String>>,
    /// Cap on distinct tenants when there is no allowlist.
    #[serde(default)]
    pub max_values: Option<u32>,
}

/// A value in the request's dynamic metadata:
/// `metadata.filter_metadata[namespace].path[0].path[1]...`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetadataSource {
    pub namespace: String,
    pub path: Vec<String>,
}

/// Workload attributes configured for a route, a backend, or as defaults.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct WorkloadEntry {
    #[serde(default)]
    pub route_class: Option<String>,
    #[serde(default)]
    pub team: Option<String>,
    /// Model assumed when the request names none.
    #[serde(default)]
    pub model: Option<String>,
    /// Label value used instead of the route/cluster name itself, for the
    /// long generated names of Envoy Gateway or Istio
    /// (`httproute/llm/chat/rule/0/match/0/...` -> `chat`).
    #[serde(default)]
    pub label: Option<String>,
}

/// Per-label caps and the value length limit.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_value_length: u32,
    pub max_routes: u32,
    pub max_backends: u32,
    /// Cap on distinct models when `models` is empty.
    pub max_models: u32,
    pub max_collections: u32,
    /// Series per metric family per VM before new combinations collapse.
    pub max_series_per_metric: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_value_length: 64,
            max_routes: 64,
            max_backends: 32,
            max_models: 32,
            max_collections: 32,
            max_series_per_metric: 5000,
        }
    }
}

/// Token-usage options.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UsageConfig {
    /// Add `stream_options.include_usage: true` to streaming requests that
    /// lack it, so every stream reports exact token counts.
    pub inject_include_usage: bool,
    /// Largest request body buffered for that rewrite; larger bodies pass
    /// unmodified (counted).
    pub max_request_buffer_bytes: u32,
}

impl Default for UsageConfig {
    fn default() -> Self {
        Self {
            inject_include_usage: false,
            max_request_buffer_bytes: 256 * 1024,
        }
    }
}

/// A response header that marks a cache hit (e.g. a semantic cache).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheHitHeader {
    pub name: String,
    /// Values meaning "hit" (case-insensitive); any value if empty.
    #[serde(default)]
    pub values: Vec<String>,
}

/// RAG request-side sources. Response signals follow the fixed header
/// contract in `docs/tracing.md`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RagConfig {
    pub collection_header: Option<String>,
    /// Dotted JSON path in the request body, e.g. `rag.collection`.
    pub collection_field: Option<String>,
    pub top_k_header: Option<String>,
    pub top_k_field: Option<String>,
    /// Static allowlist of collections; else the first `limits.max_collections`.
    pub collections: Option<Vec<String>>,
    /// Prefix of the response headers of the RAG contract.
    pub response_header_prefix: String,
}

impl Default for RagConfig {
    fn default() -> Self {
        Self {
            collection_header: Some("x-rag-collection".into()),
            collection_field: Some("rag.collection".into()),
            top_k_header: Some("x-rag-top-k".into()),
            top_k_field: Some("rag.top_k".into()),
            collections: None,
            response_header_prefix: "x-rag-".into(),
        }
    }
}

/// OTLP span export. Tracing is off unless `cluster` is set.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TracingConfig {
    /// Envoy cluster of the OpenTelemetry Collector (OTLP/HTTP).
    pub cluster: Option<String>,
    /// `:authority` of the export request.
    pub authority: String,
    pub path: String,
    /// Ratio of new traces (no incoming `traceparent`) that are sampled.
    pub sample_ratio: f64,
    pub service_name: String,
    /// `gen_ai.provider.name` on spans.
    pub provider_name: String,
    /// Inject `traceparent` upstream so runtime spans become children.
    pub inject_traceparent: bool,
    pub max_queue_spans: u32,
    pub max_queue_bytes: u32,
    pub max_batch_spans: u32,
    pub flush_interval_ms: u32,
    pub export_timeout_ms: u32,
    /// Extra resource attributes (e.g. from `vmConfig.env`).
    pub resource: BTreeMap<String, String>,
}

impl Default for TracingConfig {
    fn default() -> Self {
        Self {
            cluster: None,
            authority: "otel-collector".into(),
            path: "/v1/traces".into(),
            sample_ratio: 1.0,
            service_name: "tokentap-gateway".into(),
            provider_name: "vllm".into(),
            inject_traceparent: true,
            max_queue_spans: 2048,
            max_queue_bytes: 1024 * 1024,
            max_batch_spans: 256,
            flush_interval_ms: 1000,
            export_timeout_ms: 5000,
            resource: BTreeMap::new(),
        }
    }
}

/// The configuration document, as written by operators.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Paths recorded in addition to the OpenAI defaults.
    #[serde(default)]
    pub llm_paths: Vec<LlmPathSpec>,
    /// Drop the built-in OpenAI paths (only `llm_paths` are recorded).
    #[serde(default)]
    pub replace_default_paths: bool,
    #[serde(default)]
    pub tenant: TenantConfig,
    /// Models that may appear as the `model` label; empty = first `max_models`.
    #[serde(default)]
    pub models: Vec<String>,
    /// Keyed by Envoy route name.
    #[serde(default)]
    pub routes: BTreeMap<String, WorkloadEntry>,
    /// Keyed by Envoy upstream cluster name (canary vs stable).
    #[serde(default)]
    pub backends: BTreeMap<String, WorkloadEntry>,
    #[serde(default)]
    pub defaults: WorkloadEntry,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub usage: UsageConfig,
    #[serde(default)]
    pub cache_hit_header: Option<CacheHitHeader>,
    #[serde(default)]
    pub rag: RagConfig,
    #[serde(default)]
    pub tracing: TracingConfig,
    /// How per-request values are published as Envoy filter state for access
    /// logs and tracing.
    #[serde(default)]
    pub filter_state: FilterStateMode,
    /// Which metric names are published.
    #[serde(default)]
    pub metrics: MetricsConfig,
}

/// Metric naming: tokentap's `llm_gateway_*` histograms, the OpenTelemetry
/// GenAI conventions in Prometheus form (`gen_ai_*`), or both during a
/// migration. Families the conventions do not define keep their names in
/// every naming (`docs/metrics.md`, "Naming").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Naming {
    #[default]
    LlmGateway,
    GenAi,
    Both,
}

impl Naming {
    /// Whether tokentap's own latency and token histograms are published.
    pub fn llm_gateway(self) -> bool {
        matches!(self, Naming::LlmGateway | Naming::Both)
    }

    /// Whether the GenAI-conventions histograms are published.
    pub fn gen_ai(self) -> bool {
        matches!(self, Naming::GenAi | Naming::Both)
    }
}

/// The `metrics` section.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    pub naming: Naming,
    /// `gen_ai_provider_name` of the GenAI metrics; default:
    /// `tracing.provider_name` (`vllm`). Filled in by validation.
    pub provider_name: Option<String>,
}

/// Filter-state publishing. Each filter-state write is a host call that
/// allocates an object inside Envoy, so the default writes one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FilterStateMode {
    /// Nothing is written.
    Off,
    /// One key, `wasm.tokentap`, holding a JSON object of every value.
    #[default]
    Summary,
    /// One key per value, `wasm.tokentap.<name>` (about 20 writes per request).
    Fields,
}
