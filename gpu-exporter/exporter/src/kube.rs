//! A small Kubernetes API client that keeps the pods of one node in memory:
//! LIST with `fieldSelector=spec.nodeName=<node>`, then WATCH from the list's
//! resourceVersion; a 410 Gone or any error leads to a fresh LIST after a
//! backoff. In cluster it speaks HTTPS with the service-account CA and token
//! (re-read on every connection, since bound tokens rotate).
//!
//! Only the fields the exporter needs are decoded; everything else in a pod
//! object is skipped by serde.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokentap_workload::{ContainerPort, PodInfo};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::health::ErrorKind;

/// Default service-account paths inside a pod.
pub const SA_TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
pub const SA_CA: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";

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

// ---------------------------------------------------------------- store

/// Pods of this node, indexed by UID and by (namespace, name). Readers take
/// a cheap `Arc` snapshot; writers change it in place (see [`PodStore`]).
#[derive(Clone, Debug, Default)]
pub struct PodIndex {
    by_uid: HashMap<String, Arc<NodePod>>,
    by_name: HashMap<(String, String), String>,
}

impl PodIndex {
    pub fn from_pods<I: IntoIterator<Item = NodePod>>(pods: I) -> Self {
        let mut index = PodIndex::default();
        for pod in pods {
            index.insert(pod);
        }
        index
    }

    /// Adds or replaces a pod; a pod recreated under the same name drops
    /// its predecessor. Returns what changed.
    fn insert(&mut self, pod: NodePod) -> Vec<PodChange> {
        let mut changes = Vec::with_capacity(2);
        let key = (pod.info.namespace.clone(), pod.info.name.clone());
        if let Some(old_uid) = self.by_name.get(&key) {
            if *old_uid != pod.info.uid {
                if let Some(old) = self.by_uid.remove(old_uid) {
                    changes.push(PodChange::Removed(old));
                }
            }
        }
        let pod = Arc::new(pod);
        self.by_name.insert(key, pod.info.uid.clone());
        self.by_uid.insert(pod.info.uid.clone(), pod.clone());
        changes.push(PodChange::Upserted(pod));
        changes
    }

    fn remove(&mut self, pod: &NodePod) -> Option<PodChange> {
        let removed = self.by_uid.remove(&pod.info.uid);
        let key = (pod.info.namespace.clone(), pod.info.name.clone());
        if self.by_name.get(&key) == Some(&pod.info.uid) {
            self.by_name.remove(&key);
        }
        removed.map(PodChange::Removed)
    }

    pub fn by_uid(&self, uid: &str) -> Option<&NodePod> {
        self.by_uid.get(uid).map(Arc::as_ref)
    }

    pub fn by_name(&self, namespace: &str, name: &str) -> Option<&NodePod> {
        self.by_name
            .get(&(namespace.to_string(), name.to_string()))
            .and_then(|uid| self.by_uid(uid))
    }

    pub fn len(&self) -> usize {
        self.by_uid.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_uid.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &NodePod> {
        self.by_uid.values().map(Arc::as_ref)
    }

    /// Every pod as the runtime collector wants them.
    pub fn pod_infos(&self) -> Vec<PodInfo> {
        let mut pods: Vec<PodInfo> = self.iter().map(|p| p.info.clone()).collect();
        pods.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        pods
    }
}

/// Health of the watch, drained by each collection pass.
#[derive(Debug, Default)]
struct WatchHealth {
    errors: Vec<ErrorKind>,
    healthy: bool,
    synced: bool,
}

/// One pod's change, as the runtime collector consumes it.
#[derive(Clone, Debug, PartialEq)]
pub enum PodChange {
    Upserted(Arc<NodePod>),
    Removed(Arc<NodePod>),
}

/// Changes not yet taken by the consumer of the change feed.
#[derive(Debug, Default, PartialEq)]
pub struct PodChanges {
    /// The whole set was replaced (a re-list), or more changed than the
    /// feed keeps: the consumer re-reads the index.
    pub resync: bool,
    pub changes: Vec<PodChange>,
}

/// Changes kept for the feed before they collapse into one resync.
const MAX_PENDING_CHANGES: usize = 1024;

/// The shared pod cache the watcher fills. An event changes one entry of
/// the index in place (the index is copied only when a collection pass
/// holds a snapshot at that moment), so its cost does not grow with the
/// pods on the node.
#[derive(Debug)]
pub struct PodStore {
    index: RwLock<Arc<PodIndex>>,
    health: Mutex<WatchHealth>,
    changed: tokio::sync::watch::Sender<u64>,
    /// `None` unless built with [`PodStore::with_change_feed`].
    pending: Option<Mutex<PodChanges>>,
}

impl Default for PodStore {
    fn default() -> Self {
        Self {
            index: RwLock::new(Arc::new(PodIndex::default())),
            health: Mutex::new(WatchHealth::default()),
            changed: tokio::sync::watch::channel(0).0,
            pending: None,
        }
    }
}

/// What a collection pass learns about the watch.
#[derive(Debug, Default, PartialEq)]
pub struct WatchReport {
    pub errors: Vec<ErrorKind>,
    pub healthy: bool,
    pub synced: bool,
}

impl WatchReport {
    /// The pods served come from a cache the API has not confirmed since
    /// the watch last failed or fell silent.
    pub fn stale(&self) -> bool {
        self.synced && !self.healthy
    }
}

impl PodStore {
    /// A store that also keeps per-pod changes for [`PodStore::take_changes`].
    pub fn with_change_feed() -> Self {
        Self {
            pending: Some(Mutex::new(PodChanges::default())),
            ..Self::default()
        }
    }

    pub fn snapshot(&self) -> Arc<PodIndex> {
        self.index.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A receiver that sees a new value after every change of the pod set.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Changes since the last call (see [`PodChanges`]).
    pub fn take_changes(&self) -> PodChanges {
        match &self.pending {
            Some(pending) => std::mem::take(&mut *lock(pending)),
            None => PodChanges {
                resync: true,
                changes: Vec::new(),
            },
        }
    }

    fn note(&self, change: Option<PodChange>) {
        let Some(pending) = &self.pending else {
            return;
        };
        let mut pending = lock(pending);
        match change {
            Some(change) if !pending.resync && pending.changes.len() < MAX_PENDING_CHANGES => {
                pending.changes.push(change)
            }
            _ => {
                pending.resync = true;
                pending.changes.clear();
            }
        }
    }

    fn health(&self) -> std::sync::MutexGuard<'_, WatchHealth> {
        lock(&self.health)
    }

    pub fn replace(&self, pods: Vec<NodePod>) {
        *self.index.write().unwrap_or_else(|e| e.into_inner()) =
            Arc::new(PodIndex::from_pods(pods));
        self.note(None);
        self.changed.send_modify(|generation| *generation += 1);
        let mut health = self.health();
        health.synced = true;
        health.healthy = true;
    }

    pub fn apply(&self, event: &WatchEvent) {
        let changes = {
            let mut guard = self.index.write().unwrap_or_else(|e| e.into_inner());
            let index = Arc::make_mut(&mut guard);
            match event {
                WatchEvent::Added(pod, _) | WatchEvent::Modified(pod, _) => {
                    index.insert(pod.clone())
                }
                WatchEvent::Deleted(pod, _) => index.remove(pod).into_iter().collect(),
                WatchEvent::Bookmark(_) | WatchEvent::Error { .. } => return,
            }
        };
        for change in changes {
            self.note(Some(change));
        }
        self.changed.send_modify(|generation| *generation += 1);
    }

    pub fn record_error(&self, kind: ErrorKind) {
        let mut health = self.health();
        health.errors.push(kind);
        // An expired watch is routine; the re-list that follows decides.
        if kind != ErrorKind::Expired {
            health.healthy = false;
        }
    }

    pub fn report(&self) -> WatchReport {
        let mut health = self.health();
        WatchReport {
            errors: std::mem::take(&mut health.errors),
            healthy: health.healthy,
            synced: health.synced,
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

// --------------------------------------------------------------- client

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("invalid Kubernetes API URL {0:?}")]
    Url(String),
    #[error("cannot read {path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("timed out")]
    Timeout,
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("API server answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("decode: {0}")]
    Decode(serde_json::Error),
    #[error("protocol: {0}")]
    Protocol(String),
}

impl KubeError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            KubeError::Url(_) | KubeError::Tls(_) => ErrorKind::Connect,
            KubeError::File { .. } => ErrorKind::Io,
            KubeError::Connect(_) | KubeError::Http(_) => ErrorKind::Connect,
            KubeError::Timeout => ErrorKind::Timeout,
            KubeError::Status { status: 410, .. } => ErrorKind::Expired,
            KubeError::Status {
                status: 401 | 403, ..
            } => ErrorKind::NoPermission,
            KubeError::Status { .. } => ErrorKind::Status,
            KubeError::Decode(_) | KubeError::Protocol(_) => ErrorKind::Decode,
        }
    }
}

/// Where and how to reach the API server.
#[derive(Clone, Debug)]
pub struct KubeConfig {
    /// `https://host:port` or `http://host:port`.
    pub url: String,
    pub token_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub node_name: String,
    /// Connect and list timeout.
    pub timeout: Duration,
    /// Server-side watch timeout; the watch is then resumed.
    pub watch_timeout: Duration,
    /// Longest silence of a watch (no event, no bookmark) before the API is
    /// probed; a probe that fails ends the watch as failed.
    pub progress_timeout: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Target {
    tls: bool,
    host: String,
    port: u16,
}

fn parse_url(url: &str) -> Result<Target, KubeError> {
    let bad = || KubeError::Url(url.to_string());
    let uri: http::Uri = url.parse().map_err(|_| bad())?;
    let tls = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(bad()),
    };
    let host = uri.host().ok_or_else(bad)?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    if uri.path() != "/" && !uri.path().is_empty() {
        return Err(bad());
    }
    Ok(Target { tls, host, port })
}

/// Percent-encodes a query value (RFC 3986 unreserved characters kept).
fn encode_query_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(byte as char)
            }
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

/// Query strings for LIST and WATCH of one node's pods.
pub fn list_path(node: &str, continue_token: Option<&str>) -> String {
    let mut path = format!(
        "/api/v1/pods?fieldSelector={}&limit=500",
        encode_query_value(&format!("spec.nodeName={node}"))
    );
    if let Some(token) = continue_token {
        path.push_str("&continue=");
        path.push_str(&encode_query_value(token));
    }
    path
}

/// A one-item LIST: the cheapest request that proves the API server answers
/// for this node's pods.
pub fn probe_path(node: &str) -> String {
    format!(
        "/api/v1/pods?fieldSelector={}&limit=1",
        encode_query_value(&format!("spec.nodeName={node}"))
    )
}

pub fn watch_path(node: &str, resource_version: &str, timeout: Duration) -> String {
    format!(
        "/api/v1/pods?fieldSelector={}&watch=1&allowWatchBookmarks=true&resourceVersion={}&timeoutSeconds={}",
        encode_query_value(&format!("spec.nodeName={node}")),
        encode_query_value(resource_version),
        timeout.as_secs().max(1)
    )
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// TCP keepalive on API connections: first probe after this idle time ...
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
/// ... then every this long, giving up after this many unanswered probes.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_RETRIES: u32 = 3;

/// Largest LIST page accepted.
const MAX_LIST_BYTES: usize = 64 * 1024 * 1024;
/// Longest watch line accepted (one pod object).
const MAX_LINE_BYTES: usize = 8 * 1024 * 1024;

/// A client for one API server; see the module docs.
pub struct KubeClient {
    config: KubeConfig,
    target: Target,
    #[cfg(feature = "in-cluster-tls")]
    tls: Option<tokio_rustls::TlsConnector>,
}

impl KubeClient {
    pub fn new(config: KubeConfig) -> Result<Self, KubeError> {
        let target = parse_url(&config.url)?;
        #[cfg(feature = "in-cluster-tls")]
        let tls = if target.tls {
            Some(tls_connector(config.ca_file.as_ref())?)
        } else {
            None
        };
        #[cfg(not(feature = "in-cluster-tls"))]
        if target.tls {
            return Err(KubeError::Tls(
                "built without the in-cluster-tls feature; use an http:// URL (kubectl proxy)"
                    .into(),
            ));
        }
        Ok(Self {
            config,
            target,
            #[cfg(feature = "in-cluster-tls")]
            tls,
        })
    }

    async fn connect(&self) -> Result<Box<dyn Io>, KubeError> {
        let addr = (self.target.host.as_str(), self.target.port);
        let tcp = tokio::time::timeout(self.config.timeout, tokio::net::TcpStream::connect(addr))
            .await
            .map_err(|_| KubeError::Timeout)?
            .map_err(KubeError::Connect)?;
        let _ = tcp.set_nodelay(true);
        // A peer that vanished (host down, connection dropped by a
        // middlebox) is noticed by the kernel even on a silent watch.
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(KEEPALIVE_IDLE)
            .with_interval(KEEPALIVE_INTERVAL)
            .with_retries(KEEPALIVE_RETRIES);
        if let Err(e) = socket2::SockRef::from(&tcp).set_tcp_keepalive(&keepalive) {
            tracing::debug!(error = %e, "cannot enable TCP keepalive to the Kubernetes API");
        }
        #[cfg(feature = "in-cluster-tls")]
        if let Some(tls) = &self.tls {
            let name =
                tokio_rustls::rustls::pki_types::ServerName::try_from(self.target.host.clone())
                    .map_err(|e| KubeError::Tls(e.to_string()))?;
            let stream = tokio::time::timeout(self.config.timeout, tls.connect(name, tcp))
                .await
                .map_err(|_| KubeError::Timeout)?
                .map_err(|e| KubeError::Tls(e.to_string()))?;
            return Ok(Box::new(stream));
        }
        Ok(Box::new(tcp))
    }

    fn token(&self) -> Result<Option<String>, KubeError> {
        match &self.config.token_file {
            None => Ok(None),
            Some(path) => std::fs::read_to_string(path)
                .map(|t| Some(t.trim().to_string()))
                .map_err(|source| KubeError::File {
                    path: path.clone(),
                    source,
                }),
        }
    }

    /// Sends a GET on a fresh connection and returns the response once its
    /// status is 200.
    async fn get(&self, path: &str) -> Result<hyper::Response<hyper::body::Incoming>, KubeError> {
        let io = self.connect().await?;
        let (mut sender, connection) = http1::handshake(TokioIo::new(io)).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "Kubernetes API connection ended");
            }
        });
        let authority = if self.target.host.contains(':') {
            format!("[{}]:{}", self.target.host, self.target.port)
        } else {
            format!("{}:{}", self.target.host, self.target.port)
        };
        let mut request = hyper::Request::get(path)
            .header(http::header::HOST, authority)
            .header(http::header::ACCEPT, "application/json")
            .header(
                http::header::USER_AGENT,
                concat!("tokentap-gpu-exporter/", env!("CARGO_PKG_VERSION")),
            );
        if let Some(token) = self.token()? {
            request = request.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let request = request
            .body(Empty::<Bytes>::new())
            .map_err(|e| KubeError::Protocol(e.to_string()))?;
        let response = tokio::time::timeout(self.config.timeout, sender.send_request(request))
            .await
            .map_err(|_| KubeError::Timeout)??;
        let status = response.status().as_u16();
        if status != 200 {
            let body = tokio::time::timeout(self.config.timeout, response.into_body().collect())
                .await
                .ok()
                .and_then(Result::ok)
                .map(|b| {
                    String::from_utf8_lossy(&b.to_bytes())
                        .chars()
                        .take(300)
                        .collect()
                })
                .unwrap_or_default();
            return Err(KubeError::Status { status, body });
        }
        Ok(response)
    }

    /// Lists the node's pods (following `continue` pages); returns them with
    /// the list's resourceVersion.
    pub async fn list(&self) -> Result<(Vec<NodePod>, String), KubeError> {
        let mut pods = Vec::new();
        let mut continue_token: Option<String> = None;
        loop {
            let path = list_path(&self.config.node_name, continue_token.as_deref());
            let response = self.get(&path).await?;
            let body = tokio::time::timeout(
                self.config.timeout,
                http_body_util::Limited::new(response.into_body(), MAX_LIST_BYTES).collect(),
            )
            .await
            .map_err(|_| KubeError::Timeout)?
            .map_err(|e| KubeError::Protocol(e.to_string()))?
            .to_bytes();
            let list: PodListJson = serde_json::from_slice(&body).map_err(KubeError::Decode)?;
            pods.extend(list.items.into_iter().map(NodePod::from));
            match list.metadata.continue_token.filter(|t| !t.is_empty()) {
                Some(token) => continue_token = Some(token),
                None => return Ok((pods, list.metadata.resource_version)),
            }
        }
    }

    /// Asks the API server for one pod of this node; an error (timeout
    /// included) means the server does not answer.
    async fn probe(&self) -> Result<(), KubeError> {
        let response = self.get(&probe_path(&self.config.node_name)).await?;
        tokio::time::timeout(self.config.timeout, response.into_body().collect())
            .await
            .map_err(|_| KubeError::Timeout)??;
        Ok(())
    }

    /// Watches from `resource_version`, applying events to `store`, until the
    /// server closes the stream. Returns the last resourceVersion seen. A
    /// watch silent for `progress_timeout` probes the server and fails when
    /// the probe does.
    pub async fn watch(
        &self,
        resource_version: &str,
        store: &PodStore,
    ) -> Result<String, KubeError> {
        let path = watch_path(
            &self.config.node_name,
            resource_version,
            self.config.watch_timeout,
        );
        let mut body = self.get(&path).await?.into_body();
        let mut version = resource_version.to_string();
        let mut buffer = BytesMut::new();
        // The server closes after timeoutSeconds; allow a margin before
        // declaring the connection dead.
        let deadline = Instant::now() + self.config.watch_timeout + Duration::from_secs(30);
        loop {
            let frame = match tokio::time::timeout(self.config.progress_timeout, body.frame()).await
            {
                Err(_) => {
                    // Silent past the bound: a quiet node, or a hung server.
                    self.probe().await?;
                    if Instant::now() > deadline {
                        return Err(KubeError::Timeout);
                    }
                    continue;
                }
                Ok(None) => return Ok(version),
                Ok(Some(frame)) => frame?,
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            buffer.extend_from_slice(&data);
            while let Some(newline) = buffer.iter().position(|b| *b == b'\n') {
                let line = buffer.split_to(newline + 1);
                let line = line.strip_suffix(b"\n").unwrap_or(&line);
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let event = decode_watch_line(line)?;
                match &event {
                    WatchEvent::Error { code, message } => {
                        return Err(KubeError::Status {
                            status: *code,
                            body: message.clone(),
                        })
                    }
                    WatchEvent::Added(_, rv)
                    | WatchEvent::Modified(_, rv)
                    | WatchEvent::Deleted(_, rv)
                    | WatchEvent::Bookmark(rv) => {
                        if !rv.is_empty() {
                            version = rv.clone();
                        }
                    }
                }
                store.apply(&event);
            }
            if buffer.len() > MAX_LINE_BYTES {
                return Err(KubeError::Protocol("watch line too long".into()));
            }
        }
    }

    /// Keeps `store` in sync until `shutdown` resolves: LIST, WATCH, and on
    /// any failure a backoff (1 s doubling to 30 s) before the next LIST.
    pub async fn run(self, store: Arc<PodStore>, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut backoff = Duration::from_secs(1);
        loop {
            let cycle = async {
                let (pods, mut version) = match self.list().await {
                    Ok(listed) => listed,
                    Err(e) => return Err(e),
                };
                tracing::info!(pods = pods.len(), node = %self.config.node_name, "listed pods");
                store.replace(pods);
                loop {
                    version = self.watch(&version, &store).await?;
                }
            };
            let result: Result<(), KubeError> = tokio::select! {
                _ = &mut shutdown => return,
                result = cycle => result,
            };
            if let Err(e) = result {
                let kind = e.kind();
                store.record_error(kind);
                if kind == ErrorKind::Expired {
                    tracing::info!("pod watch expired (410 Gone); re-listing");
                    backoff = Duration::from_secs(1);
                    continue;
                }
                tracing::warn!(error = %e, retry_in = ?backoff, "pod list/watch failed");
                tokio::select! {
                    _ = &mut shutdown => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            } else {
                backoff = Duration::from_secs(1);
            }
        }
    }
}

#[cfg(feature = "in-cluster-tls")]
fn tls_connector(ca_file: Option<&PathBuf>) -> Result<tokio_rustls::TlsConnector, KubeError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;
    use tokio_rustls::rustls;

    let path =
        ca_file.ok_or_else(|| KubeError::Tls("an https:// API URL needs a CA file".into()))?;
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| KubeError::Tls(format!("{}: {e}", path.display())))?;
    for cert in certs {
        let cert = cert.map_err(|e| KubeError::Tls(format!("{}: {e}", path.display())))?;
        roots
            .add(cert)
            .map_err(|e| KubeError::Tls(format!("{}: {e}", path.display())))?;
    }
    if roots.is_empty() {
        return Err(KubeError::Tls(format!(
            "{}: no certificates",
            path.display()
        )));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| KubeError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// The in-cluster API URL from `KUBERNETES_SERVICE_HOST`/`_PORT`.
pub fn in_cluster_url() -> Option<String> {
    let host = std::env::var("KUBERNETES_SERVICE_HOST").ok()?;
    let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
    if host.contains(':') {
        Some(format!("https://[{host}]:{port}"))
    } else {
        Some(format!("https://{host}:{port}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod_json(name: &str, uid: &str) -> serde_json::Value {
        json!({
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

    #[test]
    fn store_applies_events_and_reindexes_by_name() {
        let store = PodStore::default();
        let mut rx = store.subscribe();
        store.replace(vec![decode_pod(pod_json("a", "u-a")).unwrap()]);
        assert!(rx.has_changed().unwrap());
        rx.mark_unchanged();
        let b = decode_pod(pod_json("b", "u-b")).unwrap();
        store.apply(&WatchEvent::Added(b.clone(), "43".into()));
        assert_eq!(store.snapshot().len(), 2);
        // Same name, new UID (pod recreated): the old entry goes.
        let a2 = decode_pod(pod_json("a", "u-a2")).unwrap();
        store.apply(&WatchEvent::Modified(a2, "44".into()));
        let snap = store.snapshot();
        assert_eq!(snap.len(), 2);
        assert_eq!(snap.by_name("llm", "a").unwrap().info.uid, "u-a2");
        assert!(snap.by_uid("u-a").is_none());
        store.apply(&WatchEvent::Deleted(b, "45".into()));
        assert_eq!(store.snapshot().len(), 1);
        assert!(rx.has_changed().unwrap());
        let report = store.report();
        assert!(report.synced && report.healthy);
    }

    #[test]
    fn an_event_changes_the_index_in_place_unless_a_reader_holds_it() {
        let store = PodStore::default();
        store.replace(
            (0..100)
                .map(|i| decode_pod(pod_json(&format!("p{i}"), &format!("u{i}"))).unwrap())
                .collect(),
        );
        let before = Arc::as_ptr(&store.snapshot());
        let added = decode_pod(pod_json("new", "u-new")).unwrap();
        store.apply(&WatchEvent::Added(added, "43".into()));
        assert_eq!(
            Arc::as_ptr(&store.snapshot()),
            before,
            "no copy of 100 pods"
        );
        // A pass holding a snapshot keeps seeing its own version.
        let held = store.snapshot();
        let gone = decode_pod(pod_json("p0", "u0")).unwrap();
        store.apply(&WatchEvent::Deleted(gone, "44".into()));
        assert_eq!(held.len(), 101);
        assert_eq!(store.snapshot().len(), 100);
    }

    #[test]
    fn the_change_feed_names_each_pod_and_collapses_a_relist() {
        let store = PodStore::with_change_feed();
        store.replace(vec![decode_pod(pod_json("a", "u-a")).unwrap()]);
        assert!(store.take_changes().resync);
        let b = decode_pod(pod_json("b", "u-b")).unwrap();
        store.apply(&WatchEvent::Added(b.clone(), "43".into()));
        let a2 = decode_pod(pod_json("a", "u-a2")).unwrap();
        store.apply(&WatchEvent::Modified(a2, "44".into()));
        store.apply(&WatchEvent::Bookmark("45".into()));
        let taken = store.take_changes();
        assert!(!taken.resync);
        let named: Vec<(bool, &str)> = taken
            .changes
            .iter()
            .map(|c| match c {
                PodChange::Upserted(p) => (true, p.info.uid.as_str()),
                PodChange::Removed(p) => (false, p.info.uid.as_str()),
            })
            .collect();
        assert_eq!(named, [(true, "u-b"), (false, "u-a"), (true, "u-a2")]);
        assert_eq!(store.take_changes(), PodChanges::default());
        for i in 0..=MAX_PENDING_CHANGES {
            let pod = decode_pod(pod_json(&format!("x{i}"), &format!("ux{i}"))).unwrap();
            store.apply(&WatchEvent::Added(pod, "46".into()));
        }
        let overflow = store.take_changes();
        assert!(overflow.resync && overflow.changes.is_empty());
        // Without a feed, consumers always re-read the index.
        assert!(PodStore::default().take_changes().resync);
    }

    #[test]
    fn a_failed_watch_marks_the_served_pods_stale_until_a_relist() {
        let store = PodStore::default();
        assert!(!store.report().stale(), "nothing listed yet");
        store.replace(vec![decode_pod(pod_json("a", "u-a")).unwrap()]);
        store.record_error(ErrorKind::Expired);
        assert!(!store.report().stale(), "410 is routine");
        store.record_error(ErrorKind::Timeout);
        let report = store.report();
        assert!(report.stale() && !report.healthy);
        assert_eq!(store.snapshot().len(), 1, "last known pods kept");
        store.replace(vec![]);
        assert!(!store.report().stale());
    }

    #[test]
    fn urls_and_paths() {
        assert_eq!(
            parse_url("https://10.96.0.1:443").unwrap(),
            Target {
                tls: true,
                host: "10.96.0.1".into(),
                port: 443
            }
        );
        assert_eq!(parse_url("http://127.0.0.1:8080").unwrap().port, 8080);
        assert_eq!(parse_url("https://[fd00::1]:6443").unwrap().host, "fd00::1");
        assert!(parse_url("ftp://x").is_err());
        assert!(parse_url("http://x/api").is_err());
        assert_eq!(
            list_path("node-1", None),
            "/api/v1/pods?fieldSelector=spec.nodeName%3Dnode-1&limit=500"
        );
        assert_eq!(
            probe_path("node-1"),
            "/api/v1/pods?fieldSelector=spec.nodeName%3Dnode-1&limit=1"
        );
        assert!(watch_path("n", "17", Duration::from_secs(300))
            .ends_with("&resourceVersion=17&timeoutSeconds=300"));
    }

    #[test]
    fn gone_maps_to_expired() {
        let e = KubeError::Status {
            status: 410,
            body: String::new(),
        };
        assert_eq!(e.kind(), ErrorKind::Expired);
    }
}
