//! Joins one pass of GPU readings with the kubelet's allocations, the node's
//! pods and the process table into the [`Snapshot`] that scrapes serve.
//!
//! The builder also keeps what must outlive a pass: GPUs seen before (a GPU
//! that disappears is reported `up 0`, not dropped), XID and allocation
//! failure counters, and the exporter's own error counters.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokentap_workload::{WorkloadLabelPolicy, WorkloadLabels};

use crate::cgroup::ProcessResolver;
use crate::gpu::{DeviceIdentity, DeviceReading, GpuReading, MigReading, NvmlStatus};
use crate::health::{Collector, CollectorStatus, ErrorKind};
use crate::kube::{PodIndex, WatchReport};
use crate::podresources::{legacy_mig_key, Allocations, ContainerRef, ResourceFilter};

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

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct XidKey {
    gpu_uuid: String,
    xid: String,
    owner: Owner,
}

#[derive(Clone, Debug)]
struct XidState {
    gpu_index: u32,
    count: u64,
    /// Last pass at which the owner pod was still on the node.
    owner_seen: Instant,
}

/// Most distinct allocation-failure series kept; more collapse into `other`.
const MAX_FAILURE_SERIES: usize = 500;

/// Builds snapshots; keeps the state that spans passes.
pub struct SnapshotBuilder {
    node: String,
    policy: WorkloadLabelPolicy,
    filter: ResourceFilter,
    retention: Duration,
    known: BTreeMap<String, DeviceIdentity>,
    xid: BTreeMap<XidKey, XidState>,
    last_xid: HashMap<String, u64>,
    failures: BTreeMap<(String, &'static str, WorkloadLabels), u64>,
    failed_pods_seen: HashSet<String>,
    errors: BTreeMap<(Collector, ErrorKind), u64>,
    collections: u64,
    enumerations: u64,
    allocatable: BTreeMap<String, u64>,
}

impl SnapshotBuilder {
    /// `retention`: how long counters of a pod that left the node are kept.
    pub fn new(
        node: impl Into<String>,
        policy: WorkloadLabelPolicy,
        filter: ResourceFilter,
        retention: Duration,
    ) -> Self {
        Self {
            node: node.into(),
            policy,
            filter,
            retention,
            known: BTreeMap::new(),
            xid: BTreeMap::new(),
            last_xid: HashMap::new(),
            failures: BTreeMap::new(),
            failed_pods_seen: HashSet::new(),
            errors: BTreeMap::new(),
            collections: 0,
            enumerations: 0,
            allocatable: BTreeMap::new(),
        }
    }

    pub fn policy(&self) -> &WorkloadLabelPolicy {
        &self.policy
    }

    fn count_error(&mut self, collector: Collector, kind: ErrorKind) {
        *self.errors.entry((collector, kind)).or_default() += 1;
    }

    fn owner_for(&self, container: &ContainerRef, pods: Option<&PodIndex>) -> Owner {
        let workload = pods
            .and_then(|p| p.by_name(&container.namespace, &container.pod))
            .map(|pod| self.policy.labels_for(&pod.info.labels))
            .unwrap_or_else(|| self.policy.unattributed());
        Owner {
            namespace: container.namespace.clone(),
            pod: container.pod.clone(),
            container: container.container.clone(),
            workload,
        }
    }

    fn owners_for(
        &self,
        key: &str,
        allocations: Option<&Allocations>,
        pods: Option<&PodIndex>,
    ) -> Vec<Owner> {
        let owners: Vec<Owner> = allocations
            .and_then(|a| a.by_device.get(key))
            .map(|refs| refs.iter().map(|c| self.owner_for(c, pods)).collect())
            .unwrap_or_default();
        if owners.is_empty() {
            vec![Owner::unattributed(&self.policy)]
        } else {
            owners
        }
    }

    /// Owner of a process, by its cgroup.
    fn process_owner(
        &self,
        pid: u32,
        resolver: &dyn ProcessResolver,
        pods: Option<&PodIndex>,
        failure: &mut Option<ErrorKind>,
    ) -> Owner {
        let found = match resolver.owner(pid) {
            Ok(found) => found,
            Err(kind) => {
                failure.get_or_insert(kind);
                None
            }
        };
        let Some(found) = found else {
            return Owner::unattributed(&self.policy);
        };
        match pods.and_then(|p| p.by_uid(&found.pod_uid)) {
            Some(pod) => Owner {
                namespace: pod.info.namespace.clone(),
                pod: pod.info.name.clone(),
                container: found
                    .container_id
                    .as_deref()
                    .and_then(|id| pod.container_by_id(id))
                    .unwrap_or_default()
                    .to_string(),
                workload: self.policy.labels_for(&pod.info.labels),
            },
            None => Owner::unattributed(&self.policy),
        }
    }

    fn count_allocation_failures(&mut self, pods: &PodIndex, synced: bool) {
        for pod in pods.iter() {
            if pod.info.phase != "Failed" || self.failed_pods_seen.contains(&pod.info.uid) {
                continue;
            }
            let Some((reason, resource)) = classify_admission_failure(pod, &self.filter) else {
                continue;
            };
            self.failed_pods_seen.insert(pod.info.uid.clone());
            let mut key = (resource, reason, self.policy.labels_for(&pod.info.labels));
            if !self.failures.contains_key(&key) && self.failures.len() >= MAX_FAILURE_SERIES {
                key = ("other".to_string(), reason, self.policy.unattributed());
            }
            *self.failures.entry(key).or_default() += 1;
            tracing::warn!(
                namespace = %pod.info.namespace, pod = %pod.info.name, reason,
                message = pod.message.as_deref().unwrap_or(""),
                "GPU allocation failure"
            );
        }
        if synced {
            self.failed_pods_seen
                .retain(|uid| pods.by_uid(uid).is_some());
        }
    }

    /// Builds the snapshot of one pass.
    pub fn build(&mut self, input: PassInput<'_>) -> Snapshot {
        let PassInput {
            gpu,
            gpu_duration,
            allocations,
            allocations_duration,
            allocatable,
            pods,
            resolver,
            now,
            wall,
        } = input;
        self.collections += 1;
        if gpu.enumerated {
            self.enumerations += 1;
        }
        let mut collectors = BTreeMap::new();

        // --- NVML and XID health
        let nvml_up = matches!(gpu.nvml, NvmlStatus::Up { .. });
        let count_failed = gpu
            .errors
            .iter()
            .any(|e| e.call == "nvmlDeviceGetCount" && !e.from_events);
        for e in &gpu.errors {
            let collector = if e.from_events {
                Collector::XidEvents
            } else {
                Collector::Nvml
            };
            self.count_error(collector, e.kind);
        }
        collectors.insert(
            Collector::Nvml,
            CollectorStatus {
                success: nvml_up && !count_failed,
                duration_seconds: gpu_duration.as_secs_f64(),
            },
        );
        if let Some(healthy) = gpu.xid_watch_healthy {
            collectors.insert(
                Collector::XidEvents,
                CollectorStatus {
                    success: healthy,
                    duration_seconds: 0.0,
                },
            );
        }

        // --- allocations
        let allocations = match allocations {
            None => None,
            Some(Ok(a)) => {
                collectors.insert(
                    Collector::PodResources,
                    CollectorStatus {
                        success: true,
                        duration_seconds: allocations_duration.as_secs_f64(),
                    },
                );
                Some(a)
            }
            Some(Err(kind)) => {
                self.count_error(Collector::PodResources, kind);
                collectors.insert(
                    Collector::PodResources,
                    CollectorStatus {
                        success: false,
                        duration_seconds: allocations_duration.as_secs_f64(),
                    },
                );
                None
            }
        };
        match allocatable {
            Some(Ok(counts)) => self.allocatable = counts,
            Some(Err(kind)) => self.count_error(Collector::PodResources, kind),
            None => {}
        }

        // --- pods
        let mut pods_stale = false;
        let (pod_index, synced) = match pods {
            Some((index, report)) => {
                pods_stale = report.stale();
                for kind in &report.errors {
                    self.count_error(Collector::KubePods, *kind);
                }
                collectors.insert(
                    Collector::KubePods,
                    CollectorStatus {
                        success: report.healthy && report.synced,
                        duration_seconds: 0.0,
                    },
                );
                (Some(index), report.synced)
            }
            None => (None, false),
        };
        let pods_ref = pod_index.as_deref();

        // --- devices: readings plus the ones seen before that vanished
        let mut devices: BTreeMap<String, DeviceReading> = BTreeMap::new();
        for reading in gpu.devices {
            self.known
                .insert(reading.identity.uuid.clone(), reading.identity.clone());
            devices.insert(reading.identity.uuid.clone(), reading);
        }
        if nvml_up {
            for (uuid, identity) in &self.known {
                devices
                    .entry(uuid.clone())
                    .or_insert_with(|| DeviceReading::lost(identity.clone()));
            }
        }

        // --- XID events
        for event in &gpu.xid_events {
            if let Some(xid) = event.xid {
                self.last_xid.insert(event.gpu_uuid.clone(), xid);
            }
            let xid_label = match event.xid {
                Some(v) if v <= 999 => v.to_string(),
                Some(_) => "other".to_string(),
                None => "unknown".to_string(),
            };
            let gpu_index = self
                .known
                .get(&event.gpu_uuid)
                .map(|i| i.index)
                .unwrap_or(u32::MAX);
            let mut owners = self.owners_for(&event.gpu_uuid, allocations.as_ref(), pods_ref);
            if let Some(device) = devices.get(&event.gpu_uuid) {
                if !owners[0].is_attributed() && !device.mig.is_empty() {
                    // A MIG GPU: the XID concerns every instance's owner.
                    let mig_owners: Vec<Owner> = device
                        .mig
                        .iter()
                        .flat_map(|m| self.owners_for(&m.uuid, allocations.as_ref(), pods_ref))
                        .filter(Owner::is_attributed)
                        .collect();
                    if !mig_owners.is_empty() {
                        owners = mig_owners;
                    }
                }
            }
            for owner in owners {
                let state = self
                    .xid
                    .entry(XidKey {
                        gpu_uuid: event.gpu_uuid.clone(),
                        xid: xid_label.clone(),
                        owner,
                    })
                    .or_insert(XidState {
                        gpu_index,
                        count: 0,
                        owner_seen: now,
                    });
                state.count += 1;
                state.owner_seen = now;
            }
        }
        // Counters of pods that left the node are kept for `retention`.
        let retention = self.retention;
        for (key, state) in self.xid.iter_mut() {
            let alive = !key.owner.is_attributed()
                || !synced
                || pods_ref
                    .is_some_and(|p| p.by_name(&key.owner.namespace, &key.owner.pod).is_some());
            if alive {
                state.owner_seen = now;
            }
        }
        self.xid
            .retain(|_, state| now.duration_since(state.owner_seen) <= retention);

        // --- GPU entries, process memory
        let mut resolver_failure = None;
        let mut memory: BTreeMap<(u32, String, Owner), (u64, u64)> = BTreeMap::new();
        let mut gpus = Vec::with_capacity(devices.len());
        for (uuid, device) in devices {
            let owners = self.owners_for(&uuid, allocations.as_ref(), pods_ref);
            let mig = device
                .mig
                .iter()
                .map(|m| {
                    let mut owners = self.owners_for(&m.uuid, allocations.as_ref(), pods_ref);
                    if let (false, Some(gi)) = (owners[0].is_attributed(), m.gpu_instance_id) {
                        owners = self.owners_for(
                            &legacy_mig_key(&uuid, gi),
                            allocations.as_ref(),
                            pods_ref,
                        );
                    }
                    MigEntry {
                        reading: m.clone(),
                        owners,
                    }
                })
                .collect();
            if let Some(resolver) = resolver {
                for process in &device.processes {
                    let owner =
                        self.process_owner(process.pid, resolver, pods_ref, &mut resolver_failure);
                    let slot = memory
                        .entry((device.identity.index, uuid.clone(), owner))
                        .or_default();
                    slot.0 += process.used_memory_bytes.unwrap_or(0);
                    slot.1 += 1;
                }
            }
            gpus.push(GpuEntry {
                up: !device.lost,
                last_xid: self.last_xid.get(&uuid).copied(),
                device,
                owners,
                mig,
            });
        }
        gpus.sort_by(|a, b| {
            (a.device.identity.index, &a.device.identity.uuid)
                .cmp(&(b.device.identity.index, &b.device.identity.uuid))
        });
        if resolver.is_some() {
            if let Some(kind) = resolver_failure {
                self.count_error(Collector::ProcessCgroups, kind);
            }
            collectors.insert(
                Collector::ProcessCgroups,
                CollectorStatus {
                    success: resolver_failure.is_none(),
                    duration_seconds: 0.0,
                },
            );
        }

        // --- allocation failures
        if let Some(index) = pods_ref {
            self.count_allocation_failures(index, synced);
        }

        Snapshot {
            node: self.node.clone(),
            workload_label_names: self.policy.label_names().map(str::to_string).collect(),
            nvml: gpu.nvml,
            gpus,
            container_memory: memory
                .into_iter()
                .map(
                    |((gpu_index, gpu_uuid, owner), (used_bytes, processes))| ContainerMemory {
                        gpu_index,
                        gpu_uuid,
                        owner,
                        used_bytes,
                        processes,
                    },
                )
                .collect(),
            xid: self
                .xid
                .iter()
                .map(|(key, state)| XidCount {
                    gpu_index: state.gpu_index,
                    gpu_uuid: key.gpu_uuid.clone(),
                    xid: key.xid.clone(),
                    owner: key.owner.clone(),
                    count: state.count,
                })
                .collect(),
            allocation_failures: self
                .failures
                .iter()
                .map(
                    |((resource, reason, workload), count)| AllocationFailureCount {
                        resource: resource.clone(),
                        reason,
                        workload: workload.clone(),
                        count: *count,
                    },
                )
                .collect(),
            devices_allocatable: self.allocatable.clone(),
            devices_allocated: allocations.map(|a| a.allocated).unwrap_or_default(),
            collectors,
            errors: self.errors.clone(),
            collections_total: self.collections,
            enumerations_total: self.enumerations,
            last_collection_unix_seconds: wall
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
            pods_on_node: pods_ref.map(PodIndex::len),
            pods_stale,
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroup::ProcessOwner;
    use crate::gpu::{CallError, MemoryReading, ProcessReading, XidEvent};
    use crate::kube::NodePod;
    use crate::podresources::proto;
    use tokentap_workload::PodInfo;

    const G0: &str = "GPU-00000000-0000-4000-8000-000000000000";
    const G1: &str = "GPU-00000000-0000-4000-8000-000000000001";
    const MIG0: &str = "MIG-00000000-0000-4000-8000-00000000aaaa";

    fn identity(index: u32, uuid: &str) -> DeviceIdentity {
        DeviceIdentity {
            index,
            uuid: uuid.into(),
            name: "NVIDIA H100 80GB HBM3".into(),
            ..DeviceIdentity::default()
        }
    }

    fn device(index: u32, uuid: &str) -> DeviceReading {
        DeviceReading {
            identity: identity(index, uuid),
            utilization_gpu_percent: Some(50),
            memory: Some(MemoryReading {
                total_bytes: 100,
                used_bytes: 40,
                free_bytes: 60,
                reserved_bytes: 0,
            }),
            ..DeviceReading::default()
        }
    }

    fn reading(devices: Vec<DeviceReading>) -> GpuReading {
        GpuReading {
            nvml: NvmlStatus::Up {
                driver_version: Some("550.54.15".into()),
                cuda_driver_version: Some(12040),
            },
            devices,
            xid_events: Vec::new(),
            xid_watch_healthy: Some(true),
            errors: Vec::new(),
            enumerated: false,
        }
    }

    fn pod(ns: &str, name: &str, uid: &str, model: &str) -> NodePod {
        let mut labels = BTreeMap::new();
        labels.insert("workload.k8sllm.io/model".to_string(), model.to_string());
        labels.insert(
            "workload.k8sllm.io/team".to_string(),
            "platform-ai".to_string(),
        );
        NodePod {
            info: PodInfo {
                namespace: ns.into(),
                name: name.into(),
                uid: uid.into(),
                phase: "Running".into(),
                labels,
                ..PodInfo::default()
            },
            container_ids: vec![("server".into(), "c0ffee000000".into())],
            reason: None,
            message: None,
        }
    }

    fn list(entries: &[(&str, &str, &str, &str, &str)]) -> Allocations {
        let response = proto::ListPodResourcesResponse {
            pod_resources: entries
                .iter()
                .map(|(ns, name, container, resource, id)| proto::PodResources {
                    name: name.to_string(),
                    namespace: ns.to_string(),
                    containers: vec![proto::ContainerResources {
                        name: container.to_string(),
                        devices: vec![proto::ContainerDevices {
                            resource_name: resource.to_string(),
                            device_ids: vec![id.to_string()],
                            topology: None,
                        }],
                        ..Default::default()
                    }],
                })
                .collect(),
        };
        Allocations::from_list(&response, &ResourceFilter::default())
    }

    fn builder() -> SnapshotBuilder {
        SnapshotBuilder::new(
            "node-1",
            WorkloadLabelPolicy::default(),
            ResourceFilter::default(),
            Duration::from_secs(600),
        )
    }

    fn input<'a>(
        gpu: GpuReading,
        allocations: Option<Allocations>,
        pods: Option<Vec<NodePod>>,
        now: Instant,
    ) -> PassInput<'a> {
        PassInput {
            gpu,
            gpu_duration: Duration::from_millis(3),
            allocations: allocations.map(Ok),
            allocations_duration: Duration::from_millis(1),
            allocatable: None,
            pods: pods.map(|p| {
                (
                    Arc::new(PodIndex::from_pods(p)),
                    WatchReport {
                        errors: vec![],
                        healthy: true,
                        synced: true,
                    },
                )
            }),
            resolver: None,
            now,
            wall: SystemTime::now(),
        }
    }

    #[test]
    fn gpus_get_pod_and_workload_labels_and_free_gpus_are_unattributed() {
        let mut b = builder();
        let snap = b.build(input(
            reading(vec![device(0, G0), device(1, G1)]),
            Some(list(&[("llm", "vllm-0", "server", "nvidia.com/gpu", G0)])),
            Some(vec![pod("llm", "vllm-0", "uid-0", "mistral-7b")]),
            Instant::now(),
        ));
        assert_eq!(snap.gpus.len(), 2);
        let g0 = &snap.gpus[0];
        assert_eq!(g0.owners.len(), 1);
        assert_eq!(g0.owners[0].pod, "vllm-0");
        assert_eq!(g0.owners[0].container, "server");
        assert_eq!(g0.owners[0].workload.get("model"), Some("mistral-7b"));
        assert_eq!(g0.owners[0].workload.get("route_class"), Some("unknown"));
        let g1 = &snap.gpus[1];
        assert!(!g1.owners[0].is_attributed());
        assert_eq!(g1.owners[0].workload.get("model"), Some("unknown"));
        assert!(snap.collectors[&Collector::PodResources].success);
        assert_eq!(snap.pods_on_node, Some(1));
    }

    #[test]
    fn pod_without_api_data_keeps_names_but_unknown_workload() {
        let mut b = builder();
        let snap = b.build(input(
            reading(vec![device(0, G0)]),
            Some(list(&[(
                "llm",
                "ghost",
                "c",
                "nvidia.com/gpu",
                &format!("{G0}::1"),
            )])),
            None,
            Instant::now(),
        ));
        assert_eq!(snap.gpus[0].owners[0].pod, "ghost");
        assert_eq!(snap.gpus[0].owners[0].workload.get("team"), Some("unknown"));
    }

    #[test]
    fn a_gpu_that_vanishes_is_reported_down_and_others_stay() {
        let mut b = builder();
        let now = Instant::now();
        b.build(input(
            reading(vec![device(0, G0), device(1, G1)]),
            None,
            None,
            now,
        ));
        // GPU 1 is lost (handle call failed); GPU 0 still reads.
        let mut second = reading(vec![device(0, G0)]);
        second.errors.push(CallError {
            call: "nvmlDeviceGetHandleByIndex",
            kind: ErrorKind::GpuLost,
            from_events: false,
        });
        second.enumerated = true;
        let snap = b.build(input(second, None, None, now));
        assert_eq!(snap.gpus.len(), 2);
        assert!(snap.gpus[0].up);
        assert_eq!(snap.gpus[0].device.utilization_gpu_percent, Some(50));
        assert!(!snap.gpus[1].up);
        assert_eq!(snap.gpus[1].device.identity.uuid, G1);
        assert_eq!(snap.gpus[1].device.utilization_gpu_percent, None);
        assert_eq!(snap.errors[&(Collector::Nvml, ErrorKind::GpuLost)], 1);
        assert_eq!(snap.enumerations_total, 1);
        assert!(snap.collectors[&Collector::Nvml].success);
    }

    #[test]
    fn nvml_down_keeps_serving_health() {
        let mut b = builder();
        let mut down = GpuReading::down(ErrorKind::LibraryNotFound, "no lib");
        down.errors.push(CallError {
            call: "nvmlInit",
            kind: ErrorKind::LibraryNotFound,
            from_events: false,
        });
        b.build(input(down.clone(), None, None, Instant::now()));
        // A pass without a load attempt adds no error.
        let snap = b.build(input(
            GpuReading::down(ErrorKind::LibraryNotFound, "no lib"),
            None,
            None,
            Instant::now(),
        ));
        assert!(snap.gpus.is_empty());
        assert!(!snap.collectors[&Collector::Nvml].success);
        assert_eq!(
            snap.errors[&(Collector::Nvml, ErrorKind::LibraryNotFound)],
            1
        );
        assert_eq!(snap.collections_total, 2);
    }

    #[test]
    fn xids_count_per_code_and_owner_and_survive_retention() {
        let mut b = builder();
        let t0 = Instant::now();
        let alloc = || Some(list(&[("llm", "vllm-0", "server", "nvidia.com/gpu", G0)]));
        let pods = || Some(vec![pod("llm", "vllm-0", "uid-0", "mistral-7b")]);
        let mut r = reading(vec![device(0, G0), device(1, G1)]);
        r.xid_events = vec![
            XidEvent {
                gpu_uuid: G0.into(),
                xid: Some(79),
            },
            XidEvent {
                gpu_uuid: G0.into(),
                xid: Some(79),
            },
            XidEvent {
                gpu_uuid: G0.into(),
                xid: Some(48),
            },
            XidEvent {
                gpu_uuid: G1.into(),
                xid: None,
            },
        ];
        let snap = b.build(input(r, alloc(), pods(), t0));
        let find = |snap: &Snapshot, uuid: &str, xid: &str| {
            snap.xid
                .iter()
                .find(|x| x.gpu_uuid == uuid && x.xid == xid)
                .map(|x| (x.count, x.owner.pod.clone()))
        };
        assert_eq!(find(&snap, G0, "79"), Some((2, "vllm-0".into())));
        assert_eq!(find(&snap, G0, "48"), Some((1, "vllm-0".into())));
        assert_eq!(find(&snap, G1, "unknown"), Some((1, String::new())));
        assert_eq!(snap.gpus[0].last_xid, Some(48));
        // Pod gone: kept within retention, dropped after.
        let snap = b.build(input(
            reading(vec![device(0, G0), device(1, G1)]),
            None,
            Some(vec![]),
            t0 + Duration::from_secs(60),
        ));
        assert_eq!(find(&snap, G0, "79"), Some((2, "vllm-0".into())));
        let snap = b.build(input(
            reading(vec![device(0, G0), device(1, G1)]),
            None,
            Some(vec![]),
            t0 + Duration::from_secs(700),
        ));
        assert_eq!(find(&snap, G0, "79"), None);
        assert_eq!(find(&snap, G1, "unknown"), Some((1, String::new())));
    }

    #[test]
    fn time_sliced_gpu_has_one_owner_per_pod_and_mig_instances_have_their_own() {
        let mut b = builder();
        let mut d0 = device(0, G0);
        d0.mig = vec![MigReading {
            uuid: MIG0.into(),
            gpu_instance_id: Some(3),
            compute_instance_id: Some(0),
            profile: "1g.10gb".into(),
            memory: None,
        }];
        let snap = b.build(input(
            reading(vec![d0, device(1, G1)]),
            Some(list(&[
                ("a", "p1", "c", "nvidia.com/gpu", &format!("{G1}::0")),
                ("b", "p2", "c", "nvidia.com/gpu", &format!("{G1}::1")),
                ("m", "p3", "c", "nvidia.com/mig-1g.10gb", MIG0),
            ])),
            None,
            Instant::now(),
        ));
        let pods: Vec<&str> = snap.gpus[1].owners.iter().map(|o| o.pod.as_str()).collect();
        assert_eq!(pods, ["p1", "p2"]);
        assert!(!snap.gpus[0].owners[0].is_attributed());
        assert_eq!(snap.gpus[0].mig[0].owners[0].pod, "p3");
        assert_eq!(snap.devices_allocated["nvidia.com/gpu"], 2);
    }

    struct FakeResolver(HashMap<u32, ProcessOwner>);

    impl ProcessResolver for FakeResolver {
        fn owner(&self, pid: u32) -> Result<Option<ProcessOwner>, ErrorKind> {
            if pid == 13 {
                return Err(ErrorKind::NoPermission);
            }
            Ok(self.0.get(&pid).cloned())
        }
    }

    #[test]
    fn process_memory_is_summed_per_container() {
        let mut b = builder();
        let mut d0 = device(0, G0);
        d0.processes = vec![
            ProcessReading {
                pid: 10,
                used_memory_bytes: Some(1000),
                gpu_instance_id: None,
            },
            ProcessReading {
                pid: 11,
                used_memory_bytes: Some(500),
                gpu_instance_id: None,
            },
            ProcessReading {
                pid: 12,
                used_memory_bytes: None,
                gpu_instance_id: None,
            },
            ProcessReading {
                pid: 99,
                used_memory_bytes: Some(7),
                gpu_instance_id: None,
            },
        ];
        let owner = ProcessOwner {
            pod_uid: "uid-0".into(),
            container_id: Some("c0ffee000000".into()),
        };
        let resolver = FakeResolver(HashMap::from([
            (10, owner.clone()),
            (11, owner.clone()),
            (12, owner),
        ]));
        let mut inp = input(
            reading(vec![d0]),
            None,
            Some(vec![pod("llm", "vllm-0", "uid-0", "mistral-7b")]),
            Instant::now(),
        );
        inp.resolver = Some(&resolver);
        let snap = b.build(inp);
        let attributed: Vec<_> = snap
            .container_memory
            .iter()
            .filter(|m| m.owner.is_attributed())
            .collect();
        assert_eq!(attributed.len(), 1);
        assert_eq!(attributed[0].owner.container, "server");
        assert_eq!(attributed[0].used_bytes, 1500);
        assert_eq!(attributed[0].processes, 3);
        assert_eq!(
            attributed[0].owner.workload.get("model"),
            Some("mistral-7b")
        );
        let other: Vec<_> = snap
            .container_memory
            .iter()
            .filter(|m| !m.owner.is_attributed())
            .collect();
        assert_eq!(other[0].used_bytes, 7);
        assert!(snap.collectors[&Collector::ProcessCgroups].success);
    }

    #[test]
    fn admission_failures_are_counted_once_per_pod() {
        let mut b = builder();
        let mut out_of = pod("llm", "vllm-9", "uid-9", "llama-70b");
        out_of.info.phase = "Failed".into();
        out_of.reason = Some("OutOfnvidia.com/gpu".into());
        let mut plugin = pod("llm", "vllm-8", "uid-8", "llama-70b");
        plugin.info.phase = "Failed".into();
        plugin.reason = Some("UnexpectedAdmissionError".into());
        plugin.message = Some(
            "Allocate failed due to requested number of devices unavailable for nvidia.com/gpu. Requested: 1, Available: 0, which is unexpected".into(),
        );
        let mut unrelated = pod("llm", "x", "uid-x", "m");
        unrelated.info.phase = "Failed".into();
        unrelated.reason = Some("Evicted".into());
        let pods = || Some(vec![out_of.clone(), plugin.clone(), unrelated.clone()]);
        b.build(input(reading(vec![]), None, pods(), Instant::now()));
        let snap = b.build(input(reading(vec![]), None, pods(), Instant::now()));
        let counts: Vec<_> = snap
            .allocation_failures
            .iter()
            .map(|f| {
                (
                    f.reason,
                    f.resource.as_str(),
                    f.count,
                    f.workload.get("model").unwrap_or(""),
                )
            })
            .collect();
        assert_eq!(
            counts,
            vec![
                ("device_plugin_error", "nvidia.com/gpu", 1, "llama-70b"),
                ("insufficient_resource", "nvidia.com/gpu", 1, "llama-70b"),
            ]
        );
    }

    #[test]
    fn errors_accumulate_by_collector_and_kind() {
        let mut b = builder();
        let mut r = reading(vec![device(0, G0)]);
        r.errors = vec![
            CallError {
                call: "nvmlDeviceGetPowerUsage",
                kind: ErrorKind::SymbolMissing,
                from_events: false,
            },
            CallError {
                call: "nvmlEventSetCreate",
                kind: ErrorKind::SymbolMissing,
                from_events: true,
            },
        ];
        r.xid_watch_healthy = Some(false);
        let mut inp = input(r.clone(), None, None, Instant::now());
        inp.allocations = Some(Err(ErrorKind::NotFound));
        b.build(inp);
        let snap = b.build(input(r, None, None, Instant::now()));
        assert_eq!(snap.errors[&(Collector::Nvml, ErrorKind::SymbolMissing)], 2);
        assert_eq!(
            snap.errors[&(Collector::XidEvents, ErrorKind::SymbolMissing)],
            2
        );
        assert_eq!(
            snap.errors[&(Collector::PodResources, ErrorKind::NotFound)],
            1
        );
        assert!(!snap.collectors[&Collector::XidEvents].success);
        assert!(snap.collectors[&Collector::Nvml].success);
    }
}
