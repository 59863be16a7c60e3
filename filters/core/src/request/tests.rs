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

/// What Envoy 1.40 reports for each way a request ends (status, details,
/// flags, as its access log shows them; the e2e suite drives each through a
/// real Envoy) and the class it must get.
#[test]
fn error_classification() {
    use response_flags::*;
    let c = |s, d, f| classify_error(Some(s), Some(d), f, false, false);
    let refused = concat!(
        "upstream_reset_before_response_started",
        "{remote_connection_failure|delayed_connect_error:_Connection_refused}"
    );
    let cases: &[(u16, &str, u64, Option<ErrorType>)] = &[
        (200, "via_upstream", 0, None),
        (503, "via_upstream", 0, Some(ErrorType::Upstream5xx)),
        (429, "via_upstream", 0, Some(ErrorType::Upstream4xx)),
        // Connection refused, and a connect timeout: nothing was reached.
        // The connect timeout is no `timeout` (the old, wrong answer).
        (
            503,
            refused,
            UPSTREAM_CONNECTION_FAILURE,
            Some(ErrorType::UpstreamUnavailable),
        ),
        (
            503,
            "upstream_reset_before_response_started{connection_timeout}",
            UPSTREAM_CONNECTION_FAILURE,
            Some(ErrorType::UpstreamUnavailable),
        ),
        (
            503,
            "upstream_reset_before_response_started{connection_failure}",
            UPSTREAM_CONNECTION_FAILURE,
            Some(ErrorType::UpstreamUnavailable),
        ),
        (
            503,
            "no_healthy_upstream",
            NO_HEALTHY_UPSTREAM,
            Some(ErrorType::UpstreamUnavailable),
        ),
        (
            503,
            "cluster_not_found",
            NO_CLUSTER_FOUND,
            Some(ErrorType::UpstreamUnavailable),
        ),
        // Circuit breaker overflow and the other ways of shedding load.
        (
            503,
            "upstream_reset_before_response_started{overflow}",
            UPSTREAM_OVERFLOW,
            Some(ErrorType::Overloaded),
        ),
        (
            503,
            "maintenance_mode",
            UPSTREAM_OVERFLOW,
            Some(ErrorType::Overloaded),
        ),
        (
            503,
            "overload",
            OVERLOAD_MANAGER,
            Some(ErrorType::Overloaded),
        ),
        (
            503,
            "drop_overload",
            DROP_OVERLOAD,
            Some(ErrorType::Overloaded),
        ),
        (
            429,
            "local_rate_limited",
            RATE_LIMITED,
            Some(ErrorType::RateLimited),
        ),
        (
            429,
            "request_rate_limited",
            RATE_LIMITED,
            Some(ErrorType::RateLimited),
        ),
        // Timeouts of a request that was being served.
        (
            504,
            "response_timeout",
            UPSTREAM_REQUEST_TIMEOUT,
            Some(ErrorType::Timeout),
        ),
        (
            504,
            "upstream_per_try_timeout",
            UPSTREAM_REQUEST_TIMEOUT,
            Some(ErrorType::Timeout),
        ),
        (
            200,
            "stream_idle_timeout",
            STREAM_IDLE_TIMEOUT,
            Some(ErrorType::Timeout),
        ),
        (
            408,
            "stream_idle_timeout",
            STREAM_IDLE_TIMEOUT,
            Some(ErrorType::Timeout),
        ),
        (
            200,
            "upstream_max_stream_duration_reached",
            UPSTREAM_MAX_STREAM_DURATION_REACHED,
            Some(ErrorType::Timeout),
        ),
        (
            504,
            "max_duration_timeout",
            DURATION_TIMEOUT,
            Some(ErrorType::Timeout),
        ),
        // The runtime was reached, then its connection broke.
        (
            503,
            "upstream_reset_before_response_started{connection_termination}",
            UPSTREAM_CONNECTION_TERMINATION,
            Some(ErrorType::UpstreamReset),
        ),
        (
            503,
            "upstream_reset_before_response_started{remote_reset}",
            UPSTREAM_REMOTE_RESET,
            Some(ErrorType::UpstreamReset),
        ),
        (
            502,
            "upstream_reset_before_response_started{protocol_error}",
            UPSTREAM_PROTOCOL_ERROR,
            Some(ErrorType::UpstreamReset),
        ),
        (
            200,
            "upstream_reset_after_response_started{connection_termination}",
            UPSTREAM_CONNECTION_TERMINATION,
            Some(ErrorType::UpstreamReset),
        ),
        // The client left first, whatever else happened.
        (
            200,
            "via_upstream",
            DOWNSTREAM_CONNECTION_TERMINATION,
            Some(ErrorType::ClientAbort),
        ),
        (
            0,
            "downstream_remote_disconnect",
            0,
            Some(ErrorType::ClientAbort),
        ),
        (
            503,
            "upstream_reset_before_response_started{connection_timeout}",
            UPSTREAM_CONNECTION_FAILURE | DOWNSTREAM_REMOTE_RESET,
            Some(ErrorType::ClientAbort),
        ),
        // Any other local reply.
        (
            404,
            "route_not_found",
            NO_ROUTE_FOUND,
            Some(ErrorType::GatewayReply),
        ),
        (
            503,
            "fault_filter_abort",
            FAULT_INJECTED,
            Some(ErrorType::GatewayReply),
        ),
        (
            413,
            "request_payload_too_large",
            0,
            Some(ErrorType::GatewayReply),
        ),
        (200, "direct_response", 0, None),
        // Retries: the details name the reply the client got; the flags of
        // the earlier tries do not change it.
        (
            503,
            "via_upstream",
            UPSTREAM_REQUEST_TIMEOUT | UPSTREAM_RETRY_LIMIT_EXCEEDED,
            Some(ErrorType::Upstream5xx),
        ),
        (200, "via_upstream", UPSTREAM_CONNECTION_FAILURE, None),
        (
            504,
            "response_timeout",
            UPSTREAM_CONNECTION_FAILURE | UPSTREAM_REQUEST_TIMEOUT,
            Some(ErrorType::Timeout),
        ),
        // Details an extension wrote: the flags decide.
        (
            503,
            "some_filter_said_no",
            UPSTREAM_CONNECTION_FAILURE,
            Some(ErrorType::UpstreamUnavailable),
        ),
        (
            503,
            "some_filter_said_no",
            UPSTREAM_OVERFLOW,
            Some(ErrorType::Overloaded),
        ),
        (
            503,
            "some_filter_said_no",
            UPSTREAM_RETRY_LIMIT_EXCEEDED,
            Some(ErrorType::UpstreamUnavailable),
        ),
        (
            504,
            "some_filter_said_no",
            UPSTREAM_REQUEST_TIMEOUT,
            Some(ErrorType::Timeout),
        ),
    ];
    for &(status, details, flags, want) in cases {
        assert_eq!(
            c(status, details, flags),
            want,
            "{status} {details} {flags:#x}"
        );
    }
    // No details at all (the attribute was unavailable): flags, else status.
    assert_eq!(
        classify_error(Some(503), None, NO_HEALTHY_UPSTREAM, false, false),
        Some(ErrorType::UpstreamUnavailable)
    );
    assert_eq!(
        classify_error(Some(503), None, 0, false, false),
        Some(ErrorType::Upstream5xx)
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

/// The flag bits are `1 << CoreResponseFlag` in the order of Envoy's enum
/// (`envoy/stream_info/stream_info.h`): 30 flags, one bit each, none shared.
#[test]
fn response_flag_bits_follow_envoys_enum_order() {
    use response_flags::*;
    let in_enum_order = [
        FAILED_LOCAL_HEALTH_CHECK,
        NO_HEALTHY_UPSTREAM,
        UPSTREAM_REQUEST_TIMEOUT,
        LOCAL_RESET,
        UPSTREAM_REMOTE_RESET,
        UPSTREAM_CONNECTION_FAILURE,
        UPSTREAM_CONNECTION_TERMINATION,
        UPSTREAM_OVERFLOW,
        NO_ROUTE_FOUND,
        DELAY_INJECTED,
        FAULT_INJECTED,
        RATE_LIMITED,
        UNAUTHORIZED_EXTERNAL_SERVICE,
        RATE_LIMIT_SERVICE_ERROR,
        DOWNSTREAM_CONNECTION_TERMINATION,
        UPSTREAM_RETRY_LIMIT_EXCEEDED,
        STREAM_IDLE_TIMEOUT,
        INVALID_ENVOY_REQUEST_HEADERS,
        DOWNSTREAM_PROTOCOL_ERROR,
        UPSTREAM_MAX_STREAM_DURATION_REACHED,
        RESPONSE_FROM_CACHE_FILTER,
        NO_FILTER_CONFIG_FOUND,
        DURATION_TIMEOUT,
        UPSTREAM_PROTOCOL_ERROR,
        NO_CLUSTER_FOUND,
        OVERLOAD_MANAGER,
        DNS_RESOLUTION_FAILED,
        DROP_OVERLOAD,
        DOWNSTREAM_REMOTE_RESET,
        UNCONDITIONAL_DROP_OVERLOAD,
    ];
    for (n, bit) in in_enum_order.iter().enumerate() {
        assert_eq!(*bit, 1u64 << n, "flag {n}");
    }
    // The groups the classifier uses do not overlap.
    let groups = [
        CLIENT_ABORT,
        UNAVAILABLE,
        OVERLOADED,
        TIMEOUT,
        RESET,
        RATE_LIMITED,
    ];
    for (i, a) in groups.iter().enumerate() {
        for b in &groups[i + 1..] {
            assert_eq!(a & b, 0);
        }
    }
}

#[test]
fn integer_properties_decode_from_little_endian() {
    assert_eq!(decode_u64(&42u64.to_le_bytes()), Some(42));
    assert_eq!(decode_u64(b"17"), Some(17));
    assert_eq!(decode_u64(b"x"), None);
}
