use super::*;
use crate::testing::{FakeView, MS};

fn config() -> Config {
    Config::parse(
        br#"{"tenant":{"header":"x-tenant-id"},"models":["mistral-7b"],
             "routes":{"chat":{"route_class":"interactive","team":"platform-ai"}},
             "defaults":{"model":"mistral-7b"}}"#,
    )
    .unwrap()
}

fn request_view() -> FakeView {
    FakeView::default()
        .req(":path", "/v1/chat/completions")
        .req(":method", "POST")
        .req("x-tenant-id", "acme")
        .prop("xds.route_name", b"chat")
}

#[test]
fn streamed_request_yields_ttft_tpot_and_usage() {
    let cfg = config();
    let view = request_view()
        .resp(":status", "200")
        .resp("content-type", "text/event-stream")
        .prop("xds.cluster_name", b"vllm")
        .prop("response.code_details", b"via_upstream")
        .prop("response.flags", &0u64.to_le_bytes());
    let t0 = 1_000 * MS;
    let mut obs = RequestObserver::start(&cfg, &view, &t0).unwrap();
    obs.request_body(br#"{"model":"mistral-7b","stream":true}"#, true);
    obs.response_headers(&cfg, &view, t0 + 5 * MS);
    obs.response_body(
        b"data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n",
        t0 + 6 * MS,
    );
    for i in 0..5u64 {
        obs.response_body(
            b"data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n\n",
            t0 + (100 + 10 * i) * MS,
        );
    }
    obs.response_body(b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":5,\"prompt_tokens_details\":{\"cached_tokens\":4}}}\n\ndata: [DONE]\n\n", t0 + 141 * MS);
    let rec = obs.record(&cfg, &view, t0 + 142 * MS);
    assert_eq!(rec.ttfb_ms(), Some(5));
    assert_eq!(rec.ttft_ms(), Some(100));
    assert_eq!(rec.tpot_ms(), Some(10));
    assert_eq!(rec.duration_ms(), 142);
    assert_eq!(rec.usage.prompt_tokens, Some(7));
    assert_eq!(rec.usage_source, UsageSource::Reported);
    assert_eq!(rec.cache_hit, Some(CacheHit::PromptCache));
    // 5 tokens between first token (100 ms) and end (142 ms).
    assert_eq!(rec.output_tokens_per_second(), Some(5 * 1000 / 42));
    assert_eq!(rec.error, None);
    assert_eq!(rec.route_class.as_deref(), Some("interactive"));
    assert_eq!(rec.request_model.as_deref(), Some("mistral-7b"));
    assert_eq!(rec.tenant.as_deref(), Some(&b"acme"[..]));
    assert_eq!(rec.cluster_name.as_deref(), Some(&b"vllm"[..]));
}

#[test]
fn stream_without_usage_is_estimated_from_content_events() {
    let cfg = config();
    let view = request_view()
        .resp(":status", "200")
        .resp("content-type", "text/event-stream; charset=utf-8");
    let mut obs = RequestObserver::start(&cfg, &view, &0u64).unwrap();
    obs.response_headers(&cfg, &view, MS);
    obs.response_body(
        b"data: {\"choices\":[{\"text\":\"a\"}]}\n\ndata: {\"choices\":[{\"text\":\"b\"}]}\n\ndata: [DONE]\n\n",
        2 * MS,
    );
    let rec = obs.record(&cfg, &view, 3 * MS);
    assert_eq!(rec.usage_source, UsageSource::Estimated);
    assert_eq!(rec.completion_tokens(), Some(2));
    assert_eq!(rec.usage.prompt_tokens, None);
}

#[test]
fn non_llm_paths_are_ignored() {
    let cfg = config();
    let view = FakeView::default().req(":path", "/healthz");
    assert!(RequestObserver::start(&cfg, &view, &0u64).is_none());
}

#[test]
fn compressed_and_malformed_bodies_are_counted_not_parsed() {
    let cfg = config();
    let view = request_view()
        .resp(":status", "200")
        .resp("content-type", "application/json")
        .resp("content-encoding", "gzip");
    let mut obs = RequestObserver::start(&cfg, &view, &0u64).unwrap();
    obs.request_body(b"{\"model\": nope", true);
    obs.response_headers(&cfg, &view, MS);
    assert!(!obs.reads_response_body());
    obs.response_body_skipped(100);
    let rec = obs.record(&cfg, &view, 2 * MS);
    assert_eq!(rec.unparsed, Some(Unparsed::Compressed));
    assert!(rec.problems.request_json);
    assert_eq!(rec.response_bytes, 100);
    assert_eq!(rec.usage_source, UsageSource::None);
}

#[test]
fn error_classification() {
    use response_flags::*;
    let c = |s, d, f| classify_error(Some(s), Some(d), f, false, false);
    assert_eq!(c(503, "via_upstream", 0), Some(ErrorType::Upstream5xx));
    assert_eq!(c(429, "via_upstream", 0), Some(ErrorType::Upstream4xx));
    assert_eq!(c(200, "via_upstream", 0), None);
    assert_eq!(
        c(503, "no_healthy_upstream", 0),
        Some(ErrorType::GatewayReply)
    );
    assert_eq!(
        c(
            503,
            "upstream_reset_before_response_started{connection_failure}",
            0
        ),
        Some(ErrorType::GatewayReply)
    );
    assert_eq!(
        c(
            200,
            "upstream_reset_after_response_started{remote_reset}",
            0
        ),
        Some(ErrorType::UpstreamReset)
    );
    assert_eq!(
        c(504, "response_timeout", UPSTREAM_REQUEST_TIMEOUT),
        Some(ErrorType::Timeout)
    );
    assert_eq!(
        c(200, "via_upstream", DOWNSTREAM_CONNECTION_TERMINATION),
        Some(ErrorType::ClientAbort)
    );
    assert_eq!(
        classify_error(Some(200), Some("via_upstream"), 0, true, false),
        Some(ErrorType::StreamError)
    );
    assert_eq!(
        classify_error(Some(200), Some("via_upstream"), 0, false, true),
        Some(ErrorType::UpstreamReset)
    );
}

#[test]
fn integer_properties_decode_from_little_endian() {
    assert_eq!(decode_u64(&42u64.to_le_bytes()), Some(42));
    assert_eq!(decode_u64(b"17"), Some(17));
    assert_eq!(decode_u64(b"x"), None);
}
