//! Plugin configuration: parsed once at load, validated, and compiled into the
//! form the request path uses.
//!
//! Invalid configuration is refused with an error that names the offending
//! field (`tracing.sample_ratio: must be between 0 and 1`), so Envoy rejects
//! the plugin at load time instead of running it half-configured.
//!
//! `raw.rs` holds the document as written, `compile.rs` its validation, and
//! this file the compiled form the request path reads.

mod compile;
mod raw;
#[cfg(test)]
mod tests;

use crate::labels::FxHashMap;

use serde::Deserialize;

use crate::labels::{Admission, Dimension};

pub use raw::{
    CacheHitHeader, FilterStateMode, Limits, LlmPathSpec, MetadataSource, MetricsConfig, Naming,
    RagConfig, RawConfig, TenantConfig, TracingConfig, UsageConfig, WorkloadEntry,
};

/// The request paths tokentap treats as LLM traffic unless configured otherwise.
pub const DEFAULT_LLM_PATHS: [(&str, Operation); 5] = [
    ("/v1/chat/completions", Operation::Chat),
    ("/v1/completions", Operation::TextCompletion),
    ("/v1/embeddings", Operation::Embeddings),
    ("/v1/responses", Operation::Responses),
    ("/v1/messages", Operation::Messages),
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

/// The API an LLM path speaks: OpenAI chat completions, completions and
/// embeddings, the OpenAI Responses API (`responses`) and the Anthropic
/// Messages API (`messages`). [`Operation::as_str`] is the configuration
/// and filter-state name; [`Operation::gen_ai_name`] the OTel
/// `gen_ai.operation.name`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    Chat,
    TextCompletion,
    Embeddings,
    /// OpenAI Responses API (`/v1/responses`).
    Responses,
    /// Anthropic Messages API (`/v1/messages`).
    Messages,
    Other,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Chat => "chat",
            Operation::TextCompletion => "text_completion",
            Operation::Embeddings => "embeddings",
            Operation::Responses => "responses",
            Operation::Messages => "messages",
            Operation::Other => "other",
        }
    }

    /// The OTel GenAI `gen_ai.operation.name`: the Responses and Messages
    /// APIs are chat operations in the conventions (`chat`), as chat
    /// completions are.
    pub fn gen_ai_name(self) -> &'static str {
        match self {
            Operation::Responses | Operation::Messages => "chat",
            other => other.as_str(),
        }
    }

    /// Whether the request body names `stream` (every API but embeddings).
    pub fn streams(self) -> bool {
        matches!(
            self,
            Operation::Chat
                | Operation::TextCompletion
                | Operation::Responses
                | Operation::Messages
        )
    }

    fn infer(path: &str) -> Operation {
        if path.ends_with("/chat/completions") {
            Operation::Chat
        } else if path.ends_with("/completions") {
            Operation::TextCompletion
        } else if path.ends_with("/embeddings") {
            Operation::Embeddings
        } else if path.ends_with("/responses") {
            Operation::Responses
        } else if path.ends_with("/messages") {
            Operation::Messages
        } else {
            Operation::Other
        }
    }
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

/// [`Workload`] borrowed from the configuration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkloadRef<'a> {
    pub route_class: Option<&'a str>,
    pub team: Option<&'a str>,
    pub model: Option<&'a str>,
}

/// The validated, compiled configuration used on the request path.
#[derive(Clone, Debug)]
pub struct Config {
    pub llm_paths: Vec<(String, Operation)>,
    pub tenant_source: TenantSource,
    pub admissions: FxHashMap<Dimension, Admission>,
    pub max_value_length: usize,
    pub max_series_per_metric: u32,
    pub routes: FxHashMap<String, Workload>,
    pub backends: FxHashMap<String, Workload>,
    pub defaults: Workload,
    /// Route name -> label value, where configured.
    pub route_labels: FxHashMap<String, String>,
    /// Cluster name -> label value, where configured.
    pub backend_labels: FxHashMap<String, String>,
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
    /// Metric naming and the GenAI provider name (always set).
    pub metrics: MetricsConfig,
}

impl Config {
    /// Parses and validates the plugin configuration (empty input = defaults).
    ///
    /// ```
    /// use tokentap_core::config::{Config, Operation, TenantSource};
    ///
    /// let config = Config::parse(
    ///     br#"{"tenant": {"header": "X-Tenant-Id"},
    ///          "routes": {"chat": {"route_class": "interactive", "team": "platform-ai"}}}"#,
    /// )
    /// .expect("valid configuration");
    /// assert_eq!(config.tenant_source, TenantSource::Header("x-tenant-id".into()));
    /// assert_eq!(
    ///     config.operation_for_path(b"/v1/chat/completions?x=1"),
    ///     Some(Operation::Chat)
    /// );
    /// assert_eq!(
    ///     config.workload_ref(Some("chat"), None).team,
    ///     Some("platform-ai")
    /// );
    ///
    /// // Bad values are refused with the field's name.
    /// let error = Config::parse(br#"{"tracing": {"cluster": "otel", "sample_ratio": 2}}"#)
    ///     .expect_err("ratio above 1");
    /// assert_eq!(
    ///     error.to_string(),
    ///     "plugin configuration field `tracing.sample_ratio`: must be between 0 and 1"
    /// );
    /// ```
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
    /// then backend entry, then defaults, field by field (borrowed: the
    /// request path only reads them).
    pub fn workload_ref(&self, route: Option<&str>, backend: Option<&str>) -> WorkloadRef<'_> {
        let r = route.and_then(|r| self.routes.get(r));
        let b = backend.and_then(|b| self.backends.get(b));
        let pick = |f: fn(&Workload) -> &Option<String>| {
            r.and_then(|w| f(w).as_deref())
                .or_else(|| b.and_then(|w| f(w).as_deref()))
                .or_else(|| f(&self.defaults).as_deref())
        };
        WorkloadRef {
            route_class: pick(|w| &w.route_class),
            team: pick(|w| &w.team),
            model: pick(|w| &w.model),
        }
    }
}
