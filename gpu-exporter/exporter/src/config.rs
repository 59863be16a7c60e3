//! Command line and environment. Every flag has an environment variable so
//! that the DaemonSet can configure it from a ConfigMap or the downward API.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, ValueEnum};
use tokentap_runtime_metrics::duration::{parse_duration, parse_positive_duration};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// gpu-exporter: GPU metrics from NVML, attributed to pods and workloads.
#[derive(Debug, Parser)]
#[command(name = "gpu-exporter", version, about, long_about = None)]
pub struct Cli {
    /// Address to serve /metrics and /healthz on.
    #[arg(long, env = "GPU_EXPORTER_LISTEN", default_value = "0.0.0.0:9402")]
    pub listen: SocketAddr,

    /// Name of this node (downward API `spec.nodeName`); scopes the pod watch
    /// and is exported on `llm_gpu_info`.
    #[arg(long, env = "NODE_NAME", default_value = "")]
    pub node_name: String,

    /// Time between collection passes. Scrapes serve the last pass.
    #[arg(long, env = "GPU_EXPORTER_COLLECT_INTERVAL", default_value = "10s", value_parser = parse_positive_duration)]
    pub collect_interval: Duration,

    #[command(flatten)]
    pub nvml: NvmlArgs,

    #[command(flatten)]
    pub kubelet: KubeletArgs,

    #[command(flatten)]
    pub kube: KubeArgs,

    /// Extra pod label keys that become series labels, comma-separated
    /// (`model`, `route_class`, `team` are always present).
    #[arg(long, env = "GPU_EXPORTER_POD_LABEL_ALLOWLIST", value_delimiter = ',')]
    pub pod_label_allowlist: Vec<String>,

    /// Root of the host's process table, for PID-to-pod attribution of GPU
    /// processes (mount the host's /proc here); empty disables it.
    #[arg(long, env = "GPU_EXPORTER_HOST_PROC", default_value = "/proc")]
    pub host_proc: String,

    /// How long counters of a pod that left the node are still exported.
    #[arg(long, env = "GPU_EXPORTER_STALE_RETENTION", default_value = "15m", value_parser = parse_duration)]
    pub stale_retention: Duration,

    /// Also export dcgm-exporter-compatible names (DCGM_FI_DEV_*).
    #[arg(long, env = "GPU_EXPORTER_DCGM_COMPAT", default_value_t = false)]
    pub dcgm_compat: bool,

    /// Log format.
    #[arg(
        long,
        env = "GPU_EXPORTER_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,

    /// Log filter (tracing EnvFilter syntax); RUST_LOG overrides it.
    #[arg(long, env = "GPU_EXPORTER_LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    /// Inference-runtime scraping (normalized `llm_runtime_*` metrics).
    #[command(flatten)]
    pub runtime: tokentap_runtime_metrics::RuntimeArgs,
}

#[derive(Debug, Args)]
pub struct NvmlArgs {
    /// NVML library to load (default: libnvidia-ml.so.1 from the loader path).
    #[arg(long = "nvml-lib", env = "GPU_EXPORTER_NVML_LIB")]
    pub lib: Option<PathBuf>,

    /// Wait between attempts to load NVML after a failure.
    #[arg(long = "nvml-retry-interval", env = "GPU_EXPORTER_NVML_RETRY_INTERVAL", default_value = "60s", value_parser = parse_positive_duration)]
    pub retry_interval: Duration,

    /// Disable the XID event thread.
    #[arg(
        long = "no-xid-events",
        env = "GPU_EXPORTER_NO_XID_EVENTS",
        default_value_t = false
    )]
    pub no_xid_events: bool,
}

#[derive(Debug, Args)]
pub struct KubeletArgs {
    /// Kubelet PodResources socket; empty disables GPU-to-pod attribution.
    #[arg(
        long = "kubelet-socket",
        env = "GPU_EXPORTER_KUBELET_SOCKET",
        default_value = "/var/lib/kubelet/pod-resources/kubelet.sock"
    )]
    pub socket: String,

    /// Timeout of one PodResources call.
    #[arg(long = "kubelet-timeout", env = "GPU_EXPORTER_KUBELET_TIMEOUT", default_value = "5s", value_parser = parse_positive_duration)]
    pub call_timeout: Duration,

    /// Extra resource names that carry NVIDIA GPUs, comma-separated, beyond
    /// nvidia.com/gpu, nvidia.com/gpu.* and nvidia.com/mig-*.
    #[arg(
        long = "gpu-resource-names",
        env = "GPU_EXPORTER_GPU_RESOURCE_NAMES",
        value_delimiter = ','
    )]
    pub extra_resources: Vec<String>,
}

#[derive(Debug, Args)]
pub struct KubeArgs {
    /// Kubernetes API URL. Default: in-cluster (KUBERNETES_SERVICE_HOST);
    /// `none` disables the pod watch (no workload labels).
    #[arg(long = "kube-api-url", env = "GPU_EXPORTER_KUBE_API_URL")]
    pub url: Option<String>,

    /// Bearer token file (re-read on every connection); empty for none.
    #[arg(long = "kube-token-file", env = "GPU_EXPORTER_KUBE_TOKEN_FILE", default_value = crate::kube::SA_TOKEN)]
    pub token_file: String,

    /// CA bundle for an https API URL.
    #[arg(long = "kube-ca-file", env = "GPU_EXPORTER_KUBE_CA_FILE", default_value = crate::kube::SA_CA)]
    pub ca_file: String,

    /// Timeout of connects and LIST calls.
    #[arg(long = "kube-timeout", env = "GPU_EXPORTER_KUBE_TIMEOUT", default_value = "10s", value_parser = parse_positive_duration)]
    pub timeout: Duration,

    /// Server-side timeout of one WATCH; the watch then resumes.
    #[arg(long = "kube-watch-timeout", env = "GPU_EXPORTER_KUBE_WATCH_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    pub watch_timeout: Duration,

    /// Longest silence of the pod watch (no event, no bookmark) before the
    /// API server is probed; when the probe fails too, the pod collector
    /// reports failure and serves its last known pods, marked stale.
    #[arg(long = "kube-watch-progress-timeout", env = "GPU_EXPORTER_KUBE_WATCH_PROGRESS_TIMEOUT", default_value = "30s", value_parser = parse_positive_duration)]
    pub progress_timeout: Duration,
}

fn non_empty(s: &str) -> Option<PathBuf> {
    (!s.trim().is_empty()).then(|| PathBuf::from(s))
}

impl KubeArgs {
    /// The API URL to use, if any.
    pub fn resolved_url(&self) -> Option<String> {
        match self.url.as_deref().map(str::trim) {
            Some("none") | Some("") => None,
            Some(url) => Some(url.to_string()),
            None => crate::kube::in_cluster_url(),
        }
    }

    pub fn token_path(&self) -> Option<PathBuf> {
        non_empty(&self.token_file)
    }

    pub fn ca_path(&self) -> Option<PathBuf> {
        non_empty(&self.ca_file)
    }
}

impl KubeletArgs {
    pub fn socket_path(&self) -> Option<PathBuf> {
        non_empty(&self.socket)
    }
}

impl Cli {
    pub fn host_proc_path(&self) -> Option<PathBuf> {
        non_empty(&self.host_proc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_duration_flag_uses_the_shared_parser() {
        // `1h` was refused by the runtime crate's own parser before.
        let cli = Cli::try_parse_from([
            "gpu-exporter",
            "--stale-retention",
            "1h",
            "--runtime-scrape-interval",
            "0.5m",
            "--kube-watch-progress-timeout",
            "1h",
        ])
        .unwrap();
        assert_eq!(cli.stale_retention, Duration::from_secs(3600));
        assert_eq!(cli.runtime.runtime_scrape_interval, Duration::from_secs(30));
        assert_eq!(cli.kube.progress_timeout, Duration::from_secs(3600));
        // Zero is refused where it would spin, with the flag named.
        for flag in [
            "--collect-interval",
            "--runtime-scrape-interval",
            "--kube-timeout",
        ] {
            let err = Cli::try_parse_from(["gpu-exporter", flag, "0s"]).unwrap_err();
            assert!(err.to_string().contains(flag), "{err}");
        }
        let cli = Cli::try_parse_from(["gpu-exporter", "--stale-retention", "0s"]).unwrap();
        assert_eq!(cli.stale_retention, Duration::ZERO);
    }

    #[test]
    fn defaults_parse() {
        let cli = Cli::try_parse_from(["gpu-exporter", "--kube-api-url", "none"]).unwrap();
        assert_eq!(cli.collect_interval, Duration::from_secs(10));
        assert_eq!(cli.kube.resolved_url(), None);
        assert!(cli.kubelet.socket_path().is_some());
        let cli = Cli::try_parse_from([
            "gpu-exporter",
            "--kubelet-socket",
            "",
            "--pod-label-allowlist",
            "app.kubernetes.io/name,env",
        ])
        .unwrap();
        assert!(cli.kubelet.socket_path().is_none());
        assert_eq!(cli.pod_label_allowlist, ["app.kubernetes.io/name", "env"]);
    }
}
