//! The pod fields the exporter needs, decoded from the API's JSON (LIST
//! items and WATCH lines); everything else in a pod object is skipped.

use std::collections::BTreeMap;

use serde::Deserialize;
use tokentap_workload::{ContainerPort, PodInfo};

use super::KubeError;

/// A pod on this node, with what attribution needs beyond [`PodInfo`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodePod {
    pub info: PodInfo,
    /// (container name, runtime container id without the `containerd://` scheme).
    pub container_ids: Vec<(String, String)>,
    /// `status.reason`, e.g. `UnexpectedAdmissionError`, `OutOfnvidia.com/gpu`.
    pub reason: Option<String>,
    pub message: Option<String>,
}

impl NodePod {
    /// Name of the container with this runtime id.
    pub fn container_by_id(&self, id: &str) -> Option<&str> {
        self.container_ids
            .iter()
            .find(|(_, cid)| cid == id)
            .map(|(name, _)| name.as_str())
    }
}

// ------------------------------------------------------------ JSON model

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct ObjectMeta {
    name: String,
    namespace: String,
    uid: String,
    resource_version: String,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct PodSpecJson {
    containers: Vec<ContainerJson>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct ContainerJson {
    name: String,
    ports: Vec<PortJson>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct PortJson {
    name: Option<String>,
    container_port: i64,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct PodStatusJson {
    phase: String,
    #[serde(rename = "podIP")]
    pod_ip: Option<String>,
    reason: Option<String>,
    message: Option<String>,
    container_statuses: Vec<ContainerStatusJson>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct ContainerStatusJson {
    name: String,
    ready: bool,
    restart_count: u32,
    #[serde(rename = "containerID")]
    container_id: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct PodJson {
    metadata: ObjectMeta,
    spec: PodSpecJson,
    status: PodStatusJson,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct ListMeta {
    resource_version: String,
    #[serde(rename = "continue")]
    continue_token: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct PodListJson {
    metadata: ListMeta,
    items: Vec<PodJson>,
}

#[derive(Deserialize)]
struct WatchEventJson {
    #[serde(rename = "type")]
    kind: String,
    object: serde_json::Value,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct StatusJson {
    code: u16,
    message: String,
}

impl From<PodJson> for NodePod {
    fn from(pod: PodJson) -> Self {
        let statuses = &pod.status.container_statuses;
        let ready = !statuses.is_empty() && statuses.iter().all(|c| c.ready);
        let container_ports = pod
            .spec
            .containers
            .iter()
            .flat_map(|c| {
                c.ports.iter().filter_map(|p| {
                    u16::try_from(p.container_port)
                        .ok()
                        .map(|port| ContainerPort {
                            container: c.name.clone(),
                            name: p.name.clone(),
                            port,
                        })
                })
            })
            .collect();
        let container_ids = statuses
            .iter()
            .filter_map(|c| {
                let raw = c.container_id.as_deref()?;
                let id = raw.split_once("://").map(|(_, id)| id).unwrap_or(raw);
                (!id.is_empty()).then(|| (c.name.clone(), id.to_string()))
            })
            .collect();
        NodePod {
            info: PodInfo {
                namespace: pod.metadata.namespace,
                name: pod.metadata.name,
                uid: pod.metadata.uid,
                ip: pod.status.pod_ip.filter(|ip| !ip.is_empty()),
                phase: pod.status.phase,
                ready,
                labels: pod.metadata.labels,
                annotations: pod.metadata.annotations,
                container_ports,
                restart_count: statuses.iter().map(|c| c.restart_count).sum(),
            },
            container_ids,
            reason: pod.status.reason,
            message: pod.status.message,
        }
    }
}

/// Decodes one pod object (as served by the API) into a [`NodePod`].
pub fn decode_pod(value: serde_json::Value) -> Result<NodePod, KubeError> {
    let pod: PodJson = serde_json::from_value(value).map_err(KubeError::Decode)?;
    Ok(pod.into())
}

/// One page of a LIST: its pods, the list's resourceVersion and the
/// `continue` token of the next page, if any.
pub(super) struct ListPage {
    pub pods: Vec<NodePod>,
    pub resource_version: String,
    pub continue_token: Option<String>,
}

/// Decodes one LIST page body.
pub(super) fn decode_list(body: &[u8]) -> Result<ListPage, KubeError> {
    let list: PodListJson = serde_json::from_slice(body).map_err(KubeError::Decode)?;
    Ok(ListPage {
        pods: list.items.into_iter().map(NodePod::from).collect(),
        resource_version: list.metadata.resource_version,
        continue_token: list.metadata.continue_token.filter(|t| !t.is_empty()),
    })
}

/// One line of a watch stream, decoded.
#[derive(Debug, PartialEq)]
pub enum WatchEvent {
    Added(NodePod, String),
    Modified(NodePod, String),
    Deleted(NodePod, String),
    Bookmark(String),
    /// The server ended the watch with a Status; 410 means the
    /// resourceVersion is too old and a re-list is needed.
    Error {
        code: u16,
        message: String,
    },
}

pub fn decode_watch_line(line: &[u8]) -> Result<WatchEvent, KubeError> {
    let event: WatchEventJson = serde_json::from_slice(line).map_err(KubeError::Decode)?;
    let rv = |v: &serde_json::Value| {
        v.pointer("/metadata/resourceVersion")
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    Ok(match event.kind.as_str() {
        "ADDED" => {
            let version = rv(&event.object);
            WatchEvent::Added(decode_pod(event.object)?, version)
        }
        "MODIFIED" => {
            let version = rv(&event.object);
            WatchEvent::Modified(decode_pod(event.object)?, version)
        }
        "DELETED" => {
            let version = rv(&event.object);
            WatchEvent::Deleted(decode_pod(event.object)?, version)
        }
        "BOOKMARK" => WatchEvent::Bookmark(rv(&event.object)),
        "ERROR" => {
            let status: StatusJson =
                serde_json::from_value(event.object).map_err(KubeError::Decode)?;
            WatchEvent::Error {
                code: status.code,
                message: status.message,
            }
        }
        other => {
            return Err(KubeError::Protocol(format!(
                "unknown watch event type {other:?}"
            )))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::pod_json;
    use super::*;
    use serde_json::json;

    #[test]
    fn pods_decode_to_pod_info() {
        let pod = decode_pod(pod_json("vllm-0", "u-1")).unwrap();
        assert_eq!(pod.info.name, "vllm-0");
        assert_eq!(pod.info.ip.as_deref(), Some("10.0.0.7"));
        assert!(pod.info.ready);
        assert_eq!(pod.info.restart_count, 3);
        assert_eq!(pod.info.container_ports.len(), 1);
        assert_eq!(pod.info.container_ports[0].port, 8000);
        assert_eq!(pod.info.annotations["prometheus.io/port"], "8000");
        assert_eq!(pod.container_by_id("abc123"), Some("server"));
    }

    #[test]
    fn watch_lines_decode() {
        let line =
            serde_json::to_vec(&json!({"type": "ADDED", "object": pod_json("a", "u-a")})).unwrap();
        match decode_watch_line(&line).unwrap() {
            WatchEvent::Added(pod, rv) => {
                assert_eq!(pod.info.uid, "u-a");
                assert_eq!(rv, "42");
            }
            other => panic!("{other:?}"),
        }
        let gone = br#"{"type":"ERROR","object":{"kind":"Status","code":410,"message":"too old resource version"}}"#;
        assert_eq!(
            decode_watch_line(gone).unwrap(),
            WatchEvent::Error {
                code: 410,
                message: "too old resource version".into()
            }
        );
        let bookmark = br#"{"type":"BOOKMARK","object":{"metadata":{"resourceVersion":"99"}}}"#;
        assert_eq!(
            decode_watch_line(bookmark).unwrap(),
            WatchEvent::Bookmark("99".into())
        );
        assert!(decode_watch_line(b"{not json").is_err());
    }
}
