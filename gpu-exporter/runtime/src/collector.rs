//! Discovery state and the scrape loop: which runtime pods exist, when each
//! is scraped, and what its last scrape gave.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokentap_workload::{PodInfo, WorkloadLabelPolicy};

use crate::discovery::{self, LabelSelector, Target};
use crate::normalize::{normalize_with, Normalized, Runtime};
use crate::parse::{ParseError, ParseLimits};
use crate::{schedule, Accumulator, RuntimeArgs};

/// Why a scrape failed: the `reason` label of `llm_runtime_scrape_errors_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ScrapeError {
    Connect,
    Timeout,
    HttpStatus,
    Read,
    BodyTooLarge,
    TooManySeries,
    UnknownRuntime,
    UnsupportedScheme,
}

impl ScrapeError {
    pub const ALL: [ScrapeError; 8] = [
        Self::Connect,
        Self::Timeout,
        Self::HttpStatus,
        Self::Read,
        Self::BodyTooLarge,
        Self::TooManySeries,
        Self::UnknownRuntime,
        Self::UnsupportedScheme,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Timeout => "timeout",
            Self::HttpStatus => "http_status",
            Self::Read => "read",
            Self::BodyTooLarge => "body_too_large",
            Self::TooManySeries => "too_many_series",
            Self::UnknownRuntime => "unknown_runtime",
            Self::UnsupportedScheme => "unsupported_scheme",
        }
    }
}

impl From<&ParseError> for ScrapeError {
    fn from(e: &ParseError) -> Self {
        match e {
            ParseError::BodyTooLarge { .. } => Self::BodyTooLarge,
            ParseError::TooManySeries { .. } => Self::TooManySeries,
            ParseError::UnknownRuntime => Self::UnknownRuntime,
        }
    }
}

/// What the exporter knows about one runtime pod.
#[derive(Clone, Debug)]
pub(crate) struct PodState {
    pub(crate) target: Target,
    pub(crate) up: bool,
    /// The runtime last seen (or hinted), for the `runtime` label.
    pub(crate) runtime: Option<Runtime>,
    pub(crate) latest: Option<Normalized>,
    pub(crate) accumulator: Accumulator,
    pub(crate) scrape_duration_seconds: f64,
    pub(crate) errors: BTreeMap<ScrapeError, u64>,
    pub(crate) malformed_lines_total: u64,
    /// This target's next scrape slot.
    pub(crate) next_due: Instant,
    /// A scrape has completed: before that the target is counted in
    /// `llm_runtime_targets` but has no series (not known down, just new).
    pub(crate) scraped: bool,
}

impl PodState {
    fn new(target: Target, next_due: Instant) -> Self {
        Self {
            next_due,
            scraped: false,
            runtime: target.runtime_hint,
            target,
            up: false,
            latest: None,
            accumulator: Accumulator::default(),
            scrape_duration_seconds: 0.0,
            errors: BTreeMap::new(),
            malformed_lines_total: 0,
        }
    }

    pub(crate) fn labels(&self) -> Vec<(String, String)> {
        let mut l = vec![
            ("namespace".to_string(), self.target.namespace.clone()),
            ("pod".to_string(), self.target.pod.clone()),
            (
                "runtime".to_string(),
                self.runtime.map_or("unknown", Runtime::as_str).to_string(),
            ),
        ];
        l.extend(
            self.target
                .workload
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        l
    }

    fn record(&mut self, outcome: Result<Normalized, ScrapeError>, took: Duration) {
        self.scraped = true;
        self.scrape_duration_seconds = took.as_secs_f64();
        match outcome {
            Ok(n) => {
                self.up = true;
                self.runtime = Some(n.runtime);
                self.malformed_lines_total += n.malformed_lines;
                self.accumulator.update(&n);
                self.latest = Some(n);
            }
            Err(e) => {
                self.up = false;
                self.latest = None;
                *self.errors.entry(e).or_insert(0) += 1;
            }
        }
    }
}

/// Discovers runtime pods (through [`RuntimeCollector::update_pods`]),
/// scrapes them on its own loop and holds the normalized results for
/// [`RuntimeCollectorHandle`] to encode.
pub struct RuntimeCollector {
    args: RuntimeArgs,
    discovery: discovery::DiscoveryConfig,
    policy: WorkloadLabelPolicy,
    limits: ParseLimits,
    pods: Mutex<BTreeMap<String, PodState>>,
    pods_changed: tokio::sync::Notify,
    client: Client<HttpConnector, Empty<Bytes>>,
}

impl std::fmt::Debug for RuntimeCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeCollector")
            .field("args", &self.args)
            .field("targets", &lock(&self.pods).len())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl RuntimeCollector {
    /// An invalid selector is logged and replaced by "match nothing but the
    /// default", so the exporter keeps running.
    pub fn new(args: &RuntimeArgs, policy: WorkloadLabelPolicy) -> Arc<Self> {
        let selector = LabelSelector::parse(&args.runtime_selector).unwrap_or_else(|e| {
            tracing::error!(error = %e, "bad --runtime-selector; using app.kubernetes.io/part-of=llm-platform");
            LabelSelector::parse("app.kubernetes.io/part-of=llm-platform").unwrap_or_default()
        });
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(args.runtime_scrape_timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(1)
            .pool_idle_timeout(Duration::from_secs(90))
            .build(connector);
        Arc::new(Self {
            discovery: discovery::DiscoveryConfig {
                selector,
                default_port: args.runtime_default_port,
            },
            limits: ParseLimits {
                max_body_bytes: args.runtime_max_body_bytes,
                max_series: args.runtime_max_series,
                ..ParseLimits::default()
            },
            args: args.clone(),
            policy,
            pods: Mutex::new(BTreeMap::new()),
            pods_changed: tokio::sync::Notify::new(),
            client,
        })
    }

    /// Replaces the whole target set from every pod on the node (after a
    /// re-list). Targets that stay keep their state and scrape slot.
    pub fn update_pods(&self, pods: &[PodInfo]) {
        if self.args.runtime_disable {
            return;
        }
        let targets: BTreeMap<String, Target> = pods
            .iter()
            .filter_map(|p| discovery::target_for(p, &self.discovery, &self.policy))
            .map(|t| (t.key.clone(), t))
            .collect();
        let now = Instant::now();
        let mut changed = false;
        {
            let mut state = lock(&self.pods);
            let before = state.len();
            state.retain(|k, _| targets.contains_key(k));
            changed |= state.len() != before;
            for target in targets.into_values() {
                changed |= self.upsert_target(&mut state, target, now);
            }
        }
        if changed {
            self.pods_changed.notify_one();
        }
    }

    /// Applies one pod's change: its target is added, updated, or dropped
    /// when the pod no longer qualifies. Costs the same whatever the number
    /// of pods on the node.
    pub fn update_pod(&self, pod: &PodInfo) {
        if self.args.runtime_disable {
            return;
        }
        let changed = {
            let mut state = lock(&self.pods);
            match discovery::target_for(pod, &self.discovery, &self.policy) {
                Some(target) => self.upsert_target(&mut state, target, Instant::now()),
                None => state.remove(&discovery::target_key(pod)).is_some(),
            }
        };
        if changed {
            self.pods_changed.notify_one();
        }
    }

    /// Forgets the target of a pod that left the node.
    pub fn remove_pod(&self, pod: &PodInfo) {
        lock(&self.pods).remove(&discovery::target_key(pod));
    }

    /// Inserts or updates one target; true when anything changed. A new
    /// target gets its own slot in the interval, so it does not pull the
    /// others' scrapes forward.
    fn upsert_target(
        &self,
        state: &mut BTreeMap<String, PodState>,
        target: Target,
        now: Instant,
    ) -> bool {
        match state.get_mut(&target.key) {
            Some(s) if s.target == target => false,
            Some(s) => {
                if s.runtime.is_none() {
                    s.runtime = target.runtime_hint;
                }
                s.target = target;
                true
            }
            None => {
                let due = schedule::first_slot(&target.key, now, self.args.runtime_scrape_interval);
                state.insert(target.key.clone(), PodState::new(target, due));
                true
            }
        }
    }

    /// Scrape loop; returns when `shutdown` resolves. Each target is scraped
    /// once per `--runtime-scrape-interval` at its own slot, whatever the
    /// churn of pods around it.
    pub async fn run(self: Arc<Self>, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        if self.args.runtime_disable {
            tracing::info!("runtime metrics disabled");
            shutdown.await;
            return;
        }
        loop {
            let wake = self.next_wake(Instant::now());
            tokio::select! {
                _ = tokio::time::sleep_until(wake.into()) => {}
                // A new target may have a slot before `wake`.
                _ = self.pods_changed.notified() => continue,
                _ = &mut shutdown => return,
            }
            tokio::select! {
                _ = self.scrape_due(Instant::now()) => {}
                _ = &mut shutdown => return,
            }
        }
    }

    /// The earliest slot of any target, or one interval from `now` when
    /// there are none.
    fn next_wake(&self, now: Instant) -> Instant {
        lock(&self.pods)
            .values()
            .map(|s| s.next_due)
            .min()
            .unwrap_or(now + self.args.runtime_scrape_interval)
    }

    /// Scrapes the targets whose slot has come and moves each to its next
    /// slot; returns how many were scraped.
    pub async fn scrape_due(&self, now: Instant) -> usize {
        let interval = self.args.runtime_scrape_interval;
        let due: Vec<Target> = lock(&self.pods)
            .values_mut()
            .filter(|s| s.next_due <= now)
            .map(|s| {
                s.next_due = schedule::next_slot(s.next_due, now, interval);
                s.target.clone()
            })
            .collect();
        let count = due.len();
        self.scrape_targets(due).await;
        count
    }

    /// Scrapes every target now, whatever its slot.
    pub async fn scrape_all(&self) {
        let targets: Vec<Target> = lock(&self.pods)
            .values()
            .map(|s| s.target.clone())
            .collect();
        self.scrape_targets(targets).await;
    }

    /// Scrapes `targets` concurrently; each scrape has its own deadline, so
    /// a slow runtime delays nobody else.
    async fn scrape_targets(&self, targets: Vec<Target>) {
        if targets.is_empty() {
            return;
        }
        let results = futures_util::future::join_all(targets.into_iter().map(|t| async move {
            let started = Instant::now();
            let hint = t.runtime_hint;
            let outcome = match &t.url {
                Some(url) => self.scrape_one(url, hint).await,
                None => Err(ScrapeError::UnsupportedScheme),
            };
            (t, outcome, started.elapsed())
        }))
        .await;
        let mut state = lock(&self.pods);
        for (target, outcome, took) in results {
            if let Err(e) = &outcome {
                tracing::debug!(pod = %target.pod, namespace = %target.namespace, reason = e.as_str(), "runtime scrape failed");
            }
            // The pod may have gone (or changed) while we scraped.
            if let Some(s) = state.get_mut(&target.key) {
                if s.target.url == target.url {
                    s.record(outcome, took);
                }
            }
        }
    }

    async fn scrape_one(
        &self,
        url: &str,
        hint: Option<Runtime>,
    ) -> Result<Normalized, ScrapeError> {
        let deadline = self.args.runtime_scrape_timeout;
        let body = tokio::time::timeout(deadline, self.fetch(url))
            .await
            .map_err(|_| ScrapeError::Timeout)??;
        let text = String::from_utf8_lossy(&body);
        normalize_with(&text, hint, &self.limits).map_err(|e| ScrapeError::from(&e))
    }

    async fn fetch(&self, url: &str) -> Result<Bytes, ScrapeError> {
        let req = http::Request::get(url)
            .header(
                http::header::ACCEPT,
                "text/plain;version=0.0.4;q=0.9,application/openmetrics-text;version=1.0.0;q=0.5,*/*;q=0.1",
            )
            .header(http::header::USER_AGENT, "tokentap-gpu-exporter")
            .body(Empty::<Bytes>::new())
            .map_err(|_| ScrapeError::Connect)?;
        let resp = self.client.request(req).await.map_err(|e| {
            if e.is_connect() {
                ScrapeError::Connect
            } else {
                ScrapeError::Read
            }
        })?;
        if !resp.status().is_success() {
            return Err(ScrapeError::HttpStatus);
        }
        match Limited::new(resp.into_body(), self.limits.max_body_bytes)
            .collect()
            .await
        {
            Ok(c) => Ok(c.to_bytes()),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ScrapeError::BodyTooLarge),
            Err(_) => Err(ScrapeError::Read),
        }
    }

    /// Records a metrics body fetched by other means for the target `key`
    /// (a pod UID), exactly as a scrape would; unknown keys are ignored.
    pub fn ingest(&self, key: &str, body: &str) {
        let hint = lock(&self.pods)
            .get(key)
            .and_then(|s| s.target.runtime_hint);
        let outcome = if body.len() > self.limits.max_body_bytes {
            Err(ScrapeError::BodyTooLarge)
        } else {
            normalize_with(body, hint, &self.limits).map_err(|e| ScrapeError::from(&e))
        };
        if let Some(s) = lock(&self.pods).get_mut(key) {
            s.record(outcome, Duration::ZERO);
        }
    }

    /// Records a failed scrape of the target `key`.
    pub fn ingest_failure(&self, key: &str, reason: ScrapeError) {
        if let Some(s) = lock(&self.pods).get_mut(key) {
            s.record(Err(reason), Duration::ZERO);
        }
    }

    /// `--runtime-disable`: nothing is scraped or published.
    pub(crate) fn disabled(&self) -> bool {
        self.args.runtime_disable
    }

    /// Number of discovered runtime pods.
    pub fn target_count(&self) -> usize {
        lock(&self.pods).len()
    }

    pub(crate) fn snapshot(&self) -> Vec<PodState> {
        lock(&self.pods).values().cloned().collect()
    }
}
