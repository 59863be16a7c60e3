//! A resumable, allocation-bounded JSON scanner.
//!
//! The filter must read a few fields (`model`, `stream`, `usage.*`, ...) out of
//! request and response bodies that arrive in arbitrary chunks, without ever
//! pausing or buffering the body. This scanner consumes bytes as they come and
//! reports every scalar together with its path (`usage.prompt_tokens`,
//! `choices[].delta.content`) to a [`JsonVisitor`]. Its memory is fixed: a
//! bounded path stack, a bounded key buffer and a bounded value prefix, so a
//! 100 MB body costs the same memory as a 100 byte one.
//!
//! Strings are decoded from bytes at the end of each string, so a multi-byte
//! UTF-8 character split across chunks is handled naturally.

/// Longest object key that is tracked; longer keys never match a path.
pub const MAX_KEY_LEN: usize = 64;
/// Longest string prefix handed to the visitor; the full length is reported.
pub const MAX_VALUE_PREFIX: usize = 128;
/// Deepest nesting whose keys are tracked; deeper values are still scanned
/// (for well-formedness) but reported with `path_complete == false`.
pub const MAX_TRACKED_DEPTH: usize = 8;
/// Nesting beyond this is refused as abuse (the scanner stops with an error).
pub const MAX_DEPTH: usize = 256;

/// One step of a JSON path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Segment<'a> {
    /// An object member; the key bytes as decoded (at most [`MAX_KEY_LEN`]).
    Key(&'a [u8]),
    /// An array element (indices are not tracked: `choices[]`).
    Index,
}

/// The path of the value being reported, outermost first.
#[derive(Clone, Copy, Debug)]
pub struct Path<'a> {
    segments: &'a [SegmentMeta],
    /// The key bytes of every tracked segment, back to back.
    keys: &'a [u8],
    /// False when the value sits deeper than [`MAX_TRACKED_DEPTH`] or under an
    /// over-long key, so its path cannot be trusted for matching.
    pub complete: bool,
}

impl<'a> Path<'a> {
    pub fn len(&self) -> usize {
        self.segments.len()
    }

    pub fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }

    pub fn get(&self, i: usize) -> Option<Segment<'a>> {
        self.segments.get(i).map(|m| m.as_segment(self.keys))
    }

    /// The key at position `i`, if that segment is a key.
    pub fn key(&self, i: usize) -> Option<&'a [u8]> {
        match self.get(i) {
            Some(Segment::Key(k)) => Some(k),
            _ => None,
        }
    }

    /// Whether the segment at position `i` is an array element.
    pub fn is_index(&self, i: usize) -> bool {
        matches!(self.get(i), Some(Segment::Index))
    }

    /// The first key of the path, if it starts with a key (cheap pre-filter
    /// before matching full patterns).
    pub fn first_key(&self) -> Option<&'a [u8]> {
        match self.get(0) {
            Some(Segment::Key(k)) => Some(k),
            _ => None,
        }
    }

    /// True when the path is exactly `pattern`, where `"[]"` matches an array
    /// element and any other string an object key. `matches(&["usage",
    /// "prompt_tokens"])`; configured paths pass their owned `String`s.
    pub fn matches<S: AsRef<str>>(&self, pattern: &[S]) -> bool {
        self.complete
            && self.segments.len() == pattern.len()
            && self.segments.iter().zip(pattern).all(|(seg, pat)| {
                match (seg.as_segment(self.keys), pat.as_ref()) {
                    (Segment::Index, p) => p == "[]",
                    (Segment::Key(k), p) => p != "[]" && k == p.as_bytes(),
                }
            })
    }
}

/// A scalar value as seen by the visitor.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Scalar<'a> {
    /// A string: its first decoded bytes (at most [`MAX_VALUE_PREFIX`]) and
    /// its full decoded length in bytes. [`Scalar::as_str`] gives the prefix
    /// cut on a UTF-8 boundary; it is only checked when asked for, since
    /// visitors look at few of the strings they see.
    Str {
        prefix: &'a [u8],
        len: usize,
    },
    /// A number, as written (bounded), e.g. `"42"`, `"1.5e3"`.
    Num(&'a str),
    Bool(bool),
    Null,
}

impl Scalar<'_> {
    /// The value as an unsigned integer, when it is a non-negative integral
    /// number (token counts). Floats with a zero fraction are accepted.
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Scalar::Num(s) => {
                if let Ok(v) = s.parse::<u64>() {
                    return Some(v);
                }
                let f: f64 = s.parse().ok()?;
                (f >= 0.0 && f.fract() == 0.0 && f < 1.8e19).then_some(f as u64)
            }
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Scalar::Num(s) => s.parse().ok(),
            _ => None,
        }
    }

    /// The string prefix (the longest valid UTF-8 start of it), when the
    /// value is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Scalar::Str { prefix, .. } => Some(utf8_prefix(prefix)),
            _ => None,
        }
    }
}

/// Kind of container being entered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Container {
    Object,
    Array,
}

/// Receives what the scanner finds. Both methods default to doing nothing.
pub trait JsonVisitor {
    fn scalar(&mut self, _path: &Path<'_>, _value: Scalar<'_>) {}
    fn enter(&mut self, _path: &Path<'_>, _kind: Container) {}
}

/// Why the scanner stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScanError {
    /// A byte that cannot appear at this position.
    Syntax { offset: u64 },
    /// Nesting deeper than [`MAX_DEPTH`].
    TooDeep,
    /// A second top-level value after the first one finished.
    TrailingData,
}

/// Where the scanner stands once input ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScanStatus {
    /// Nothing but whitespace so far.
    Empty,
    /// Inside a value.
    Incomplete,
    /// One complete top-level value was read.
    Complete,
    Failed(ScanError),
}

/// One tracked path segment; its key bytes live in the scanner's key arena.
#[derive(Clone, Copy, Debug)]
struct SegmentMeta {
    start: u16,
    len: u8,
    is_index: bool,
    /// The key was longer than [`MAX_KEY_LEN`]: never matches.
    overlong: bool,
}

impl SegmentMeta {
    fn as_segment<'a>(&self, keys: &'a [u8]) -> Segment<'a> {
        if self.is_index {
            Segment::Index
        } else {
            let start = self.start as usize;
            Segment::Key(keys.get(start..start + self.len as usize).unwrap_or(&[]))
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FrameKind {
    Object,
    Array,
}

#[derive(Clone, Copy, Debug)]
struct Frame {
    kind: FrameKind,
    /// Whether this container currently contributes a path segment (the
    /// array's `[]`, or the object's current member key).
    has_segment: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Expecting a value (top level, after `:` or after `,` in an array).
    Value,
    /// After `[`: a value or `]`.
    ArrayFirst,
    /// After `{`: a key or `}`.
    ObjectFirst,
    /// After `,` in an object: a key.
    ObjectKey,
    /// After a key: `:`.
    Colon,
    /// After a value inside a container: `,` or the closing bracket.
    AfterValue,
    InString,
    Escape,
    Unicode,
    Number,
    Literal,
    Done,
    Failed(ScanError),
}

const MAX_NUMBER_LEN: usize = 40;

/// The scanner. Feed it with [`JsonScanner::feed`]; reuse it with
/// [`JsonScanner::reset`].
///
/// A body split anywhere, even inside a key or a number, reports the same
/// scalars as the whole body:
///
/// ```
/// use tokentap_core::json_scan::{JsonScanner, JsonVisitor, Path, Scalar, ScanStatus};
///
/// /// Keeps `usage.prompt_tokens`.
/// #[derive(Default)]
/// struct PromptTokens(Option<u64>);
///
/// impl JsonVisitor for PromptTokens {
///     fn scalar(&mut self, path: &Path<'_>, value: Scalar<'_>) {
///         if path.matches(&["usage", "prompt_tokens"]) {
///             self.0 = value.as_u64();
///         }
///     }
/// }
///
/// let mut scanner = JsonScanner::new();
/// let mut seen = PromptTokens::default();
/// scanner.feed(br#"{"model":"m","usage":{"prompt_to"#, &mut seen);
/// scanner.feed(br#"kens":1"#, &mut seen);
/// scanner.feed(br#"2,"completion_tokens":3}}"#, &mut seen);
/// assert_eq!(scanner.finish(&mut seen), ScanStatus::Complete);
/// assert_eq!(seen.0, Some(12));
/// ```
#[derive(Clone, Debug)]
pub struct JsonScanner {
    state: State,
    started: bool,
    frames: Vec<Frame>,
    /// Path segments for the first [`MAX_TRACKED_DEPTH`] levels.
    path: Vec<SegmentMeta>,
    /// Key bytes of `path`, back to back (at most 8 x 64 bytes).
    path_keys: Vec<u8>,
    /// Logical path length (may exceed `path.len()`).
    depth: usize,
    /// Over-long keys among `path` (a path holding one never matches).
    overlong_keys: usize,
    string_is_key: bool,
    buf: [u8; MAX_VALUE_PREFIX + 4],
    buf_len: usize,
    str_len: usize,
    unicode_acc: u32,
    unicode_digits: u8,
    high_surrogate: Option<u32>,
    literal: &'static [u8],
    literal_pos: u8,
    offset: u64,
}

impl Default for JsonScanner {
    fn default() -> Self {
        Self::new()
    }
}

impl JsonScanner {
    pub fn new() -> Self {
        Self {
            state: State::Value,
            started: false,
            frames: Vec::new(),
            path: Vec::new(),
            path_keys: Vec::new(),
            depth: 0,
            overlong_keys: 0,
            string_is_key: false,
            buf: [0; MAX_VALUE_PREFIX + 4],
            buf_len: 0,
            str_len: 0,
            unicode_acc: 0,
            unicode_digits: 0,
            high_surrogate: None,
            literal: b"",
            literal_pos: 0,
            offset: 0,
        }
    }

    /// Forgets everything, keeping allocations.
    pub fn reset(&mut self) {
        self.state = State::Value;
        self.started = false;
        self.frames.clear();
        self.path.clear();
        self.path_keys.clear();
        self.depth = 0;
        self.overlong_keys = 0;
        self.buf_len = 0;
        self.str_len = 0;
        self.offset = 0;
        self.high_surrogate = None;
    }

    pub fn status(&self) -> ScanStatus {
        match self.state {
            State::Failed(e) => ScanStatus::Failed(e),
            State::Done => ScanStatus::Complete,
            _ if !self.started => ScanStatus::Empty,
            _ => ScanStatus::Incomplete,
        }
    }

    /// Bytes consumed so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Signals the end of input. A top-level number has no terminator, so it
    /// is only reported here.
    pub fn finish<V: JsonVisitor>(&mut self, visitor: &mut V) -> ScanStatus {
        if self.state == State::Number && self.frames.is_empty() {
            self.emit_number(visitor);
            self.state = State::Done;
        }
        self.status()
    }

    /// Consumes `input`. Once the scanner has failed, further input is ignored.
    pub fn feed<V: JsonVisitor>(&mut self, input: &[u8], visitor: &mut V) {
        if self.path_keys.capacity() == 0 {
            self.reserve();
        }
        let mut i = 0;
        while i < input.len() {
            match self.state {
                State::Failed(_) => return,
                State::InString => {
                    // Fast path: copy up to the next quote, backslash or control byte.
                    let rest = &input[i..];
                    let stop = string_run_len(rest);
                    self.push_str_bytes(&rest[..stop]);
                    i += stop;
                    self.offset += stop as u64;
                    if i < input.len() {
                        self.step(input[i], visitor);
                        i += 1;
                        self.offset += 1;
                    }
                }
                _ => {
                    self.step(input[i], visitor);
                    i += 1;
                    self.offset += 1;
                }
            }
        }
    }

    /// Room for a typical document's nesting and keys, taken once: growing
    /// these one push at a time was most of the cost of a key.
    fn reserve(&mut self) {
        self.frames.reserve(MAX_TRACKED_DEPTH);
        self.path.reserve(MAX_TRACKED_DEPTH);
        self.path_keys.reserve(MAX_TRACKED_DEPTH * 16);
    }

    fn fail(&mut self, err: ScanError) {
        self.state = State::Failed(err);
    }

    fn syntax(&mut self) {
        let offset = self.offset;
        self.fail(ScanError::Syntax { offset });
    }

    fn step<V: JsonVisitor>(&mut self, b: u8, visitor: &mut V) {
        match self.state {
            State::Failed(_) => {}
            State::Done => {
                if !is_ws(b) {
                    self.fail(ScanError::TrailingData);
                }
            }
            State::Value | State::ArrayFirst => {
                if is_ws(b) {
                    return;
                }
                if self.state == State::ArrayFirst && b == b']' {
                    self.close(FrameKind::Array);
                    return;
                }
                self.begin_value(b, visitor);
            }
            State::ObjectFirst | State::ObjectKey => {
                if is_ws(b) {
                    return;
                }
                if b == b'"' {
                    self.string_is_key = true;
                    self.buf_len = 0;
                    self.str_len = 0;
                    self.state = State::InString;
                } else if b == b'}' && self.state == State::ObjectFirst {
                    self.close(FrameKind::Object);
                } else {
                    self.syntax();
                }
            }
            State::Colon => {
                if is_ws(b) {
                    return;
                }
                if b == b':' {
                    self.state = State::Value;
                } else {
                    self.syntax();
                }
            }
            State::AfterValue => {
                if is_ws(b) {
                    return;
                }
                match (b, self.frames.last().map(|f| f.kind)) {
                    (b',', Some(FrameKind::Object)) => {
                        self.pop_member_key();
                        self.state = State::ObjectKey;
                    }
                    (b',', Some(FrameKind::Array)) => self.state = State::Value,
                    (b'}', Some(FrameKind::Object)) => self.close(FrameKind::Object),
                    (b']', Some(FrameKind::Array)) => self.close(FrameKind::Array),
                    _ => self.syntax(),
                }
            }
            State::InString => match b {
                b'"' => self.end_string(visitor),
                b'\\' => self.state = State::Escape,
                0..=0x1f => self.syntax(),
                _ => self.push_str_bytes(&[b]),
            },
            State::Escape => self.escape_byte(b),
            State::Unicode => self.unicode_digit(b),
            State::Number => self.number_byte(b, visitor),
            State::Literal => self.literal_byte(b, visitor),
        }
    }

    /// The byte after a backslash in a string.
    fn escape_byte(&mut self, b: u8) {
        let decoded = match b {
            b'"' => b'"',
            b'\\' => b'\\',
            b'/' => b'/',
            b'b' => 0x08,
            b'f' => 0x0c,
            b'n' => b'\n',
            b'r' => b'\r',
            b't' => b'\t',
            b'u' => {
                self.unicode_acc = 0;
                self.unicode_digits = 0;
                self.state = State::Unicode;
                return;
            }
            _ => {
                self.syntax();
                return;
            }
        };
        self.flush_surrogate();
        self.push_str_bytes(&[decoded]);
        self.state = State::InString;
    }

    /// One of the four hex digits of a `\uXXXX` escape.
    fn unicode_digit(&mut self, b: u8) {
        let Some(d) = (b as char).to_digit(16) else {
            self.syntax();
            return;
        };
        self.unicode_acc = (self.unicode_acc << 4) | d;
        self.unicode_digits += 1;
        if self.unicode_digits == 4 {
            self.push_code_unit(self.unicode_acc);
            self.state = State::InString;
        }
    }

    /// A byte inside a number, or the byte that ends it.
    fn number_byte<V: JsonVisitor>(&mut self, b: u8, visitor: &mut V) {
        if matches!(b, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E') {
            if self.buf_len < MAX_NUMBER_LEN {
                self.buf[self.buf_len] = b;
                self.buf_len += 1;
            }
            return;
        }
        self.emit_number(visitor);
        self.after_value();
        // The terminator belongs to the enclosing context.
        self.step(b, visitor);
    }

    /// The next byte of `true`, `false` or `null`.
    fn literal_byte<V: JsonVisitor>(&mut self, b: u8, visitor: &mut V) {
        let pos = self.literal_pos as usize;
        if self.literal.get(pos) != Some(&b) {
            self.syntax();
            return;
        }
        self.literal_pos += 1;
        if self.literal_pos as usize == self.literal.len() {
            let value = match self.literal {
                b"true" => Scalar::Bool(true),
                b"false" => Scalar::Bool(false),
                _ => Scalar::Null,
            };
            let path = self.current_path();
            visitor.scalar(&path, value);
            self.after_value();
        }
    }

    fn begin_value<V: JsonVisitor>(&mut self, b: u8, visitor: &mut V) {
        self.started = true;
        match b {
            b'{' | b'[' => {
                if self.frames.len() >= MAX_DEPTH {
                    self.fail(ScanError::TooDeep);
                    return;
                }
                let kind = if b == b'{' {
                    Container::Object
                } else {
                    Container::Array
                };
                {
                    let path = self.current_path();
                    visitor.enter(&path, kind);
                }
                if b == b'{' {
                    self.frames.push(Frame {
                        kind: FrameKind::Object,
                        has_segment: false,
                    });
                    self.state = State::ObjectFirst;
                } else {
                    self.frames.push(Frame {
                        kind: FrameKind::Array,
                        has_segment: true,
                    });
                    self.push_index_segment();
                    self.state = State::ArrayFirst;
                }
            }
            b'"' => {
                self.string_is_key = false;
                self.buf_len = 0;
                self.str_len = 0;
                self.state = State::InString;
            }
            b'-' | b'0'..=b'9' => {
                self.buf[0] = b;
                self.buf_len = 1;
                self.state = State::Number;
            }
            b't' => self.start_literal(b"true"),
            b'f' => self.start_literal(b"false"),
            b'n' => self.start_literal(b"null"),
            _ => self.syntax(),
        }
    }

    fn start_literal(&mut self, lit: &'static [u8]) {
        self.literal = lit;
        self.literal_pos = 1;
        self.state = State::Literal;
    }

    fn close(&mut self, kind: FrameKind) {
        match self.frames.last() {
            Some(f) if f.kind == kind => {}
            _ => {
                self.syntax();
                return;
            }
        }
        if let Some(frame) = self.frames.pop() {
            if frame.has_segment {
                self.pop_segment();
            }
        }
        self.after_value();
    }

    fn after_value(&mut self) {
        self.state = if self.frames.is_empty() {
            State::Done
        } else {
            State::AfterValue
        };
    }

    /// Pushes the `[]` segment of an array's elements (keys are pushed by
    /// [`JsonScanner::push_key_from_buf`]).
    fn push_index_segment(&mut self) {
        self.depth += 1;
        if self.path.len() < MAX_TRACKED_DEPTH && self.depth == self.path.len() + 1 {
            self.path.push(SegmentMeta {
                start: self.path_keys.len() as u16,
                len: 0,
                is_index: true,
                overlong: false,
            });
        }
    }

    fn pop_segment(&mut self) {
        if self.depth == 0 {
            return;
        }
        if self.path.len() == self.depth {
            if let Some(seg) = self.path.pop() {
                if seg.overlong {
                    self.overlong_keys -= 1;
                }
                self.path_keys.truncate(seg.start as usize);
            }
        }
        self.depth -= 1;
    }

    fn pop_member_key(&mut self) {
        if let Some(frame) = self.frames.last_mut() {
            if frame.has_segment {
                frame.has_segment = false;
                self.pop_segment();
            }
        }
    }

    fn current_path(&self) -> Path<'_> {
        Path {
            segments: &self.path,
            keys: &self.path_keys,
            complete: self.depth == self.path.len() && self.overlong_keys == 0,
        }
    }

    fn push_str_bytes(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        // A high surrogate followed by anything but a low one is malformed.
        if self.high_surrogate.take().is_some() {
            self.push_str_bytes("\u{FFFD}".as_bytes());
        }
        self.str_len += bytes.len();
        let limit = if self.string_is_key {
            MAX_KEY_LEN + 1
        } else {
            MAX_VALUE_PREFIX
        };
        let room = limit.saturating_sub(self.buf_len);
        let n = room.min(bytes.len());
        self.buf[self.buf_len..self.buf_len + n].copy_from_slice(&bytes[..n]);
        self.buf_len += n;
    }

    fn push_code_unit(&mut self, unit: u32) {
        if (0xD800..0xDC00).contains(&unit) {
            self.flush_surrogate();
            self.high_surrogate = Some(unit);
            return;
        }
        let scalar = if (0xDC00..0xE000).contains(&unit) {
            match self.high_surrogate.take() {
                Some(high) => 0x10000 + ((high - 0xD800) << 10) + (unit - 0xDC00),
                None => 0xFFFD,
            }
        } else {
            self.flush_surrogate();
            unit
        };
        let c = char::from_u32(scalar).unwrap_or('\u{FFFD}');
        let mut tmp = [0u8; 4];
        let bytes = c.encode_utf8(&mut tmp).as_bytes();
        self.push_str_bytes(bytes);
    }

    fn flush_surrogate(&mut self) {
        if self.high_surrogate.take().is_some() {
            self.push_str_bytes("\u{FFFD}".as_bytes());
        }
    }

    fn end_string<V: JsonVisitor>(&mut self, visitor: &mut V) {
        self.flush_surrogate();
        if self.string_is_key {
            self.push_key_from_buf();
            if let Some(frame) = self.frames.last_mut() {
                frame.has_segment = true;
            }
            self.state = State::Colon;
            return;
        }
        let len = self.str_len;
        // The path and the value borrow different fields; the visitor is
        // not part of the scanner, so nothing needs copying.
        let prefix = &self.buf[..self.buf_len];
        let path = Path {
            segments: &self.path,
            keys: &self.path_keys,
            complete: self.depth == self.path.len() && self.overlong_keys == 0,
        };
        visitor.scalar(&path, Scalar::Str { prefix, len });
        self.after_value();
    }

    /// Pushes the key just read (in `buf`) as a path segment.
    fn push_key_from_buf(&mut self) {
        self.depth += 1;
        if self.path.len() < MAX_TRACKED_DEPTH && self.depth == self.path.len() + 1 {
            let overlong = self.str_len > MAX_KEY_LEN;
            let n = self.buf_len.min(MAX_KEY_LEN);
            let start = self.path_keys.len() as u16;
            self.path_keys.extend_from_slice(&self.buf[..n]);
            if overlong {
                self.overlong_keys += 1;
            }
            self.path.push(SegmentMeta {
                start,
                len: n as u8,
                is_index: false,
                overlong,
            });
        }
    }

    fn emit_number<V: JsonVisitor>(&mut self, visitor: &mut V) {
        let n = self.buf_len.min(MAX_NUMBER_LEN);
        let text = std::str::from_utf8(&self.buf[..n]).unwrap_or("");
        let path = Path {
            segments: &self.path,
            keys: &self.path_keys,
            complete: self.depth == self.path.len() && self.overlong_keys == 0,
        };
        visitor.scalar(&path, Scalar::Num(text));
    }
}

/// Length of the leading run of `bytes` that needs no attention inside a
/// string: up to the first `"`, `\\` or control byte. Eight bytes at a time
/// (SWAR), since string contents are most of what the scanner reads.
pub(crate) fn string_run_len(bytes: &[u8]) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let special = |b: u8| b == b'"' || b == b'\\' || b < 0x20;
    let mut i = 0;
    while i + 8 <= bytes.len() {
        let mut word = [0u8; 8];
        word.copy_from_slice(&bytes[i..i + 8]);
        let x = u64::from_le_bytes(word);
        let quote = x ^ (ONES * u64::from(b'"'));
        let backslash = x ^ (ONES * u64::from(b'\\'));
        // A byte is zero in `quote`/`backslash` where it matches; "less than
        // 0x20" is the classic has-less test (valid for bytes < 0x80; bytes
        // >= 0x80 are excluded by `!x`).
        let zero_q = quote.wrapping_sub(ONES) & !quote;
        let zero_b = backslash.wrapping_sub(ONES) & !backslash;
        let less = x.wrapping_sub(ONES * 0x20) & !x;
        let hits = (zero_q | zero_b | less) & HIGH;
        if hits != 0 {
            // The lowest flagged byte is exact; flags above it may be
            // borrow artefacts, so confirm bytewise from there.
            let first = (hits.trailing_zeros() / 8) as usize;
            return i + bytes[i + first..i + 8]
                .iter()
                .position(|&b| special(b))
                .map_or(8, |p| first + p);
        }
        i += 8;
    }
    i + bytes[i..]
        .iter()
        .position(|&b| special(b))
        .unwrap_or(bytes.len() - i)
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// The longest prefix of `bytes` that is valid UTF-8, so a value cut at
/// [`MAX_VALUE_PREFIX`] never ends in half a character.
fn utf8_prefix(bytes: &[u8]) -> &str {
    match std::str::from_utf8(bytes) {
        Ok(s) => s,
        Err(e) => std::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or(""),
    }
}

#[cfg(test)]
mod tests;
