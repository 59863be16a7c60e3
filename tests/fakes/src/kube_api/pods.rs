//! Pods as scenarios and admin calls give them (full objects, the short
//! form, or the `PodInfo` shape), turned into pod objects.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{json, Value};

/// The short pod form accepted in scenarios and admin calls.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct SimplePod {
    pub name: String,
    pub namespace: String,
    /// Defaults to a UID derived from namespace and name.
    pub uid: Option<String>,
    /// `spec.nodeName`; defaults to the server's `--node`.
    pub node: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    #[serde(rename = "podIP")]
    pub pod_ip: Option<String>,
    /// Defaults to `Running`.
    pub phase: Option<String>,
    /// Defaults to true for Running pods.
    pub ready: Option<bool>,
    pub restart_count: u32,
    pub reason: Option<String>,
    pub message: Option<String>,
    pub containers: Vec<SimpleContainer>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct SimpleContainer {
    pub name: String,
    pub ports: Vec<SimplePort>,
    /// e.g. `containerd://<64 hex>`.
    #[serde(rename = "containerID")]
    pub container_id: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct SimplePort {
    pub name: Option<String>,
    pub container_port: u16,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Scenario {
    pub pods: Vec<Value>,
}

/// A stable fake UID (8-4-4-4-12 hex) from a pod's namespace and name.
pub fn derived_uid(namespace: &str, name: &str) -> String {
    // FNV-1a, twice with different seeds, for 128 bits.
    let hash = |seed: u64| {
        let mut h = seed;
        for b in namespace.bytes().chain([b'/']).chain(name.bytes()) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h
    };
    let (a, b) = (hash(0xcbf2_9ce4_8422_2325), hash(0x8422_2325_cbf2_9ce4));
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        b >> 52,
        b & 0xffff_ffff_ffff
    )
}

/// The short form from a `tokentap_workload::PodInfo` (its serde shape:
/// `ip`, `container_ports`, `restart_count`, ...), so suites that already
/// describe pods that way can feed the fake API directly.
fn from_pod_info(info: tokentap_workload::PodInfo) -> SimplePod {
    let mut containers: Vec<SimpleContainer> = Vec::new();
    for port in &info.container_ports {
        let index = match containers.iter().position(|c| c.name == port.container) {
            Some(i) => i,
            None => {
                containers.push(SimpleContainer {
                    name: port.container.clone(),
                    ..SimpleContainer::default()
                });
                containers.len() - 1
            }
        };
        containers[index].ports.push(SimplePort {
            name: port.name.clone(),
            container_port: port.port,
        });
    }
    if containers.is_empty() {
        containers.push(SimpleContainer {
            name: "main".into(),
            ..SimpleContainer::default()
        });
    }
    SimplePod {
        uid: (!info.uid.is_empty()).then(|| info.uid.clone()),
        pod_ip: info.ip.clone(),
        phase: (!info.phase.is_empty()).then(|| info.phase.clone()),
        ready: Some(info.ready),
        restart_count: info.restart_count,
        labels: info.labels,
        annotations: info.annotations,
        name: info.name,
        namespace: info.namespace,
        containers,
        ..SimplePod::default()
    }
}

/// Turns a scenario pod (full object, short form, or `PodInfo` shape) into a
/// pod object.
pub fn pod_object(value: &Value, default_node: &str) -> Result<Value, String> {
    if value.get("metadata").is_some() {
        return Ok(value.clone());
    }
    let pod: SimplePod = match serde_json::from_value::<SimplePod>(value.clone()) {
        Ok(pod) => pod,
        Err(short_form_error) => {
            match serde_json::from_value::<tokentap_workload::PodInfo>(value.clone()) {
                Ok(info) if value.get("container_ports").is_some() || value.get("ip").is_some() => {
                    from_pod_info(info)
                }
                _ => return Err(short_form_error.to_string()),
            }
        }
    };
    if pod.name.is_empty() || pod.namespace.is_empty() {
        return Err("a pod needs name and namespace".into());
    }
    let phase = pod.phase.clone().unwrap_or_else(|| "Running".into());
    let ready = pod.ready.unwrap_or(phase == "Running");
    let containers: Vec<Value> = pod
        .containers
        .iter()
        .map(|c| {
            json!({
                "name": c.name,
                "image": "fake.invalid/runtime:latest",
                "ports": c.ports.iter().map(|p| {
                    let mut port = json!({"containerPort": p.container_port, "protocol": "TCP"});
                    if let Some(name) = &p.name {
                        port["name"] = json!(name);
                    }
                    port
                }).collect::<Vec<_>>(),
            })
        })
        .collect();
    let statuses: Vec<Value> = pod
        .containers
        .iter()
        .map(|c| {
            let mut status = json!({
                "name": c.name,
                "ready": ready,
                "restartCount": pod.restart_count,
                "image": "fake.invalid/runtime:latest",
                "imageID": "",
                "started": ready,
                "state": if ready { json!({"running": {}}) } else { json!({"waiting": {}}) },
            });
            if let Some(id) = &c.container_id {
                status["containerID"] = json!(id);
            }
            status
        })
        .collect();
    let mut status = json!({
        "phase": phase,
        "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
        "containerStatuses": statuses,
    });
    if let Some(ip) = &pod.pod_ip {
        status["podIP"] = json!(ip);
        status["podIPs"] = json!([{"ip": ip}]);
    }
    if let Some(reason) = &pod.reason {
        status["reason"] = json!(reason);
    }
    if let Some(message) = &pod.message {
        status["message"] = json!(message);
    }
    Ok(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod.name,
            "namespace": pod.namespace,
            "uid": pod.uid.clone().unwrap_or_else(|| derived_uid(&pod.namespace, &pod.name)),
            "labels": pod.labels,
            "annotations": pod.annotations,
            "creationTimestamp": "2026-01-01T00:00:00Z",
        },
        "spec": {
            "nodeName": pod.node.clone().unwrap_or_else(|| default_node.to_string()),
            "containers": containers,
        },
        "status": status,
    }))
}
