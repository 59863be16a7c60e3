//! Envoy dynamic-module shell around `tokentap-core`
//! (`libtokentap_module.so`): the same filter as the proxy-wasm build, with
//! the same configuration, metric series, spans and filter state, called
//! natively by Envoy instead of through a Wasm VM.
//!
//! Every decision lives in `tokentap-core`; this crate forwards Envoy's
//! hooks to [`Gateway`](tokentap_core::lifecycle::Gateway) with the host
//! seam implemented over the ABI ([`abi`]). How the pieces fit:
//!
//! * one [`Configured`] per filter configuration, made on the main thread
//!   and shared by every worker ([`shared::Shared`]);
//! * one gateway per worker and configuration, in a thread-local
//!   ([`worker::Worker`]): the request path takes no lock;
//! * one [`Filter`] per stream, holding the core's session while the
//!   request is LLM traffic.
//!
//! Failure policy, as in the Wasm build: every hook answers `Continue`
//! (the request body pauses only while the core buffers it for the
//! `include_usage` rewrite), a panic in any hook is caught, counted and
//! skips the request's telemetry, and a configuration that does not
//! validate is refused at load with the field named.

pub mod abi;
mod exports;
mod panics;
mod shared;
mod stats;
mod stream;
mod worker;

use std::rc::Rc;
use std::sync::Arc;

use tokentap_core::lifecycle::{BodyAction, Session};

use crate::abi::{ConfigHandle, FilterHandle, Level, StatsHandle};
use crate::shared::{FilterKind, Shared};
use crate::stream::{Body, HookClock, ModuleStream};
use crate::worker::Worker;

pub use crate::stats::PANICS as PANICS_METRIC;

/// Version reported in logs.
pub const PLUGIN_VERSION: &str = env!("CARGO_PKG_VERSION");

/// One filter configuration (Envoy's `filter_config_module_ptr`).
pub struct Configured {
    shared: Arc<Shared>,
}

impl Configured {
    /// Builds the configuration, or logs why it is refused (`None` makes
    /// Envoy reject the filter).
    fn new(handle: ConfigHandle, name: &[u8], bytes: &[u8]) -> Option<Configured> {
        let Some(kind) = FilterKind::from_name(name) else {
            abi::log(
                Level::Critical,
                &format!(
                    "tokentap: refusing configuration: `filter_name` {:?} is not a filter of this module (use \"tokentap\")",
                    String::from_utf8_lossy(name)
                ),
            );
            return None;
        };
        match Shared::configure(kind, bytes, &handle) {
            Ok(shared) => {
                if kind == FilterKind::Tokentap {
                    let config = shared.config();
                    abi::log(
                        Level::Info,
                        &format!(
                            "tokentap {PLUGIN_VERSION} (dynamic module, ABI {}): configured ({} LLM paths, tenant source {:?})",
                            abi::abi_version(),
                            config.llm_paths.len(),
                            config.tenant_source
                        ),
                    );
                }
                Some(Configured {
                    shared: Arc::new(shared),
                })
            }
            Err(e) => {
                abi::log(
                    Level::Critical,
                    &format!("tokentap: refusing configuration: {e}"),
                );
                None
            }
        }
    }

    /// A main-thread event this configuration scheduled.
    fn scheduled(&self, handle: ConfigHandle, event: u64) {
        if event == exports::EXPORT_EVENT {
            self.shared.exports.send_waiting(&handle);
        }
    }

    fn callout_done(&self, callout: u64, answer: abi::CalloutAnswer) {
        self.shared.exports.done(callout, answer);
    }
}

/// One HTTP stream (Envoy's `filter_module_ptr`).
pub struct Filter {
    /// `None` for a stream this filter does not watch (the empty filter,
    /// or a worker that could not be set up).
    worker: Option<Rc<Worker>>,
    /// The core's session while the request is LLM traffic.
    session: Option<Session>,
    panics: Option<usize>,
    /// Details of a local reply Envoy sent on this stream (connect failure,
    /// timeout, ...), for when the attribute is not available.
    local_reply: Option<String>,
}

impl Filter {
    fn new(config: &Configured, stream: &FilterHandle) -> Filter {
        let shared = &config.shared;
        let worker = match shared.kind {
            FilterKind::Empty => None,
            FilterKind::Tokentap => Worker::of(shared, stream.stats()),
        };
        Filter {
            worker,
            session: None,
            panics: shared.stats().panics,
            local_reply: None,
        }
    }

    /// A filter that only lets the stream pass.
    fn inert() -> Filter {
        Filter {
            worker: None,
            session: None,
            panics: None,
            local_reply: None,
        }
    }

    /// A hook panicked: this stream's telemetry is abandoned (the core's
    /// state for it may be half-updated) and the panic is counted.
    fn panicked(&mut self, stats: StatsHandle) {
        if let (Some(worker), Some(session)) = (self.worker.take(), self.session.take()) {
            worker.finished();
            if let Ok(mut gateway) = worker.gateway.try_borrow_mut() {
                gateway.abandon(session);
            }
        }
        if let Some(id) = self.panics {
            let _ = stats.increment_counter(id, &[], 1);
        }
    }

    fn request_headers(&mut self, stream: &mut FilterHandle, _end_of_stream: bool) -> u32 {
        let Some(worker) = &self.worker else {
            return abi::HOOK_CONTINUE;
        };
        #[cfg(feature = "panic-test")]
        test_panic(stream, "request_headers");
        let clock = HookClock::default();
        let stats = stream.stats();
        let session = {
            let Ok(mut gateway) = worker.gateway.try_borrow_mut() else {
                return abi::HOOK_CONTINUE;
            };
            let mut host = ModuleStream::new(stream, Body::None, None);
            gateway.request_headers(&mut host, &clock)
        };
        if session.is_some() {
            worker.started();
            self.session = session;
            worker.maybe_tick(stats, tokentap_core::host::Clock::now_nanos(&clock));
        } else {
            worker.tick_if_due(stats);
        }
        abi::HOOK_CONTINUE
    }

    fn request_body(&mut self, stream: &mut FilterHandle, end_of_stream: bool) -> u32 {
        let (Some(worker), Some(session)) = (&self.worker, self.session.as_mut()) else {
            return abi::HOOK_CONTINUE;
        };
        #[cfg(feature = "panic-test")]
        test_panic(stream, "request_body");
        let Ok(mut gateway) = worker.gateway.try_borrow_mut() else {
            return abi::HOOK_CONTINUE;
        };
        let mut host = ModuleStream::new(stream, Body::Request, None);
        let size = host.body_size();
        match gateway.request_body(session, &mut host, size, end_of_stream) {
            BodyAction::Continue => abi::HOOK_CONTINUE,
            BodyAction::Pause => abi::BODY_STOP_AND_BUFFER,
        }
    }

    fn response_headers(&mut self, stream: &mut FilterHandle, end_of_stream: bool) -> u32 {
        let (Some(worker), Some(session)) = (&self.worker, self.session.as_mut()) else {
            return abi::HOOK_CONTINUE;
        };
        #[cfg(feature = "panic-test")]
        test_panic(stream, "response_headers");
        let clock = HookClock::default();
        if let Ok(mut gateway) = worker.gateway.try_borrow_mut() {
            let mut host = ModuleStream::new(stream, Body::None, self.local_reply.as_deref());
            gateway.response_headers(session, &mut host, &clock, end_of_stream);
        }
        abi::HOOK_CONTINUE
    }

    fn response_body(&mut self, stream: &mut FilterHandle, end_of_stream: bool) -> u32 {
        let (Some(worker), Some(session)) = (&self.worker, self.session.as_mut()) else {
            return abi::HOOK_CONTINUE;
        };
        #[cfg(feature = "panic-test")]
        test_panic(stream, "response_body");
        let clock = HookClock::default();
        let stats = stream.stats();
        if let Ok(mut gateway) = worker.gateway.try_borrow_mut() {
            let mut host = ModuleStream::new(stream, Body::Response, self.local_reply.as_deref());
            let size = host.body_size();
            gateway.response_body(session, &mut host, size, end_of_stream, &clock);
        }
        // Long streams publish as they go.
        worker.maybe_tick(stats, tokentap_core::host::Clock::now_nanos(&clock));
        abi::HOOK_CONTINUE
    }

    /// The stream is over (before Envoy writes its access log): requests
    /// whose response never ended (aborts, resets) are completed here.
    fn stream_complete(&mut self, stream: &mut FilterHandle) {
        let Some(worker) = self.worker.clone() else {
            return;
        };
        #[cfg(feature = "panic-test")]
        test_panic(stream, "stream_complete");
        let Some(session) = self.session.take() else {
            return;
        };
        let clock = HookClock::default();
        let stats = stream.stats();
        worker.finished();
        if let Ok(mut gateway) = worker.gateway.try_borrow_mut() {
            let mut host = ModuleStream::new(stream, Body::None, self.local_reply.as_deref());
            gateway.finish(session, &mut host, &clock);
        }
        worker.maybe_tick(stats, tokentap_core::host::Clock::now_nanos(&clock));
    }

    fn local_reply(&mut self, _status: u32, details: Option<&[u8]>) {
        if self.session.is_some() {
            let details = details.unwrap_or_default();
            let details = &details[..details.len().min(128)];
            self.local_reply = Some(String::from_utf8_lossy(details).into_owned());
        }
    }
}

/// Test builds only: `x-tokentap-test-panic: <hook>` panics in that hook.
#[cfg(feature = "panic-test")]
#[allow(clippy::panic)]
fn test_panic(stream: &FilterHandle, hook: &str) {
    if stream.header(abi::HeaderKind::Request, "x-tokentap-test-panic") == Some(hook.as_bytes()) {
        panic!("injected by x-tokentap-test-panic in {hook}");
    }
}
