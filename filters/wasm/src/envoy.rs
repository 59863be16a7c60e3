//! Raw proxy-wasm host calls, and the `tokentap-core` host traits over them.
//!
//! The SDK's `hostcalls` module panics on any host status it does not expect
//! and unwraps header values as UTF-8, so a single odd header byte would trap
//! the VM and fail every later request on that worker. These wrappers declare
//! the ABI functions with plain integer statuses and turn every failure into
//! `None`/`Err`, so nothing on the data path can panic.

// The proxy-wasm ABI is a C ABI: calling it needs `unsafe`. Every call below
// passes pointers to live local buffers with their exact lengths, and takes
// ownership of host-returned buffers exactly as the SDK's allocator expects.
#![allow(unsafe_code)]

use std::ptr::null_mut;

use std::cell::OnceCell;

use tokentap_core::headers::HeaderMap;
use tokentap_core::host::{
    Clock, HostError, HttpView, Log, LogLevel, MetricKind, MetricsHost, StreamHost,
};
use tokentap_core::labels::{SharedStore, StoreError};
use tokentap_core::lifecycle::ExportSender;
use tokentap_core::tracer::ExportTarget;

const OK: u32 = 0;
const NOT_FOUND: u32 = 1;
const CAS_MISMATCH: u32 = 8;

const MAP_REQUEST_HEADERS: u32 = 0;
const MAP_RESPONSE_HEADERS: u32 = 2;
const MAP_HTTP_CALL_RESPONSE_HEADERS: u32 = 6;

/// proxy-wasm buffer types.
#[derive(Clone, Copy, Debug)]
#[repr(u32)]
pub enum Buffer {
    RequestBody = 0,
    ResponseBody = 1,
    HttpCallResponseBody = 4,
    PluginConfiguration = 7,
}

/// proxy-wasm log levels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u32)]
pub enum Level {
    Info = 2,
    Warn = 3,
    Critical = 5,
}

// The SDK declares the same imports with enum types; integer types here keep
// an unexpected status value from becoming an invalid enum.
#[allow(clashing_extern_declarations)]
#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_log(level: u32, message_data: *const u8, message_size: usize) -> u32;
    fn proxy_get_current_time_nanoseconds(return_time: *mut u64) -> u32;
    fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
    fn proxy_get_buffer_bytes(
        buffer_type: u32,
        start: usize,
        max_size: usize,
        return_buffer_data: *mut *mut u8,
        return_buffer_size: *mut usize,
    ) -> u32;
    fn proxy_set_buffer_bytes(
        buffer_type: u32,
        start: usize,
        size: usize,
        buffer_data: *const u8,
        buffer_size: usize,
    ) -> u32;
    fn proxy_get_header_map_pairs(
        map_type: u32,
        return_map_data: *mut *mut u8,
        return_map_size: *mut usize,
    ) -> u32;
    fn proxy_get_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_remove_header_map_value(map_type: u32, key_data: *const u8, key_size: usize) -> u32;
    fn proxy_replace_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_get_property(
        path_data: *const u8,
        path_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_set_property(
        path_data: *const u8,
        path_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_get_shared_data(
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
        return_cas: *mut u32,
    ) -> u32;
    fn proxy_set_shared_data(
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
        cas: u32,
    ) -> u32;
    fn proxy_define_metric(
        metric_type: u32,
        name_data: *const u8,
        name_size: usize,
        return_id: *mut u32,
    ) -> u32;
    fn proxy_increment_metric(metric_id: u32, offset: i64) -> u32;
    fn proxy_record_metric(metric_id: u32, value: u64) -> u32;
}

/// Takes ownership of a buffer the host allocated through our allocator.
fn take(data: *mut u8, size: usize) -> Option<Vec<u8>> {
    if data.is_null() {
        return None;
    }
    // SAFETY: the host filled `data` with `size` bytes obtained from the SDK's
    // `proxy_on_memory_allocate` (a `Vec<u8>` of capacity `size` that was
    // forgotten), so rebuilding the Vec frees it exactly once.
    Some(unsafe { Vec::from_raw_parts(data, size, size) })
}

/// Writes a log line; failures are ignored (there is nowhere to report them).
pub fn log(level: Level, message: &str) {
    // SAFETY: pointer and length of a live &str.
    unsafe {
        proxy_log(level as u32, message.as_ptr(), message.len());
    }
}

/// Current wall-clock time in nanoseconds (0 if the host refuses).
pub fn now_nanos() -> u64 {
    let mut t: u64 = 0;
    // SAFETY: `t` outlives the call.
    let status = unsafe { proxy_get_current_time_nanoseconds(&mut t) };
    if status == OK {
        t
    } else {
        0
    }
}

pub fn set_tick_period_ms(ms: u32) -> bool {
    // SAFETY: plain integer argument.
    unsafe { proxy_set_tick_period_milliseconds(ms) == OK }
}

/// Bytes `[start, start + max)` of a host buffer.
pub fn get_buffer(buffer: Buffer, start: usize, max: usize) -> Option<Vec<u8>> {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    // SAFETY: out-pointers to locals; the returned buffer is taken by `take`.
    let status = unsafe { proxy_get_buffer_bytes(buffer as u32, start, max, &mut data, &mut size) };
    if status == OK {
        take(data, size)
    } else {
        None
    }
}

/// Replaces `[start, start + size)` of a host buffer with `value`.
pub fn set_buffer(buffer: Buffer, start: usize, size: usize, value: &[u8]) -> bool {
    // SAFETY: pointer and length of a live slice.
    unsafe { proxy_set_buffer_bytes(buffer as u32, start, size, value.as_ptr(), value.len()) == OK }
}

fn header(map: u32, name: &str) -> Option<Vec<u8>> {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    // SAFETY: key pointer/length of a live &str; out-pointers to locals.
    let status =
        unsafe { proxy_get_header_map_value(map, name.as_ptr(), name.len(), &mut data, &mut size) };
    match status {
        OK => Some(take(data, size).unwrap_or_default()),
        _ => None,
    }
}

/// Every header of a map, in one host call.
fn header_map(map: u32) -> Option<HeaderMap> {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    // SAFETY: out-pointers to locals; the returned buffer is taken by `take`.
    let status = unsafe { proxy_get_header_map_pairs(map, &mut data, &mut size) };
    if status != OK {
        return None;
    }
    HeaderMap::parse(take(data, size).unwrap_or_default())
}

pub fn http_call_response_header(name: &str) -> Option<Vec<u8>> {
    header(MAP_HTTP_CALL_RESPONSE_HEADERS, name)
}

pub fn remove_request_header(name: &str) -> bool {
    // SAFETY: pointer and length of a live &str.
    unsafe { proxy_remove_header_map_value(MAP_REQUEST_HEADERS, name.as_ptr(), name.len()) == OK }
}

pub fn set_request_header(name: &str, value: &str) -> bool {
    // SAFETY: pointers and lengths of live &strs.
    unsafe {
        proxy_replace_header_map_value(
            MAP_REQUEST_HEADERS,
            name.as_ptr(),
            name.len(),
            value.as_ptr(),
            value.len(),
        ) == OK
    }
}

fn property_path(path: &[&str]) -> Vec<u8> {
    let mut out = Vec::with_capacity(path.iter().map(|p| p.len() + 1).sum());
    for (i, p) in path.iter().enumerate() {
        if i > 0 {
            out.push(0);
        }
        out.extend_from_slice(p.as_bytes());
    }
    out
}

pub fn get_property(path: &[&str]) -> Option<Vec<u8>> {
    let serialized = property_path(path);
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    // SAFETY: pointer/length of a live Vec; out-pointers to locals.
    let status =
        unsafe { proxy_get_property(serialized.as_ptr(), serialized.len(), &mut data, &mut size) };
    if status == OK {
        take(data, size)
    } else {
        None
    }
}

/// Writes filter state (`wasm.<name>` in Envoy).
pub fn set_property(path: &[&str], value: &[u8]) -> bool {
    let serialized = property_path(path);
    // SAFETY: pointers/lengths of a live Vec and slice.
    unsafe {
        proxy_set_property(
            serialized.as_ptr(),
            serialized.len(),
            value.as_ptr(),
            value.len(),
        ) == OK
    }
}

/// The current HTTP stream. Each header map is fetched once, in one host
/// call, the first time a header of it is asked for (`:path` alone is read
/// by value, so ignored requests never fetch the map); create a new one per
/// callback, since headers change between callbacks.
#[derive(Debug, Default)]
pub struct EnvoyStream {
    request: OnceCell<Option<HeaderMap>>,
    response: OnceCell<Option<HeaderMap>>,
}

impl EnvoyStream {
    fn request_map(&self) -> Option<&HeaderMap> {
        self.request
            .get_or_init(|| header_map(MAP_REQUEST_HEADERS))
            .as_ref()
    }

    fn response_map(&self) -> Option<&HeaderMap> {
        self.response
            .get_or_init(|| header_map(MAP_RESPONSE_HEADERS))
            .as_ref()
    }
}

impl HttpView for EnvoyStream {
    fn request_header(&self, name: &str) -> Option<Vec<u8>> {
        self.request_map()?.get(name).map(<[u8]>::to_vec)
    }
    fn response_header(&self, name: &str) -> Option<Vec<u8>> {
        self.response_map()?.get(name).map(<[u8]>::to_vec)
    }
    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        get_property(path)
    }
    fn request_path(&self) -> Option<Vec<u8>> {
        match self.request.get() {
            Some(map) => map.as_ref()?.get(":path").map(<[u8]>::to_vec),
            None => header(MAP_REQUEST_HEADERS, ":path"),
        }
    }
    fn has_response_header_prefix(&self, prefix: &str) -> bool {
        self.response_map()
            .is_some_and(|m| m.has_key_prefix(prefix.as_bytes()))
    }
}

impl StreamHost for EnvoyStream {
    fn request_body(&self, start: usize, len: usize) -> Option<Vec<u8>> {
        get_buffer(Buffer::RequestBody, start, len)
    }
    fn response_body(&self, start: usize, len: usize) -> Option<Vec<u8>> {
        get_buffer(Buffer::ResponseBody, start, len)
    }
    fn replace_request_body(&mut self, len: usize, body: &[u8]) {
        set_buffer(Buffer::RequestBody, 0, len, body);
    }
    fn set_request_header(&mut self, name: &str, value: &str) {
        set_request_header(name, value);
    }
    fn remove_request_header(&mut self, name: &str) {
        remove_request_header(name);
    }
    fn set_filter_state(&mut self, key: &str, value: &[u8]) {
        set_property(&[key], value);
    }
}

/// [`Log`] over Envoy's log.
#[derive(Clone, Copy, Debug, Default)]
pub struct EnvoyLog;

impl Log for EnvoyLog {
    fn log(&self, level: LogLevel, message: &str) {
        let level = match level {
            LogLevel::Info => Level::Info,
            LogLevel::Warn => Level::Warn,
            LogLevel::Critical => Level::Critical,
        };
        log(level, message);
    }
}

/// [`ExportSender`] over `proxy_http_call`, through the SDK, which must
/// register the call to route its answer back to the root context.
#[derive(Clone, Copy, Debug, Default)]
pub struct EnvoyExports;

impl ExportSender for EnvoyExports {
    fn send(&mut self, target: &ExportTarget, body: &[u8]) -> Option<u32> {
        let headers = vec![
            (":method", "POST"),
            (":path", target.path.as_str()),
            (":authority", target.authority.as_str()),
            ("content-type", "application/x-protobuf"),
        ];
        let timeout = std::time::Duration::from_millis(u64::from(target.timeout_ms));
        proxy_wasm::hostcalls::dispatch_http_call(
            &target.cluster,
            headers,
            Some(body),
            vec![],
            timeout,
        )
        .ok()
    }
}

/// [`Clock`] over the host's wall clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct EnvoyClock;

impl Clock for EnvoyClock {
    fn now_nanos(&self) -> u64 {
        now_nanos()
    }
}

/// [`MetricsHost`] over Envoy stats.
#[derive(Clone, Copy, Debug, Default)]
pub struct EnvoyStats;

impl MetricsHost for EnvoyStats {
    fn define(&mut self, kind: MetricKind, name: &str) -> Result<u32, HostError> {
        let t = match kind {
            MetricKind::Counter => 0,
            MetricKind::Gauge => 1,
            MetricKind::Histogram => 2,
        };
        let mut id: u32 = 0;
        // SAFETY: pointer/length of a live &str; out-pointer to a local.
        let status = unsafe { proxy_define_metric(t, name.as_ptr(), name.len(), &mut id) };
        if status == OK {
            Ok(id)
        } else {
            Err(HostError(status))
        }
    }

    fn increment(&mut self, id: u32, delta: i64) -> Result<(), HostError> {
        // SAFETY: plain integer arguments.
        match unsafe { proxy_increment_metric(id, delta) } {
            OK => Ok(()),
            s => Err(HostError(s)),
        }
    }

    fn record(&mut self, id: u32, value: u64) -> Result<(), HostError> {
        // SAFETY: plain integer arguments.
        match unsafe { proxy_record_metric(id, value) } {
            OK => Ok(()),
            s => Err(HostError(s)),
        }
    }
}

/// [`SharedStore`] over proxy-wasm shared data (process-wide, per vm_id).
#[derive(Clone, Copy, Debug, Default)]
pub struct EnvoySharedData;

impl SharedStore for EnvoySharedData {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        let mut data: *mut u8 = null_mut();
        let mut size: usize = 0;
        let mut cas: u32 = 0;
        // SAFETY: key pointer/length of a live &str; out-pointers to locals.
        let status = unsafe {
            proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut cas)
        };
        match status {
            OK => Some((take(data, size).unwrap_or_default(), cas)),
            NOT_FOUND => None,
            _ => None,
        }
    }

    fn set(&mut self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
        // SAFETY: pointers/lengths of a live &str and slice.
        let status = unsafe {
            proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas)
        };
        match status {
            OK => Ok(()),
            CAS_MISMATCH => Err(StoreError::CasMismatch),
            _ => Err(StoreError::Unavailable),
        }
    }
}
