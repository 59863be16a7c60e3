//! Which pods are inference runtimes, and where their metrics live.

use tokentap_workload::{PodInfo, WorkloadLabelPolicy, WorkloadLabels};

use crate::normalize::Runtime;

/// Pod label naming the runtime (Gateway API Inference Extension).
pub const ENGINE_TYPE_LABEL: &str = "inference.networking.k8s.io/engine-type";

/// A Kubernetes-style equality selector: `k=v`, `k==v`, `k!=v`, `k`, `!k`,
/// comma-separated, all of which must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelSelector(Vec<Requirement>);

#[derive(Clone, Debug, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    NotExists(String),
}

/// A selector that cannot be parsed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid label selector term `{0}`")]
pub struct SelectorError(pub String);

impl LabelSelector {
    pub fn parse(text: &str) -> Result<Self, SelectorError> {
        let mut reqs = Vec::new();
        for term in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let req = if let Some((k, v)) = term.split_once("!=") {
                Requirement::NotEquals(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = term.split_once("==") {
                Requirement::Equals(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = term.split_once('=') {
                Requirement::Equals(k.trim().into(), v.trim().into())
            } else if let Some(k) = term.strip_prefix('!') {
                Requirement::NotExists(k.trim().into())
            } else {
                Requirement::Exists(term.into())
            };
            let key_ok = match &req {
                Requirement::Equals(k, _)
                | Requirement::NotEquals(k, _)
                | Requirement::Exists(k)
                | Requirement::NotExists(k) => !k.is_empty() && !k.contains(char::is_whitespace),
            };
            if !key_ok {
                return Err(SelectorError(term.to_string()));
            }
            reqs.push(req);
        }
        Ok(Self(reqs))
    }

    pub fn matches(&self, labels: &std::collections::BTreeMap<String, String>) -> bool {
        self.0.iter().all(|r| match r {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::NotEquals(k, v) => labels.get(k) != Some(v),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::NotExists(k) => !labels.contains_key(k),
        })
    }
}

/// Discovery settings.
#[derive(Clone, Debug)]
pub struct DiscoveryConfig {
    pub selector: LabelSelector,
    pub default_port: u16,
}

/// One runtime endpoint to scrape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// Stable identity across pod updates (the UID, else namespace/name).
    pub key: String,
    pub namespace: String,
    pub pod: String,
    /// `http://ip:port/path`; `None` when the scheme is not plain HTTP.
    pub url: Option<String>,
    pub runtime_hint: Option<Runtime>,
    pub workload: WorkloadLabels,
}

fn named_port(pod: &PodInfo, name: &str) -> Option<u16> {
    pod.container_ports
        .iter()
        .find(|p| p.name.as_deref() == Some(name))
        .map(|p| p.port)
}

/// Stable identity of a pod's target across updates: the UID, else
/// namespace/name.
pub fn target_key(pod: &PodInfo) -> String {
    if pod.uid.is_empty() {
        format!("{}/{}", pod.namespace, pod.name)
    } else {
        pod.uid.clone()
    }
}

/// The scrape target of a pod, if it is a Running runtime pod with an IP.
pub fn target_for(
    pod: &PodInfo,
    cfg: &DiscoveryConfig,
    policy: &WorkloadLabelPolicy,
) -> Option<Target> {
    if pod.phase != "Running" || !cfg.selector.matches(&pod.labels) {
        return None;
    }
    let ip = pod.ip.as_deref().filter(|ip| !ip.is_empty())?;
    let hint = pod
        .labels
        .get(ENGINE_TYPE_LABEL)
        .and_then(|v| Runtime::from_engine_type(v));
    let annotated_port = pod
        .annotations
        .get("prometheus.io/port")
        .and_then(|p| p.trim().parse::<u16>().ok())
        .filter(|p| *p != 0);
    let port = annotated_port
        .or_else(|| named_port(pod, "metrics"))
        .or_else(|| hint.and_then(Runtime::default_port))
        .or_else(|| named_port(pod, "http"))
        .unwrap_or(cfg.default_port);
    let path = pod
        .annotations
        .get("prometheus.io/path")
        .map(|p| p.trim().to_string())
        .filter(|p| p.starts_with('/'))
        .unwrap_or_else(|| hint.map_or("/metrics", Runtime::default_path).to_string());
    let scheme = pod
        .annotations
        .get("prometheus.io/scheme")
        .map(|s| s.trim().to_ascii_lowercase())
        .unwrap_or_else(|| "http".into());
    let host = if ip.contains(':') {
        format!("[{ip}]")
    } else {
        ip.to_string()
    };
    let url = (scheme == "http").then(|| format!("http://{host}:{port}{path}"));
    Some(Target {
        key: target_key(pod),
        namespace: pod.namespace.clone(),
        pod: pod.name.clone(),
        url,
        runtime_hint: hint,
        workload: policy.labels_for(&pod.labels),
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use tokentap_workload::ContainerPort;

    use super::*;

    fn pod() -> PodInfo {
        let labels: BTreeMap<String, String> = [
            ("app.kubernetes.io/part-of", "llm-platform"),
            ("workload.k8sllm.io/model", "mistral-7b"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        PodInfo {
            namespace: "llm".into(),
            name: "vllm-0".into(),
            uid: "u1".into(),
            ip: Some("10.0.0.5".into()),
            phase: "Running".into(),
            ready: true,
            labels,
            annotations: BTreeMap::new(),
            container_ports: vec![ContainerPort {
                container: "vllm".into(),
                name: Some("http".into()),
                port: 8080,
            }],
            restart_count: 0,
        }
    }

    fn cfg() -> DiscoveryConfig {
        DiscoveryConfig {
            selector: LabelSelector::parse("app.kubernetes.io/part-of=llm-platform").unwrap(),
            default_port: 8000,
        }
    }

    #[test]
    fn selector_forms() {
        let mut labels = BTreeMap::new();
        labels.insert("a".to_string(), "1".to_string());
        assert!(LabelSelector::parse("a=1").unwrap().matches(&labels));
        assert!(LabelSelector::parse("a==1,!b").unwrap().matches(&labels));
        assert!(!LabelSelector::parse("a!=1").unwrap().matches(&labels));
        assert!(!LabelSelector::parse("b").unwrap().matches(&labels));
        assert!(LabelSelector::parse("").unwrap().matches(&labels));
        assert!(LabelSelector::parse("=x").is_err());
    }

    #[test]
    fn port_and_path_precedence() {
        let policy = WorkloadLabelPolicy::default();
        let t = target_for(&pod(), &cfg(), &policy).unwrap();
        assert_eq!(t.url.as_deref(), Some("http://10.0.0.5:8080/metrics"));
        assert_eq!(t.workload.get("model"), Some("mistral-7b"));

        let mut p = pod();
        p.annotations
            .insert("prometheus.io/port".into(), "9100".into());
        p.annotations
            .insert("prometheus.io/path".into(), "/m".into());
        assert_eq!(
            target_for(&p, &cfg(), &policy).unwrap().url.as_deref(),
            Some("http://10.0.0.5:9100/m")
        );

        let mut p = pod();
        p.container_ports.clear();
        p.labels
            .insert(ENGINE_TYPE_LABEL.into(), "trtllm-serve".into());
        assert_eq!(
            target_for(&p, &cfg(), &policy).unwrap().url.as_deref(),
            Some("http://10.0.0.5:8000/prometheus/metrics")
        );

        let mut p = pod();
        p.labels
            .insert(ENGINE_TYPE_LABEL.into(), "triton-tensorrt-llm".into());
        let t = target_for(&p, &cfg(), &policy).unwrap();
        assert_eq!(t.url.as_deref(), Some("http://10.0.0.5:8002/metrics"));
        assert_eq!(t.runtime_hint, Some(Runtime::TritonTrtllm));

        let mut p = pod();
        p.annotations
            .insert("prometheus.io/scheme".into(), "https".into());
        assert_eq!(target_for(&p, &cfg(), &policy).unwrap().url, None);
    }

    #[test]
    fn only_running_selected_pods_with_ip() {
        let policy = WorkloadLabelPolicy::default();
        let mut p = pod();
        p.phase = "Pending".into();
        assert!(target_for(&p, &cfg(), &policy).is_none());
        let mut p = pod();
        p.ip = None;
        assert!(target_for(&p, &cfg(), &policy).is_none());
        let mut p = pod();
        p.labels.remove("app.kubernetes.io/part-of");
        assert!(target_for(&p, &cfg(), &policy).is_none());
    }
}
