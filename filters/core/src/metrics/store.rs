//! VM-side aggregation of every metric update, published on the tick.
//!
//! A request's updates (a dozen counters and histogram samples) cost no host
//! call: they land in this store, and [`MetricStore::flush`] publishes what
//! changed since the last flush, one host call per changed series. Histograms
//! are kept as fixed buckets and published as cumulative `_bucket{le}`
//! counters plus exact `_sum` and `_count` counters, which is what
//! `histogram_quantile` reads (Envoy's own histograms approximate `_sum`).
//! Host ids are defined lazily, at the first flush of a series.
//!
//! Memory is bounded by the series budget: at most
//! `limits.max_series_per_metric` series per family, plus the collapsed one.

use super::catalogue::{Family, MAX_LABELS};
use super::push_label;
use crate::host::{MetricKind, MetricsHost};
use crate::labels::{FxHashMap, OVERFLOW, OVERFLOW_ID};

/// A label value for one series: its interned id and its text.
#[derive(Clone, Copy, Debug)]
pub struct LabelValue<'a> {
    pub id: u16,
    pub text: &'a str,
}

/// A series to update: the family plus one value per label of the family.
#[derive(Clone, Copy, Debug)]
pub struct Series<'a> {
    pub family: Family,
    /// (id, text) per label, in the family's label order.
    pub values: &'a [LabelValue<'a>],
}

impl<'a> Series<'a> {
    pub fn new(family: Family, values: &'a [LabelValue<'a>]) -> Self {
        Self { family, values }
    }
}

type SeriesKey = (u8, [u16; MAX_LABELS]);

/// What is pending for one series until the next flush.
#[derive(Debug)]
enum Cell {
    /// Counters, and gauges changed by deltas: the sum of the deltas.
    Delta(i64),
    /// Gauges set to a value: the latest value, if it changed.
    Set(Option<u64>),
    Histogram(Box<Buckets>),
}

/// Pending histogram samples: per-bucket counts (the last is `+Inf`), sum
/// and count since the last flush.
#[derive(Debug)]
struct Buckets {
    bounds: &'static [u64],
    counts: Vec<u64>,
    sum: u64,
    count: u64,
    /// Recorded units per published unit of `_sum` (1, or 10^6 for the
    /// GenAI seconds histograms recorded in microseconds).
    scale: u64,
    /// The part of the sum below one published unit, not yet published:
    /// the published `_sum` is the exact total, truncated to whole units.
    carry: u64,
}

impl Buckets {
    fn new(bounds: &'static [u64], scale: u64) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0,
            count: 0,
            scale: scale.max(1),
            carry: 0,
        }
    }

    /// The `_sum` increment to publish now, keeping the remainder.
    fn take_sum(&mut self) -> u64 {
        let total = std::mem::take(&mut self.sum).saturating_add(self.carry);
        self.carry = total % self.scale;
        total / self.scale
    }

    fn observe(&mut self, value: u64) {
        let i = self.bounds.partition_point(|&b| b < value);
        if let Some(c) = self.counts.get_mut(i) {
            *c += 1;
        }
        self.sum = self.sum.saturating_add(value);
        self.count += 1;
    }
}

/// One series: its stat name's label fields, what is pending, and its host
/// ids once defined (histograms: one per bucket, then `+Inf`, sum, count).
#[derive(Debug)]
struct Slot {
    family: Family,
    labels: String,
    cell: Cell,
    ids: Vec<u32>,
    dirty: bool,
}

/// How an update found its series.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Found {
    Exact(usize),
    /// The family's series budget is spent: the request-derived labels
    /// collapsed to `other`.
    Collapsed(usize),
}

/// Aggregates metric updates in VM memory; see the module docs.
#[derive(Debug)]
pub struct MetricStore {
    slots: Vec<Slot>,
    index: FxHashMap<SeriesKey, usize>,
    per_family: [u32; 64],
    max_series_per_family: u32,
    dirty: Vec<usize>,
    /// Host calls that failed (for the shell's one-time log).
    pub host_errors: u64,
}

impl MetricStore {
    pub fn new(max_series_per_family: u32) -> Self {
        Self {
            slots: Vec::new(),
            index: FxHashMap::default(),
            per_family: [0; 64],
            max_series_per_family,
            dirty: Vec::new(),
            host_errors: 0,
        }
    }

    /// Distinct series so far, across families.
    pub fn series_count(&self) -> usize {
        self.slots.len()
    }

    /// Adds `delta` to a counter, or to a gauge that moves by deltas.
    pub fn add(&mut self, s: &Series<'_>, delta: i64) {
        let found = self.find(s, || Cell::Delta(0));
        if let Some(Cell::Delta(d)) = self.cell(found) {
            *d = d.saturating_add(delta);
        }
        self.touched(found, s.family);
    }

    /// Sets a gauge.
    pub fn set(&mut self, s: &Series<'_>, value: u64) {
        let found = self.find(s, || Cell::Set(None));
        if let Some(Cell::Set(v)) = self.cell(found) {
            *v = Some(value);
        }
        self.touched(found, s.family);
    }

    /// Records a histogram sample.
    pub fn observe(&mut self, s: &Series<'_>, value: u64) {
        let new = || Buckets::new(s.family.def().buckets, s.family.scale());
        let found = self.find(s, || Cell::Histogram(Box::new(new())));
        if let Some(Cell::Histogram(b)) = self.cell(found) {
            b.observe(value);
        }
        self.touched(found, s.family);
    }

    fn cell(&mut self, found: Option<Found>) -> Option<&mut Cell> {
        let (Found::Exact(i) | Found::Collapsed(i)) = found?;
        self.slots.get_mut(i).map(|s| &mut s.cell)
    }

    /// Marks the slot dirty, and counts a collapse.
    fn touched(&mut self, found: Option<Found>, family: Family) {
        let Some(Found::Exact(i) | Found::Collapsed(i)) = found else {
            return;
        };
        if let Some(slot) = self.slots.get_mut(i) {
            if !slot.dirty {
                slot.dirty = true;
                self.dirty.push(i);
            }
        }
        if matches!(found, Some(Found::Collapsed(_))) && family != Family::SeriesOverflow {
            self.add(&Series::new(Family::SeriesOverflow, &[]), 1);
        }
    }

    /// The slot of a series, created on first use; collapses the
    /// request-derived labels once the family's budget is spent.
    fn find(&mut self, s: &Series<'_>, cell: impl FnOnce() -> Cell) -> Option<Found> {
        let mut key: SeriesKey = (s.family as u8, [0; MAX_LABELS]);
        for (k, v) in key.1.iter_mut().zip(s.values) {
            *k = v.id;
        }
        if let Some(&i) = self.index.get(&key) {
            return Some(Found::Exact(i));
        }
        let fam = usize::from(s.family as u8);
        let over_budget =
            self.per_family.get(fam).copied().unwrap_or(u32::MAX) >= self.max_series_per_family;
        let def = s.family.def();
        let mut texts: [&str; MAX_LABELS] = [""; MAX_LABELS];
        for (t, v) in texts.iter_mut().zip(s.values) {
            *t = v.text;
        }
        if over_budget {
            for (i, l) in def.labels.iter().enumerate().take(MAX_LABELS) {
                if l.request_derived() {
                    key.1[i] = OVERFLOW_ID;
                    texts[i] = OVERFLOW;
                }
            }
            if let Some(&i) = self.index.get(&key) {
                return Some(Found::Collapsed(i));
            }
        }
        let mut labels = String::with_capacity(128);
        for (l, t) in def.labels.iter().zip(texts.iter()) {
            push_label(&mut labels, l.name(), t);
        }
        let i = self.slots.len();
        self.slots.push(Slot {
            family: s.family,
            labels,
            cell: cell(),
            ids: Vec::new(),
            dirty: false,
        });
        self.index.insert(key, i);
        if over_budget {
            Some(Found::Collapsed(i))
        } else {
            if let Some(n) = self.per_family.get_mut(fam) {
                *n += 1;
            }
            Some(Found::Exact(i))
        }
    }

    /// Publishes every change since the last flush; returns the host calls
    /// made. A series whose stats cannot be defined, or whose single update
    /// fails, stays pending for the next flush; a histogram whose update
    /// fails half-way is not retried (that would count its buckets twice).
    pub fn flush<H: MetricsHost>(&mut self, host: &mut H) -> usize {
        let mut calls = 0;
        let dirty = std::mem::take(&mut self.dirty);
        for i in dirty {
            let Some(slot) = self.slots.get_mut(i) else {
                continue;
            };
            slot.dirty = false;
            match publish(slot, host, &mut calls) {
                Ok(()) => {}
                Err(Failed::Retry) => {
                    self.host_errors += 1;
                    slot.dirty = true;
                    self.dirty.push(i);
                }
                Err(Failed::Lost) => self.host_errors += 1,
            }
        }
        calls
    }

    /// Whether anything waits for a flush.
    pub fn has_pending(&self) -> bool {
        !self.dirty.is_empty()
    }
}

/// Why a slot's publication failed.
enum Failed {
    /// Nothing reached the host: try again at the next flush.
    Retry,
    /// Part of a histogram reached the host: the rest is dropped.
    Lost,
}

/// Defines the slot's stats on first use, then publishes its pending change.
/// Envoy refuses counter increments of zero or less, so none are sent.
fn publish<H: MetricsHost>(slot: &mut Slot, host: &mut H, calls: &mut usize) -> Result<(), Failed> {
    if slot.ids.is_empty() {
        slot.ids = define(slot, host, calls).map_err(|()| Failed::Retry)?;
    }
    let first = slot.ids.first().copied().ok_or(Failed::Retry)?;
    match &mut slot.cell {
        Cell::Delta(d) => {
            if *d != 0 {
                *calls += 1;
                host.increment(first, *d).map_err(|_| Failed::Retry)?;
                *d = 0;
            }
        }
        Cell::Set(v) => {
            if let Some(value) = *v {
                *calls += 1;
                host.record(first, value).map_err(|_| Failed::Retry)?;
                *v = None;
            }
        }
        Cell::Histogram(b) => publish_histogram(b, &slot.ids, host, calls)?,
    }
    Ok(())
}

/// Cumulative bucket deltas, then sum and count. The pending counts are
/// taken first: a failure half-way loses them rather than counting twice.
fn publish_histogram<H: MetricsHost>(
    b: &mut Buckets,
    ids: &[u32],
    host: &mut H,
    calls: &mut usize,
) -> Result<(), Failed> {
    let counts = std::mem::replace(&mut b.counts, vec![0; b.bounds.len() + 1]);
    let (sum, count) = (b.take_sum(), std::mem::take(&mut b.count));
    let [.., sum_id, count_id] = ids else {
        return Err(Failed::Lost);
    };
    let mut cumulative = 0u64;
    let cumulative_counts = counts.iter().map(|c| {
        cumulative += c;
        cumulative
    });
    let updates = cumulative_counts
        .zip(ids)
        .map(|(n, id)| (*id, n))
        .chain([(*sum_id, sum), (*count_id, count)]);
    let mut failed = false;
    for (id, n) in updates.filter(|(_, n)| *n > 0) {
        *calls += 1;
        failed |= host.increment(id, clamp(n)).is_err();
    }
    if failed {
        Err(Failed::Lost)
    } else {
        Ok(())
    }
}

fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The host ids of a slot's stats.
fn define<H: MetricsHost>(slot: &Slot, host: &mut H, calls: &mut usize) -> Result<Vec<u32>, ()> {
    let def = slot.family.def();
    let mut name = String::with_capacity(slot.labels.len() + 64);
    let mut one = |name: &str, kind: MetricKind| {
        *calls += 1;
        host.define(kind, name).map_err(drop)
    };
    if def.kind != MetricKind::Histogram {
        name.push_str(&slot.labels);
        name.push_str(def.name);
        return Ok(vec![one(&name, def.kind)?]);
    }
    let mut ids = Vec::with_capacity(def.buckets.len() + 3);
    for le in def.buckets.iter().map(Some).chain([None]) {
        let bound = match le {
            Some(&b) => slot.family.le(b),
            None => "+Inf".to_string(),
        };
        name.clear();
        name.push_str(&slot.labels);
        push_label(&mut name, "le", &bound);
        name.push_str(def.name);
        name.push_str("_bucket");
        ids.push(one(&name, MetricKind::Counter)?);
    }
    for suffix in ["_sum", "_count"] {
        name.clear();
        name.push_str(&slot.labels);
        name.push_str(def.name);
        name.push_str(suffix);
        ids.push(one(&name, MetricKind::Counter)?);
    }
    Ok(ids)
}
