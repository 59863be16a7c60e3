//! Filter state (`wasm.tokentap`) for access logs: written once per LLM
//! request, when the response ends (before Envoy's access loggers run),
//! as one JSON object whose values carry their own JSON types.

use serde_json::{json, Value};
use tokentap_testhost::HostCall;

use crate::common::{chat_body, content_chunk, event, ms, Gateway, Req, Resp, CHAT, DONE};

/// The `proxy_set_property` calls of one context.
fn state_writes(gw: &Gateway, context_id: u32) -> Vec<(Vec<String>, Vec<u8>)> {
    gw.calls_in(context_id)
        .into_iter()
        .filter_map(|r| match &r.call {
            HostCall::SetProperty { path, value } => Some((path.clone(), value.clone())),
            _ => None,
        })
        .collect()
}

/// Runs a request up to the end of its response, checks the summary was
/// written by then, finishes it, and returns the one summary written.
fn summary_of(gw: &mut Gateway, req: &Req, resp: &Resp) -> Value {
    let id = gw.open(req);
    gw.send_request(id, req);
    gw.send_response(id, resp);
    let stream = gw.host.stream(id).unwrap();
    assert!(
        stream.filter_state.contains_key("wasm.tokentap"),
        "not written when the response ended"
    );
    gw.host.finish(id).unwrap();
    let writes = state_writes(gw, id);
    assert_eq!(writes.len(), 1, "{writes:?}");
    assert_eq!(writes[0].0, ["tokentap"]);
    serde_json::from_slice(&writes[0].1).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {:?}",
            String::from_utf8_lossy(&writes[0].1)
        )
    })
}

fn streamed_response() -> Resp {
    let usage =
        event(&json!({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2}}));
    Resp::sse(
        vec![
            (ms(50), content_chunk("a")),
            (ms(20), [content_chunk("b"), usage, DONE.to_vec()].concat()),
        ],
        6,
    )
}

#[test]
fn one_summary_per_llm_request_with_typed_values() {
    let mut gw = Gateway::shipped();
    let s = summary_of(
        &mut gw,
        &Req::post(CHAT, &chat_body(true)),
        &streamed_response(),
    );
    for key in [
        "model",
        "tenant",
        "route_class",
        "team",
        "operation",
        "usage_source",
    ] {
        assert!(s[key].is_string(), "{key} in {s}");
    }
    for key in ["streamed", "cache_hit"] {
        assert!(s[key].is_boolean(), "{key} in {s}");
    }
    for key in ["ttfb_ms", "ttft_ms", "prompt_tokens", "completion_tokens"] {
        assert!(s[key].is_u64(), "{key} in {s}");
    }
    assert_eq!(s["model"], "mistral-7b");
    assert_eq!(s["tenant"], "acme");
    assert_eq!(s["streamed"], true);
    assert_eq!(s["ttfb_ms"], 100);
    assert_eq!(s["ttft_ms"], 150);
    assert_eq!(
        (s["prompt_tokens"].as_u64(), s["completion_tokens"].as_u64()),
        (Some(9), Some(2))
    );
    assert_eq!(s["usage_source"], "usage");

    let usage = json!({"usage": {"prompt_tokens": 3, "completion_tokens": 1}});
    let s = summary_of(
        &mut gw,
        &Req::post(CHAT, &chat_body(false)),
        &Resp::json(200, &usage),
    );
    assert_eq!(s["streamed"], false);
    assert!(s.get("ttft_ms").is_none(), "{s}");
    gw.assert_healthy();
}

#[test]
fn label_values_that_look_like_numbers_or_booleans_stay_strings() {
    let mut gw = Gateway::shipped();
    for tenant in ["42", "true"] {
        let req = Req::post(CHAT, &chat_body(true)).header("x-tenant-id", tenant);
        let s = summary_of(&mut gw, &req, &streamed_response());
        assert_eq!(s["tenant"], Value::String(tenant.into()), "{s}");
    }
}

#[test]
fn filter_state_modes_off_and_fields() {
    let mut config: Value = serde_json::from_str(&crate::common::shipped_config()).unwrap();
    config["filter_state"] = json!("off");
    let mut gw = Gateway::with_config(&config.to_string());
    let out = gw.exchange(&Req::post(CHAT, &chat_body(true)), &streamed_response());
    assert!(state_writes(&gw, out.context_id).is_empty());

    config["filter_state"] = json!("fields");
    let mut gw = Gateway::with_config(&config.to_string());
    let out = gw.exchange(&Req::post(CHAT, &chat_body(true)), &streamed_response());
    let writes = state_writes(&gw, out.context_id);
    let field = |name: &str| {
        writes
            .iter()
            .find(|(p, _)| p == &[format!("tokentap.{name}")])
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    };
    assert_eq!(field("tenant").as_deref(), Some("acme"));
    assert_eq!(field("ttft_ms").as_deref(), Some("150"));
    assert_eq!(field("completion_tokens").as_deref(), Some("2"));
    let keys: std::collections::BTreeSet<_> = writes.iter().map(|(p, _)| p.clone()).collect();
    assert_eq!(keys.len(), writes.len(), "a key written twice: {writes:?}");
    gw.assert_healthy();
}
