//! Which container holds which GPU, from the kubelet PodResources API
//! (`v1.PodResourcesLister/List`) on its unix socket.
//!
//! Device IDs come in the forms the NVIDIA device plugin hands out:
//! `GPU-<uuid>`, `MIG-<uuid>`, either with a `::N` time-slicing replica
//! suffix, and the legacy `MIG-GPU-<uuid>/<gi>/<ci>`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

use crate::health::ErrorKind;

/// Generated from `proto/podresources.proto` (package `v1`).
#[allow(clippy::all, missing_docs)]
pub mod proto {
    tonic::include_proto!("v1");
}

use proto::pod_resources_lister_client::PodResourcesListerClient;

/// Resource names that carry NVIDIA GPUs.
#[derive(Clone, Debug, Default)]
pub struct ResourceFilter {
    extra: BTreeSet<String>,
}

impl ResourceFilter {
    /// `nvidia.com/gpu`, `nvidia.com/gpu.*` (renamed shared resources),
    /// `nvidia.com/mig-*`, plus `extra` names such as `nvidia.com/a100`.
    pub fn new<I: IntoIterator<Item = String>>(extra: I) -> Self {
        Self {
            extra: extra
                .into_iter()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
        }
    }

    pub fn matches(&self, resource: &str) -> bool {
        resource == "nvidia.com/gpu"
            || resource.starts_with("nvidia.com/gpu.")
            || resource.starts_with("nvidia.com/mig-")
            || self.extra.contains(resource)
    }

    /// The resource name as a bounded label value: names outside the filter
    /// become `other`.
    pub fn label<'a>(&self, resource: &'a str) -> &'a str {
        if self.matches(resource) && resource.len() <= 63 {
            resource
        } else {
            "other"
        }
    }
}

/// A device ID from the device plugin, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceRef {
    /// A whole GPU; `replica` is the time-slicing replica index, if any.
    Gpu { uuid: String, replica: Option<u32> },
    /// A MIG instance by its own UUID.
    Mig { uuid: String, replica: Option<u32> },
    /// Old MIG naming: parent GPU UUID, GPU instance id, compute instance id.
    MigLegacy {
        parent_uuid: String,
        gpu_instance_id: u32,
        compute_instance_id: u32,
    },
    /// Anything else (GKE `nvidia0`, vendor-specific forms); not attributed.
    Other(String),
}

impl DeviceRef {
    /// The key a reading is matched by: the GPU or MIG UUID, or
    /// `<parent>/<gi>` for legacy MIG ids.
    pub fn key(&self) -> Option<String> {
        match self {
            DeviceRef::Gpu { uuid, .. } | DeviceRef::Mig { uuid, .. } => Some(uuid.clone()),
            DeviceRef::MigLegacy {
                parent_uuid,
                gpu_instance_id,
                ..
            } => Some(legacy_mig_key(parent_uuid, *gpu_instance_id)),
            DeviceRef::Other(_) => None,
        }
    }
}

/// Matching key of a MIG instance addressed by parent and GPU instance.
pub fn legacy_mig_key(parent_uuid: &str, gpu_instance_id: u32) -> String {
    format!("{parent_uuid}/{gpu_instance_id}")
}

fn split_replica(id: &str) -> (&str, Option<u32>) {
    match id.rsplit_once("::") {
        Some((base, n)) => match n.parse() {
            Ok(replica) => (base, Some(replica)),
            Err(_) => (id, None),
        },
        None => (id, None),
    }
}

fn is_uuid_body(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
}

/// Parses one device ID; never fails, unknown shapes become [`DeviceRef::Other`].
pub fn parse_device_id(id: &str) -> DeviceRef {
    let trimmed = id.trim();
    if let Some(rest) = trimmed.strip_prefix("MIG-GPU-") {
        let mut parts = rest.split('/');
        if let (Some(body), Some(gi), Some(ci), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        {
            if let (true, Ok(gi), Ok(ci)) = (is_uuid_body(body), gi.parse(), ci.parse()) {
                return DeviceRef::MigLegacy {
                    parent_uuid: format!("GPU-{body}"),
                    gpu_instance_id: gi,
                    compute_instance_id: ci,
                };
            }
        }
        return DeviceRef::Other(trimmed.to_string());
    }
    let (base, replica) = split_replica(trimmed);
    if let Some(body) = base.strip_prefix("GPU-") {
        if is_uuid_body(body) {
            return DeviceRef::Gpu {
                uuid: base.to_string(),
                replica,
            };
        }
    }
    if let Some(body) = base.strip_prefix("MIG-") {
        if is_uuid_body(body) {
            return DeviceRef::Mig {
                uuid: base.to_string(),
                replica,
            };
        }
    }
    DeviceRef::Other(trimmed.to_string())
}

/// A container as the kubelet names it.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ContainerRef {
    pub namespace: String,
    pub pod: String,
    pub container: String,
}

/// GPU allocation on this node at one moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Allocations {
    /// Device key (see [`DeviceRef::key`]) to the containers holding it;
    /// several with time-slicing, in a stable order.
    pub by_device: HashMap<String, Vec<ContainerRef>>,
    /// Allocated device IDs per GPU resource name.
    pub allocated: BTreeMap<String, u64>,
    /// Device IDs that matched a GPU resource but no known ID form.
    pub unparsed_ids: u64,
}

impl Allocations {
    /// Builds the allocation map from a `List` answer, keeping only GPU
    /// resources.
    pub fn from_list(response: &proto::ListPodResourcesResponse, filter: &ResourceFilter) -> Self {
        let mut out = Allocations::default();
        for pod in &response.pod_resources {
            for container in &pod.containers {
                for devices in &container.devices {
                    if !filter.matches(&devices.resource_name) {
                        continue;
                    }
                    *out.allocated
                        .entry(devices.resource_name.clone())
                        .or_default() += devices.device_ids.len() as u64;
                    for id in &devices.device_ids {
                        let Some(key) = parse_device_id(id).key() else {
                            out.unparsed_ids += 1;
                            continue;
                        };
                        let owner = ContainerRef {
                            namespace: pod.namespace.clone(),
                            pod: pod.name.clone(),
                            container: container.name.clone(),
                        };
                        let owners = out.by_device.entry(key).or_default();
                        if !owners.contains(&owner) {
                            owners.push(owner);
                        }
                    }
                }
            }
        }
        for owners in out.by_device.values_mut() {
            owners.sort();
        }
        out
    }
}

/// GPU device IDs the kubelet can hand out, per resource name.
pub fn allocatable_counts(
    response: &proto::AllocatableResourcesResponse,
    filter: &ResourceFilter,
) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for devices in &response.devices {
        if filter.matches(&devices.resource_name) {
            *out.entry(devices.resource_name.clone()).or_default() +=
                devices.device_ids.len() as u64;
        }
    }
    out
}

/// Where GPU allocations come from: the kubelet in production, a fixed map
/// in tests of the collection loop.
pub trait AllocationSource {
    /// Current allocations of GPU resources.
    fn allocations(
        &mut self,
        filter: &ResourceFilter,
    ) -> impl std::future::Future<Output = Result<Allocations, ErrorKind>>;

    /// Allocatable GPU device IDs per resource.
    fn allocatable(
        &mut self,
        filter: &ResourceFilter,
    ) -> impl std::future::Future<Output = Result<BTreeMap<String, u64>, ErrorKind>>;
}

#[derive(Debug, thiserror::Error)]
pub enum PodResourcesError {
    #[error("kubelet socket {0} does not exist")]
    SocketMissing(PathBuf),
    #[error("PodResources call timed out after {0:?}")]
    Timeout(Duration),
    #[error("PodResources call failed: {0}")]
    Status(#[from] tonic::Status),
    #[error("invalid endpoint: {0}")]
    Endpoint(#[from] tonic::transport::Error),
}

impl PodResourcesError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            PodResourcesError::SocketMissing(_) => ErrorKind::NotFound,
            PodResourcesError::Timeout(_) => ErrorKind::Timeout,
            PodResourcesError::Status(s) => match s.code() {
                tonic::Code::Unavailable => ErrorKind::Connect,
                tonic::Code::DeadlineExceeded => ErrorKind::Timeout,
                tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => {
                    ErrorKind::NoPermission
                }
                _ => ErrorKind::Status,
            },
            PodResourcesError::Endpoint(_) => ErrorKind::Connect,
        }
    }
}

/// Largest `List` answer accepted (a busy node lists every container).
const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// A PodResources client over the kubelet's unix socket. The channel
/// connects lazily and reconnects by itself after a kubelet restart.
#[derive(Clone, Debug)]
pub struct PodResourcesClient {
    socket: PathBuf,
    timeout: Duration,
    client: PodResourcesListerClient<Channel>,
}

impl PodResourcesClient {
    /// Must be called inside a Tokio runtime.
    pub fn new(socket: impl Into<PathBuf>, timeout: Duration) -> Result<Self, PodResourcesError> {
        let socket = socket.into();
        let path = socket.clone();
        // The URI is a placeholder: the connector ignores it and dials the socket.
        let channel = Endpoint::try_from("http://kubelet.invalid")?
            .connect_timeout(timeout)
            .connect_with_connector_lazy(tower::service_fn(move |_: http::Uri| {
                let path = path.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(TokioIo::new(stream))
                }
            }));
        let client =
            PodResourcesListerClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES);
        Ok(Self {
            socket,
            timeout,
            client,
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn check_socket(&self) -> Result<(), PodResourcesError> {
        if self.socket.exists() {
            Ok(())
        } else {
            Err(PodResourcesError::SocketMissing(self.socket.clone()))
        }
    }

    pub async fn list(&mut self) -> Result<proto::ListPodResourcesResponse, PodResourcesError> {
        self.check_socket()?;
        let call = self.client.list(proto::ListPodResourcesRequest {});
        match tokio::time::timeout(self.timeout, call).await {
            Ok(result) => Ok(result?.into_inner()),
            Err(_) => Err(PodResourcesError::Timeout(self.timeout)),
        }
    }

    pub async fn allocatable(
        &mut self,
    ) -> Result<proto::AllocatableResourcesResponse, PodResourcesError> {
        self.check_socket()?;
        let call = self
            .client
            .get_allocatable_resources(proto::AllocatableResourcesRequest {});
        match tokio::time::timeout(self.timeout, call).await {
            Ok(result) => Ok(result?.into_inner()),
            Err(_) => Err(PodResourcesError::Timeout(self.timeout)),
        }
    }
}

impl AllocationSource for PodResourcesClient {
    async fn allocations(&mut self, filter: &ResourceFilter) -> Result<Allocations, ErrorKind> {
        self.list()
            .await
            .map(|r| Allocations::from_list(&r, filter))
            .map_err(|e| {
                tracing::debug!(error = %e, "PodResources List failed");
                e.kind()
            })
    }

    async fn allocatable(
        &mut self,
        filter: &ResourceFilter,
    ) -> Result<BTreeMap<String, u64>, ErrorKind> {
        PodResourcesClient::allocatable(self)
            .await
            .map(|r| allocatable_counts(&r, filter))
            .map_err(|e| e.kind())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proto::{ContainerDevices, ContainerResources, ListPodResourcesResponse, PodResources};

    const UUID: &str = "GPU-5b3c1f4e-8a2d-4c6b-9e7f-0123456789ab";

    #[test]
    fn device_id_forms() {
        assert_eq!(
            parse_device_id(UUID),
            DeviceRef::Gpu {
                uuid: UUID.into(),
                replica: None
            }
        );
        assert_eq!(
            parse_device_id(&format!("{UUID}::3")),
            DeviceRef::Gpu {
                uuid: UUID.into(),
                replica: Some(3)
            }
        );
        assert_eq!(
            parse_device_id("MIG-0a1b2c3d-0000-4000-8000-00000000aaaa"),
            DeviceRef::Mig {
                uuid: "MIG-0a1b2c3d-0000-4000-8000-00000000aaaa".into(),
                replica: None
            }
        );
        assert_eq!(
            parse_device_id("MIG-GPU-5b3c1f4e-8a2d-4c6b-9e7f-0123456789ab/3/0"),
            DeviceRef::MigLegacy {
                parent_uuid: UUID.into(),
                gpu_instance_id: 3,
                compute_instance_id: 0
            }
        );
        assert_eq!(
            parse_device_id("nvidia0"),
            DeviceRef::Other("nvidia0".into())
        );
        assert_eq!(
            parse_device_id("GPU-xyz"),
            DeviceRef::Other("GPU-xyz".into())
        );
        assert_eq!(
            parse_device_id("MIG-GPU-abc/x/0"),
            DeviceRef::Other("MIG-GPU-abc/x/0".into())
        );
    }

    #[test]
    fn resource_filter() {
        let filter = ResourceFilter::new(["nvidia.com/a100".to_string()]);
        assert!(filter.matches("nvidia.com/gpu"));
        assert!(filter.matches("nvidia.com/gpu.shared"));
        assert!(filter.matches("nvidia.com/mig-1g.5gb"));
        assert!(filter.matches("nvidia.com/a100"));
        assert!(!filter.matches("amd.com/gpu"));
        assert_eq!(filter.label("example.com/foo"), "other");
    }

    fn devices(resource: &str, ids: &[&str]) -> ContainerDevices {
        ContainerDevices {
            resource_name: resource.into(),
            device_ids: ids.iter().map(|s| s.to_string()).collect(),
            topology: None,
        }
    }

    fn pod(ns: &str, name: &str, containers: Vec<(&str, Vec<ContainerDevices>)>) -> PodResources {
        PodResources {
            name: name.into(),
            namespace: ns.into(),
            containers: containers
                .into_iter()
                .map(|(c, devices)| ContainerResources {
                    name: c.into(),
                    devices,
                    ..Default::default()
                })
                .collect(),
        }
    }

    #[test]
    fn allocations_keep_gpu_resources_and_share_time_sliced_devices() {
        let response = ListPodResourcesResponse {
            pod_resources: vec![
                pod(
                    "llm",
                    "vllm-a",
                    vec![(
                        "server",
                        vec![
                            devices("nvidia.com/gpu", &[&format!("{UUID}::0")]),
                            devices("example.com/nic", &["nic0"]),
                        ],
                    )],
                ),
                pod(
                    "llm",
                    "vllm-b",
                    vec![(
                        "server",
                        vec![devices("nvidia.com/gpu", &[&format!("{UUID}::1")])],
                    )],
                ),
                pod(
                    "batch",
                    "train",
                    vec![(
                        "trainer",
                        vec![devices(
                            "nvidia.com/mig-1g.5gb",
                            &["MIG-aaaa-bbbb", "nvidia3"],
                        )],
                    )],
                ),
            ],
        };
        let alloc = Allocations::from_list(&response, &ResourceFilter::default());
        let owners = &alloc.by_device[UUID];
        assert_eq!(owners.len(), 2);
        assert_eq!(owners[0].pod, "vllm-a");
        assert_eq!(owners[1].pod, "vllm-b");
        assert_eq!(alloc.by_device["MIG-aaaa-bbbb"][0].container, "trainer");
        assert_eq!(alloc.allocated["nvidia.com/gpu"], 2);
        assert_eq!(alloc.allocated["nvidia.com/mig-1g.5gb"], 2);
        assert!(!alloc.allocated.contains_key("example.com/nic"));
        assert_eq!(alloc.unparsed_ids, 1);
    }

    proptest! {
        #[test]
        fn gpu_ids_round_trip(body in "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
                              replica in proptest::option::of(0u32..10_000),
                              mig in any::<bool>()) {
            let prefix = if mig { "MIG-" } else { "GPU-" };
            let uuid = format!("{prefix}{body}");
            let id = match replica {
                Some(n) => format!("{uuid}::{n}"),
                None => uuid.clone(),
            };
            let parsed = parse_device_id(&id);
            let expected = if mig {
                DeviceRef::Mig { uuid: uuid.clone(), replica }
            } else {
                DeviceRef::Gpu { uuid: uuid.clone(), replica }
            };
            prop_assert_eq!(parsed.key(), Some(uuid));
            prop_assert_eq!(parsed, expected);
        }

        #[test]
        fn parser_never_panics_and_other_keeps_input(s in "\\PC{0,80}") {
            match parse_device_id(&s) {
                DeviceRef::Other(kept) => prop_assert_eq!(kept, s.trim()),
                other => prop_assert!(other.key().is_some()),
            }
        }
    }
}
