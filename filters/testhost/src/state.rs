//! What the host holds for the module: the clock, streams with their
//! headers, bodies and attributes, shared data, stats, outgoing calls, and
//! the record of every host call.

use std::collections::BTreeMap;

use crate::abi::{LogLevel, Status};
use crate::calls::{HostCall, Recorded};
use crate::headers::Headers;
use crate::metrics::Metrics;

/// One `proxy_log` line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogLine {
    pub level: LogLevel,
    pub message: String,
}

/// An Envoy attribute value, encoded as Envoy hands it to proxy-wasm.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Property {
    /// Strings: their bytes.
    Str(String),
    /// Integers: 8 bytes, little-endian.
    Int(i64),
    /// Unsigned integers (e.g. `response.flags`): 8 bytes, little-endian.
    Uint(u64),
    Bytes(Vec<u8>),
}

impl Property {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Property::Str(s) => s.as_bytes().to_vec(),
            Property::Int(i) => i.to_le_bytes().to_vec(),
            Property::Uint(u) => u.to_le_bytes().to_vec(),
            Property::Bytes(b) => b.clone(),
        }
    }
}

/// Key of a property path: segments joined by NUL, as the ABI sends them.
pub fn property_key(path: &[&str]) -> Vec<u8> {
    path.join("\0").into_bytes()
}

/// A local reply the module asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalResponse {
    pub status: u32,
    pub details: String,
    pub body: Vec<u8>,
    pub headers: Headers,
}

/// One HTTP stream (an HTTP context of the module).
#[derive(Clone, Debug, Default)]
pub struct Stream {
    pub request_headers: Option<Headers>,
    pub request_trailers: Option<Headers>,
    pub response_headers: Option<Headers>,
    pub response_trailers: Option<Headers>,
    /// The request body the current callback sees: the chunk, or everything
    /// buffered since the module last paused. `None` outside body callbacks.
    pub request_body: Option<Vec<u8>>,
    pub response_body: Option<Vec<u8>>,
    /// Bytes passed on upstream / downstream after the module let them go.
    pub forwarded_request_body: Vec<u8>,
    pub forwarded_response_body: Vec<u8>,
    /// Attributes `proxy_get_property` answers (`xds.route_name`, ...).
    pub properties: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Filter state the module wrote, by Envoy's key (`wasm.<path>`).
    pub filter_state: BTreeMap<String, Vec<u8>>,
    pub local_response: Option<LocalResponse>,
}

/// Which half of a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Side {
    Request,
    Response,
}

impl Side {
    pub fn pick<T>(self, request: T, response: T) -> T {
        match self {
            Side::Request => request,
            Side::Response => response,
        }
    }
}

impl Stream {
    pub(crate) fn headers_mut(&mut self, side: Side) -> &mut Option<Headers> {
        match side {
            Side::Request => &mut self.request_headers,
            Side::Response => &mut self.response_headers,
        }
    }

    pub(crate) fn trailers_mut(&mut self, side: Side) -> &mut Option<Headers> {
        match side {
            Side::Request => &mut self.request_trailers,
            Side::Response => &mut self.response_trailers,
        }
    }

    pub(crate) fn body_mut(&mut self, side: Side) -> &mut Option<Vec<u8>> {
        match side {
            Side::Request => &mut self.request_body,
            Side::Response => &mut self.response_body,
        }
    }

    /// Moves a body the module let go of to the forwarded bytes.
    pub(crate) fn release(&mut self, side: Side) {
        let body = self.body_mut(side).take().unwrap_or_default();
        match side {
            Side::Request => self.forwarded_request_body.extend_from_slice(&body),
            Side::Response => self.forwarded_response_body.extend_from_slice(&body),
        }
    }
}

/// An outgoing HTTP call (`proxy_http_call`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpCall {
    pub token: u32,
    /// The context that made it; its response goes back to that context.
    pub context_id: u32,
    pub upstream: String,
    pub headers: Headers,
    pub body: Vec<u8>,
    pub timeout_ms: u32,
    pub answered: bool,
}

/// The response handed to `proxy_on_http_call_response`.
#[derive(Clone, Debug, Default)]
pub struct HttpCallResponse {
    pub headers: Headers,
    pub body: Vec<u8>,
    pub trailers: Headers,
}

/// Everything the host knows; the wasmi store's data.
#[derive(Debug)]
pub struct HostState {
    /// The clock `proxy_get_current_time_nanoseconds` and WASI read.
    pub now_ns: u64,
    pub calls: Vec<Recorded>,
    pub logs: Vec<LogLine>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// Environment the module sees through WASI (`vm_config.environment_variables`).
    pub env: Vec<(String, String)>,
    /// Level `proxy_get_log_level` reports.
    pub log_level: u32,
    pub tick_period_ms: u32,
    pub(crate) next_tick_ns: u64,
    /// Buffers only readable while the matching callback runs.
    pub(crate) vm_configuration: Option<Vec<u8>>,
    pub(crate) plugin_configuration: Option<Vec<u8>>,
    pub(crate) http_call_response: Option<HttpCallResponse>,
    pub root_id: u32,
    /// Context of the callback that runs, and the effective one the module
    /// may switch to (`proxy_set_effective_context`).
    pub(crate) active: u32,
    pub(crate) effective: u32,
    pub streams: BTreeMap<u32, Stream>,
    /// Attributes readable from any context (`xds.node.metadata.NAME`, ...).
    pub properties: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Process-wide shared data: value and CAS.
    pub shared_data: BTreeMap<String, (Vec<u8>, u32)>,
    pub(crate) next_cas: u32,
    /// Shared queues: name and pending items, by queue id (index + 1).
    pub queues: Vec<(String, Vec<Vec<u8>>)>,
    pub metrics: Metrics,
    /// Clusters `proxy_http_call` may target; others are refused.
    pub clusters: Vec<String>,
    pub http_calls: Vec<HttpCall>,
    rng: u64,
}

impl Default for HostState {
    fn default() -> Self {
        HostState {
            // 2024-01-01T00:00:00Z: a realistic wall clock.
            now_ns: 1_704_067_200_000_000_000,
            calls: Vec::new(),
            logs: Vec::new(),
            stdout: Vec::new(),
            stderr: Vec::new(),
            env: Vec::new(),
            log_level: 0,
            tick_period_ms: 0,
            next_tick_ns: 0,
            vm_configuration: None,
            plugin_configuration: None,
            http_call_response: None,
            root_id: 0,
            active: 0,
            effective: 0,
            streams: BTreeMap::new(),
            properties: BTreeMap::new(),
            shared_data: BTreeMap::new(),
            next_cas: 0,
            queues: Vec::new(),
            metrics: Metrics::default(),
            clusters: Vec::new(),
            http_calls: Vec::new(),
            rng: 0x9E37_79B9_7F4A_7C15,
        }
    }
}

impl HostState {
    pub(crate) fn record(&mut self, call: HostCall, status: Status) {
        self.calls.push(Recorded {
            context_id: self.effective,
            call,
            status,
        });
    }

    /// The stream of the effective context, if it is an HTTP context.
    pub(crate) fn stream(&mut self) -> Option<&mut Stream> {
        self.streams.get_mut(&self.effective)
    }

    /// A property visible from the effective context: the stream's
    /// attributes, then its filter state (`wasm.<path>`), then the node's.
    pub(crate) fn property(&self, key: &[u8]) -> Option<Vec<u8>> {
        let stream = self.streams.get(&self.effective);
        if let Some(v) = stream.and_then(|s| s.properties.get(key)) {
            return Some(v.clone());
        }
        let state_key = filter_state_key(key);
        if let Some(v) = stream.and_then(|s| s.filter_state.get(&state_key)) {
            return Some(v.clone());
        }
        self.properties.get(key).cloned()
    }

    /// Next CAS value; never zero (zero means "no check").
    pub(crate) fn bump_cas(&mut self) -> u32 {
        self.next_cas = self.next_cas.wrapping_add(1).max(1);
        self.next_cas
    }

    /// Deterministic bytes for WASI `random_get` (xorshift64).
    pub(crate) fn random_bytes(&mut self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            out.extend_from_slice(&self.rng.to_le_bytes());
        }
        out.truncate(len);
        out
    }

    /// Log lines and WASI output, for failure messages.
    pub fn captured_log(&self) -> String {
        let mut out = String::new();
        for l in &self.logs {
            out.push_str(&format!("[{:?}] {}\n", l.level, l.message));
        }
        for (name, bytes) in [("stdout", &self.stdout), ("stderr", &self.stderr)] {
            if !bytes.is_empty() {
                out.push_str(&format!("[{name}] {}\n", String::from_utf8_lossy(bytes)));
            }
        }
        out
    }
}

/// Envoy's filter-state key for a `proxy_set_property` path: `wasm.` and the
/// path with its segments joined by dots.
pub fn filter_state_key(path: &[u8]) -> String {
    let path = String::from_utf8_lossy(path).replace('\0', ".");
    format!("wasm.{path}")
}
