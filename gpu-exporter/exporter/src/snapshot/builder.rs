//! The snapshot builder: one pass's inputs in, a [`Snapshot`] out, with the
//! state that spans passes (GPUs seen before, XID and allocation-failure
//! counters, error counters).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use tokentap_workload::{WorkloadLabelPolicy, WorkloadLabels};

use super::{
    classify_admission_failure, AllocationFailureCount, ContainerMemory, GpuEntry, MigEntry, Owner,
    PassInput, Snapshot, XidCount,
};
use crate::cgroup::ProcessResolver;
use crate::gpu::{DeviceIdentity, DeviceReading, GpuReading, MigReading, NvmlStatus, XidEvent};
use crate::health::{Collector, CollectorStatus, ErrorKind};
use crate::kube::{PodIndex, WatchReport};
use crate::podresources::{legacy_mig_key, Allocations, ContainerRef, ResourceFilter};

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

    /// Builds the snapshot of one pass, section by section; each section
    /// records its collector's status and errors.
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
        let nvml_up = self.record_gpu_health(&gpu, gpu_duration, &mut collectors);
        let allocations = self.take_allocations(allocations, allocations_duration, &mut collectors);
        self.take_allocatable(allocatable);
        let pods = self.take_pods(pods, &mut collectors);
        let pods_ref = pods.index.as_deref();
        let devices = self.with_known_devices(gpu.devices, nvml_up);
        let seen = Seen {
            allocations: allocations.as_ref(),
            pods: pods_ref,
        };
        self.record_xids(&gpu.xid_events, &devices, seen, now);
        self.expire_xids(pods.synced, pods_ref, now);
        let built = self.gpu_entries(devices, seen, resolver);
        if resolver.is_some() {
            self.record_process_health(built.resolver_failure, &mut collectors);
        }
        if let Some(index) = pods_ref {
            self.count_allocation_failures(index, pods.synced);
        }
        Snapshot {
            node: self.node.clone(),
            workload_label_names: self.policy.label_names().map(str::to_string).collect(),
            nvml: gpu.nvml,
            gpus: built.gpus,
            container_memory: container_memory(built.memory),
            xid: self.xid_counts(),
            allocation_failures: self.allocation_failure_counts(),
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
            pods_stale: pods.stale,
        }
    }

    /// NVML and XID-thread health; true when NVML is up.
    fn record_gpu_health(
        &mut self,
        gpu: &GpuReading,
        duration: Duration,
        collectors: &mut Collectors,
    ) -> bool {
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
        collectors.insert(Collector::Nvml, status(nvml_up && !count_failed, duration));
        if let Some(healthy) = gpu.xid_watch_healthy {
            collectors.insert(Collector::XidEvents, status(healthy, Duration::ZERO));
        }
        nvml_up
    }

    /// The kubelet's allocations of this pass, if it answered.
    fn take_allocations(
        &mut self,
        allocations: Option<Result<Allocations, ErrorKind>>,
        duration: Duration,
        collectors: &mut Collectors,
    ) -> Option<Allocations> {
        let result = allocations?;
        collectors.insert(Collector::PodResources, status(result.is_ok(), duration));
        match result {
            Ok(a) => Some(a),
            Err(kind) => {
                self.count_error(Collector::PodResources, kind);
                None
            }
        }
    }

    fn take_allocatable(&mut self, allocatable: Option<Result<BTreeMap<String, u64>, ErrorKind>>) {
        match allocatable {
            Some(Ok(counts)) => self.allocatable = counts,
            Some(Err(kind)) => self.count_error(Collector::PodResources, kind),
            None => {}
        }
    }

    /// The pod watch's view for this pass.
    fn take_pods(
        &mut self,
        pods: Option<(Arc<PodIndex>, WatchReport)>,
        collectors: &mut Collectors,
    ) -> PodView {
        let Some((index, report)) = pods else {
            return PodView::default();
        };
        for kind in &report.errors {
            self.count_error(Collector::KubePods, *kind);
        }
        let success = report.healthy && report.synced;
        collectors.insert(Collector::KubePods, status(success, Duration::ZERO));
        PodView {
            stale: report.stale(),
            synced: report.synced,
            index: Some(index),
        }
    }

    /// This pass's readings plus the GPUs seen before that vanished (lost).
    fn with_known_devices(
        &mut self,
        readings: Vec<DeviceReading>,
        nvml_up: bool,
    ) -> BTreeMap<String, DeviceReading> {
        let mut devices: BTreeMap<String, DeviceReading> = BTreeMap::new();
        for reading in readings {
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
        devices
    }

    /// Counts each XID event once per owner of its GPU.
    fn record_xids(
        &mut self,
        events: &[XidEvent],
        devices: &BTreeMap<String, DeviceReading>,
        seen: Seen<'_>,
        now: Instant,
    ) {
        for event in events {
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
            for owner in self.xid_owners(&event.gpu_uuid, devices, seen) {
                let key = XidKey {
                    gpu_uuid: event.gpu_uuid.clone(),
                    xid: xid_label.clone(),
                    owner,
                };
                let state = self.xid.entry(key).or_insert(XidState {
                    gpu_index,
                    count: 0,
                    owner_seen: now,
                });
                state.count += 1;
                state.owner_seen = now;
            }
        }
    }

    /// Owners an XID on this GPU concerns: the GPU's own, or on a MIG GPU
    /// held only through its instances, every instance's owner.
    fn xid_owners(
        &self,
        gpu_uuid: &str,
        devices: &BTreeMap<String, DeviceReading>,
        seen: Seen<'_>,
    ) -> Vec<Owner> {
        let owners = self.owners_for(gpu_uuid, seen.allocations, seen.pods);
        let Some(device) = devices.get(gpu_uuid) else {
            return owners;
        };
        if owners[0].is_attributed() || device.mig.is_empty() {
            return owners;
        }
        let mig_owners: Vec<Owner> = device
            .mig
            .iter()
            .flat_map(|m| self.owners_for(&m.uuid, seen.allocations, seen.pods))
            .filter(Owner::is_attributed)
            .collect();
        if mig_owners.is_empty() {
            owners
        } else {
            mig_owners
        }
    }

    /// Counters of pods that left the node are kept for `retention`.
    fn expire_xids(&mut self, synced: bool, pods: Option<&PodIndex>, now: Instant) {
        for (key, state) in self.xid.iter_mut() {
            let alive = !key.owner.is_attributed()
                || !synced
                || pods.is_some_and(|p| p.by_name(&key.owner.namespace, &key.owner.pod).is_some());
            if alive {
                state.owner_seen = now;
            }
        }
        let retention = self.retention;
        self.xid
            .retain(|_, state| now.duration_since(state.owner_seen) <= retention);
    }

    /// One entry per GPU (sorted by index) with its owners and MIG
    /// instances, and the process memory per container.
    fn gpu_entries(
        &self,
        devices: BTreeMap<String, DeviceReading>,
        seen: Seen<'_>,
        resolver: Option<&dyn ProcessResolver>,
    ) -> BuiltGpus {
        let mut built = BuiltGpus::default();
        for (uuid, device) in devices {
            let owners = self.owners_for(&uuid, seen.allocations, seen.pods);
            let mig = device
                .mig
                .iter()
                .map(|m| self.mig_entry(&uuid, m, seen))
                .collect();
            if let Some(resolver) = resolver {
                for process in &device.processes {
                    let owner = self.process_owner(
                        process.pid,
                        resolver,
                        seen.pods,
                        &mut built.resolver_failure,
                    );
                    let slot = built
                        .memory
                        .entry((device.identity.index, uuid.clone(), owner))
                        .or_default();
                    slot.0 += process.used_memory_bytes.unwrap_or(0);
                    slot.1 += 1;
                }
            }
            built.gpus.push(GpuEntry {
                up: !device.lost,
                last_xid: self.last_xid.get(&uuid).copied(),
                device,
                owners,
                mig,
            });
        }
        built.gpus.sort_by(|a, b| {
            (a.device.identity.index, &a.device.identity.uuid)
                .cmp(&(b.device.identity.index, &b.device.identity.uuid))
        });
        built
    }

    /// A MIG instance's owners, by its own id or the legacy
    /// `MIG-GPU-<uuid>/<gi>/<ci>` form.
    fn mig_entry(&self, gpu_uuid: &str, mig: &MigReading, seen: Seen<'_>) -> MigEntry {
        let mut owners = self.owners_for(&mig.uuid, seen.allocations, seen.pods);
        if let (false, Some(gi)) = (owners[0].is_attributed(), mig.gpu_instance_id) {
            owners = self.owners_for(&legacy_mig_key(gpu_uuid, gi), seen.allocations, seen.pods);
        }
        MigEntry {
            reading: mig.clone(),
            owners,
        }
    }

    fn record_process_health(&mut self, failure: Option<ErrorKind>, collectors: &mut Collectors) {
        if let Some(kind) = failure {
            self.count_error(Collector::ProcessCgroups, kind);
        }
        collectors.insert(
            Collector::ProcessCgroups,
            status(failure.is_none(), Duration::ZERO),
        );
    }

    fn xid_counts(&self) -> Vec<XidCount> {
        self.xid
            .iter()
            .map(|(key, state)| XidCount {
                gpu_index: state.gpu_index,
                gpu_uuid: key.gpu_uuid.clone(),
                xid: key.xid.clone(),
                owner: key.owner.clone(),
                count: state.count,
            })
            .collect()
    }

    fn allocation_failure_counts(&self) -> Vec<AllocationFailureCount> {
        self.failures
            .iter()
            .map(
                |((resource, reason, workload), count)| AllocationFailureCount {
                    resource: resource.clone(),
                    reason,
                    workload: workload.clone(),
                    count: *count,
                },
            )
            .collect()
    }
}

type Collectors = BTreeMap<Collector, CollectorStatus>;

fn status(success: bool, duration: Duration) -> CollectorStatus {
    CollectorStatus {
        success,
        duration_seconds: duration.as_secs_f64(),
    }
}

/// What this pass knows about who holds what.
#[derive(Clone, Copy)]
struct Seen<'a> {
    allocations: Option<&'a Allocations>,
    pods: Option<&'a PodIndex>,
}

/// The pod watch as one pass sees it.
#[derive(Default)]
struct PodView {
    index: Option<Arc<PodIndex>>,
    synced: bool,
    stale: bool,
}

/// Process memory per (GPU index, GPU UUID, owner): (bytes, processes).
type MemoryByOwner = BTreeMap<(u32, String, Owner), (u64, u64)>;

#[derive(Default)]
struct BuiltGpus {
    gpus: Vec<GpuEntry>,
    memory: MemoryByOwner,
    resolver_failure: Option<ErrorKind>,
}

fn container_memory(memory: MemoryByOwner) -> Vec<ContainerMemory> {
    memory
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
        .collect()
}
