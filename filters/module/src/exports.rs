//! Span export from worker threads through the main thread.
//!
//! Each worker's tracer batches its spans as the Wasm build's does; a due
//! batch is handed to the main thread, which sends it with a configuration
//! level HTTP callout (a callout started from a stream would be cancelled
//! when that stream ends). The answer goes back to the worker that sent the
//! batch and reaches its tracer at its next tick, so batching, back-pressure
//! and drop accounting are the core's, unchanged.
//!
//! The queues are bounded by the tracer: a worker hands over at most its
//! configured number of batches in flight.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use tokentap_core::lifecycle::ExportSender;
use tokentap_core::tracer::ExportTarget;

use crate::abi::{CalloutAnswer, ConfigHandle, ConfigScheduler};

/// The scheduler event that means "batches are waiting".
pub const EXPORT_EVENT: u64 = 1;

/// A batch on its way to the main thread.
struct Outgoing {
    worker: u32,
    token: u32,
    target: ExportTarget,
    body: Vec<u8>,
}

/// The collector's answer to one batch, for the worker that sent it.
#[derive(Debug)]
pub struct ExportAnswer {
    pub token: u32,
    /// `None`: no answer (reset, timeout, could not be sent).
    pub status: Option<u16>,
    /// The body, read only for a 2xx (partial success).
    pub body: Option<Vec<u8>>,
}

/// The hand-off between workers and the main thread, per configuration.
pub struct Exports {
    scheduler: Option<ConfigScheduler>,
    outgoing: Mutex<Vec<Outgoing>>,
    /// Callout id -> (worker, token), main thread only (behind a lock all
    /// the same: the hooks run on the main thread but the type must be Sync).
    in_flight: Mutex<HashMap<u64, (u32, u32)>>,
    answers: Mutex<HashMap<u32, Vec<ExportAnswer>>>,
    /// Answers queued for any worker: lets a worker skip the lock when none
    /// wait. Shared with the workers, which check it on their hot path.
    waiting: Arc<AtomicU32>,
    next_token: AtomicU32,
}

impl Exports {
    pub fn new(handle: &ConfigHandle, tracing: bool) -> Exports {
        Exports {
            scheduler: if tracing { handle.scheduler() } else { None },
            outgoing: Mutex::new(Vec::new()),
            in_flight: Mutex::new(HashMap::new()),
            answers: Mutex::new(HashMap::new()),
            waiting: Arc::new(AtomicU32::new(0)),
            next_token: AtomicU32::new(1),
        }
    }

    /// Whether answers wait for some worker (a relaxed load, no lock).
    pub fn answers_waiting(&self) -> bool {
        self.waiting.load(Ordering::Relaxed) > 0
    }

    /// The counter behind [`Exports::answers_waiting`], for a worker to
    /// keep (it holds the configuration only weakly).
    pub fn waiting_counter(&self) -> Arc<AtomicU32> {
        Arc::clone(&self.waiting)
    }

    /// Answers that arrived for `worker` since it last asked.
    pub fn answers_for(&self, worker: u32) -> Vec<ExportAnswer> {
        if !self.answers_waiting() {
            return Vec::new();
        }
        let Ok(mut answers) = self.answers.lock() else {
            return Vec::new();
        };
        let taken = answers.remove(&worker).unwrap_or_default();
        // Counted under the same lock as `answer` adds, so it stays exact.
        let n = u32::try_from(taken.len()).unwrap_or(u32::MAX);
        self.waiting.fetch_sub(n, Ordering::Relaxed);
        taken
    }

    fn answer(&self, worker: u32, answer: ExportAnswer) {
        if let Ok(mut a) = self.answers.lock() {
            a.entry(worker).or_default().push(answer);
            self.waiting.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Main thread: sends every waiting batch.
    pub fn send_waiting(&self, handle: &ConfigHandle) {
        let waiting = match self.outgoing.lock() {
            Ok(mut o) => std::mem::take(&mut *o),
            Err(_) => return,
        };
        for batch in waiting {
            let headers = [
                (":method", "POST"),
                (":path", batch.target.path.as_str()),
                (":authority", batch.target.authority.as_str()),
                ("host", batch.target.authority.as_str()),
                ("content-type", "application/x-protobuf"),
            ];
            let sent = handle.http_callout(
                &batch.target.cluster,
                &headers,
                &batch.body,
                u64::from(batch.target.timeout_ms),
            );
            match sent {
                Some(id) => {
                    if let Ok(mut f) = self.in_flight.lock() {
                        f.insert(id, (batch.worker, batch.token));
                    }
                }
                None => self.answer(
                    batch.worker,
                    ExportAnswer {
                        token: batch.token,
                        status: None,
                        body: None,
                    },
                ),
            }
        }
    }

    /// Main thread: a callout finished.
    pub fn done(&self, callout: u64, answer: CalloutAnswer) {
        let Some((worker, token)) = self
            .in_flight
            .lock()
            .ok()
            .and_then(|mut f| f.remove(&callout))
        else {
            return;
        };
        let ok = answer.status.is_some_and(|s| (200..300).contains(&s));
        self.answer(
            worker,
            ExportAnswer {
                token,
                status: answer.status,
                body: ok.then_some(answer.body),
            },
        );
    }
}

/// [`ExportSender`] for one worker.
pub struct WorkerExports<'a> {
    exports: &'a Exports,
    worker: u32,
}

impl<'a> WorkerExports<'a> {
    pub fn new(exports: &'a Exports, worker: u32) -> Self {
        Self { exports, worker }
    }
}

impl ExportSender for WorkerExports<'_> {
    fn send(&mut self, target: &ExportTarget, body: &[u8]) -> Option<u32> {
        let scheduler = self.exports.scheduler.as_ref()?;
        let token = self.exports.next_token.fetch_add(1, Ordering::Relaxed);
        self.exports.outgoing.lock().ok()?.push(Outgoing {
            worker: self.worker,
            token,
            target: target.clone(),
            body: body.to_vec(),
        });
        scheduler.commit(EXPORT_EVENT);
        Some(token)
    }
}
