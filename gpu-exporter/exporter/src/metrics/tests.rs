//! Exposition tests: parsed back with an independent parser.

use super::*;
use crate::gpu::{DeviceIdentity, DeviceReading, MemoryReading, NvmlStatus};
use crate::health::{Collector, CollectorStatus, ErrorKind};
use crate::snapshot::{GpuEntry, Owner};
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
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
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
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
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
