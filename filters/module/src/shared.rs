//! What all workers share for one filter configuration: the parsed
//! configuration, the stat ids Envoy gave at load, label admission and the
//! span export hand-off. Built on the main thread; read-only afterwards
//! except for admission (rare: a label value seen for the first time) and
//! exports (once per span batch), which lock.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, Mutex};

use tokentap_core::config::{Config, TracingConfig};
use tokentap_core::host::{Log, LogLevel};
use tokentap_core::labels::{AdmissionControl, Dimension, LocalAdmission};
use tokentap_core::lifecycle::Gateway;
use tokentap_core::trace::{Resource, ResourceBuilder};
use tokentap_core::tracer::Tracer;

use crate::abi::{self, ConfigHandle, Level};
use crate::exports::Exports;
use crate::stats::{ModuleStats, StatIds};

/// The filters this library implements, by Envoy's `filter_name`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FilterKind {
    /// tokentap itself.
    Tokentap,
    /// A filter that does nothing: the floor any dynamic module pays,
    /// measured by the benchmarks.
    Empty,
}

impl FilterKind {
    pub fn from_name(name: &[u8]) -> Option<FilterKind> {
        match name {
            b"tokentap" | b"" => Some(FilterKind::Tokentap),
            b"empty" => Some(FilterKind::Empty),
            _ => None,
        }
    }
}

/// One filter configuration, shared by every worker.
pub struct Shared {
    pub kind: FilterKind,
    config: Config,
    stats: Arc<StatIds>,
    admission: Arc<Mutex<LocalAdmission>>,
    pub exports: Exports,
    resource: Option<Resource>,
}

impl Shared {
    /// Parses and validates the configuration and defines every stat;
    /// the error names the field at fault.
    pub fn configure(
        kind: FilterKind,
        bytes: &[u8],
        handle: &ConfigHandle,
    ) -> Result<Shared, String> {
        let config = match kind {
            FilterKind::Tokentap => Config::parse(bytes).map_err(|e| e.to_string())?,
            FilterKind::Empty => Config::parse(b"{}").map_err(|e| e.to_string())?,
        };
        if let tokentap_core::config::TenantSource::Metadata(path) = &config.tenant_source {
            // metadata.filter_metadata.<namespace>.<key>: the module reads one key.
            if path.len() != 4 {
                return Err("plugin configuration field `tenant.metadata.path`: the dynamic module reads one key of the namespace (the Wasm filter reads nested keys)".into());
            }
        }
        let stats = match kind {
            FilterKind::Tokentap => StatIds::define(handle, config.metrics.naming)?,
            FilterKind::Empty => StatIds::default(),
        };
        let resource = config.tracing.as_ref().map(resource_for);
        if let Some(t) = &config.tracing {
            // Refuse a bad tracing section now, not on the first request.
            Tracer::new(t, 1, Resource::default()).map_err(|e| e.to_string())?;
        }
        Ok(Shared {
            kind,
            exports: Exports::new(handle, config.tracing.is_some()),
            config,
            stats: Arc::new(stats),
            admission: Arc::new(Mutex::new(LocalAdmission::default())),
            resource,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn stats(&self) -> &StatIds {
        &self.stats
    }

    /// A worker's gateway over this configuration.
    pub fn gateway(&self) -> Option<Gateway<ModuleStats>> {
        let tracer = match (&self.config.tracing, &self.resource) {
            (Some(t), Some(r)) => Some(Tracer::new(t, random_seed(), r.clone()).ok()?),
            _ => None,
        };
        Some(Gateway::new(
            self.config.clone(),
            Box::new(ProcessAdmission(Arc::clone(&self.admission))),
            ModuleStats::new(Arc::clone(&self.stats)),
            tracer,
            Box::new(ModuleLog),
        ))
    }
}

/// Span/trace id seed: the standard library's per-process random keys,
/// mixed with the clock and the thread, so each worker's ids differ.
fn random_seed() -> u64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u64(abi::now_nanos());
    h.write(format!("{:?}", std::thread::current().id()).as_bytes());
    h.finish()
}

/// Resource attributes: the pod's environment (the Downward API sets
/// `POD_NAME` and friends), then the configuration's own entries.
fn resource_for(cfg: &TracingConfig) -> Resource {
    let env: Vec<(String, String)> = std::env::vars().collect();
    ResourceBuilder::new()
        .service_name(&cfg.service_name)
        .pairs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .pairs(cfg.resource.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .build()
}

/// Label admission shared by all workers: the first `cap` values seen in
/// the process win, whichever worker saw them. Called only for a value a
/// worker has not resolved before.
struct ProcessAdmission(Arc<Mutex<LocalAdmission>>);

impl AdmissionControl for ProcessAdmission {
    fn admit(&mut self, dim: Dimension, value: &str, cap: u32) -> bool {
        match self.0.lock() {
            Ok(mut a) => a.admit(dim, value, cap),
            // A panic while holding the lock: admit nothing new rather
            // than trust state it may have left half-written.
            Err(_) => false,
        }
    }
}

/// [`Log`] over Envoy's log.
struct ModuleLog;

impl Log for ModuleLog {
    fn log(&self, level: LogLevel, message: &str) {
        let level = match level {
            LogLevel::Info => Level::Info,
            LogLevel::Warn => Level::Warn,
            LogLevel::Critical => Level::Critical,
        };
        abi::log(level, message);
    }
}

#[cfg(test)]
mod tests {
    use super::FilterKind;

    #[test]
    fn filter_names_select_the_filter_or_refuse() {
        assert_eq!(
            FilterKind::from_name(b"tokentap"),
            Some(FilterKind::Tokentap)
        );
        assert_eq!(FilterKind::from_name(b""), Some(FilterKind::Tokentap));
        assert_eq!(FilterKind::from_name(b"empty"), Some(FilterKind::Empty));
        assert_eq!(FilterKind::from_name(b"Tokentap"), None);
        assert_eq!(FilterKind::from_name(b"tokentap "), None);
    }
}
