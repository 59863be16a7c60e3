//! tokentap's metric families as Envoy stats with real tags.
//!
//! The core aggregates every update per worker ([`MetricStore`]) and names
//! each series the proxy-wasm way, labels encoded in the stat name. Here the
//! name is split back into metric and label values
//! ([`decode_stat_name`]), and the update goes to one of the labelled stats
//! defined when the configuration was loaded (Envoy freezes stat
//! definitions afterwards). With the module's `metrics_namespace` registered
//! as a custom stat namespace, `/stats/prometheus` prints them exactly as the
//! Wasm build's: `llm_gateway_requests_total{route="chat",...}`.
//!
//! [`MetricStore`]: tokentap_core::metrics::MetricStore

use std::collections::HashMap;

use tokentap_core::config::Naming;
use tokentap_core::host::{HostError, MetricKind, MetricsHost};
use tokentap_core::metrics::{decode_stat_name, Family};

use crate::abi::{ConfigHandle, MetricsError, StatsHandle};

/// Status codes of a failed stats call, as [`HostError`] values.
const NOT_DEFINED: u32 = 1;
const BAD_LABELS: u32 = 2;
const NO_STREAM: u32 = 3;
const REFUSED: u32 = 4;

/// One Envoy stat defined at configuration time.
#[derive(Clone, Debug)]
struct Stat {
    kind: MetricKind,
    id: usize,
    labels: Vec<&'static str>,
}

/// Every stat tokentap may update, by metric name; shared by all workers.
#[derive(Debug, Default)]
pub struct StatIds {
    by_name: HashMap<String, Stat>,
    /// Unlabelled counter of panics caught in exported hooks.
    pub panics: Option<usize>,
}

/// The name of the counter that counts caught panics.
pub const PANICS: &str = "llm_gateway_module_panics_total";

impl StatIds {
    /// Defines one stat per catalogue family published under `naming`
    /// (three counters per histogram: `_bucket` with `le`, `_sum`, `_count`).
    pub fn define(config: &ConfigHandle, naming: Naming) -> Result<StatIds, String> {
        let mut ids = StatIds::default();
        for family in Family::ALL.iter().filter(|f| f.published(naming)) {
            let def = family.def();
            let labels: Vec<&'static str> = def.labels.iter().map(|l| l.name()).collect();
            match def.kind {
                MetricKind::Histogram => {
                    let mut with_le = labels.clone();
                    with_le.push("le");
                    ids.add(
                        config,
                        MetricKind::Counter,
                        format!("{}_bucket", def.name),
                        with_le,
                    )?;
                    for suffix in ["_sum", "_count"] {
                        let name = format!("{}{suffix}", def.name);
                        ids.add(config, MetricKind::Counter, name, labels.clone())?;
                    }
                }
                kind => ids.add(config, kind, def.name.to_string(), labels)?,
            }
        }
        ids.panics = Some(
            config
                .define_counter(PANICS, &[])
                .map_err(|e| format!("cannot define stat {PANICS}: {e}"))?,
        );
        Ok(ids)
    }

    fn add(
        &mut self,
        config: &ConfigHandle,
        kind: MetricKind,
        name: String,
        labels: Vec<&'static str>,
    ) -> Result<(), String> {
        let id = match kind {
            MetricKind::Gauge => config.define_gauge(&name, &labels),
            _ => config.define_counter(&name, &labels),
        }
        .map_err(|e| format!("cannot define stat {name}: {e}"))?;
        self.by_name.insert(name, Stat { kind, id, labels });
        Ok(())
    }
}

/// One series: its stat and label values, in the stat's label order.
#[derive(Debug)]
struct Series {
    kind: MetricKind,
    id: usize,
    values: Vec<String>,
}

/// [`MetricsHost`] for one worker: series ids index `series`; updates go
/// through the stream whose callback is publishing ([`ModuleStats::publish_with`]).
#[derive(Debug)]
pub struct ModuleStats {
    stats: std::sync::Arc<StatIds>,
    series: Vec<Series>,
    stream: Option<StatsHandle>,
}

impl ModuleStats {
    pub fn new(stats: std::sync::Arc<StatIds>) -> Self {
        Self {
            stats,
            series: Vec::new(),
            stream: None,
        }
    }

    /// Envoy takes stat updates only through a live stream: the worker
    /// lends the current hook's while it publishes, then takes it back.
    pub fn set_stream(&mut self, stream: Option<StatsHandle>) {
        self.stream = stream;
    }

    fn update(
        &self,
        id: u32,
        op: impl FnOnce(StatsHandle, &Series, &[&str]) -> Result<(), MetricsError>,
    ) -> Result<(), HostError> {
        let stream = self.stream.ok_or(HostError(NO_STREAM))?;
        let series = self.series.get(id as usize).ok_or(HostError(NOT_DEFINED))?;
        let mut values: [&str; 16] = [""; 16];
        let n = series.values.len().min(values.len());
        for (slot, v) in values.iter_mut().zip(&series.values) {
            *slot = v.as_str();
        }
        op(stream, series, &values[..n]).map_err(|e| HostError(e.code()))
    }
}

impl MetricsHost for ModuleStats {
    fn define(&mut self, kind: MetricKind, name: &str) -> Result<u32, HostError> {
        let (metric, fields) = decode_stat_name(name).ok_or(HostError(BAD_LABELS))?;
        let stat = self
            .stats
            .by_name
            .get(metric)
            .ok_or(HostError(NOT_DEFINED))?;
        if stat.kind != kind || stat.labels.len() != fields.len() {
            return Err(HostError(BAD_LABELS));
        }
        let mut values = Vec::with_capacity(fields.len());
        for (want, (key, value)) in stat.labels.iter().zip(fields) {
            if *want != key {
                return Err(HostError(BAD_LABELS));
            }
            values.push(value.to_string());
        }
        let id = u32::try_from(self.series.len()).map_err(|_| HostError(REFUSED))?;
        self.series.push(Series {
            kind,
            id: stat.id,
            values,
        });
        // Envoy makes a labelled stat on its first update; a histogram's
        // empty buckets must exist too (histogram_quantile interpolates
        // within a bucket from the bound below it), so every series is
        // made now, at zero, as the Wasm host's define does.
        self.update(id, |stream, s, labels| match s.kind {
            MetricKind::Gauge => stream.increment_gauge(s.id, labels, 0),
            _ => stream.increment_counter(s.id, labels, 0),
        })?;
        Ok(id)
    }

    fn increment(&mut self, id: u32, delta: i64) -> Result<(), HostError> {
        self.update(id, |stream, s, labels| match (s.kind, delta) {
            (_, 0) => Ok(()),
            (MetricKind::Gauge, d) if d < 0 => {
                stream.decrement_gauge(s.id, labels, d.unsigned_abs())
            }
            (MetricKind::Gauge, d) => stream.increment_gauge(s.id, labels, d.unsigned_abs()),
            (_, d) if d < 0 => Err(MetricsError::Refused),
            (_, d) => stream.increment_counter(s.id, labels, d.unsigned_abs()),
        })
    }

    fn record(&mut self, id: u32, value: u64) -> Result<(), HostError> {
        self.update(id, |stream, s, labels| match s.kind {
            MetricKind::Gauge => stream.set_gauge(s.id, labels, value),
            _ => Err(MetricsError::Refused),
        })
    }
}
