//! Spans leave the VM on its tick as OTLP/HTTP calls to the configured
//! cluster; the call's answer is counted.

use serde_json::{json, Value};
use tokentap_testhost::{Headers, HostCall, HttpCallResponse, MapType};

use crate::common::{chat_body, content_chunk, ms, Gateway, Must, Req, Resp, CHAT, DONE};

fn tracing_gateway(cluster: &str) -> Gateway {
    let mut config: Value = serde_json::from_str(&crate::common::shipped_config()).unwrap();
    config["tracing"] = json!({"cluster": cluster, "sample_ratio": 1.0});
    Gateway::with_config(&config.to_string())
}

fn one_request(gw: &mut Gateway) -> u32 {
    let sse = [content_chunk("a"), DONE.to_vec()].concat();
    gw.exchange(
        &Req::post(CHAT, &chat_body(true)),
        &Resp::sse(vec![(ms(20), sse)], 7),
    )
    .context_id
}

fn answer(status: &str) -> HttpCallResponse {
    HttpCallResponse {
        headers: Headers::new([(":status", status)]),
        ..HttpCallResponse::default()
    }
}

#[test]
fn spans_are_exported_on_the_tick_and_the_answer_is_counted() {
    let mut gw = tracing_gateway("otel_collector");
    let id = one_request(&mut gw);
    let traceparent = gw.calls_in(id).into_iter().find_map(|r| match &r.call {
        HostCall::ReplaceHeader {
            map: MapType::RequestHeaders,
            name,
            value,
        } if name == b"traceparent" => Some(String::from_utf8_lossy(value).into_owned()),
        _ => None,
    });
    let traceparent = traceparent.expect("traceparent injected upstream");
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(
        parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
        [2, 32, 16, 2],
        "{traceparent}"
    );

    gw.settle();
    let calls = gw.host.state().http_calls.clone();
    assert_eq!(calls.len(), 1, "one export after a second: {calls:?}");
    let export = &calls[0];
    assert_eq!(export.upstream, "otel_collector");
    assert_eq!(export.headers.get(":path"), Some(&b"/v1/traces"[..]));
    assert_eq!(
        export.headers.get("content-type"),
        Some(&b"application/x-protobuf"[..])
    );
    assert!(!export.body.is_empty());
    // The span carries the injected trace id (protobuf bytes of the hex id).
    let trace_id: Vec<u8> = (0..16)
        .map(|i| u8::from_str_radix(&parts[1][2 * i..2 * i + 2], 16).unwrap())
        .collect();
    assert!(
        export.body.windows(16).any(|w| w == trace_id),
        "trace id not in the export"
    );

    gw.host
        .http_call_response(export.token, answer("200"))
        .must();
    let m = gw.settle();
    assert_eq!(m.total("llm_gateway_spans_exported_total", &[]), 1);
    assert_eq!(
        m.total("llm_gateway_span_exports_total", &[("result", "ok")]),
        1
    );

    one_request(&mut gw);
    gw.settle();
    let token = gw.host.state().http_calls.last().unwrap().token;
    gw.host.http_call_response(token, answer("503")).must();
    let m = gw.settle();
    assert_eq!(
        m.total(
            "llm_gateway_span_exports_total",
            &[("result", "http_error")]
        ),
        1
    );

    // 200 with an OTLP partial success: one span rejected by the collector.
    one_request(&mut gw);
    gw.settle();
    let token = gw.host.state().http_calls.last().unwrap().token;
    let partial = HttpCallResponse {
        body: vec![0x0a, 0x02, 0x08, 0x01],
        ..answer("200")
    };
    gw.host.http_call_response(token, partial).must();
    let m = gw.settle();
    assert_eq!(
        m.total("llm_gateway_spans_dropped_total", &[("reason", "rejected")]),
        1
    );
    assert_eq!(m.total("llm_gateway_spans_exported_total", &[]), 1);
    gw.assert_healthy();
}

#[test]
fn a_collector_cluster_envoy_refuses_drops_spans_and_counts_them() {
    let mut gw = tracing_gateway("no_such_cluster");
    one_request(&mut gw);
    let dropped = gw.settle().total(
        "llm_gateway_spans_dropped_total",
        &[("reason", "dispatch_failed")],
    );
    assert_eq!(dropped, 1);
    assert!(gw.host.state().http_calls.is_empty());
}
