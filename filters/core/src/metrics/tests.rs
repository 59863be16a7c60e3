use super::*;
use crate::config::Config;
use crate::host::MetricKind;
use crate::labels::LocalAdmission;
use crate::request::{RequestObserver, RequestRecord};
use crate::testing::{FakeStats, FakeView, MS};

fn config() -> Config {
    Config::parse(
        br#"{"tenant":{"header":"x-tenant-id","max_values":3},"models":["mistral-7b"],
             "routes":{"chat":{"route_class":"interactive","team":"platform-ai"}},
             "defaults":{"model":"mistral-7b"}}"#,
    )
    .unwrap()
}

fn finished(tenant: &str, status: &str) -> RequestRecord {
    let cfg = config();
    let view = FakeView::default()
        .req(":path", "/v1/chat/completions")
        .req(":method", "POST")
        .req("x-tenant-id", tenant)
        .prop("xds.route_name", b"chat")
        .prop("xds.cluster_name", b"vllm_stable")
        .prop("response.code_details", b"via_upstream")
        .resp(":status", status)
        .resp("content-type", "application/json");
    let mut obs = RequestObserver::start(&cfg, &view, &0u64).unwrap();
    obs.request_body(br#"{"model":"mistral-7b","messages":[]}"#, true);
    obs.response_headers(&cfg, &view, 40 * MS);
    obs.response_body(
        br#"{"model":"mistral-7b","usage":{"prompt_tokens":11,"completion_tokens":5,"total_tokens":16}}"#,
        50 * MS,
    );
    obs.response_end();
    obs.record(&cfg, &view, 55 * MS)
}

/// Records `recs` into a fresh store and flushes it once.
fn publish(cfg: &Config, recs: &[RequestRecord]) -> (MetricStore, FakeStats) {
    let mut labeler = Labeler::new(cfg, Box::new(LocalAdmission::default()));
    let mut store = MetricStore::new(cfg.max_series_per_metric);
    for r in recs {
        let (labels, overflowed) = labeler.labels_of(r);
        for d in overflowed.iter() {
            let v = [LabelValue {
                id: d as u16,
                text: d.label_name(),
            }];
            store.add(&Series::new(Family::LabelOverflow, &v), 1);
        }
        record_request(&mut store, r, &labels, &labeler, 0);
    }
    let mut stats = FakeStats::default();
    store.flush(&mut stats);
    (store, stats)
}

const LABELS: &str = "route=.=chat;.;tenant=.=acme;.;model=.=mistral-7b;.;route_class=.=interactive;.;team=.=platform-ai;.;backend=.=vllm_stable;.;";
const WORKLOAD: &str = "route=.=chat;.;model=.=mistral-7b;.;route_class=.=interactive;.;team=.=platform-ai;.;backend=.=vllm_stable;.;";

#[test]
fn stat_names_carry_every_label_in_istio_encoding() {
    let (_, stats) = publish(&config(), &[finished("acme", "200")]);
    let requests = format!("{LABELS}status=.=200;.;llm_gateway_requests_total");
    assert_eq!(stats.value(&requests), 1);
    let tokens =
        |t: &str| format!("{LABELS}token_type=.={t};.;source=.=usage;.;llm_gateway_tokens_total");
    assert_eq!(stats.value(&tokens("prompt")), 11);
    assert_eq!(stats.value(&tokens("completion")), 5);
    // A non-streamed response has no time to first token.
    assert!(!stats.defined(&format!(
        "{WORKLOAD}le=.=+Inf;.;llm_gateway_time_to_first_token_milliseconds_bucket"
    )));
}

#[test]
fn histograms_publish_cumulative_buckets_and_exact_sums() {
    let cfg = config();
    let recs: Vec<RequestRecord> = (0..3).map(|_| finished("acme", "200")).collect();
    let (_, stats) = publish(&cfg, &recs);
    let name = "llm_gateway_request_duration_milliseconds";
    let bucket = |le: &str| stats.value(&format!("{WORKLOAD}le=.={le};.;{name}_bucket"));
    // Three requests of 55 ms: buckets below 55 are 0, from 100 up all three.
    assert_eq!(bucket("50"), 0);
    assert!(stats.defined(&format!("{WORKLOAD}le=.=5;.;{name}_bucket")));
    assert_eq!(bucket("100"), 3);
    assert_eq!(bucket("300000"), 3);
    assert_eq!(bucket("+Inf"), 3);
    assert_eq!(stats.value(&format!("{WORKLOAD}{name}_sum")), 165);
    assert_eq!(stats.value(&format!("{WORKLOAD}{name}_count")), 3);
    assert_eq!(
        stats.value(&format!(
            "{WORKLOAD}le=.=40;.;llm_gateway_time_to_first_byte_milliseconds_bucket"
        )),
        3,
        "a value equal to a bound falls in that bucket (le)"
    );
}

#[test]
fn a_flush_publishes_only_what_changed_and_values_accumulate() {
    let cfg = config();
    let mut labeler = Labeler::new(&cfg, Box::new(LocalAdmission::default()));
    let mut store = MetricStore::new(1000);
    let mut stats = FakeStats::default();
    let r = finished("acme", "200");
    let (labels, _) = labeler.labels_of(&r);
    record_request(&mut store, &r, &labels, &labeler, 0);
    let first = store.flush(&mut stats);
    assert!(first > 0);
    assert!(!store.has_pending());
    assert_eq!(store.flush(&mut stats), 0, "nothing changed, no host call");
    let series = store.series_count();
    record_request(&mut store, &r, &labels, &labeler, 0);
    record_request(&mut store, &r, &labels, &labeler, 0);
    let calls_before = stats.calls;
    store.flush(&mut stats);
    assert_eq!(store.series_count(), series, "series are reused");
    assert!(
        stats.calls - calls_before < first,
        "no define after the first flush"
    );
    let requests = format!("{LABELS}status=.=200;.;llm_gateway_requests_total");
    assert_eq!(stats.value(&requests), 3);
    let sum = format!("{WORKLOAD}llm_gateway_request_duration_milliseconds_sum");
    assert_eq!(stats.value(&sum), 3 * 55);
}

#[test]
fn errors_are_labelled_by_type() {
    let (_, stats) = publish(&config(), &[finished("acme", "503")]);
    assert_eq!(
        stats.value(&format!(
            "{LABELS}error_type=.=upstream_5xx;.;llm_gateway_errors_total"
        )),
        1
    );
}

#[test]
fn tenant_flood_stays_within_the_cap() {
    let cfg = config();
    let recs: Vec<RequestRecord> = (0..2000)
        .map(|i| finished(&format!("tenant-{i}"), "200"))
        .collect();
    let (_, stats) = publish(&cfg, &recs);
    let tenants: std::collections::BTreeSet<String> = stats
        .names
        .iter()
        .filter(|(_, n)| n.ends_with("llm_gateway_requests_total"))
        .map(|(_, n)| n.split(";.;").nth(1).unwrap_or("").to_string())
        .collect();
    // cap (3) + other
    assert_eq!(tenants.len(), 4, "{tenants:?}");
    assert!(tenants.contains("tenant=.=other"));
    assert_eq!(
        stats.value("label=.=tenant;.;llm_gateway_label_overflow_total"),
        2000 - 3
    );
}

#[test]
fn series_budget_collapses_request_labels_and_counts_it() {
    let cfg = Config::parse(
        br#"{"tenant":{"header":"x-tenant-id","max_values":1000},"limits":{"max_series_per_metric":10}}"#,
    )
    .unwrap();
    let recs: Vec<RequestRecord> = (0..50).map(|i| finished(&format!("t{i}"), "200")).collect();
    let (_, stats) = publish(&cfg, &recs);
    let requests: Vec<&String> = stats
        .names
        .iter()
        .map(|(_, n)| n)
        .filter(|n| n.ends_with("llm_gateway_requests_total"))
        .collect();
    assert_eq!(requests.len(), 11, "10 series plus the collapsed one");
    let total: i64 = requests.iter().map(|n| stats.value(n)).sum();
    assert_eq!(total, 50, "no request is lost");
    assert!(requests.iter().any(|n| n
        .starts_with("route=.=other;.;tenant=.=other;.;model=.=other;.;")
        && n.ends_with("backend=.=other;.;status=.=200;.;llm_gateway_requests_total")));
    // requests_total: 40 collapsed; tokens_total (prompt + completion per
    // tenant): 5 tenants fit in 10 series, 45 x 2 collapsed.
    assert_eq!(stats.value("llm_gateway_series_overflow_total"), 40 + 90);
}

#[test]
fn gauges_set_publish_the_latest_value() {
    let mut store = MetricStore::new(100);
    let mut stats = FakeStats::default();
    let v = [LabelValue { id: 2, text: "x" }; 6];
    let s = Series::new(Family::RagIndexAge, &v);
    store.set(&s, 10);
    store.set(&s, 7);
    store.flush(&mut stats);
    let name = "route=.=x;.;model=.=x;.;route_class=.=x;.;team=.=x;.;backend=.=x;.;collection=.=x;.;llm_rag_index_age_seconds";
    assert_eq!(stats.value(name), 7);
}

#[test]
fn docs_metrics_md_holds_the_current_catalogue() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/metrics.md");
    let doc = std::fs::read_to_string(path).unwrap();
    let table = markdown_table();
    assert!(
        doc.contains(&table),
        "docs/metrics.md is out of date; replace its gateway table with:\n{table}"
    );
}

#[test]
fn every_family_name_follows_prometheus_conventions() {
    for f in Family::ALL {
        let d = f.def();
        assert!(
            d.name.starts_with("llm_gateway_")
                || d.name.starts_with("llm_rag_")
                || d.name.starts_with("gen_ai_"),
            "{}",
            d.name
        );
        if d.kind == MetricKind::Counter {
            assert!(d.name.ends_with("_total"), "{}", d.name);
        } else {
            assert!(!d.name.ends_with("_total"), "{}", d.name);
        }
        assert_eq!(
            d.kind == MetricKind::Histogram,
            !d.buckets.is_empty(),
            "{}",
            d.name
        );
        assert!(d.buckets.windows(2).all(|w| w[0] < w[1]), "{}", d.name);
        assert!(d.labels.len() <= MAX_LABELS, "{}", d.name);
        if d.kind == MetricKind::Histogram {
            assert!(d.labels.len() < MAX_LABELS, "room for `le`: {}", d.name);
        }
    }
}

mod stat_name_codec {
    use crate::labels::sanitize;
    use crate::metrics::{decode_stat_name, encode_stat_name};
    use proptest::prelude::*;

    proptest! {
        /// Whatever a request sends, the sanitised label values make names
        /// that decode to exactly what was encoded.
        #[test]
        fn decoding_inverts_encoding(
            raw in proptest::collection::vec((any::<Vec<u8>>(), "[a-z_]{1,12}"), 0..6),
            metric in "[a-z_]{1,40}",
        ) {
            let labels: Vec<(String, String)> = raw
                .iter()
                .filter_map(|(v, k)| Some((k.clone(), sanitize(v, 64)?)))
                .collect();
            let pairs: Vec<(&str, &str)> =
                labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let mut name = String::new();
            encode_stat_name(&mut name, &metric, &pairs);
            let (m, decoded) = decode_stat_name(&name).unwrap();
            prop_assert_eq!(m, metric.as_str());
            prop_assert_eq!(decoded, pairs);
        }
    }

    #[test]
    fn names_outside_the_encoding_are_refused() {
        assert_eq!(decode_stat_name(""), None);
        assert_eq!(decode_stat_name("route=.=chat;.;"), None, "no metric name");
        assert_eq!(
            decode_stat_name("route=chat;.;x"),
            None,
            "field without =.="
        );
        assert_eq!(decode_stat_name("a=.=b"), None);
        assert_eq!(decode_stat_name("plain"), Some(("plain", vec![])));
    }
}

mod gen_ai_naming {
    use super::*;
    use crate::config::Naming;

    fn config_with(naming: &str) -> Config {
        Config::parse(
            format!(
                r#"{{"tenant":{{"header":"x-tenant-id","max_values":3}},"models":["mistral-7b"],
                    "routes":{{"chat":{{"route_class":"interactive","team":"platform-ai"}}}},
                    "defaults":{{"model":"mistral-7b"}},"metrics":{{"naming":"{naming}"}}}}"#
            )
            .as_bytes(),
        )
        .unwrap()
    }

    const GEN_AI: &str = "gen_ai_operation_name=.=chat;.;gen_ai_provider_name=.=vllm;.;gen_ai_request_model=.=mistral-7b;.;gen_ai_response_model=.=mistral-7b;.;";

    fn families(stats: &FakeStats) -> Vec<String> {
        let mut names: Vec<String> = stats
            .names
            .iter()
            .filter_map(|(_, n)| decode_stat_name(n).map(|(m, _)| m.to_string()))
            .collect();
        names.sort();
        names.dedup();
        names
    }

    #[test]
    fn naming_defaults_to_llm_gateway_and_unknown_namings_are_refused_by_field() {
        assert_eq!(config().metrics.naming, Naming::LlmGateway);
        assert_eq!(config().metrics.provider_name.as_deref(), Some("vllm"));
        let err = Config::parse(br#"{"metrics":{"naming":"otel"}}"#).unwrap_err();
        assert!(err.to_string().contains("`metrics.naming`"), "{err}");
        assert!(err.to_string().contains("gen_ai"), "{err}");
        let err = Config::parse(br#"{"metrics":{"provider_name":"a b"}}"#).unwrap_err();
        assert!(err.to_string().contains("`metrics.provider_name`"), "{err}");
        let err = Config::parse(br#"{"metrics":{"nameing":"both"}}"#).unwrap_err();
        assert!(err.to_string().contains("metrics"), "{err}");
        let cfg = Config::parse(
            br#"{"metrics":{"naming":"gen_ai"},"tracing":{"provider_name":"openai"}}"#,
        )
        .unwrap();
        assert_eq!(cfg.metrics.provider_name.as_deref(), Some("openai"));
    }

    #[test]
    fn each_naming_publishes_its_histograms_and_keeps_the_other_families() {
        let rec = || finished("acme", "200");
        let (_, legacy) = publish(&config_with("llm_gateway"), &[rec()]);
        let (_, gen_ai) = publish(&config_with("gen_ai"), &[rec()]);
        let (_, both) = publish(&config_with("both"), &[rec()]);
        let has = |s: &FakeStats, f: &str| families(s).iter().any(|n| n.starts_with(f));
        assert!(has(&legacy, "llm_gateway_request_duration_milliseconds"));
        assert!(!has(&legacy, "gen_ai_"));
        assert!(has(&gen_ai, "gen_ai_server_request_duration_seconds"));
        assert!(has(&gen_ai, "gen_ai_client_token_usage"));
        assert!(!has(&gen_ai, "llm_gateway_request_duration_milliseconds"));
        assert!(!has(&gen_ai, "llm_gateway_prompt_tokens"));
        // Families the conventions do not name keep their names.
        for s in [&legacy, &gen_ai, &both] {
            assert!(has(s, "llm_gateway_requests_total"));
            assert!(has(s, "llm_gateway_tokens_total"));
            assert!(has(s, "llm_gateway_request_bytes"));
        }
        let mut union = families(&legacy);
        union.extend(families(&gen_ai));
        union.sort();
        union.dedup();
        assert_eq!(families(&both), union);
        for f in Family::ALL {
            assert!(f.published(Naming::Both));
            assert!(f.published(Naming::LlmGateway) || f.published(Naming::GenAi));
        }
    }

    #[test]
    fn gen_ai_series_carry_the_conventions_labels_then_the_workload() {
        let (_, stats) = publish(&config_with("gen_ai"), &[finished("acme", "200")]);
        // 55 ms: in the 0.08 s bucket, not the 0.04 s one; `_sum` in whole
        // seconds (0 so far), `_count` exact.
        let duration = |suffix: &str, le: Option<&str>| {
            let le = le.map(|l| format!("le=.={l};.;")).unwrap_or_default();
            format!("{WORKLOAD}{GEN_AI}error_type=.=;.;{le}gen_ai_server_request_duration_seconds{suffix}")
        };
        assert_eq!(stats.value(&duration("_bucket", Some("0.04"))), 0);
        assert_eq!(stats.value(&duration("_bucket", Some("0.08"))), 1);
        assert_eq!(stats.value(&duration("_bucket", Some("+Inf"))), 1);
        assert!(stats.defined(&duration("_bucket", Some("81.92"))));
        assert_eq!(stats.value(&duration("_count", None)), 1);
        assert_eq!(stats.value(&duration("_sum", None)), 0);
        let tokens = |t: &str, suffix: &str| {
            format!("{WORKLOAD}{GEN_AI}gen_ai_token_type=.={t};.;gen_ai_client_token_usage{suffix}")
        };
        assert_eq!(stats.value(&tokens("input", "_sum")), 11);
        assert_eq!(stats.value(&tokens("output", "_sum")), 5);
        assert_eq!(stats.value(&tokens("output", "_count")), 1);
        let bucket = format!("{WORKLOAD}{GEN_AI}gen_ai_token_type=.=input;.;le=.=16;.;gen_ai_client_token_usage_bucket");
        assert_eq!(stats.value(&bucket), 1);
        // No cached or reasoning tokens were reported.
        assert!(!stats.defined(&tokens("cached_input", "_count")));
        // A failure carries its error type.
        let (_, stats) = publish(&config_with("gen_ai"), &[finished("acme", "503")]);
        let failed = format!(
            "{WORKLOAD}{GEN_AI}error_type=.=upstream_5xx;.;gen_ai_server_request_duration_seconds_count"
        );
        assert_eq!(stats.value(&failed), 1);
    }

    #[test]
    fn bucket_bounds_are_the_conventions() {
        let le = |f: Family| -> Vec<String> { f.def().buckets.iter().map(|b| f.le(*b)).collect() };
        let duration = "0.01 0.02 0.04 0.08 0.16 0.32 0.64 1.28 2.56 5.12 10.24 20.48 40.96 81.92";
        assert_eq!(le(Family::GenAiRequestDuration).join(" "), duration);
        assert_eq!(
            le(Family::GenAiTimeToFirstToken).join(" "),
            "0.001 0.005 0.01 0.02 0.04 0.06 0.08 0.1 0.25 0.5 0.75 1 2.5 5 7.5 10 15 20 30 45 60"
        );
        assert_eq!(
            le(Family::GenAiTimePerOutputToken).join(" "),
            "0.01 0.025 0.05 0.075 0.1 0.15 0.2 0.3 0.4 0.5 0.75 1 2.5"
        );
        assert_eq!(
            le(Family::GenAiTokenUsage).join(" "),
            "1 4 16 64 256 1024 4096 16384 65536 262144 1048576 4194304 16777216 67108864"
        );
        for f in Family::ALL {
            let d = f.def();
            if d.kind == MetricKind::Histogram {
                let seconds = d.name.ends_with("_seconds");
                assert_eq!(seconds, f.scale() == 1_000_000, "{}", d.name);
            }
        }
    }

    #[test]
    fn seconds_sums_publish_whole_seconds_and_carry_the_rest() {
        let cfg = config_with("gen_ai");
        let mut labeler = Labeler::new(&cfg, Box::new(LocalAdmission::default()));
        let mut store = MetricStore::new(cfg.max_series_per_metric);
        let mut stats = FakeStats::default();
        let sum =
            format!("{WORKLOAD}{GEN_AI}error_type=.=;.;gen_ai_server_request_duration_seconds_sum");
        // 55 ms per request: 18 requests = 0.99 s, 19 = 1.045 s.
        for i in 1..=40u64 {
            let rec = finished("acme", "200");
            let (labels, _) = labeler.labels_of(&rec);
            record_request(&mut store, &rec, &labels, &labeler, 0);
            store.flush(&mut stats);
            assert_eq!(stats.value(&sum) as u64, i * 55 / 1000, "after {i}");
        }
    }
}
