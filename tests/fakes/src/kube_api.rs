//! A fake Kubernetes API serving pods: LIST and WATCH with the semantics the
//! real API server has for clients (resourceVersions, `fieldSelector`
//! `spec.nodeName=…`, equality `labelSelector`, `limit`/`continue`, bookmarks,
//! `410 Gone` for expired versions), plus admin endpoints to change pods at
//! run time.
//!
//! Pods are given in a short form (see [`SimplePod`]) or as full pod objects
//! (anything with a `metadata` key is served as is, with a fresh
//! resourceVersion). Admin endpoints (JSON):
//! - `GET /admin/pods`: current pods; `PUT /admin/pods` `{"pods": [...]}`:
//!   replace the set (ADDED/MODIFIED/DELETED events for the difference);
//! - `POST /admin/pods` one pod: add or replace; `DELETE /admin/pods/<ns>/<name>`;
//! - `POST /admin/expire`: forget history and end every watch with a
//!   410 ERROR event, so clients must re-list;
//! - `POST /admin/fail?count=N`: answer the next N API requests with 500;
//! - `POST /admin/gone?count=N`: answer the next N WATCH requests with an
//!   HTTP 410 (on the request itself, not as an event in the stream);
//! - `POST /admin/hang` / `POST /admin/resume`: a hung server. While hung,
//!   open watches send nothing (no events, no bookmarks) and API requests
//!   get no answer; on resume those requests and watches are closed
//!   unanswered (their clients gave up long ago) and are not counted;
//! - `GET /admin/stats`: `{"lists": n, "watches": n, "unauthorized": n,
//!   "resourceVersion": "rv"}`.
//!
//! `--resource-version N` starts the version counter at N, so a fake
//! restarted with the last version it served continues where it left off
//! (like an API server restarting over the same etcd).

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::broadcast;

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

fn key_of(pod: &Value) -> (String, String) {
    let s = |p: &str| {
        pod.pointer(p)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    (s("/metadata/namespace"), s("/metadata/name"))
}

fn set_rv(pod: &mut Value, rv: u64) {
    if let Some(meta) = pod.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert("resourceVersion".into(), json!(rv.to_string()));
    }
}

#[derive(Clone, Debug)]
struct Event {
    rv: u64,
    kind: &'static str,
    object: Value,
}

#[derive(Clone, Debug)]
enum Live {
    Event(Event),
    /// History was dropped: every watch ends with 410.
    Expired,
}

#[derive(Default, Debug, Clone, Copy)]
struct Stats {
    lists: u64,
    watches: u64,
    unauthorized: u64,
}

struct Store {
    rv: u64,
    pods: BTreeMap<(String, String), Value>,
    history: VecDeque<Event>,
    /// Watches from a resourceVersion older than this get 410 Gone.
    oldest_rv: u64,
    fail_next: u64,
    /// WATCH requests still to answer with HTTP 410.
    gone_next: u64,
    stats: Stats,
}

const HISTORY: usize = 1000;

impl Store {
    fn record(&mut self, kind: &'static str, object: Value, live: &broadcast::Sender<Live>) {
        let event = Event {
            rv: self.rv,
            kind,
            object,
        };
        self.history.push_back(event.clone());
        while self.history.len() > HISTORY {
            if let Some(dropped) = self.history.pop_front() {
                self.oldest_rv = dropped.rv;
            }
        }
        let _ = live.send(Live::Event(event));
    }

    fn upsert(&mut self, mut pod: Value, live: &broadcast::Sender<Live>) {
        let key = key_of(&pod);
        self.rv += 1;
        set_rv(&mut pod, self.rv);
        let kind = if self.pods.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        self.pods.insert(key, pod.clone());
        self.record(kind, pod, live);
    }

    fn delete(&mut self, key: &(String, String), live: &broadcast::Sender<Live>) -> bool {
        let Some(mut pod) = self.pods.remove(key) else {
            return false;
        };
        self.rv += 1;
        set_rv(&mut pod, self.rv);
        self.record("DELETED", pod, live);
        true
    }
}

/// Shared server state.
pub struct FakeApi {
    node: String,
    token: Option<String>,
    store: Mutex<Store>,
    live: broadcast::Sender<Live>,
    /// True while the server plays hung (see the module docs).
    hung: tokio::sync::watch::Sender<bool>,
}

/// A request dropped without an answer (the connection is closed).
#[derive(Debug)]
pub struct Unanswered;

impl std::fmt::Display for Unanswered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("request held while hung, closed unanswered")
    }
}

impl std::error::Error for Unanswered {}

/// Resolves once the hung flag equals `value` (or its sender is gone).
async fn until_hung_is(hung: &mut tokio::sync::watch::Receiver<bool>, value: bool) {
    let _ = hung.wait_for(|h| *h == value).await;
}

type Body = BoxBody<Bytes, Infallible>;

fn full(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(Full::new(body.into()).boxed());
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

fn status_json(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn error(status: StatusCode, reason: &str, message: &str) -> Response<Body> {
    full(
        status,
        status_json(status.as_u16(), reason, message).to_string(),
    )
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let byte = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match byte {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Query parameters, percent-decoded.
fn query(req: &Request<Incoming>) -> BTreeMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

/// What a LIST or WATCH selects.
#[derive(Debug, Default)]
struct Selector {
    namespace: Option<String>,
    node: Option<String>,
    labels: Vec<(String, String)>,
}

impl Selector {
    fn parse(namespace: Option<String>, params: &BTreeMap<String, String>) -> Result<Self, String> {
        let mut selector = Selector {
            namespace,
            ..Selector::default()
        };
        if let Some(fields) = params.get("fieldSelector").filter(|s| !s.is_empty()) {
            for term in fields.split(',') {
                match term.split_once('=') {
                    Some(("spec.nodeName", node)) => selector.node = Some(node.to_string()),
                    _ => return Err(format!("unsupported field selector {term:?}")),
                }
            }
        }
        if let Some(labels) = params.get("labelSelector").filter(|s| !s.is_empty()) {
            for term in labels.split(',') {
                let (k, v) = term
                    .split_once("==")
                    .or_else(|| term.split_once('='))
                    .ok_or_else(|| format!("unsupported label selector {term:?}"))?;
                selector.labels.push((k.to_string(), v.to_string()));
            }
        }
        Ok(selector)
    }

    fn matches(&self, pod: &Value) -> bool {
        let get = |p: &str| pod.pointer(p).and_then(Value::as_str);
        if let Some(ns) = &self.namespace {
            if get("/metadata/namespace") != Some(ns.as_str()) {
                return false;
            }
        }
        if let Some(node) = &self.node {
            if get("/spec/nodeName") != Some(node.as_str()) {
                return false;
            }
        }
        self.labels.iter().all(|(k, v)| {
            pod.pointer("/metadata/labels")
                .and_then(|l| l.get(k))
                .and_then(Value::as_str)
                == Some(v.as_str())
        })
    }
}

impl FakeApi {
    pub fn new(
        node: String,
        token: Option<String>,
        scenario: Scenario,
        initial_rv: u64,
    ) -> Result<Arc<Self>, String> {
        let (live, _) = broadcast::channel(1024);
        let api = Arc::new(Self {
            node,
            token,
            store: Mutex::new(Store {
                rv: initial_rv,
                pods: BTreeMap::new(),
                history: VecDeque::new(),
                oldest_rv: initial_rv,
                fail_next: 0,
                gone_next: 0,
                stats: Stats::default(),
            }),
            live,
            hung: tokio::sync::watch::channel(false).0,
        });
        for pod in &scenario.pods {
            let object = pod_object(pod, &api.node)?;
            api.store().upsert(object, &api.live);
        }
        Ok(api)
    }

    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn authorized(&self, req: &Request<Incoming>) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        let expected = format!("Bearer {token}");
        req.headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            == Some(expected.as_str())
    }

    fn list(&self, selector: &Selector, params: &BTreeMap<String, String>) -> Response<Body> {
        let mut store = self.store();
        store.stats.lists += 1;
        let matching: Vec<&Value> = store
            .pods
            .values()
            .filter(|p| selector.matches(p))
            .collect();
        let offset: usize = params
            .get("continue")
            .and_then(|c| c.strip_prefix("offset-"))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        let limit: usize = params
            .get("limit")
            .and_then(|l| l.parse().ok())
            .filter(|l| *l > 0)
            .unwrap_or(usize::MAX);
        let page: Vec<&Value> = matching.iter().skip(offset).take(limit).copied().collect();
        let mut metadata = json!({"resourceVersion": store.rv.to_string()});
        if offset.saturating_add(page.len()) < matching.len() {
            metadata["continue"] = json!(format!("offset-{}", offset + page.len()));
        }
        let body =
            json!({"apiVersion": "v1", "kind": "PodList", "metadata": metadata, "items": page});
        full(StatusCode::OK, body.to_string())
    }

    fn watch(
        self: &Arc<Self>,
        selector: Selector,
        params: &BTreeMap<String, String>,
    ) -> Response<Body> {
        let timeout = params
            .get("timeoutSeconds")
            .and_then(|t| t.parse().ok())
            .map(Duration::from_secs)
            .unwrap_or(Duration::from_secs(1800));
        let bookmarks = params.get("allowWatchBookmarks").map(String::as_str) == Some("true");
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(256);
        let line = |kind: &str, object: &Value| {
            Bytes::from(format!("{}\n", json!({"type": kind, "object": object})))
        };

        // Subscribe before reading history so nothing falls in between.
        let mut live = self.live.subscribe();
        let mut initial = Vec::new();
        let from: u64;
        {
            let mut store = self.store();
            store.stats.watches += 1;
            if store.gone_next > 0 {
                store.gone_next -= 1;
                return error(StatusCode::GONE, "Expired", "too old resource version");
            }
            let requested = params
                .get("resourceVersion")
                .map(String::as_str)
                .unwrap_or("");
            match requested {
                "" | "0" => {
                    for pod in store.pods.values().filter(|p| selector.matches(p)) {
                        initial.push(line("ADDED", pod));
                    }
                    from = store.rv;
                }
                rv => match rv.parse::<u64>() {
                    Ok(rv) if rv >= store.oldest_rv => {
                        for event in store.history.iter().filter(|e| e.rv > rv) {
                            if selector.matches(&event.object) {
                                initial.push(line(event.kind, &event.object));
                            }
                        }
                        from = store.rv;
                    }
                    Ok(_) => {
                        initial.push(line(
                            "ERROR",
                            &status_json(410, "Expired", "too old resource version"),
                        ));
                        from = u64::MAX;
                    }
                    Err(_) => {
                        return error(
                            StatusCode::BAD_REQUEST,
                            "BadRequest",
                            "invalid resourceVersion",
                        )
                    }
                },
            }
        }
        let mut hung = self.hung.subscribe();
        tokio::spawn(async move {
            let hung_now = *hung.borrow_and_update();
            if hung_now {
                return;
            }
            for chunk in initial {
                if tx.send(chunk).await.is_err() {
                    return;
                }
            }
            if from == u64::MAX {
                return;
            }
            let deadline = tokio::time::sleep(timeout);
            tokio::pin!(deadline);
            let mut last_rv = from;
            let mut bookmark_tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    biased;
                    // Hung: send nothing, then end the stream on resume.
                    _ = until_hung_is(&mut hung, true) => {
                        until_hung_is(&mut hung, false).await;
                        return;
                    }
                    _ = &mut deadline => return,
                    _ = bookmark_tick.tick(), if bookmarks => {
                        let object = json!({"kind": "Pod", "apiVersion": "v1",
                            "metadata": {"resourceVersion": last_rv.to_string()}});
                        if tx.send(line("BOOKMARK", &object)).await.is_err() {
                            return;
                        }
                    }
                    received = live.recv() => match received {
                        Ok(Live::Event(event)) => {
                            if event.rv <= last_rv {
                                continue;
                            }
                            last_rv = event.rv;
                            if selector.matches(&event.object)
                                && tx.send(line(event.kind, &event.object)).await.is_err()
                            {
                                return;
                            }
                        }
                        Ok(Live::Expired) | Err(broadcast::error::RecvError::Lagged(_)) => {
                            let _ = tx.send(line("ERROR", &status_json(410, "Expired", "too old resource version"))).await;
                            return;
                        }
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                }
            }
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx)
            .map(|chunk| Ok::<_, Infallible>(Frame::data(chunk)));
        let mut resp = Response::new(BodyExt::boxed(StreamBody::new(stream)));
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        resp
    }

    async fn admin(self: &Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let params = query(&req);
        let body = match req.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return error(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string()),
        };
        let parse =
            |bytes: &Bytes| serde_json::from_slice::<Value>(bytes).map_err(|e| e.to_string());
        match (method, path.as_str()) {
            (Method::GET, "/admin/pods") => {
                let store = self.store();
                full(
                    StatusCode::OK,
                    json!({"pods": store.pods.values().collect::<Vec<_>>()}).to_string(),
                )
            }
            (Method::GET, "/admin/stats") => {
                let store = self.store();
                let s = store.stats;
                full(
                    StatusCode::OK,
                    json!({"lists": s.lists, "watches": s.watches, "unauthorized": s.unauthorized,
                           "resourceVersion": store.rv.to_string()})
                    .to_string(),
                )
            }
            (Method::PUT, "/admin/pods") => {
                let scenario: Scenario = match parse(&body)
                    .and_then(|v| serde_json::from_value(v).map_err(|e| e.to_string()))
                {
                    Ok(s) => s,
                    Err(e) => return error(StatusCode::BAD_REQUEST, "BadRequest", &e),
                };
                let mut objects = Vec::new();
                for pod in &scenario.pods {
                    match pod_object(pod, &self.node) {
                        Ok(o) => objects.push(o),
                        Err(e) => return error(StatusCode::BAD_REQUEST, "BadRequest", &e),
                    }
                }
                let mut store = self.store();
                let keep: Vec<(String, String)> = objects.iter().map(key_of).collect();
                let gone: Vec<(String, String)> = store
                    .pods
                    .keys()
                    .filter(|k| !keep.contains(k))
                    .cloned()
                    .collect();
                for key in gone {
                    store.delete(&key, &self.live);
                }
                for object in objects {
                    if store.pods.get(&key_of(&object)).map(strip_rv) != Some(strip_rv(&object)) {
                        store.upsert(object, &self.live);
                    }
                }
                full(
                    StatusCode::OK,
                    json!({"resourceVersion": store.rv.to_string()}).to_string(),
                )
            }
            (Method::POST, "/admin/pods") => {
                let object = match parse(&body).and_then(|v| pod_object(&v, &self.node)) {
                    Ok(o) => o,
                    Err(e) => return error(StatusCode::BAD_REQUEST, "BadRequest", &e),
                };
                let mut store = self.store();
                store.upsert(object, &self.live);
                full(
                    StatusCode::OK,
                    json!({"resourceVersion": store.rv.to_string()}).to_string(),
                )
            }
            (Method::DELETE, p) if p.starts_with("/admin/pods/") => {
                let rest = &p["/admin/pods/".len()..];
                let Some((ns, name)) = rest.split_once('/') else {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        "use /admin/pods/<namespace>/<name>",
                    );
                };
                let mut store = self.store();
                if store.delete(&(ns.to_string(), name.to_string()), &self.live) {
                    full(
                        StatusCode::OK,
                        json!({"resourceVersion": store.rv.to_string()}).to_string(),
                    )
                } else {
                    error(StatusCode::NOT_FOUND, "NotFound", "no such pod")
                }
            }
            (Method::POST, "/admin/expire") => {
                let mut store = self.store();
                store.history.clear();
                store.oldest_rv = store.rv + 1;
                let _ = self.live.send(Live::Expired);
                full(
                    StatusCode::OK,
                    json!({"oldestResourceVersion": store.oldest_rv.to_string()}).to_string(),
                )
            }
            (Method::POST, "/admin/gone") => {
                let count = params
                    .get("count")
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(1);
                self.store().gone_next = count;
                full(StatusCode::OK, json!({"goneNext": count}).to_string())
            }
            (Method::POST, "/admin/hang") => {
                self.hung.send_replace(true);
                full(StatusCode::OK, json!({"hung": true}).to_string())
            }
            (Method::POST, "/admin/resume") => {
                self.hung.send_replace(false);
                full(StatusCode::OK, json!({"hung": false}).to_string())
            }
            (Method::POST, "/admin/fail") => {
                let count = params
                    .get("count")
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(1);
                self.store().fail_next = count;
                full(StatusCode::OK, json!({"failNext": count}).to_string())
            }
            _ => error(StatusCode::NOT_FOUND, "NotFound", "unknown admin endpoint"),
        }
    }

    /// Serves one request; while hung, API requests wait and are then
    /// dropped unanswered.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, Unanswered> {
        if req.uri().path().starts_with("/admin/") {
            return Ok(self.admin(req).await);
        }
        if *self.hung.borrow() {
            until_hung_is(&mut self.hung.subscribe(), false).await;
            return Err(Unanswered);
        }
        Ok(self.api(req))
    }

    fn api(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_string();
        if !self.authorized(&req) {
            self.store().stats.unauthorized += 1;
            return error(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized");
        }
        {
            let mut store = self.store();
            if store.fail_next > 0 {
                store.fail_next -= 1;
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "InternalError",
                    "injected failure",
                );
            }
        }
        if req.method() != Method::GET {
            return error(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                "GET only",
            );
        }
        let params = query(&req);
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (namespace, name) = match segments.as_slice() {
            ["api", "v1", "pods"] => (None, None),
            ["api", "v1", "namespaces", ns, "pods"] => (Some(ns.to_string()), None),
            ["api", "v1", "namespaces", ns, "pods", name] => {
                (Some(ns.to_string()), Some(name.to_string()))
            }
            _ => {
                return error(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    "the fake serves pods only",
                )
            }
        };
        if let (Some(ns), Some(name)) = (&namespace, &name) {
            let store = self.store();
            return match store.pods.get(&(ns.clone(), name.clone())) {
                Some(pod) => full(StatusCode::OK, pod.to_string()),
                None => error(StatusCode::NOT_FOUND, "NotFound", "pod not found"),
            };
        }
        let selector = match Selector::parse(namespace, &params) {
            Ok(s) => s,
            Err(e) => return error(StatusCode::BAD_REQUEST, "BadRequest", &e),
        };
        let watching = matches!(
            params.get("watch").map(String::as_str),
            Some("1") | Some("true")
        );
        if watching {
            self.watch(selector, &params)
        } else {
            self.list(&selector, &params)
        }
    }
}

fn strip_rv(pod: &Value) -> Value {
    let mut pod = pod.clone();
    if let Some(meta) = pod.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("resourceVersion");
    }
    pod
}

/// TLS settings for serving HTTPS (to exercise the in-cluster path).
pub struct Tls {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn tls_acceptor(tls: &Tls) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    use tokio_rustls::rustls;
    let certs = CertificateDer::pem_file_iter(&tls.cert)?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(&tls.key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Serves until the process is stopped. Prints one ready line with the URL.
pub async fn run(
    listen: SocketAddr,
    scenario: Option<PathBuf>,
    node: String,
    token: Option<String>,
    tls: Option<Tls>,
    initial_rv: u64,
) -> anyhow::Result<()> {
    let scenario = match scenario {
        Some(path) => serde_json::from_str(&std::fs::read_to_string(&path)?)?,
        None => Scenario::default(),
    };
    let api = FakeApi::new(node, token, scenario, initial_rv).map_err(anyhow::Error::msg)?;
    let acceptor = tls.as_ref().map(tls_acceptor).transpose()?;
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let scheme = if acceptor.is_some() { "https" } else { "http" };
    println!("READY {scheme}://{addr}");
    loop {
        let (stream, _) = listener.accept().await?;
        let api = api.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let api = api.clone();
                async move { api.handle(req).await }
            });
            let builder = hyper::server::conn::http1::Builder::new();
            let result = match acceptor {
                Some(acceptor) => match acceptor.accept(stream).await {
                    Ok(tls) => builder.serve_connection(TokioIo::new(tls), service).await,
                    Err(e) => {
                        eprintln!("fake kube-api: TLS handshake failed: {e}");
                        return;
                    }
                },
                None => {
                    builder
                        .serve_connection(TokioIo::new(stream), service)
                        .await
                }
            };
            if let Err(e) = result {
                eprintln!("fake kube-api: connection error: {e}");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simple_pods_become_pod_objects() {
        let pod = pod_object(
            &json!({"name": "vllm-0", "namespace": "llm", "podIP": "127.0.0.1",
                    "labels": {"app.kubernetes.io/part-of": "llm-platform"},
                    "annotations": {"prometheus.io/port": "8000"},
                    "containers": [{"name": "server", "ports": [{"name": "http", "containerPort": 8000}],
                                    "containerID": "containerd://abc"}]}),
            "node-1",
        )
        .unwrap();
        assert_eq!(pod["spec"]["nodeName"], "node-1");
        assert_eq!(pod["status"]["podIP"], "127.0.0.1");
        assert_eq!(pod["status"]["phase"], "Running");
        assert_eq!(pod["status"]["containerStatuses"][0]["ready"], true);
        assert_eq!(
            pod["status"]["containerStatuses"][0]["containerID"],
            "containerd://abc"
        );
        assert_eq!(
            pod["spec"]["containers"][0]["ports"][0]["containerPort"],
            8000
        );
        let uid = pod["metadata"]["uid"].as_str().unwrap();
        assert_eq!(uid, derived_uid("llm", "vllm-0"));
        assert_eq!(uid.len(), 36);
        assert!(pod_object(&json!({"name": "x"}), "n").is_err());
        assert!(pod_object(&json!({"name": "x", "namespace": "y", "bogus": 1}), "n").is_err());
    }

    #[test]
    fn pod_info_shaped_pods_are_accepted() {
        let pod = pod_object(
            &json!({"namespace": "llm", "name": "sim-a", "uid": "uid-sim-a", "ip": "127.0.0.1",
                    "phase": "Running", "ready": true, "labels": {"app.kubernetes.io/part-of": "llm-platform"},
                    "annotations": {"prometheus.io/port": "8001"},
                    "container_ports": [{"container": "server", "name": "http", "port": 8001}],
                    "restart_count": 2}),
            "node-1",
        )
        .unwrap();
        assert_eq!(pod["metadata"]["uid"], "uid-sim-a");
        assert_eq!(pod["status"]["podIP"], "127.0.0.1");
        assert_eq!(pod["status"]["containerStatuses"][0]["restartCount"], 2);
        assert_eq!(pod["spec"]["containers"][0]["name"], "server");
        assert_eq!(
            pod["spec"]["containers"][0]["ports"][0]["containerPort"],
            8001
        );
    }

    #[test]
    fn query_values_are_percent_decoded() {
        assert_eq!(
            percent_decode("spec.nodeName%3Dnode-1"),
            "spec.nodeName=node-1"
        );
        assert_eq!(percent_decode("a+b%2"), "a b%2");
        assert_eq!(percent_decode("%zz"), "%zz");
    }

    #[test]
    fn selectors() {
        let pod = pod_object(
            &json!({"name": "a", "namespace": "llm", "node": "n1", "labels": {"team": "x"}}),
            "n0",
        )
        .unwrap();
        let params = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let s = Selector::parse(
            None,
            &params(&[
                ("fieldSelector", "spec.nodeName=n1"),
                ("labelSelector", "team=x"),
            ]),
        )
        .unwrap();
        assert!(s.matches(&pod));
        let s = Selector::parse(None, &params(&[("fieldSelector", "spec.nodeName=n2")])).unwrap();
        assert!(!s.matches(&pod));
        let s = Selector::parse(Some("other".into()), &params(&[])).unwrap();
        assert!(!s.matches(&pod));
        assert!(
            Selector::parse(None, &params(&[("fieldSelector", "status.phase=Running")])).is_err()
        );
    }

    fn watch_params(rv: &str) -> BTreeMap<String, String> {
        [
            ("resourceVersion", rv),
            ("allowWatchBookmarks", "false"),
            ("timeoutSeconds", "30"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    async fn next_line(body: &mut Body) -> Option<Value> {
        let frame = tokio::time::timeout(Duration::from_millis(300), body.frame())
            .await
            .ok()??
            .ok()?;
        serde_json::from_slice(&frame.into_data().ok()?).ok()
    }

    fn api_with_one_pod(initial_rv: u64) -> Arc<FakeApi> {
        let scenario = Scenario {
            pods: vec![json!({"name": "a", "namespace": "llm"})],
        };
        FakeApi::new("n".into(), None, scenario, initial_rv).unwrap()
    }

    #[tokio::test]
    async fn a_restart_with_the_last_version_continues_the_sequence() {
        let api = api_with_one_pod(5000);
        assert_eq!(api.store().rv, 5001);
        let selector = Selector::parse(None, &BTreeMap::new()).unwrap();
        let mut body = api.watch(selector, &watch_params("5001")).into_body();
        let pod = pod_object(&json!({"name": "b", "namespace": "llm"}), "n").unwrap();
        api.store().upsert(pod, &api.live);
        let event = next_line(&mut body).await.unwrap();
        assert_eq!(event["type"], "ADDED");
        assert_eq!(event["object"]["metadata"]["resourceVersion"], "5002");
        // A version from before the restart's first one is too old.
        let selector = Selector::parse(None, &BTreeMap::new()).unwrap();
        let mut old = api.watch(selector, &watch_params("4000")).into_body();
        assert_eq!(next_line(&mut old).await.unwrap()["object"]["code"], 410);
    }

    #[tokio::test]
    async fn gone_answers_the_watch_request_itself_with_410() {
        let api = api_with_one_pod(100);
        api.store().gone_next = 1;
        let selector = || Selector::parse(None, &BTreeMap::new()).unwrap();
        assert_eq!(
            api.watch(selector(), &watch_params("101")).status(),
            StatusCode::GONE
        );
        assert_eq!(
            api.watch(selector(), &watch_params("101")).status(),
            StatusCode::OK
        );
    }

    #[tokio::test]
    async fn a_hung_server_sends_nothing_until_resumed_then_ends_the_watch() {
        let api = api_with_one_pod(100);
        let selector = Selector::parse(None, &BTreeMap::new()).unwrap();
        let mut body = api.watch(selector, &watch_params("101")).into_body();
        let b = pod_object(&json!({"name": "b", "namespace": "llm"}), "n").unwrap();
        api.store().upsert(b, &api.live);
        assert_eq!(next_line(&mut body).await.unwrap()["type"], "ADDED");
        api.hung.send_replace(true);
        let c = pod_object(&json!({"name": "c", "namespace": "llm"}), "n").unwrap();
        api.store().upsert(c, &api.live);
        assert!(next_line(&mut body).await.is_none(), "an event while hung");
        api.hung.send_replace(false);
        let end = tokio::time::timeout(Duration::from_secs(2), body.frame()).await;
        assert!(matches!(end, Ok(None)), "the stream ends on resume");
    }
}
