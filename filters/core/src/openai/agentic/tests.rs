use super::super::{Api, JsonResponseReader, StreamReader};
use crate::json_scan::ScanStatus;
use crate::testing::split_at_cuts;
use proptest::prelude::*;

fn event(name: &str, data: &serde_json::Value) -> String {
    format!("event: {name}\ndata: {data}\n\n")
}

/// A Responses API stream shaped as vLLM's `serving_responses.py` writes it.
pub(crate) fn responses_stream(tokens: &[&str], with_usage: bool) -> String {
    use serde_json::json;
    let head = json!({"id":"resp_1","object":"response","created_at":1,"model":"mistral-7b","output":[],"usage":null});
    let mut created = head.clone();
    created["status"] = json!("in_progress");
    let mut s = event(
        "response.created",
        &json!({"type":"response.created","sequence_number":0,"response":created}),
    );
    s += &event(
        "response.output_item.added",
        &json!({"type":"response.output_item.added","sequence_number":1,"output_index":0,"item":{"id":"msg_1","type":"message","status":"in_progress","role":"assistant","content":[]}}),
    );
    s += &event(
        "response.content_part.added",
        &json!({"type":"response.content_part.added","sequence_number":2,"item_id":"msg_1","output_index":0,"content_index":0,"part":{"type":"output_text","text":"","annotations":[]}}),
    );
    for (i, t) in tokens.iter().enumerate() {
        s += &event(
            "response.output_text.delta",
            &json!({"type":"response.output_text.delta","sequence_number":3 + i,"item_id":"msg_1","output_index":0,"content_index":0,"delta":t,"logprobs":[]}),
        );
    }
    let text: String = tokens.concat();
    s += &event(
        "response.output_text.done",
        &json!({"type":"response.output_text.done","sequence_number":90,"item_id":"msg_1","output_index":0,"content_index":0,"text":text}),
    );
    let mut done = head;
    done["status"] = json!("completed");
    done["output"] = json!([{"id":"msg_1","type":"message","role":"assistant","content":[{"type":"output_text","text":text}]}]);
    if with_usage {
        done["usage"] = json!({"input_tokens":21,"input_tokens_details":{"cached_tokens":16},"output_tokens":tokens.len(),"output_tokens_details":{"reasoning_tokens":2},"total_tokens":21 + tokens.len()});
    }
    s += &event(
        "response.completed",
        &json!({"type":"response.completed","sequence_number":91,"response":done}),
    );
    s
}

/// A Messages API stream as Anthropic documents it (and vLLM writes it).
pub(crate) fn messages_stream(tokens: &[&str], with_usage: bool) -> String {
    use serde_json::json;
    let mut s = event(
        "message_start",
        &json!({"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","content":[],"model":"mistral-7b","stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":5,"cache_creation_input_tokens":4,"cache_read_input_tokens":12,"output_tokens":1}}}),
    );
    s += &event(
        "content_block_start",
        &json!({"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}),
    );
    s += &event("ping", &json!({"type":"ping"}));
    for t in tokens {
        s += &event(
            "content_block_delta",
            &json!({"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":t}}),
        );
    }
    s += &event(
        "content_block_stop",
        &json!({"type":"content_block_stop","index":0}),
    );
    let mut delta =
        json!({"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null}});
    if with_usage {
        delta["usage"] = json!({"output_tokens": tokens.len()});
    }
    s += &event("message_delta", &delta);
    s += &event("message_stop", &json!({"type":"message_stop"}));
    s
}

fn read(api: Api, bytes: &[u8], cuts: &[prop::sample::Index]) -> super::super::StreamFacts {
    let mut r = StreamReader::for_api(api);
    for (i, chunk) in split_at_cuts(bytes, cuts).into_iter().enumerate() {
        r.feed(chunk, i as u64);
    }
    let (f, partial) = r.finish();
    assert!(!partial);
    f
}

#[test]
fn responses_stream_content_usage_and_model() {
    let text = responses_stream(&["Hel", "lo", " wörld"], true);
    let f = read(Api::Responses, text.as_bytes(), &[]);
    assert_eq!(f.content_events, 3);
    assert_eq!(f.usage.prompt_tokens, Some(21));
    assert_eq!(f.usage.completion_tokens, Some(3));
    assert_eq!(f.usage.cached_tokens, Some(16));
    assert_eq!(f.usage.reasoning_tokens, Some(2));
    assert_eq!(f.model.as_deref(), Some("mistral-7b"));
    assert_eq!(f.finish_reason.as_deref(), Some("completed"));
    assert_eq!(f.malformed_events, 0);
    assert!(!f.error_event);

    // The first token is the first delta, not `response.created`: byte by
    // byte, the first content time is the byte that ended the first delta.
    let mut r = StreamReader::for_api(Api::Responses);
    for (i, b) in text.as_bytes().iter().enumerate() {
        r.feed(std::slice::from_ref(b), i as u64);
    }
    let (f, _) = r.finish();
    let first_delta = text.find("response.output_text.delta").unwrap();
    let end = first_delta + text[first_delta..].find("\n\n").unwrap() + 1;
    assert_eq!(f.first_content_ns, Some(end as u64));
}

#[test]
fn responses_reasoning_tool_and_error_events() {
    let text = concat!(
        "event: response.reasoning_text.delta\ndata: {\"type\":\"response.reasoning_text.delta\",\"delta\":\"think\"}\n\n",
        "event: response.function_call_arguments.delta\ndata: {\"type\":\"response.function_call_arguments.delta\",\"delta\":\"{\\\"a\\\"\"}\n\n",
        "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"\"}\n\n",
        "event: response.output_text.done\ndata: {\"type\":\"response.output_text.done\",\"text\":\"full text\"}\n\n",
        "event: error\ndata: {\"type\":\"error\",\"code\":\"server_error\",\"message\":\"boom\",\"param\":null,\"sequence_number\":7}\n\n",
    );
    let f = read(Api::Responses, text.as_bytes(), &[]);
    assert_eq!(
        f.content_events, 2,
        "reasoning and tool-call deltas count, empty delta and done do not"
    );
    assert!(f.error_event);
    assert_eq!(f.error_type.as_deref(), Some("server_error"));

    let failed = "data: {\"type\":\"response.failed\",\"response\":{\"status\":\"failed\",\"error\":{\"code\":\"rate_limit_exceeded\",\"message\":\"x\"},\"usage\":null}}\n\n";
    let f = read(Api::Responses, failed.as_bytes(), &[]);
    assert!(f.error_event);
    assert_eq!(f.error_type.as_deref(), Some("rate_limit_exceeded"));
    assert_eq!(f.finish_reason.as_deref(), Some("failed"));

    let incomplete = "data: {\"type\":\"response.incomplete\",\"response\":{\"status\":\"incomplete\",\"incomplete_details\":{\"reason\":\"max_output_tokens\"},\"usage\":{\"input_tokens\":3,\"output_tokens\":8}}}\n\n";
    let f = read(Api::Responses, incomplete.as_bytes(), &[]);
    assert!(!f.error_event);
    assert_eq!(f.finish_reason.as_deref(), Some("max_output_tokens"));
    assert_eq!(f.usage.completion_tokens, Some(8));
}

#[test]
fn messages_stream_content_usage_and_model() {
    let text = messages_stream(&["Hel", "lo", " 日本"], true);
    let f = read(Api::Messages, text.as_bytes(), &[]);
    assert_eq!(f.content_events, 3);
    assert_eq!(
        f.usage.prompt_tokens,
        Some(5),
        "raw input_tokens; the record adds the cache"
    );
    assert_eq!(f.usage.cached_tokens, Some(12));
    assert_eq!(f.usage.cache_creation_tokens, Some(4));
    assert_eq!(f.usage.completion_tokens, Some(3));
    assert_eq!(f.model.as_deref(), Some("mistral-7b"));
    assert_eq!(f.finish_reason.as_deref(), Some("end_turn"));
    assert!(!f.done && !f.error_event);

    // Without message_delta's usage the placeholder output count of
    // message_start is not taken for the answer's.
    let f = read(
        Api::Messages,
        messages_stream(&["a"], false).as_bytes(),
        &[],
    );
    assert_eq!(f.usage.completion_tokens, None);
    assert_eq!(f.usage.prompt_tokens, Some(5));
}

#[test]
fn messages_thinking_tool_use_and_error_events() {
    let text = concat!(
        "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"thinking\",\"thinking\":\"\"}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"thinking_delta\",\"thinking\":\"hmm\"}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"signature_delta\",\"signature\":\"abc\"}}\n\n",
        "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":1,\"content_block\":{\"type\":\"tool_use\",\"id\":\"t1\",\"name\":\"get_weather\",\"input\":{}}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"city\\\":\"}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"\"}}\n\n",
        "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n",
    );
    let f = read(Api::Messages, text.as_bytes(), &[]);
    assert_eq!(
        f.content_events, 3,
        "thinking delta, tool_use start, non-empty input_json_delta"
    );
    assert!(f.error_event);
    assert_eq!(f.error_type.as_deref(), Some("overloaded_error"));
}

#[test]
fn non_streamed_bodies() {
    let mut r = JsonResponseReader::for_api(Api::Responses);
    r.feed(br#"{"id":"resp_1","object":"response","created_at":1,"status":"incomplete","incomplete_details":{"reason":"max_output_tokens"},"error":null,"model":"mistral-7b","output":[{"type":"message","content":[{"type":"output_text","text":"hi"}]}],"usage":{"input_tokens":9,"input_tokens_details":{"cached_tokens":4},"output_tokens":5,"output_tokens_details":{"reasoning_tokens":1},"total_tokens":14}}"#);
    let (f, st) = r.finish();
    assert_eq!(st, ScanStatus::Complete);
    assert_eq!(f.model.as_deref(), Some("mistral-7b"));
    assert_eq!(
        (
            f.usage.prompt_tokens,
            f.usage.completion_tokens,
            f.usage.cached_tokens,
            f.usage.reasoning_tokens
        ),
        (Some(9), Some(5), Some(4), Some(1))
    );
    assert_eq!(f.finish_reason.as_deref(), Some("max_output_tokens"));
    assert!(!f.has_error);

    let mut r = JsonResponseReader::for_api(Api::Messages);
    r.feed(br#"{"id":"msg_1","type":"message","role":"assistant","model":"mistral-7b","content":[{"type":"text","text":"hi"}],"stop_reason":"max_tokens","stop_sequence":null,"usage":{"input_tokens":7,"cache_creation_input_tokens":2,"cache_read_input_tokens":3,"output_tokens":4}}"#);
    let (f, _) = r.finish();
    assert_eq!(
        (
            f.usage.prompt_tokens,
            f.usage.completion_tokens,
            f.usage.cached_tokens,
            f.usage.cache_creation_tokens
        ),
        (Some(7), Some(4), Some(3), Some(2))
    );
    assert_eq!(f.finish_reason.as_deref(), Some("max_tokens"));

    let mut r = JsonResponseReader::for_api(Api::Messages);
    r.feed(br#"{"type":"error","error":{"type":"invalid_request_error","message":"max_tokens: field required"}}"#);
    let (f, _) = r.finish();
    assert!(f.has_error);
    assert_eq!(f.error_type.as_deref(), Some("invalid_request_error"));
}

#[test]
fn malformed_events_are_counted_and_reading_goes_on() {
    for api in [Api::Responses, Api::Messages] {
        let good = match api {
            Api::Responses => "data: {\"type\":\"response.output_text.delta\",\"delta\":\"a\"}\n\n",
            _ => "data: {\"type\":\"content_block_delta\",\"delta\":{\"type\":\"text_delta\",\"text\":\"a\"}}\n\n",
        };
        let text = format!("{good}data: {{\"type\":\"response.output_text.delta\",\"delta\":\"x\n\ndata: \u{1}\u{2}\n\nevent: x\ndata: {{\"type\":\n\n{good}");
        let f = read(api, text.as_bytes(), &[]);
        assert_eq!((f.content_events, f.malformed_events), (2, 3), "{api:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// Any re-chunking of a Responses or Messages stream reads what the
    /// whole stream reads, and the reported usage is exact.
    #[test]
    fn rechunking_gives_the_same_facts(
        tokens in prop::collection::vec("[a-zé日😀 \"\\\\]{1,6}", 0..16),
        with_usage in any::<bool>(),
        crlf in any::<bool>(),
        messages in any::<bool>(),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
    ) {
        let refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
        let (api, mut text) = if messages {
            (Api::Messages, messages_stream(&refs, with_usage))
        } else {
            (Api::Responses, responses_stream(&refs, with_usage))
        };
        if crlf { text = text.replace('\n', "\r\n"); }
        let whole = read(api, text.as_bytes(), &[]);
        prop_assert_eq!(whole.content_events, tokens.len() as u64);
        prop_assert_eq!(whole.usage.completion_tokens, with_usage.then_some(tokens.len() as u64));
        prop_assert_eq!(whole.malformed_events, 0);
        let split = read(api, text.as_bytes(), &cuts);
        // Times differ with the chunking; everything else must not.
        prop_assert_eq!(
            (split.content_events, split.usage, &split.model, &split.finish_reason, split.events),
            (whole.content_events, whole.usage, &whole.model, &whole.finish_reason, whole.events)
        );
        prop_assert_eq!(split.first_content_ns.is_some(), !tokens.is_empty());
    }

    /// Arbitrary bytes never panic and never count more content than events.
    #[test]
    fn garbage_is_bounded(
        bytes in prop::collection::vec(any::<u8>(), 0..600),
        messages in any::<bool>(),
    ) {
        let api = if messages { Api::Messages } else { Api::Responses };
        let mut r = StreamReader::for_api(api);
        r.feed(&bytes, 0);
        let (f, _) = r.finish();
        prop_assert!(f.content_events + f.malformed_events <= f.events);
    }
}
