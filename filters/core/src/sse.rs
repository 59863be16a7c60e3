//! Server-sent events framing on raw bytes.
//!
//! The framer follows the WHATWG event-stream rules (LF, CRLF or lone CR line
//! ends; `:` comments; `field: value` with one optional leading space; an
//! empty line dispatches the event) but never holds an event in memory: the
//! bytes of `data` fields are streamed to a [`DataSink`] as they arrive, so
//! the carry-over between chunks is a few bytes of state (a field name of at
//! most [`MAX_FIELD_NAME`] bytes, the event name, and a pending CR). Events may
//! be split at any byte, including inside a multi-byte UTF-8 character, and
//! the outcome is the same as if the stream arrived in one piece.

/// Longest field name tracked; longer names are treated as unknown fields.
pub const MAX_FIELD_NAME: usize = 8;
/// Longest `event:` name kept (it only ever selects among a few known names).
pub const MAX_EVENT_NAME: usize = 32;
/// Bytes of `data` kept to recognise the `[DONE]` sentinel.
const DATA_HEAD: usize = 8;

/// Receives the content of events as the framer finds them.
pub trait DataSink {
    /// Bytes of the event's data. Between two `data` lines of one event the
    /// framer passes `b"\n"`, exactly as the event-stream spec joins them.
    fn data(&mut self, bytes: &[u8]);
    /// An event is complete (an empty line after at least one field).
    fn dispatch(&mut self, event: &EventMeta);
    /// A comment line (`: keep-alive`), which carries no event.
    fn comment(&mut self) {}
}

/// What is known about a dispatched event besides its streamed data.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EventMeta {
    /// The `event:` field, if any (cut at [`MAX_EVENT_NAME`] bytes).
    pub name: Option<String>,
    /// Total bytes of data (including the `\n` joins).
    pub data_len: usize,
    /// Number of `data` lines.
    pub data_lines: u32,
    /// Whether the data is exactly the OpenAI end sentinel `[DONE]`.
    pub is_done: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LineState {
    /// At the start of a line.
    Start,
    /// Reading the field name.
    Field,
    /// Just after the colon: one space may be skipped.
    ValueStart,
    /// Inside a value.
    Value,
    /// Inside a comment line.
    Comment,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    Data,
    Event,
    Ignored,
}

/// Incremental SSE framer. One per response stream.
///
/// ```
/// use tokentap_core::sse::{DataSink, EventMeta, SseFramer};
///
/// /// Collects each event's data and whether it was `[DONE]`.
/// #[derive(Default)]
/// struct Events {
///     current: Vec<u8>,
///     done: Vec<(String, bool)>,
/// }
///
/// impl DataSink for Events {
///     fn data(&mut self, bytes: &[u8]) {
///         self.current.extend_from_slice(bytes);
///     }
///     fn dispatch(&mut self, event: &EventMeta) {
///         let data = String::from_utf8_lossy(&self.current).into_owned();
///         self.done.push((data, event.is_done));
///         self.current.clear();
///     }
/// }
///
/// let mut framer = SseFramer::new();
/// let mut events = Events::default();
/// // Chunks end anywhere; CRLF and LF line ends mix; comments carry no event.
/// framer.feed(b"data: {\"a\":1}\r\n\r\n: keep-alive\n\nda", &mut events);
/// framer.feed(b"ta: [DONE]\n\n", &mut events);
/// assert_eq!(
///     events.done,
///     [(r#"{"a":1}"#.to_string(), false), ("[DONE]".to_string(), true)]
/// );
/// assert_eq!(framer.events(), 2);
/// ```
#[derive(Clone, Debug)]
pub struct SseFramer {
    line: LineState,
    field_name: [u8; MAX_FIELD_NAME],
    field_name_len: usize,
    field_name_overlong: bool,
    field: Field,
    /// A CR ended the previous line; a following LF belongs to it.
    pending_cr: bool,
    /// Position in a leading UTF-8 BOM, which the spec says to skip.
    bom_pos: u8,
    at_stream_start: bool,
    event_name: Vec<u8>,
    has_fields: bool,
    data_lines: u32,
    data_len: usize,
    data_head: [u8; DATA_HEAD],
    data_head_len: usize,
    events: u64,
    bytes: u64,
}

impl Default for SseFramer {
    fn default() -> Self {
        Self::new()
    }
}

const BOM: [u8; 3] = [0xEF, 0xBB, 0xBF];

impl SseFramer {
    pub fn new() -> Self {
        Self {
            line: LineState::Start,
            field_name: [0; MAX_FIELD_NAME],
            field_name_len: 0,
            field_name_overlong: false,
            field: Field::Ignored,
            pending_cr: false,
            bom_pos: 0,
            at_stream_start: true,
            event_name: Vec::new(),
            has_fields: false,
            data_lines: 0,
            data_len: 0,
            data_head: [0; DATA_HEAD],
            data_head_len: 0,
            events: 0,
            bytes: 0,
        }
    }

    /// Events dispatched so far.
    pub fn events(&self) -> u64 {
        self.events
    }

    /// Bytes consumed so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Whether bytes of an unfinished event are pending (a stream that ends
    /// here was cut mid-event).
    pub fn has_partial_event(&self) -> bool {
        self.has_fields || !matches!(self.line, LineState::Start)
    }

    /// Consumes one chunk of the stream.
    pub fn feed<S: DataSink>(&mut self, chunk: &[u8], sink: &mut S) {
        self.bytes += chunk.len() as u64;
        let mut i = 0;
        while i < chunk.len() {
            let b = chunk[i];
            if self.at_stream_start {
                if b == BOM[self.bom_pos as usize] {
                    self.bom_pos += 1;
                    i += 1;
                    if self.bom_pos as usize == BOM.len() {
                        self.at_stream_start = false;
                    }
                    continue;
                }
                // Not a BOM after all: replay any partial BOM bytes as content.
                self.at_stream_start = false;
                if self.bom_pos > 0 {
                    let n = self.bom_pos as usize;
                    self.bom_pos = 0;
                    for &pb in &BOM[..n] {
                        self.byte(pb, sink);
                    }
                }
            }
            if self.pending_cr {
                self.pending_cr = false;
                if b == b'\n' {
                    i += 1;
                    continue;
                }
            }
            // Fast path for the `data:` field that starts nearly every line:
            // what the five bytes and the optional space would do one by one.
            if self.line == LineState::Start && chunk[i..].starts_with(b"data:") {
                self.field_name[..4].copy_from_slice(b"data");
                self.field_name_len = 4;
                self.field_name_overlong = false;
                self.begin_field(sink);
                self.line = LineState::ValueStart;
                i += 5;
                if chunk.get(i) == Some(&b' ') {
                    self.line = LineState::Value;
                    i += 1;
                }
                continue;
            }
            // Fast path for long data values: hand the whole run to the sink.
            if self.line == LineState::Value && self.field == Field::Data {
                let rest = &chunk[i..];
                let run = crate::scan_bytes::find_line_end(rest).unwrap_or(rest.len());
                if run > 0 {
                    self.data_bytes(&rest[..run], sink);
                    i += run;
                    continue;
                }
            }
            self.byte(b, sink);
            i += 1;
        }
    }

    /// Signals the end of the stream. Per the spec an unterminated final
    /// event is discarded; it is reported through [`SseFramer::has_partial_event`].
    pub fn finish(&mut self) -> bool {
        let partial = self.has_partial_event();
        self.reset_event();
        self.line = LineState::Start;
        partial
    }

    fn byte<S: DataSink>(&mut self, b: u8, sink: &mut S) {
        let is_eol = b == b'\n' || b == b'\r';
        if b == b'\r' {
            self.pending_cr = true;
        }
        match self.line {
            LineState::Start => {
                if is_eol {
                    self.dispatch(sink);
                } else if b == b':' {
                    self.line = LineState::Comment;
                } else {
                    self.field_name_len = 0;
                    self.field_name_overlong = false;
                    self.push_field_name(b);
                    self.line = LineState::Field;
                }
            }
            LineState::Field => {
                if is_eol {
                    // A field with no colon: the whole line is the name, value empty.
                    self.begin_field(sink);
                    self.end_line();
                } else if b == b':' {
                    self.begin_field(sink);
                    self.line = LineState::ValueStart;
                } else {
                    self.push_field_name(b);
                }
            }
            LineState::ValueStart | LineState::Value => {
                if is_eol {
                    self.end_line();
                } else if self.line == LineState::ValueStart && b == b' ' {
                    self.line = LineState::Value;
                } else {
                    self.line = LineState::Value;
                    self.value_byte(b, sink);
                }
            }
            LineState::Comment => {
                if is_eol {
                    sink.comment();
                    self.line = LineState::Start;
                }
            }
        }
    }

    fn push_field_name(&mut self, b: u8) {
        if self.field_name_len < MAX_FIELD_NAME {
            self.field_name[self.field_name_len] = b;
            self.field_name_len += 1;
        } else {
            self.field_name_overlong = true;
        }
    }

    fn begin_field<S: DataSink>(&mut self, sink: &mut S) {
        let name = &self.field_name[..self.field_name_len];
        self.field = if self.field_name_overlong {
            Field::Ignored
        } else if name == b"data" {
            Field::Data
        } else if name == b"event" {
            Field::Event
        } else {
            Field::Ignored
        };
        match self.field {
            Field::Data => {
                if self.data_lines > 0 {
                    self.data_bytes(b"\n", sink);
                }
                self.data_lines += 1;
                self.has_fields = true;
            }
            Field::Event => {
                self.event_name.clear();
                self.has_fields = true;
            }
            Field::Ignored => {
                // `id`/`retry`/unknown fields still make the block an event.
                self.has_fields = true;
            }
        }
    }

    fn value_byte<S: DataSink>(&mut self, b: u8, sink: &mut S) {
        match self.field {
            Field::Data => self.data_bytes(&[b], sink),
            Field::Event => {
                if self.event_name.len() < MAX_EVENT_NAME {
                    self.event_name.push(b);
                }
            }
            Field::Ignored => {}
        }
    }

    fn data_bytes<S: DataSink>(&mut self, bytes: &[u8], sink: &mut S) {
        let room = DATA_HEAD - self.data_head_len;
        let n = room.min(bytes.len());
        self.data_head[self.data_head_len..self.data_head_len + n].copy_from_slice(&bytes[..n]);
        self.data_head_len += n;
        self.data_len += bytes.len();
        sink.data(bytes);
    }

    fn end_line(&mut self) {
        self.line = LineState::Start;
        self.field = Field::Ignored;
    }

    fn dispatch<S: DataSink>(&mut self, sink: &mut S) {
        if self.has_fields {
            let name = (!self.event_name.is_empty())
                .then(|| String::from_utf8_lossy(&self.event_name).into_owned());
            let is_done = self.data_lines > 0
                && self.data_len == self.data_head_len
                && self.data_head[..self.data_head_len].trim_ascii() == b"[DONE]";
            let meta = EventMeta {
                name,
                data_len: self.data_len,
                data_lines: self.data_lines,
                is_done,
            };
            self.events += 1;
            sink.dispatch(&meta);
        }
        self.reset_event();
    }

    fn reset_event(&mut self) {
        self.has_fields = false;
        self.data_lines = 0;
        self.data_len = 0;
        self.data_head_len = 0;
        self.event_name.clear();
        self.field = Field::Ignored;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::split_at_cuts;
    use proptest::prelude::*;

    /// Collects whole events (test only: the filter never does this).
    #[derive(Default, Debug, PartialEq)]
    struct Events {
        current: Vec<u8>,
        events: Vec<(Option<String>, Vec<u8>, bool)>,
        comments: u32,
    }

    impl DataSink for Events {
        fn data(&mut self, bytes: &[u8]) {
            self.current.extend_from_slice(bytes);
        }
        fn dispatch(&mut self, e: &EventMeta) {
            assert_eq!(e.data_len, self.current.len());
            self.events
                .push((e.name.clone(), std::mem::take(&mut self.current), e.is_done));
        }
        fn comment(&mut self) {
            self.comments += 1;
        }
    }

    fn run(chunks: &[&[u8]]) -> Events {
        let mut f = SseFramer::new();
        let mut e = Events::default();
        for c in chunks {
            f.feed(c, &mut e);
        }
        f.finish();
        e
    }

    #[test]
    fn frames_lf_crlf_and_cr_events_identically() {
        for sep in ["\n", "\r\n", "\r"] {
            let text = format!(
                "data: a{sep}data:b{sep}{sep}: ping{sep}event: x{sep}data: [DONE]{sep}{sep}"
            );
            let e = run(&[text.as_bytes()]);
            assert_eq!(
                e.events,
                vec![
                    (None, b"a\nb".to_vec(), false),
                    (Some("x".into()), b"[DONE]".to_vec(), true)
                ],
                "separator {sep:?}"
            );
            assert_eq!(e.comments, 1);
        }
    }

    #[test]
    fn only_one_leading_space_is_stripped_and_bom_is_skipped() {
        let e = run(&[b"\xEF\xBB\xBFdata:  two\n\n"]);
        assert_eq!(e.events, vec![(None, b" two".to_vec(), false)]);
    }

    #[test]
    fn partial_bom_is_replayed_as_content() {
        let e = run(&[b"\xEFdata: x\n\n"]);
        // The lone 0xEF becomes part of the field name `\xEFdata`, an unknown
        // field: the block is an event without data.
        assert_eq!(e.events, vec![(None, vec![], false)]);
    }

    #[test]
    fn unterminated_event_is_not_dispatched() {
        let mut f = SseFramer::new();
        let mut e = Events::default();
        f.feed(b"data: {\"a\":1}\n\ndata: {\"b\"", &mut e);
        assert_eq!(e.events.len(), 1);
        assert!(f.finish(), "a partial event was pending");
    }

    #[test]
    fn done_must_be_the_whole_data() {
        let e = run(&[b"data: [DONE] x\n\ndata:[DONE]\n\n"]);
        assert!(!e.events[0].2);
        assert!(e.events[1].2);
    }

    #[test]
    fn fields_without_colon_and_unknown_fields_make_events_without_data() {
        let e = run(&[b"id: 7\n\nretry\n\n"]);
        assert_eq!(e.events, vec![(None, vec![], false), (None, vec![], false)]);
    }

    fn stream_text() -> impl Strategy<Value = Vec<u8>> {
        let line_end = prop_oneof![Just("\n"), Just("\r\n"), Just("\r")];
        let event = (
            prop::collection::vec("[a-z{}\":,é日😀 ]{0,12}", 0..3),
            prop::option::of("[a-z_]{1,6}"),
            any::<bool>(),
            line_end,
        )
            .prop_map(|(datas, name, comment, eol)| {
                let mut s = String::new();
                if comment {
                    s.push_str(": keep-alive");
                    s.push_str(eol);
                }
                if let Some(n) = name {
                    s.push_str("event: ");
                    s.push_str(&n);
                    s.push_str(eol);
                }
                for d in datas {
                    s.push_str("data: ");
                    s.push_str(&d);
                    s.push_str(eol);
                }
                s.push_str(eol);
                s
            });
        prop::collection::vec(event, 0..8).prop_map(|v| v.concat().into_bytes())
    }

    proptest! {
        /// Any re-chunking of a stream yields exactly the same events.
        #[test]
        fn rechunking_yields_the_same_events(text in stream_text(), cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..10)) {
            let whole = run(&[&text]);
            let split = run(&split_at_cuts(&text, &cuts));
            prop_assert_eq!(whole, split);
        }

        /// Arbitrary bytes frame into the same events however they are cut.
        #[test]
        fn arbitrary_bytes_frame_the_same_in_any_chunking(data in prop::collection::vec(any::<u8>(), 0..1024), cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..4)) {
            prop_assert_eq!(run(&split_at_cuts(&data, &cuts)), run(&[&data]));
        }
    }
}
