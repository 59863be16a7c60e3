//! Exposition of a [`Snapshot`] through `prometheus-client`'s `Collector`
//! trait: every scrape encodes the last snapshot and touches no GPU.
//!
//! Naming follows Prometheus conventions: `llm_gpu_` prefix, base units
//! (`_bytes`, `_watts`, `_hertz`, `_celsius`, `_joules`), `_ratio` for 0–1,
//! counters end in `_total`. Identity that never changes lives only on
//! `llm_gpu_info` / `llm_gpu_mig_info` to keep series small.

use std::sync::{Arc, RwLock};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;

use crate::gpu::{DeviceReading, NvmlStatus};
use crate::snapshot::{GpuEntry, Owner, Snapshot};

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

type Labels<'a> = Vec<(&'a str, &'a str)>;

/// One family: name, help, type and rows; empty families are left out.
fn family(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    metric_type: MetricType,
    rows: Vec<(Labels<'_>, f64)>,
) -> Result<(), std::fmt::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut metric = encoder.encode_descriptor(name, help, None, metric_type)?;
    for (labels, value) in rows {
        let mut sample = metric.encode_family(&labels)?;
        match metric_type {
            MetricType::Counter => sample.encode_counter::<NoLabelSet, f64, f64>(&value, None)?,
            _ => sample.encode_gauge(&value)?,
        }
    }
    Ok(())
}

fn gauge(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    rows: Vec<(Labels<'_>, f64)>,
) -> Result<(), std::fmt::Error> {
    family(encoder, name, help, MetricType::Gauge, rows)
}

/// Counter; `name` is without `_total`, which the encoder appends.
fn counter(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    rows: Vec<(Labels<'_>, f64)>,
) -> Result<(), std::fmt::Error> {
    family(encoder, name, help, MetricType::Counter, rows)
}

fn push_owner<'a>(labels: &mut Labels<'a>, owner: &'a Owner) {
    labels.push(("namespace", owner.namespace.as_str()));
    labels.push(("pod", owner.pod.as_str()));
    labels.push(("container", owner.container.as_str()));
    labels.extend(owner.workload.iter());
}

/// Pre-rendered per-GPU strings that labels borrow.
struct GpuStrings {
    index: String,
}

fn gpu_labels<'a>(gpu: &'a GpuEntry, strings: &'a GpuStrings, owner: &'a Owner) -> Labels<'a> {
    let mut labels = Vec::with_capacity(6 + owner.workload.0.len());
    labels.push(("gpu", strings.index.as_str()));
    labels.push(("gpu_uuid", gpu.device.identity.uuid.as_str()));
    push_owner(&mut labels, owner);
    labels
}

/// One row per (GPU, owner) where `value` has a reading.
fn per_gpu<'a>(
    gpus: &'a [GpuEntry],
    strings: &'a [GpuStrings],
    value: impl Fn(&DeviceReading) -> Option<f64>,
) -> Vec<(Labels<'a>, f64)> {
    let mut rows = Vec::new();
    for (gpu, s) in gpus.iter().zip(strings) {
        if let Some(v) = value(&gpu.device) {
            for owner in &gpu.owners {
                rows.push((gpu_labels(gpu, s, owner), v));
            }
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

const MIB: f64 = 1024.0 * 1024.0;

pub fn encode_snapshot(
    snap: &Snapshot,
    options: &ExpositionOptions,
    enc: &mut DescriptorEncoder<'_>,
) -> Result<(), std::fmt::Error> {
    let strings: Vec<GpuStrings> = snap
        .gpus
        .iter()
        .map(|g| GpuStrings {
            index: g.device.identity.index.to_string(),
        })
        .collect();
    let gpus = snap.gpus.as_slice();
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

    // ---- identity
    let mut info_rows = Vec::new();
    let mig_modes: Vec<&str> = gpus
        .iter()
        .map(|g| match g.device.mig_enabled {
            Some(true) => "enabled",
            Some(false) => "disabled",
            None => "",
        })
        .collect();
    for ((gpu, s), mig_mode) in gpus.iter().zip(&strings).zip(&mig_modes) {
        let id = &gpu.device.identity;
        info_rows.push((
            vec![
                ("gpu", s.index.as_str()),
                ("gpu_uuid", id.uuid.as_str()),
                ("gpu_model", id.name.as_str()),
                ("pci_bus_id", id.pci_bus_id.as_deref().unwrap_or("")),
                ("serial", id.serial.as_deref().unwrap_or("")),
                ("driver_version", driver_version.as_str()),
                ("cuda_version", cuda_version.as_str()),
                ("mig_mode", *mig_mode),
                ("node", snap.node.as_str()),
            ],
            1.0,
        ));
    }
    gauge(
        enc,
        "llm_gpu_info",
        "Static identity of each GPU; join on gpu_uuid.",
        info_rows,
    )?;

    // ---- per GPU
    gauge(
        enc,
        "llm_gpu_up",
        "1 when the GPU answered in the last collection, 0 when it is lost (fell off the bus) or gone.",
        {
            let mut rows = Vec::new();
            for (gpu, s) in gpus.iter().zip(&strings) {
                for owner in &gpu.owners {
                    rows.push((gpu_labels(gpu, s, owner), if gpu.up { 1.0 } else { 0.0 }));
                }
            }
            rows
        },
    )?;
    gauge(
        enc,
        "llm_gpu_utilization_ratio",
        "Fraction of the last sample period during which a kernel ran on the GPU (NVML utilization.gpu).",
        per_gpu(gpus, &strings, |d| d.utilization_gpu_percent.map(|v| f64::from(v) / 100.0)),
    )?;
    gauge(
        enc,
        "llm_gpu_memory_utilization_ratio",
        "Fraction of the last sample period during which device memory was read or written (NVML utilization.memory); not capacity.",
        per_gpu(gpus, &strings, |d| d.utilization_memory_percent.map(|v| f64::from(v) / 100.0)),
    )?;
    gauge(
        enc,
        "llm_gpu_memory_used_bytes",
        "Device memory allocated (NVML memory info v2 'used').",
        per_gpu(gpus, &strings, |d| d.memory.map(|m| m.used_bytes as f64)),
    )?;
    gauge(
        enc,
        "llm_gpu_memory_free_bytes",
        "Device memory neither allocated nor reserved.",
        per_gpu(gpus, &strings, |d| d.memory.map(|m| m.free_bytes as f64)),
    )?;
    gauge(
        enc,
        "llm_gpu_memory_total_bytes",
        "Installed device memory.",
        per_gpu(gpus, &strings, |d| d.memory.map(|m| m.total_bytes as f64)),
    )?;
    gauge(
        enc,
        "llm_gpu_memory_reserved_bytes",
        "Device memory reserved by the driver and firmware.",
        per_gpu(gpus, &strings, |d| {
            d.memory.map(|m| m.reserved_bytes as f64)
        }),
    )?;
    gauge(
        enc,
        "llm_gpu_temperature_celsius",
        "GPU core temperature.",
        per_gpu(gpus, &strings, |d| d.temperature_celsius.map(f64::from)),
    )?;
    gauge(
        enc,
        "llm_gpu_power_usage_watts",
        "Board power draw.",
        per_gpu(gpus, &strings, |d| {
            d.power_usage_milliwatts.map(|v| f64::from(v) / 1000.0)
        }),
    )?;
    gauge(
        enc,
        "llm_gpu_power_limit_watts",
        "Enforced power limit.",
        per_gpu(gpus, &strings, |d| {
            d.power_limit_milliwatts.map(|v| f64::from(v) / 1000.0)
        }),
    )?;
    counter(
        enc,
        "llm_gpu_energy_consumption_joules",
        "Energy consumed since the driver was loaded.",
        per_gpu(gpus, &strings, |d| {
            d.energy_millijoules.map(|v| v as f64 / 1000.0)
        }),
    )?;
    gauge(
        enc,
        "llm_gpu_sm_clock_hertz",
        "Current SM clock.",
        per_gpu(gpus, &strings, |d| {
            d.sm_clock_mhz.map(|v| f64::from(v) * 1e6)
        }),
    )?;
    gauge(
        enc,
        "llm_gpu_memory_clock_hertz",
        "Current memory clock.",
        per_gpu(gpus, &strings, |d| {
            d.memory_clock_mhz.map(|v| f64::from(v) * 1e6)
        }),
    )?;
    gauge(
        enc,
        "llm_gpu_throttle_reason_active",
        "1 while NVML reports this clocks-event (throttle) reason.",
        {
            let mut rows = Vec::new();
            for (gpu, s) in gpus.iter().zip(&strings) {
                let Some(bits) = gpu.device.throttle_reasons else {
                    continue;
                };
                for owner in &gpu.owners {
                    for (bit, reason) in THROTTLE_REASONS {
                        let mut labels = gpu_labels(gpu, s, owner);
                        labels.push(("reason", reason));
                        rows.push((labels, if bits & bit != 0 { 1.0 } else { 0.0 }));
                    }
                }
            }
            rows
        },
    )?;
    counter(
        enc,
        "llm_gpu_ecc_errors",
        "ECC errors since the driver was loaded (volatile counters), by error_type.",
        {
            let mut rows = Vec::new();
            for (gpu, s) in gpus.iter().zip(&strings) {
                for (error_type, value) in [
                    ("corrected", gpu.device.ecc_corrected),
                    ("uncorrected", gpu.device.ecc_uncorrected),
                ] {
                    let Some(v) = value else { continue };
                    for owner in &gpu.owners {
                        let mut labels = gpu_labels(gpu, s, owner);
                        labels.push(("error_type", error_type));
                        rows.push((labels, v as f64));
                    }
                }
            }
            rows
        },
    )?;
    counter(
        enc,
        "llm_gpu_pcie_replays",
        "PCIe replay counter.",
        per_gpu(gpus, &strings, |d| d.pcie_replays.map(f64::from)),
    )?;
    {
        let xid_index: Vec<String> = snap.xid.iter().map(|x| x.gpu_index.to_string()).collect();
        let mut rows = Vec::new();
        for (x, index) in snap.xid.iter().zip(&xid_index) {
            let mut labels = vec![
                (
                    "gpu",
                    if x.gpu_index == u32::MAX {
                        ""
                    } else {
                        index.as_str()
                    },
                ),
                ("gpu_uuid", x.gpu_uuid.as_str()),
            ];
            push_owner(&mut labels, &x.owner);
            labels.push(("xid", x.xid.as_str()));
            rows.push((labels, x.count as f64));
        }
        counter(
            enc,
            "llm_gpu_xid_errors",
            "XID errors reported by the driver (NVML events), by XID code, attributed to the pods holding the GPU when it happened.",
            rows,
        )?;
    }

    // ---- per container (process memory)
    {
        let mem_index: Vec<String> = snap
            .container_memory
            .iter()
            .map(|m| m.gpu_index.to_string())
            .collect();
        let mut used = Vec::new();
        let mut count = Vec::new();
        for (m, index) in snap.container_memory.iter().zip(&mem_index) {
            let mut labels = vec![("gpu", index.as_str()), ("gpu_uuid", m.gpu_uuid.as_str())];
            push_owner(&mut labels, &m.owner);
            used.push((labels.clone(), m.used_bytes as f64));
            count.push((labels, m.processes as f64));
        }
        gauge(
            enc,
            "llm_gpu_container_memory_used_bytes",
            "GPU memory of the compute processes of a container, found through each process's cgroup (processes outside pods have empty pod labels).",
            used,
        )?;
        gauge(
            enc,
            "llm_gpu_container_processes",
            "Compute processes of a container on the GPU.",
            count,
        )?;
    }

    // ---- MIG
    {
        let mig_ids: Vec<Vec<String>> = gpus
            .iter()
            .map(|g| {
                g.mig
                    .iter()
                    .map(|m| {
                        m.reading
                            .gpu_instance_id
                            .map(|i| i.to_string())
                            .unwrap_or_default()
                    })
                    .collect()
            })
            .collect();
        let ci_ids: Vec<Vec<String>> = gpus
            .iter()
            .map(|g| {
                g.mig
                    .iter()
                    .map(|m| {
                        m.reading
                            .compute_instance_id
                            .map(|i| i.to_string())
                            .unwrap_or_default()
                    })
                    .collect()
            })
            .collect();
        let mut info = Vec::new();
        let mut used = Vec::new();
        let mut free = Vec::new();
        let mut total = Vec::new();
        for (((gpu, s), gis), cis) in gpus.iter().zip(&strings).zip(&mig_ids).zip(&ci_ids) {
            for ((mig, gi), ci) in gpu.mig.iter().zip(gis).zip(cis) {
                info.push((
                    vec![
                        ("gpu", s.index.as_str()),
                        ("gpu_uuid", gpu.device.identity.uuid.as_str()),
                        ("gpu_instance_id", gi.as_str()),
                        ("compute_instance_id", ci.as_str()),
                        ("mig_profile", mig.reading.profile.as_str()),
                        ("mig_uuid", mig.reading.uuid.as_str()),
                    ],
                    1.0,
                ));
                let Some(memory) = mig.reading.memory else {
                    continue;
                };
                for owner in &mig.owners {
                    let mut labels = vec![
                        ("gpu", s.index.as_str()),
                        ("gpu_uuid", gpu.device.identity.uuid.as_str()),
                        ("gpu_instance_id", gi.as_str()),
                        ("mig_profile", mig.reading.profile.as_str()),
                    ];
                    push_owner(&mut labels, owner);
                    used.push((labels.clone(), memory.used_bytes as f64));
                    free.push((labels.clone(), memory.free_bytes as f64));
                    total.push((labels, memory.total_bytes as f64));
                }
            }
        }
        gauge(
            enc,
            "llm_gpu_mig_info",
            "Static identity of each MIG instance.",
            info,
        )?;
        gauge(
            enc,
            "llm_gpu_mig_memory_used_bytes",
            "Memory allocated in a MIG instance.",
            used,
        )?;
        gauge(
            enc,
            "llm_gpu_mig_memory_free_bytes",
            "Free memory of a MIG instance.",
            free,
        )?;
        gauge(
            enc,
            "llm_gpu_mig_memory_total_bytes",
            "Memory of a MIG instance.",
            total,
        )?;
    }

    // ---- allocation
    {
        let mut rows = Vec::new();
        for f in &snap.allocation_failures {
            let mut labels = vec![("resource", f.resource.as_str()), ("reason", f.reason)];
            labels.extend(f.workload.iter());
            rows.push((labels, f.count as f64));
        }
        counter(
            enc,
            "llm_gpu_allocation_failures",
            "Pods on this node refused a GPU at admission: status.reason OutOf<gpu resource> (insufficient_resource) or UnexpectedAdmissionError naming a GPU resource (device_plugin_error).",
            rows,
        )?;
        gauge(
            enc,
            "llm_gpu_devices_allocatable",
            "GPU device IDs the kubelet can allocate, per resource (PodResources GetAllocatableResources).",
            snap.devices_allocatable
                .iter()
                .map(|(r, n)| (vec![("resource", r.as_str())], *n as f64))
                .collect(),
        )?;
        gauge(
            enc,
            "llm_gpu_devices_allocated",
            "GPU device IDs allocated to containers, per resource (PodResources List).",
            snap.devices_allocated
                .iter()
                .map(|(r, n)| (vec![("resource", r.as_str())], *n as f64))
                .collect(),
        )?;
    }

    // ---- exporter health
    let version = env!("CARGO_PKG_VERSION");
    gauge(
        enc,
        "llm_gpu_exporter_build_info",
        "Exporter version and the node it runs on.",
        vec![(
            vec![("version", version), ("node", snap.node.as_str())],
            1.0,
        )],
    )?;
    let nvml_up = matches!(snap.nvml, NvmlStatus::Up { .. });
    gauge(
        enc,
        "llm_gpu_exporter_nvml_up",
        "1 when the NVML library is loaded and initialised.",
        vec![(vec![], if nvml_up { 1.0 } else { 0.0 })],
    )?;
    if let NvmlStatus::Down { kind, .. } = &snap.nvml {
        gauge(
            enc,
            "llm_gpu_exporter_nvml_down_reason",
            "Present while NVML is unavailable; kind says why (library_not_found: no libnvidia-ml on this node).",
            vec![(vec![("kind", kind.as_str())], 1.0)],
        )?;
    }
    gauge(
        enc,
        "llm_gpu_exporter_collector_success",
        "1 when the collector's last pass succeeded.",
        snap.collectors
            .iter()
            .map(|(c, s)| {
                (
                    vec![("collector", c.as_str())],
                    if s.success { 1.0 } else { 0.0 },
                )
            })
            .collect(),
    )?;
    gauge(
        enc,
        "llm_gpu_exporter_collector_duration_seconds",
        "Duration of the collector's last pass.",
        snap.collectors
            .iter()
            .map(|(c, s)| (vec![("collector", c.as_str())], s.duration_seconds))
            .collect(),
    )?;
    counter(
        enc,
        "llm_gpu_exporter_errors",
        "Failed calls by collector and kind.",
        snap.errors
            .iter()
            .map(|((c, k), n)| {
                (
                    vec![("collector", c.as_str()), ("kind", k.as_str())],
                    *n as f64,
                )
            })
            .collect(),
    )?;
    counter(
        enc,
        "llm_gpu_exporter_collections",
        "Collection passes completed.",
        vec![(vec![], snap.collections_total as f64)],
    )?;
    counter(
        enc,
        "llm_gpu_exporter_enumerations",
        "Times the GPU list was (re)built: at start, when the GPU count changed, after a GPU was lost.",
        vec![(vec![], snap.enumerations_total as f64)],
    )?;
    gauge(
        enc,
        "llm_gpu_exporter_last_collection_timestamp_seconds",
        "Unix time of the last completed collection.",
        vec![(vec![], snap.last_collection_unix_seconds)],
    )?;
    if let Some(pods) = snap.pods_on_node {
        gauge(
            enc,
            "llm_gpu_exporter_node_pods",
            "Pods on this node known from the Kubernetes API watch.",
            vec![(vec![], pods as f64)],
        )?;
        gauge(
            enc,
            "llm_gpu_exporter_node_pods_stale",
            "1 while pod attribution is served from the last known pods because the Kubernetes API watch failed or fell silent.",
            vec![(vec![], if snap.pods_stale { 1.0 } else { 0.0 })],
        )?;
    }

    if options.dcgm_compat {
        encode_dcgm(snap, &strings, enc)?;
    }
    Ok(())
}

/// A dcgm-exporter field: name, help and how to read it from a GPU.
type DcgmField<'f> = (&'f str, &'f str, &'f dyn Fn(&GpuEntry) -> Option<f64>);

/// dcgm-exporter names, units and labels (`gpu`, `UUID`, `device`,
/// `modelName`, `Hostname`, `pci_bus_id`, then pod and workload labels), so
/// dashboards written for it keep working. All are gauges: dcgm-exporter's
/// counters have no `_total` suffix, which a counter type would add.
fn encode_dcgm(
    snap: &Snapshot,
    strings: &[GpuStrings],
    enc: &mut DescriptorEncoder<'_>,
) -> Result<(), std::fmt::Error> {
    let gpus = snap.gpus.as_slice();
    let devices: Vec<String> = gpus
        .iter()
        .map(|g| {
            format!(
                "nvidia{}",
                g.device
                    .identity
                    .minor_number
                    .unwrap_or(g.device.identity.index)
            )
        })
        .collect();
    let rows = |value: &dyn Fn(&GpuEntry) -> Option<f64>| {
        let mut rows = Vec::new();
        for (i, gpu) in gpus.iter().enumerate() {
            if let Some(v) = value(gpu) {
                for owner in &gpu.owners {
                    rows.push((dcgm_labels(snap, &strings[i], &devices[i], gpu, owner), v));
                }
            }
        }
        rows
    };
    let fields: [DcgmField<'_>; 12] = [
        ("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", &|g| {
            g.device.utilization_gpu_percent.map(f64::from)
        }),
        (
            "DCGM_FI_DEV_MEM_COPY_UTIL",
            "Memory utilization (in %).",
            &|g| g.device.utilization_memory_percent.map(f64::from),
        ),
        (
            "DCGM_FI_DEV_FB_USED",
            "Framebuffer memory used (in MiB).",
            &|g| g.device.memory.map(|m| (m.used_bytes as f64 / MIB).floor()),
        ),
        (
            "DCGM_FI_DEV_FB_FREE",
            "Framebuffer memory free (in MiB).",
            &|g| g.device.memory.map(|m| (m.free_bytes as f64 / MIB).floor()),
        ),
        (
            "DCGM_FI_DEV_FB_RESERVED",
            "Framebuffer memory reserved (in MiB).",
            &|g| {
                g.device
                    .memory
                    .map(|m| (m.reserved_bytes as f64 / MIB).floor())
            },
        ),
        ("DCGM_FI_DEV_GPU_TEMP", "GPU temperature (in C).", &|g| {
            g.device.temperature_celsius.map(f64::from)
        }),
        ("DCGM_FI_DEV_POWER_USAGE", "Power draw (in W).", &|g| {
            g.device
                .power_usage_milliwatts
                .map(|v| f64::from(v) / 1000.0)
        }),
        (
            "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
            "Total energy consumption since boot (in mJ).",
            &|g| g.device.energy_millijoules.map(|v| v as f64),
        ),
        ("DCGM_FI_DEV_SM_CLOCK", "SM frequency (in MHz).", &|g| {
            g.device.sm_clock_mhz.map(f64::from)
        }),
        (
            "DCGM_FI_DEV_MEM_CLOCK",
            "Memory frequency (in MHz).",
            &|g| g.device.memory_clock_mhz.map(f64::from),
        ),
        (
            "DCGM_FI_DEV_PCIE_REPLAY_COUNTER",
            "Total number of PCIe retries.",
            &|g| g.device.pcie_replays.map(f64::from),
        ),
        (
            "DCGM_FI_DEV_XID_ERRORS",
            "Value of the last XID error encountered.",
            &|g| Some(g.last_xid.map(|v| v as f64).unwrap_or(0.0)).filter(|_| g.up),
        ),
    ];
    for (name, help, value) in fields {
        gauge(enc, name, help, rows(value))?;
    }
    Ok(())
}

fn dcgm_labels<'a>(
    snap: &'a Snapshot,
    strings: &'a GpuStrings,
    device: &'a str,
    gpu: &'a GpuEntry,
    owner: &'a Owner,
) -> Labels<'a> {
    let mut labels = vec![
        ("gpu", strings.index.as_str()),
        ("UUID", gpu.device.identity.uuid.as_str()),
        ("device", device),
        ("modelName", gpu.device.identity.name.as_str()),
        ("Hostname", snap.node.as_str()),
        (
            "pci_bus_id",
            gpu.device.identity.pci_bus_id.as_deref().unwrap_or(""),
        ),
    ];
    push_owner(&mut labels, owner);
    labels
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::{DeviceIdentity, MemoryReading};
    use crate::health::{Collector, CollectorStatus, ErrorKind};
    use prometheus_client::registry::Registry;
    use std::collections::BTreeMap;
    use tokentap_workload::WorkloadLabelPolicy;

    fn snapshot() -> Snapshot {
        let policy = WorkloadLabelPolicy::default();
        let mut snap = Snapshot::empty("node-a", &policy);
        snap.nvml = NvmlStatus::Up {
            driver_version: Some("550.54.15".into()),
            cuda_driver_version: Some(12040),
        };
        let mut labels = BTreeMap::new();
        labels.insert(
            "workload.k8sllm.io/model".to_string(),
            "mistral-7b".to_string(),
        );
        let owner = Owner {
            namespace: "llm".into(),
            pod: "vllm-0".into(),
            container: "server".into(),
            workload: policy.labels_for(&labels),
        };
        snap.gpus.push(GpuEntry {
            device: DeviceReading {
                identity: DeviceIdentity {
                    index: 0,
                    uuid: "GPU-a".into(),
                    name: "NVIDIA H100 80GB HBM3".into(),
                    pci_bus_id: Some("00000000:17:00.0".into()),
                    serial: None,
                    minor_number: Some(0),
                },
                utilization_gpu_percent: Some(87),
                memory: Some(MemoryReading {
                    total_bytes: 80 << 30,
                    used_bytes: 3 << 30,
                    free_bytes: 77 << 30,
                    reserved_bytes: 0,
                }),
                power_usage_milliwatts: Some(312_500),
                energy_millijoules: Some(123_456),
                throttle_reasons: Some(0x4),
                ..DeviceReading::default()
            },
            up: true,
            owners: vec![owner],
            mig: vec![],
            last_xid: Some(79),
        });
        snap.xid.push(crate::snapshot::XidCount {
            gpu_index: 0,
            gpu_uuid: "GPU-a".into(),
            xid: "79".into(),
            owner: snap.gpus[0].owners[0].clone(),
            count: 3,
        });
        snap.collectors.insert(
            Collector::Nvml,
            CollectorStatus {
                success: true,
                duration_seconds: 0.002,
            },
        );
        snap.errors
            .insert((Collector::PodResources, ErrorKind::NotFound), 2);
        snap
    }

    fn render(snap: Snapshot, dcgm: bool) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(GpuCollector::new(
            Arc::new(SnapshotCell::new(snap)),
            ExpositionOptions { dcgm_compat: dcgm },
        )));
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &registry).unwrap();
        out
    }

    fn sample<'a>(
        scrape: &'a prometheus_parse::Scrape,
        name: &str,
    ) -> Vec<&'a prometheus_parse::Sample> {
        scrape.samples.iter().filter(|s| s.metric == name).collect()
    }

    fn value(s: &prometheus_parse::Sample) -> f64 {
        match s.value {
            prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        }
    }

    #[test]
    fn exposition_parses_with_units_converted_and_labels_attached() {
        let text = render(snapshot(), false);
        let scrape =
            prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
        let util = sample(&scrape, "llm_gpu_utilization_ratio");
        assert_eq!(util.len(), 1);
        assert!((value(util[0]) - 0.87).abs() < 1e-9);
        assert_eq!(util[0].labels.get("pod"), Some("vllm-0"));
        assert_eq!(util[0].labels.get("model"), Some("mistral-7b"));
        assert_eq!(util[0].labels.get("team"), Some("unknown"));
        assert_eq!(util[0].labels.get("gpu_uuid"), Some("GPU-a"));
        assert_eq!(
            value(sample(&scrape, "llm_gpu_power_usage_watts")[0]),
            312.5
        );
        assert_eq!(
            value(sample(&scrape, "llm_gpu_energy_consumption_joules_total")[0]),
            123.456
        );
        assert_eq!(
            value(sample(&scrape, "llm_gpu_memory_used_bytes")[0]),
            (3u64 << 30) as f64
        );
        let throttles = sample(&scrape, "llm_gpu_throttle_reason_active");
        assert_eq!(throttles.len(), 9);
        let active: Vec<_> = throttles
            .iter()
            .filter(|s| value(s) == 1.0)
            .map(|s| s.labels.get("reason").unwrap_or(""))
            .collect();
        assert_eq!(active, ["sw_power_cap"]);
        let info = sample(&scrape, "llm_gpu_info");
        assert_eq!(info[0].labels.get("cuda_version"), Some("12.4"));
        assert_eq!(info[0].labels.get("node"), Some("node-a"));
        // Absent readings give no series at all.
        assert!(sample(&scrape, "llm_gpu_temperature_celsius").is_empty());
        let errors = sample(&scrape, "llm_gpu_exporter_errors_total");
        assert_eq!(errors[0].labels.get("kind"), Some("not_found"));
        assert_eq!(value(errors[0]), 2.0);
        assert!(sample(&scrape, "DCGM_FI_DEV_GPU_UTIL").is_empty());
        let xid = sample(&scrape, "llm_gpu_xid_errors_total");
        assert_eq!(xid.len(), 1);
        assert_eq!(xid[0].labels.get("xid"), Some("79"));
        assert_eq!(xid[0].labels.get("pod"), Some("vllm-0"));
        assert_eq!(value(xid[0]), 3.0);
        assert!(text.contains("# TYPE llm_gpu_xid_errors_total counter"));
    }

    #[test]
    fn dcgm_names_use_dcgm_units() {
        let text = render(snapshot(), true);
        let scrape =
            prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
        let util = sample(&scrape, "DCGM_FI_DEV_GPU_UTIL");
        assert_eq!(value(util[0]), 87.0);
        assert_eq!(util[0].labels.get("UUID"), Some("GPU-a"));
        assert_eq!(util[0].labels.get("device"), Some("nvidia0"));
        assert_eq!(util[0].labels.get("Hostname"), Some("node-a"));
        assert_eq!(util[0].labels.get("pod"), Some("vllm-0"));
        assert_eq!(value(sample(&scrape, "DCGM_FI_DEV_FB_USED")[0]), 3072.0);
        assert_eq!(value(sample(&scrape, "DCGM_FI_DEV_XID_ERRORS")[0]), 79.0);
        assert_eq!(
            value(sample(&scrape, "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION")[0]),
            123456.0
        );
    }

    #[test]
    fn nvml_down_is_explained() {
        let mut snap = snapshot();
        snap.gpus.clear();
        snap.nvml = NvmlStatus::Down {
            kind: ErrorKind::LibraryNotFound,
            message: "x".into(),
        };
        let text = render(snap, false);
        assert!(text.contains("llm_gpu_exporter_nvml_up 0"));
        assert!(text.contains("llm_gpu_exporter_nvml_down_reason{kind=\"library_not_found\"} 1"));
        assert!(!text.contains("llm_gpu_info{"));
    }
}
