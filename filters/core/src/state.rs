//! Per-request values published as Envoy filter state, so access logs and
//! Envoy's own tracing can use them: `%FILTER_STATE(wasm.tokentap:PLAIN)%` (one
//! JSON object, the default) or `%FILTER_STATE(wasm.tokentap.ttft_ms:PLAIN)%`
//! (one key per value, `filter_state: "fields"`).
//!
//! Values are bounded label values and numbers, never prompt or completion
//! text. Each value carries its JSON type, so a tenant called `42` stays a
//! string. They are written once, when the request is complete: when the
//! response ends, or at the shell's end-of-stream callback for a stream cut
//! short (Envoy 1.40 runs both shells' callback before it writes the access
//! log, so a client abort's values reach it too; tested in
//! `tests/e2e/test_error_types.py`).

use std::borrow::Cow;
use std::fmt::Write as _;

use crate::labels::Dimension;
use crate::metrics::{Labeler, RequestLabels};
use crate::request::{RequestRecord, UsageSource};
use crate::trace::SpanStart;

/// Key of the summary object and prefix of the per-value keys; Envoy stores
/// them as `wasm.<key>`.
pub const KEY: &str = "tokentap";

/// A filter-state value with its JSON type. Text borrows the label value
/// where it can: a request writes a dozen of them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value<'a> {
    Text(Cow<'a, str>),
    Number(u64),
    Bool(bool),
}

impl Value<'_> {
    /// The value as plain text (the per-key form).
    pub fn plain(&self) -> String {
        match self {
            Value::Text(s) => s.to_string(),
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
        }
    }
}

/// The filter-state values of one request, by name (without the prefix).
pub type Values<'a> = Vec<(&'static str, Value<'a>)>;

/// The full key of a value in the per-key form, e.g. `tokentap.ttft_ms`.
pub fn field_key(name: &str) -> String {
    format!("{KEY}.{name}")
}

/// The values as one JSON object.
///
/// ```
/// use tokentap_core::state::{summary_json, Value};
/// let json = summary_json(&[("tenant", Value::Text("42".into())), ("ttft_ms", Value::Number(7))]);
/// assert_eq!(json, r#"{"tenant":"42","ttft_ms":7}"#);
/// ```
pub fn summary_json(values: &[(&'static str, Value<'_>)]) -> String {
    let mut out = String::with_capacity(64 + values.len() * 24);
    out.push('{');
    for (i, (name, value)) in values.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_json_string(&mut out, name);
        out.push(':');
        match value {
            Value::Text(s) => push_json_string(&mut out, s),
            Value::Number(n) => {
                let _ = write!(out, "{n}");
            }
            Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        }
    }
    out.push('}');
    out
}

/// A JSON string literal. Label values are sanitised to `[A-Za-z0-9-_.:/]`,
/// but escaping does not rely on it.
fn push_json_string(out: &mut String, s: &str) {
    out.push('"');
    let mut rest = s;
    // Runs that need no escaping are copied whole (label values always are
    // one run), found eight bytes at a time; only the bytes that need it are
    // escaped one by one.
    loop {
        let at = crate::json_scan::string_run_len(rest.as_bytes());
        if at == rest.len() {
            break;
        }
        out.push_str(&rest[..at]);
        match rest.as_bytes()[at] {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            b => {
                let _ = write!(out, "\\u{:04x}", b);
            }
        }
        // The escaped byte is ASCII, so `at + 1` is a character boundary.
        rest = &rest[at + 1..];
    }
    out.push_str(rest);
    out.push('"');
}

/// The values of a request; absent values are left out.
pub fn filter_state<'a>(
    rec: &RequestRecord,
    labels: &RequestLabels,
    labeler: &'a Labeler,
    span: Option<&SpanStart>,
) -> Values<'a> {
    let label = |d: Dimension| Value::Text(Cow::Borrowed(labeler.text(d, labels.get(d))));
    // Room for every value a request can have: one allocation.
    let mut out: Values<'_> = Vec::with_capacity(20);
    out.extend([
        ("model", label(Dimension::Model)),
        ("tenant", label(Dimension::Tenant)),
        ("route_class", label(Dimension::RouteClass)),
        ("team", label(Dimension::Team)),
        (
            "operation",
            Value::Text(Cow::Borrowed(rec.operation.as_str())),
        ),
        ("streamed", Value::Bool(rec.streamed)),
        ("cache_hit", Value::Bool(rec.cache_hit.is_some())),
    ]);
    let numbers = [
        ("ttfb_ms", rec.ttfb_ms()),
        ("ttft_ms", rec.ttft_ms()),
        ("tpot_ms", rec.tpot_ms()),
        ("output_tokens_per_second", rec.output_tokens_per_second()),
        ("prompt_tokens", rec.usage.prompt_tokens),
        ("completion_tokens", rec.completion_tokens()),
        ("cached_tokens", rec.usage.cached_tokens),
        ("rag_top_k", rec.rag_top_k),
    ];
    out.extend(
        numbers
            .into_iter()
            .filter_map(|(k, v)| Some((k, Value::Number(v?)))),
    );
    let source = match rec.token_source() {
        Some(s) => s.as_str(),
        None => {
            debug_assert_eq!(rec.usage_source, UsageSource::None);
            "none"
        }
    };
    out.push(("usage_source", Value::Text(Cow::Borrowed(source))));
    if let Some(e) = rec.error {
        out.push(("error_type", Value::Text(Cow::Borrowed(e.as_str()))));
    }
    if rec.rag_collection.is_some() {
        out.push(("rag_collection", label(Dimension::Collection)));
    }
    if let Some(span) = span {
        out.push((
            "trace_id",
            Value::Text(span.context.trace_id.to_string().into()),
        ));
        out.push((
            "span_id",
            Value::Text(span.context.span_id.to_string().into()),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_keep_their_json_type() {
        let json = summary_json(&[
            ("tenant", Value::Text("42".into())),
            ("model", Value::Text("true".into())),
            ("streamed", Value::Bool(true)),
            ("ttft_ms", Value::Number(150)),
        ]);
        let parsed: serde_json::Value = serde_json::from_str(&json).unwrap_or_default();
        assert_eq!(parsed["tenant"], serde_json::json!("42"));
        assert_eq!(parsed["model"], serde_json::json!("true"));
        assert_eq!(parsed["streamed"], serde_json::json!(true));
        assert_eq!(parsed["ttft_ms"], serde_json::json!(150));
    }

    #[test]
    fn strings_are_escaped() {
        let json = summary_json(&[("k", Value::Text("a\"b\\c\u{1}".into()))]);
        let parsed: serde_json::Value = serde_json::from_str(&json).unwrap_or_default();
        assert_eq!(parsed["k"], serde_json::json!("a\"b\\c\u{1}"));
    }

    #[test]
    fn plain_form_is_the_text() {
        assert_eq!(Value::Number(3).plain(), "3");
        assert_eq!(Value::Bool(false).plain(), "false");
        assert_eq!(Value::Text("x".into()).plain(), "x");
        assert_eq!(field_key("ttft_ms"), "tokentap.ttft_ms");
    }
}
