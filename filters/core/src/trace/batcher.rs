//! The per-VM span export queue.
//!
//! Tracing must never hurt the traffic it observes, so whatever the collector
//! does (down, slow, answering 5xx, never answering) the memory held here is
//! bounded: the queue by span count *and* encoded bytes, in-flight exports by
//! count. When full, new spans are dropped and counted (never the request).
//!
//! Failed exports are dropped, not retried. A retry would have to keep the
//! batch (up to `max_queue_bytes`) alive per attempt and would send more load
//! to a collector that is already failing; the OpenTelemetry Collector in
//! front of the backend retries on its own. Losing a second of spans while
//! the collector restarts is the accepted cost, and the counters show it.
//!
//! The batcher never reads a clock: the shell passes `now_ms` (Envoy's
//! wall clock); time going backwards only delays a flush.

use std::collections::VecDeque;

use serde::Deserialize;
use thiserror::Error;

use super::otlp::span_encoded_len;
use super::span::SpanRecord;

/// Queue and export limits. Deserializable so the shell can embed it in the
/// plugin configuration (`"tracing": {"batch": {...}}` or similar); missing
/// fields take the defaults, unknown fields are an error (a typo must not
/// silently leave a limit at its default).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BatcherConfig {
    /// Spans waiting for export, at most.
    pub max_queue_spans: usize,
    /// Encoded bytes waiting for export, at most (OTLP size of the spans).
    pub max_queue_bytes: usize,
    /// Spans per export request; reaching it triggers a flush at once.
    pub max_batch_spans: usize,
    /// A non-empty queue is flushed at least this often.
    pub flush_interval_ms: u64,
    /// Exports awaiting a response, at most; flushing waits when reached.
    pub max_in_flight: usize,
    /// An export with no result after this long is written off as failed,
    /// so a lost callback cannot block exporting forever. Keep it above the
    /// shell's HTTP timeout.
    pub in_flight_expiry_ms: u64,
}

impl Default for BatcherConfig {
    fn default() -> Self {
        BatcherConfig {
            max_queue_spans: 2048,
            max_queue_bytes: 1 << 20,
            max_batch_spans: 256,
            flush_interval_ms: 1000,
            max_in_flight: 2,
            in_flight_expiry_ms: 60_000,
        }
    }
}

/// A limit that makes the batcher useless (zero) or contradictory.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BatcherConfigError {
    #[error("tracing batcher: `{0}` must be greater than zero")]
    Zero(&'static str),
    #[error("tracing batcher: max_batch_spans ({batch}) exceeds max_queue_spans ({queue})")]
    BatchLargerThanQueue { batch: usize, queue: usize },
}

impl BatcherConfig {
    pub fn validate(&self) -> Result<(), BatcherConfigError> {
        let nonzero = [
            ("max_queue_spans", self.max_queue_spans as u64),
            ("max_queue_bytes", self.max_queue_bytes as u64),
            ("max_batch_spans", self.max_batch_spans as u64),
            ("flush_interval_ms", self.flush_interval_ms),
            ("max_in_flight", self.max_in_flight as u64),
            ("in_flight_expiry_ms", self.in_flight_expiry_ms),
        ];
        if let Some((name, _)) = nonzero.iter().find(|(_, v)| *v == 0) {
            return Err(BatcherConfigError::Zero(name));
        }
        if self.max_batch_spans > self.max_queue_spans {
            return Err(BatcherConfigError::BatchLargerThanQueue {
                batch: self.max_batch_spans,
                queue: self.max_queue_spans,
            });
        }
        Ok(())
    }
}

/// What happened to a pushed span.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PushOutcome {
    Queued,
    Dropped(DropReason),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// The queue is at its span or byte limit (collector slow or down).
    QueueFull,
    /// The span alone exceeds `max_queue_bytes`; it could never be sent.
    SpanTooLarge,
}

/// Identifies an export so its result can be matched to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BatchId(pub u64);

/// Spans to export in one request. The shell encodes them with
/// [`super::otlp::OtlpEncoder::encode`], dispatches, and reports back with
/// [`Batcher::on_export_result`] under `id`.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    pub id: BatchId,
    pub spans: Vec<SpanRecord>,
    /// Sum of the spans' encoded sizes (the body adds a small envelope).
    pub spans_encoded_len: usize,
}

/// How an export ended, as the shell saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportResult {
    /// The collector accepted the batch (any 2xx).
    Ok,
    /// 2xx with an OTLP partial-success body rejecting some spans.
    PartialSuccess { rejected_spans: u64 },
    /// The collector answered with this status (2xx counts as [`Ok`]).
    ///
    /// [`Ok`]: ExportResult::Ok
    HttpStatus(u16),
    /// No answer: connection failure or timeout reported by the host.
    Failed,
    /// The host refused to start the call (`dispatch_http_call` error, e.g.
    /// an unknown cluster): a configuration problem, counted apart.
    DispatchFailed,
}

/// Counters for the shell to publish as Envoy metrics. All `spans_*`,
/// `exports_*` fields are monotonic; `queue_*` and `in_flight*` are gauges.
///
/// Invariant: `spans_queued == spans_exported + spans_rejected
/// + spans_dropped_export_failed + spans_dropped_dispatch_failed
/// + spans_in_flight + queue_len`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatcherStats {
    /// Accepted into the queue (dropped-on-push spans are not counted here).
    pub spans_queued: u64,
    pub spans_exported: u64,
    /// Refused by the collector in an OTLP partial success.
    pub spans_rejected: u64,
    pub spans_dropped_queue_full: u64,
    pub spans_dropped_too_large: u64,
    /// In exports that got a non-2xx answer, no answer, or expired.
    pub spans_dropped_export_failed: u64,
    /// In exports the host refused to dispatch.
    pub spans_dropped_dispatch_failed: u64,
    /// Exports answered 2xx (partial successes included).
    pub exports_ok: u64,
    /// Exports answered with a non-2xx status.
    pub exports_http_error: u64,
    /// Exports with no answer: failed, expired or not dispatched.
    pub exports_failed: u64,
    /// Exports written off after `in_flight_expiry_ms` (also in `exports_failed`).
    pub exports_expired: u64,
    pub queue_len: u64,
    pub queue_bytes: u64,
    pub in_flight: u64,
    pub spans_in_flight: u64,
}

#[derive(Clone, Copy, Debug)]
struct InFlight {
    id: BatchId,
    spans: u64,
    sent_at_ms: u64,
}

/// The bounded export queue (one per Wasm VM).
#[derive(Debug)]
pub struct Batcher {
    config: BatcherConfig,
    queue: VecDeque<(SpanRecord, usize)>,
    queue_bytes: usize,
    in_flight: Vec<InFlight>,
    next_id: u64,
    last_flush_ms: Option<u64>,
    stats: BatcherStats,
}

impl Batcher {
    pub fn new(config: BatcherConfig) -> Result<Self, BatcherConfigError> {
        config.validate()?;
        Ok(Batcher {
            queue: VecDeque::with_capacity(config.max_batch_spans.min(64)),
            config,
            queue_bytes: 0,
            in_flight: Vec::new(),
            next_id: 1,
            last_flush_ms: None,
            stats: BatcherStats::default(),
        })
    }

    pub fn config(&self) -> &BatcherConfig {
        &self.config
    }

    /// Queues a finished, sampled span, or drops it when a bound would be
    /// exceeded (newest dropped: the queue keeps its oldest, in-order spans).
    pub fn push(&mut self, span: SpanRecord) -> PushOutcome {
        let size = span_encoded_len(&span);
        if size > self.config.max_queue_bytes {
            self.stats.spans_dropped_too_large += 1;
            return PushOutcome::Dropped(DropReason::SpanTooLarge);
        }
        if self.queue.len() >= self.config.max_queue_spans
            || self.queue_bytes + size > self.config.max_queue_bytes
        {
            self.stats.spans_dropped_queue_full += 1;
            return PushOutcome::Dropped(DropReason::QueueFull);
        }
        self.queue_bytes += size;
        self.queue.push_back((span, size));
        self.stats.spans_queued += 1;
        PushOutcome::Queued
    }

    /// The next batch to export, if one is due: the queue holds a full batch,
    /// or `flush_interval_ms` passed since the last flush (or since the
    /// first poll) with spans waiting; and fewer than `max_in_flight`
    /// exports are pending. Call it from the tick, and after a push, until
    /// it returns `None`.
    pub fn poll_flush(&mut self, now_ms: u64) -> Option<Batch> {
        self.expire_in_flight(now_ms);
        let last = *self.last_flush_ms.get_or_insert(now_ms);
        let full = self.queue.len() >= self.config.max_batch_spans;
        let interval_elapsed = now_ms.saturating_sub(last) >= self.config.flush_interval_ms;
        if full || (interval_elapsed && !self.queue.is_empty()) {
            self.take_batch(now_ms)
        } else {
            None
        }
    }

    /// A batch of whatever is queued, ignoring the interval (for shutdown,
    /// or a shell that schedules flushes itself). Still respects
    /// `max_in_flight`.
    pub fn take_batch(&mut self, now_ms: u64) -> Option<Batch> {
        self.expire_in_flight(now_ms);
        if self.queue.is_empty() || self.in_flight.len() >= self.config.max_in_flight {
            return None;
        }
        let count = self.queue.len().min(self.config.max_batch_spans);
        let mut spans = Vec::with_capacity(count);
        let mut bytes = 0;
        for (span, size) in self.queue.drain(..count) {
            bytes += size;
            spans.push(span);
        }
        self.queue_bytes -= bytes;
        let id = BatchId(self.next_id);
        self.next_id = self.next_id.wrapping_add(1);
        self.in_flight.push(InFlight {
            id,
            spans: count as u64,
            sent_at_ms: now_ms,
        });
        self.last_flush_ms = Some(now_ms);
        Some(Batch {
            id,
            spans,
            spans_encoded_len: bytes,
        })
    }

    /// Records how export `id` ended. Returns false for an unknown id (e.g.
    /// a result arriving after the export was expired), which changes nothing.
    pub fn on_export_result(&mut self, id: BatchId, result: ExportResult) -> bool {
        let Some(index) = self.in_flight.iter().position(|f| f.id == id) else {
            return false;
        };
        let done = self.in_flight.swap_remove(index);
        let stats = &mut self.stats;
        let accepted = |stats: &mut BatcherStats, rejected: u64| {
            let rejected = rejected.min(done.spans);
            stats.exports_ok += 1;
            stats.spans_exported += done.spans - rejected;
            stats.spans_rejected += rejected;
        };
        match result {
            ExportResult::Ok => accepted(stats, 0),
            ExportResult::HttpStatus(code) if (200..300).contains(&code) => accepted(stats, 0),
            ExportResult::PartialSuccess { rejected_spans } => accepted(stats, rejected_spans),
            ExportResult::HttpStatus(_) => {
                stats.exports_http_error += 1;
                stats.spans_dropped_export_failed += done.spans;
            }
            ExportResult::Failed => {
                stats.exports_failed += 1;
                stats.spans_dropped_export_failed += done.spans;
            }
            ExportResult::DispatchFailed => {
                stats.exports_failed += 1;
                stats.spans_dropped_dispatch_failed += done.spans;
            }
        }
        true
    }

    /// Current counters and gauges.
    pub fn stats(&self) -> BatcherStats {
        BatcherStats {
            queue_len: self.queue.len() as u64,
            queue_bytes: self.queue_bytes as u64,
            in_flight: self.in_flight.len() as u64,
            spans_in_flight: self.in_flight.iter().map(|f| f.spans).sum(),
            ..self.stats
        }
    }

    fn expire_in_flight(&mut self, now_ms: u64) {
        let expiry = self.config.in_flight_expiry_ms;
        let stats = &mut self.stats;
        self.in_flight.retain(|f| {
            let expired = now_ms.saturating_sub(f.sent_at_ms) >= expiry;
            if expired {
                stats.exports_failed += 1;
                stats.exports_expired += 1;
                stats.spans_dropped_export_failed += f.spans;
            }
            !expired
        });
    }
}

#[cfg(test)]
mod tests;
