//! Malformed input never traps the VM: it passes through unchanged and is
//! counted in `llm_gateway_parse_errors_total`.

use serde_json::json;

use crate::common::{chat_body, content_chunk, ms, Gateway, Req, Resp, CHAT, DONE};

const PARSE_ERRORS: &str = "llm_gateway_parse_errors_total";

/// Deterministic bytes that are not UTF-8, let alone JSON.
fn garbage(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (seed >> 56) as u8 | 0x80
        })
        .collect()
}

fn deep(n: usize) -> Vec<u8> {
    [vec![b'['; n], vec![b']'; n]].concat()
}

fn fine_json() -> Resp {
    Resp::json(
        200,
        &json!({"usage": {"prompt_tokens": 1, "completion_tokens": 1}}),
    )
}

#[test]
fn malformed_requests_and_responses_pass_through_and_are_counted() {
    let mut gw = Gateway::shipped();
    let chat = || Req::post(CHAT, &chat_body(false));
    let deep_request = [
        &br#"{"model":"mistral-7b","messages":"#[..],
        &deep(5000),
        b"}",
    ]
    .concat();

    // Request bodies: binary garbage, 5000-deep nesting.
    gw.exchange(&chat().raw_body(vec![garbage(4096, 1)]), &fine_json());
    gw.exchange(&chat().raw_body(vec![deep_request]), &fine_json());
    // Responses: 5000-deep JSON; SSE with two malformed events and a 5000-deep one.
    gw.exchange(&chat(), &Resp::raw(200, "application/json", deep(5000)));
    let sse = [
        content_chunk("a"),
        b"data: {not json\n\n".to_vec(),
        b"data: \x00\x01\x02\n\n".to_vec(),
        [&b"data: "[..], &deep(5000), b"\n\n"].concat(),
        content_chunk("b"),
        DONE.to_vec(),
    ]
    .concat();
    gw.exchange(
        &Req::post(CHAT, &chat_body(true)),
        &Resp::sse(vec![(ms(10), sse)], 333),
    );
    // Binary garbage as an event stream, in odd-sized chunks.
    gw.exchange(
        &Req::post(CHAT, &chat_body(true)),
        &Resp::sse(vec![(ms(10), garbage(65536, 7))], 4093),
    );

    let m = gw.settle();
    assert_eq!(m.total(PARSE_ERRORS, &[("kind", "request_json")]), 2);
    assert_eq!(m.total(PARSE_ERRORS, &[("kind", "response_json")]), 1);
    assert_eq!(m.total(PARSE_ERRORS, &[("kind", "sse_event")]), 3);
    assert_eq!(
        m.total("llm_gateway_requests_total", &[]),
        5,
        "every request counted"
    );
    gw.assert_healthy();
}

#[test]
fn non_utf8_header_values_do_not_trap_and_labels_stay_well_formed() {
    let mut gw = Gateway::shipped();
    let req = Req::post(CHAT, &chat_body(false))
        .header("x-tenant-id", b"\xff\xfe\xe9t\xe9")
        .header("x-rag-collection", b"\xc3\x28docs")
        .header("x-rag-top-k", b"\xff");
    let mut resp = fine_json();
    resp.headers
        .push(("x-rag-retrieval-ms", "\u{fffd}12".into()));
    resp.headers.push(("x-rag-top-score", "0.\u{0}9".into()));
    gw.exchange(&req, &resp);
    // An injection attempt through the tenant header.
    let req = Req::post(CHAT, &chat_body(false)).header("x-tenant-id", "a=.=b;.;model=.=x");
    gw.exchange(&req, &fine_json());

    let m = gw.settle();
    assert_eq!(m.total("llm_gateway_requests_total", &[]), 2);
    let well_formed = |v: &str| {
        v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:/-".contains(&b))
    };
    for metric in m.all() {
        for (k, v) in metric.labels() {
            let bucket_bound = k == "le" && v == "+Inf";
            assert!(
                well_formed(k) && (well_formed(v) || bucket_bound),
                "label {k}={v:?} in {}",
                metric.name
            );
        }
    }
    // The two unreadable x-rag-* response headers.
    assert_eq!(m.total(PARSE_ERRORS, &[("kind", "rag_header")]), 2);
    gw.assert_healthy();
}
