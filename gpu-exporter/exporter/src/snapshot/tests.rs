//! Passes built from plain inputs: attribution, lost GPUs, XIDs, MIG,
//! process memory, admission failures.

use super::*;
use crate::cgroup::ProcessOwner;
use crate::gpu::{CallError, DeviceIdentity, MemoryReading, ProcessReading, XidEvent};
use crate::kube::NodePod;
use crate::podresources::proto;
use std::collections::HashMap;
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
