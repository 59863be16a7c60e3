//! The API client: LIST and WATCH of one node's pods over HTTP/1.1 (HTTPS
//! in cluster), with a progress bound and a probe for liveness, TCP
//! keepalive, and a backoff between failed cycles.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use super::model::decode_list;
use super::{decode_watch_line, NodePod, PodStore, WatchEvent};
use crate::health::ErrorKind;

/// Default service-account paths inside a pod.
pub const SA_TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
pub const SA_CA: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";

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
            let page = decode_list(&body)?;
            pods.extend(page.pods);
            match page.continue_token {
                Some(token) => continue_token = Some(token),
                None => return Ok((pods, page.resource_version)),
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
