//! The runtime collector's flags, flattened into the exporter's command line.

use std::time::Duration;

use crate::duration::parse_positive_duration;

/// CLI/env flags, flattened into the exporter's clap parser with
/// `#[command(flatten)]`.
#[derive(clap::Args, Clone, Debug)]
pub struct RuntimeArgs {
    /// Label selector of inference-runtime pods on this node.
    #[arg(
        long,
        env = "TOKENTAP_RUNTIME_SELECTOR",
        default_value = "app.kubernetes.io/part-of=llm-platform"
    )]
    pub runtime_selector: String,
    /// Metrics port when a pod has no `prometheus.io/port` annotation and no
    /// port named `metrics`/`http`.
    #[arg(long, env = "TOKENTAP_RUNTIME_DEFAULT_PORT", default_value_t = 8000)]
    pub runtime_default_port: u16,
    /// How often every runtime pod is scraped.
    #[arg(long, env = "TOKENTAP_RUNTIME_SCRAPE_INTERVAL", default_value = "5s", value_parser = parse_positive_duration)]
    pub runtime_scrape_interval: Duration,
    /// Per-scrape deadline (connect + response + body).
    #[arg(long, env = "TOKENTAP_RUNTIME_SCRAPE_TIMEOUT", default_value = "2s", value_parser = parse_positive_duration)]
    pub runtime_scrape_timeout: Duration,
    /// Larger metrics bodies are refused.
    #[arg(long, env = "TOKENTAP_RUNTIME_MAX_BODY_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub runtime_max_body_bytes: usize,
    /// Bodies with more series are refused.
    #[arg(long, env = "TOKENTAP_RUNTIME_MAX_SERIES", default_value_t = 20_000)]
    pub runtime_max_series: usize,
    /// Turn runtime scraping off.
    #[arg(long, env = "TOKENTAP_RUNTIME_DISABLE")]
    pub runtime_disable: bool,
}

impl Default for RuntimeArgs {
    fn default() -> Self {
        Self {
            runtime_selector: "app.kubernetes.io/part-of=llm-platform".into(),
            runtime_default_port: 8000,
            runtime_scrape_interval: Duration::from_secs(5),
            runtime_scrape_timeout: Duration::from_secs(2),
            runtime_max_body_bytes: 4 * 1024 * 1024,
            runtime_max_series: 20_000,
            runtime_disable: false,
        }
    }
}
