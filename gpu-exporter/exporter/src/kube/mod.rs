//! A small Kubernetes API client that keeps the pods of one node in memory:
//! LIST with `fieldSelector=spec.nodeName=<node>`, then WATCH from the list's
//! resourceVersion; a 410 Gone or any error leads to a fresh LIST after a
//! backoff. In cluster it speaks HTTPS with the service-account CA and token
//! (re-read on every connection, since bound tokens rotate).
//!
//! Only the fields the exporter needs are decoded; everything else in a pod
//! object is skipped by serde.
//!
//! Split by concern: [`model`] (the pod fields decoded from the API),
//! [`store`] (the in-memory pod index the watch fills) and [`client`] (LIST,
//! WATCH, liveness, TLS).

pub mod client;
pub mod model;
pub mod store;

pub use client::{
    in_cluster_url, list_path, probe_path, watch_path, KubeClient, KubeConfig, KubeError, SA_CA,
    SA_TOKEN,
};
pub use model::{decode_pod, decode_watch_line, NodePod, WatchEvent};
pub use store::{PodChange, PodChanges, PodIndex, PodStore, WatchReport};

/// A pod object as the API serves it, for the tests of every part.
#[cfg(test)]
pub(crate) mod fixtures {
    pub fn pod_json(name: &str, uid: &str) -> serde_json::Value {
        serde_json::json!({
            "metadata": {
                "name": name, "namespace": "llm", "uid": uid, "resourceVersion": "42",
                "labels": {"workload.k8sllm.io/model": "mistral-7b"},
                "annotations": {"prometheus.io/port": "8000"},
                "managedFields": [{"manager": "kubelet"}]
            },
            "spec": {"nodeName": "gpu-node-1", "containers": [
                {"name": "server", "ports": [{"name": "http", "containerPort": 8000}]},
                {"name": "sidecar"}
            ]},
            "status": {
                "phase": "Running", "podIP": "10.0.0.7",
                "containerStatuses": [
                    {"name": "server", "ready": true, "restartCount": 2,
                     "containerID": "containerd://abc123"},
                    {"name": "sidecar", "ready": true, "restartCount": 1}
                ]
            }
        })
    }
}
