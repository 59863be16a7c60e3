//! The scenario a fake NVML library plays back: which GPUs exist, what each
//! reading returns, and how that changes while the exporter runs.
//!
//! A scenario is a JSON file named by `FAKE_NVML_SCENARIO`. It changes over
//! time in two ways, both deterministic for tests:
//! - `timeline`: steps applied once `after_s` seconds have passed since the
//!   library was initialised, each merging fields into one GPU;
//! - the file itself: it is re-read whenever its size, inode or mtime change
//!   (write a new file and rename it over the old one).

use std::collections::BTreeSet;

use serde::Deserialize;
use serde_json::Value;

const GIB: u64 = 1 << 30;

/// The whole machine as the fake presents it.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Scenario {
    pub driver_version: String,
    pub nvml_version: String,
    pub cuda_driver_version: i32,
    /// When set, `nvmlInit*` fails with this error (see [`ErrorName`]).
    pub init_error: Option<ErrorName>,
    pub gpus: Vec<GpuSpec>,
    pub timeline: Vec<TimelineStep>,
}

impl Default for Scenario {
    fn default() -> Self {
        Self {
            driver_version: "550.54.15".into(),
            nvml_version: "12.550.54.15".into(),
            cuda_driver_version: 12040,
            init_error: None,
            gpus: Vec::new(),
            timeline: Vec::new(),
        }
    }
}

/// One physical GPU. Every reading is a plain value so that tests can assert
/// the exporter publishes exactly it (after unit conversion).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct GpuSpec {
    pub uuid: String,
    pub name: String,
    pub pci_bus_id: String,
    pub serial: String,
    pub minor_number: Option<u32>,
    pub utilization_gpu_percent: u32,
    pub utilization_memory_percent: u32,
    pub memory_total_bytes: u64,
    pub memory_used_bytes: u64,
    pub memory_reserved_bytes: u64,
    pub temperature_celsius: u32,
    pub power_usage_milliwatts: u32,
    pub power_limit_milliwatts: u32,
    pub energy_millijoules: u64,
    /// The energy counter grows by this much per second since init.
    pub energy_millijoules_per_second: u64,
    pub sm_clock_mhz: u32,
    pub memory_clock_mhz: u32,
    /// NVML clocks-event (throttle) reason bitmask.
    pub throttle_reasons: u64,
    pub ecc_corrected_volatile: u64,
    pub ecc_uncorrected_volatile: u64,
    pub ecc_corrected_aggregate: u64,
    pub ecc_uncorrected_aggregate: u64,
    pub pcie_replays: u32,
    pub processes: Vec<ProcessSpec>,
    /// MIG instances; a non-empty list means MIG mode is enabled.
    pub mig: Vec<MigSpec>,
    /// The GPU has fallen off the bus: every call on it returns GPU_IS_LOST.
    pub lost: bool,
    /// The GPU is gone from enumeration altogether.
    pub removed: bool,
    /// Readings that answer NOT_SUPPORTED (see [`Feature`]).
    pub not_supported: BTreeSet<Feature>,
    /// XID errors, delivered once each, in order, to every event set that
    /// registered this GPU for XID events.
    pub xid_events: Vec<XidSpec>,
}

impl Default for GpuSpec {
    fn default() -> Self {
        Self {
            uuid: String::new(),
            name: "NVIDIA H100 80GB HBM3".into(),
            pci_bus_id: String::new(),
            serial: String::new(),
            minor_number: None,
            utilization_gpu_percent: 0,
            utilization_memory_percent: 0,
            memory_total_bytes: 80 * GIB,
            memory_used_bytes: 0,
            memory_reserved_bytes: GIB / 2,
            temperature_celsius: 40,
            power_usage_milliwatts: 70_000,
            power_limit_milliwatts: 700_000,
            energy_millijoules: 0,
            energy_millijoules_per_second: 0,
            sm_clock_mhz: 1980,
            memory_clock_mhz: 2619,
            throttle_reasons: 0,
            ecc_corrected_volatile: 0,
            ecc_uncorrected_volatile: 0,
            ecc_corrected_aggregate: 0,
            ecc_uncorrected_aggregate: 0,
            pcie_replays: 0,
            processes: Vec::new(),
            mig: Vec::new(),
            lost: false,
            removed: false,
            not_supported: BTreeSet::new(),
            xid_events: Vec::new(),
        }
    }
}

impl GpuSpec {
    pub fn supports(&self, feature: Feature) -> bool {
        !self.not_supported.contains(&feature)
    }

    /// Free memory as NVML reports it: what is neither used nor reserved.
    pub fn memory_free_bytes(&self) -> u64 {
        self.memory_total_bytes
            .saturating_sub(self.memory_used_bytes)
            .saturating_sub(self.memory_reserved_bytes)
    }

    pub fn energy_at(&self, elapsed_s: f64) -> u64 {
        let grown = (self.energy_millijoules_per_second as f64 * elapsed_s.max(0.0)) as u64;
        self.energy_millijoules.saturating_add(grown)
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProcessSpec {
    pub pid: u32,
    /// Absent means NVML_VALUE_NOT_AVAILABLE.
    #[serde(default)]
    pub used_memory_bytes: Option<u64>,
    #[serde(default)]
    pub gpu_instance_id: Option<u32>,
    #[serde(default)]
    pub compute_instance_id: Option<u32>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MigSpec {
    pub uuid: String,
    /// Device name, e.g. `NVIDIA A100-SXM4-40GB MIG 1g.5gb`.
    pub name: String,
    pub gpu_instance_id: u32,
    pub compute_instance_id: u32,
    pub memory_total_bytes: u64,
    pub memory_used_bytes: u64,
    pub memory_reserved_bytes: u64,
}

impl Default for MigSpec {
    fn default() -> Self {
        Self {
            uuid: String::new(),
            name: "NVIDIA A100-SXM4-40GB MIG 1g.5gb".into(),
            gpu_instance_id: 0,
            compute_instance_id: 0,
            memory_total_bytes: 5 * GIB,
            memory_used_bytes: 0,
            memory_reserved_bytes: 0,
        }
    }
}

impl MigSpec {
    pub fn memory_free_bytes(&self) -> u64 {
        self.memory_total_bytes
            .saturating_sub(self.memory_used_bytes)
            .saturating_sub(self.memory_reserved_bytes)
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct XidSpec {
    pub xid: u64,
    /// Not delivered before this many seconds since init.
    #[serde(default)]
    pub after_s: f64,
}

/// Merge `set` into `gpus[gpu]` once `after_s` seconds have passed.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TimelineStep {
    pub after_s: f64,
    pub gpu: usize,
    pub set: serde_json::Map<String, Value>,
}

/// A reading that a GPU can decline with NOT_SUPPORTED.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Feature {
    Utilization,
    Memory,
    Temperature,
    PowerUsage,
    PowerLimit,
    Energy,
    Clocks,
    Throttle,
    Ecc,
    PcieReplay,
    Processes,
    Mig,
    Events,
    Serial,
}

/// NVML errors a scenario can ask `nvmlInit` to return.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ErrorName {
    DriverNotLoaded,
    NoPermission,
    Unknown,
}

#[derive(Debug)]
pub enum ScenarioError {
    Json(serde_json::Error),
    Shape(&'static str),
}

impl std::fmt::Display for ScenarioError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Json(e) => write!(f, "invalid scenario JSON: {e}"),
            Self::Shape(what) => write!(f, "invalid scenario: {what}"),
        }
    }
}

/// Parses the raw scenario and applies the timeline steps due at `elapsed_s`.
/// Returns the resolved scenario and how many steps were applied, so callers
/// can tell when the next step falls due.
pub fn resolve(raw: &Value, elapsed_s: f64) -> Result<(Scenario, usize), ScenarioError> {
    let mut doc = raw.clone();
    let steps: Vec<TimelineStep> = match raw.get("timeline") {
        Some(t) => serde_json::from_value(t.clone()).map_err(ScenarioError::Json)?,
        None => Vec::new(),
    };
    let mut applied = 0;
    for step in steps.iter().filter(|s| s.after_s <= elapsed_s) {
        let gpu = doc
            .get_mut("gpus")
            .and_then(Value::as_array_mut)
            .and_then(|gpus| gpus.get_mut(step.gpu))
            .and_then(Value::as_object_mut)
            .ok_or(ScenarioError::Shape(
                "timeline step names a GPU that does not exist",
            ))?;
        for (key, value) in &step.set {
            gpu.insert(key.clone(), value.clone());
        }
        applied += 1;
    }
    let mut scenario: Scenario = serde_json::from_value(doc).map_err(ScenarioError::Json)?;
    fill_identities(&mut scenario);
    Ok((scenario, applied))
}

/// Number of timeline steps due at `elapsed_s`, without resolving.
pub fn due_steps(raw: &Value, elapsed_s: f64) -> usize {
    raw.get("timeline")
        .and_then(Value::as_array)
        .map(|steps| {
            steps
                .iter()
                .filter(|s| {
                    s.get("after_s")
                        .and_then(Value::as_f64)
                        .is_some_and(|at| at <= elapsed_s)
                })
                .count()
        })
        .unwrap_or(0)
}

/// The scenario used when no file is given: `count` idle GPUs.
pub fn synthetic(count: usize) -> Scenario {
    let mut scenario = Scenario {
        gpus: vec![GpuSpec::default(); count],
        ..Scenario::default()
    };
    fill_identities(&mut scenario);
    scenario
}

/// Gives GPUs and MIG instances without explicit identities stable ones
/// derived from their position.
fn fill_identities(scenario: &mut Scenario) {
    for (i, gpu) in scenario.gpus.iter_mut().enumerate() {
        if gpu.uuid.is_empty() {
            gpu.uuid = format!("GPU-00000000-0000-4000-8000-{i:012x}");
        }
        if gpu.pci_bus_id.is_empty() {
            gpu.pci_bus_id = format!("00000000:{:02X}:00.0", 0x10 + i);
        }
        if gpu.serial.is_empty() {
            gpu.serial = format!("FAKE{i:09}");
        }
        for (j, mig) in gpu.mig.iter_mut().enumerate() {
            if mig.uuid.is_empty() {
                mig.uuid = format!("MIG-00000000-0000-4000-8000-{i:06x}{j:06x}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn timeline_steps_apply_only_when_due() {
        let raw = json!({
            "gpus": [{"utilization_gpu_percent": 10}, {}],
            "timeline": [
                {"after_s": 1.0, "gpu": 1, "set": {"lost": true}},
                {"after_s": 5.0, "gpu": 0, "set": {"utilization_gpu_percent": 90}}
            ]
        });
        let (early, n) = resolve(&raw, 0.5).unwrap();
        assert_eq!(n, 0);
        assert!(!early.gpus[1].lost);
        let (mid, n) = resolve(&raw, 1.0).unwrap();
        assert_eq!(n, 1);
        assert!(mid.gpus[1].lost);
        assert_eq!(mid.gpus[0].utilization_gpu_percent, 10);
        let (late, n) = resolve(&raw, 6.0).unwrap();
        assert_eq!(n, 2);
        assert_eq!(late.gpus[0].utilization_gpu_percent, 90);
        assert_eq!(due_steps(&raw, 6.0), 2);
        assert_eq!(due_steps(&raw, 0.0), 0);
    }

    #[test]
    fn identities_are_filled_and_distinct() {
        let s = synthetic(3);
        let uuids: BTreeSet<_> = s.gpus.iter().map(|g| g.uuid.clone()).collect();
        assert_eq!(uuids.len(), 3);
        assert!(s.gpus.iter().all(|g| g.uuid.starts_with("GPU-")));
        assert_eq!(s.gpus[1].pci_bus_id, "00000000:11:00.0");
    }

    #[test]
    fn unknown_fields_and_bad_steps_are_rejected() {
        assert!(resolve(&json!({"gpus": [{"utilisation": 3}]}), 0.0).is_err());
        let bad_step = json!({"gpus": [], "timeline": [{"after_s": 0, "gpu": 4, "set": {}}]});
        assert!(resolve(&bad_step, 1.0).is_err());
    }

    #[test]
    fn free_memory_and_energy_growth() {
        let gpu = GpuSpec {
            memory_total_bytes: 100,
            memory_used_bytes: 30,
            memory_reserved_bytes: 5,
            energy_millijoules: 1000,
            energy_millijoules_per_second: 10,
            ..GpuSpec::default()
        };
        assert_eq!(gpu.memory_free_bytes(), 65);
        assert_eq!(gpu.energy_at(2.5), 1025);
    }
}
