//! The optional `stream_options.include_usage` rewrite.
//!
//! OpenAI-compatible servers (vLLM included) report token usage in a stream
//! only when the client asked for it. With `usage.inject_include_usage` the
//! filter asks on the client's behalf, so every stream is counted exactly.
//! The client then receives one extra chunk with `"choices": []` and the
//! usage, which OpenAI clients already handle.

/// Returns `body` with `stream_options.include_usage` set to `true`, or `None`
/// when the body is not a JSON object.
///
/// Without an existing `stream_options` the member is inserted as text right
/// after the opening brace, leaving every other byte as the client sent it.
pub fn with_include_usage(body: &[u8], has_stream_options: bool) -> Option<Vec<u8>> {
    if !has_stream_options {
        let start = body.iter().position(|b| !b.is_ascii_whitespace())?;
        if body[start] != b'{' {
            return None;
        }
        let rest = &body[start + 1..];
        let empty_object = rest
            .iter()
            .find(|b| !b.is_ascii_whitespace())
            .is_some_and(|&b| b == b'}');
        let member: &[u8] = if empty_object {
            br#""stream_options":{"include_usage":true}"#
        } else {
            br#""stream_options":{"include_usage":true},"#
        };
        let mut out = Vec::with_capacity(body.len() + member.len());
        out.extend_from_slice(&body[..=start]);
        out.extend_from_slice(member);
        out.extend_from_slice(rest);
        return Some(out);
    }
    let mut value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let obj = value.as_object_mut()?;
    let options = obj
        .entry("stream_options")
        .or_insert_with(|| serde_json::Value::Object(Default::default()));
    if !options.is_object() {
        *options = serde_json::Value::Object(Default::default());
    }
    options
        .as_object_mut()?
        .insert("include_usage".into(), serde_json::Value::Bool(true));
    serde_json::to_vec(&value).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn parse(b: &[u8]) -> Value {
        serde_json::from_slice(b).unwrap()
    }

    #[test]
    fn inserts_without_touching_other_bytes() {
        let body = br#" {"model":"m","stream":true,"messages":[]}"#;
        let out = with_include_usage(body, false).unwrap();
        assert_eq!(
            out,
            br#" {"stream_options":{"include_usage":true},"model":"m","stream":true,"messages":[]}"#
        );
        assert_eq!(parse(&out)["stream_options"]["include_usage"], json!(true));
        assert_eq!(
            with_include_usage(b"{ }", false).unwrap(),
            br#"{"stream_options":{"include_usage":true} }"#
        );
    }

    #[test]
    fn rewrites_existing_stream_options() {
        let body = br#"{"stream":true,"stream_options":{"include_usage":false,"continuous_usage_stats":true}}"#;
        let out = parse(&with_include_usage(body, true).unwrap());
        assert_eq!(out["stream_options"]["include_usage"], json!(true));
        assert_eq!(out["stream_options"]["continuous_usage_stats"], json!(true));
        let out = parse(&with_include_usage(br#"{"stream_options":null}"#, true).unwrap());
        assert_eq!(out["stream_options"]["include_usage"], json!(true));
        // The reader reports a non-object `stream_options` as present, so the
        // rewrite replaces it instead of adding a duplicate member.
        for body in [
            &br#"{"stream":true,"stream_options":null}"#[..],
            br#"{"stream":true,"stream_options":[1]}"#,
        ] {
            let mut reader = crate::openai::RequestReader::new(None, None);
            reader.feed(body);
            let (facts, _) = reader.finish();
            assert!(facts.has_stream_options);
            let out = with_include_usage(body, facts.has_stream_options).unwrap();
            let text = String::from_utf8(out.clone()).unwrap();
            assert_eq!(text.matches("stream_options").count(), 1, "{text}");
            assert_eq!(parse(&out)["stream_options"]["include_usage"], json!(true));
        }
    }

    #[test]
    fn refuses_non_objects() {
        assert_eq!(with_include_usage(b"[1]", false), None);
        assert_eq!(with_include_usage(b"", false), None);
        assert_eq!(with_include_usage(b"[1]", true), None);
    }
}
