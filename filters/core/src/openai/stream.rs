//! [`StreamReader`]: per-event facts of an OpenAI `text/event-stream`
//! response, from the SSE framer and a JSON scan of each event (or the
//! byte-search fast path for the common small chunk).

use super::agentic::{self, Kind, MessagesVisitor, ResponsesVisitor};
use super::quick::{quick_classify_at, Quick, Template};
use super::{keep_text, Api, Usage};
use crate::json_scan::{Container, JsonScanner, JsonVisitor, Path, Scalar, ScanStatus};
use crate::sse::{DataSink, EventMeta, SseFramer};

/// Facts of one SSE event's JSON data.
#[derive(Clone, Debug, Default)]
pub(super) struct EventFacts {
    pub has_content: bool,
    pub usage: Usage,
    pub model: Option<String>,
    pub has_error: bool,
    pub error_type: Option<String>,
    pub finish_reason: Option<String>,
    // Notes of the Responses and Messages readers, settled at the event's
    // end (`agentic::settle`).
    pub kind: Kind,
    /// A non-empty text delta (or text block start).
    pub text: bool,
    /// A tool-use block start.
    pub tool: bool,
    /// A top-level `code` (Responses `error` event).
    pub code: Option<String>,
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
    /// The last plain content event, for the byte comparison of the next.
    template: Template,
    /// Compare with `template` at all (tests turn it off to compare).
    use_template: bool,
    /// The response shapes being read.
    api: Api,
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
            template: Template::default(),
            use_template: true,
            api: Api::OpenAi,
        }
    }
}

impl StreamSink {
    fn feed_scanner(&mut self, bytes: &[u8]) {
        let want_model = self.facts.model.is_none();
        let facts = &mut self.event;
        match self.api {
            Api::OpenAi => self
                .scanner
                .feed(bytes, &mut EventVisitor { facts, want_model }),
            Api::Responses => self
                .scanner
                .feed(bytes, &mut ResponsesVisitor { facts, want_model }),
            Api::Messages => self
                .scanner
                .feed(bytes, &mut MessagesVisitor { facts, want_model }),
        }
    }

    fn finish_scanner(&mut self) -> ScanStatus {
        let want_model = self.facts.model.is_none();
        let facts = &mut self.event;
        match self.api {
            Api::OpenAi => self.scanner.finish(&mut EventVisitor { facts, want_model }),
            Api::Responses => {
                let status = self
                    .scanner
                    .finish(&mut ResponsesVisitor { facts, want_model });
                agentic::settle(facts);
                status
            }
            Api::Messages => {
                let status = self
                    .scanner
                    .finish(&mut MessagesVisitor { facts, want_model });
                agentic::settle(facts);
                status
            }
        }
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
            let data = self.pending.trim_ascii();
            let quick = if self.use_template && self.template.matches(data) {
                Some(Quick::Content)
            } else {
                match quick_classify_at(data, self.facts.model.is_none()) {
                    Some((Quick::Content, open)) => {
                        self.template.learn(data, open);
                        Some(Quick::Content)
                    }
                    other => other.map(|(quick, _)| quick),
                }
            };
            match quick {
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
        let status = self.finish_scanner();
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
    /// A reader of the event streams of `api`. The Responses and Messages
    /// APIs take the full parse for every event (their events are typed,
    /// not OpenAI chunks, so the chunk fast path would only give up).
    pub fn for_api(api: Api) -> Self {
        let mut r = Self::default();
        r.sink.api = api;
        if api != Api::OpenAi {
            r.sink.quick = false;
        }
        r
    }

    /// A reader that parses every event fully (the reference the fast path
    /// is tested against).
    pub fn without_fast_path() -> Self {
        let mut r = Self::default();
        r.sink.quick = false;
        r
    }

    /// A reader whose fast path classifies every event on its own, without
    /// comparing it with the previous one (what the comparison is tested
    /// against).
    #[cfg(test)]
    pub(crate) fn without_template() -> Self {
        let mut r = Self::default();
        r.sink.use_template = false;
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
