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

use crate::json_scan::{Container, JsonScanner, JsonVisitor, Path, Scalar, ScanStatus};
use crate::labels::sanitize;
use crate::sse::{DataSink, EventMeta, SseFramer};

/// Longest model name or error type kept from a body.
const MAX_TEXT: usize = 64;

/// Token counts as reported by `usage` (OpenAI or Anthropic-style names).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub total_tokens: Option<u64>,
    pub cached_tokens: Option<u64>,
    pub reasoning_tokens: Option<u64>,
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
        if path.matches(&["model"]) {
            self.facts.model = value.as_str().and_then(keep_text);
        } else if path.matches(&["stream"]) {
            self.facts.stream = match value {
                Scalar::Bool(b) => Some(b),
                _ => None,
            };
        } else if path.matches(&["stream_options"]) {
            // `stream_options: null` (or any non-object) still exists: the
            // usage rewrite must replace it, not add a duplicate member.
            self.facts.has_stream_options = true;
        } else if path.matches(&["stream_options", "include_usage"]) {
            self.facts.include_usage = match value {
                Scalar::Bool(b) => Some(b),
                _ => None,
            };
        } else if path.matches(&["max_tokens"]) || path.matches(&["max_completion_tokens"]) {
            self.facts.max_tokens = value.as_u64();
        } else if self.collection_field.is_some_and(|f| path.matches_owned(f)) {
            self.facts.rag_collection = value.as_str().and_then(keep_text);
        } else if self.top_k_field.is_some_and(|f| path.matches_owned(f)) {
            self.facts.rag_top_k = value
                .as_u64()
                .or_else(|| value.as_str().and_then(|s| s.trim().parse().ok()));
        }
    }

    fn enter(&mut self, path: &Path<'_>, _kind: Container) {
        if path.matches(&["stream_options"]) {
            self.facts.has_stream_options = true;
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
}

impl JsonVisitor for ResponseVisitor<'_> {
    fn scalar(&mut self, path: &Path<'_>, value: Scalar<'_>) {
        if self.facts.usage.absorb(path, &value, &["usage"]) {
            return;
        }
        if path.matches(&["model"]) {
            self.facts.model = value.as_str().and_then(keep_text);
        } else if path.matches(&["error", "type"])
            || (path.matches(&["error", "code"]) && self.facts.error_type.is_none())
        {
            self.facts.error_type = value.as_str().and_then(keep_text);
        } else if path.matches(&["choices", "[]", "finish_reason"]) {
            if let Some(r) = value.as_str().and_then(keep_text) {
                self.facts.finish_reason = Some(r);
            }
        }
    }

    fn enter(&mut self, path: &Path<'_>, kind: Container) {
        if kind == Container::Object && path.matches(&["error"]) {
            self.facts.has_error = true;
        }
    }
}

/// Streams a JSON response body.
#[derive(Clone, Debug, Default)]
pub struct JsonResponseReader {
    scanner: JsonScanner,
    facts: ResponseFacts,
}

impl JsonResponseReader {
    pub fn feed(&mut self, chunk: &[u8]) {
        let mut v = ResponseVisitor {
            facts: &mut self.facts,
        };
        self.scanner.feed(chunk, &mut v);
    }

    pub fn finish(&mut self) -> (ResponseFacts, ScanStatus) {
        let mut v = ResponseVisitor {
            facts: &mut self.facts,
        };
        let status = self.scanner.finish(&mut v);
        (self.facts.clone(), status)
    }
}

/// Facts of one SSE event's JSON data.
#[derive(Clone, Debug, Default)]
struct EventFacts {
    has_content: bool,
    usage: Usage,
    model: Option<String>,
    has_error: bool,
    error_type: Option<String>,
    finish_reason: Option<String>,
}

struct EventVisitor<'a> {
    facts: &'a mut EventFacts,
}

impl JsonVisitor for EventVisitor<'_> {
    fn scalar(&mut self, path: &Path<'_>, value: Scalar<'_>) {
        if let Scalar::Str { len, .. } = value {
            if len > 0
                && (path.matches(&["choices", "[]", "delta", "content"])
                    || path.matches(&["choices", "[]", "delta", "reasoning_content"])
                    || path.matches(&["choices", "[]", "delta", "reasoning"])
                    || path.matches(&["choices", "[]", "text"])
                    || path.matches(&["delta", "text"]))
            {
                self.facts.has_content = true;
                return;
            }
        }
        if self.facts.usage.absorb(path, &value, &["usage"])
            || self.facts.usage.absorb(path, &value, &["message", "usage"])
        {
            return;
        }
        if path.matches(&["model"]) {
            self.facts.model = value.as_str().and_then(keep_text);
        } else if path.matches(&["choices", "[]", "finish_reason"]) {
            if let Some(r) = value.as_str().and_then(keep_text) {
                self.facts.finish_reason = Some(r);
            }
        } else if (path.matches(&["error", "type"]) || path.matches(&["error", "code"]))
            && self.facts.error_type.is_none()
        {
            self.facts.error_type = value.as_str().and_then(keep_text);
        }
    }

    fn enter(&mut self, path: &Path<'_>, kind: Container) {
        if path.matches(&["choices", "[]", "delta", "tool_calls"])
            || path.matches(&["choices", "[]", "delta", "function_call"])
        {
            self.facts.has_content = true;
        } else if kind == Container::Object && path.matches(&["error"]) {
            self.facts.has_error = true;
        }
    }
}

/// Aggregate facts of a whole event stream.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StreamFacts {
    /// Events that carried generated content (text, reasoning or tool calls).
    pub content_events: u64,
    /// Host time (ns) of the first content event, when its last byte arrived.
    pub first_content_ns: Option<u64>,
    pub last_content_ns: Option<u64>,
    pub events: u64,
    /// Events whose data was not valid JSON (and not `[DONE]`).
    pub malformed_events: u64,
    pub usage: Usage,
    pub model: Option<String>,
    pub done: bool,
    pub finish_reason: Option<String>,
    /// An event carried an `error` object (mid-stream failure).
    pub error_event: bool,
    pub error_type: Option<String>,
    pub comments: u64,
}

/// The SSE reader: framer plus a per-event JSON scanner.
#[derive(Clone, Debug, Default)]
pub struct StreamReader {
    framer: SseFramer,
    sink: StreamSink,
}

#[derive(Clone, Debug, Default)]
struct StreamSink {
    scanner: JsonScanner,
    event: EventFacts,
    facts: StreamFacts,
    now_ns: u64,
}

impl DataSink for StreamSink {
    fn data(&mut self, bytes: &[u8]) {
        let mut v = EventVisitor {
            facts: &mut self.event,
        };
        self.scanner.feed(bytes, &mut v);
    }

    fn dispatch(&mut self, meta: &EventMeta) {
        self.facts.events += 1;
        let mut v = EventVisitor {
            facts: &mut self.event,
        };
        let status = self.scanner.finish(&mut v);
        let event = std::mem::take(&mut self.event);
        self.scanner.reset();
        if meta.is_done {
            self.facts.done = true;
            return;
        }
        if meta.data_lines == 0 {
            return;
        }
        if status != ScanStatus::Complete {
            self.facts.malformed_events += 1;
            return;
        }
        if event.has_content {
            self.facts.content_events += 1;
            if self.facts.first_content_ns.is_none() {
                self.facts.first_content_ns = Some(self.now_ns);
            }
            self.facts.last_content_ns = Some(self.now_ns);
        }
        self.facts.usage.merge(&event.usage);
        if event.model.is_some() && self.facts.model.is_none() {
            self.facts.model = event.model;
        }
        if event.finish_reason.is_some() {
            self.facts.finish_reason = event.finish_reason;
        }
        if event.has_error {
            self.facts.error_event = true;
            if event.error_type.is_some() {
                self.facts.error_type = event.error_type;
            }
        }
    }

    fn comment(&mut self) {
        self.facts.comments += 1;
    }
}

impl StreamReader {
    /// Feeds one chunk that the host delivered at `now_ns`.
    pub fn feed(&mut self, chunk: &[u8], now_ns: u64) {
        self.sink.now_ns = now_ns;
        self.framer.feed(chunk, &mut self.sink);
    }

    /// Ends the stream; returns the facts and whether an event was cut off.
    pub fn finish(&mut self) -> (StreamFacts, bool) {
        let partial = self.framer.finish();
        (self.sink.facts.clone(), partial)
    }

    /// The facts so far and whether an event is pending, without ending the
    /// stream (can be taken any number of times).
    pub fn snapshot(&self) -> (StreamFacts, bool) {
        (self.sink.facts.clone(), self.framer.has_partial_event())
    }

    pub fn facts(&self) -> &StreamFacts {
        &self.sink.facts
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn chat_stream(tokens: &[&str], with_usage: bool) -> String {
        let mut s = String::new();
        s.push_str("data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"model\":\"mistral-7b\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n");
        for t in tokens {
            let content = serde_json::to_string(t).unwrap();
            s.push_str(&format!("data: {{\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"model\":\"mistral-7b\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":{content}}},\"finish_reason\":null}}]}}\n\n"));
        }
        s.push_str("data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"length\"}]}\n\n");
        if with_usage {
            s.push_str(&format!("data: {{\"id\":\"c1\",\"choices\":[],\"usage\":{{\"prompt_tokens\":21,\"completion_tokens\":{},\"total_tokens\":{},\"prompt_tokens_details\":{{\"cached_tokens\":16}}}}}}\n\n", tokens.len(), 21 + tokens.len()));
        }
        s.push_str(": keep-alive\n\ndata: [DONE]\n\n");
        s
    }

    #[test]
    fn request_fields_are_read_from_any_chunking() {
        let body = br#"{"model":"mistral-7b","messages":[{"role":"user","content":"hi \"model\": x"}],"stream":true,"stream_options":{"include_usage":false},"max_tokens":32,"rag":{"collection":"handbook","top_k":"5"}}"#;
        for cut in 0..body.len() {
            let mut r = RequestReader::new(
                Some(vec!["rag".into(), "collection".into()]),
                Some(vec!["rag".into(), "top_k".into()]),
            );
            r.feed(&body[..cut]);
            r.feed(&body[cut..]);
            let (f, st) = r.finish();
            assert_eq!(st, ScanStatus::Complete);
            assert_eq!(f.model.as_deref(), Some("mistral-7b"));
            assert_eq!(f.stream, Some(true));
            assert!(f.has_stream_options);
            assert_eq!(f.include_usage, Some(false));
            assert_eq!(f.max_tokens, Some(32));
            assert_eq!(f.rag_collection.as_deref(), Some("handbook"));
            assert_eq!(f.rag_top_k, Some(5));
        }
    }

    #[test]
    fn json_response_usage_and_errors() {
        let mut r = JsonResponseReader::default();
        r.feed(br#"{"model":"mistral-7b","choices":[{"message":{"content":"x"},"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":4,"total_tokens":13,"prompt_tokens_details":{"cached_tokens":0}}}"#);
        let (f, st) = r.finish();
        assert_eq!(st, ScanStatus::Complete);
        assert_eq!(f.usage.prompt_tokens, Some(9));
        assert_eq!(f.usage.completion_tokens, Some(4));
        assert_eq!(f.usage.cached_tokens, Some(0));
        assert_eq!(f.finish_reason.as_deref(), Some("stop"));
        assert!(!f.has_error);

        let mut r = JsonResponseReader::default();
        r.feed(br#"{"error":{"message":"no","type":"invalid_request_error","code":404}}"#);
        let (f, _) = r.finish();
        assert!(f.has_error);
        assert_eq!(f.error_type.as_deref(), Some("invalid_request_error"));
    }

    #[test]
    fn stream_counts_content_events_and_reads_final_usage() {
        let text = chat_stream(&["Hel", "lo", " wörld", "😀"], true);
        let mut r = StreamReader::default();
        for (i, b) in text.as_bytes().chunks(7).enumerate() {
            r.feed(b, 1000 + i as u64);
        }
        let (f, partial) = r.finish();
        assert!(!partial);
        assert_eq!(f.content_events, 4);
        assert_eq!(f.usage.completion_tokens, Some(4));
        assert_eq!(f.usage.prompt_tokens, Some(21));
        assert_eq!(f.usage.cached_tokens, Some(16));
        assert_eq!(f.model.as_deref(), Some("mistral-7b"));
        assert_eq!(f.finish_reason.as_deref(), Some("length"));
        assert!(f.done);
        assert_eq!(f.malformed_events, 0);
        assert_eq!(f.comments, 1);
        // The role-only first event is not the first token.
        let first = f.first_content_ns.unwrap();
        let role_end = text.find("\n\n").unwrap() + 2;
        assert!(
            first as usize - 1000 > role_end / 7,
            "first content after role chunk"
        );
    }

    #[test]
    fn malformed_events_are_counted_and_do_not_stop_the_stream() {
        let text = "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: {not json\n\ndata: \u{1}\u{2}\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"b\"}}]}\n\n";
        let mut r = StreamReader::default();
        r.feed(text.as_bytes(), 1);
        let (f, _) = r.finish();
        assert_eq!(f.content_events, 2);
        assert_eq!(f.malformed_events, 2);
        assert!(!f.done);
    }

    #[test]
    fn error_events_and_tool_calls() {
        let text = "data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":0}]}}]}\n\ndata: {\"error\":{\"message\":\"boom\",\"type\":\"internal_error\"}}\n\n";
        let mut r = StreamReader::default();
        r.feed(text.as_bytes(), 1);
        let (f, _) = r.finish();
        assert_eq!(f.content_events, 1);
        assert!(f.error_event);
        assert_eq!(f.error_type.as_deref(), Some("internal_error"));
    }

    proptest! {
        /// Any re-chunking of an OpenAI stream gives the same events and usage.
        #[test]
        fn rechunking_gives_the_same_usage(
            tokens in prop::collection::vec("[a-zé日😀 \"\\\\]{1,6}", 0..20),
            with_usage in any::<bool>(),
            crlf in any::<bool>(),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
        ) {
            let refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
            let mut text = chat_stream(&refs, with_usage);
            if crlf { text = text.replace('\n', "\r\n"); }
            let bytes = text.as_bytes();
            let mut whole = StreamReader::default();
            whole.feed(bytes, 0);
            let (w, _) = whole.finish();
            prop_assert_eq!(w.content_events, tokens.len() as u64);
            prop_assert_eq!(w.usage.completion_tokens, with_usage.then_some(tokens.len() as u64));
            let mut points: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
            points.sort_unstable();
            let mut split = StreamReader::default();
            let mut last = 0;
            for p in points { split.feed(&bytes[last..p], 0); last = p; }
            split.feed(&bytes[last..], 0);
            let (s, _) = split.finish();
            prop_assert_eq!(w, s);
        }
    }
}
