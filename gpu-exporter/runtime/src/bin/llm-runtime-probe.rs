//! `llm-runtime-probe`: the runtime collector on its own, for end-to-end tests
//! and for checking a runtime's mapping by hand without a cluster.
//!
//! It reads pods (JSON array of `tokentap_workload::PodInfo`) from a file,
//! scrapes them with exactly the code gpu-exporter embeds, and serves the
//! normalized `llm_runtime_*` metrics on `/metrics`.
//!
//! ```text
//! llm-runtime-probe --pods pods.json --listen 127.0.0.1:0 --runtime-scrape-interval 1s
//! ```

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use bytes::Bytes;
use clap::Parser;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokentap_runtime_metrics::{RuntimeArgs, RuntimeCollector, RuntimeCollectorHandle};
use tokentap_workload::{PodInfo, WorkloadLabelPolicy};

#[derive(Parser, Debug)]
#[command(
    name = "llm-runtime-probe",
    about = "Scrape runtime pods listed in a file and serve llm_runtime_* metrics"
)]
struct Cli {
    /// JSON array of pods (tokentap_workload::PodInfo); re-read every scrape interval.
    #[arg(long)]
    pods: PathBuf,
    /// Where to serve /metrics.
    #[arg(long, default_value = "127.0.0.1:9403")]
    listen: SocketAddr,
    /// Extra pod label keys exported as labels, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pod_label_allowlist: Vec<String>,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

fn read_pods(path: &PathBuf) -> anyhow::Result<Vec<PodInfo>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let cli = Cli::parse();
    let policy = WorkloadLabelPolicy::with_extra_keys(&cli.pod_label_allowlist);
    let collector = RuntimeCollector::new(&cli.runtime, policy);
    collector.update_pods(&read_pods(&cli.pods)?);

    let mut registry = Registry::default();
    registry.register_collector(Box::new(RuntimeCollectorHandle(collector.clone())));
    let registry = Arc::new(registry);

    // Re-read the pod file so tests can add and remove pods.
    {
        let collector = collector.clone();
        let path = cli.pods.clone();
        let every = cli.runtime.runtime_scrape_interval;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                match read_pods(&path) {
                    Ok(pods) => collector.update_pods(&pods),
                    Err(e) => {
                        tracing::warn!(error = %e, "pod file unreadable; keeping the last pods")
                    }
                }
            }
        });
    }
    tokio::spawn(collector.clone().run(std::future::pending()));

    let listener = tokio::net::TcpListener::bind(cli.listen).await?;
    println!("llm-runtime-probe listening on {}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        let registry = registry.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |_req| {
                let registry = registry.clone();
                async move {
                    let mut body = String::new();
                    let status =
                        match prometheus_client::encoding::text::encode(&mut body, &registry) {
                            Ok(()) => http::StatusCode::OK,
                            Err(_) => http::StatusCode::INTERNAL_SERVER_ERROR,
                        };
                    let mut resp = http::Response::new(Full::new(Bytes::from(body)));
                    *resp.status_mut() = status;
                    resp.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static(
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        ),
                    );
                    Ok::<_, Infallible>(resp)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
