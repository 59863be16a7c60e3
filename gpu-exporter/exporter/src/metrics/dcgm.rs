//! dcgm-exporter names, units and labels (`gpu`, `UUID`, `device`,
//! `modelName`, `Hostname`, `pci_bus_id`, then pod and workload labels), so
//! dashboards written for it keep working. All are gauges: dcgm-exporter's
//! counters have no `_total` suffix, which a counter type would add.

use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;
use tokentap_runtime_metrics::exposition::encode_family;

use super::families::{push_owner, Labels, Rendered, Row};
use crate::snapshot::{GpuEntry, Owner, Snapshot};

const MIB: f64 = 1024.0 * 1024.0;

/// A dcgm-exporter field: name, help and how to read it from a GPU.
type Field = (&'static str, &'static str, fn(&GpuEntry) -> Option<f64>);

const FIELDS: [Field; 12] = [
    ("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", |g| {
        g.device.utilization_gpu_percent.map(f64::from)
    }),
    (
        "DCGM_FI_DEV_MEM_COPY_UTIL",
        "Memory utilization (in %).",
        |g| g.device.utilization_memory_percent.map(f64::from),
    ),
    (
        "DCGM_FI_DEV_FB_USED",
        "Framebuffer memory used (in MiB).",
        |g| g.device.memory.map(|m| (m.used_bytes as f64 / MIB).floor()),
    ),
    (
        "DCGM_FI_DEV_FB_FREE",
        "Framebuffer memory free (in MiB).",
        |g| g.device.memory.map(|m| (m.free_bytes as f64 / MIB).floor()),
    ),
    (
        "DCGM_FI_DEV_FB_RESERVED",
        "Framebuffer memory reserved (in MiB).",
        |g| {
            g.device
                .memory
                .map(|m| (m.reserved_bytes as f64 / MIB).floor())
        },
    ),
    ("DCGM_FI_DEV_GPU_TEMP", "GPU temperature (in C).", |g| {
        g.device.temperature_celsius.map(f64::from)
    }),
    ("DCGM_FI_DEV_POWER_USAGE", "Power draw (in W).", |g| {
        g.device
            .power_usage_milliwatts
            .map(|v| f64::from(v) / 1000.0)
    }),
    (
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
        "Total energy consumption since boot (in mJ).",
        |g| g.device.energy_millijoules.map(|v| v as f64),
    ),
    ("DCGM_FI_DEV_SM_CLOCK", "SM frequency (in MHz).", |g| {
        g.device.sm_clock_mhz.map(f64::from)
    }),
    ("DCGM_FI_DEV_MEM_CLOCK", "Memory frequency (in MHz).", |g| {
        g.device.memory_clock_mhz.map(f64::from)
    }),
    (
        "DCGM_FI_DEV_PCIE_REPLAY_COUNTER",
        "Total number of PCIe retries.",
        |g| g.device.pcie_replays.map(f64::from),
    ),
    (
        "DCGM_FI_DEV_XID_ERRORS",
        "Value of the last XID error encountered.",
        |g| Some(g.last_xid.map(|v| v as f64).unwrap_or(0.0)).filter(|_| g.up),
    ),
];

pub(super) fn encode(
    snap: &Snapshot,
    rendered: &Rendered,
    enc: &mut DescriptorEncoder<'_>,
) -> Result<(), std::fmt::Error> {
    let devices: Vec<String> = snap
        .gpus
        .iter()
        .map(|g| {
            let id = &g.device.identity;
            format!("nvidia{}", id.minor_number.unwrap_or(id.index))
        })
        .collect();
    for (name, help, value) in FIELDS {
        let mut rows: Vec<Row<'_>> = Vec::new();
        for (i, gpu) in snap.gpus.iter().enumerate() {
            if let Some(v) = value(gpu) {
                for owner in &gpu.owners {
                    let index = rendered.gpu_index[i].as_str();
                    rows.push((labels(snap, index, &devices[i], gpu, owner), v));
                }
            }
        }
        encode_family(enc, name, help, MetricType::Gauge, &rows)?;
    }
    Ok(())
}

fn labels<'a>(
    snap: &'a Snapshot,
    index: &'a str,
    device: &'a str,
    gpu: &'a GpuEntry,
    owner: &'a Owner,
) -> Labels<'a> {
    let id = &gpu.device.identity;
    let mut labels = vec![
        ("gpu", index),
        ("UUID", id.uuid.as_str()),
        ("device", device),
        ("modelName", id.name.as_str()),
        ("Hostname", snap.node.as_str()),
        ("pci_bus_id", id.pci_bus_id.as_deref().unwrap_or("")),
    ];
    push_owner(&mut labels, owner);
    labels
}
