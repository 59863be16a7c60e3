use super::super::ids::{IdGenerator, XoshiroIdGenerator};
use super::super::sampler::Sampler;
use super::super::span::SpanKind;
use super::*;
use proptest::prelude::*;
use std::collections::VecDeque;

fn span(ids: &mut XoshiroIdGenerator, payload: usize) -> SpanRecord {
    let start = Sampler::always().start_span(None, ids);
    let mut span = SpanRecord::new(&start, "chat mistral-7b", SpanKind::Server, 1);
    // Values are capped at 1 KiB each, so spread the payload.
    for (i, chunk) in "x".repeat(payload).as_bytes().chunks(1000).enumerate() {
        span.set_attribute(
            format!("payload.{i}"),
            String::from_utf8_lossy(chunk).into_owned(),
        );
    }
    span.end(2);
    span
}

fn small_config() -> BatcherConfig {
    BatcherConfig {
        max_queue_spans: 10,
        max_queue_bytes: 10_000,
        max_batch_spans: 4,
        flush_interval_ms: 100,
        max_in_flight: 2,
        in_flight_expiry_ms: 1_000,
    }
}

fn assert_conserved(stats: &BatcherStats) {
    assert_eq!(
        stats.spans_queued,
        stats.spans_exported
            + stats.spans_rejected
            + stats.spans_dropped_export_failed
            + stats.spans_dropped_dispatch_failed
            + stats.spans_in_flight
            + stats.queue_len,
        "{stats:?}"
    );
}

#[test]
fn defaults_match_the_documented_limits() {
    let config = BatcherConfig::default();
    assert_eq!(
        (
            config.max_queue_spans,
            config.max_queue_bytes,
            config.max_batch_spans
        ),
        (2048, 1024 * 1024, 256)
    );
    assert_eq!((config.flush_interval_ms, config.max_in_flight), (1000, 2));
    assert!(config.validate().is_ok());
}

#[test]
fn config_deserializes_with_defaults_and_rejects_typos() {
    let config: BatcherConfig =
        serde_json::from_str(r#"{"max_batch_spans": 16, "flush_interval_ms": 250}"#).unwrap();
    assert_eq!(config.max_batch_spans, 16);
    assert_eq!(config.flush_interval_ms, 250);
    assert_eq!(config.max_queue_spans, 2048);
    assert!(serde_json::from_str::<BatcherConfig>(r#"{"max_batch_span": 16}"#).is_err());
}

#[test]
fn invalid_configs_are_rejected() {
    let zero = BatcherConfig {
        max_in_flight: 0,
        ..BatcherConfig::default()
    };
    assert_eq!(
        Batcher::new(zero).err(),
        Some(BatcherConfigError::Zero("max_in_flight"))
    );
    let inverted = BatcherConfig {
        max_batch_spans: 10,
        max_queue_spans: 5,
        ..BatcherConfig::default()
    };
    assert!(matches!(
        Batcher::new(inverted).err(),
        Some(BatcherConfigError::BatchLargerThanQueue {
            batch: 10,
            queue: 5
        })
    ));
}

#[test]
fn flushes_on_full_batch_or_interval() {
    let mut ids = XoshiroIdGenerator::from_seed(1);
    let mut batcher = Batcher::new(small_config()).unwrap();
    assert_eq!(batcher.poll_flush(1_000), None); // empty; starts the timer
    batcher.push(span(&mut ids, 10));
    assert_eq!(batcher.poll_flush(1_050), None); // not full, interval not over
    let batch = batcher.poll_flush(1_100).expect("interval flush");
    assert_eq!(batch.spans.len(), 1);

    for _ in 0..5 {
        assert_eq!(batcher.push(span(&mut ids, 10)), PushOutcome::Queued);
    }
    // Full batch goes at once, the remainder waits for the interval.
    let full = batcher.poll_flush(1_101).expect("size flush");
    assert_eq!(full.spans.len(), 4);
    assert_eq!(batcher.poll_flush(1_102), None);
    assert_eq!(batcher.stats().queue_len, 1);
    // Both in-flight slots are taken now: nothing more even when due.
    assert_eq!(batcher.poll_flush(1_500), None);
    assert!(batcher.on_export_result(batch.id, ExportResult::Ok));
    let rest = batcher.poll_flush(1_501).expect("slot freed");
    assert_eq!(rest.spans.len(), 1);
    assert!(batcher.on_export_result(full.id, ExportResult::HttpStatus(200)));
    assert!(batcher.on_export_result(rest.id, ExportResult::HttpStatus(503)));
    // Results for unknown or already-settled ids change nothing.
    assert!(!batcher.on_export_result(rest.id, ExportResult::Ok));
    assert!(!batcher.on_export_result(BatchId(999), ExportResult::Ok));

    let stats = batcher.stats();
    assert_eq!(stats.spans_queued, 6);
    assert_eq!(stats.spans_exported, 5);
    assert_eq!(stats.spans_dropped_export_failed, 1);
    assert_eq!(
        (
            stats.exports_ok,
            stats.exports_http_error,
            stats.exports_failed
        ),
        (2, 1, 0)
    );
    assert_eq!(
        (stats.queue_len, stats.queue_bytes, stats.in_flight),
        (0, 0, 0)
    );
    assert_conserved(&stats);
}

#[test]
fn batch_preserves_order_and_sizes() {
    let mut ids = XoshiroIdGenerator::from_seed(2);
    let mut batcher = Batcher::new(small_config()).unwrap();
    let spans: Vec<SpanRecord> = (0..3).map(|i| span(&mut ids, i * 10)).collect();
    for s in &spans {
        batcher.push(s.clone());
    }
    let expected_bytes: usize = spans.iter().map(span_encoded_len).sum();
    assert_eq!(batcher.stats().queue_bytes, expected_bytes as u64);
    let batch = batcher.take_batch(0).unwrap();
    assert_eq!(batch.spans, spans);
    assert_eq!(batch.spans_encoded_len, expected_bytes);
    assert_eq!(batcher.stats().queue_bytes, 0);
}

#[test]
fn drops_when_count_or_bytes_limit_is_reached() {
    let mut ids = XoshiroIdGenerator::from_seed(3);
    let mut by_count = Batcher::new(small_config()).unwrap();
    for _ in 0..10 {
        assert_eq!(by_count.push(span(&mut ids, 1)), PushOutcome::Queued);
    }
    assert_eq!(
        by_count.push(span(&mut ids, 1)),
        PushOutcome::Dropped(DropReason::QueueFull)
    );

    let mut by_bytes = Batcher::new(small_config()).unwrap();
    let big = span(&mut ids, 3_000);
    let size = span_encoded_len(&big);
    assert_eq!(by_bytes.push(big.clone()), PushOutcome::Queued);
    assert_eq!(by_bytes.push(big.clone()), PushOutcome::Queued);
    assert_eq!(by_bytes.push(big.clone()), PushOutcome::Queued);
    assert_eq!(
        by_bytes.push(big),
        PushOutcome::Dropped(DropReason::QueueFull)
    );
    assert_eq!(by_bytes.stats().queue_bytes, 3 * size as u64);
    // A smaller span still fits where the big one did not.
    assert_eq!(by_bytes.push(span(&mut ids, 1)), PushOutcome::Queued);
    assert_eq!(by_bytes.stats().spans_dropped_queue_full, 1);
}

#[test]
fn oversized_span_is_dropped_as_too_large() {
    let mut ids = XoshiroIdGenerator::from_seed(4);
    let config = BatcherConfig {
        max_queue_bytes: 500,
        ..small_config()
    };
    let mut batcher = Batcher::new(config).unwrap();
    assert_eq!(
        batcher.push(span(&mut ids, 1_000)),
        PushOutcome::Dropped(DropReason::SpanTooLarge)
    );
    let stats = batcher.stats();
    assert_eq!((stats.spans_dropped_too_large, stats.spans_queued), (1, 0));
}

#[test]
fn partial_success_counts_rejected_spans() {
    let mut ids = XoshiroIdGenerator::from_seed(5);
    let mut batcher = Batcher::new(small_config()).unwrap();
    for _ in 0..4 {
        batcher.push(span(&mut ids, 1));
    }
    let batch = batcher.take_batch(0).unwrap();
    batcher.on_export_result(
        batch.id,
        ExportResult::PartialSuccess { rejected_spans: 99 },
    );
    let stats = batcher.stats();
    // Rejections beyond the batch size are capped at the batch size.
    assert_eq!((stats.spans_exported, stats.spans_rejected), (0, 4));
    assert_conserved(&stats);
}

#[test]
fn lost_callbacks_expire_and_free_the_slot() {
    let mut ids = XoshiroIdGenerator::from_seed(6);
    let mut batcher = Batcher::new(small_config()).unwrap();
    for _ in 0..8 {
        batcher.push(span(&mut ids, 1));
    }
    let first = batcher.take_batch(0).unwrap();
    let _second = batcher.take_batch(10).unwrap();
    batcher.push(span(&mut ids, 1));
    assert_eq!(batcher.take_batch(999), None);
    // At 1000 ms the first export is written off; its slot is reused.
    let third = batcher.take_batch(1_000).unwrap();
    assert_eq!(third.spans.len(), 1);
    let stats = batcher.stats();
    assert_eq!((stats.exports_expired, stats.exports_failed), (1, 1));
    assert_eq!(stats.spans_dropped_export_failed, 4);
    // The late answer for the expired export is ignored.
    assert!(!batcher.on_export_result(first.id, ExportResult::Ok));
    assert_eq!(batcher.stats().spans_exported, 0);
    assert_conserved(&batcher.stats());
}

#[test]
fn clock_going_backwards_delays_but_does_not_break() {
    let mut ids = XoshiroIdGenerator::from_seed(7);
    let mut batcher = Batcher::new(small_config()).unwrap();
    assert_eq!(batcher.poll_flush(10_000), None);
    batcher.push(span(&mut ids, 1));
    assert_eq!(batcher.poll_flush(5_000), None);
    assert!(batcher.poll_flush(10_100).is_some());
}

/// How the modelled collector treats an export.
#[derive(Clone, Copy, Debug)]
enum Collector {
    /// Connection refused: Envoy answers the call at once with a local
    /// 503 ("upstream connect error").
    Down,
    /// The host refuses the call (e.g. the cluster does not exist).
    Misconfigured,
    /// Accepts the connection and never answers (callback lost).
    BlackHole,
    /// Answers 503 after `delay_ms`.
    Slow5xx { delay_ms: u64 },
    /// Healthy but slow: 200 after `delay_ms`.
    SlowOk { delay_ms: u64 },
}

/// Drives 100k spans (one per millisecond of model time) through the
/// default batcher against `collector`, checking bounds at every step.
/// Returns the final stats and the most memory ever held: spans queued
/// plus spans in batches the collector had not answered yet.
fn run_against(collector: Collector) -> (BatcherStats, u64) {
    const SPANS: u64 = 100_000;
    let config = BatcherConfig::default();
    let mut batcher = Batcher::new(config.clone()).unwrap();
    let mut ids = XoshiroIdGenerator::from_seed(42);
    let template = span(&mut ids, 200);
    let mut pending: VecDeque<(u64, Batch)> = VecDeque::new();
    let mut peak_spans_held = 0u64;
    let end_ms = SPANS + 120_000; // let everything drain or expire
    for now in 0..end_ms {
        if now < SPANS {
            let mut s = template.clone();
            s.span_id = ids.span_id();
            batcher.push(s);
        }
        while let Some(batch) = batcher.poll_flush(now) {
            match collector {
                Collector::Down => {
                    batcher.on_export_result(batch.id, ExportResult::HttpStatus(503));
                }
                Collector::Misconfigured => {
                    batcher.on_export_result(batch.id, ExportResult::DispatchFailed);
                }
                Collector::BlackHole => pending.push_back((u64::MAX, batch)),
                Collector::Slow5xx { delay_ms } | Collector::SlowOk { delay_ms } => {
                    pending.push_back((now + delay_ms, batch))
                }
            }
        }
        while pending.front().is_some_and(|(due, _)| *due <= now) {
            if let Some((_, batch)) = pending.pop_front() {
                let result = match collector {
                    Collector::SlowOk { .. } => ExportResult::Ok,
                    _ => ExportResult::HttpStatus(503),
                };
                batcher.on_export_result(batch.id, result);
            }
        }
        // The black hole keeps batches the batcher has already written
        // off; a real host frees them at its own timeout. Model that.
        if matches!(collector, Collector::BlackHole) {
            let stats = batcher.stats();
            while pending.len() as u64 > stats.in_flight {
                pending.pop_front();
            }
        }
        let stats = batcher.stats();
        assert!(stats.queue_len <= config.max_queue_spans as u64);
        assert!(stats.queue_bytes <= config.max_queue_bytes as u64);
        assert!(stats.in_flight <= config.max_in_flight as u64);
        let held = stats.queue_len
            + pending
                .iter()
                .map(|(_, b)| b.spans.len() as u64)
                .sum::<u64>();
        peak_spans_held = peak_spans_held.max(held);
        assert_conserved(&stats);
    }
    let stats = batcher.stats();
    assert_eq!(stats.spans_queued + stats.spans_dropped_queue_full, SPANS);
    (stats, peak_spans_held)
}

#[test]
fn dead_collector_memory_stays_bounded() {
    let config = BatcherConfig::default();
    let bound = (config.max_queue_spans + config.max_in_flight * config.max_batch_spans) as u64;
    for collector in [
        Collector::Down,
        Collector::Misconfigured,
        Collector::BlackHole,
        Collector::Slow5xx { delay_ms: 5_000 },
    ] {
        let (stats, peak) = run_against(collector);
        assert!(peak <= bound, "{collector:?}: peak {peak} > {bound}");
        assert_eq!(stats.spans_exported, 0, "{collector:?}");
        assert_eq!(stats.exports_ok, 0, "{collector:?}");
        assert!(
            stats.exports_failed + stats.exports_http_error > 0,
            "{collector:?}"
        );
        // Everything offered is dropped (and counted) or still waiting.
        assert_eq!(
            stats.spans_dropped_export_failed
                + stats.spans_dropped_dispatch_failed
                + stats.spans_dropped_queue_full
                + stats.queue_len
                + stats.spans_in_flight,
            100_000,
            "{collector:?}"
        );
        if !matches!(collector, Collector::BlackHole) {
            // Failures that answer free their slot, so the queue drains.
            assert_eq!((stats.queue_len, stats.in_flight), (0, 0), "{collector:?}");
        }
    }
}

#[test]
fn healthy_but_slow_collector_loses_spans_only_to_queue_full() {
    let (stats, _) = run_against(Collector::SlowOk { delay_ms: 200 });
    assert_eq!(stats.exports_failed + stats.exports_http_error, 0);
    assert_eq!(stats.spans_dropped_export_failed, 0);
    // 2 exports of 256 per 200 ms = 2560 spans/s keeps up with 1000/s.
    assert_eq!(stats.spans_dropped_queue_full, 0);
    assert_eq!(stats.spans_exported, 100_000);
}

#[test]
fn black_hole_collector_is_written_off_by_expiry() {
    let (stats, _) = run_against(Collector::BlackHole);
    assert!(stats.exports_expired > 0);
    assert_eq!(stats.exports_expired, stats.exports_failed);
}

// --- property: invariants under arbitrary operation sequences ---

#[derive(Clone, Debug)]
enum Op {
    Push(usize),
    Poll(u64),
    Take(u64),
    Result(usize, u8),
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0usize..1_500).prop_map(Op::Push),
        2 => (0u64..300).prop_map(Op::Poll),
        1 => (0u64..50).prop_map(Op::Take),
        2 => (any::<usize>(), 0u8..6).prop_map(|(i, r)| Op::Result(i, r)),
    ]
}

fn arb_config() -> impl Strategy<Value = BatcherConfig> {
    (
        1usize..20,
        200usize..8_000,
        1usize..8,
        1u64..200,
        1usize..4,
        1u64..2_000,
    )
        .prop_map(
            |(queue, bytes, batch, interval, in_flight, expiry)| BatcherConfig {
                max_queue_spans: queue.max(batch),
                max_queue_bytes: bytes,
                max_batch_spans: batch,
                flush_interval_ms: interval,
                max_in_flight: in_flight,
                in_flight_expiry_ms: expiry,
            },
        )
}

proptest! {
    #[test]
    fn invariants_hold_for_any_sequence(
        config in arb_config(),
        ops in proptest::collection::vec(arb_op(), 0..200),
    ) {
        let mut batcher = Batcher::new(config.clone()).unwrap();
        let mut ids = XoshiroIdGenerator::from_seed(9);
        let mut now = 0u64;
        let mut outstanding: Vec<Batch> = Vec::new();
        let mut pushed = 0u64;
        for op in ops {
            match op {
                Op::Push(payload) => {
                    pushed += 1;
                    let before = batcher.stats();
                    let outcome = batcher.push(span(&mut ids, payload));
                    let after = batcher.stats();
                    match outcome {
                        PushOutcome::Queued => prop_assert_eq!(after.queue_len, before.queue_len + 1),
                        PushOutcome::Dropped(_) => prop_assert_eq!(after.queue_len, before.queue_len),
                    }
                }
                Op::Poll(dt) => {
                    now += dt;
                    while let Some(batch) = batcher.poll_flush(now) {
                        prop_assert!(!batch.spans.is_empty());
                        prop_assert!(batch.spans.len() <= config.max_batch_spans);
                        outstanding.push(batch);
                    }
                }
                Op::Take(dt) => {
                    now += dt;
                    if let Some(batch) = batcher.take_batch(now) {
                        prop_assert!(batch.spans.len() <= config.max_batch_spans);
                        outstanding.push(batch);
                    }
                }
                Op::Result(index, kind) => {
                    if !outstanding.is_empty() {
                        let batch = outstanding.swap_remove(index % outstanding.len());
                        let result = match kind {
                            0 => ExportResult::Ok,
                            1 => ExportResult::HttpStatus(204),
                            2 => ExportResult::HttpStatus(500),
                            3 => ExportResult::PartialSuccess { rejected_spans: 1 },
                            4 => ExportResult::DispatchFailed,
                            _ => ExportResult::Failed,
                        };
                        batcher.on_export_result(batch.id, result);
                    }
                }
            }
            let stats = batcher.stats();
            prop_assert!(stats.queue_len <= config.max_queue_spans as u64);
            prop_assert!(stats.queue_bytes <= config.max_queue_bytes as u64);
            prop_assert!(stats.in_flight <= config.max_in_flight as u64);
            prop_assert!(stats.spans_in_flight <= (config.max_in_flight * config.max_batch_spans) as u64);
            prop_assert_eq!(
                stats.spans_queued,
                stats.spans_exported + stats.spans_rejected + stats.spans_dropped_export_failed
                    + stats.spans_dropped_dispatch_failed + stats.spans_in_flight + stats.queue_len
            );
            prop_assert_eq!(
                pushed,
                stats.spans_queued + stats.spans_dropped_queue_full + stats.spans_dropped_too_large
            );
            prop_assert_eq!(
                stats.exports_ok + stats.exports_http_error + stats.exports_failed + stats.in_flight,
                batcher.next_id - 1);
        }
    }
}
