//! What tokentap reads out of OpenAI-compatible bodies, streamed.
//!
//! Three readers, each fed chunk by chunk and never holding a body:
//! - [`RequestReader`]: `model`, `stream`, `stream_options.include_usage`,
//!   `max_tokens`, and the configured RAG fields of a request body.
//! - [`JsonResponseReader`]: `model`, `usage`, `error`, `finish_reason` of a
//!   non-streamed response.
//! - [`StreamReader`]: per-event facts of a `text/event-stream` response: the
//!   first event that carries generated content (time to first token), the
//!   number of content events, the final `usage`, error events and `[DONE]`.
//!
//! Only lengths and flags of generated text are looked at; no prompt or
//! completion text is kept.

//!
//! The stream reader lives in `stream.rs`, its byte-search fast path in
//! `quick.rs`.

mod agentic;
mod quick;
mod stream;
#[cfg(test)]
mod tests;

use crate::json_scan::{Container, JsonScanner, JsonVisitor, Path, Scalar, ScanStatus};
use crate::labels::sanitize;

pub use stream::{StreamFacts, StreamReader};

/// Which response shapes a body speaks. Chat completions, completions and
/// embeddings share OpenAI's (`choices`, `usage`); the OpenAI Responses API
/// and the Anthropic Messages API each have their own typed events.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Api {
    #[default]
    OpenAi,
    /// OpenAI Responses API: `response.*` events, usage in
    /// `response.completed`.
    Responses,
    /// Anthropic Messages API: `message_start` / `content_block_delta` /
    /// `message_delta` events.
    Messages,
}

impl Api {
    pub fn of(operation: crate::config::Operation) -> Api {
        match operation {
            crate::config::Operation::Responses => Api::Responses,
            crate::config::Operation::Messages => Api::Messages,
            _ => Api::OpenAi,
        }
    }
}

/// Longest model name or error type kept from a body.
const MAX_TEXT: usize = 64;

/// Token counts as reported by `usage` (OpenAI or Anthropic-style names).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub total_tokens: Option<u64>,
    /// Prompt tokens read from a cache (`cached_tokens`,
    /// `cache_read_input_tokens`).
    pub cached_tokens: Option<u64>,
    pub reasoning_tokens: Option<u64>,
    /// Prompt tokens written to a cache (`cache_creation_input_tokens`).
    pub cache_creation_tokens: Option<u64>,
}

impl Usage {
    pub fn is_empty(&self) -> bool {
        *self == Usage::default()
    }

    /// Records a `usage.*` scalar; returns whether the path was a usage field.
    fn absorb(&mut self, path: &Path<'_>, value: &Scalar<'_>, prefix: &[&str]) -> bool {
        let n = prefix.len();
        if path.len() < n + 1 || !path.complete {
            return false;
        }
        for (i, p) in prefix.iter().enumerate() {
            match path.get(i) {
                Some(crate::json_scan::Segment::Key(k)) if k == p.as_bytes() => {}
                _ => return false,
            }
        }
        let key = |i: usize| match path.get(n + i) {
            Some(crate::json_scan::Segment::Key(k)) => Some(k),
            _ => None,
        };
        let v = value.as_u64();
        match (path.len() - n, key(0), key(1)) {
            (1, Some(b"prompt_tokens" | b"input_tokens"), _) => self.prompt_tokens = v,
            (1, Some(b"completion_tokens" | b"output_tokens"), _) => self.completion_tokens = v,
            (1, Some(b"total_tokens"), _) => self.total_tokens = v,
            (1, Some(b"cache_read_input_tokens"), _) => self.cached_tokens = v,
            (1, Some(b"cache_creation_input_tokens"), _) => self.cache_creation_tokens = v,
            (
                2,
                Some(b"prompt_tokens_details" | b"input_tokens_details"),
                Some(b"cached_tokens"),
            ) => self.cached_tokens = v,
            (
                2,
                Some(b"completion_tokens_details" | b"output_tokens_details"),
                Some(b"reasoning_tokens"),
            ) => self.reasoning_tokens = v,
            _ => return false,
        }
        true
    }

    /// Overlays fields present in `other` (later usage chunks refine earlier ones).
    fn merge(&mut self, other: &Usage) {
        macro_rules! take {
            ($f:ident) => {
                if other.$f.is_some() {
                    self.$f = other.$f;
                }
            };
        }
        take!(prompt_tokens);
        take!(completion_tokens);
        take!(total_tokens);
        take!(cached_tokens);
        take!(reasoning_tokens);
        take!(cache_creation_tokens);
    }
}

fn keep_text(s: &str) -> Option<String> {
    sanitize(s.as_bytes(), MAX_TEXT)
}

/// Facts from a request body.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestFacts {
    /// The `model` field, sanitised (not yet checked against the allowed set).
    pub model: Option<String>,
    pub stream: Option<bool>,
    pub has_stream_options: bool,
    pub include_usage: Option<bool>,
    pub max_tokens: Option<u64>,
    pub rag_collection: Option<String>,
    pub rag_top_k: Option<u64>,
}

/// Streams a request body and extracts [`RequestFacts`].
#[derive(Clone, Debug, Default)]
pub struct RequestReader {
    scanner: JsonScanner,
    facts: RequestFacts,
    collection_field: Option<Vec<String>>,
    top_k_field: Option<Vec<String>>,
}

struct RequestVisitor<'a> {
    facts: &'a mut RequestFacts,
    collection_field: Option<&'a [String]>,
    top_k_field: Option<&'a [String]>,
}

impl JsonVisitor for RequestVisitor<'_> {
    fn scalar(&mut self, path: &Path<'_>, value: Scalar<'_>) {
        if !path.complete {
            return;
        }
        // One dispatch on depth and keys: a body has many scalars (every
        // message's role and content) and few that matter.
        match (path.len(), path.key(0), path.key(1)) {
            (1, Some(b"model"), _) => self.facts.model = value.as_str().and_then(keep_text),
            (1, Some(b"stream"), _) => {
                self.facts.stream = match value {
                    Scalar::Bool(b) => Some(b),
                    _ => None,
                };
            }
            // `stream_options: null` (or any non-object) still exists: the
            // usage rewrite must replace it, not add a duplicate member.
            (1, Some(b"stream_options"), _) => self.facts.has_stream_options = true,
            (2, Some(b"stream_options"), Some(b"include_usage")) => {
                self.facts.include_usage = match value {
                    Scalar::Bool(b) => Some(b),
                    _ => None,
                };
            }
            (1, Some(b"max_tokens" | b"max_completion_tokens"), _) => {
                self.facts.max_tokens = value.as_u64();
            }
            _ => self.configured_field(path, value),
        }
    }

    fn enter(&mut self, path: &Path<'_>, _kind: Container) {
        if path.matches(&["stream_options"]) {
            self.facts.has_stream_options = true;
        }
    }
}

impl RequestVisitor<'_> {
    /// The RAG fields, at the paths the configuration names.
    fn configured_field(&mut self, path: &Path<'_>, value: Scalar<'_>) {
        if self.collection_field.is_some_and(|f| path.matches(f)) {
            self.facts.rag_collection = value.as_str().and_then(keep_text);
        } else if self.top_k_field.is_some_and(|f| path.matches(f)) {
            self.facts.rag_top_k = value
                .as_u64()
                .or_else(|| value.as_str().and_then(|s| s.trim().parse().ok()));
        }
    }
}

impl RequestReader {
    pub fn new(collection_field: Option<Vec<String>>, top_k_field: Option<Vec<String>>) -> Self {
        Self {
            collection_field,
            top_k_field,
            ..Self::default()
        }
    }

    pub fn feed(&mut self, chunk: &[u8]) {
        let mut v = RequestVisitor {
            facts: &mut self.facts,
            collection_field: self.collection_field.as_deref(),
            top_k_field: self.top_k_field.as_deref(),
        };
        self.scanner.feed(chunk, &mut v);
    }

    /// Ends the body; returns the facts and whether the body was valid JSON.
    pub fn finish(&mut self) -> (RequestFacts, ScanStatus) {
        let mut v = RequestVisitor {
            facts: &mut self.facts,
            collection_field: self.collection_field.as_deref(),
            top_k_field: self.top_k_field.as_deref(),
        };
        let status = self.scanner.finish(&mut v);
        (self.facts.clone(), status)
    }

    pub fn facts(&self) -> &RequestFacts {
        &self.facts
    }
}

/// Facts from a non-streamed JSON response.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResponseFacts {
    pub model: Option<String>,
    pub usage: Usage,
    /// `error.type` (or `error.code`) of an OpenAI-style error body.
    pub error_type: Option<String>,
    pub has_error: bool,
    pub finish_reason: Option<String>,
}

struct ResponseVisitor<'a> {
    facts: &'a mut ResponseFacts,
    api: Api,
}

impl JsonVisitor for ResponseVisitor<'_> {
    fn scalar(&mut self, path: &Path<'_>, value: Scalar<'_>) {
        if !path.complete {
            return;
        }
        match (path.len(), path.key(0)) {
            (_, Some(b"usage")) => {
                self.facts.usage.absorb(path, &value, &["usage"]);
            }
            (1, Some(b"model")) => self.facts.model = value.as_str().and_then(keep_text),
            (2, Some(b"error")) => match path.key(1) {
                Some(b"type") => self.facts.error_type = value.as_str().and_then(keep_text),
                Some(b"code") if self.facts.error_type.is_none() => {
                    self.facts.error_type = value.as_str().and_then(keep_text);
                }
                _ => {}
            },
            (3, Some(b"choices")) if path.is_index(1) && path.key(2) == Some(b"finish_reason") => {
                if let Some(r) = value.as_str().and_then(keep_text) {
                    self.facts.finish_reason = Some(r);
                }
            }
            _ if self.api != Api::OpenAi => self.other_api(path, &value),
            _ => {}
        }
    }

    fn enter(&mut self, path: &Path<'_>, kind: Container) {
        if kind == Container::Object && path.matches(&["error"]) {
            self.facts.has_error = true;
        }
    }
}

impl ResponseVisitor<'_> {
    /// The finish reason of a Responses object (`incomplete_details.reason`,
    /// else its terminal `status`) or of a Messages one (`stop_reason`).
    fn other_api(&mut self, path: &Path<'_>, value: &Scalar<'_>) {
        let keep = |v: &Scalar<'_>| v.as_str().and_then(keep_text);
        match (self.api, path.len(), path.key(0), path.key(1)) {
            (Api::Messages, 1, Some(b"stop_reason"), _) => {
                if let Some(r) = keep(value) {
                    self.facts.finish_reason = Some(r);
                }
            }
            (Api::Responses, 1, Some(b"status"), _) => {
                if let Some(r) = keep(value).filter(|s| agentic::terminal_status(s)) {
                    self.facts.finish_reason.get_or_insert(r);
                }
            }
            (Api::Responses, 2, Some(b"incomplete_details"), Some(b"reason")) => {
                if let Some(r) = keep(value) {
                    self.facts.finish_reason = Some(r);
                }
            }
            _ => {}
        }
    }
}

/// Streams a JSON response body.
#[derive(Clone, Debug, Default)]
pub struct JsonResponseReader {
    scanner: JsonScanner,
    facts: ResponseFacts,
    api: Api,
}

impl JsonResponseReader {
    /// A reader for the response bodies of `api`.
    pub fn for_api(api: Api) -> Self {
        Self {
            api,
            ..Self::default()
        }
    }

    pub fn feed(&mut self, chunk: &[u8]) {
        let mut v = ResponseVisitor {
            facts: &mut self.facts,
            api: self.api,
        };
        self.scanner.feed(chunk, &mut v);
    }

    pub fn finish(&mut self) -> (ResponseFacts, ScanStatus) {
        let mut v = ResponseVisitor {
            facts: &mut self.facts,
            api: self.api,
        };
        let status = self.scanner.finish(&mut v);
        (self.facts.clone(), status)
    }
}
