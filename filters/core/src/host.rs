//! The host seam: everything the filter needs from Envoy, as small traits.
//!
//! The proxy-wasm shell implements these with raw host calls; tests implement
//! them with plain structs, so the request lifecycle and the metric encoding
//! run under `cargo test` exactly as they run inside Envoy.

/// Read access to the current HTTP stream.
pub trait HttpView {
    /// A request header (lower-case name), as raw bytes.
    fn request_header(&self, name: &str) -> Option<Vec<u8>>;
    /// A response header (lower-case name), as raw bytes.
    fn response_header(&self, name: &str) -> Option<Vec<u8>>;
    /// An Envoy attribute, e.g. `["xds", "route_name"]`.
    fn property(&self, path: &[&str]) -> Option<Vec<u8>>;
    /// Whether any response header starts with `prefix` (a host that can
    /// list headers saves the lookups of a contract that is absent).
    fn has_response_header_prefix(&self, _prefix: &str) -> bool {
        true
    }
}

/// What the request lifecycle asks of the host for one HTTP stream, beyond
/// reading it: bodies, header and body rewrites, filter state, logs.
pub trait StreamHost: HttpView {
    /// Bytes `[start, start + len)` of the buffered request body.
    fn request_body(&self, start: usize, len: usize) -> Option<Vec<u8>>;
    /// Bytes `[start, start + len)` of the current response body chunk.
    fn response_body(&self, start: usize, len: usize) -> Option<Vec<u8>>;
    /// Hands the first `len` bytes of the request body to `visit`, in as
    /// many slices as the host holds them. Hosts that can lend their
    /// buffers (Envoy dynamic modules) override it to avoid the copy.
    fn visit_request_body(&self, len: usize, visit: &mut dyn FnMut(&[u8])) {
        if let Some(body) = self.request_body(0, len) {
            visit(&body);
        }
    }
    /// [`StreamHost::visit_request_body`] for the current response chunk.
    fn visit_response_body(&self, len: usize, visit: &mut dyn FnMut(&[u8])) {
        if let Some(body) = self.response_body(0, len) {
            visit(&body);
        }
    }
    /// Replaces the first `len` bytes of the request body.
    fn replace_request_body(&mut self, len: usize, body: &[u8]);
    fn set_request_header(&mut self, name: &str, value: &str);
    fn remove_request_header(&mut self, name: &str);
    /// Writes filter state (Envoy stores it as `wasm.<key>`).
    fn set_filter_state(&mut self, key: &str, value: &[u8]);
}

/// Log severity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    Info,
    Warn,
    Critical,
}

/// The host's log.
pub trait Log {
    fn log(&self, level: LogLevel, message: &str);
}

/// Wall-clock time in nanoseconds since the Unix epoch.
///
/// proxy-wasm only offers wall-clock time; durations computed from it are
/// clamped at zero so a clock step never yields a negative duration.
pub trait Clock {
    fn now_nanos(&self) -> u64;
}

/// Kind of an Envoy stat.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

/// A failed host call (the host answered with an unexpected status).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("host call failed with status {0}")]
pub struct HostError(pub u32);

/// Envoy's stats API as proxy-wasm exposes it: metrics have no labels, so
/// labels travel inside the name (see [`crate::metrics`]).
pub trait MetricsHost {
    fn define(&mut self, kind: MetricKind, name: &str) -> Result<u32, HostError>;
    fn increment(&mut self, id: u32, delta: i64) -> Result<(), HostError>;
    fn record(&mut self, id: u32, value: u64) -> Result<(), HostError>;
}

/// Milliseconds between two host timestamps, clamped at zero.
pub fn millis_between(start_ns: u64, end_ns: u64) -> u64 {
    end_ns.saturating_sub(start_ns) / 1_000_000
}
