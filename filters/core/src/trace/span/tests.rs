use super::super::context::SpanContext;
use super::super::ids::XoshiroIdGenerator;
use super::super::sampler::Sampler;
use super::*;
use proptest::prelude::*;

fn started(parent: Option<&str>) -> SpanStart {
    let parent = parent.map(|h| SpanContext::from_headers(h, Some("v=1")).unwrap());
    Sampler::always().start_span(parent.as_ref(), &mut XoshiroIdGenerator::from_seed(5))
}

#[test]
fn record_takes_identity_from_the_sampler() {
    let start = started(Some(
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    ));
    let span = SpanRecord::new(&start, "chat mistral-7b", SpanKind::Server, 1_000);
    assert_eq!(span.trace_id, start.context.trace_id);
    assert_eq!(span.span_id, start.context.span_id);
    assert_eq!(
        span.parent_span_id.map(|s| s.to_string()).as_deref(),
        Some("00f067aa0ba902b7")
    );
    assert!(span.parent_is_remote);
    assert!(span.flags.is_sampled());
    assert_eq!(span.trace_state, "v=1");
    assert_eq!((span.start_unix_nanos, span.end_unix_nanos), (1_000, 1_000));

    let root = SpanRecord::new(&started(None), "chat", SpanKind::Server, 0);
    assert_eq!(root.parent_span_id, None);
    assert!(!root.parent_is_remote);
}

#[test]
fn attributes_replace_by_key_and_are_capped() {
    let mut span = SpanRecord::new(&started(None), "x", SpanKind::Server, 0);
    span.set_attribute(semconv::LLM_MODEL, "a");
    span.set_attribute(semconv::LLM_MODEL, "b");
    assert_eq!(span.attributes.len(), 1);
    assert_eq!(
        span.attribute(semconv::LLM_MODEL)
            .and_then(AttrValue::as_str),
        Some("b")
    );
    for i in 0..(MAX_ATTRIBUTES + 5) {
        span.set_attribute(format!("k{i}"), i as i64);
    }
    assert_eq!(span.attributes.len(), MAX_ATTRIBUTES);
    assert_eq!(span.dropped_attributes_count, 6);
    // Replacing an existing key still works at the cap.
    span.set_attribute(semconv::LLM_MODEL, "c");
    assert_eq!(
        span.attribute(semconv::LLM_MODEL)
            .and_then(AttrValue::as_str),
        Some("c")
    );
    assert_eq!(span.dropped_attributes_count, 6);
}

#[test]
fn values_are_truncated_on_char_boundaries() {
    let mut span = SpanRecord::new(&started(None), "x", SpanKind::Server, 0);
    let long = "é".repeat(MAX_VALUE_BYTES); // 2 bytes each
    span.set_attribute("k.s", long.as_str());
    let kept = span.attribute("k.s").and_then(AttrValue::as_str).unwrap();
    assert_eq!(kept.len(), MAX_VALUE_BYTES);
    assert!(kept.chars().all(|c| c == 'é'));
    let odd = format!("a{long}");
    span.set_attribute("k.s", odd);
    assert_eq!(
        span.attribute("k.s")
            .and_then(AttrValue::as_str)
            .unwrap()
            .len(),
        MAX_VALUE_BYTES - 1
    );

    let many: Vec<String> = (0..100).map(|i| i.to_string()).collect();
    span.set_attribute(semconv::RAG_SOURCES, many);
    match span.attribute(semconv::RAG_SOURCES) {
        Some(AttrValue::StrArray(items)) => assert_eq!(items.len(), MAX_ARRAY_ITEMS),
        other => panic!("unexpected {other:?}"),
    }
    span.set_error("timeout", "x".repeat(5000));
    assert!(matches!(&span.status, SpanStatus::Error(m) if m.len() == MAX_VALUE_BYTES));
    assert_eq!(
        span.attribute(semconv::ERROR_TYPE)
            .and_then(AttrValue::as_str),
        Some("timeout")
    );
}

#[test]
fn events_are_capped_and_end_never_precedes_start() {
    let mut span = SpanRecord::new(&started(None), "x", SpanKind::Server, 500);
    for i in 0..(MAX_EVENTS as u64 + 3) {
        span.add_event(SpanEvent::new(semconv::EVENT_FIRST_TOKEN, i).with_attribute("i", i));
    }
    assert_eq!(span.events.len(), MAX_EVENTS);
    assert_eq!(span.dropped_events_count, 3);
    span.end(100);
    assert_eq!(span.end_unix_nanos, 500);
    span.end(900);
    assert_eq!(span.end_unix_nanos, 900);
}

#[test]
fn u64_values_saturate() {
    assert_eq!(AttrValue::from(u64::MAX), AttrValue::Int(i64::MAX));
    assert_eq!(AttrValue::from(7u64), AttrValue::Int(7));
}

#[test]
fn resource_defaults_and_overrides() {
    let resource = ResourceBuilder::new().build();
    assert_eq!(
        resource
            .attribute(semconv::SERVICE_NAME)
            .and_then(AttrValue::as_str),
        Some(semconv::DEFAULT_SERVICE_NAME)
    );
    assert_eq!(
        resource
            .attribute(semconv::TOKENTAP_PLUGIN_VERSION)
            .and_then(AttrValue::as_str),
        Some(env!("CARGO_PKG_VERSION"))
    );

    let resource = ResourceBuilder::new()
        .pairs([
            ("POD_NAME", "gw-7d9f"),
            ("POD_NAMESPACE", " llm "),
            ("NODE_NAME", "node-a"),
            ("k8s.cluster.name", "prod"),
            ("HOME", "/root"),
            ("PATH", "/usr/bin"),
            ("Not.An.Attr", "x"),
            ("OTEL_SERVICE_NAME", ""),
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "deployment.environment.name=prod%2Ceu, team=x",
            ),
        ])
        .service_version("1.2.3")
        .build();
    let get = |k: &str| resource.attribute(k).and_then(AttrValue::as_str);
    assert_eq!(get(semconv::K8S_POD_NAME), Some("gw-7d9f"));
    assert_eq!(get(semconv::K8S_NAMESPACE_NAME), Some("llm"));
    assert_eq!(get(semconv::K8S_NODE_NAME), Some("node-a"));
    assert_eq!(get(semconv::K8S_CLUSTER_NAME), Some("prod"));
    assert_eq!(get(semconv::SERVICE_VERSION), Some("1.2.3"));
    // An empty OTEL_SERVICE_NAME does not blank the default.
    assert_eq!(
        get(semconv::SERVICE_NAME),
        Some(semconv::DEFAULT_SERVICE_NAME)
    );
    assert_eq!(get("deployment.environment.name"), Some("prod,eu"));
    // Unrelated variables and non-attribute names are not exported.
    assert_eq!(get("team"), None);
    assert!(resource
        .attributes
        .iter()
        .all(|a| a.key != "HOME" && a.key != "PATH"));
    assert_eq!(get("Not.An.Attr"), None);

    let renamed = ResourceBuilder::new()
        .pairs([("OTEL_SERVICE_NAME", "edge")])
        .build();
    assert_eq!(
        renamed
            .attribute(semconv::SERVICE_NAME)
            .and_then(AttrValue::as_str),
        Some("edge")
    );
    assert_eq!(renamed.attributes.len(), 2);
}

#[test]
fn resource_is_bounded() {
    let names: Vec<String> = (0..100).map(|i| format!("x.k{i}")).collect();
    let long = "v".repeat(1000);
    let resource = ResourceBuilder::new()
        .pairs(names.iter().map(|k| (k.as_str(), long.as_str())))
        .build();
    assert_eq!(resource.attributes.len(), MAX_RESOURCE_ATTRIBUTES);
    assert!(resource.attributes.iter().all(|a| a
        .value
        .as_str()
        .is_some_and(|v| v.len() <= MAX_RESOURCE_VALUE_BYTES)));
}

#[test]
fn otel_resource_attributes_parse() {
    assert_eq!(
        parse_otel_resource_attributes(" a=1 ,b = x%20y,, c=%e2%82%ac ").unwrap(),
        vec![
            ("a".to_owned(), "1".to_owned()),
            ("b".to_owned(), "x y".to_owned()),
            ("c".to_owned(), "€".to_owned())
        ]
    );
    assert_eq!(
        parse_otel_resource_attributes("a"),
        Err(ResourceAttributesError::MissingEquals)
    );
    assert_eq!(
        parse_otel_resource_attributes("=1"),
        Err(ResourceAttributesError::EmptyKey)
    );
    assert_eq!(
        parse_otel_resource_attributes("a=%4"),
        Err(ResourceAttributesError::BadPercentEncoding)
    );
    assert_eq!(
        parse_otel_resource_attributes("a=%zz"),
        Err(ResourceAttributesError::BadPercentEncoding)
    );
    assert_eq!(
        parse_otel_resource_attributes("a=%ff"),
        Err(ResourceAttributesError::BadPercentEncoding)
    );
    assert_eq!(parse_otel_resource_attributes("").unwrap(), vec![]);
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

proptest! {
    #[test]
    fn otel_resource_attributes_never_panic(input in ".{0,120}") {
        let _ = parse_otel_resource_attributes(&input);
    }

    #[test]
    fn otel_resource_attributes_round_trip(
        pairs in proptest::collection::vec(("[a-z][a-z0-9._]{0,12}", ".{0,20}"), 0..6),
    ) {
        let encoded = pairs
            .iter()
            .map(|(k, v)| format!("{k}={}", percent_encode(v)))
            .collect::<Vec<_>>()
            .join(",");
        // Encoded values carry no raw whitespace or separators, so they
        // come back exactly.
        prop_assert_eq!(parse_otel_resource_attributes(&encoded).unwrap(), pairs);
    }

    #[test]
    fn truncation_keeps_valid_utf8_prefix(s in ".{0,60}", max in 0usize..80) {
        let cut = truncate_utf8(s.clone(), max);
        prop_assert!(cut.len() <= max);
        prop_assert!(s.starts_with(&cut));
        prop_assert!(s.len() <= max || cut.len() + 4 > max);
    }
}
