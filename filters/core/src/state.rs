//! Per-request values published as Envoy filter state, so access logs and
//! Envoy's own tracing can use them: `%FILTER_STATE(wasm.tokentap:PLAIN)%` (one
//! JSON object, the default) or `%FILTER_STATE(wasm.tokentap.ttft_ms:PLAIN)%`
//! (one key per value, `filter_state: "fields"`).
//!
//! Values are bounded label values and numbers, never prompt or completion
//! text. The shell writes them when the response ends, because Envoy runs the
//! connection manager's access loggers before the filter's own log callback.

use crate::labels::Dimension;
use crate::metrics::{Labeler, RequestLabels};
use crate::request::{RequestRecord, UsageSource};

/// Key of the summary object and prefix of the per-value keys; Envoy stores
/// them as `wasm.<key>`.
pub const KEY: &str = "tokentap";

/// The values as one JSON object (for [`crate::config::FilterStateMode::Summary`]).
/// Numbers are JSON numbers; keys are the names without the `tokentap.` prefix.
pub fn summary_json(values: &[(&'static str, String)]) -> String {
    let mut map = serde_json::Map::new();
    for (key, value) in values {
        let name = key.strip_prefix("tokentap.").unwrap_or(key);
        let v = match value.parse::<u64>() {
            Ok(n) if !name.ends_with("_id") => serde_json::Value::from(n),
            _ => match value.as_str() {
                "true" => serde_json::Value::Bool(true),
                "false" => serde_json::Value::Bool(false),
                _ => serde_json::Value::String(value.clone()),
            },
        };
        map.insert(name.to_string(), v);
    }
    serde_json::Value::Object(map).to_string()
}

/// The (key, value) pairs for a request; absent values are left out.
pub fn filter_state(
    rec: &RequestRecord,
    labels: &RequestLabels,
    labeler: &Labeler,
) -> Vec<(&'static str, String)> {
    let mut out: Vec<(&'static str, String)> = vec![
        (
            "tokentap.model",
            labeler.text(Dimension::Model, labels.model).to_string(),
        ),
        (
            "tokentap.tenant",
            labeler.text(Dimension::Tenant, labels.tenant).to_string(),
        ),
        (
            "tokentap.route_class",
            labeler
                .text(Dimension::RouteClass, labels.route_class)
                .to_string(),
        ),
        (
            "tokentap.team",
            labeler.text(Dimension::Team, labels.team).to_string(),
        ),
        ("tokentap.operation", rec.operation.as_str().to_string()),
        ("tokentap.streamed", rec.streamed.to_string()),
        ("tokentap.cache_hit", rec.cache_hit.is_some().to_string()),
    ];
    let mut num = |k: &'static str, v: Option<u64>| {
        if let Some(v) = v {
            out.push((k, v.to_string()));
        }
    };
    num("tokentap.ttfb_ms", rec.ttfb_ms());
    num("tokentap.ttft_ms", rec.ttft_ms());
    num("tokentap.tpot_ms", rec.tpot_ms());
    num(
        "tokentap.output_tokens_per_second",
        rec.output_tokens_per_second(),
    );
    num("tokentap.prompt_tokens", rec.usage.prompt_tokens);
    num("tokentap.completion_tokens", rec.completion_tokens());
    num("tokentap.cached_tokens", rec.usage.cached_tokens);
    num("tokentap.rag_top_k", rec.rag_top_k);
    let source = match rec.usage_source {
        UsageSource::Reported => "usage",
        UsageSource::Estimated => "estimated",
        UsageSource::None => "none",
    };
    out.push(("tokentap.usage_source", source.to_string()));
    if let Some(e) = rec.error {
        out.push(("tokentap.error_type", e.as_str().to_string()));
    }
    if rec.rag_collection.is_some() {
        out.push((
            "tokentap.rag_collection",
            labeler
                .text(Dimension::Collection, labels.collection)
                .to_string(),
        ));
    }
    out
}
