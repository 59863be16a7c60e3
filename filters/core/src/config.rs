//! Plugin configuration: parsed once at load, validated, and compiled into the
//! form the request path uses.
//!
//! Invalid configuration is refused with an error that names the offending
//! field (`tracing.sample_ratio: must be between 0 and 1`), so Envoy rejects
//! the plugin at load time instead of running it half-configured.

use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;

use crate::labels::{sanitize, Admission, Dimension};

/// The request paths tokentap treats as LLM traffic unless configured otherwise.
pub const DEFAULT_LLM_PATHS: [(&str, Operation); 3] = [
    ("/v1/chat/completions", Operation::Chat),
    ("/v1/completions", Operation::TextCompletion),
    ("/v1/embeddings", Operation::Embeddings),
];

/// A configuration error, naming the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("plugin configuration is not valid JSON: {0}")]
    Json(String),
    #[error("plugin configuration field `{field}`: {reason}")]
    Field { field: String, reason: String },
}

fn field_err(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Field {
        field: field.into(),
        reason: reason.into(),
    }
}

/// The OpenAI operation, which is also the OTel `gen_ai.operation.name`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    Chat,
    TextCompletion,
    Embeddings,
    Other,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Chat => "chat",
            Operation::TextCompletion => "text_completion",
            Operation::Embeddings => "embeddings",
            Operation::Other => "other",
        }
    }

    fn infer(path: &str) -> Operation {
        if path.ends_with("/chat/completions") {
            Operation::Chat
        } else if path.ends_with("/completions") {
            Operation::TextCompletion
        } else if path.ends_with("/embeddings") {
            Operation::Embeddings
        } else {
            Operation::Other
        }
    }
}

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

const DEFAULT_MAX_TENANTS: u32 = 100;

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

/// Tenant source after validation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TenantSource {
    None,
    Header(String),
    /// Full property path: `metadata.filter_metadata.<ns>.<path...>`.
    Metadata(Vec<String>),
}

/// Workload attributes after sanitising.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Workload {
    pub route_class: Option<String>,
    pub team: Option<String>,
    pub model: Option<String>,
}

/// The validated, compiled configuration used on the request path.
#[derive(Clone, Debug)]
pub struct Config {
    pub llm_paths: Vec<(String, Operation)>,
    pub tenant_source: TenantSource,
    pub admissions: HashMap<Dimension, Admission>,
    pub max_value_length: usize,
    pub max_series_per_metric: u32,
    pub routes: HashMap<String, Workload>,
    pub backends: HashMap<String, Workload>,
    pub defaults: Workload,
    /// Route name -> label value, where configured.
    pub route_labels: HashMap<String, String>,
    /// Cluster name -> label value, where configured.
    pub backend_labels: HashMap<String, String>,
    pub inject_include_usage: bool,
    pub max_request_buffer_bytes: usize,
    pub cache_hit_header: Option<(String, Vec<String>)>,
    pub rag_collection_header: Option<String>,
    pub rag_collection_field: Option<Vec<String>>,
    pub rag_top_k_header: Option<String>,
    pub rag_top_k_field: Option<Vec<String>>,
    pub rag_header_prefix: String,
    pub tracing: Option<TracingConfig>,
    pub filter_state: FilterStateMode,
}

impl Config {
    /// Parses and validates the plugin configuration (empty input = defaults).
    pub fn parse(bytes: &[u8]) -> Result<Config, ConfigError> {
        let text = std::str::from_utf8(bytes)
            .map_err(|e| ConfigError::Json(format!("not UTF-8: {e}")))?
            .trim();
        let raw: RawConfig = if text.is_empty() {
            RawConfig::default()
        } else {
            let de = &mut serde_json::Deserializer::from_str(text);
            serde_path_to_error::deserialize(de).map_err(|e| {
                let path = e.path().to_string();
                let syntax = matches!(
                    e.inner().classify(),
                    serde_json::error::Category::Syntax | serde_json::error::Category::Eof
                );
                if syntax || path == "." || path == "?" || path.is_empty() {
                    ConfigError::Json(e.inner().to_string())
                } else {
                    field_err(path, e.inner().to_string())
                }
            })?
        };
        Self::compile(raw)
    }

    /// Validates a parsed document.
    pub fn compile(raw: RawConfig) -> Result<Config, ConfigError> {
        let limits = &raw.limits;
        check_range("limits.max_value_length", limits.max_value_length, 8, 256)?;
        check_range("limits.max_routes", limits.max_routes, 1, 10_000)?;
        check_range("limits.max_backends", limits.max_backends, 1, 10_000)?;
        check_range("limits.max_models", limits.max_models, 1, 10_000)?;
        check_range("limits.max_collections", limits.max_collections, 1, 10_000)?;
        check_range(
            "limits.max_series_per_metric",
            limits.max_series_per_metric,
            10,
            1_000_000,
        )?;
        let max_len = limits.max_value_length as usize;

        let mut llm_paths: Vec<(String, Operation)> = if raw.replace_default_paths {
            Vec::new()
        } else {
            DEFAULT_LLM_PATHS
                .iter()
                .map(|(p, op)| (p.to_string(), *op))
                .collect()
        };
        for (i, spec) in raw.llm_paths.iter().enumerate() {
            let (path, op) = match spec {
                LlmPathSpec::Path(p) => (p.clone(), Operation::infer(p)),
                LlmPathSpec::Detailed { path, operation } => (
                    path.clone(),
                    operation.unwrap_or_else(|| Operation::infer(path)),
                ),
            };
            if !path.starts_with('/') || path.contains(['?', '#']) || path.len() > 256 {
                return Err(field_err(
                    format!("llm_paths[{i}]"),
                    "must be a path starting with `/`, without a query string or fragment",
                ));
            }
            llm_paths.push((path, op));
        }
        if llm_paths.is_empty() {
            return Err(field_err(
                "llm_paths",
                "no paths left to record (replace_default_paths is set and llm_paths is empty)",
            ));
        }
        // Longest first, so `/v1/chat/completions` wins over `/v1/completions`.
        llm_paths.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));

        let tenant_source = match (&raw.tenant.header, &raw.tenant.metadata) {
            (Some(_), Some(_)) => {
                return Err(field_err(
                    "tenant",
                    "set either `header` or `metadata`, not both",
                ))
            }
            (Some(h), None) => TenantSource::Header(header_name("tenant.header", h)?),
            (None, Some(m)) => {
                if m.namespace.trim().is_empty() {
                    return Err(field_err("tenant.metadata.namespace", "must not be empty"));
                }
                if m.path.is_empty() || m.path.iter().any(|p| p.is_empty()) {
                    return Err(field_err(
                        "tenant.metadata.path",
                        "must be a non-empty list of non-empty keys",
                    ));
                }
                let mut full = vec![
                    "metadata".to_string(),
                    "filter_metadata".to_string(),
                    m.namespace.clone(),
                ];
                full.extend(m.path.iter().cloned());
                TenantSource::Metadata(full)
            }
            (None, None) => TenantSource::None,
        };

        let mut admissions = HashMap::new();
        admissions.insert(
            Dimension::Tenant,
            match &raw.tenant.allowed {
                Some(list) => Admission::Static(sanitize_list("tenant.allowed", list, max_len)?),
                None => {
                    let cap = raw.tenant.max_values.unwrap_or(DEFAULT_MAX_TENANTS);
                    check_range("tenant.max_values", cap, 1, 100_000)?;
                    Admission::Dynamic { cap }
                }
            },
        );
        admissions.insert(
            Dimension::Route,
            Admission::Dynamic {
                cap: limits.max_routes,
            },
        );
        admissions.insert(
            Dimension::Backend,
            Admission::Dynamic {
                cap: limits.max_backends,
            },
        );

        let defaults = workload("defaults", &raw.defaults, max_len)?;
        if raw.defaults.label.is_some() {
            return Err(field_err(
                "defaults.label",
                "only routes and backends have a label alias",
            ));
        }
        let mut routes = HashMap::new();
        let mut route_labels = HashMap::new();
        for (name, entry) in &raw.routes {
            let field = format!("routes.{name}");
            routes.insert(name.clone(), workload(&field, entry, max_len)?);
            if let Some(l) = label_alias(&field, &entry.label, max_len)? {
                route_labels.insert(name.clone(), l);
            }
        }
        let mut backends = HashMap::new();
        let mut backend_labels = HashMap::new();
        for (name, entry) in &raw.backends {
            let field = format!("backends.{name}");
            backends.insert(name.clone(), workload(&field, entry, max_len)?);
            if let Some(l) = label_alias(&field, &entry.label, max_len)? {
                backend_labels.insert(name.clone(), l);
            }
        }

        // Models: the configured set plus every configured default model.
        let mut models = sanitize_list("models", &raw.models, max_len)?;
        let configured_defaults = routes
            .values()
            .chain(backends.values())
            .chain(std::iter::once(&defaults))
            .filter_map(|w| w.model.clone());
        if !models.is_empty() {
            for m in configured_defaults {
                if !models.contains(&m) {
                    models.push(m);
                }
            }
            admissions.insert(Dimension::Model, Admission::Static(models));
        } else {
            admissions.insert(
                Dimension::Model,
                Admission::Dynamic {
                    cap: limits.max_models,
                },
            );
        }

        // Route classes and teams come only from configuration.
        let from_config = |pick: fn(&Workload) -> Option<String>| -> Vec<String> {
            let mut v: Vec<String> = routes
                .values()
                .chain(backends.values())
                .chain(std::iter::once(&defaults))
                .filter_map(pick)
                .collect();
            v.sort();
            v.dedup();
            v
        };
        admissions.insert(
            Dimension::RouteClass,
            Admission::Static(from_config(|w| w.route_class.clone())),
        );
        admissions.insert(
            Dimension::Team,
            Admission::Static(from_config(|w| w.team.clone())),
        );

        admissions.insert(
            Dimension::Collection,
            match &raw.rag.collections {
                Some(list) => Admission::Static(sanitize_list("rag.collections", list, max_len)?),
                None => Admission::Dynamic {
                    cap: limits.max_collections,
                },
            },
        );

        let usage = &raw.usage;
        check_range(
            "usage.max_request_buffer_bytes",
            usage.max_request_buffer_bytes,
            1024,
            16 * 1024 * 1024,
        )?;

        let cache_hit_header = match &raw.cache_hit_header {
            Some(c) => Some((
                header_name("cache_hit_header.name", &c.name)?,
                c.values
                    .iter()
                    .map(|v| v.trim().to_ascii_lowercase())
                    .collect(),
            )),
            None => None,
        };

        let rag = &raw.rag;
        let rag_collection_header = opt_header("rag.collection_header", &rag.collection_header)?;
        let rag_top_k_header = opt_header("rag.top_k_header", &rag.top_k_header)?;
        let rag_collection_field = opt_field_path("rag.collection_field", &rag.collection_field)?;
        let rag_top_k_field = opt_field_path("rag.top_k_field", &rag.top_k_field)?;
        let rag_header_prefix = rag.response_header_prefix.trim().to_ascii_lowercase();
        if rag_header_prefix.is_empty() || !is_token(&rag_header_prefix) {
            return Err(field_err(
                "rag.response_header_prefix",
                "must be a non-empty header-name prefix",
            ));
        }

        let tracing = match &raw.tracing.cluster {
            None => None,
            Some(cluster) => {
                let t = &raw.tracing;
                if cluster.trim().is_empty() {
                    return Err(field_err("tracing.cluster", "must not be empty"));
                }
                if !(0.0..=1.0).contains(&t.sample_ratio) || t.sample_ratio.is_nan() {
                    return Err(field_err("tracing.sample_ratio", "must be between 0 and 1"));
                }
                if !t.path.starts_with('/') {
                    return Err(field_err("tracing.path", "must start with `/`"));
                }
                if t.authority.trim().is_empty() {
                    return Err(field_err("tracing.authority", "must not be empty"));
                }
                if t.service_name.trim().is_empty() {
                    return Err(field_err("tracing.service_name", "must not be empty"));
                }
                if t.provider_name.trim().is_empty() {
                    return Err(field_err("tracing.provider_name", "must not be empty"));
                }
                check_range("tracing.max_queue_spans", t.max_queue_spans, 1, 1_000_000)?;
                check_range(
                    "tracing.max_queue_bytes",
                    t.max_queue_bytes,
                    4096,
                    256 * 1024 * 1024,
                )?;
                check_range("tracing.max_batch_spans", t.max_batch_spans, 1, 100_000)?;
                if t.max_batch_spans > t.max_queue_spans {
                    return Err(field_err(
                        "tracing.max_batch_spans",
                        "must not exceed tracing.max_queue_spans",
                    ));
                }
                check_range(
                    "tracing.flush_interval_ms",
                    t.flush_interval_ms,
                    10,
                    600_000,
                )?;
                check_range(
                    "tracing.export_timeout_ms",
                    t.export_timeout_ms,
                    10,
                    600_000,
                )?;
                Some(t.clone())
            }
        };

        Ok(Config {
            llm_paths,
            tenant_source,
            admissions,
            max_value_length: max_len,
            max_series_per_metric: limits.max_series_per_metric,
            routes,
            backends,
            defaults,
            route_labels,
            backend_labels,
            inject_include_usage: usage.inject_include_usage,
            max_request_buffer_bytes: usage.max_request_buffer_bytes as usize,
            cache_hit_header,
            rag_collection_header,
            rag_collection_field,
            rag_top_k_header,
            rag_top_k_field,
            rag_header_prefix,
            tracing,
            filter_state: raw.filter_state,
        })
    }

    /// The operation of an LLM path, or `None` when the path is not recorded.
    /// Matching ignores the query string and accepts a prefix before the
    /// configured path (`/tenant-a/v1/chat/completions`).
    pub fn operation_for_path(&self, path: &[u8]) -> Option<Operation> {
        self.match_path(path).map(|(_, op)| op)
    }

    /// The configured path that matches and its operation.
    pub fn match_path(&self, path: &[u8]) -> Option<(&str, Operation)> {
        let path = match path.iter().position(|&b| b == b'?' || b == b'#') {
            Some(i) => &path[..i],
            None => path,
        };
        self.llm_paths
            .iter()
            .find(|(p, _)| path.ends_with(p.as_bytes()))
            .map(|(p, op)| (p.as_str(), *op))
    }

    /// The `route` label input for an Envoy route name (its alias, if any).
    pub fn route_label<'a>(&'a self, route: &'a [u8]) -> &'a [u8] {
        std::str::from_utf8(route)
            .ok()
            .and_then(|r| self.route_labels.get(r))
            .map(|l| l.as_bytes())
            .unwrap_or(route)
    }

    /// The `backend` label input for a cluster name (its alias, if any).
    pub fn backend_label<'a>(&'a self, cluster: &'a [u8]) -> &'a [u8] {
        std::str::from_utf8(cluster)
            .ok()
            .and_then(|c| self.backend_labels.get(c))
            .map(|l| l.as_bytes())
            .unwrap_or(cluster)
    }

    /// The workload attributes for a route and backend: route entry first,
    /// then backend entry, then defaults, field by field.
    pub fn workload_for(&self, route: Option<&str>, backend: Option<&str>) -> Workload {
        let r = route.and_then(|r| self.routes.get(r));
        let b = backend.and_then(|b| self.backends.get(b));
        let pick = |f: fn(&Workload) -> &Option<String>| {
            r.and_then(|w| f(w).clone())
                .or_else(|| b.and_then(|w| f(w).clone()))
                .or_else(|| f(&self.defaults).clone())
        };
        Workload {
            route_class: pick(|w| &w.route_class),
            team: pick(|w| &w.team),
            model: pick(|w| &w.model),
        }
    }
}

fn check_range(field: &str, v: u32, min: u32, max: u32) -> Result<(), ConfigError> {
    if v < min || v > max {
        return Err(field_err(
            field,
            format!("must be between {min} and {max}, got {v}"),
        ));
    }
    Ok(())
}

fn is_token(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn header_name(field: &str, h: &str) -> Result<String, ConfigError> {
    let h = h.trim().to_ascii_lowercase();
    if h.is_empty() || !is_token(&h) {
        return Err(field_err(field, "must be a valid HTTP header name"));
    }
    Ok(h)
}

fn opt_header(field: &str, h: &Option<String>) -> Result<Option<String>, ConfigError> {
    h.as_ref().map(|h| header_name(field, h)).transpose()
}

fn opt_field_path(field: &str, p: &Option<String>) -> Result<Option<Vec<String>>, ConfigError> {
    match p {
        None => Ok(None),
        Some(p) => {
            let parts: Vec<String> = p.split('.').map(str::to_string).collect();
            if parts.iter().any(|s| s.is_empty()) || parts.len() > 6 {
                return Err(field_err(
                    field,
                    "must be a dotted path of 1 to 6 non-empty keys, e.g. `rag.collection`",
                ));
            }
            Ok(Some(parts))
        }
    }
}

fn sanitize_list(field: &str, list: &[String], max_len: usize) -> Result<Vec<String>, ConfigError> {
    let mut out = Vec::with_capacity(list.len());
    for (i, v) in list.iter().enumerate() {
        let Some(clean) = sanitize(v.as_bytes(), max_len) else {
            return Err(field_err(format!("{field}[{i}]"), "must not be empty"));
        };
        if clean != *v {
            return Err(field_err(
                format!("{field}[{i}]"),
                format!(
                    "`{v}` is not a valid label value (allowed: letters, digits, `-_.:/`, at most {max_len} characters)"
                ),
            ));
        }
        if !out.contains(&clean) {
            out.push(clean);
        }
    }
    if out.len() > 10_000 {
        return Err(field_err(field, "at most 10000 values"));
    }
    Ok(out)
}

fn label_alias(
    field: &str,
    l: &Option<String>,
    max_len: usize,
) -> Result<Option<String>, ConfigError> {
    match l {
        None => Ok(None),
        Some(v) => sanitize_list(&format!("{field}.label"), std::slice::from_ref(v), max_len)
            .map(|mut l| l.pop()),
    }
}

fn workload(field: &str, e: &WorkloadEntry, max_len: usize) -> Result<Workload, ConfigError> {
    let one = |name: &str, v: &Option<String>| -> Result<Option<String>, ConfigError> {
        match v {
            None => Ok(None),
            Some(v) => sanitize_list(&format!("{field}.{name}"), std::slice::from_ref(v), max_len)
                .map(|mut l| l.pop()),
        }
    };
    Ok(Workload {
        route_class: one("route_class", &e.route_class)?,
        team: one("team", &e.team)?,
        model: one("model", &e.model)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(json: &str) -> String {
        Config::parse(json.as_bytes()).unwrap_err().to_string()
    }

    #[test]
    fn empty_configuration_records_the_openai_paths() {
        let c = Config::parse(b"").unwrap();
        assert_eq!(
            c.operation_for_path(b"/v1/chat/completions"),
            Some(Operation::Chat)
        );
        assert_eq!(
            c.operation_for_path(b"/v1/completions?x=1"),
            Some(Operation::TextCompletion)
        );
        assert_eq!(
            c.operation_for_path(b"/team-a/v1/embeddings"),
            Some(Operation::Embeddings)
        );
        assert_eq!(c.operation_for_path(b"/v1/models"), None);
        assert_eq!(c.tenant_source, TenantSource::None);
        assert!(c.tracing.is_none());
    }

    #[test]
    fn errors_name_the_field() {
        assert!(err(r#"{"limits":{"max_routes":"many"}}"#).contains("`limits.max_routes`"));
        assert!(err(r#"{"limits":{"max_routes":0}}"#).contains("`limits.max_routes`"));
        assert!(err(r#"{"tenant":{"header":"bad header"}}"#).contains("`tenant.header`"));
        assert!(
            err(r#"{"tenant":{"header":"x","metadata":{"namespace":"n","path":["a"]}}}"#)
                .contains("`tenant`")
        );
        assert!(err(r#"{"tracing":{"cluster":"otel","sample_ratio":1.5}}"#)
            .contains("`tracing.sample_ratio`"));
        assert!(err(r#"{"routes":{"chat":{"team":"a b"}}}"#).contains("`routes.chat.team[0]`"));
        assert!(err(r#"{"llm_paths":["v1/x"]}"#).contains("`llm_paths[0]`"));
        assert!(err(r#"{"llm_paths":["/v1/chat#x"]}"#).contains("`llm_paths[0]`"));
        assert!(err(r#"{"unknown_knob":1}"#).contains("unknown_knob"));
        assert!(err(r#"{"routes":{"chat":{"tem":"a"}}}"#).contains("routes.chat"));
        assert!(err("{").contains("not valid JSON"));
    }

    #[test]
    fn workload_precedence_is_route_then_backend_then_defaults() {
        let c = Config::parse(
            br#"{
              "models": ["mistral-7b"],
              "routes": {"chat": {"route_class": "interactive"}},
              "backends": {"vllm_canary": {"team": "platform-ai", "model": "mistral-7b-canary"}},
              "defaults": {"team": "shared", "route_class": "batch", "model": "mistral-7b"}
            }"#,
        )
        .unwrap();
        let w = c.workload_for(Some("chat"), Some("vllm_canary"));
        assert_eq!(w.route_class.as_deref(), Some("interactive"));
        assert_eq!(w.team.as_deref(), Some("platform-ai"));
        assert_eq!(w.model.as_deref(), Some("mistral-7b-canary"));
        let w = c.workload_for(Some("other"), None);
        assert_eq!(w.route_class.as_deref(), Some("batch"));
        assert_eq!(w.team.as_deref(), Some("shared"));
        // Configured default models join the allowed model set.
        match &c.admissions[&Dimension::Model] {
            Admission::Static(v) => assert!(v.contains(&"mistral-7b-canary".to_string())),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn metadata_tenant_source_builds_the_property_path() {
        let c = Config::parse(
            br#"{"tenant":{"metadata":{"namespace":"envoy.filters.http.jwt_authn","path":["jwt_payload","tenant"]}}}"#,
        )
        .unwrap();
        assert_eq!(
            c.tenant_source,
            TenantSource::Metadata(vec![
                "metadata".into(),
                "filter_metadata".into(),
                "envoy.filters.http.jwt_authn".into(),
                "jwt_payload".into(),
                "tenant".into()
            ])
        );
    }

    #[test]
    fn route_and_backend_aliases_replace_generated_names() {
        let c = Config::parse(
            br#"{"routes":{"httproute/llm/chat/rule/0/match/0/llm_example_com":{"label":"chat","route_class":"interactive"}},
                 "backends":{"outbound|8000||vllm-canary.llm.svc.cluster.local":{"label":"vllm-canary"}}}"#,
        )
        .unwrap();
        assert_eq!(
            c.route_label(b"httproute/llm/chat/rule/0/match/0/llm_example_com"),
            b"chat"
        );
        assert_eq!(c.route_label(b"other"), b"other");
        assert_eq!(
            c.backend_label(b"outbound|8000||vllm-canary.llm.svc.cluster.local"),
            b"vllm-canary"
        );
        assert!(err(r#"{"routes":{"r":{"label":"a b"}}}"#).contains("`routes.r.label[0]`"));
    }

    #[test]
    fn longest_path_wins() {
        let c =
            Config::parse(br#"{"llm_paths":[{"path":"/rag/chat","operation":"chat"}]}"#).unwrap();
        assert_eq!(c.operation_for_path(b"/rag/chat"), Some(Operation::Chat));
        assert_eq!(
            c.operation_for_path(b"/v1/chat/completions"),
            Some(Operation::Chat)
        );
    }
}
