//! The table of every family the GPU collector publishes, in exposition
//! order, and the functions that turn a snapshot into each family's rows.
//! A family that reads one device value per GPU is a [`Source::Device`]
//! accessor; the others build their rows from the whole snapshot.

use prometheus_client::metrics::MetricType;

use crate::gpu::{DeviceReading, MemoryReading, NvmlStatus};
use crate::snapshot::{GpuEntry, Owner, Snapshot};

pub(super) type Labels<'a> = Vec<(&'a str, &'a str)>;
pub(super) type Row<'a> = (Labels<'a>, f64);

/// Strings rendered once per scrape, which labels borrow.
pub(super) struct Rendered {
    /// Per GPU of the snapshot, its index as text.
    pub gpu_index: Vec<String>,
    driver_version: String,
    cuda_version: String,
    xid_index: Vec<String>,
    memory_index: Vec<String>,
    /// Per GPU, per MIG instance: GPU instance and compute instance ids.
    mig_ids: Vec<Vec<(String, String)>>,
}

impl Rendered {
    pub fn new(snap: &Snapshot) -> Self {
        let (driver_version, cuda_version) = match &snap.nvml {
            NvmlStatus::Up {
                driver_version,
                cuda_driver_version,
            } => (
                driver_version.clone().unwrap_or_default(),
                cuda_driver_version
                    .map(|v| format!("{}.{}", v / 1000, (v % 1000) / 10))
                    .unwrap_or_default(),
            ),
            NvmlStatus::Down { .. } => (String::new(), String::new()),
        };
        let id = |v: Option<u32>| v.map(|i| i.to_string()).unwrap_or_default();
        Self {
            gpu_index: snap
                .gpus
                .iter()
                .map(|g| g.device.identity.index.to_string())
                .collect(),
            driver_version,
            cuda_version,
            xid_index: snap.xid.iter().map(|x| x.gpu_index.to_string()).collect(),
            memory_index: snap
                .container_memory
                .iter()
                .map(|m| m.gpu_index.to_string())
                .collect(),
            mig_ids: snap
                .gpus
                .iter()
                .map(|g| {
                    g.mig
                        .iter()
                        .map(|m| {
                            let r = &m.reading;
                            (id(r.gpu_instance_id), id(r.compute_instance_id))
                        })
                        .collect()
                })
                .collect(),
        }
    }
}

/// Where a family's rows come from.
pub(super) enum Source {
    /// One row per (GPU, owner) where the device has this reading.
    Device(fn(&DeviceReading) -> Option<f64>),
    /// Rows built from the whole snapshot.
    Rows(for<'a> fn(&'a Snapshot, &'a Rendered) -> Vec<Row<'a>>),
}

pub(super) struct Family {
    pub name: &'static str,
    pub help: &'static str,
    /// Gauge or counter (a counter's name is without `_total`).
    pub kind: MetricType,
    pub source: Source,
}

impl Family {
    pub fn rows<'a>(&self, snap: &'a Snapshot, rendered: &'a Rendered) -> Vec<Row<'a>> {
        match self.source {
            Source::Device(value) => per_gpu(snap, rendered, value),
            Source::Rows(rows) => rows(snap, rendered),
        }
    }
}

const fn gauge(name: &'static str, help: &'static str, source: Source) -> Family {
    Family {
        name,
        help,
        kind: MetricType::Gauge,
        source,
    }
}

const fn counter(name: &'static str, help: &'static str, source: Source) -> Family {
    Family {
        name,
        help,
        kind: MetricType::Counter,
        source,
    }
}

use Source::{Device, Rows};

/// Every family, in exposition order.
pub(super) const FAMILIES: &[Family] = &[
    // ---- identity and per GPU
    gauge("llm_gpu_info", "Static identity of each GPU; join on gpu_uuid.", Rows(info_rows)),
    gauge("llm_gpu_up", "1 when the GPU answered in the last collection, 0 when it is lost (fell off the bus) or gone.", Rows(up_rows)),
    gauge("llm_gpu_utilization_ratio", "Fraction of the last sample period during which a kernel ran on the GPU (NVML utilization.gpu).", Device(|d| d.utilization_gpu_percent.map(|v| f64::from(v) / 100.0))),
    gauge("llm_gpu_memory_utilization_ratio", "Fraction of the last sample period during which device memory was read or written (NVML utilization.memory); not capacity.", Device(|d| d.utilization_memory_percent.map(|v| f64::from(v) / 100.0))),
    gauge("llm_gpu_memory_used_bytes", "Device memory allocated (NVML memory info v2 'used').", Device(|d| d.memory.map(|m| m.used_bytes as f64))),
    gauge("llm_gpu_memory_free_bytes", "Device memory neither allocated nor reserved.", Device(|d| d.memory.map(|m| m.free_bytes as f64))),
    gauge("llm_gpu_memory_total_bytes", "Installed device memory.", Device(|d| d.memory.map(|m| m.total_bytes as f64))),
    gauge("llm_gpu_memory_reserved_bytes", "Device memory reserved by the driver and firmware.", Device(|d| d.memory.map(|m| m.reserved_bytes as f64))),
    gauge("llm_gpu_temperature_celsius", "GPU core temperature.", Device(|d| d.temperature_celsius.map(f64::from))),
    gauge("llm_gpu_power_usage_watts", "Board power draw.", Device(|d| d.power_usage_milliwatts.map(|v| f64::from(v) / 1000.0))),
    gauge("llm_gpu_power_limit_watts", "Enforced power limit.", Device(|d| d.power_limit_milliwatts.map(|v| f64::from(v) / 1000.0))),
    counter("llm_gpu_energy_consumption_joules", "Energy consumed since the driver was loaded.", Device(|d| d.energy_millijoules.map(|v| v as f64 / 1000.0))),
    gauge("llm_gpu_sm_clock_hertz", "Current SM clock.", Device(|d| d.sm_clock_mhz.map(|v| f64::from(v) * 1e6))),
    gauge("llm_gpu_memory_clock_hertz", "Current memory clock.", Device(|d| d.memory_clock_mhz.map(|v| f64::from(v) * 1e6))),
    gauge("llm_gpu_throttle_reason_active", "1 while NVML reports this clocks-event (throttle) reason.", Rows(throttle_rows)),
    counter("llm_gpu_ecc_errors", "ECC errors since the driver was loaded (volatile counters), by error_type.", Rows(ecc_rows)),
    counter("llm_gpu_pcie_replays", "PCIe replay counter.", Device(|d| d.pcie_replays.map(f64::from))),
    counter("llm_gpu_xid_errors", "XID errors reported by the driver (NVML events), by XID code, attributed to the pods holding the GPU when it happened.", Rows(xid_rows)),
    // ---- per container (process memory)
    gauge("llm_gpu_container_memory_used_bytes", "GPU memory of the compute processes of a container, found through each process's cgroup (processes outside pods have empty pod labels).", Rows(|s, r| container_rows(s, r, |m| m.used_bytes as f64))),
    gauge("llm_gpu_container_processes", "Compute processes of a container on the GPU.", Rows(|s, r| container_rows(s, r, |m| m.processes as f64))),
    // ---- MIG
    gauge("llm_gpu_mig_info", "Static identity of each MIG instance.", Rows(mig_info_rows)),
    gauge("llm_gpu_mig_memory_used_bytes", "Memory allocated in a MIG instance.", Rows(|s, r| mig_memory_rows(s, r, |m| m.used_bytes))),
    gauge("llm_gpu_mig_memory_free_bytes", "Free memory of a MIG instance.", Rows(|s, r| mig_memory_rows(s, r, |m| m.free_bytes))),
    gauge("llm_gpu_mig_memory_total_bytes", "Memory of a MIG instance.", Rows(|s, r| mig_memory_rows(s, r, |m| m.total_bytes))),
    // ---- allocation
    counter("llm_gpu_allocation_failures", "Pods on this node refused a GPU at admission: status.reason OutOf<gpu resource> (insufficient_resource) or UnexpectedAdmissionError naming a GPU resource (device_plugin_error).", Rows(allocation_failure_rows)),
    gauge("llm_gpu_devices_allocatable", "GPU device IDs the kubelet can allocate, per resource (PodResources GetAllocatableResources).", Rows(|s, _| per_resource(&s.devices_allocatable))),
    gauge("llm_gpu_devices_allocated", "GPU device IDs allocated to containers, per resource (PodResources List).", Rows(|s, _| per_resource(&s.devices_allocated))),
    // ---- exporter health
    gauge("llm_gpu_exporter_build_info", "Exporter version and the node it runs on.", Rows(|s, _| vec![(vec![("version", env!("CARGO_PKG_VERSION")), ("node", s.node.as_str())], 1.0)])),
    gauge("llm_gpu_exporter_nvml_up", "1 when the NVML library is loaded and initialised.", Rows(|s, _| single(flag(matches!(s.nvml, NvmlStatus::Up { .. }))))),
    gauge("llm_gpu_exporter_nvml_down_reason", "Present while NVML is unavailable; kind says why (library_not_found: no libnvidia-ml on this node).", Rows(nvml_down_rows)),
    gauge("llm_gpu_exporter_collector_success", "1 when the collector's last pass succeeded.", Rows(|s, _| s.collectors.iter().map(|(c, st)| (vec![("collector", c.as_str())], flag(st.success))).collect())),
    gauge("llm_gpu_exporter_collector_duration_seconds", "Duration of the collector's last pass.", Rows(|s, _| s.collectors.iter().map(|(c, st)| (vec![("collector", c.as_str())], st.duration_seconds)).collect())),
    counter("llm_gpu_exporter_errors", "Failed calls by collector and kind.", Rows(|s, _| s.errors.iter().map(|((c, k), n)| (vec![("collector", c.as_str()), ("kind", k.as_str())], *n as f64)).collect())),
    counter("llm_gpu_exporter_collections", "Collection passes completed.", Rows(|s, _| single(s.collections_total as f64))),
    counter("llm_gpu_exporter_enumerations", "Times the GPU list was (re)built: at start, when the GPU count changed, after a GPU was lost.", Rows(|s, _| single(s.enumerations_total as f64))),
    gauge("llm_gpu_exporter_last_collection_timestamp_seconds", "Unix time of the last completed collection.", Rows(|s, _| single(s.last_collection_unix_seconds))),
    gauge("llm_gpu_exporter_node_pods", "Pods on this node known from the Kubernetes API watch.", Rows(|s, _| s.pods_on_node.map(|n| single(n as f64)).unwrap_or_default())),
    gauge("llm_gpu_exporter_node_pods_stale", "1 while pod attribution is served from the last known pods because the Kubernetes API watch failed or fell silent.", Rows(|s, _| s.pods_on_node.map(|_| single(flag(s.pods_stale))).unwrap_or_default())),
];

fn flag(on: bool) -> f64 {
    if on {
        1.0
    } else {
        0.0
    }
}

fn single(value: f64) -> Vec<Row<'static>> {
    vec![(vec![], value)]
}

pub(super) fn push_owner<'a>(labels: &mut Labels<'a>, owner: &'a Owner) {
    labels.push(("namespace", owner.namespace.as_str()));
    labels.push(("pod", owner.pod.as_str()));
    labels.push(("container", owner.container.as_str()));
    labels.extend(owner.workload.iter());
}

fn gpu_labels<'a>(gpu: &'a GpuEntry, index: &'a str, owner: &'a Owner) -> Labels<'a> {
    let mut labels = Vec::with_capacity(6 + owner.workload.0.len());
    labels.push(("gpu", index));
    labels.push(("gpu_uuid", gpu.device.identity.uuid.as_str()));
    push_owner(&mut labels, owner);
    labels
}

/// (GPU, its index text) pairs.
fn gpus<'a>(snap: &'a Snapshot, r: &'a Rendered) -> impl Iterator<Item = (&'a GpuEntry, &'a str)> {
    snap.gpus.iter().zip(r.gpu_index.iter().map(String::as_str))
}

/// One row per (GPU, owner) where `value` has a reading.
fn per_gpu<'a>(
    snap: &'a Snapshot,
    r: &'a Rendered,
    value: fn(&DeviceReading) -> Option<f64>,
) -> Vec<Row<'a>> {
    let mut rows = Vec::new();
    for (gpu, index) in gpus(snap, r) {
        if let Some(v) = value(&gpu.device) {
            for owner in &gpu.owners {
                rows.push((gpu_labels(gpu, index, owner), v));
            }
        }
    }
    rows
}

fn info_rows<'a>(snap: &'a Snapshot, r: &'a Rendered) -> Vec<Row<'a>> {
    gpus(snap, r)
        .map(|(gpu, index)| {
            let id = &gpu.device.identity;
            let mig_mode = match gpu.device.mig_enabled {
                Some(true) => "enabled",
                Some(false) => "disabled",
                None => "",
            };
            let labels = vec![
                ("gpu", index),
                ("gpu_uuid", id.uuid.as_str()),
                ("gpu_model", id.name.as_str()),
                ("pci_bus_id", id.pci_bus_id.as_deref().unwrap_or("")),
                ("serial", id.serial.as_deref().unwrap_or("")),
                ("driver_version", r.driver_version.as_str()),
                ("cuda_version", r.cuda_version.as_str()),
                ("mig_mode", mig_mode),
                ("node", snap.node.as_str()),
            ];
            (labels, 1.0)
        })
        .collect()
}

fn up_rows<'a>(snap: &'a Snapshot, r: &'a Rendered) -> Vec<Row<'a>> {
    let mut rows = Vec::new();
    for (gpu, index) in gpus(snap, r) {
        for owner in &gpu.owners {
            rows.push((gpu_labels(gpu, index, owner), flag(gpu.up)));
        }
    }
    rows
}

/// Clocks-event (throttle) reasons and their NVML bits.
const THROTTLE_REASONS: [(u64, &str); 9] = [
    (0x1, "gpu_idle"),
    (0x2, "applications_clocks_setting"),
    (0x4, "sw_power_cap"),
    (0x8, "hw_slowdown"),
    (0x10, "sync_boost"),
    (0x20, "sw_thermal_slowdown"),
    (0x40, "hw_thermal_slowdown"),
    (0x80, "hw_power_brake_slowdown"),
    (0x100, "display_clock_setting"),
];

fn throttle_rows<'a>(snap: &'a Snapshot, r: &'a Rendered) -> Vec<Row<'a>> {
    let mut rows = Vec::new();
    for (gpu, index) in gpus(snap, r) {
        let Some(bits) = gpu.device.throttle_reasons else {
            continue;
        };
        for owner in &gpu.owners {
            for (bit, reason) in THROTTLE_REASONS {
                let mut labels = gpu_labels(gpu, index, owner);
                labels.push(("reason", reason));
                rows.push((labels, flag(bits & bit != 0)));
            }
        }
    }
    rows
}

fn ecc_rows<'a>(snap: &'a Snapshot, r: &'a Rendered) -> Vec<Row<'a>> {
    let mut rows = Vec::new();
    for (gpu, index) in gpus(snap, r) {
        for (error_type, value) in [
            ("corrected", gpu.device.ecc_corrected),
            ("uncorrected", gpu.device.ecc_uncorrected),
        ] {
            let Some(v) = value else { continue };
            for owner in &gpu.owners {
                let mut labels = gpu_labels(gpu, index, owner);
                labels.push(("error_type", error_type));
                rows.push((labels, v as f64));
            }
        }
    }
    rows
}

fn xid_rows<'a>(snap: &'a Snapshot, r: &'a Rendered) -> Vec<Row<'a>> {
    let mut rows = Vec::new();
    for (x, index) in snap.xid.iter().zip(&r.xid_index) {
        let gpu = if x.gpu_index == u32::MAX {
            ""
        } else {
            index.as_str()
        };
        let mut labels = vec![("gpu", gpu), ("gpu_uuid", x.gpu_uuid.as_str())];
        push_owner(&mut labels, &x.owner);
        labels.push(("xid", x.xid.as_str()));
        rows.push((labels, x.count as f64));
    }
    rows
}

fn container_rows<'a>(
    snap: &'a Snapshot,
    r: &'a Rendered,
    value: fn(&crate::snapshot::ContainerMemory) -> f64,
) -> Vec<Row<'a>> {
    let mut rows = Vec::new();
    for (m, index) in snap.container_memory.iter().zip(&r.memory_index) {
        let mut labels = vec![("gpu", index.as_str()), ("gpu_uuid", m.gpu_uuid.as_str())];
        push_owner(&mut labels, &m.owner);
        rows.push((labels, value(m)));
    }
    rows
}

fn mig_info_rows<'a>(snap: &'a Snapshot, r: &'a Rendered) -> Vec<Row<'a>> {
    let mut rows = Vec::new();
    for ((gpu, index), ids) in gpus(snap, r).zip(&r.mig_ids) {
        for (mig, (gi, ci)) in gpu.mig.iter().zip(ids) {
            let labels = vec![
                ("gpu", index),
                ("gpu_uuid", gpu.device.identity.uuid.as_str()),
                ("gpu_instance_id", gi.as_str()),
                ("compute_instance_id", ci.as_str()),
                ("mig_profile", mig.reading.profile.as_str()),
                ("mig_uuid", mig.reading.uuid.as_str()),
            ];
            rows.push((labels, 1.0));
        }
    }
    rows
}

fn mig_memory_rows<'a>(
    snap: &'a Snapshot,
    r: &'a Rendered,
    value: fn(&MemoryReading) -> u64,
) -> Vec<Row<'a>> {
    let mut rows = Vec::new();
    for ((gpu, index), ids) in gpus(snap, r).zip(&r.mig_ids) {
        for (mig, (gi, _)) in gpu.mig.iter().zip(ids) {
            let Some(memory) = &mig.reading.memory else {
                continue;
            };
            for owner in &mig.owners {
                let mut labels = vec![
                    ("gpu", index),
                    ("gpu_uuid", gpu.device.identity.uuid.as_str()),
                    ("gpu_instance_id", gi.as_str()),
                    ("mig_profile", mig.reading.profile.as_str()),
                ];
                push_owner(&mut labels, owner);
                rows.push((labels, value(memory) as f64));
            }
        }
    }
    rows
}

fn allocation_failure_rows<'a>(snap: &'a Snapshot, _: &'a Rendered) -> Vec<Row<'a>> {
    snap.allocation_failures
        .iter()
        .map(|f| {
            let mut labels = vec![("resource", f.resource.as_str()), ("reason", f.reason)];
            labels.extend(f.workload.iter());
            (labels, f.count as f64)
        })
        .collect()
}

fn per_resource(counts: &std::collections::BTreeMap<String, u64>) -> Vec<Row<'_>> {
    counts
        .iter()
        .map(|(resource, n)| (vec![("resource", resource.as_str())], *n as f64))
        .collect()
}

fn nvml_down_rows<'a>(snap: &'a Snapshot, _: &'a Rendered) -> Vec<Row<'a>> {
    match &snap.nvml {
        NvmlStatus::Down { kind, .. } => vec![(vec![("kind", kind.as_str())], 1.0)],
        NvmlStatus::Up { .. } => Vec::new(),
    }
}
