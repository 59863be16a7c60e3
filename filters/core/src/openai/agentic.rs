//! The event shapes of the OpenAI Responses API and the Anthropic Messages
//! API, read into the same per-event facts as an OpenAI chunk.
//!
//! Responses (`/v1/responses`): every event names its `type`; generated
//! content arrives in `response.*.delta` events as a top-level `delta`
//! string (`response.output_text.delta`, `response.reasoning_text.delta`,
//! `response.function_call_arguments.delta`, `response.refusal.delta`, ...);
//! `response.created` names the model and `response.completed` /
//! `response.incomplete` / `response.failed` carry the final response
//! with `usage` (`input_tokens`, `input_tokens_details.cached_tokens`,
//! `output_tokens`, `output_tokens_details.reasoning_tokens`). An `error`
//! event has a top-level `code`; a failed response a `response.error`.
//!
//! Messages (`/v1/messages`): `message_start` carries `message.model` and
//! `message.usage` (`input_tokens`, `cache_read_input_tokens`,
//! `cache_creation_input_tokens`, and an `output_tokens` placeholder that
//! is not the answer's count and is ignored); `content_block_start` opens
//! a text, thinking or tool-use block; `content_block_delta` carries
//! `delta.text` (`text_delta`), `delta.thinking` (`thinking_delta`) or
//! `delta.partial_json` (`input_json_delta`); `message_delta` the
//! `stop_reason` and the cumulative `usage.output_tokens`; an `error`
//! event an `error` object with its `type`.
//!
//! Which event a scalar belongs to is only known once the event ends (JSON
//! does not order keys), so the visitors note what they saw and
//! [`settle`] decides.

use super::keep_text;
use super::stream::EventFacts;
use crate::json_scan::{Container, JsonVisitor, Path, Scalar};

/// The `type` of an event, as far as it matters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) enum Kind {
    #[default]
    Other,
    /// Responses `response.*.delta`; Messages `content_block_delta`.
    Delta,
    /// Messages `content_block_start`.
    BlockStart,
    /// `error` (both APIs).
    Error,
    /// Responses `response.failed`.
    Failed,
}

/// A Responses `status` that ends a response.
pub(super) fn terminal_status(s: &str) -> bool {
    matches!(s, "completed" | "incomplete" | "failed" | "cancelled")
}

fn nonempty(value: &Scalar<'_>) -> bool {
    matches!(value, Scalar::Str { len, .. } if *len > 0)
}

pub(super) struct ResponsesVisitor<'a> {
    pub facts: &'a mut EventFacts,
    pub want_model: bool,
}

impl JsonVisitor for ResponsesVisitor<'_> {
    fn scalar(&mut self, path: &Path<'_>, value: Scalar<'_>) {
        if !path.complete {
            return;
        }
        let f = &mut *self.facts;
        match (path.len(), path.key(0), path.key(1)) {
            (1, Some(b"type"), _) => {
                f.kind = match value.as_str() {
                    Some("error") => Kind::Error,
                    Some("response.failed") => Kind::Failed,
                    Some(t) if t.starts_with("response.") && t.ends_with(".delta") => Kind::Delta,
                    _ => Kind::Other,
                };
            }
            (1, Some(b"delta"), _) => f.text |= nonempty(&value),
            (1, Some(b"code"), _) => f.code = value.as_str().and_then(keep_text),
            (_, Some(b"response"), Some(b"usage")) => {
                f.usage.absorb(path, &value, &["response", "usage"]);
            }
            (2, Some(b"response"), Some(b"model")) if self.want_model => {
                f.model = value.as_str().and_then(keep_text);
            }
            (2, Some(b"response"), Some(b"status")) => {
                if let Some(s) = value.as_str().filter(|s| terminal_status(s)) {
                    if f.finish_reason.is_none() {
                        f.finish_reason = keep_text(s);
                    }
                }
            }
            (3, Some(b"response"), Some(b"incomplete_details"))
                if path.key(2) == Some(b"reason") =>
            {
                if let Some(r) = value.as_str().and_then(keep_text) {
                    f.finish_reason = Some(r);
                }
            }
            (3, Some(b"response"), Some(b"error")) if matches!(path.key(2), Some(b"code")) => {
                f.error_type = value.as_str().and_then(keep_text);
            }
            (2, Some(b"error"), Some(b"type" | b"code")) if f.error_type.is_none() => {
                f.error_type = value.as_str().and_then(keep_text);
            }
            _ => {}
        }
    }

    fn enter(&mut self, path: &Path<'_>, kind: Container) {
        if kind == Container::Object
            && path.complete
            && (path.matches(&["error"]) || path.matches(&["response", "error"]))
        {
            self.facts.has_error = true;
        }
    }
}

pub(super) struct MessagesVisitor<'a> {
    pub facts: &'a mut EventFacts,
    pub want_model: bool,
}

impl JsonVisitor for MessagesVisitor<'_> {
    fn scalar(&mut self, path: &Path<'_>, value: Scalar<'_>) {
        if !path.complete {
            return;
        }
        let f = &mut *self.facts;
        match (path.len(), path.key(0), path.key(1)) {
            (1, Some(b"type"), _) => {
                f.kind = match value.as_str() {
                    Some("content_block_delta") => Kind::Delta,
                    Some("content_block_start") => Kind::BlockStart,
                    Some("error") => Kind::Error,
                    _ => Kind::Other,
                };
            }
            (2, Some(b"delta"), Some(b"text" | b"thinking" | b"partial_json")) => {
                f.text |= nonempty(&value);
            }
            (2, Some(b"delta"), Some(b"stop_reason")) => {
                if let Some(r) = value.as_str().and_then(keep_text) {
                    f.finish_reason = Some(r);
                }
            }
            (_, Some(b"usage"), _) => {
                f.usage.absorb(path, &value, &["usage"]);
            }
            // `message_start`'s output count is a placeholder (0 or 1), not
            // the answer's: only `message_delta` reports it.
            (3, Some(b"message"), Some(b"usage")) if path.key(2) == Some(b"output_tokens") => {}
            (_, Some(b"message"), Some(b"usage")) => {
                f.usage.absorb(path, &value, &["message", "usage"]);
            }
            (2, Some(b"message"), Some(b"model")) if self.want_model => {
                f.model = value.as_str().and_then(keep_text);
            }
            (2, Some(b"content_block"), Some(b"type")) => {
                f.tool |= matches!(value.as_str(), Some("tool_use" | "server_tool_use"));
            }
            (2, Some(b"content_block"), Some(b"text" | b"thinking")) => {
                f.text |= nonempty(&value);
            }
            (2, Some(b"error"), Some(b"type")) => {
                f.error_type = value.as_str().and_then(keep_text);
            }
            _ => {}
        }
    }

    fn enter(&mut self, path: &Path<'_>, kind: Container) {
        if kind == Container::Object && path.complete && path.matches(&["error"]) {
            self.facts.has_error = true;
        }
    }
}

/// Decides, at the end of an event, what its notes mean.
pub(super) fn settle(f: &mut EventFacts) {
    match f.kind {
        Kind::Delta => f.has_content |= f.text,
        Kind::BlockStart => f.has_content |= f.text || f.tool,
        Kind::Error => {
            f.has_error = true;
            if f.error_type.is_none() {
                f.error_type = f.code.take();
            }
        }
        Kind::Failed => f.has_error = true,
        Kind::Other => {}
    }
}

#[cfg(test)]
mod tests;
