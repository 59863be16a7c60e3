//! Stats the filter publishes for chat requests, streamed and not, read
//! as totals after the VM's tick (counter updates may be aggregated in
//! the VM and published on the tick).

use serde_json::json;

use crate::common::{
    chat_body, content_chunk, event, ms, with, Gateway, Req, Resp, CHAT, DONE, WORKLOAD,
};

const REQUESTS: &str = "llm_gateway_requests_total";
const TOKENS: &str = "llm_gateway_tokens_total";

fn chat_response() -> serde_json::Value {
    json!({
        "id": "chatcmpl-1", "object": "chat.completion", "model": "mistral-7b",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there, friend"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17,
                  "prompt_tokens_details": {"cached_tokens": 4}}
    })
}

#[test]
fn a_chat_request_is_counted_with_its_reported_usage() {
    let mut gw = Gateway::shipped();
    let req = Req::post(CHAT, &chat_body(false));
    let resp = Resp::json(200, &chat_response());
    gw.exchange(&req, &resp);
    let m = gw.settle();

    // The stat name as docs/metrics.md spells it (Istio's encoding).
    let name = "route=.=chat;.;tenant=.=acme;.;model=.=mistral-7b;.;route_class=.=interactive;.;\
                team=.=platform-ai;.;backend=.=llm_stable;.;status=.=200;.;llm_gateway_requests_total";
    assert_eq!(m.get(name).map(|s| s.value), Some(1), "{:#?}", m.all());
    let tenant = ("tenant", "acme");
    assert_eq!(m.total(REQUESTS, &with(&[tenant, ("status", "200")])), 1);
    assert_eq!(m.total(REQUESTS, &[]), 1);
    let tokens = |tt, src| {
        m.total(
            TOKENS,
            &with(&[tenant, ("token_type", tt), ("source", src)]),
        )
    };
    assert_eq!(tokens("prompt", "usage"), 12);
    assert_eq!(tokens("completion", "usage"), 5);
    assert_eq!(tokens("cached", "usage"), 4);
    assert_eq!(m.total(TOKENS, &[("source", "estimated")]), 0);
    assert_eq!(
        m.total(
            "llm_gateway_cache_hits_total",
            &with(&[tenant, ("cache", "prompt")])
        ),
        1
    );
    assert_eq!(m.total("llm_gateway_errors_total", &[]), 0);
    assert_eq!(m.total("llm_gateway_active_requests", &[]), 0);

    // Request headers at 0 ms, response headers at 100 ms, end at 500 ms.
    let samples = |family| m.histogram(family, &WORKLOAD);
    assert_eq!(
        samples("llm_gateway_request_duration_milliseconds"),
        (1, 500)
    );
    assert_eq!(
        samples("llm_gateway_time_to_first_byte_milliseconds"),
        (1, 100)
    );
    assert_eq!(
        samples("llm_gateway_request_bytes"),
        (1, (req.body_bytes().len() as u64) as i64)
    );
    assert_eq!(
        samples("llm_gateway_response_bytes"),
        (1, (resp.body_bytes().len() as u64) as i64)
    );
    assert_eq!(samples("llm_gateway_prompt_tokens"), (1, 12));
    assert_eq!(samples("llm_gateway_completion_tokens"), (1, 5));
    assert_eq!(samples("llm_gateway_output_tokens_per_second"), (1, 10));
    assert_eq!(samples("llm_gateway_time_to_first_token_milliseconds").0, 0);
    assert_eq!(
        samples("llm_gateway_time_per_output_token_milliseconds").0,
        0
    );
    // Latency histograms carry no tenant and no status.
    for h in m
        .all()
        .iter()
        .filter(|m| m.family().ends_with("_milliseconds"))
    {
        assert!(
            h.labels()
                .iter()
                .all(|(k, _)| *k != "tenant" && *k != "status"),
            "{}",
            h.name
        );
    }
    gw.assert_healthy();
}

/// A stream: role chunk with the headers at 100 ms, content events at
/// 250, 300 and 350 ms, then the finish chunk, usage and `[DONE]` at 400 ms.
fn stream_phases(usage: bool) -> Vec<(std::time::Duration, Vec<u8>)> {
    let role = event(
        &json!({"id": "c1", "object": "chat.completion.chunk", "model": "mistral-7b",
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]}),
    );
    let mut tail = event(
        &json!({"id": "c1", "object": "chat.completion.chunk", "model": "mistral-7b",
        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
    );
    if usage {
        tail.extend(event(&json!({"id": "c1", "object": "chat.completion.chunk", "model": "mistral-7b", "choices": [],
            "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}})));
    }
    tail.extend_from_slice(DONE);
    vec![
        (ms(0), role),
        (ms(150), content_chunk("Hel")),
        (ms(50), content_chunk("lo")),
        (ms(50), content_chunk(" there")),
        (ms(50), tail),
    ]
}

fn streaming_request(usage: bool) -> Req {
    let mut body = chat_body(true);
    if usage {
        body["stream_options"] = json!({"include_usage": true});
    }
    Req::post(CHAT, &body)
}

#[test]
fn a_stream_split_anywhere_gives_the_same_tokens_and_timings() {
    for chunk in [1, 2, 5, 17, 64, usize::MAX] {
        let mut gw = Gateway::shipped();
        let resp = Resp::sse(stream_phases(true), chunk);
        gw.exchange(&streaming_request(true), &resp);
        let m = gw.settle();
        let at = format!("{chunk}-byte chunks");
        assert_eq!(
            m.total(REQUESTS, &with(&[("tenant", "acme"), ("status", "200")])),
            1,
            "{at}"
        );
        assert_eq!(
            m.total(TOKENS, &[("token_type", "prompt"), ("source", "usage")]),
            12,
            "{at}"
        );
        assert_eq!(
            m.total(TOKENS, &[("token_type", "completion"), ("source", "usage")]),
            3,
            "{at}"
        );
        assert_eq!(m.total(TOKENS, &[("source", "estimated")]), 0, "{at}");
        let samples = |family| m.histogram(family, &WORKLOAD);
        assert_eq!(
            samples("llm_gateway_time_to_first_token_milliseconds"),
            (1, 250),
            "{at}"
        );
        assert_eq!(
            samples("llm_gateway_time_per_output_token_milliseconds"),
            (1, 50),
            "{at}"
        );
        assert_eq!(
            samples("llm_gateway_output_tokens_per_second"),
            (1, 20),
            "{at}"
        );
        assert_eq!(
            samples("llm_gateway_time_to_first_byte_milliseconds"),
            (1, 100),
            "{at}"
        );
        assert_eq!(
            samples("llm_gateway_request_duration_milliseconds"),
            (1, 400),
            "{at}"
        );
        assert_eq!(samples("llm_gateway_completion_tokens"), (1, 3), "{at}");
        assert_eq!(
            samples("llm_gateway_response_bytes"),
            (1, (resp.body_bytes().len() as u64) as i64),
            "{at}"
        );
        assert_eq!(m.total("llm_gateway_parse_errors_total", &[]), 0, "{at}");
        gw.assert_healthy();
    }
}

#[test]
fn a_stream_without_usage_is_estimated_from_content_events() {
    let mut gw = Gateway::shipped();
    gw.exchange(
        &streaming_request(false),
        &Resp::sse(stream_phases(false), 7),
    );
    let m = gw.settle();
    assert_eq!(
        m.total(
            TOKENS,
            &[("token_type", "completion"), ("source", "estimated")]
        ),
        3
    );
    assert_eq!(m.total(TOKENS, &[("token_type", "prompt")]), 0);
    assert_eq!(m.histogram("llm_gateway_prompt_tokens", &[]).0, 0);
    assert_eq!(
        m.histogram("llm_gateway_completion_tokens", &WORKLOAD),
        (1, 3)
    );
    gw.assert_healthy();
}

#[test]
fn totals_add_up_over_requests_tenants_and_a_64_event_body() {
    let mut gw = Gateway::shipped();
    let mut body = Vec::new();
    for i in 0..64 {
        body.extend(content_chunk(&format!("t{i}")));
    }
    body.extend(event(
        &json!({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 64}}),
    ));
    body.extend_from_slice(DONE);
    for tenant in ["acme", "globex", "acme"] {
        let req = streaming_request(true).header("x-tenant-id", tenant);
        gw.exchange(&req, &Resp::sse(vec![(ms(5), body.clone())], 1000));
    }
    let m = gw.settle();
    let by = |t| {
        m.total(
            TOKENS,
            &[
                ("tenant", t),
                ("token_type", "completion"),
                ("source", "usage"),
            ],
        )
    };
    assert_eq!((by("acme"), by("globex")), (128, 64));
    assert_eq!(m.total(REQUESTS, &[("tenant", "acme")]), 2);
    assert_eq!(m.total(REQUESTS, &[("tenant", "globex")]), 1);
    assert_eq!(
        m.histogram("llm_gateway_completion_tokens", &WORKLOAD),
        (3, 3 * 64)
    );
    gw.assert_healthy();
}

#[test]
fn the_active_gauge_counts_requests_in_flight() {
    let mut gw = Gateway::shipped();
    let req = streaming_request(true);
    let a = gw.open(&req);
    gw.send_request(a, &req);
    let b = gw.open(&req);
    gw.send_request(b, &req);
    let active = |gw: &mut Gateway| {
        gw.settle()
            .total("llm_gateway_active_requests", &[("route", "chat")])
    };
    assert_eq!(active(&mut gw), 2);
    gw.send_response(a, &Resp::sse(stream_phases(true), 64));
    gw.host.finish(a).unwrap();
    assert_eq!(active(&mut gw), 1);
    gw.send_response(b, &Resp::sse(stream_phases(true), 64));
    gw.host.finish(b).unwrap();
    assert_eq!(active(&mut gw), 0);
    assert_eq!(gw.settle().total(REQUESTS, &[]), 2);
    gw.assert_healthy();
}

/// `docs/metrics.md`'s table: metric name -> its labels, in order.
fn documented_families() -> Vec<(String, Vec<String>)> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/metrics.md");
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .filter(|l| l.starts_with("| `llm_"))
        .map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let labels = cells[4]
                .split(',')
                .map(|c| c.trim().trim_matches('`').to_string());
            let labels = labels.filter(|c| !c.is_empty() && c != "—").collect();
            (cells[1].trim_matches('`').to_string(), labels)
        })
        .collect()
}

#[test]
fn every_stat_the_module_defines_is_documented_with_its_labels() {
    let mut gw = Gateway::shipped();
    gw.exchange(
        &Req::post(CHAT, &chat_body(false)),
        &Resp::json(200, &chat_response()),
    );
    gw.exchange(
        &streaming_request(true),
        &Resp::sse(stream_phases(true), 11),
    );
    gw.exchange(
        &streaming_request(false),
        &Resp::sse(vec![(ms(5), b"data: {oops\n\n".to_vec())], 4),
    );
    gw.exchange(
        &Req::post(CHAT, &chat_body(false)),
        &Resp::raw(502, "text/plain", b"bad gateway".to_vec()),
    );
    let docs = documented_families();
    let m = gw.settle();
    assert!(m.all().len() > 10, "{:#?}", m.all());
    for stat in m.all() {
        // Histograms are published as `<family>_bucket{le}`, `_sum`, `_count`.
        let family = stat.family();
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| family.strip_suffix(suffix))
            .filter(|base| docs.iter().any(|(name, _)| name == base))
            .unwrap_or(family);
        let Some((_, labels)) = docs.iter().find(|(name, _)| name == base) else {
            panic!("{} is not in docs/metrics.md", stat.name);
        };
        let keys: Vec<&str> = stat
            .labels()
            .iter()
            .map(|(k, _)| *k)
            .filter(|k| base == family || *k != "le")
            .collect();
        assert_eq!(keys, *labels, "labels of {}", stat.name);
    }
}

#[test]
fn a_stream_cut_before_its_end_is_still_counted() {
    let mut gw = Gateway::shipped();
    let req = streaming_request(true);
    let id = gw.open(&req);
    gw.send_request(id, &req);
    // The role chunk and the first content event, then half of the next
    // event, and the stream ends without end of stream.
    let mut phases = stream_phases(true);
    phases.truncate(2);
    let half = content_chunk("lo");
    phases.push((ms(10), half[..half.len() / 2].to_vec()));
    gw.host.advance(crate::common::TTFB).unwrap();
    let headers =
        crate::common::Headers::new([(":status", "200"), ("content-type", "text/event-stream")]);
    gw.host.response_headers(id, headers, false).unwrap();
    for (after, bytes) in &phases {
        gw.host.advance(*after).unwrap();
        assert_eq!(
            gw.host.response_body(id, bytes, false).unwrap(),
            tokentap_testhost::Action::Continue
        );
    }
    gw.host.finish(id).unwrap();
    let m = gw.settle();
    assert_eq!(m.total(REQUESTS, &[("tenant", "acme")]), 1);
    assert_eq!(m.total("llm_gateway_active_requests", &[]), 0);
    assert_eq!(
        m.histogram("llm_gateway_time_to_first_token_milliseconds", &WORKLOAD),
        (1, 250)
    );
    let errors: Vec<_> = m
        .series("llm_gateway_errors_total", &[])
        .filter(|s| s.value > 0)
        .collect();
    assert_eq!(errors.len(), 1, "{errors:#?}");
    let kind = errors[0]
        .labels()
        .into_iter()
        .find(|(k, _)| *k == "error_type")
        .unwrap()
        .1;
    assert!(
        ["upstream_reset", "client_abort", "stream_error"].contains(&kind),
        "{kind}"
    );
    assert_eq!(errors[0].value, 1);
    gw.assert_healthy();
}

#[test]
fn interleaved_streams_keep_their_own_state() {
    let mut gw = Gateway::shipped();
    let (a_req, b_req) = (
        streaming_request(true),
        streaming_request(true).header("x-tenant-id", "globex"),
    );
    let (a, b) = (gw.open(&a_req), gw.open(&b_req));
    gw.send_request(a, &a_req);
    gw.send_request(b, &b_req);
    let sse = |n: u64| {
        let usage = json!({"choices": [], "usage": {"prompt_tokens": n, "completion_tokens": n}});
        [content_chunk("x"), event(&usage), DONE.to_vec()].concat()
    };
    let (body_a, body_b) = (sse(7), sse(30));
    let headers =
        || crate::common::Headers::new([(":status", "200"), ("content-type", "text/event-stream")]);
    gw.host.response_headers(a, headers(), false).unwrap();
    gw.host.response_headers(b, headers(), false).unwrap();
    let (pieces_a, pieces_b): (Vec<_>, Vec<_>) =
        (body_a.chunks(13).collect(), body_b.chunks(17).collect());
    for i in 0..pieces_a.len().max(pieces_b.len()) {
        for (id, pieces) in [(a, &pieces_a), (b, &pieces_b)] {
            if let Some(p) = pieces.get(i) {
                gw.host.response_body(id, p, i + 1 == pieces.len()).unwrap();
            }
        }
    }
    gw.host.finish(b).unwrap();
    gw.host.finish(a).unwrap();
    let m = gw.settle();
    let completion = |t| m.total(TOKENS, &[("tenant", t), ("token_type", "completion")]);
    assert_eq!((completion("acme"), completion("globex")), (7, 30));
    assert_eq!(gw.host.stream(a).unwrap().forwarded_response_body, body_a);
    assert_eq!(gw.host.stream(b).unwrap().forwarded_response_body, body_b);
    gw.assert_healthy();
}
