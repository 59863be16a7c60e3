//! A finished span and the resource it belongs to, independent of OTLP.
//!
//! The shell fills a [`SpanRecord`] while a request runs and hands it to the
//! batcher when the request ends. Values are capped here (attribute count,
//! string length, events) because every byte of a span sits in a per-VM
//! queue until the collector takes it; an unbounded `rag.sources` or error
//! message must not be able to crowd out other spans.

use std::borrow::Cow;

use super::context::{SpanId, TraceFlags, TraceId};
use super::sampler::SpanStart;
use super::semconv;

/// Attributes kept per span; later distinct keys are counted as dropped.
pub const MAX_ATTRIBUTES: usize = 64;
/// Events kept per span; later events are counted as dropped.
pub const MAX_EVENTS: usize = 16;
/// String values (and the status message) are cut to this many bytes.
pub const MAX_VALUE_BYTES: usize = 1024;
/// String arrays keep at most this many items.
pub const MAX_ARRAY_ITEMS: usize = 32;
/// Resource attributes kept; the resource is sent with every batch.
pub const MAX_RESOURCE_ATTRIBUTES: usize = 32;
/// Resource values are cut to this many bytes.
pub const MAX_RESOURCE_VALUE_BYTES: usize = 256;

/// OTLP span kinds (the gateway span is [`SpanKind::Server`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum SpanKind {
    #[default]
    Internal,
    Server,
    Client,
    Producer,
    Consumer,
}

/// Attribute values the gateway needs: OTLP's scalar types plus string
/// arrays (`gen_ai.response.finish_reasons`, `rag.sources`).
#[derive(Clone, Debug, PartialEq)]
pub enum AttrValue {
    Str(String),
    Int(i64),
    Double(f64),
    Bool(bool),
    StrArray(Vec<String>),
}

/// A key/value pair; keys are usually the `&'static` constants of
/// [`semconv`], so no allocation per attribute.
#[derive(Clone, Debug, PartialEq)]
pub struct Attribute {
    pub key: Cow<'static, str>,
    pub value: AttrValue,
}

/// A timestamped point inside a span (e.g. `gen_ai.first_token`).
#[derive(Clone, Debug, PartialEq)]
pub struct SpanEvent {
    pub name: Cow<'static, str>,
    pub time_unix_nanos: u64,
    pub attributes: Vec<Attribute>,
}

/// OTLP status; `Error` carries a short developer-facing message.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum SpanStatus {
    #[default]
    Unset,
    Ok,
    Error(String),
}

/// One finished span, ready to be queued and encoded.
#[derive(Clone, Debug, PartialEq)]
pub struct SpanRecord {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub parent_span_id: Option<SpanId>,
    /// The parent lives in another process (the gateway span's caller).
    pub parent_is_remote: bool,
    /// W3C flags of this span (sampled bit set for anything exported).
    pub flags: TraceFlags,
    pub trace_state: String,
    pub name: String,
    pub kind: SpanKind,
    pub start_unix_nanos: u64,
    pub end_unix_nanos: u64,
    pub attributes: Vec<Attribute>,
    pub events: Vec<SpanEvent>,
    pub status: SpanStatus,
    pub dropped_attributes_count: u32,
    pub dropped_events_count: u32,
}

/// The entity producing spans (this gateway pod), sent once per batch.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Resource {
    pub attributes: Vec<Attribute>,
}

// === impl AttrValue ===

impl AttrValue {
    /// The value cut to the per-value limits (char boundaries respected).
    fn bounded(self, max_bytes: usize) -> AttrValue {
        match self {
            AttrValue::Str(s) => AttrValue::Str(truncate_utf8(s, max_bytes)),
            AttrValue::StrArray(items) => AttrValue::StrArray(
                items
                    .into_iter()
                    .take(MAX_ARRAY_ITEMS)
                    .map(|s| truncate_utf8(s, max_bytes))
                    .collect(),
            ),
            other => other,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            AttrValue::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match self {
            AttrValue::Int(v) => Some(*v),
            _ => None,
        }
    }
}

impl From<&str> for AttrValue {
    fn from(v: &str) -> Self {
        AttrValue::Str(v.to_owned())
    }
}

impl From<String> for AttrValue {
    fn from(v: String) -> Self {
        AttrValue::Str(v)
    }
}

impl From<i64> for AttrValue {
    fn from(v: i64) -> Self {
        AttrValue::Int(v)
    }
}

impl From<u32> for AttrValue {
    fn from(v: u32) -> Self {
        AttrValue::Int(i64::from(v))
    }
}

/// Token counts and sizes are `u64` in the shell; OTLP ints are `i64`.
/// Values beyond `i64::MAX` saturate rather than wrap negative.
impl From<u64> for AttrValue {
    fn from(v: u64) -> Self {
        AttrValue::Int(i64::try_from(v).unwrap_or(i64::MAX))
    }
}

impl From<f64> for AttrValue {
    fn from(v: f64) -> Self {
        AttrValue::Double(v)
    }
}

impl From<bool> for AttrValue {
    fn from(v: bool) -> Self {
        AttrValue::Bool(v)
    }
}

impl From<Vec<String>> for AttrValue {
    fn from(v: Vec<String>) -> Self {
        AttrValue::StrArray(v)
    }
}

// === impl Attribute / SpanEvent ===

impl Attribute {
    pub fn new(key: impl Into<Cow<'static, str>>, value: impl Into<AttrValue>) -> Self {
        Attribute {
            key: key.into(),
            value: value.into(),
        }
    }
}

impl SpanEvent {
    pub fn new(name: impl Into<Cow<'static, str>>, time_unix_nanos: u64) -> Self {
        SpanEvent {
            name: name.into(),
            time_unix_nanos,
            attributes: Vec::new(),
        }
    }

    /// Adds an attribute (bounded like span attributes).
    pub fn with_attribute(
        mut self,
        key: impl Into<Cow<'static, str>>,
        value: impl Into<AttrValue>,
    ) -> Self {
        if self.attributes.len() < MAX_ATTRIBUTES {
            let value = value.into().bounded(MAX_VALUE_BYTES);
            self.attributes.push(Attribute::new(key, value));
        }
        self
    }
}

// === impl SpanRecord ===

impl SpanRecord {
    /// A span for the context decided by the sampler, started at
    /// `start_unix_nanos`; it ends at the same instant until [`end`] is called.
    ///
    /// [`end`]: SpanRecord::end
    pub fn new(
        start: &SpanStart,
        name: impl Into<String>,
        kind: SpanKind,
        start_unix_nanos: u64,
    ) -> Self {
        SpanRecord {
            trace_id: start.context.trace_id,
            span_id: start.context.span_id,
            parent_span_id: start.parent_span_id,
            parent_is_remote: start.parent_is_remote(),
            flags: start.context.flags,
            trace_state: start.context.trace_state.clone(),
            name: truncate_utf8(name.into(), MAX_VALUE_BYTES),
            kind,
            start_unix_nanos,
            end_unix_nanos: start_unix_nanos,
            attributes: Vec::new(),
            events: Vec::new(),
            status: SpanStatus::Unset,
            dropped_attributes_count: 0,
            dropped_events_count: 0,
        }
    }

    /// Sets an attribute, replacing a previous value for the same key (OTLP
    /// keys must be unique). Beyond [`MAX_ATTRIBUTES`] distinct keys the
    /// attribute is dropped and counted.
    pub fn set_attribute(
        &mut self,
        key: impl Into<Cow<'static, str>>,
        value: impl Into<AttrValue>,
    ) {
        let key = key.into();
        let value = value.into().bounded(MAX_VALUE_BYTES);
        if let Some(existing) = self.attributes.iter_mut().find(|a| a.key == key) {
            existing.value = value;
        } else if self.attributes.len() < MAX_ATTRIBUTES {
            self.attributes.push(Attribute { key, value });
        } else {
            self.dropped_attributes_count = self.dropped_attributes_count.saturating_add(1);
        }
    }

    pub fn attribute(&self, key: &str) -> Option<&AttrValue> {
        self.attributes
            .iter()
            .find(|a| a.key == key)
            .map(|a| &a.value)
    }

    /// Records an event; beyond [`MAX_EVENTS`] it is dropped and counted.
    pub fn add_event(&mut self, event: SpanEvent) {
        if self.events.len() < MAX_EVENTS {
            self.events.push(event);
        } else {
            self.dropped_events_count = self.dropped_events_count.saturating_add(1);
        }
    }

    pub fn set_status(&mut self, status: SpanStatus) {
        self.status = match status {
            SpanStatus::Error(message) => {
                SpanStatus::Error(truncate_utf8(message, MAX_VALUE_BYTES))
            }
            other => other,
        };
    }

    /// Marks the span failed the OTel way: status ERROR plus `error.type`
    /// (a low-cardinality class such as `timeout` or `503`).
    pub fn set_error(&mut self, error_type: impl Into<String>, message: impl Into<String>) {
        self.set_attribute(semconv::ERROR_TYPE, AttrValue::Str(error_type.into()));
        self.set_status(SpanStatus::Error(message.into()));
    }

    /// Ends the span; a clock that stepped backwards yields a zero-length span
    /// rather than an end before the start.
    pub fn end(&mut self, end_unix_nanos: u64) {
        self.end_unix_nanos = end_unix_nanos.max(self.start_unix_nanos);
    }
}

// === Resource ===

impl Resource {
    pub fn attribute(&self, key: &str) -> Option<&AttrValue> {
        self.attributes
            .iter()
            .find(|a| a.key == key)
            .map(|a| &a.value)
    }
}

/// Builds the gateway's [`Resource`] from what the shell can find out: its
/// configuration, Envoy node metadata and environment-style key/value pairs.
/// Later settings override earlier ones for the same key.
#[derive(Clone, Debug)]
pub struct ResourceBuilder {
    attributes: Vec<Attribute>,
}

impl Default for ResourceBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl ResourceBuilder {
    /// Starts with `service.name = tokentap-gateway` and
    /// `tokentap.plugin.version` = this crate's version.
    pub fn new() -> Self {
        ResourceBuilder {
            attributes: Vec::new(),
        }
        .attribute(semconv::SERVICE_NAME, semconv::DEFAULT_SERVICE_NAME)
        .attribute(semconv::TOKENTAP_PLUGIN_VERSION, env!("CARGO_PKG_VERSION"))
    }

    pub fn service_name(self, name: &str) -> Self {
        self.attribute(semconv::SERVICE_NAME, name)
    }

    pub fn service_version(self, version: &str) -> Self {
        self.attribute(semconv::SERVICE_VERSION, version)
    }

    /// Sets any attribute. Empty string values are ignored (an unset env var
    /// must not blank a default); the count is capped at
    /// [`MAX_RESOURCE_ATTRIBUTES`].
    pub fn attribute(
        mut self,
        key: impl Into<Cow<'static, str>>,
        value: impl Into<AttrValue>,
    ) -> Self {
        let key = key.into();
        let value = value.into().bounded(MAX_RESOURCE_VALUE_BYTES);
        if key.is_empty() || matches!(&value, AttrValue::Str(s) if s.is_empty()) {
            return self;
        }
        if let Some(existing) = self.attributes.iter_mut().find(|a| a.key == key) {
            existing.value = value;
        } else if self.attributes.len() < MAX_RESOURCE_ATTRIBUTES {
            self.attributes.push(Attribute { key, value });
        }
        self
    }

    /// Applies key/value pairs gathered from Envoy node metadata or the
    /// environment. Keys are either OTel attribute names (`k8s.pod.name`,
    /// anything containing a `.`), taken as they are, or well-known variable
    /// names mapped to them (see [`resource_key_for`]); `OTEL_RESOURCE_ATTRIBUTES`
    /// is expanded. Other keys are ignored, so a whole environment can be
    /// passed without leaking unrelated variables into every span batch.
    pub fn pairs<'a>(mut self, pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        for (key, value) in pairs {
            let key = key.trim();
            let value = value.trim();
            if key == "OTEL_RESOURCE_ATTRIBUTES" {
                if let Ok(list) = parse_otel_resource_attributes(value) {
                    for (k, v) in list {
                        if is_attribute_name(&k) {
                            self = self.attribute(k, v);
                        }
                    }
                }
            } else if let Some(canonical) = resource_key_for(key) {
                self = self.attribute(canonical, value);
            } else if is_attribute_name(key) {
                self = self.attribute(key.to_owned(), value);
            }
        }
        self
    }

    pub fn build(self) -> Resource {
        Resource {
            attributes: self.attributes,
        }
    }
}

/// Maps well-known environment / node-metadata names to resource keys: the
/// Downward-API variable names used in our manifests (`POD_NAME`, ...), their
/// `K8S_`-prefixed variants, Istio's node metadata (`NAME`, `NAMESPACE`) and
/// `OTEL_SERVICE_NAME`.
pub fn resource_key_for(name: &str) -> Option<&'static str> {
    Some(match name {
        "OTEL_SERVICE_NAME" | "SERVICE_NAME" => semconv::SERVICE_NAME,
        "SERVICE_VERSION" => semconv::SERVICE_VERSION,
        "POD_NAME" | "K8S_POD_NAME" | "NAME" => semconv::K8S_POD_NAME,
        "POD_NAMESPACE" | "K8S_NAMESPACE" | "K8S_NAMESPACE_NAME" | "NAMESPACE" => {
            semconv::K8S_NAMESPACE_NAME
        }
        "NODE_NAME" | "K8S_NODE_NAME" => semconv::K8S_NODE_NAME,
        "POD_UID" | "K8S_POD_UID" => semconv::K8S_POD_UID,
        "CLUSTER_NAME" | "K8S_CLUSTER_NAME" => semconv::K8S_CLUSTER_NAME,
        "CONTAINER_NAME" | "K8S_CONTAINER_NAME" => semconv::K8S_CONTAINER_NAME,
        _ => return None,
    })
}

/// An OTel-style attribute name: lowercase-led, dotted, `[a-z0-9_.-]`.
fn is_attribute_name(key: &str) -> bool {
    key.contains('.')
        && key.len() <= 128
        && key.starts_with(|c: char| c.is_ascii_lowercase())
        && key
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

/// Why an `OTEL_RESOURCE_ATTRIBUTES` value was discarded as a whole (the
/// OTel spec asks for all-or-nothing on decoding errors).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResourceAttributesError {
    #[error("list member without `=`")]
    MissingEquals,
    #[error("empty key")]
    EmptyKey,
    #[error("invalid percent-encoding")]
    BadPercentEncoding,
}

/// Parses the `OTEL_RESOURCE_ATTRIBUTES` format: `k1=v1,k2=v2`, whitespace
/// around members ignored, values percent-decoded.
pub fn parse_otel_resource_attributes(
    value: &str,
) -> Result<Vec<(String, String)>, ResourceAttributesError> {
    let mut out = Vec::new();
    for member in value.split(',') {
        let member = member.trim();
        if member.is_empty() {
            continue;
        }
        let (key, val) = member
            .split_once('=')
            .ok_or(ResourceAttributesError::MissingEquals)?;
        let key = key.trim();
        if key.is_empty() {
            return Err(ResourceAttributesError::EmptyKey);
        }
        out.push((key.to_owned(), percent_decode(val.trim())?));
    }
    Ok(out)
}

fn percent_decode(value: &str) -> Result<String, ResourceAttributesError> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .ok_or(ResourceAttributesError::BadPercentEncoding)?;
            let digit = |b: u8| char::from(b).to_digit(16);
            match (digit(hex[0]), digit(hex[1])) {
                (Some(hi), Some(lo)) => out.push((hi * 16 + lo) as u8),
                _ => return Err(ResourceAttributesError::BadPercentEncoding),
            }
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ResourceAttributesError::BadPercentEncoding)
}

/// Cuts `s` to at most `max` bytes without splitting a UTF-8 character.
pub(crate) fn truncate_utf8(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

#[cfg(test)]
mod tests;
