//! The fake's state: pods, the resourceVersion sequence, the event history
//! watches resume from, injected failures and request counts; and which
//! pods a request selects.

use std::collections::{BTreeMap, VecDeque};

use serde_json::{json, Value};
use tokio::sync::broadcast;

pub(super) fn key_of(pod: &Value) -> (String, String) {
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
pub(super) struct Event {
    pub(super) rv: u64,
    pub(super) kind: &'static str,
    pub(super) object: Value,
}

#[derive(Clone, Debug)]
pub(super) enum Live {
    Event(Event),
    /// History was dropped: every watch ends with 410.
    Expired,
}

#[derive(Default, Debug, Clone, Copy)]
pub(super) struct Stats {
    pub(super) lists: u64,
    pub(super) watches: u64,
    pub(super) unauthorized: u64,
}

pub(super) struct Store {
    pub(super) rv: u64,
    pub(super) pods: BTreeMap<(String, String), Value>,
    pub(super) history: VecDeque<Event>,
    /// Watches from a resourceVersion older than this get 410 Gone.
    pub(super) oldest_rv: u64,
    pub(super) fail_next: u64,
    /// WATCH requests still to answer with HTTP 410.
    pub(super) gone_next: u64,
    pub(super) stats: Stats,
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

    pub(super) fn upsert(&mut self, mut pod: Value, live: &broadcast::Sender<Live>) {
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

    pub(super) fn delete(
        &mut self,
        key: &(String, String),
        live: &broadcast::Sender<Live>,
    ) -> bool {
        let Some(mut pod) = self.pods.remove(key) else {
            return false;
        };
        self.rv += 1;
        set_rv(&mut pod, self.rv);
        self.record("DELETED", pod, live);
        true
    }
}

/// What a LIST or WATCH selects.
#[derive(Debug, Default)]
pub(super) struct Selector {
    pub(super) namespace: Option<String>,
    pub(super) node: Option<String>,
    pub(super) labels: Vec<(String, String)>,
}

impl Selector {
    pub(super) fn parse(
        namespace: Option<String>,
        params: &BTreeMap<String, String>,
    ) -> Result<Self, String> {
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

    pub(super) fn matches(&self, pod: &Value) -> bool {
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

pub(super) fn strip_rv(pod: &Value) -> Value {
    let mut pod = pod.clone();
    if let Some(meta) = pod.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("resourceVersion");
    }
    pod
}
