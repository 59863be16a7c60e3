use super::*;

fn err(json: &str) -> String {
    Config::parse(json.as_bytes()).unwrap_err().to_string()
}

#[test]
fn empty_configuration_records_the_openai_paths() {
    let c = Config::parse(b"").unwrap();
    assert_eq!(
        c.operation_for_path(b"/v1/chat/completions"),
        Some(Operation::Chat)
    );
    assert_eq!(
        c.operation_for_path(b"/v1/completions?x=1"),
        Some(Operation::TextCompletion)
    );
    assert_eq!(
        c.operation_for_path(b"/team-a/v1/embeddings"),
        Some(Operation::Embeddings)
    );
    assert_eq!(c.operation_for_path(b"/v1/models"), None);
    assert_eq!(c.tenant_source, TenantSource::None);
    assert!(c.tracing.is_none());
}

#[test]
fn errors_name_the_field() {
    assert!(err(r#"{"limits":{"max_routes":"many"}}"#).contains("`limits.max_routes`"));
    assert!(err(r#"{"limits":{"max_routes":0}}"#).contains("`limits.max_routes`"));
    assert!(err(r#"{"tenant":{"header":"bad header"}}"#).contains("`tenant.header`"));
    assert!(
        err(r#"{"tenant":{"header":"x","metadata":{"namespace":"n","path":["a"]}}}"#)
            .contains("`tenant`")
    );
    assert!(err(r#"{"tracing":{"cluster":"otel","sample_ratio":1.5}}"#)
        .contains("`tracing.sample_ratio`"));
    assert!(err(r#"{"routes":{"chat":{"team":"a b"}}}"#).contains("`routes.chat.team[0]`"));
    assert!(err(r#"{"llm_paths":["v1/x"]}"#).contains("`llm_paths[0]`"));
    assert!(err(r#"{"llm_paths":["/v1/chat#x"]}"#).contains("`llm_paths[0]`"));
    assert!(err(r#"{"unknown_knob":1}"#).contains("unknown_knob"));
    assert!(err(r#"{"routes":{"chat":{"tem":"a"}}}"#).contains("routes.chat"));
    assert!(err("{").contains("not valid JSON"));
}

#[test]
fn workload_precedence_is_route_then_backend_then_defaults() {
    let c = Config::parse(
        br#"{
          "models": ["mistral-7b"],
          "routes": {"chat": {"route_class": "interactive"}},
          "backends": {"vllm_canary": {"team": "platform-ai", "model": "mistral-7b-canary"}},
          "defaults": {"team": "shared", "route_class": "batch", "model": "mistral-7b"}
        }"#,
    )
    .unwrap();
    let w = c.workload_ref(Some("chat"), Some("vllm_canary"));
    assert_eq!(w.route_class, Some("interactive"));
    assert_eq!(w.team, Some("platform-ai"));
    assert_eq!(w.model, Some("mistral-7b-canary"));
    let w = c.workload_ref(Some("other"), None);
    assert_eq!(w.route_class, Some("batch"));
    assert_eq!(w.team, Some("shared"));
    // Configured default models join the allowed model set.
    match &c.admissions[&Dimension::Model] {
        Admission::Static(v) => assert!(v.contains(&"mistral-7b-canary".to_string())),
        other => panic!("{other:?}"),
    }
}

#[test]
fn metadata_tenant_source_builds_the_property_path() {
    let c = Config::parse(
        br#"{"tenant":{"metadata":{"namespace":"envoy.filters.http.jwt_authn","path":["jwt_payload","tenant"]}}}"#,
    )
    .unwrap();
    assert_eq!(
        c.tenant_source,
        TenantSource::Metadata(vec![
            "metadata".into(),
            "filter_metadata".into(),
            "envoy.filters.http.jwt_authn".into(),
            "jwt_payload".into(),
            "tenant".into()
        ])
    );
}

#[test]
fn route_and_backend_aliases_replace_generated_names() {
    let c = Config::parse(
        br#"{"routes":{"httproute/llm/chat/rule/0/match/0/llm_example_com":{"label":"chat","route_class":"interactive"}},
             "backends":{"outbound|8000||vllm-canary.llm.svc.cluster.local":{"label":"vllm-canary"}}}"#,
    )
    .unwrap();
    assert_eq!(
        c.route_label(b"httproute/llm/chat/rule/0/match/0/llm_example_com"),
        b"chat"
    );
    assert_eq!(c.route_label(b"other"), b"other");
    assert_eq!(
        c.backend_label(b"outbound|8000||vllm-canary.llm.svc.cluster.local"),
        b"vllm-canary"
    );
    assert!(err(r#"{"routes":{"r":{"label":"a b"}}}"#).contains("`routes.r.label[0]`"));
}

#[test]
fn longest_path_wins() {
    let c = Config::parse(br#"{"llm_paths":[{"path":"/rag/chat","operation":"chat"}]}"#).unwrap();
    assert_eq!(c.operation_for_path(b"/rag/chat"), Some(Operation::Chat));
    assert_eq!(
        c.operation_for_path(b"/v1/chat/completions"),
        Some(Operation::Chat)
    );
}
