//! `tokentap-fakes`: stand-ins for the kubelet PodResources API and the
//! Kubernetes API, so the exporter's real client code runs in tests and in
//! the demo without a cluster. Each subcommand prints one `READY <address>`
//! line on stdout once it accepts connections.

mod kube_api;
mod kubelet;

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "tokentap-fakes", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fake kubelet PodResources gRPC server on a unix socket.
    Kubelet {
        /// Socket path to create.
        #[arg(long)]
        socket: PathBuf,
        /// JSON scenario (re-read when it changes).
        #[arg(long)]
        scenario: PathBuf,
    },
    /// Fake Kubernetes API serving pods (list, watch, admin endpoints).
    KubeApi {
        /// Address to bind; port 0 picks a free one (printed on the ready line).
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// JSON scenario with the initial pods.
        #[arg(long)]
        scenario: Option<PathBuf>,
        /// `spec.nodeName` of pods that do not name a node.
        #[arg(long, default_value = "gpu-node-1")]
        node: String,
        /// Require `Authorization: Bearer <token>` on API calls.
        #[arg(long)]
        token: Option<String>,
        /// Serve HTTPS with this certificate (PEM) ...
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// ... and this private key (PEM).
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// First resourceVersion; give the last one a previous run served
        /// to restart with continuity.
        #[arg(long, default_value_t = 100)]
        resource_version: u64,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match cli.command {
            Command::Kubelet { socket, scenario } => kubelet::run(socket, scenario).await,
            Command::KubeApi {
                listen,
                scenario,
                node,
                token,
                tls_cert,
                tls_key,
                resource_version,
            } => {
                let tls = match (tls_cert, tls_key) {
                    (Some(cert), Some(key)) => Some(kube_api::Tls { cert, key }),
                    _ => None,
                };
                kube_api::run(listen, scenario, node, token, tls, resource_version).await
            }
        }
    })
}
