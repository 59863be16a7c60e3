//! The fast path of the stream reader: a byte search that classifies the
//! common small chunk (content or not, plain shape) without a JSON scan.
//! Anything it is unsure of is left to the full parse.

/// What the fast path concluded about an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Quick {
    /// A plain chunk carrying generated content.
    Content,
    /// A plain chunk without content (e.g. the role-only first chunk).
    Empty,
}

/// One pass over `data`: whether it is one balanced JSON object (strings
/// closed, brackets matched, nothing after the final `}`), noting in `k`
/// the keys that open its strings. Truncated or run-together events fail
/// this and take the full parse (which counts them as malformed); the fast
/// path does not validate every token beyond that. Stops early (false) at
/// a key that needs the full parse.
fn balanced(data: &[u8], k: &mut KeyScan, want_model: bool) -> bool {
    let mut stack: [u8; 16] = [0; 16];
    let mut depth = 0usize;
    let mut i = 0;
    while i < data.len() {
        let b = data[i];
        match b {
            b'"' => {
                k.note(i, &data[i + 1..], want_model);
                if k.needs_parse {
                    return false;
                }
                // Skip the string: runs of plain bytes at a time, escapes
                // checked (an invalid one is malformed JSON: the full parse
                // says so).
                match string_end(data, i + 1) {
                    Some(end) => i = end,
                    None => return false,
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

impl KeyScan {
    /// Notes the key that may start after the quote at `q` (`rest` follows
    /// the quote). Dispatches on the first byte: this runs for every quote of
    /// every streamed event.
    fn note(&mut self, q: usize, rest: &[u8], want_model: bool) {
        let starts = |p: &[u8]| rest.starts_with(p);
        match rest.first() {
            Some(b'c') if starts(b"choices\":[{") => {
                self.choices.get_or_insert(q);
            }
            Some(b'c') if starts(b"content\":") => {
                self.content.get_or_insert(q);
                self.content_count += 1;
            }
            Some(b'd') if starts(b"delta\":{") => {
                self.delta.get_or_insert(q);
            }
            Some(b't') if starts(b"text\":") => {
                self.text.get_or_insert(q);
                self.text_count += 1;
            }
            Some(b'f') if starts(b"finish_reason\":") => {
                self.finish_reason.get_or_insert(q);
            }
            Some(b'u') if starts(b"usage\"") => self.needs_parse = true,
            Some(b'e') if starts(b"error\"") => self.needs_parse = true,
            Some(b't') if starts(b"tool_calls\"") => self.needs_parse = true,
            Some(b'f') if starts(b"function_call\"") => self.needs_parse = true,
            Some(b'r') if starts(b"reasoning") => self.needs_parse = true,
            Some(b'm') if want_model && starts(b"model\"") => self.needs_parse = true,
            _ => {}
        }
    }
}

/// Classifies a compact OpenAI chunk by one pass over its bytes, or
/// returns `None` when the event needs the full JSON parse: anything
/// carrying usage, an error, a finish reason, tool calls or reasoning, a
/// model name still unknown, or any shape other than the compact one
/// servers emit. Keys are only looked for where a string opens, so text
/// inside a string (`\"content\":`) is never taken for structure.
#[cfg(test)]
pub(super) fn quick_classify(data: &[u8], want_model: bool) -> Option<Quick> {
    quick_classify_at(data.trim_ascii(), want_model).map(|(quick, _)| quick)
}

/// [`quick_classify`] on trimmed data, with where the field that decided
/// it opens (the index of its value's opening quote).
pub(super) fn quick_classify_at(data: &[u8], want_model: bool) -> Option<(Quick, usize)> {
    let mut k = KeyScan::default();
    if !(data.starts_with(b"{") && data.ends_with(b"}") && balanced(data, &mut k, want_model)) {
        return None;
    }
    let choices = k.choices?;
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
            Some(b'"') => Some((Quick::Empty, field)),
            Some(_) => Some((Quick::Content, field)),
            None => None,
        },
        _ => None,
    }
}

/// The last plain content event of a stream, split around its content
/// string. Servers repeat every byte of a chunk but the content (id, model,
/// creation time, finish reason `null`), so the next event that has the same
/// bytes before and after one well-formed, non-empty string is a content
/// event of the same shape, found by comparing bytes instead of walking its
/// structure again.
#[derive(Clone, Debug, Default)]
pub(super) struct Template {
    bytes: Vec<u8>,
    /// `bytes[..prefix]` ends with the content string's opening quote.
    prefix: usize,
    /// `bytes[suffix..]` starts with its closing quote.
    suffix: usize,
}

impl Template {
    /// Learns `data` (trimmed), which [`quick_classify_at`] found to be
    /// content with the string opening at `open`.
    pub(super) fn learn(&mut self, data: &[u8], open: usize) {
        self.bytes.clear();
        if let Some(close) = string_end(data, open + 1) {
            self.bytes.extend_from_slice(data);
            self.prefix = open + 1;
            self.suffix = close;
        }
    }

    /// Whether `data` (trimmed) is the learnt event with another non-empty
    /// content string.
    pub(super) fn matches(&self, data: &[u8]) -> bool {
        if self.bytes.is_empty() {
            return false;
        }
        let tail = self.bytes.len() - self.suffix;
        if data.len() <= self.prefix + tail {
            return false;
        }
        let end = data.len() - tail;
        same_bytes(&data[..self.prefix], &self.bytes[..self.prefix])
            && same_bytes(&data[end..], &self.bytes[self.suffix..])
            && string_end(data, self.prefix) == Some(end)
    }
}

/// Index of the quote closing the string whose contents start at `from`;
/// `None` at a control byte, an invalid escape or the end of the data.
fn string_end(data: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    loop {
        i += crate::json_scan::string_run_len(data.get(i..)?);
        match data.get(i) {
            Some(b'"') => return Some(i),
            Some(b'\\') => i += escape_len(&data[i + 1..])?,
            _ => return None,
        }
    }
}

/// Length of the escape whose backslash precedes `rest` (backslash
/// included), if it is one JSON allows.
fn escape_len(rest: &[u8]) -> Option<usize> {
    match rest.first()? {
        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => Some(2),
        b'u' => rest
            .get(1..5)?
            .iter()
            .all(u8::is_ascii_hexdigit)
            .then_some(6),
        _ => None,
    }
}

/// `a == b` eight bytes at a time (a slice comparison is a byte loop in
/// `wasm32`, which has no `memcmp`).
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut words_a = a.chunks_exact(8);
    let mut words_b = b.chunks_exact(8);
    for (x, y) in words_a.by_ref().zip(words_b.by_ref()) {
        let word = |w: &[u8]| {
            let mut buf = [0u8; 8];
            buf.copy_from_slice(w);
            u64::from_le_bytes(buf)
        };
        if word(x) != word(y) {
            return false;
        }
    }
    words_a.remainder() == words_b.remainder()
}
