//! Keeps exported counters monotonic across runtime restarts.
//!
//! A runtime's counters restart from zero when its process restarts, and
//! several internal series (engines, ranks) are summed into one. Exporting
//! the raw sum would let a restart of one part look like a smaller decrease
//! that `rate()` mistakes for a full reset, counting the surviving part twice.
//! Instead the exporter adds up *increases*: a counter that went down, or any
//! counter after `process_start_time_seconds` changed, counts its whole new
//! value as the increase. The exported value therefore never decreases while
//! the exporter runs, and `increase()` equals what the runtime really did.

use std::collections::BTreeMap;

use crate::normalize::{CounterKind, HistogramKind, NormHistogram, Normalized, Outcome, Runtime};

/// One monotonic counter built from raw samples.
///
/// Exported as `base + raw`, where `base` only changes at a reset (it absorbs
/// the last value before the reset). Between resets the exported value is the
/// runtime's own value exactly, with no floating-point drift from summing
/// deltas.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Acc {
    last_raw: f64,
    base: f64,
}

impl Acc {
    fn update(&mut self, raw: f64, reset: bool) {
        let raw = raw.max(0.0);
        if reset || raw < self.last_raw {
            self.base += self.last_raw;
        }
        self.last_raw = raw;
    }

    pub fn total(&self) -> f64 {
        self.base + self.last_raw
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
struct HistAcc {
    bounds: Vec<f64>,
    buckets: Vec<Acc>,
    sum: Acc,
    count: Acc,
}

/// Monotonic totals of one pod.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Accumulator {
    runtime: Option<Runtime>,
    start_time: Option<f64>,
    counters: BTreeMap<CounterKind, Acc>,
    outcomes: BTreeMap<Outcome, Acc>,
    histograms: BTreeMap<HistogramKind, HistAcc>,
    restarts: u64,
}

impl Accumulator {
    /// Whether `n` shows the runtime restarted since the last update.
    fn detect_reset(&self, n: &Normalized) -> bool {
        if self.runtime.is_some_and(|r| r != n.runtime) {
            return true;
        }
        if let (Some(a), Some(b)) = (self.start_time, n.process_start_time_seconds) {
            if (a - b).abs() > 1e-6 {
                return true;
            }
        }
        let counter_down = n
            .counters
            .iter()
            .any(|(k, v)| self.counters.get(k).is_some_and(|a| *v < a.last_raw));
        let outcome_down = n
            .outcomes
            .iter()
            .any(|(k, v)| self.outcomes.get(k).is_some_and(|a| *v < a.last_raw));
        let hist_down = n.histograms.iter().any(|(k, h)| {
            self.histograms
                .get(k)
                .is_some_and(|a| h.count < a.count.last_raw)
        });
        counter_down || outcome_down || hist_down
    }

    /// Folds in one successful scrape.
    pub fn update(&mut self, n: &Normalized) {
        let first = self.runtime.is_none();
        let reset = !first && self.detect_reset(n);
        if reset {
            self.restarts += 1;
        }
        self.runtime = Some(n.runtime);
        self.start_time = n.process_start_time_seconds;
        for (k, v) in &n.counters {
            self.counters.entry(*k).or_default().update(*v, reset);
        }
        for (k, v) in &n.outcomes {
            self.outcomes.entry(*k).or_default().update(*v, reset);
        }
        for (k, h) in &n.histograms {
            let acc = self.histograms.entry(*k).or_default();
            let bounds: Vec<f64> = h.buckets.iter().map(|(b, _)| *b).collect();
            if acc.bounds != bounds {
                // A new bucket layout starts a new series of totals.
                *acc = HistAcc {
                    bounds,
                    buckets: vec![Acc::default(); h.buckets.len()],
                    ..HistAcc::default()
                };
            }
            for (slot, (_, c)) in acc.buckets.iter_mut().zip(&h.buckets) {
                slot.update(*c, reset);
            }
            acc.sum.update(h.sum, reset);
            acc.count.update(h.count, reset);
        }
    }

    /// Restarts seen (counters went down or the start time changed).
    pub fn restarts(&self) -> u64 {
        self.restarts
    }

    pub fn counter(&self, k: CounterKind) -> Option<f64> {
        self.counters.get(&k).map(Acc::total)
    }

    pub fn outcome(&self, k: Outcome) -> Option<f64> {
        self.outcomes.get(&k).map(Acc::total)
    }

    /// The monotonic histogram; buckets stay cumulative because each bucket
    /// only ever adds increases of a cumulative count.
    pub fn histogram(&self, k: HistogramKind) -> Option<NormHistogram> {
        self.histograms.get(&k).map(|h| NormHistogram {
            buckets: h
                .bounds
                .iter()
                .zip(&h.buckets)
                .map(|(b, a)| (*b, a.total()))
                .collect(),
            sum: h.sum.total(),
            count: h.count.total(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exported_value_equals_the_raw_value_exactly_between_resets() {
        let mut a = Acc::default();
        for raw in [0.118, 1.8, 2.9000000000000004, 10.768221] {
            a.update(raw, false);
            assert_eq!(a.total(), raw, "no drift from summing deltas");
        }
        a.update(0.5, false); // went down: a restart
        assert_eq!(a.total(), 10.768221 + 0.5);
        a.update(0.25, true); // start time changed: a restart even if lower values look fine
        assert_eq!(a.total(), 10.768221 + 0.5 + 0.25);
    }

    fn norm(gen: f64, start: Option<f64>) -> Normalized {
        Normalized {
            runtime: Runtime::Vllm,
            gauges: BTreeMap::new(),
            counters: [(CounterKind::GenerationTokens, gen)].into_iter().collect(),
            outcomes: BTreeMap::new(),
            histograms: [(
                HistogramKind::TimeToFirstToken,
                NormHistogram {
                    buckets: vec![(0.1, gen / 2.0), (f64::INFINITY, gen)],
                    sum: gen,
                    count: gen,
                },
            )]
            .into_iter()
            .collect(),
            process_start_time_seconds: start,
            malformed_lines: 0,
        }
    }

    #[test]
    fn restart_counts_the_new_value_and_never_goes_back() {
        let mut a = Accumulator::default();
        a.update(&norm(100.0, Some(1.0)));
        a.update(&norm(150.0, Some(1.0)));
        assert_eq!(a.counter(CounterKind::GenerationTokens), Some(150.0));
        a.update(&norm(20.0, Some(2.0)));
        assert_eq!(a.counter(CounterKind::GenerationTokens), Some(170.0));
        assert_eq!(a.restarts(), 1);
        a.update(&norm(30.0, Some(2.0)));
        assert_eq!(a.counter(CounterKind::GenerationTokens), Some(180.0));
        let h = a.histogram(HistogramKind::TimeToFirstToken).unwrap();
        assert_eq!(h.count, 180.0);
        assert_eq!(h.buckets, vec![(0.1, 90.0), (f64::INFINITY, 180.0)]);
    }

    #[test]
    fn a_fast_restart_is_caught_by_the_start_time() {
        let mut a = Accumulator::default();
        a.update(&norm(100.0, Some(1.0)));
        // Restarted and already past the old value: only the start time tells.
        a.update(&norm(120.0, Some(5.0)));
        assert_eq!(a.counter(CounterKind::GenerationTokens), Some(220.0));
    }

    #[test]
    fn a_decrease_without_start_time_is_a_reset() {
        let mut a = Accumulator::default();
        a.update(&norm(100.0, None));
        a.update(&norm(40.0, None));
        assert_eq!(a.counter(CounterKind::GenerationTokens), Some(140.0));
    }
}
