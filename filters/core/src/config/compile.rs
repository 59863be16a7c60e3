//! Validation of the operator's document into the compiled [`Config`]: one
//! function per section, each refusing bad values with an error that names
//! the field.

use std::collections::BTreeMap;

use crate::labels::FxHashMap;

use super::raw::{
    CacheHitHeader, Limits, MetricsConfig, RagConfig, TenantConfig, TracingConfig, WorkloadEntry,
};
use super::{
    field_err, Config, ConfigError, LlmPathSpec, Operation, RawConfig, TenantSource, Workload,
    DEFAULT_LLM_PATHS,
};
use crate::labels::{sanitize, Admission, Dimension};

/// Cap on distinct tenants when neither an allowlist nor `max_values` is set.
const DEFAULT_MAX_TENANTS: u32 = 100;

impl Config {
    /// Validates a parsed document.
    pub fn compile(raw: RawConfig) -> Result<Config, ConfigError> {
        let limits = &raw.limits;
        check_limits(limits)?;
        let max_len = limits.max_value_length as usize;
        let llm_paths = llm_paths(&raw)?;
        let tenant_source = tenant_source(&raw.tenant)?;
        let tenant_admission = tenant_admission(&raw.tenant, max_len)?;
        let defaults = workload("defaults", &raw.defaults, max_len)?;
        if raw.defaults.label.is_some() {
            return Err(field_err(
                "defaults.label",
                "only routes and backends have a label alias",
            ));
        }
        let routes = section("routes", &raw.routes, max_len)?;
        let backends = section("backends", &raw.backends, max_len)?;
        let workloads: Vec<&Workload> = routes
            .workloads
            .values()
            .chain(backends.workloads.values())
            .chain(std::iter::once(&defaults))
            .collect();
        let mut admissions = FxHashMap::default();
        admissions.insert(Dimension::Tenant, tenant_admission);
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
        admissions.insert(
            Dimension::Model,
            model_admission(&raw.models, &workloads, limits, max_len)?,
        );
        // Route classes and teams come only from configuration.
        admissions.insert(
            Dimension::RouteClass,
            Admission::Static(configured_values(&workloads, |w| &w.route_class)),
        );
        admissions.insert(
            Dimension::Team,
            Admission::Static(configured_values(&workloads, |w| &w.team)),
        );
        admissions.insert(
            Dimension::Collection,
            collection_admission(&raw.rag, limits, max_len)?,
        );
        check_range(
            "usage.max_request_buffer_bytes",
            raw.usage.max_request_buffer_bytes,
            1024,
            16 * 1024 * 1024,
        )?;
        let cache_hit_header = raw
            .cache_hit_header
            .as_ref()
            .map(cache_hit_header)
            .transpose()?;
        let rag = RagSources::compile(&raw.rag)?;
        let tracing = match &raw.tracing.cluster {
            None => None,
            Some(cluster) => Some(tracing(cluster, &raw.tracing)?),
        };
        Ok(Config {
            llm_paths,
            tenant_source,
            admissions,
            max_value_length: max_len,
            max_series_per_metric: limits.max_series_per_metric,
            routes: routes.workloads,
            backends: backends.workloads,
            defaults,
            route_labels: routes.labels,
            backend_labels: backends.labels,
            inject_include_usage: raw.usage.inject_include_usage,
            max_request_buffer_bytes: raw.usage.max_request_buffer_bytes as usize,
            cache_hit_header,
            rag_collection_header: rag.collection_header,
            rag_collection_field: rag.collection_field,
            rag_top_k_header: rag.top_k_header,
            rag_top_k_field: rag.top_k_field,
            rag_header_prefix: rag.header_prefix,
            tracing,
            filter_state: raw.filter_state,
            metrics: metrics(&raw, max_len)?,
        })
    }
}

/// The `metrics` section, with the provider name resolved.
fn metrics(raw: &RawConfig, max_len: usize) -> Result<MetricsConfig, ConfigError> {
    let provider = match &raw.metrics.provider_name {
        Some(p) => match sanitize(p.as_bytes(), max_len) {
            Some(clean) if clean == *p => clean,
            _ => {
                return Err(field_err(
                    "metrics.provider_name",
                    format!("`{p}` is not a valid label value (allowed: letters, digits, `-_.:/`, at most {max_len} characters)"),
                ))
            }
        },
        None => sanitize(raw.tracing.provider_name.as_bytes(), max_len)
            .unwrap_or_else(|| "vllm".into()),
    };
    Ok(MetricsConfig {
        naming: raw.metrics.naming,
        provider_name: Some(provider),
    })
}

fn check_limits(limits: &Limits) -> Result<(), ConfigError> {
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
    )
}

/// The recorded paths (defaults unless replaced, then the configured ones),
/// longest first so `/v1/chat/completions` wins over `/v1/completions`.
fn llm_paths(raw: &RawConfig) -> Result<Vec<(String, Operation)>, ConfigError> {
    let mut paths: Vec<(String, Operation)> = if raw.replace_default_paths {
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
        paths.push((path, op));
    }
    if paths.is_empty() {
        return Err(field_err(
            "llm_paths",
            "no paths left to record (replace_default_paths is set and llm_paths is empty)",
        ));
    }
    paths.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
    Ok(paths)
}

fn tenant_source(tenant: &TenantConfig) -> Result<TenantSource, ConfigError> {
    match (&tenant.header, &tenant.metadata) {
        (Some(_), Some(_)) => Err(field_err(
            "tenant",
            "set either `header` or `metadata`, not both",
        )),
        (Some(h), None) => Ok(TenantSource::Header(header_name("tenant.header", h)?)),
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
            Ok(TenantSource::Metadata(full))
        }
        (None, None) => Ok(TenantSource::None),
    }
}

/// The allowlist when there is one, else the first `max_values` tenants.
fn tenant_admission(tenant: &TenantConfig, max_len: usize) -> Result<Admission, ConfigError> {
    match &tenant.allowed {
        Some(list) => Ok(Admission::Static(sanitize_list(
            "tenant.allowed",
            list,
            max_len,
        )?)),
        None => {
            let cap = tenant.max_values.unwrap_or(DEFAULT_MAX_TENANTS);
            check_range("tenant.max_values", cap, 1, 100_000)?;
            Ok(Admission::Dynamic { cap })
        }
    }
}

/// The configured models plus every configured default model, or the first
/// `limits.max_models` seen when none are configured.
fn model_admission(
    models: &[String],
    workloads: &[&Workload],
    limits: &Limits,
    max_len: usize,
) -> Result<Admission, ConfigError> {
    let mut models = sanitize_list("models", models, max_len)?;
    if models.is_empty() {
        return Ok(Admission::Dynamic {
            cap: limits.max_models,
        });
    }
    for m in workloads.iter().filter_map(|w| w.model.clone()) {
        if !models.contains(&m) {
            models.push(m);
        }
    }
    Ok(Admission::Static(models))
}

fn collection_admission(
    rag: &RagConfig,
    limits: &Limits,
    max_len: usize,
) -> Result<Admission, ConfigError> {
    Ok(match &rag.collections {
        Some(list) => Admission::Static(sanitize_list("rag.collections", list, max_len)?),
        None => Admission::Dynamic {
            cap: limits.max_collections,
        },
    })
}

/// The distinct values one workload attribute takes across the
/// configuration, sorted.
fn configured_values(
    workloads: &[&Workload],
    pick: fn(&Workload) -> &Option<String>,
) -> Vec<String> {
    let mut values: Vec<String> = workloads.iter().filter_map(|w| pick(w).clone()).collect();
    values.sort();
    values.dedup();
    values
}

/// The compiled `routes` or `backends` section.
struct Section {
    /// Workload attributes by route or cluster name.
    workloads: FxHashMap<String, Workload>,
    /// Label aliases by route or cluster name, where configured.
    labels: FxHashMap<String, String>,
}

fn section(
    name: &str,
    entries: &BTreeMap<String, WorkloadEntry>,
    max_len: usize,
) -> Result<Section, ConfigError> {
    let mut compiled = Section {
        workloads: FxHashMap::default(),
        labels: FxHashMap::default(),
    };
    for (key, entry) in entries {
        let field = format!("{name}.{key}");
        compiled
            .workloads
            .insert(key.clone(), workload(&field, entry, max_len)?);
        if let Some(l) = label_value(&field, "label", &entry.label, max_len)? {
            compiled.labels.insert(key.clone(), l);
        }
    }
    Ok(compiled)
}

fn workload(field: &str, e: &WorkloadEntry, max_len: usize) -> Result<Workload, ConfigError> {
    Ok(Workload {
        route_class: label_value(field, "route_class", &e.route_class, max_len)?,
        team: label_value(field, "team", &e.team, max_len)?,
        model: label_value(field, "model", &e.model, max_len)?,
    })
}

fn cache_hit_header(c: &CacheHitHeader) -> Result<(String, Vec<String>), ConfigError> {
    Ok((
        header_name("cache_hit_header.name", &c.name)?,
        c.values
            .iter()
            .map(|v| v.trim().to_ascii_lowercase())
            .collect(),
    ))
}

/// Where a request names its RAG collection and top-k, and the prefix of
/// the response headers of the RAG contract.
struct RagSources {
    collection_header: Option<String>,
    collection_field: Option<Vec<String>>,
    top_k_header: Option<String>,
    top_k_field: Option<Vec<String>>,
    header_prefix: String,
}

impl RagSources {
    fn compile(rag: &RagConfig) -> Result<Self, ConfigError> {
        let collection_header = opt_header("rag.collection_header", &rag.collection_header)?;
        let top_k_header = opt_header("rag.top_k_header", &rag.top_k_header)?;
        let collection_field = opt_field_path("rag.collection_field", &rag.collection_field)?;
        let top_k_field = opt_field_path("rag.top_k_field", &rag.top_k_field)?;
        let header_prefix = rag.response_header_prefix.trim().to_ascii_lowercase();
        if header_prefix.is_empty() || !is_token(&header_prefix) {
            return Err(field_err(
                "rag.response_header_prefix",
                "must be a non-empty header-name prefix",
            ));
        }
        Ok(Self {
            collection_header,
            collection_field,
            top_k_header,
            top_k_field,
            header_prefix,
        })
    }
}

/// Span export settings, checked once tracing is on (`cluster` set).
fn tracing(cluster: &str, t: &TracingConfig) -> Result<TracingConfig, ConfigError> {
    if cluster.trim().is_empty() {
        return Err(field_err("tracing.cluster", "must not be empty"));
    }
    if !(0.0..=1.0).contains(&t.sample_ratio) || t.sample_ratio.is_nan() {
        return Err(field_err("tracing.sample_ratio", "must be between 0 and 1"));
    }
    if !t.path.starts_with('/') {
        return Err(field_err("tracing.path", "must start with `/`"));
    }
    for (field, value) in [
        ("tracing.authority", &t.authority),
        ("tracing.service_name", &t.service_name),
        ("tracing.provider_name", &t.provider_name),
    ] {
        if value.trim().is_empty() {
            return Err(field_err(field, "must not be empty"));
        }
    }
    check_tracing_queue(t)?;
    Ok(t.clone())
}

fn check_tracing_queue(t: &TracingConfig) -> Result<(), ConfigError> {
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
    )
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

/// One optional label value of `field` (`routes.chat` + `team`), which must
/// already be a clean label value.
fn label_value(
    field: &str,
    name: &str,
    value: &Option<String>,
    max_len: usize,
) -> Result<Option<String>, ConfigError> {
    match value {
        None => Ok(None),
        Some(v) => sanitize_list(&format!("{field}.{name}"), std::slice::from_ref(v), max_len)
            .map(|mut l| l.pop()),
    }
}
