//! Plugin configuration: bad documents are refused with the field named.

use crate::common::{chat_body, started_vm, Gateway, Must, Req, Resp, CHAT};
use tokentap_testhost::{HostCall, LogLevel};

#[test]
fn bad_configuration_is_refused_with_a_log_line_naming_the_field() {
    let cases = [
        (
            r#"{"tracing":{"cluster":"otel","sample_ratio":2}}"#,
            "`tracing.sample_ratio`",
        ),
        (r#"{"limits":{"max_routes":0}}"#, "`limits.max_routes`"),
        (
            r#"{"tenant":{"header":"x-tenant-id","max_values":"many"}}"#,
            "`tenant.max_values`",
        ),
        (r#"{"filter_state":"everything"}"#, "`filter_state`"),
        (r#"{"llm_paths":["v1/x"]}"#, "`llm_paths[0]`"),
        (r#"{"unknown_knob":1}"#, "unknown_knob"),
        ("{", "not valid JSON"),
    ];
    for (config, field) in cases {
        let mut host = started_vm();
        assert!(
            !host.configure(config.as_bytes()).must(),
            "{config} was accepted"
        );
        let refusal = host
            .state()
            .logs
            .iter()
            .find(|l| l.message.contains("refusing configuration"))
            .unwrap_or_else(|| {
                panic!(
                    "no refusal logged for {config}:\n{}",
                    host.state().captured_log()
                )
            });
        assert!(
            refusal.message.contains(field),
            "{config}: {refusal:?} does not name {field}"
        );
        assert!(refusal.level >= LogLevel::Error, "{refusal:?}");
    }
}

#[test]
fn shipped_and_empty_configurations_are_accepted() {
    let gw = Gateway::shipped();
    assert!(gw
        .host
        .state()
        .logs
        .iter()
        .any(|l| l.message.contains("configured (")));
    gw.assert_healthy();
    let mut host = started_vm();
    assert!(
        host.configure(b"").must(),
        "{}",
        host.state().captured_log()
    );
}

#[test]
fn a_vm_whose_configuration_was_refused_passes_traffic_and_records_nothing() {
    let mut host = started_vm();
    assert!(!host.configure(br#"{"limits":{"max_routes":0}}"#).must());
    let before = host.calls().len();
    let mut gw = Gateway { host };
    let usage = serde_json::json!({"usage": {"prompt_tokens": 3, "completion_tokens": 1}});
    let out = gw.exchange(
        &Req::post(CHAT, &chat_body(false)),
        &Resp::json(200, &usage),
    );
    assert!(out
        .request_actions
        .iter()
        .all(|a| *a == tokentap_testhost::Action::Continue));
    let writes: Vec<&HostCall> = gw.host.calls()[before..]
        .iter()
        .map(|r| &r.call)
        .filter(|c| c.is_write())
        .collect();
    assert!(writes.is_empty(), "{writes:?}");
    assert!(gw.settle().all().is_empty());
}
