//! The pod model and the workload-label policy shared by every gpu-exporter
//! collector, so that GPU series and runtime series carry exactly the same
//! `model`, `route_class` and `team` values as the gateway's metrics.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Pod label that names the model a workload serves.
pub const MODEL_LABEL_KEY: &str = "workload.k8sllm.io/model";
/// Pod label that names the route class (interactive, batch, ...).
pub const ROUTE_CLASS_LABEL_KEY: &str = "workload.k8sllm.io/route-class";
/// Pod label that names the owning team.
pub const TEAM_LABEL_KEY: &str = "workload.k8sllm.io/team";

/// Value used when a pod lacks one of the workload labels. The gateway uses
/// the same value, so joins on `model`/`route_class`/`team` stay consistent.
pub const UNKNOWN: &str = "unknown";

/// Longest label value kept; longer values are cut (Kubernetes allows 63).
pub const MAX_VALUE_LEN: usize = 63;

/// The subset of a Kubernetes pod that the exporter needs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// Pod IP, once the pod has one.
    pub ip: Option<String>,
    /// `status.phase` (Pending, Running, Succeeded, Failed, Unknown).
    pub phase: String,
    /// Whether every container reports ready.
    pub ready: bool,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// Declared container ports: (container name, port name, port number).
    pub container_ports: Vec<ContainerPort>,
    /// Sum of container restart counts, from `status.containerStatuses`.
    pub restart_count: u32,
}

/// One declared port of one container.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerPort {
    pub container: String,
    pub name: Option<String>,
    pub port: u16,
}

/// Maps a pod label key to the Prometheus label name it becomes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabelMapping {
    pub pod_label_key: String,
    pub label_name: String,
}

/// Which pod labels become series labels. The three workload keys are always
/// present, in this order, so every series has `model`, `route_class`, `team`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadLabelPolicy {
    mappings: Vec<LabelMapping>,
}

impl Default for WorkloadLabelPolicy {
    fn default() -> Self {
        Self {
            mappings: vec![
                LabelMapping {
                    pod_label_key: MODEL_LABEL_KEY.into(),
                    label_name: "model".into(),
                },
                LabelMapping {
                    pod_label_key: ROUTE_CLASS_LABEL_KEY.into(),
                    label_name: "route_class".into(),
                },
                LabelMapping {
                    pod_label_key: TEAM_LABEL_KEY.into(),
                    label_name: "team".into(),
                },
            ],
        }
    }
}

impl WorkloadLabelPolicy {
    /// The default policy plus extra allowlisted pod label keys; each extra key
    /// becomes a label named after the key, sanitised (`app.kubernetes.io/name`
    /// becomes `app_kubernetes_io_name`). Keys already mapped, and keys whose
    /// label name would collide with an existing one, are ignored.
    pub fn with_extra_keys<I, S>(keys: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut policy = Self::default();
        for key in keys {
            let key = key.as_ref().trim();
            let label_name = sanitize_label_name(key);
            let taken = policy
                .mappings
                .iter()
                .any(|m| m.pod_label_key == key || m.label_name == label_name);
            if key.is_empty() || taken {
                continue;
            }
            policy.mappings.push(LabelMapping {
                pod_label_key: key.to_string(),
                label_name,
            });
        }
        policy
    }

    /// Label names in output order.
    pub fn label_names(&self) -> impl Iterator<Item = &str> {
        self.mappings.iter().map(|m| m.label_name.as_str())
    }

    /// The workload labels of a pod, in the policy's order; absent keys map to
    /// [`UNKNOWN`].
    pub fn labels_for(&self, pod_labels: &BTreeMap<String, String>) -> WorkloadLabels {
        WorkloadLabels(
            self.mappings
                .iter()
                .map(|m| {
                    let value = pod_labels
                        .get(&m.pod_label_key)
                        .map(|v| sanitize_label_value(v))
                        .filter(|v| !v.is_empty())
                        .unwrap_or_else(|| UNKNOWN.to_string());
                    (m.label_name.clone(), value)
                })
                .collect(),
        )
    }

    /// Labels used for a device or series that no pod claims.
    pub fn unattributed(&self) -> WorkloadLabels {
        self.labels_for(&BTreeMap::new())
    }
}

/// Ordered (label name, value) pairs for one workload.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkloadLabels(pub Vec<(String, String)>);

impl WorkloadLabels {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

/// Turns a pod label key into a valid Prometheus label name.
pub fn sanitize_label_name(key: &str) -> String {
    let mut out: String = key
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    if out.starts_with(|c: char| c.is_ascii_digit()) || out.is_empty() {
        out.insert(0, '_');
    }
    out
}

/// Keeps label values printable and bounded; Kubernetes label values are
/// already restricted, this guards against annotations and odd inputs.
pub fn sanitize_label_value(value: &str) -> String {
    value
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_VALUE_LEN)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn platform_labels_map_to_gateway_label_names() {
        let policy = WorkloadLabelPolicy::default();
        let got = policy.labels_for(&labels(&[
            ("app.kubernetes.io/name", "vllm-openai"),
            (MODEL_LABEL_KEY, "mistral-7b"),
            (ROUTE_CLASS_LABEL_KEY, "interactive"),
            (TEAM_LABEL_KEY, "platform-ai"),
        ]));
        assert_eq!(
            got.0,
            vec![
                ("model".to_string(), "mistral-7b".to_string()),
                ("route_class".to_string(), "interactive".to_string()),
                ("team".to_string(), "platform-ai".to_string()),
            ]
        );
    }

    #[test]
    fn missing_labels_become_unknown_and_extra_keys_are_sanitised() {
        let policy = WorkloadLabelPolicy::with_extra_keys(["app.kubernetes.io/name", "team"]);
        let names: Vec<_> = policy.label_names().collect();
        assert_eq!(
            names,
            ["model", "route_class", "team", "app_kubernetes_io_name"]
        );
        let got = policy.labels_for(&labels(&[("app.kubernetes.io/name", "vllm-openai")]));
        assert_eq!(got.get("model"), Some(UNKNOWN));
        assert_eq!(got.get("app_kubernetes_io_name"), Some("vllm-openai"));
    }

    #[test]
    fn values_are_bounded() {
        let long = "x".repeat(500);
        assert_eq!(sanitize_label_value(&long).len(), MAX_VALUE_LEN);
        assert_eq!(sanitize_label_value("a\u{7}b"), "ab");
    }
}
