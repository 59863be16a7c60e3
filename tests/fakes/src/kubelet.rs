//! A fake kubelet PodResources server (`v1.PodResourcesLister`) on a unix
//! socket, answering from a JSON scenario file that is re-read whenever it
//! changes, so tests can move GPUs between pods while the exporter runs.
//!
//! Scenario:
//! ```json
//! {
//!   "pods": [{"namespace": "llm", "name": "vllm-0", "containers": [
//!       {"name": "server", "devices": [
//!           {"resource_name": "nvidia.com/gpu", "device_ids": ["GPU-…"]}]}]}],
//!   "allocatable": [{"resource_name": "nvidia.com/gpu", "device_ids": ["GPU-…"]}],
//!   "fail": null
//! }
//! ```
//! `fail` set to `"unavailable"` or `"internal"` makes every call fail with
//! that gRPC status.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Deserialize;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};

pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("v1");
}

use proto::pod_resources_lister_server::{PodResourcesLister, PodResourcesListerServer};

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Scenario {
    pub pods: Vec<PodSpec>,
    pub allocatable: Vec<DevicesSpec>,
    pub fail: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PodSpec {
    pub namespace: String,
    pub name: String,
    pub containers: Vec<ContainerSpec>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ContainerSpec {
    pub name: String,
    pub devices: Vec<DevicesSpec>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DevicesSpec {
    pub resource_name: String,
    pub device_ids: Vec<String>,
}

fn devices(spec: &DevicesSpec) -> proto::ContainerDevices {
    proto::ContainerDevices {
        resource_name: spec.resource_name.clone(),
        device_ids: spec.device_ids.clone(),
        topology: Some(proto::TopologyInfo {
            nodes: vec![proto::NumaNode { id: 0 }],
        }),
    }
}

impl Scenario {
    pub fn list(&self) -> proto::ListPodResourcesResponse {
        proto::ListPodResourcesResponse {
            pod_resources: self
                .pods
                .iter()
                .map(|p| proto::PodResources {
                    name: p.name.clone(),
                    namespace: p.namespace.clone(),
                    containers: p
                        .containers
                        .iter()
                        .map(|c| proto::ContainerResources {
                            name: c.name.clone(),
                            devices: c.devices.iter().map(devices).collect(),
                            cpu_ids: vec![],
                            memory: vec![],
                            dynamic_resources: vec![],
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    fn failure(&self) -> Option<Status> {
        match self.fail.as_deref() {
            None => None,
            Some("unavailable") => Some(Status::unavailable("fake kubelet: unavailable")),
            Some(other) => Some(Status::internal(format!("fake kubelet: {other}"))),
        }
    }
}

/// The scenario file and its last-seen (size, inode, mtime) signature.
struct Source {
    path: PathBuf,
    sig: Option<(u64, u64, i64, i64)>,
    scenario: Scenario,
}

fn signature(path: &Path) -> Option<(u64, u64, i64, i64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.len(), m.ino(), m.mtime(), m.mtime_nsec()))
}

pub fn load(path: &Path) -> anyhow::Result<Scenario> {
    let text = std::fs::read_to_string(path)?;
    Ok(serde_json::from_str(&text)?)
}

pub struct FakeKubelet {
    source: Mutex<Source>,
}

impl FakeKubelet {
    pub fn new(path: PathBuf) -> anyhow::Result<Self> {
        let scenario = load(&path)?;
        Ok(Self {
            source: Mutex::new(Source {
                sig: signature(&path),
                path,
                scenario,
            }),
        })
    }

    /// The current scenario, re-read if the file changed (a broken file keeps
    /// the previous one).
    fn current(&self) -> Scenario {
        let mut source = self.source.lock().unwrap_or_else(|e| e.into_inner());
        let sig = signature(&source.path);
        if sig.is_some() && sig != source.sig {
            match load(&source.path) {
                Ok(s) => {
                    source.scenario = s;
                    source.sig = sig;
                }
                Err(e) => eprintln!("fake kubelet: keeping previous scenario: {e}"),
            }
        }
        source.scenario.clone()
    }
}

#[tonic::async_trait]
impl PodResourcesLister for FakeKubelet {
    async fn list(
        &self,
        _request: Request<proto::ListPodResourcesRequest>,
    ) -> Result<Response<proto::ListPodResourcesResponse>, Status> {
        let scenario = self.current();
        if let Some(status) = scenario.failure() {
            return Err(status);
        }
        Ok(Response::new(scenario.list()))
    }

    async fn get_allocatable_resources(
        &self,
        _request: Request<proto::AllocatableResourcesRequest>,
    ) -> Result<Response<proto::AllocatableResourcesResponse>, Status> {
        let scenario = self.current();
        if let Some(status) = scenario.failure() {
            return Err(status);
        }
        Ok(Response::new(proto::AllocatableResourcesResponse {
            devices: scenario.allocatable.iter().map(devices).collect(),
            cpu_ids: vec![],
            memory: vec![],
        }))
    }

    async fn get(
        &self,
        request: Request<proto::GetPodResourcesRequest>,
    ) -> Result<Response<proto::GetPodResourcesResponse>, Status> {
        let want = request.into_inner();
        let scenario = self.current();
        if let Some(status) = scenario.failure() {
            return Err(status);
        }
        scenario
            .list()
            .pod_resources
            .into_iter()
            .find(|p| p.name == want.pod_name && p.namespace == want.pod_namespace)
            .map(|p| {
                Response::new(proto::GetPodResourcesResponse {
                    pod_resources: Some(p),
                })
            })
            .ok_or_else(|| Status::not_found("pod not found"))
    }
}

/// Serves on `socket` until the process is stopped. Prints one ready line.
pub async fn run(socket: PathBuf, scenario: PathBuf) -> anyhow::Result<()> {
    let service = FakeKubelet::new(scenario)?;
    if socket.exists() {
        std::fs::remove_file(&socket)?;
    }
    let listener = tokio::net::UnixListener::bind(&socket)?;
    println!("READY unix:{}", socket.display());
    tonic::transport::Server::builder()
        .add_service(PodResourcesListerServer::new(service))
        .serve_with_incoming(UnixListenerStream::new(listener))
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenario_maps_to_the_proto() {
        let scenario: Scenario = serde_json::from_str(
            r#"{"pods":[{"namespace":"llm","name":"vllm-0","containers":[
                {"name":"server","devices":[{"resource_name":"nvidia.com/gpu","device_ids":["GPU-1"]}]}]}]}"#,
        )
        .unwrap();
        let list = scenario.list();
        let pod = &list.pod_resources[0];
        assert_eq!(pod.namespace, "llm");
        assert_eq!(pod.containers[0].devices[0].device_ids, ["GPU-1"]);
        assert!(scenario.failure().is_none());
        assert!(serde_json::from_str::<Scenario>(r#"{"podz":[]}"#).is_err());
    }
}
