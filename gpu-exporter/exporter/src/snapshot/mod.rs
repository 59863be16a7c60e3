//! Joins one pass of GPU readings with the kubelet's allocations, the node's
//! pods and the process table into the [`Snapshot`] that scrapes serve.
//!
//! The builder also keeps what must outlive a pass: GPUs seen before (a GPU
//! that disappears is reported `up 0`, not dropped), XID and allocation
//! failure counters, and the exporter's own error counters.

mod builder;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokentap_workload::{WorkloadLabelPolicy, WorkloadLabels};

use crate::cgroup::ProcessResolver;
use crate::gpu::{DeviceReading, GpuReading, MigReading, NvmlStatus};
use crate::health::{Collector, CollectorStatus, ErrorKind};
use crate::kube::{PodIndex, WatchReport};
use crate::podresources::{Allocations, ResourceFilter};

pub use builder::SnapshotBuilder;

/// Who a series is attributed to. Unattributed series have empty
/// `namespace`/`pod`/`container` and `unknown` workload labels.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Owner {
    pub namespace: String,
    pub pod: String,
    pub container: String,
    pub workload: WorkloadLabels,
}

impl Owner {
    pub fn unattributed(policy: &WorkloadLabelPolicy) -> Self {
        Self {
            namespace: String::new(),
            pod: String::new(),
            container: String::new(),
            workload: policy.unattributed(),
        }
    }

    pub fn is_attributed(&self) -> bool {
        !self.pod.is_empty()
    }
}

/// One GPU with everyone it is attributed to (several with time-slicing;
/// exactly one unattributed owner when no pod holds it).
#[derive(Clone, Debug, PartialEq)]
pub struct GpuEntry {
    pub device: DeviceReading,
    pub up: bool,
    pub owners: Vec<Owner>,
    pub mig: Vec<MigEntry>,
    /// Most recent XID value seen on this GPU (for dcgm-compatible output).
    pub last_xid: Option<u64>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct MigEntry {
    pub reading: MigReading,
    pub owners: Vec<Owner>,
}

/// GPU memory used by the compute processes of one container on one GPU.
#[derive(Clone, Debug, PartialEq)]
pub struct ContainerMemory {
    pub gpu_index: u32,
    pub gpu_uuid: String,
    pub owner: Owner,
    pub used_bytes: u64,
    pub processes: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct XidCount {
    pub gpu_index: u32,
    pub gpu_uuid: String,
    /// XID number, `unknown` (driver said 999) or `other` (out of range).
    pub xid: String,
    pub owner: Owner,
    pub count: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct AllocationFailureCount {
    pub resource: String,
    pub reason: &'static str,
    pub workload: WorkloadLabels,
    pub count: u64,
}

/// Everything a scrape serves; immutable once built.
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    pub node: String,
    pub workload_label_names: Vec<String>,
    pub nvml: NvmlStatus,
    pub gpus: Vec<GpuEntry>,
    pub container_memory: Vec<ContainerMemory>,
    pub xid: Vec<XidCount>,
    pub allocation_failures: Vec<AllocationFailureCount>,
    pub devices_allocatable: BTreeMap<String, u64>,
    pub devices_allocated: BTreeMap<String, u64>,
    pub collectors: BTreeMap<Collector, CollectorStatus>,
    pub errors: BTreeMap<(Collector, ErrorKind), u64>,
    pub collections_total: u64,
    pub enumerations_total: u64,
    pub last_collection_unix_seconds: f64,
    /// Pods on this node known from the API; `None` without a pod watch.
    pub pods_on_node: Option<usize>,
    /// The pods served are the last known ones, not confirmed by the API
    /// since the watch failed or fell silent.
    pub pods_stale: bool,
}

impl Snapshot {
    /// What is served before the first pass completes.
    pub fn empty(node: &str, policy: &WorkloadLabelPolicy) -> Self {
        Self {
            node: node.to_string(),
            workload_label_names: policy.label_names().map(str::to_string).collect(),
            nvml: NvmlStatus::Down {
                kind: ErrorKind::Unknown,
                message: "no collection yet".into(),
            },
            gpus: Vec::new(),
            container_memory: Vec::new(),
            xid: Vec::new(),
            allocation_failures: Vec::new(),
            devices_allocatable: BTreeMap::new(),
            devices_allocated: BTreeMap::new(),
            collectors: BTreeMap::new(),
            errors: BTreeMap::new(),
            collections_total: 0,
            enumerations_total: 0,
            last_collection_unix_seconds: 0.0,
            pods_on_node: None,
            pods_stale: false,
        }
    }
}

/// Inputs of one pass.
pub struct PassInput<'a> {
    pub gpu: GpuReading,
    pub gpu_duration: Duration,
    /// `None` when the kubelet socket is not configured.
    pub allocations: Option<Result<Allocations, ErrorKind>>,
    pub allocations_duration: Duration,
    /// Refreshed now and then; `None` keeps the previous counts.
    pub allocatable: Option<Result<BTreeMap<String, u64>, ErrorKind>>,
    /// `None` when there is no pod watch.
    pub pods: Option<(Arc<PodIndex>, WatchReport)>,
    /// `None` when per-process attribution is off.
    pub resolver: Option<&'a dyn ProcessResolver>,
    pub now: Instant,
    pub wall: SystemTime,
}

/// Whether a failed pod was refused a GPU at admission, and which resource.
///
/// The kubelet fails a pod at admission with `status.reason`
/// `OutOf<resource>` when the node lacks the extended resource, and with
/// `UnexpectedAdmissionError` when the device plugin's Allocate fails (its
/// message names the resource). Both are GPU allocation failures when the
/// resource is a GPU resource.
pub fn classify_admission_failure(
    pod: &crate::kube::NodePod,
    filter: &ResourceFilter,
) -> Option<(&'static str, String)> {
    let reason = pod.reason.as_deref()?;
    if let Some(resource) = reason.strip_prefix("OutOf") {
        return filter
            .matches(resource)
            .then(|| ("insufficient_resource", filter.label(resource).to_string()));
    }
    if reason == "UnexpectedAdmissionError" {
        let message = pod.message.as_deref().unwrap_or("");
        let resource = message
            .split(|c: char| c.is_whitespace() || c == ',' || c == ';' || c == '"')
            .map(|w| w.trim_end_matches(['.', ':', ')']))
            .find(|w| filter.matches(w))?;
        return Some(("device_plugin_error", filter.label(resource).to_string()));
    }
    None
}
