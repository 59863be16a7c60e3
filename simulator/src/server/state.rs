//! What every handler shares: the engine behind a mutex, the runtime
//! config the admin API changes, and the per-request subscriptions the
//! engine driver delivers tokens to.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use crate::config::{Args, RuntimeConfig};
use crate::engine::{Engine, EngineEvent, Micros, SeqId};
use crate::tokens::{fnv1a, SplitMix64};

/// Locks a mutex, carrying on with the data of a poisoned one (a panicked
/// handler must not take the whole simulator down).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Everything the handlers share.
pub struct AppState {
    pub(crate) args: Args,
    pub(crate) models: Vec<String>,
    pub(crate) runtime: RwLock<RuntimeConfig>,
    pub(crate) engine: Mutex<Engine>,
    pub(crate) epoch: Instant,
    pub(crate) start_unix: f64,
    /// Wakes the engine driver when work arrives or the config changes.
    pub(crate) wake: Notify,
    pub(crate) subscribers: Mutex<HashMap<SeqId, mpsc::UnboundedSender<EngineEvent>>>,
    pub(crate) rng: Mutex<SplitMix64>,
    pub(crate) draining: AtomicBool,
    pub(crate) in_flight: AtomicUsize,
    request_counter: AtomicU64,
    pub(crate) pod_name: Option<String>,
}

impl AppState {
    pub fn new(args: Args) -> Arc<Self> {
        let runtime = args.runtime_config();
        let engine = Engine::new(args.engine_config(), runtime.latency());
        let start_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        Arc::new(Self {
            models: args.served_models(),
            rng: Mutex::new(SplitMix64::new(args.seed)),
            args,
            runtime: RwLock::new(runtime),
            engine: Mutex::new(engine),
            epoch: Instant::now(),
            start_unix,
            wake: Notify::new(),
            subscribers: Mutex::new(HashMap::new()),
            draining: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            request_counter: AtomicU64::new(0),
            pod_name: std::env::var("POD_NAME").ok().filter(|p| !p.is_empty()),
        })
    }

    /// Engine time: microseconds since this state was made.
    pub(crate) fn now_us(&self) -> Micros {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    pub(crate) fn runtime(&self) -> RuntimeConfig {
        self.runtime
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces the runtime config and the engine's latency model with it.
    pub(crate) fn set_runtime(&self, next: RuntimeConfig) {
        lock(&self.engine).set_latency(next.latency());
        *self.runtime.write().unwrap_or_else(|p| p.into_inner()) = next;
        self.wake.notify_one();
    }

    /// Past the startup delay and not draining.
    pub(crate) fn ready(&self) -> bool {
        !self.draining.load(Ordering::SeqCst)
            && self.epoch.elapsed() >= Duration::from_millis(self.args.startup_delay_ms)
    }

    /// Hands engine events to their requests; aborts sequences whose
    /// request has gone away.
    pub(crate) fn dispatch(&self, events: Vec<EngineEvent>) {
        let gone = self.deliver(events);
        if !gone.is_empty() {
            let now = self.now_us();
            let mut engine = lock(&self.engine);
            for seq in gone {
                engine.abort(seq, now);
            }
            drop(engine.drain_events());
        }
    }

    /// Sends each event to its subscriber; returns the sequences whose
    /// subscriber hung up before the end.
    fn deliver(&self, events: Vec<EngineEvent>) -> Vec<SeqId> {
        let mut gone = Vec::new();
        let mut subs = lock(&self.subscribers);
        for ev in events {
            let (seq, last) = match &ev {
                EngineEvent::Token { seq, .. } => (*seq, false),
                EngineEvent::Finished { seq, .. } => (*seq, true),
            };
            if let Some(tx) = subs.get(&seq) {
                if tx.send(ev).is_err() && !last {
                    gone.push(seq);
                }
            }
            if last {
                subs.remove(&seq);
            }
        }
        for seq in &gone {
            subs.remove(seq);
        }
        gone
    }

    /// A response id unique to this process: `{prefix}-{32 hex digits}`.
    pub(crate) fn next_id(&self, prefix: &str) -> String {
        let n = self.request_counter.fetch_add(1, Ordering::SeqCst);
        let high = fnv1a(&n.to_le_bytes()) ^ self.args.seed.rotate_left(7);
        let low = fnv1a(&high.to_le_bytes()) ^ (self.start_unix.to_bits());
        format!("{prefix}-{high:016x}{low:016x}")
    }
}

/// In-flight accounting that survives early returns.
pub(crate) struct InFlight(Arc<AppState>);

impl InFlight {
    pub(crate) fn new(state: &Arc<AppState>) -> Self {
        state.in_flight.fetch_add(1, Ordering::SeqCst);
        Self(state.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Aborts the engine sequence when its request ends before it finished.
pub(crate) struct SeqGuard {
    pub(crate) state: Arc<AppState>,
    pub(crate) id: SeqId,
    pub(crate) finished: bool,
}

impl Drop for SeqGuard {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        lock(&self.state.subscribers).remove(&self.id);
        let now = self.state.now_us();
        let mut engine = lock(&self.state.engine);
        engine.abort(self.id, now);
        drop(engine.drain_events());
        drop(engine);
        self.state.wake.notify_one();
    }
}
