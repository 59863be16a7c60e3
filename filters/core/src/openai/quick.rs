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
pub(super) fn quick_classify(data: &[u8], want_model: bool) -> Option<Quick> {
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
