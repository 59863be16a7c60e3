use super::quick::{quick_classify, Quick};
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

/// Two readers fed the same chunks (chunk `i` at time `i`); their facts.
fn read_both(
    mut a: StreamReader,
    mut b: StreamReader,
    bytes: &[u8],
    cuts: &[prop::sample::Index],
) -> (StreamFacts, StreamFacts) {
    for (i, chunk) in split_at_cuts(bytes, cuts).into_iter().enumerate() {
        a.feed(chunk, i as u64);
        b.feed(chunk, i as u64);
    }
    (a.finish().0, b.finish().0)
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
        let (a, b) = read_both(StreamReader::default(), StreamReader::without_fast_path(), text.as_bytes(), &cuts);
        prop_assert_eq!(a, b);
    }

    /// Events that repeat one chunk's bytes around a content string written
    /// raw (unescaped quotes, backslashes, brackets, control bytes, nothing):
    /// comparing each with the previous event decides exactly what
    /// classifying it on its own decides, well-formed or not. (The fast path
    /// itself checks balance, strings and escapes, not every token: where
    /// that differs from the full parse is the documented fast-path
    /// trade-off, tested above on well-formed streams.)
    #[test]
    fn repeated_chunks_classify_as_on_their_own(
        contents in prop::collection::vec("[a-z\"\\\\{}\\[\\]:,\u{1}é]{0,5}", 1..12),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..6),
    ) {
        let mut text = String::from("data: {\"id\":\"c1\",\"model\":\"m\",\"choices\":[]}\n\n");
        for c in &contents {
            text.push_str(&format!(
                "data: {{\"id\":\"c1\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{c}\"}},\"finish_reason\":null}}]}}\n\n"
            ));
        }
        let (compared, alone) = read_both(StreamReader::default(), StreamReader::without_template(), text.as_bytes(), &cuts);
        prop_assert_eq!(compared, alone);
    }

    /// Well-formed content events of one shape after each other: the byte
    /// comparison finds every one with content, as the full parse does.
    #[test]
    fn repeated_well_formed_chunks_agree_with_the_full_parse(
        tokens in prop::collection::vec("[a-zé日😀 \"\\\\{}:,\u{1}]{0,6}", 1..16),
    ) {
        let refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
        let text = chat_stream(&refs, false);
        let mut fast = StreamReader::default();
        let mut full = StreamReader::without_fast_path();
        fast.feed(text.as_bytes(), 1);
        full.feed(text.as_bytes(), 1);
        let (a, b) = (fast.finish().0, full.finish().0);
        prop_assert_eq!(a.content_events, tokens.iter().filter(|t| !t.is_empty()).count() as u64);
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
