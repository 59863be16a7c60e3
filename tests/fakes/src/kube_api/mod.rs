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
//!
//! Split by concern: [`pods`] (scenario pod forms), [`store`] (state and
//! selection), [`watch`] (streams), [`routes`] and [`admin`] (requests).

mod admin;
mod pods;
mod routes;
mod store;
#[cfg(test)]
mod tests;
mod watch;

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::Request;
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::sync::broadcast;

use pods::{pod_object, Scenario};
use store::{Live, Stats, Store};

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

type Body = BoxBody<Bytes, Infallible>;

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
