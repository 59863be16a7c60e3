//! The pods of this node in memory, filled by the watch and read by each
//! collection pass and by the runtime collector's change feed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use tokentap_workload::PodInfo;

use super::{NodePod, WatchEvent};
use crate::health::ErrorKind;

/// Pods of this node, indexed by UID and by (namespace, name). Readers take
/// a cheap `Arc` snapshot; writers change it in place (see [`PodStore`]).
#[derive(Clone, Debug, Default)]
pub struct PodIndex {
    by_uid: HashMap<String, Arc<NodePod>>,
    by_name: HashMap<(String, String), String>,
}

impl PodIndex {
    pub fn from_pods<I: IntoIterator<Item = NodePod>>(pods: I) -> Self {
        let mut index = PodIndex::default();
        for pod in pods {
            index.insert(pod);
        }
        index
    }

    /// Adds or replaces a pod; a pod recreated under the same name drops
    /// its predecessor. Returns what changed.
    fn insert(&mut self, pod: NodePod) -> Vec<PodChange> {
        let mut changes = Vec::with_capacity(2);
        let key = (pod.info.namespace.clone(), pod.info.name.clone());
        if let Some(old_uid) = self.by_name.get(&key) {
            if *old_uid != pod.info.uid {
                if let Some(old) = self.by_uid.remove(old_uid) {
                    changes.push(PodChange::Removed(old));
                }
            }
        }
        let pod = Arc::new(pod);
        self.by_name.insert(key, pod.info.uid.clone());
        self.by_uid.insert(pod.info.uid.clone(), pod.clone());
        changes.push(PodChange::Upserted(pod));
        changes
    }

    fn remove(&mut self, pod: &NodePod) -> Option<PodChange> {
        let removed = self.by_uid.remove(&pod.info.uid);
        let key = (pod.info.namespace.clone(), pod.info.name.clone());
        if self.by_name.get(&key) == Some(&pod.info.uid) {
            self.by_name.remove(&key);
        }
        removed.map(PodChange::Removed)
    }

    pub fn by_uid(&self, uid: &str) -> Option<&NodePod> {
        self.by_uid.get(uid).map(Arc::as_ref)
    }

    pub fn by_name(&self, namespace: &str, name: &str) -> Option<&NodePod> {
        self.by_name
            .get(&(namespace.to_string(), name.to_string()))
            .and_then(|uid| self.by_uid(uid))
    }

    pub fn len(&self) -> usize {
        self.by_uid.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_uid.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &NodePod> {
        self.by_uid.values().map(Arc::as_ref)
    }

    /// Every pod as the runtime collector wants them.
    pub fn pod_infos(&self) -> Vec<PodInfo> {
        let mut pods: Vec<PodInfo> = self.iter().map(|p| p.info.clone()).collect();
        pods.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        pods
    }
}

/// Health of the watch, drained by each collection pass.
#[derive(Debug, Default)]
struct WatchHealth {
    errors: Vec<ErrorKind>,
    healthy: bool,
    synced: bool,
}

/// One pod's change, as the runtime collector consumes it.
#[derive(Clone, Debug, PartialEq)]
pub enum PodChange {
    Upserted(Arc<NodePod>),
    Removed(Arc<NodePod>),
}

/// Changes not yet taken by the consumer of the change feed.
#[derive(Debug, Default, PartialEq)]
pub struct PodChanges {
    /// The whole set was replaced (a re-list), or more changed than the
    /// feed keeps: the consumer re-reads the index.
    pub resync: bool,
    pub changes: Vec<PodChange>,
}

/// Changes kept for the feed before they collapse into one resync.
const MAX_PENDING_CHANGES: usize = 1024;

/// The shared pod cache the watcher fills. An event changes one entry of
/// the index in place (the index is copied only when a collection pass
/// holds a snapshot at that moment), so its cost does not grow with the
/// pods on the node.
#[derive(Debug)]
pub struct PodStore {
    index: RwLock<Arc<PodIndex>>,
    health: Mutex<WatchHealth>,
    changed: tokio::sync::watch::Sender<u64>,
    /// `None` unless built with [`PodStore::with_change_feed`].
    pending: Option<Mutex<PodChanges>>,
}

impl Default for PodStore {
    fn default() -> Self {
        Self {
            index: RwLock::new(Arc::new(PodIndex::default())),
            health: Mutex::new(WatchHealth::default()),
            changed: tokio::sync::watch::channel(0).0,
            pending: None,
        }
    }
}

/// What a collection pass learns about the watch.
#[derive(Debug, Default, PartialEq)]
pub struct WatchReport {
    pub errors: Vec<ErrorKind>,
    pub healthy: bool,
    pub synced: bool,
}

impl WatchReport {
    /// The pods served come from a cache the API has not confirmed since
    /// the watch last failed or fell silent.
    pub fn stale(&self) -> bool {
        self.synced && !self.healthy
    }
}

impl PodStore {
    /// A store that also keeps per-pod changes for [`PodStore::take_changes`].
    pub fn with_change_feed() -> Self {
        Self {
            pending: Some(Mutex::new(PodChanges::default())),
            ..Self::default()
        }
    }

    pub fn snapshot(&self) -> Arc<PodIndex> {
        self.index.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A receiver that sees a new value after every change of the pod set.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Changes since the last call (see [`PodChanges`]).
    pub fn take_changes(&self) -> PodChanges {
        match &self.pending {
            Some(pending) => std::mem::take(&mut *lock(pending)),
            None => PodChanges {
                resync: true,
                changes: Vec::new(),
            },
        }
    }

    fn note(&self, change: Option<PodChange>) {
        let Some(pending) = &self.pending else {
            return;
        };
        let mut pending = lock(pending);
        match change {
            Some(change) if !pending.resync && pending.changes.len() < MAX_PENDING_CHANGES => {
                pending.changes.push(change)
            }
            _ => {
                pending.resync = true;
                pending.changes.clear();
            }
        }
    }

    fn health(&self) -> std::sync::MutexGuard<'_, WatchHealth> {
        lock(&self.health)
    }

    pub fn replace(&self, pods: Vec<NodePod>) {
        *self.index.write().unwrap_or_else(|e| e.into_inner()) =
            Arc::new(PodIndex::from_pods(pods));
        self.note(None);
        self.changed.send_modify(|generation| *generation += 1);
        let mut health = self.health();
        health.synced = true;
        health.healthy = true;
    }

    pub fn apply(&self, event: &WatchEvent) {
        let changes = {
            let mut guard = self.index.write().unwrap_or_else(|e| e.into_inner());
            let index = Arc::make_mut(&mut guard);
            match event {
                WatchEvent::Added(pod, _) | WatchEvent::Modified(pod, _) => {
                    index.insert(pod.clone())
                }
                WatchEvent::Deleted(pod, _) => index.remove(pod).into_iter().collect(),
                WatchEvent::Bookmark(_) | WatchEvent::Error { .. } => return,
            }
        };
        for change in changes {
            self.note(Some(change));
        }
        self.changed.send_modify(|generation| *generation += 1);
    }

    pub fn record_error(&self, kind: ErrorKind) {
        let mut health = self.health();
        health.errors.push(kind);
        // An expired watch is routine; the re-list that follows decides.
        if kind != ErrorKind::Expired {
            health.healthy = false;
        }
    }

    pub fn report(&self) -> WatchReport {
        let mut health = self.health();
        WatchReport {
            errors: std::mem::take(&mut health.errors),
            healthy: health.healthy,
            synced: health.synced,
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::super::decode_pod;
    use super::super::fixtures::pod_json;
    use super::*;

    #[test]
    fn store_applies_events_and_reindexes_by_name() {
        let store = PodStore::default();
        let mut rx = store.subscribe();
        store.replace(vec![decode_pod(pod_json("a", "u-a")).unwrap()]);
        assert!(rx.has_changed().unwrap());
        rx.mark_unchanged();
        let b = decode_pod(pod_json("b", "u-b")).unwrap();
        store.apply(&WatchEvent::Added(b.clone(), "43".into()));
        assert_eq!(store.snapshot().len(), 2);
        // Same name, new UID (pod recreated): the old entry goes.
        let a2 = decode_pod(pod_json("a", "u-a2")).unwrap();
        store.apply(&WatchEvent::Modified(a2, "44".into()));
        let snap = store.snapshot();
        assert_eq!(snap.len(), 2);
        assert_eq!(snap.by_name("llm", "a").unwrap().info.uid, "u-a2");
        assert!(snap.by_uid("u-a").is_none());
        store.apply(&WatchEvent::Deleted(b, "45".into()));
        assert_eq!(store.snapshot().len(), 1);
        assert!(rx.has_changed().unwrap());
        let report = store.report();
        assert!(report.synced && report.healthy);
    }

    #[test]
    fn an_event_changes_the_index_in_place_unless_a_reader_holds_it() {
        let store = PodStore::default();
        store.replace(
            (0..100)
                .map(|i| decode_pod(pod_json(&format!("p{i}"), &format!("u{i}"))).unwrap())
                .collect(),
        );
        let before = Arc::as_ptr(&store.snapshot());
        let added = decode_pod(pod_json("new", "u-new")).unwrap();
        store.apply(&WatchEvent::Added(added, "43".into()));
        assert_eq!(
            Arc::as_ptr(&store.snapshot()),
            before,
            "no copy of 100 pods"
        );
        // A pass holding a snapshot keeps seeing its own version.
        let held = store.snapshot();
        let gone = decode_pod(pod_json("p0", "u0")).unwrap();
        store.apply(&WatchEvent::Deleted(gone, "44".into()));
        assert_eq!(held.len(), 101);
        assert_eq!(store.snapshot().len(), 100);
    }

    #[test]
    fn the_change_feed_names_each_pod_and_collapses_a_relist() {
        let store = PodStore::with_change_feed();
        store.replace(vec![decode_pod(pod_json("a", "u-a")).unwrap()]);
        assert!(store.take_changes().resync);
        let b = decode_pod(pod_json("b", "u-b")).unwrap();
        store.apply(&WatchEvent::Added(b.clone(), "43".into()));
        let a2 = decode_pod(pod_json("a", "u-a2")).unwrap();
        store.apply(&WatchEvent::Modified(a2, "44".into()));
        store.apply(&WatchEvent::Bookmark("45".into()));
        let taken = store.take_changes();
        assert!(!taken.resync);
        let named: Vec<(bool, &str)> = taken
            .changes
            .iter()
            .map(|c| match c {
                PodChange::Upserted(p) => (true, p.info.uid.as_str()),
                PodChange::Removed(p) => (false, p.info.uid.as_str()),
            })
            .collect();
        assert_eq!(named, [(true, "u-b"), (false, "u-a"), (true, "u-a2")]);
        assert_eq!(store.take_changes(), PodChanges::default());
        for i in 0..=MAX_PENDING_CHANGES {
            let pod = decode_pod(pod_json(&format!("x{i}"), &format!("ux{i}"))).unwrap();
            store.apply(&WatchEvent::Added(pod, "46".into()));
        }
        let overflow = store.take_changes();
        assert!(overflow.resync && overflow.changes.is_empty());
        // Without a feed, consumers always re-read the index.
        assert!(PodStore::default().take_changes().resync);
    }

    #[test]
    fn a_failed_watch_marks_the_served_pods_stale_until_a_relist() {
        let store = PodStore::default();
        assert!(!store.report().stale(), "nothing listed yet");
        store.replace(vec![decode_pod(pod_json("a", "u-a")).unwrap()]);
        store.record_error(ErrorKind::Expired);
        assert!(!store.report().stale(), "410 is routine");
        store.record_error(ErrorKind::Timeout);
        let report = store.report();
        assert!(report.stale() && !report.healthy);
        assert_eq!(store.snapshot().len(), 1, "last known pods kept");
        store.replace(vec![]);
        assert!(!store.report().stale());
    }
}
