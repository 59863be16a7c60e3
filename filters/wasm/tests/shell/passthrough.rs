//! Traffic is never held or changed: requests the filter ignores cost only
//! a header read, response callbacks always continue, and bodies reach
//! their destination unmodified, except the opt-in include_usage rewrite.

use serde_json::json;
use tokentap_testhost::{Action, BufferType, HostCall, MapType};

use crate::common::{chat_body, content_chunk, event, ms, Gateway, Req, Resp, CHAT, DONE};

/// Calls a request the filter ignores may make: reading its request headers
/// (and the clock).
fn is_ignored_request_call(call: &HostCall) -> bool {
    matches!(
        call,
        HostCall::GetHeaderMapPairs {
            map: MapType::RequestHeaders
        } | HostCall::GetHeader {
            map: MapType::RequestHeaders,
            ..
        } | HostCall::GetCurrentTime
    )
}

#[test]
fn a_request_the_filter_ignores_asks_only_for_its_request_headers() {
    let mut gw = Gateway::shipped();
    let models = json!({"object": "list", "data": [{"id": "mistral-7b", "object": "model"}]});
    let mut get = Req::post("/v1/models", &json!({})).raw_body(vec![]);
    get.method = "GET";
    get.route = "models";
    let mut upload = Req::post("/v1/files", &json!({"purpose": "batch"}));
    upload.route = "models";
    for req in [get, upload] {
        let before = gw.host.calls().len();
        let out = gw.exchange(&req, &Resp::json(200, &models));
        let calls = &gw.host.calls()[before..];
        let extra: Vec<_> = calls
            .iter()
            .filter(|r| !is_ignored_request_call(&r.call))
            .collect();
        assert!(
            extra.is_empty(),
            "{}: unexpected host calls {extra:#?}",
            req.path
        );
        assert!(out.request_actions.iter().all(|a| *a == Action::Continue));
        assert_eq!(gw.forwarded_request(out.context_id), req.body_bytes());
    }
    assert!(gw
        .settle()
        .all()
        .iter()
        .all(|m| m.value == 0 && m.samples.is_empty()));
    gw.assert_healthy();
}

/// Responses of every kind the filter meets.
fn responses() -> Vec<Resp> {
    let usage = json!({"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 1}});
    let mut sse = content_chunk("hi");
    sse.extend(event(&usage));
    sse.extend_from_slice(DONE);
    let mut gzip = Resp::raw(200, "application/json", vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0]);
    gzip.headers.push(("content-encoding", "gzip".into()));
    let mut headers_only = Resp::raw(204, "application/json", vec![]);
    headers_only.phases.clear();
    vec![
        Resp::json(
            200,
            &json!({"choices": [{"message": {"content": "x"}}], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}),
        ),
        Resp::sse(vec![(ms(10), sse.clone())], 3),
        Resp::sse(vec![(ms(10), sse[..sse.len() / 2].to_vec())], 5),
        Resp::raw(503, "text/plain", b"upstream exploded".to_vec()),
        Resp::json(
            429,
            &json!({"error": {"message": "slow down", "type": "rate_limit"}}),
        ),
        gzip,
        headers_only,
    ]
}

#[test]
fn response_callbacks_always_continue_and_bodies_pass_unmodified() {
    let mut gw = Gateway::shipped();
    for (i, resp) in responses().into_iter().enumerate() {
        let req = Req::post(CHAT, &chat_body(i % 2 == 1));
        let before = gw.host.calls().len();
        // `send_response` asserts Continue and byte-identical response bodies.
        let out = gw.exchange(&req, &resp);
        assert!(
            out.request_actions.iter().all(|a| *a == Action::Continue),
            "{i}: {out:?}"
        );
        let pieces: usize = resp
            .phases
            .iter()
            .map(|(_, b)| b.chunks(resp.chunk).count())
            .sum();
        assert_eq!(
            out.response_actions,
            vec![Action::Continue; 1 + pieces],
            "response {i}: headers and every body piece continue"
        );
        assert_eq!(gw.forwarded_request(out.context_id), req.body_bytes());
        let edits: Vec<_> = gw.host.calls()[before..]
            .iter()
            .filter(|r| {
                matches!(
                    r.call,
                    HostCall::SetBuffer { .. }
                        | HostCall::AddHeader { .. }
                        | HostCall::ReplaceHeader { .. }
                        | HostCall::RemoveHeader { .. }
                        | HostCall::SetHeaderMapPairs { .. }
                        | HostCall::SendLocalResponse { .. }
                )
            })
            .collect();
        assert!(edits.is_empty(), "response {i}: traffic edited: {edits:#?}");
    }
    assert_eq!(
        gw.settle().total("llm_gateway_requests_total", &[]),
        responses().len() as i64
    );
    gw.assert_healthy();
}

fn injecting_gateway() -> Gateway {
    let mut config: serde_json::Value =
        serde_json::from_str(&crate::common::shipped_config()).unwrap();
    config["usage"] = json!({"inject_include_usage": true});
    Gateway::with_config(&config.to_string())
}

#[test]
fn include_usage_is_injected_into_streaming_requests_that_lack_it() {
    let mut gw = injecting_gateway();
    let original = chat_body(true);
    let bytes = original.to_string().into_bytes();
    let (a, b) = bytes.split_at(bytes.len() / 3);
    let (b, c) = b.split_at(b.len() / 2);
    let req = Req::post(CHAT, &original).raw_body(vec![a.to_vec(), b.to_vec(), c.to_vec()]);
    let id = gw.open(&req);
    let actions = gw.send_request(id, &req);
    assert_eq!(
        actions,
        [
            Action::Continue,
            Action::Pause,
            Action::Pause,
            Action::Continue
        ]
    );
    let stream = gw.host.stream(id).unwrap();
    let sent: serde_json::Value = serde_json::from_slice(&stream.forwarded_request_body).unwrap();
    let mut expected = original.clone();
    expected["stream_options"] = json!({"include_usage": true});
    assert_eq!(sent, expected, "rewritten body");
    let headers = stream.request_headers.as_ref().unwrap();
    assert_eq!(
        headers.get("content-length"),
        None,
        "stale content-length kept"
    );
    assert!(gw.host.calls().iter().any(|r| matches!(
        &r.call,
        HostCall::SetBuffer {
            buffer: BufferType::HttpRequestBody,
            ..
        }
    )));
    let usage =
        event(&json!({"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 1}}));
    gw.send_response(
        id,
        &Resp::sse(
            vec![(ms(10), [content_chunk("x"), usage, DONE.to_vec()].concat())],
            9,
        ),
    );
    gw.host.finish(id).unwrap();

    // Already asked for: byte-identical.
    let mut asked = chat_body(true);
    asked["stream_options"] = json!({"include_usage": true});
    let req = Req::post(CHAT, &asked);
    let out = gw.exchange(&req, &Resp::sse(vec![(ms(10), DONE.to_vec())], 4));
    assert_eq!(gw.forwarded_request(out.context_id), req.body_bytes());

    let m = gw.settle();
    assert_eq!(
        m.total(
            "llm_gateway_usage_injections_total",
            &[("result", "injected")]
        ),
        1
    );
    assert_eq!(
        m.total(
            "llm_gateway_usage_injections_total",
            &[("result", "not_needed")]
        ),
        1
    );
    gw.assert_healthy();
}

#[test]
fn without_include_usage_configured_request_bodies_are_never_held() {
    let mut gw = Gateway::shipped();
    let bytes = chat_body(true).to_string().into_bytes();
    let chunks: Vec<Vec<u8>> = bytes.chunks(10).map(<[u8]>::to_vec).collect();
    let req = Req::post(CHAT, &chat_body(true)).raw_body(chunks);
    let out = gw.exchange(&req, &Resp::sse(vec![(ms(10), DONE.to_vec())], 4));
    assert!(out.request_actions.iter().all(|a| *a == Action::Continue));
    let stream = gw.host.stream(out.context_id).unwrap();
    assert_eq!(stream.forwarded_request_body, bytes);
    assert!(stream
        .request_headers
        .as_ref()
        .unwrap()
        .get("content-length")
        .is_some());
    gw.assert_healthy();
}

#[test]
fn a_request_too_large_to_rewrite_is_released_unchanged() {
    let mut config: serde_json::Value =
        serde_json::from_str(&crate::common::shipped_config()).unwrap();
    config["usage"] = json!({"inject_include_usage": true, "max_request_buffer_bytes": 1024});
    let mut gw = Gateway::with_config(&config.to_string());
    let mut body = chat_body(true);
    body["messages"][0]["content"] = json!("x".repeat(3000));
    let bytes = body.to_string().into_bytes();
    let mut chunks: Vec<Vec<u8>> = bytes.chunks(500).map(<[u8]>::to_vec).collect();
    chunks.push(Vec::new()); // an empty last DATA frame carrying end of stream
    let req = Req::post(CHAT, &body).raw_body(chunks);
    let out = gw.exchange(&req, &Resp::sse(vec![(ms(10), DONE.to_vec())], 4));
    assert_eq!(gw.forwarded_request(out.context_id), bytes);
    assert_eq!(out.request_actions.last(), Some(&Action::Continue));
    let m = gw.settle();
    assert_eq!(
        m.total(
            "llm_gateway_usage_injections_total",
            &[("result", "too_large")]
        ),
        1
    );
    gw.assert_healthy();
}

#[test]
fn include_usage_rewrite_survives_an_empty_last_chunk() {
    let mut gw = injecting_gateway();
    let bytes = chat_body(true).to_string().into_bytes();
    let req = Req::post(CHAT, &chat_body(true)).raw_body(vec![bytes.clone(), Vec::new()]);
    let out = gw.exchange(&req, &Resp::sse(vec![(ms(10), DONE.to_vec())], 4));
    assert_eq!(
        out.request_actions,
        [Action::Continue, Action::Pause, Action::Continue]
    );
    let sent: serde_json::Value =
        serde_json::from_slice(gw.forwarded_request(out.context_id)).unwrap();
    assert_eq!(sent["stream_options"]["include_usage"], true);
    gw.assert_healthy();
}
