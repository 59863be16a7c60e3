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
        assert!(d.name.starts_with("llm_gateway_") || d.name.starts_with("llm_rag_"));
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
