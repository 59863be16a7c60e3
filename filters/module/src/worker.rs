//! Per-worker state. Envoy shares one filter configuration among all its
//! workers and runs each stream on one worker, so each worker gets its own
//! [`Gateway`] for each configuration, found through a thread-local: the
//! request path takes no lock and shares no cache line with other workers.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Weak};

use tokentap_core::lifecycle::Gateway;

use crate::abi::{self, StatsHandle};
use crate::exports::{ExportAnswer, WorkerExports};
use crate::shared::Shared;
use crate::stats::ModuleStats;

/// One worker's share of a filter configuration.
pub struct Worker {
    pub gateway: RefCell<Gateway<ModuleStats>>,
    shared: Weak<Shared>,
    index: u32,
    /// LLM requests in flight on this worker.
    live: Cell<u32>,
    last_tick_ns: Cell<u64>,
    tick_ns: u64,
    /// Export answers waiting for any worker (the configuration's counter).
    answers: Arc<AtomicU32>,
}

thread_local! {
    /// This thread's workers, one per live configuration (usually one).
    static WORKERS: RefCell<Vec<Rc<Worker>>> = const { RefCell::new(Vec::new()) };
}

impl Worker {
    /// This thread's worker for `shared`, made on first use; workers of
    /// configurations Envoy has since destroyed are dropped here.
    pub fn of(shared: &Arc<Shared>, stream: StatsHandle) -> Option<Rc<Worker>> {
        WORKERS
            .try_with(|workers| {
                let mut workers = workers.try_borrow_mut().ok()?;
                if let Some(w) = workers
                    .iter()
                    .find(|w| std::ptr::eq(w.shared.as_ptr(), Arc::as_ptr(shared)))
                {
                    return Some(Rc::clone(w));
                }
                workers.retain(|w| w.shared.strong_count() > 0);
                let gateway = shared.gateway()?;
                let tick_ns = u64::from(gateway.tick_period_ms()) * 1_000_000;
                let worker = Rc::new(Worker {
                    gateway: RefCell::new(gateway),
                    shared: Arc::downgrade(shared),
                    index: stream.worker_index(),
                    live: Cell::new(0),
                    last_tick_ns: Cell::new(0),
                    tick_ns,
                    answers: shared.exports.waiting_counter(),
                });
                workers.push(Rc::clone(&worker));
                Some(worker)
            })
            .ok()
            .flatten()
    }

    pub fn started(&self) {
        self.live.set(self.live.get().saturating_add(1));
    }

    pub fn finished(&self) {
        self.live.set(self.live.get().saturating_sub(1));
    }

    /// After an LLM request's hook: publishes metrics and sends span
    /// batches when a tick is due, when export answers wait, or when the
    /// worker has gone idle (nothing may call it again for a while, so it
    /// also sends every queued span). Envoy takes stat updates only through
    /// a live stream, and offers modules no worker timer, so this runs from
    /// a stream's hook, with that stream.
    pub fn maybe_tick(&self, stream: StatsHandle, now_ns: u64) {
        let idle = self.live.get() == 0;
        if idle || self.due(now_ns) {
            self.tick(stream, now_ns, idle);
        }
    }

    /// On any other request the filter sees: a tick only when one is due
    /// (export answers also arrive this way when LLM traffic has stopped).
    pub fn tick_if_due(&self, stream: StatsHandle) {
        if self.last_tick_ns.get() == 0 && !self.answers_waiting() {
            return;
        }
        let now_ns = abi::now_nanos();
        if self.due(now_ns) {
            self.tick(stream, now_ns, false);
        }
    }

    fn answers_waiting(&self) -> bool {
        self.answers.load(Ordering::Relaxed) > 0
    }

    fn due(&self, now_ns: u64) -> bool {
        now_ns.saturating_sub(self.last_tick_ns.get()) >= self.tick_ns || self.answers_waiting()
    }

    fn tick(&self, stream: StatsHandle, now_ns: u64, drain: bool) {
        self.last_tick_ns.set(now_ns);
        let Ok(mut gateway) = self.gateway.try_borrow_mut() else {
            return;
        };
        let shared = self.shared.upgrade();
        let exports = shared.as_deref().map(|s| &s.exports);
        if let Some(exports) = exports {
            for ExportAnswer {
                token,
                status,
                body,
            } in exports.answers_for(self.index)
            {
                gateway.export_response(token, status, || body);
            }
        }
        let lent = Lent::new(&mut gateway, stream);
        let mut none = tokentap_core::lifecycle::NoExports;
        let mut to_main;
        let sender: &mut dyn tokentap_core::lifecycle::ExportSender = match exports {
            Some(exports) => {
                to_main = WorkerExports::new(exports, self.index);
                &mut to_main
            }
            None => &mut none,
        };
        if drain {
            lent.0.tick_and_drain(now_ns, sender);
        } else {
            lent.0.tick(now_ns, sender);
        }
    }
}

/// The gateway with a stream lent to its metrics host; the stream is taken
/// back when this goes out of scope, even by a panic's unwinding.
struct Lent<'a>(&'a mut Gateway<ModuleStats>);

impl<'a> Lent<'a> {
    fn new(gateway: &'a mut Gateway<ModuleStats>, stream: StatsHandle) -> Self {
        gateway.metrics_host_mut().set_stream(Some(stream));
        Lent(gateway)
    }
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        self.0.metrics_host_mut().set_stream(None);
    }
}
