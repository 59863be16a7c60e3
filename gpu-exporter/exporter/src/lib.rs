//! tokentap gpu-exporter: GPU metrics through NVML, attributed to the pods
//! and workload labels (`model`, `route_class`, `team`) that the gateway
//! uses, so GPU, runtime and gateway series join.
//!
//! Layout: [`gpu`] reads GPUs (NVML or a test fake), [`podresources`] asks
//! the kubelet which container holds which GPU, [`kube`] watches this
//! node's pods for their labels, [`cgroup`] maps GPU processes to pods,
//! [`snapshot`] joins all of that once per pass, [`metrics`] and [`server`]
//! expose the last snapshot, and [`app`] wires it together.

pub mod app;
pub mod cgroup;
pub mod config;
pub mod gpu;
pub mod health;
pub mod kube;
pub mod metrics;
pub mod podresources;
pub mod server;
pub mod snapshot;
