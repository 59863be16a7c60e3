//! Every runtime's fixture normalizes to exactly the values its text says.

// Test helpers outside #[test] fns fail loudly on purpose.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use tokentap_runtime_metrics::{
    normalize, CounterKind as C, GaugeKind as G, HistogramKind as H, NormHistogram, Normalized,
    Outcome as O, Runtime,
};

fn fixture(name: &str) -> String {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

fn gauge(n: &Normalized, k: G) -> f64 {
    *n.gauges.get(&k).unwrap_or_else(|| panic!("{k:?} missing"))
}

fn counter(n: &Normalized, k: C) -> f64 {
    *n.counters
        .get(&k)
        .unwrap_or_else(|| panic!("{k:?} missing"))
}

fn hist(n: &Normalized, k: H) -> &NormHistogram {
    n.histograms
        .get(&k)
        .unwrap_or_else(|| panic!("{k:?} missing"))
}

fn bucket(h: &NormHistogram, le: f64) -> f64 {
    h.buckets
        .iter()
        .find(|(b, _)| close(*b, le) || (b.is_infinite() && le.is_infinite()))
        .map(|(_, c)| *c)
        .unwrap_or_else(|| panic!("no bucket {le} in {:?}", h.buckets))
}

fn outcomes(n: &Normalized) -> Vec<(O, f64)> {
    n.outcomes.iter().map(|(k, v)| (*k, *v)).collect()
}

#[test]
fn vllm_sums_engines_and_keeps_native_buckets() {
    let n = normalize(&fixture("vllm.prom"), None).unwrap();
    assert_eq!(n.runtime, Runtime::Vllm);
    assert_eq!(gauge(&n, G::RequestsRunning), 5.0);
    assert_eq!(gauge(&n, G::BatchSize), 5.0);
    assert_eq!(gauge(&n, G::RequestsWaiting), 1.0);
    assert!(
        close(gauge(&n, G::KvCacheUsageRatio), 0.375),
        "mean over engines"
    );
    assert_eq!(counter(&n, C::PromptTokens), 1234.0);
    assert_eq!(counter(&n, C::GenerationTokens), 4321.0);
    assert_eq!(counter(&n, C::Preemptions), 3.0);
    assert_eq!(counter(&n, C::PrefixCacheHitTokens), 512.0);
    assert_eq!(counter(&n, C::PrefixCacheQueryTokens), 1234.0);
    assert_eq!(
        outcomes(&n),
        vec![
            (O::Stop, 35.0),
            (O::Length, 13.0),
            (O::Abort, 2.0),
            (O::Error, 1.0)
        ]
    );
    let ttft = hist(&n, H::TimeToFirstToken);
    assert_eq!(ttft.count, 7.0);
    assert!(close(ttft.sum, 1.79));
    assert_eq!(ttft.buckets.len(), 23, "22 vLLM bounds + Inf");
    assert_eq!(bucket(ttft, 0.04), 1.0);
    assert_eq!(bucket(ttft, 0.06), 3.0);
    assert_eq!(bucket(ttft, 0.1), 5.0);
    assert_eq!(bucket(ttft, 0.5), 6.0);
    assert_eq!(bucket(ttft, 2.5), 7.0);
    assert_eq!(bucket(ttft, f64::INFINITY), 7.0);
    let itl = hist(&n, H::InterTokenLatency);
    assert_eq!((itl.count, bucket(itl, 0.025)), (5.0, 4.0));
    assert!(close(itl.sum, 0.086));
    let q = hist(&n, H::QueueTime);
    assert_eq!((q.count, bucket(q, 0.3)), (5.0, 3.0));
    assert!(close(q.sum, 2.4));
    let e2e = hist(&n, H::E2eLatency);
    assert_eq!(e2e.count, 5.0);
    assert!(close(e2e.sum, 17.9));
    assert_eq!(n.process_start_time_seconds, Some(1_764_284_390.12));
    assert_eq!(n.malformed_lines, 0);
}

#[test]
fn sglang_maps_queue_usage_and_abort_split() {
    let n = normalize(&fixture("sglang.prom"), None).unwrap();
    assert_eq!(n.runtime, Runtime::Sglang);
    assert_eq!(gauge(&n, G::RequestsRunning), 7.0);
    assert_eq!(gauge(&n, G::BatchSize), 7.0);
    assert_eq!(gauge(&n, G::RequestsWaiting), 4.0);
    assert!(close(gauge(&n, G::KvCacheUsageRatio), 0.42));
    assert_eq!(counter(&n, C::PromptTokens), 9000.0);
    assert_eq!(counter(&n, C::GenerationTokens), 15000.0);
    assert_eq!(counter(&n, C::PrefixCacheHitTokens), 3000.0);
    assert_eq!(counter(&n, C::PrefixCacheQueryTokens), 9000.0);
    assert!(!n.counters.contains_key(&C::Preemptions));
    assert_eq!(outcomes(&n), vec![(O::Success, 114.0), (O::Abort, 6.0)]);
    let ttft = hist(&n, H::TimeToFirstToken);
    assert_eq!(
        ttft.buckets.first().map(|b| b.0),
        Some(0.1),
        "SGLang TTFT starts at 0.1 s"
    );
    assert_eq!(
        (
            ttft.count,
            bucket(ttft, 0.2),
            bucket(ttft, 0.6),
            bucket(ttft, 4.0)
        ),
        (4.0, 1.0, 3.0, 4.0)
    );
    assert!(close(ttft.sum, 3.45));
    let itl = hist(&n, H::InterTokenLatency);
    assert_eq!(
        (itl.count, bucket(itl, 0.010), bucket(itl, 0.015)),
        (3.0, 1.0, 3.0)
    );
    let q = hist(&n, H::QueueTime);
    assert_eq!((q.count, bucket(q, 0.0), bucket(q, 0.5)), (3.0, 1.0, 3.0));
    assert!(close(q.sum, 0.35));
    assert!(close(hist(&n, H::E2eLatency).sum, 4.5));
    assert_eq!(n.process_start_time_seconds, Some(1_764_284_300.0));
}

#[test]
fn trtllm_serve_maps_finished_reasons_and_errors() {
    let n = normalize(&fixture("trtllm-serve.prom"), None).unwrap();
    assert_eq!(n.runtime, Runtime::TrtllmServe);
    assert_eq!(gauge(&n, G::RequestsRunning), 6.0);
    assert_eq!(gauge(&n, G::RequestsWaiting), 2.0);
    assert_eq!(gauge(&n, G::BatchSize), 5.0, "scheduled batch, not running");
    assert!(close(gauge(&n, G::KvCacheUsageRatio), 0.61));
    assert_eq!(counter(&n, C::PromptTokens), 7000.0);
    assert_eq!(counter(&n, C::GenerationTokens), 2500.0);
    assert_eq!(
        outcomes(&n),
        vec![
            (O::Stop, 40.0),
            (O::Length, 8.0),
            (O::Abort, 2.0),
            (O::Error, 3.0)
        ]
    );
    let ttft = hist(&n, H::TimeToFirstToken);
    assert_eq!(
        (ttft.count, bucket(ttft, 0.02), bucket(ttft, 0.04)),
        (3.0, 1.0, 3.0)
    );
    assert!(close(ttft.sum, 0.075));
    assert!(close(hist(&n, H::InterTokenLatency).sum, 0.07));
    assert!(close(hist(&n, H::QueueTime).sum, 0.7));
    assert!(close(hist(&n, H::E2eLatency).sum, 3.8));
}

#[test]
fn tgi_has_no_ttft_and_uses_histogram_sums_for_tokens() {
    let n = normalize(&fixture("tgi.prom"), None).unwrap();
    assert_eq!(n.runtime, Runtime::Tgi);
    assert_eq!(gauge(&n, G::RequestsRunning), 12.0);
    assert_eq!(gauge(&n, G::BatchSize), 12.0);
    assert_eq!(gauge(&n, G::RequestsWaiting), 9.0);
    assert!(!n.gauges.contains_key(&G::KvCacheUsageRatio));
    assert_eq!(counter(&n, C::PromptTokens), 1000.0);
    assert_eq!(counter(&n, C::GenerationTokens), 200.0);
    assert_eq!(outcomes(&n), vec![(O::Success, 50.0), (O::Error, 5.0)]);
    assert!(!n.histograms.contains_key(&H::TimeToFirstToken));
    let itl = hist(&n, H::InterTokenLatency);
    assert_eq!(itl.count, 2.0);
    assert!(close(itl.sum, 0.05));
    assert_eq!(itl.buckets.len(), 36, "35 TGI duration buckets + Inf");
    let q = hist(&n, H::QueueTime);
    assert_eq!(q.count, 2.0);
    assert!(close(q.sum, 0.251));
    assert!(close(hist(&n, H::E2eLatency).sum, 4.25));
    assert_eq!(n.process_start_time_seconds, None);
}

#[test]
fn triton_counts_only_the_trtllm_model_and_converts_ms() {
    let n = normalize(&fixture("triton-tensorrt-llm.prom"), None).unwrap();
    assert_eq!(n.runtime, Runtime::TritonTrtllm);
    assert_eq!(gauge(&n, G::RequestsRunning), 6.0);
    assert_eq!(gauge(&n, G::RequestsWaiting), 3.0);
    assert_eq!(gauge(&n, G::BatchSize), 5.0);
    assert!(close(gauge(&n, G::KvCacheUsageRatio), 0.3));
    assert_eq!(counter(&n, C::PromptTokens), 500.0);
    assert_eq!(counter(&n, C::GenerationTokens), 100.0);
    // Ensemble, pre- and post-processing models see the same requests: not summed.
    assert_eq!(outcomes(&n), vec![(O::Success, 90.0), (O::Error, 3.0)]);
    let ttft = hist(&n, H::TimeToFirstToken);
    assert_eq!(
        ttft.buckets,
        vec![
            (0.1, 1.0),
            (0.5, 3.0),
            (2.0, 4.0),
            (5.0, 4.0),
            (f64::INFINITY, 4.0)
        ]
    );
    assert!(close(ttft.sum, 1.15));
    assert!(!n.histograms.contains_key(&H::QueueTime));
}

#[test]
fn hint_wins_over_detection_and_unknown_bodies_are_errors() {
    let text = fixture("vllm.prom");
    let n = normalize(&text, Some(Runtime::Sglang)).unwrap();
    assert_eq!(n.runtime, Runtime::Sglang);
    assert!(n.gauges.is_empty(), "no sglang names in a vLLM body");
    assert!(normalize("node_cpu_seconds_total 1\n", None).is_err());
}

#[test]
fn triton_fraction_falls_back_to_used_over_max() {
    let text = fixture("triton-tensorrt-llm.prom")
        .lines()
        .filter(|l| !l.contains("kv_cache_block_type=\"fraction\""))
        .collect::<Vec<_>>()
        .join("\n");
    let n = normalize(&text, None).unwrap();
    assert!(close(gauge(&n, G::KvCacheUsageRatio), 0.3));
}
