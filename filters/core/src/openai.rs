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
        } else if self.collection_field.is_some_and(|f| path.matches(f)) {
            self.facts.rag_collection = value.as_str().and_then(keep_text);
        } else if self.top_k_field.is_some_and(|f| path.matches(f)) {
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
        if !matches!(
            path.first_key(),
            Some(b"choices" | b"usage" | b"model" | b"error")
        ) {
            return;
        }
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
    /// The stream's model is known already: don't copy it out of every event.
    want_model: bool,
}

impl JsonVisitor for EventVisitor<'_> {
    fn scalar(&mut self, path: &Path<'_>, value: Scalar<'_>) {
        if !path.complete {
            return;
        }
        // Dispatch on the path's shape with direct segment checks: this runs
        // for every scalar of every event, and most (`id`, `object`,
        // `created`, `index`, `logprobs`, ...) matter to nobody.
        match path.first_key() {
            Some(b"choices") if path.is_index(1) => match (path.len(), path.key(2)) {
                (4, Some(b"delta")) => {
                    if let (
                        Some(b"content" | b"reasoning_content" | b"reasoning"),
                        Scalar::Str { len, .. },
                    ) = (path.key(3), value)
                    {
                        if len > 0 {
                            self.facts.has_content = true;
                        }
                    }
                }
                (3, Some(b"text")) => {
                    if let Scalar::Str { len, .. } = value {
                        if len > 0 {
                            self.facts.has_content = true;
                        }
                    }
                }
                (3, Some(b"finish_reason")) => {
                    if let Some(r) = value.as_str().and_then(keep_text) {
                        self.facts.finish_reason = Some(r);
                    }
                }
                _ => {}
            },
            Some(b"usage") => {
                self.facts.usage.absorb(path, &value, &["usage"]);
            }
            Some(b"message") => {
                self.facts.usage.absorb(path, &value, &["message", "usage"]);
            }
            Some(b"model") if path.len() == 1 && self.want_model => {
                self.facts.model = value.as_str().and_then(keep_text);
            }
            Some(b"error")
                if path.len() == 2
                    && matches!(path.key(1), Some(b"type" | b"code"))
                    && self.facts.error_type.is_none() =>
            {
                self.facts.error_type = value.as_str().and_then(keep_text);
            }
            Some(b"delta") if path.len() == 2 && path.key(1) == Some(b"text") => {
                if let Scalar::Str { len, .. } = value {
                    if len > 0 {
                        self.facts.has_content = true;
                    }
                }
            }
            _ => {}
        }
    }

    fn enter(&mut self, path: &Path<'_>, kind: Container) {
        if !path.complete {
            return;
        }
        match path.first_key() {
            Some(b"choices")
                if path.len() == 4
                    && path.is_index(1)
                    && path.key(2) == Some(b"delta")
                    && matches!(path.key(3), Some(b"tool_calls" | b"function_call")) =>
            {
                self.facts.has_content = true;
            }
            Some(b"error") if path.len() == 1 && kind == Container::Object => {
                self.facts.has_error = true;
            }
            _ => {}
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
///
/// ```
/// use tokentap_core::openai::StreamReader;
///
/// let mut reader = StreamReader::default();
/// reader.feed(b"data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n", 1_000);
/// reader.feed(b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":1}}\n\n", 2_000);
/// reader.feed(b"data: [DONE]\n\n", 3_000);
/// let (facts, cut_off) = reader.finish();
/// assert!(!cut_off && facts.done);
/// assert_eq!(facts.content_events, 1);
/// assert_eq!(facts.first_content_ns, Some(1_000));
/// assert_eq!(facts.usage.prompt_tokens, Some(9));
/// ```
#[derive(Clone, Debug, Default)]
pub struct StreamReader {
    framer: SseFramer,
    sink: StreamSink,
}

/// Events up to this size are held (briefly, until their blank line) so the
/// common case can be classified by a byte search; larger events stream
/// straight into the JSON scanner.
const QUICK_EVENT_MAX: usize = 1024;

#[derive(Clone, Debug)]
struct StreamSink {
    scanner: JsonScanner,
    event: EventFacts,
    facts: StreamFacts,
    now_ns: u64,
    /// The current event's data while it fits in [`QUICK_EVENT_MAX`].
    pending: Vec<u8>,
    /// The current event outgrew `pending` and is being streamed to `scanner`.
    streaming: bool,
    /// Use the byte-search fast path (tests turn it off to compare).
    quick: bool,
}

impl Default for StreamSink {
    fn default() -> Self {
        Self {
            scanner: JsonScanner::default(),
            event: EventFacts::default(),
            facts: StreamFacts::default(),
            now_ns: 0,
            pending: Vec::with_capacity(256),
            streaming: false,
            quick: true,
        }
    }
}

/// What the fast path concluded about an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Quick {
    /// A plain chunk carrying generated content.
    Content,
    /// A plain chunk without content (e.g. the role-only first chunk).
    Empty,
}

/// Whether `data` is one balanced JSON object: strings closed, brackets
/// matched, nothing after the final `}`. Truncated or run-together events
/// fail this and take the full parse (which counts them as malformed); the
/// fast path does not validate every token beyond that.
fn balanced(data: &[u8]) -> bool {
    let mut stack: [u8; 16] = [0; 16];
    let mut depth = 0usize;
    let mut i = 0;
    while i < data.len() {
        let b = data[i];
        match b {
            b'"' => {
                // Skip the string: runs of plain bytes at a time, escapes by two.
                i += 1;
                loop {
                    i += crate::json_scan::string_run_len(&data[i..]);
                    match data.get(i) {
                        Some(b'"') => break,
                        Some(b'\\') => i += 2,
                        _ => return false,
                    }
                }
            }
            b'{' | b'[' => {
                if depth == stack.len() {
                    return false;
                }
                stack[depth] = b;
                depth += 1;
            }
            b'}' | b']' => {
                let open = if b == b'}' { b'{' } else { b'[' };
                if depth == 0 || stack[depth - 1] != open {
                    return false;
                }
                depth -= 1;
                if depth == 0 && i + 1 != data.len() {
                    return false;
                }
            }
            _ => {}
        }
        i += 1;
    }
    depth == 0
}

/// Where the keys the fast path cares about first appear, and how often.
#[derive(Default)]
struct KeyScan {
    choices: Option<usize>,
    delta: Option<usize>,
    content: Option<usize>,
    content_count: u32,
    text: Option<usize>,
    text_count: u32,
    finish_reason: Option<usize>,
    needs_parse: bool,
}

/// Classifies a compact OpenAI chunk by one pass over its quotes, or
/// returns `None` when the event needs the full JSON parse: anything
/// carrying usage, an error, a finish reason, tool calls or reasoning, a
/// model name still unknown, or any shape other than the compact one
/// servers emit. Quotes inside JSON strings are escaped (`\"`), so a `"`
/// followed by `content":` can only be the structure itself.
fn quick_classify(data: &[u8], want_model: bool) -> Option<Quick> {
    let data = data.trim_ascii();
    if !(data.starts_with(b"{") && data.ends_with(b"}") && balanced(data)) {
        return None;
    }
    let mut k = KeyScan::default();
    let mut i = 0;
    while let Some(off) = data[i..].iter().position(|&b| b == b'"') {
        let q = i + off;
        let rest = &data[q + 1..];
        if q > 0 && data[q - 1] == b'\\' {
            // An escaped quote inside a string (or `\\"`, which only ends
            // a string); either way not a key we look for.
        } else if rest.starts_with(b"choices\":[{") {
            k.choices.get_or_insert(q);
        } else if rest.starts_with(b"delta\":{") {
            k.delta.get_or_insert(q);
        } else if rest.starts_with(b"content\":") {
            k.content.get_or_insert(q);
            k.content_count += 1;
        } else if rest.starts_with(b"text\":") {
            k.text.get_or_insert(q);
            k.text_count += 1;
        } else if rest.starts_with(b"finish_reason\":") {
            k.finish_reason.get_or_insert(q);
        } else if rest.starts_with(b"usage\"")
            || rest.starts_with(b"error\"")
            || rest.starts_with(b"tool_calls\"")
            || rest.starts_with(b"function_call\"")
            || rest.starts_with(b"reasoning")
            || (want_model && rest.starts_with(b"model\""))
        {
            k.needs_parse = true;
            break;
        }
        i = q + 1;
    }
    let choices = k.choices?;
    if k.needs_parse {
        return None;
    }
    if let Some(f) = k.finish_reason {
        if !data[f + 16..].starts_with(b"null") {
            return None;
        }
    }
    let same_object = |from: usize, to: usize| {
        from <= to
            && !data[from..to]
                .iter()
                .any(|b| matches!(b, b'{' | b'}' | b'[' | b']'))
    };
    let field = match (k.content_count, k.text_count, k.content, k.text) {
        (1, 0, Some(c), _) => {
            // `delta` must be a member of the first choice, and `content` a
            // member of `delta`.
            let d = k.delta?;
            if !same_object(choices + 12, d) || !same_object(d + 9, c) {
                return None;
            }
            c + 10
        }
        (0, 1, _, Some(t)) => {
            if !same_object(choices + 12, t) {
                return None;
            }
            t + 7
        }
        _ => return None,
    };
    match data.get(field) {
        Some(b'"') => match data.get(field + 1) {
            Some(b'"') => Some(Quick::Empty),
            Some(_) => Some(Quick::Content),
            None => None,
        },
        _ => None,
    }
}

impl StreamSink {
    fn feed_scanner(&mut self, bytes: &[u8]) {
        let mut v = EventVisitor {
            facts: &mut self.event,
            want_model: self.facts.model.is_none(),
        };
        self.scanner.feed(bytes, &mut v);
    }

    fn content_event(&mut self) {
        self.facts.content_events += 1;
        if self.facts.first_content_ns.is_none() {
            self.facts.first_content_ns = Some(self.now_ns);
        }
        self.facts.last_content_ns = Some(self.now_ns);
    }
}

impl DataSink for StreamSink {
    fn data(&mut self, bytes: &[u8]) {
        if self.streaming {
            self.feed_scanner(bytes);
        } else if self.pending.len() + bytes.len() <= QUICK_EVENT_MAX {
            self.pending.extend_from_slice(bytes);
        } else {
            self.streaming = true;
            let held = std::mem::take(&mut self.pending);
            self.feed_scanner(&held);
            self.pending = held;
            self.pending.clear();
            self.feed_scanner(bytes);
        }
    }

    fn dispatch(&mut self, meta: &EventMeta) {
        self.facts.events += 1;
        if meta.is_done {
            self.facts.done = true;
            self.reset_event();
            return;
        }
        if meta.data_lines == 0 {
            self.reset_event();
            return;
        }
        if !self.streaming && self.quick {
            match quick_classify(&self.pending, self.facts.model.is_none()) {
                Some(Quick::Content) => {
                    self.content_event();
                    self.reset_event();
                    return;
                }
                Some(Quick::Empty) => {
                    self.reset_event();
                    return;
                }
                None => {}
            }
        }
        if !self.streaming {
            let held = std::mem::take(&mut self.pending);
            self.feed_scanner(&held);
            self.pending = held;
        }
        let mut v = EventVisitor {
            facts: &mut self.event,
            want_model: self.facts.model.is_none(),
        };
        let status = self.scanner.finish(&mut v);
        let event = std::mem::take(&mut self.event);
        self.reset_event();
        if status != ScanStatus::Complete {
            self.facts.malformed_events += 1;
            return;
        }
        if event.has_content {
            self.content_event();
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

impl StreamSink {
    fn reset_event(&mut self) {
        self.scanner.reset();
        self.event = EventFacts::default();
        self.pending.clear();
        self.streaming = false;
    }
}

impl StreamReader {
    /// A reader that parses every event fully (the reference the fast path
    /// is tested against).
    pub fn without_fast_path() -> Self {
        let mut r = Self::default();
        r.sink.quick = false;
        r
    }

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
    use crate::testing::split_at_cuts;
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

    #[test]
    fn fast_path_classification() {
        assert_eq!(quick_classify(br#"{"id":"x","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"Hi"},"logprobs":null,"finish_reason":null}]}"#, false), Some(Quick::Content));
        assert_eq!(quick_classify(br#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#, false), Some(Quick::Empty));
        assert_eq!(
            quick_classify(
                br#"{"choices":[{"index":0,"text":"x","finish_reason":null}]}"#,
                false
            ),
            Some(Quick::Content)
        );
        // Everything unusual takes the full parse.
        for slow in [
            &br#"{"choices":[{"delta":{"content":"x"},"finish_reason":"length"}]}"#[..],
            br#"{"choices":[],"usage":{"prompt_tokens":1}}"#,
            br#"{"choices":[{"delta":{"content":"x"}}],"model":"m"}"#,
            br#"{"error":{"type":"x"}}"#,
            br#"{"choices":[{"delta":{"tool_calls":[{"index":0}]}}]}"#,
            br#"{"choices": [{"delta": {"content": "spaced"}}]}"#,
            br#"{"choices":[{"delta":{"content":"a","reasoning_content":"b"}}]}"#,
            br#"not json"#,
            br#"{"choices":[{"content":"x"}]}"#,
            br#"{"choices":[{"delta":{"role":"x"},"content":"x"}]}"#,
            br#"{"choices":[{"delta":{"content":"x"}}],"extra":{"content":"y"}}"#,
            br#"{"choices":[{"index":0,"logprobs":{"text":"x"}}]}"#,
            br#"{"choices":[{"index":0}],"delta":{"content":"x"}}"#,
            br#"{"delta":{"content":"x"},"choices":[{}]}"#,
            br#"{"choices":[{"x":{"delta":{"content":"x"}}}]}"#,
            br#"{"choices":[{"delta":{"content":"x"}}]}}"#,
            br#"{"choices":[{"delta":{"content":"x"}}] "#,
            br#"{"choices":[{"delta":{"content":"x}"#,
        ] {
            assert_eq!(
                quick_classify(slow, true),
                None,
                "{}",
                String::from_utf8_lossy(slow)
            );
        }
        // With the model still unknown, a chunk naming it is parsed.
        assert_eq!(
            quick_classify(
                br#"{"model":"m","choices":[{"delta":{"content":"x"}}]}"#,
                true
            ),
            None
        );
        assert_eq!(
            quick_classify(
                br#"{"model":"m","choices":[{"delta":{"content":"x"}}]}"#,
                false
            ),
            Some(Quick::Content)
        );
    }

    proptest! {
        /// The fast path gives exactly what the full parse gives.
        #[test]
        fn fast_path_agrees_with_the_full_parse(
            tokens in prop::collection::vec("[a-zé日😀 \"\\\\{}:,]{0,6}", 0..20),
            with_usage in any::<bool>(),
            garbage in prop::option::of("[{}\":a-z,\\[\\]]{0,40}"),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
        ) {
            let refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
            let mut text = chat_stream(&refs, with_usage);
            if let Some(g) = garbage {
                text.insert_str(0, &format!("data: {g}\n\n"));
            }
            let bytes = text.as_bytes();
            let mut fast = StreamReader::default();
            let mut full = StreamReader::without_fast_path();
            for (i, chunk) in split_at_cuts(bytes, &cuts).into_iter().enumerate() {
                fast.feed(chunk, i as u64);
                full.feed(chunk, i as u64);
            }
            let (a, _) = fast.finish();
            let (b, _) = full.finish();
            prop_assert_eq!(a, b);
        }

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
            let mut split = StreamReader::default();
            for chunk in split_at_cuts(bytes, &cuts) { split.feed(chunk, 0); }
            let (s, _) = split.finish();
            prop_assert_eq!(w, s);
        }
    }
}
