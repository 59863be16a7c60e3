//! Exposition of a [`Snapshot`] through `prometheus-client`'s `Collector`
//! trait: every scrape encodes the last snapshot and touches no GPU.
//!
//! Naming follows Prometheus conventions: `llm_gpu_` prefix, base units
//! (`_bytes`, `_watts`, `_hertz`, `_celsius`, `_joules`), `_ratio` for 0–1,
//! counters end in `_total`. Identity that never changes lives only on
//! `llm_gpu_info` / `llm_gpu_mig_info` to keep series small.

//!
//! The families are one table ([`families`]), each written by the encoding
//! helper shared with the runtime collector.

mod dcgm;
mod families;
#[cfg(test)]
mod tests;

use std::sync::{Arc, RwLock};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use tokentap_runtime_metrics::exposition::encode_family;

use crate::snapshot::Snapshot;
use families::{Rendered, FAMILIES};

/// The snapshot being served; swapped whole after each pass.
#[derive(Debug)]
pub struct SnapshotCell(RwLock<Arc<Snapshot>>);

impl SnapshotCell {
    pub fn new(initial: Snapshot) -> Self {
        Self(RwLock::new(Arc::new(initial)))
    }

    pub fn load(&self) -> Arc<Snapshot> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn store(&self, snapshot: Snapshot) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(snapshot);
    }
}

/// Exposition options.
#[derive(Clone, Debug, Default)]
pub struct ExpositionOptions {
    /// Also publish dcgm-exporter names (`DCGM_FI_DEV_*`) for existing dashboards.
    pub dcgm_compat: bool,
}

/// Encodes the current snapshot on each scrape.
#[derive(Debug)]
pub struct GpuCollector {
    cell: Arc<SnapshotCell>,
    options: ExpositionOptions,
}

impl GpuCollector {
    pub fn new(cell: Arc<SnapshotCell>, options: ExpositionOptions) -> Self {
        Self { cell, options }
    }
}

impl Collector for GpuCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let snapshot = self.cell.load();
        encode_snapshot(&snapshot, &self.options, &mut encoder)
    }
}

/// Writes every family of the table for `snap`, then the dcgm-compatible
/// names when asked.
pub fn encode_snapshot(
    snap: &Snapshot,
    options: &ExpositionOptions,
    enc: &mut DescriptorEncoder<'_>,
) -> Result<(), std::fmt::Error> {
    let rendered = Rendered::new(snap);
    for family in FAMILIES {
        let rows = family.rows(snap, &rendered);
        encode_family(enc, family.name, family.help, family.kind, &rows)?;
    }
    if options.dcgm_compat {
        dcgm::encode(snap, &rendered, enc)?;
    }
    Ok(())
}
