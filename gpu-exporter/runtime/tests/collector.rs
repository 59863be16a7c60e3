//! The collector's own exposition: parsed back with an independent parser
//! (`prometheus-parse`), checked for schema, labels and counter behaviour.

// Test helpers outside #[test] fns fail loudly on purpose.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;

use prometheus_client::registry::Registry;
use proptest::prelude::*;
use tokentap_runtime_metrics::{
    RuntimeArgs, RuntimeCollector, RuntimeCollectorHandle, ScrapeError,
};
use tokentap_workload::{PodInfo, WorkloadLabelPolicy};

fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

fn pod(name: &str, uid: &str, engine_type: Option<&str>) -> PodInfo {
    let mut labels: BTreeMap<String, String> = [
        ("app.kubernetes.io/part-of", "llm-platform"),
        ("app.kubernetes.io/name", "vllm-openai"),
        ("workload.k8sllm.io/model", "mistral-7b"),
        ("workload.k8sllm.io/route-class", "interactive"),
        ("workload.k8sllm.io/team", "platform-ai"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    if let Some(e) = engine_type {
        labels.insert("inference.networking.k8s.io/engine-type".into(), e.into());
    }
    PodInfo {
        namespace: "llm".into(),
        name: name.into(),
        uid: uid.into(),
        ip: Some("127.0.0.1".into()),
        phase: "Running".into(),
        ready: true,
        labels,
        ..PodInfo::default()
    }
}

fn encode(collector: &std::sync::Arc<RuntimeCollector>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(RuntimeCollectorHandle(collector.clone())));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
    out
}

fn parse(text: &str) -> prometheus_parse::Scrape {
    let lines = text.lines().map(|l| Ok(l.to_string()));
    prometheus_parse::Scrape::parse(lines).unwrap()
}

fn value(s: &prometheus_parse::Sample) -> f64 {
    match s.value {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => v,
        _ => f64::NAN,
    }
}

fn find<'a>(
    scrape: &'a prometheus_parse::Scrape,
    metric: &str,
    pod: &str,
) -> Vec<&'a prometheus_parse::Sample> {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric && s.labels.get("pod") == Some(pod))
        .collect()
}

const SCHEMA: &[&str] = &[
    "llm_runtime_targets",
    "llm_runtime_up",
    "llm_runtime_scrape_duration_seconds",
    "llm_runtime_scrape_errors_total",
    "llm_runtime_scrape_malformed_lines_total",
    "llm_runtime_restarts_total",
    "llm_runtime_requests_running",
    "llm_runtime_requests_waiting",
    "llm_runtime_batch_size",
    "llm_runtime_kv_cache_usage_ratio",
    "llm_runtime_process_start_time_seconds",
    "llm_runtime_prompt_tokens_total",
    "llm_runtime_generation_tokens_total",
    "llm_runtime_preemptions_total",
    "llm_runtime_prefix_cache_hit_tokens_total",
    "llm_runtime_prefix_cache_query_tokens_total",
    "llm_runtime_requests_total",
    "llm_runtime_time_to_first_token_seconds",
    "llm_runtime_inter_token_latency_seconds",
    "llm_runtime_queue_time_seconds",
    "llm_runtime_e2e_request_latency_seconds",
];

const POD_LABELS: &[&str] = &[
    "namespace",
    "pod",
    "runtime",
    "model",
    "route_class",
    "team",
];

fn check_schema(text: &str) {
    let scrape = parse(text);
    for s in &scrape.samples {
        let base = ["_sum", "_count", "_bucket"]
            .iter()
            .find_map(|suffix| s.metric.strip_suffix(suffix))
            .filter(|b| b.ends_with("_seconds") && SCHEMA.contains(b))
            .unwrap_or(&s.metric);
        assert!(SCHEMA.contains(&base), "outside schema: {}", s.metric);
        for (k, _) in s.labels.iter() {
            let allowed =
                POD_LABELS.contains(&k.as_str()) || k == "reason" || k == "outcome" || k == "le";
            assert!(allowed, "unexpected label {k} on {}", s.metric);
        }
        if s.metric != "llm_runtime_targets" {
            for k in POD_LABELS {
                assert!(s.labels.get(k).is_some(), "{} lacks {k}", s.metric);
            }
        }
    }
}

#[test]
fn every_runtime_fixture_encodes_with_workload_labels() {
    let c = RuntimeCollector::new(&RuntimeArgs::default(), WorkloadLabelPolicy::default());
    let fixtures = [
        ("vllm.prom", "vllm"),
        ("sglang.prom", "sglang"),
        ("tgi.prom", "tgi"),
        ("trtllm-serve.prom", "trtllm-serve"),
        ("triton-tensorrt-llm.prom", "triton-tensorrt-llm"),
    ];
    let pods: Vec<PodInfo> = fixtures
        .iter()
        .enumerate()
        .map(|(i, (_, rt))| pod(&format!("{rt}-0"), &format!("uid-{i}"), None))
        .collect();
    c.update_pods(&pods);
    assert_eq!(c.target_count(), 5);
    for (i, (file, _)) in fixtures.iter().enumerate() {
        c.ingest(&format!("uid-{i}"), &fixture(file));
    }
    let text = encode(&c);
    check_schema(&text);
    let scrape = parse(&text);
    for (_, rt) in fixtures {
        let pod = format!("{rt}-0");
        let up = find(&scrape, "llm_runtime_up", &pod);
        assert_eq!(up.len(), 1);
        assert_eq!(value(up[0]), 1.0);
        assert_eq!(up[0].labels.get("runtime"), Some(rt));
        assert_eq!(up[0].labels.get("model"), Some("mistral-7b"));
        assert_eq!(up[0].labels.get("route_class"), Some("interactive"));
        assert_eq!(up[0].labels.get("team"), Some("platform-ai"));
        assert_eq!(find(&scrape, "llm_runtime_requests_waiting", &pod).len(), 1);
    }
    let gen = find(&scrape, "llm_runtime_generation_tokens_total", "vllm-0");
    assert_eq!(value(gen[0]), 4321.0);
    let stop: Vec<_> = find(&scrape, "llm_runtime_requests_total", "vllm-0")
        .into_iter()
        .filter(|s| s.labels.get("outcome") == Some("stop"))
        .collect();
    assert_eq!(value(stop[0]), 35.0);
    // TGI has no TTFT series at all rather than an empty one.
    let ttft_lines = |pod: &str| {
        text.lines()
            .filter(|l| {
                l.starts_with("llm_runtime_time_to_first_token_seconds_bucket{")
                    && l.contains(&format!("pod=\"{pod}\""))
            })
            .count()
    };
    assert_eq!(ttft_lines("vllm-0"), 23, "vLLM's own 22 bounds + Inf");
    assert_eq!(ttft_lines("sglang-0"), 19, "SGLang's own 18 bounds + Inf");
    assert_eq!(ttft_lines("tgi-0"), 0);
}

#[test]
fn down_runtime_keeps_only_health_series_and_counters_resume_monotonic() {
    let c = RuntimeCollector::new(&RuntimeArgs::default(), WorkloadLabelPolicy::default());
    c.update_pods(&[pod("sim-0", "u", Some("vllm"))]);
    let body = |gen: u32, start: &str| {
        format!(
            "process_start_time_seconds {start}\nvllm:num_requests_waiting{{engine=\"0\"}} 2\nvllm:generation_tokens_total{{engine=\"0\"}} {gen}\n"
        )
    };
    c.ingest("u", &body(100, "1000"));
    c.ingest_failure("u", ScrapeError::Connect);
    let down = parse(&encode(&c));
    assert_eq!(value(find(&down, "llm_runtime_up", "sim-0")[0]), 0.0);
    assert!(find(&down, "llm_runtime_requests_waiting", "sim-0").is_empty());
    assert!(find(&down, "llm_runtime_generation_tokens_total", "sim-0").is_empty());
    let connect: Vec<_> = find(&down, "llm_runtime_scrape_errors_total", "sim-0")
        .into_iter()
        .filter(|s| s.labels.get("reason") == Some("connect"))
        .collect();
    assert_eq!(value(connect[0]), 1.0);
    // Back with counters from zero: the exported counter continues upward.
    c.ingest("u", &body(30, "2000"));
    let up = parse(&encode(&c));
    assert_eq!(
        value(find(&up, "llm_runtime_generation_tokens_total", "sim-0")[0]),
        130.0
    );
    assert_eq!(
        value(find(&up, "llm_runtime_restarts_total", "sim-0")[0]),
        1.0
    );
    assert_eq!(value(find(&up, "llm_runtime_up", "sim-0")[0]), 1.0);
}

#[test]
fn pods_that_leave_are_forgotten() {
    let c = RuntimeCollector::new(&RuntimeArgs::default(), WorkloadLabelPolicy::default());
    c.update_pods(&[pod("a", "ua", None), pod("b", "ub", None)]);
    c.ingest("ua", &fixture("vllm.prom"));
    c.ingest("ub", &fixture("vllm.prom"));
    c.update_pods(&[pod("b", "ub", None)]);
    let s = parse(&encode(&c));
    assert!(find(&s, "llm_runtime_up", "a").is_empty());
    assert_eq!(find(&s, "llm_runtime_up", "b").len(), 1);
}

#[test]
fn disabled_collector_publishes_no_runtime_series_at_all() {
    let pods = [pod("a", "ua", Some("vllm")), pod("b", "ub", None)];
    let enabled = RuntimeCollector::new(&RuntimeArgs::default(), WorkloadLabelPolicy::default());
    enabled.update_pods(&pods);
    enabled.ingest("ua", &fixture("vllm.prom"));
    assert!(encode(&enabled).contains("llm_runtime_up{"));

    let args = RuntimeArgs {
        runtime_disable: true,
        ..RuntimeArgs::default()
    };
    let disabled = RuntimeCollector::new(&args, WorkloadLabelPolicy::default());
    disabled.update_pods(&pods);
    disabled.update_pod(&pod("c", "uc", None));
    disabled.ingest("ua", &fixture("vllm.prom"));
    let text = encode(&disabled);
    let runtime_lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("llm_runtime_"))
        .collect();
    assert!(runtime_lines.is_empty(), "{runtime_lines:?}");
    assert_eq!(disabled.target_count(), 0);
}

#[test]
fn a_target_not_scraped_yet_is_counted_but_has_no_series() {
    let c = RuntimeCollector::new(&RuntimeArgs::default(), WorkloadLabelPolicy::default());
    c.update_pods(&[pod("new", "un", None)]);
    let s = parse(&encode(&c));
    assert!(
        find(&s, "llm_runtime_up", "new").is_empty(),
        "new is not down"
    );
    let targets = s
        .samples
        .iter()
        .find(|x| x.metric == "llm_runtime_targets")
        .unwrap();
    assert_eq!(value(targets), 1.0);
    c.ingest_failure("un", ScrapeError::Connect);
    let s = parse(&encode(&c));
    assert_eq!(value(find(&s, "llm_runtime_up", "new")[0]), 0.0);
}

#[test]
fn one_pod_change_touches_only_its_target() {
    let c = RuntimeCollector::new(&RuntimeArgs::default(), WorkloadLabelPolicy::default());
    c.update_pods(&[pod("a", "ua", None), pod("b", "ub", None)]);
    c.ingest("ua", &fixture("vllm.prom"));
    c.update_pod(&pod("c", "uc", Some("sglang")));
    assert_eq!(c.target_count(), 3);
    // A pod that stops matching the selector loses its target ...
    let mut b = pod("b", "ub", None);
    b.labels.remove("app.kubernetes.io/part-of");
    c.update_pod(&b);
    assert_eq!(c.target_count(), 2);
    // ... one that leaves the node too; the others keep their state.
    c.remove_pod(&pod("c", "uc", None));
    let s = parse(&encode(&c));
    assert_eq!(value(find(&s, "llm_runtime_up", "a")[0]), 1.0);
    assert!(find(&s, "llm_runtime_up", "b").is_empty());
    assert!(find(&s, "llm_runtime_up", "c").is_empty());
}

/// The whole runtime exposition for every fixture, a failed target and a
/// restart, compared byte for byte with a recording; encoder refactors must
/// leave it unchanged (re-record a deliberate change with
/// `TOKENTAP_UPDATE_GOLDEN=1`).
#[test]
fn exposition_is_byte_identical_to_the_recorded_golden() {
    let c = RuntimeCollector::new(&RuntimeArgs::default(), WorkloadLabelPolicy::default());
    let fixtures = [
        "vllm.prom",
        "sglang.prom",
        "tgi.prom",
        "trtllm-serve.prom",
        "triton-tensorrt-llm.prom",
    ];
    let mut pods: Vec<PodInfo> = fixtures
        .iter()
        .enumerate()
        .map(|(i, f)| pod(&format!("p{i}"), &format!("u{i}"), None).with_name_of(f))
        .collect();
    pods.push(pod("down", "u-down", Some("vllm")));
    c.update_pods(&pods);
    for (i, file) in fixtures.iter().enumerate() {
        c.ingest(&format!("u{i}"), &fixture(file));
        c.ingest(&format!("u{i}"), &fixture(file));
    }
    c.ingest_failure("u-down", ScrapeError::Timeout);
    let text = encode(&c);
    let path = format!("{}/tests/golden/exposition.txt", env!("CARGO_MANIFEST_DIR"));
    if std::env::var("TOKENTAP_UPDATE_GOLDEN").as_deref() == Ok("1") {
        std::fs::create_dir_all(format!("{}/tests/golden", env!("CARGO_MANIFEST_DIR"))).unwrap();
        std::fs::write(&path, &text).unwrap();
    }
    assert!(
        text == std::fs::read_to_string(&path).unwrap(),
        "exposition differs from {path}"
    );
}

/// Names a test pod after its fixture, for readable golden files.
trait WithNameOf {
    fn with_name_of(self, fixture: &str) -> Self;
}

impl WithNameOf for PodInfo {
    fn with_name_of(mut self, fixture: &str) -> Self {
        self.name = fixture.trim_end_matches(".prom").to_string();
        self
    }
}

fn arb_line() -> impl Strategy<Value = String> {
    let fixture_lines: Vec<String> = [
        "vllm.prom",
        "sglang.prom",
        "tgi.prom",
        "trtllm-serve.prom",
        "triton-tensorrt-llm.prom",
    ]
    .iter()
    .flat_map(|f| fixture(f).lines().map(str::to_string).collect::<Vec<_>>())
    .collect();
    prop_oneof![
        proptest::sample::select(fixture_lines.clone()),
        (
            proptest::sample::select(fixture_lines),
            0usize..200,
            any::<char>()
        )
            .prop_map(|(l, at, c)| {
                let mut chars: Vec<char> = l.chars().collect();
                let at = at.min(chars.len());
                chars.insert(at, c);
                chars.into_iter().collect()
            }),
        "[a-z_:]{1,12}(\\{[a-z_]{1,5}=\"[^\"]{0,8}\"\\})? [-+0-9.eInfa]{1,8}",
        ".{0,80}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_exposition_never_panics_or_leaves_the_schema(lines in proptest::collection::vec(arb_line(), 0..60)) {
        let text = lines.join("\n");
        let _ = tokentap_runtime_metrics::normalize(&text, None);
        let _ = tokentap_runtime_metrics::normalize(&text, Some(tokentap_runtime_metrics::Runtime::TritonTrtllm));
        let c = RuntimeCollector::new(&RuntimeArgs::default(), WorkloadLabelPolicy::default());
        c.update_pods(&[pod("p", "u", None)]);
        c.ingest("u", &text);
        c.ingest("u", &text);
        check_schema(&encode(&c));
    }

    #[test]
    fn arbitrary_bytes_never_panic(text in ".{0,400}") {
        let _ = tokentap_runtime_metrics::parse::parse(&text, &tokentap_runtime_metrics::ParseLimits::default());
    }
}
