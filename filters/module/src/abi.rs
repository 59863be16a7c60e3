//! The binding: Envoy's dynamic-module ABI (HTTP filter), only the parts
//! tokentap uses, declared once, plus safe wrappers over them.
//!
//! Declarations follow `source/extensions/dynamic_modules/abi/abi.h` at ABI
//! v0.1.0 (Envoy 1.38 and 1.39; 1.40 speaks v0.2.0, which keeps every
//! declaration used here). Envoy loads a module with every imported callback
//! resolved at once, so this file imports only callbacks that all supported
//! Envoy binaries export; `tests/abi_symbols.rs` fails if it imports one that
//! a supported binary lacks.
//!
//! Ownership (from the header): buffers Envoy hands out stay valid until the
//! end of the current hook, or until a setter changes what they view; this
//! file never keeps one past the hook that produced it. Pointers Envoy passes
//! to the module's hooks are valid for the duration of that hook, except the
//! configuration pointer, which lives until the configuration is destroyed.

// Calling a C ABI and exporting `#[no_mangle]` hooks needs `unsafe`; it is
// confined to this file, and each block says why it is sound.
#![allow(unsafe_code)]
// The hooks' one safety contract (Envoy calls them, with the pointers the
// header describes) is stated once, above them, not on each.
#![allow(clippy::missing_safety_doc)]

use std::ffi::{c_char, c_void};
use std::ptr::{null, null_mut};

/// The ABI version this binding was written against (NUL-terminated).
pub const ABI_VERSION: &[u8] = b"v0.1.0\0";

#[repr(C)]
#[derive(Clone, Copy)]
pub struct EnvoyBuffer {
    ptr: *const c_char,
    length: usize,
}

impl EnvoyBuffer {
    const EMPTY: EnvoyBuffer = EnvoyBuffer {
        ptr: null(),
        length: 0,
    };

    /// The bytes Envoy lent.
    ///
    /// # Safety
    /// Envoy must have filled this buffer during the current hook, and no
    /// setter may have run since; the slice must not outlive the hook.
    unsafe fn as_slice<'a>(self) -> Option<&'a [u8]> {
        if self.ptr.is_null() {
            return None;
        }
        // SAFETY: per the caller's contract, `ptr` points at `length`
        // readable bytes owned by Envoy for the rest of the hook.
        Some(unsafe { std::slice::from_raw_parts(self.ptr.cast::<u8>(), self.length) })
    }
}

#[repr(C)]
#[derive(Clone, Copy)]
struct ModuleBuffer {
    ptr: *const c_char,
    length: usize,
}

impl ModuleBuffer {
    fn of(bytes: &[u8]) -> ModuleBuffer {
        ModuleBuffer {
            ptr: bytes.as_ptr().cast(),
            length: bytes.len(),
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct EnvoyHeader {
    key_ptr: *const c_char,
    key_length: usize,
    value_ptr: *const c_char,
    value_length: usize,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct ModuleHeader {
    key_ptr: *const c_char,
    key_length: usize,
    value_ptr: *const c_char,
    value_length: usize,
}

type FilterEnvoyPtr = *mut c_void;
type FilterModulePtr = *const c_void;
type ConfigEnvoyPtr = *mut c_void;
type ConfigModulePtr = *const c_void;
type SchedulerPtr = *mut c_void;

/// `envoy_dynamic_module_type_http_header_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum HeaderKind {
    Request = 0,
    Response = 2,
}

/// `envoy_dynamic_module_type_http_body_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum BodyKind {
    ReceivedRequest = 0,
    BufferedRequest = 1,
    ReceivedResponse = 2,
}

/// `envoy_dynamic_module_type_log_level`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Level {
    Debug = 1,
    Info = 2,
    Warn = 3,
    Critical = 5,
}

/// `envoy_dynamic_module_type_attribute_id` values used here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Attribute {
    ResponseCode = 15,
    ResponseCodeDetails = 16,
    ResponseFlags = 17,
    XdsRouteName = 61,
}

/// `envoy_dynamic_module_type_metadata_source_Dynamic`.
const METADATA_DYNAMIC: u32 = 0;
/// `envoy_dynamic_module_type_http_callout_init_result_Success`.
const CALLOUT_SUCCESS: u32 = 0;
/// `envoy_dynamic_module_type_http_callout_result_Success`.
const CALLOUT_RESULT_SUCCESS: u32 = 0;
/// Hook statuses: `Continue` is 0 for every header, body and trailer hook.
const CONTINUE: u32 = 0;
/// `..._request_body_status_StopIterationAndBuffer`.
const STOP_AND_BUFFER: u32 = 1;

/// `envoy_dynamic_module_type_metrics_result`, as an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricsError {
    NotFound,
    InvalidLabels,
    Frozen,
    /// A value Envoy cannot take (a negative counter delta).
    Refused,
    Unknown(u32),
}

impl MetricsError {
    fn check(result: u32) -> Result<(), MetricsError> {
        match result {
            0 => Ok(()),
            1 => Err(MetricsError::NotFound),
            2 => Err(MetricsError::InvalidLabels),
            3 => Err(MetricsError::Frozen),
            other => Err(MetricsError::Unknown(other)),
        }
    }

    /// A small number for logs and [`tokentap_core::host::HostError`].
    pub fn code(self) -> u32 {
        match self {
            MetricsError::NotFound => 1,
            MetricsError::InvalidLabels => 2,
            MetricsError::Frozen => 3,
            MetricsError::Refused => 4,
            MetricsError::Unknown(n) => 100 + n,
        }
    }
}

impl std::fmt::Display for MetricsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self:?}")
    }
}

// Callbacks Envoy exports. Each exists in every supported Envoy binary
// (1.38.3, 1.39.3, 1.40.0); see `tests/abi_symbols.rs`.
extern "C" {
    fn envoy_dynamic_module_callback_log(level: u32, message: ModuleBuffer);
    fn envoy_dynamic_module_callback_log_enabled(level: u32) -> bool;

    fn envoy_dynamic_module_callback_http_get_header(
        filter: FilterEnvoyPtr,
        header_type: u32,
        key: ModuleBuffer,
        result: *mut EnvoyBuffer,
        index: usize,
        optional_size: *mut usize,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_get_headers_size(
        filter: FilterEnvoyPtr,
        header_type: u32,
    ) -> usize;
    fn envoy_dynamic_module_callback_http_get_headers(
        filter: FilterEnvoyPtr,
        header_type: u32,
        result_headers: *mut EnvoyHeader,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_set_header(
        filter: FilterEnvoyPtr,
        header_type: u32,
        key: ModuleBuffer,
        value: ModuleBuffer,
    ) -> bool;

    fn envoy_dynamic_module_callback_http_get_body_chunks_size(
        filter: FilterEnvoyPtr,
        body_type: u32,
    ) -> usize;
    fn envoy_dynamic_module_callback_http_get_body_chunks(
        filter: FilterEnvoyPtr,
        body_type: u32,
        result_buffer_vector: *mut EnvoyBuffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_append_body(
        filter: FilterEnvoyPtr,
        body_type: u32,
        data: ModuleBuffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_drain_body(
        filter: FilterEnvoyPtr,
        body_type: u32,
        number_of_bytes: usize,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_get_body_size(
        filter: FilterEnvoyPtr,
        body_type: u32,
    ) -> usize;
    fn envoy_dynamic_module_callback_http_received_buffered_request_body(
        filter: FilterEnvoyPtr,
    ) -> bool;

    fn envoy_dynamic_module_callback_http_filter_get_attribute_string(
        filter: FilterEnvoyPtr,
        attribute_id: u32,
        result: *mut EnvoyBuffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_filter_get_attribute_int(
        filter: FilterEnvoyPtr,
        attribute_id: u32,
        result: *mut u64,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_get_cluster_name(
        filter: FilterEnvoyPtr,
        result: *mut EnvoyBuffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_get_metadata_string(
        filter: FilterEnvoyPtr,
        source: u32,
        namespace: ModuleBuffer,
        key: ModuleBuffer,
        result: *mut EnvoyBuffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_set_filter_state_bytes(
        filter: FilterEnvoyPtr,
        key: ModuleBuffer,
        value: ModuleBuffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_filter_get_worker_index(filter: FilterEnvoyPtr) -> u32;

    fn envoy_dynamic_module_callback_http_filter_config_define_counter(
        config: ConfigEnvoyPtr,
        name: ModuleBuffer,
        label_names: *const ModuleBuffer,
        label_names_length: usize,
        counter_id: *mut usize,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_config_define_gauge(
        config: ConfigEnvoyPtr,
        name: ModuleBuffer,
        label_names: *const ModuleBuffer,
        label_names_length: usize,
        gauge_id: *mut usize,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_increment_counter(
        filter: FilterEnvoyPtr,
        id: usize,
        label_values: *const ModuleBuffer,
        label_values_length: usize,
        value: u64,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_increment_gauge(
        filter: FilterEnvoyPtr,
        id: usize,
        label_values: *const ModuleBuffer,
        label_values_length: usize,
        value: u64,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_decrement_gauge(
        filter: FilterEnvoyPtr,
        id: usize,
        label_values: *const ModuleBuffer,
        label_values_length: usize,
        value: u64,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_set_gauge(
        filter: FilterEnvoyPtr,
        id: usize,
        label_values: *const ModuleBuffer,
        label_values_length: usize,
        value: u64,
    ) -> u32;

    fn envoy_dynamic_module_callback_http_filter_config_http_callout(
        config: ConfigEnvoyPtr,
        callout_id_out: *mut u64,
        cluster_name: ModuleBuffer,
        headers: *const ModuleHeader,
        headers_size: usize,
        body: ModuleBuffer,
        timeout_milliseconds: u64,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_config_scheduler_new(
        config: ConfigEnvoyPtr,
    ) -> SchedulerPtr;
    fn envoy_dynamic_module_callback_http_filter_config_scheduler_delete(scheduler: SchedulerPtr);
    fn envoy_dynamic_module_callback_http_filter_config_scheduler_commit(
        scheduler: SchedulerPtr,
        event_id: u64,
    );
}

// ---------------------------------------------------------------- helpers

/// Writes a line to Envoy's log (`[dynamic_modules]` logger).
pub fn log(level: Level, message: &str) {
    // SAFETY: plain integer argument; the message buffer is a live &str that
    // Envoy only reads during the call.
    unsafe {
        if envoy_dynamic_module_callback_log_enabled(level as u32) {
            envoy_dynamic_module_callback_log(level as u32, ModuleBuffer::of(message.as_bytes()));
        }
    }
}

/// Wall-clock nanoseconds since the Unix epoch (the core's clock).
pub fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A stream, as Envoy lent it to the current hook. Only this file makes
/// one, from the pointer a hook received, and hands it to the shell by
/// reference for the hook's duration. Views it returns borrow it; calls that
/// change headers or bodies take it mutably, so no view outlives a change
/// (the header's ownership rule).
#[derive(Debug)]
pub struct FilterHandle(FilterEnvoyPtr);

/// The part of a stream that updates stats: they do not touch the views
/// of [`FilterHandle`], so this is `Copy`. Valid for the current hook only;
/// the worker lends it to its metrics host while it publishes and takes it
/// back after.
#[derive(Clone, Copy, Debug)]
pub struct StatsHandle(FilterEnvoyPtr);

impl FilterHandle {
    /// First value of a header (lower-case name).
    pub fn header(&self, kind: HeaderKind, name: &str) -> Option<&[u8]> {
        let mut out = EnvoyBuffer::EMPTY;
        // SAFETY: `self.0` is the stream of the current hook; the key is a
        // live &str; `out` outlives the call. Envoy fills `out` with a view
        // valid until the hook ends or a setter runs: the returned slice
        // borrows `self`, and setters need `&mut self`.
        let found = unsafe {
            envoy_dynamic_module_callback_http_get_header(
                self.0,
                kind as u32,
                ModuleBuffer::of(name.as_bytes()),
                &mut out,
                0,
                null_mut(),
            )
        };
        if !found {
            return None;
        }
        // SAFETY: filled by Envoy during this hook (see above).
        unsafe { out.as_slice() }.or(Some(&[]))
    }

    /// Every header of a map, as views into Envoy's map.
    pub fn headers(&self, kind: HeaderKind) -> Vec<(&[u8], &[u8])> {
        // SAFETY: `self.0` is the current hook's stream.
        let n = unsafe { envoy_dynamic_module_callback_http_get_headers_size(self.0, kind as u32) };
        if n == 0 {
            return Vec::new();
        }
        let mut raw = vec![
            EnvoyHeader {
                key_ptr: null(),
                key_length: 0,
                value_ptr: null(),
                value_length: 0,
            };
            n
        ];
        // SAFETY: `raw` has room for the `n` entries Envoy reported.
        let ok = unsafe {
            envoy_dynamic_module_callback_http_get_headers(self.0, kind as u32, raw.as_mut_ptr())
        };
        if !ok {
            return Vec::new();
        }
        raw.iter()
            .filter_map(|h| {
                let key = EnvoyBuffer {
                    ptr: h.key_ptr,
                    length: h.key_length,
                };
                let value = EnvoyBuffer {
                    ptr: h.value_ptr,
                    length: h.value_length,
                };
                // SAFETY: both filled by Envoy during this hook.
                unsafe { Some((key.as_slice()?, value.as_slice().unwrap_or(&[]))) }
            })
            .collect()
    }

    /// Replaces a request header; `None` removes it.
    pub fn set_request_header(&mut self, name: &str, value: Option<&str>) -> bool {
        let value = match value {
            Some(v) => ModuleBuffer::of(v.as_bytes()),
            None => ModuleBuffer {
                ptr: null(),
                length: 0,
            },
        };
        // SAFETY: current hook's stream; buffers are live locals Envoy copies.
        unsafe {
            envoy_dynamic_module_callback_http_set_header(
                self.0,
                HeaderKind::Request as u32,
                ModuleBuffer::of(name.as_bytes()),
                value,
            )
        }
    }

    /// The slices of a body, as Envoy holds them.
    pub fn body_chunks(&self, kind: BodyKind) -> Vec<&[u8]> {
        // SAFETY: current hook's stream.
        let n =
            unsafe { envoy_dynamic_module_callback_http_get_body_chunks_size(self.0, kind as u32) };
        if n == 0 {
            return Vec::new();
        }
        let mut raw = vec![EnvoyBuffer::EMPTY; n];
        // SAFETY: `raw` has room for the `n` slices Envoy reported.
        let ok = unsafe {
            envoy_dynamic_module_callback_http_get_body_chunks(
                self.0,
                kind as u32,
                raw.as_mut_ptr(),
            )
        };
        if !ok {
            return Vec::new();
        }
        // SAFETY: each filled by Envoy during this hook.
        raw.iter().filter_map(|b| unsafe { b.as_slice() }).collect()
    }

    /// Bytes in a body.
    pub fn body_size(&self, kind: BodyKind) -> usize {
        // SAFETY: current hook's stream.
        unsafe { envoy_dynamic_module_callback_http_get_body_size(self.0, kind as u32) }
    }

    /// Whether the received request data is in fact an earlier filter's
    /// buffered body (then the buffered body must not be read twice).
    pub fn received_is_buffered_request(&self) -> bool {
        // SAFETY: current hook's stream.
        unsafe { envoy_dynamic_module_callback_http_received_buffered_request_body(self.0) }
    }

    /// Drains `n` bytes from the front of a body.
    pub fn drain_body(&mut self, kind: BodyKind, n: usize) -> bool {
        // SAFETY: current hook's stream; plain integers.
        unsafe { envoy_dynamic_module_callback_http_drain_body(self.0, kind as u32, n) }
    }

    /// Appends `data` to a body.
    pub fn append_body(&mut self, kind: BodyKind, data: &[u8]) -> bool {
        // SAFETY: current hook's stream; `data` is live and copied by Envoy.
        unsafe {
            envoy_dynamic_module_callback_http_append_body(
                self.0,
                kind as u32,
                ModuleBuffer::of(data),
            )
        }
    }

    pub fn attribute_string(&self, id: Attribute) -> Option<&[u8]> {
        let mut out = EnvoyBuffer::EMPTY;
        // SAFETY: current hook's stream; `out` outlives the call.
        let ok = unsafe {
            envoy_dynamic_module_callback_http_filter_get_attribute_string(
                self.0, id as u32, &mut out,
            )
        };
        // SAFETY: filled by Envoy during this hook.
        ok.then(|| unsafe { out.as_slice() }).flatten()
    }

    pub fn attribute_int(&self, id: Attribute) -> Option<u64> {
        let mut out: u64 = 0;
        // SAFETY: current hook's stream; `out` outlives the call.
        let ok = unsafe {
            envoy_dynamic_module_callback_http_filter_get_attribute_int(self.0, id as u32, &mut out)
        };
        ok.then_some(out)
    }

    /// The upstream cluster the route chose.
    pub fn cluster_name(&self) -> Option<&[u8]> {
        let mut out = EnvoyBuffer::EMPTY;
        // SAFETY: current hook's stream; `out` outlives the call.
        let ok = unsafe { envoy_dynamic_module_callback_http_get_cluster_name(self.0, &mut out) };
        // SAFETY: filled by Envoy during this hook.
        ok.then(|| unsafe { out.as_slice() }).flatten()
    }

    /// A string in the stream's dynamic metadata.
    pub fn dynamic_metadata_string(&self, namespace: &str, key: &str) -> Option<&[u8]> {
        let mut out = EnvoyBuffer::EMPTY;
        // SAFETY: current hook's stream; live key buffers; `out` outlives the call.
        let ok = unsafe {
            envoy_dynamic_module_callback_http_get_metadata_string(
                self.0,
                METADATA_DYNAMIC,
                ModuleBuffer::of(namespace.as_bytes()),
                ModuleBuffer::of(key.as_bytes()),
                &mut out,
            )
        };
        // SAFETY: filled by Envoy during this hook.
        ok.then(|| unsafe { out.as_slice() }).flatten()
    }

    pub fn set_filter_state(&mut self, key: &str, value: &[u8]) -> bool {
        // SAFETY: current hook's stream; live buffers, copied by Envoy.
        unsafe {
            envoy_dynamic_module_callback_http_set_filter_state_bytes(
                self.0,
                ModuleBuffer::of(key.as_bytes()),
                ModuleBuffer::of(value),
            )
        }
    }

    /// The stats side of this stream, for the current hook.
    pub fn stats(&self) -> StatsHandle {
        StatsHandle(self.0)
    }
}

impl StatsHandle {
    pub fn worker_index(&self) -> u32 {
        // SAFETY: current hook's stream.
        unsafe { envoy_dynamic_module_callback_http_filter_get_worker_index(self.0) }
    }

    fn metric(
        &self,
        call: unsafe extern "C" fn(FilterEnvoyPtr, usize, *const ModuleBuffer, usize, u64) -> u32,
        id: usize,
        labels: &[&str],
        value: u64,
    ) -> Result<(), MetricsError> {
        let mut values = [ModuleBuffer {
            ptr: null(),
            length: 0,
        }; 16];
        let n = labels.len().min(values.len());
        for (slot, l) in values.iter_mut().zip(labels) {
            *slot = ModuleBuffer::of(l.as_bytes());
        }
        let ptr = if n == 0 { null() } else { values.as_ptr() };
        // SAFETY: current hook's stream; `values[..n]` are live buffers that
        // Envoy reads during the call; `id` came from a define call on this
        // stream's configuration (a wrong id is reported, not trusted).
        MetricsError::check(unsafe { call(self.0, id, ptr, n, value) })
    }

    pub fn increment_counter(
        &self,
        id: usize,
        labels: &[&str],
        v: u64,
    ) -> Result<(), MetricsError> {
        self.metric(
            envoy_dynamic_module_callback_http_filter_increment_counter,
            id,
            labels,
            v,
        )
    }

    pub fn increment_gauge(&self, id: usize, labels: &[&str], v: u64) -> Result<(), MetricsError> {
        self.metric(
            envoy_dynamic_module_callback_http_filter_increment_gauge,
            id,
            labels,
            v,
        )
    }

    pub fn decrement_gauge(&self, id: usize, labels: &[&str], v: u64) -> Result<(), MetricsError> {
        self.metric(
            envoy_dynamic_module_callback_http_filter_decrement_gauge,
            id,
            labels,
            v,
        )
    }

    pub fn set_gauge(&self, id: usize, labels: &[&str], v: u64) -> Result<(), MetricsError> {
        self.metric(
            envoy_dynamic_module_callback_http_filter_set_gauge,
            id,
            labels,
            v,
        )
    }
}

/// A filter configuration, as Envoy lent it: valid from the configuration
/// hook until Envoy destroys the configuration.
#[derive(Clone, Copy, Debug)]
pub struct ConfigHandle(ConfigEnvoyPtr);

// SAFETY: the pointer is only dereferenced by Envoy, in calls this file
// makes on the main thread (configuration and configuration-level hooks);
// carrying it between threads does not use it.
unsafe impl Send for ConfigHandle {}
// SAFETY: as above; shared references only copy the pointer.
unsafe impl Sync for ConfigHandle {}

impl ConfigHandle {
    fn define(
        &self,
        call: unsafe extern "C" fn(
            ConfigEnvoyPtr,
            ModuleBuffer,
            *const ModuleBuffer,
            usize,
            *mut usize,
        ) -> u32,
        name: &str,
        labels: &[&str],
    ) -> Result<usize, MetricsError> {
        let names: Vec<ModuleBuffer> = labels
            .iter()
            .map(|l| ModuleBuffer::of(l.as_bytes()))
            .collect();
        let ptr = if names.is_empty() {
            null()
        } else {
            names.as_ptr()
        };
        let mut id: usize = 0;
        // SAFETY: called inside the configuration hook (the only time Envoy
        // accepts definitions); live buffers; `id` outlives the call.
        let result = unsafe {
            call(
                self.0,
                ModuleBuffer::of(name.as_bytes()),
                ptr,
                names.len(),
                &mut id,
            )
        };
        MetricsError::check(result).map(|()| id)
    }

    pub fn define_counter(&self, name: &str, labels: &[&str]) -> Result<usize, MetricsError> {
        self.define(
            envoy_dynamic_module_callback_http_filter_config_define_counter,
            name,
            labels,
        )
    }

    pub fn define_gauge(&self, name: &str, labels: &[&str]) -> Result<usize, MetricsError> {
        self.define(
            envoy_dynamic_module_callback_http_filter_config_define_gauge,
            name,
            labels,
        )
    }

    /// A scheduler that runs `on_http_filter_config_scheduled` on the main
    /// thread; call from the configuration hook.
    pub fn scheduler(&self) -> Option<ConfigScheduler> {
        // SAFETY: main thread, inside the configuration hook.
        let ptr = unsafe { envoy_dynamic_module_callback_http_filter_config_scheduler_new(self.0) };
        (!ptr.is_null()).then_some(ConfigScheduler(ptr))
    }

    /// Starts an HTTP call owned by the configuration; main thread only.
    /// Returns the callout id Envoy assigned.
    pub fn http_callout(
        &self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        timeout_ms: u64,
    ) -> Option<u64> {
        let raw: Vec<ModuleHeader> = headers
            .iter()
            .map(|(k, v)| ModuleHeader {
                key_ptr: k.as_ptr().cast(),
                key_length: k.len(),
                value_ptr: v.as_ptr().cast(),
                value_length: v.len(),
            })
            .collect();
        let mut id: u64 = 0;
        // SAFETY: called from a configuration-level hook on the main thread
        // while the configuration lives; every buffer is live for the call
        // and copied by Envoy.
        let result = unsafe {
            envoy_dynamic_module_callback_http_filter_config_http_callout(
                self.0,
                &mut id,
                ModuleBuffer::of(cluster.as_bytes()),
                raw.as_ptr(),
                raw.len(),
                ModuleBuffer::of(body),
                timeout_ms,
            )
        };
        (result == CALLOUT_SUCCESS).then_some(id)
    }
}

/// A configuration scheduler, owned by the module, deleted on drop.
#[derive(Debug)]
pub struct ConfigScheduler(SchedulerPtr);

// SAFETY: the header documents `..._config_scheduler_commit` as callable
// from any thread; the pointer is otherwise only passed to `delete`, once.
unsafe impl Send for ConfigScheduler {}
// SAFETY: as above: `commit` takes the pointer by value and is thread-safe.
unsafe impl Sync for ConfigScheduler {}

impl ConfigScheduler {
    /// Asks for `on_http_filter_config_scheduled(event)` on the main thread.
    pub fn commit(&self, event: u64) {
        // SAFETY: thread-safe per the header; the scheduler is alive until drop.
        unsafe { envoy_dynamic_module_callback_http_filter_config_scheduler_commit(self.0, event) }
    }
}

impl Drop for ConfigScheduler {
    fn drop(&mut self) {
        // SAFETY: created by `scheduler_new`, deleted exactly once, here.
        unsafe { envoy_dynamic_module_callback_http_filter_config_scheduler_delete(self.0) }
    }
}

/// What a configuration-level callout returned.
#[derive(Debug)]
pub struct CalloutAnswer {
    /// `None` when the call failed (reset, buffer limit) or had no status.
    pub status: Option<u16>,
    pub body: Vec<u8>,
}

// ---------------------------------------------------------------- hooks
//
// Every hook is `unsafe extern "C"`: Envoy is its only caller, and the
// pointers it passes are valid under the header's contract (each hook's
// body says which), which the type system cannot check.

/// Runs a hook body; a panic is caught (unwinding into Envoy would abort
/// it), counted, logged, and answered with `fallback`: fail open.
fn guard<R>(
    hook: &'static str,
    fallback: R,
    on_panic: impl FnOnce(),
    body: impl FnOnce() -> R,
) -> R {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
        Ok(r) => r,
        Err(payload) => {
            crate::panics::caught(hook, payload.as_ref());
            // Counting must not panic again; if it does, give up on it.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(on_panic));
            fallback
        }
    }
}

/// The per-stream state behind a `filter_module_ptr`.
///
/// # Safety
/// `ptr` must be a pointer `on_http_filter_new` returned and Envoy has not
/// yet destroyed; Envoy calls one stream's hooks on one thread, one at a
/// time, so the exclusive borrow is unique for the hook's duration.
unsafe fn filter<'a>(ptr: FilterModulePtr) -> Option<&'a mut crate::Filter> {
    // SAFETY: per the function's contract.
    unsafe { ptr.cast::<crate::Filter>().cast_mut().as_mut() }
}

/// The configuration behind a `filter_config_module_ptr`.
///
/// # Safety
/// `ptr` must come from `on_http_filter_config_new` and not be destroyed.
unsafe fn config<'a>(ptr: ConfigModulePtr) -> Option<&'a crate::Configured> {
    // SAFETY: per the function's contract; shared access only.
    unsafe { ptr.cast::<crate::Configured>().as_ref() }
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_program_init() -> *const c_char {
    guard(
        "program_init",
        ABI_VERSION.as_ptr().cast(),
        || {},
        || {
            crate::panics::install_hook();
            ABI_VERSION.as_ptr().cast()
        },
    )
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
    config_envoy: ConfigEnvoyPtr,
    name: EnvoyBuffer,
    config_bytes: EnvoyBuffer,
) -> ConfigModulePtr {
    guard(
        "http_filter_config_new",
        null(),
        || {},
        || {
            // SAFETY: Envoy lends both buffers for the duration of this hook.
            let (name, bytes) = unsafe {
                (
                    name.as_slice().unwrap_or(&[]),
                    config_bytes.as_slice().unwrap_or(&[]),
                )
            };
            match crate::Configured::new(ConfigHandle(config_envoy), name, bytes) {
                Some(c) => Box::into_raw(Box::new(c)).cast_const().cast(),
                None => null(),
            }
        },
    )
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(
    config_module: ConfigModulePtr,
) {
    guard(
        "http_filter_config_destroy",
        (),
        || {},
        || {
            if !config_module.is_null() {
                // SAFETY: made by Box::into_raw in config_new; Envoy destroys it once.
                drop(unsafe {
                    Box::from_raw(config_module.cast::<crate::Configured>().cast_mut())
                });
            }
        },
    )
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_scheduled(
    config_envoy: ConfigEnvoyPtr,
    config_module: ConfigModulePtr,
    event_id: u64,
) {
    guard(
        "http_filter_config_scheduled",
        (),
        || {},
        || {
            // SAFETY: a live configuration (Envoy cancels events at destroy).
            if let Some(c) = unsafe { config(config_module) } {
                c.scheduled(ConfigHandle(config_envoy), event_id);
            }
        },
    )
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_http_callout_done(
    _config_envoy: ConfigEnvoyPtr,
    config_module: ConfigModulePtr,
    callout_id: u64,
    result: u32,
    headers: *const EnvoyHeader,
    headers_size: usize,
    body_chunks: *const EnvoyBuffer,
    body_chunks_size: usize,
) {
    guard(
        "http_filter_config_http_callout_done",
        (),
        || {},
        || {
            // SAFETY: a live configuration (pending callouts end with it).
            let Some(c) = (unsafe { config(config_module) }) else {
                return;
            };
            let mut answer = CalloutAnswer {
                status: None,
                body: Vec::new(),
            };
            if result == CALLOUT_RESULT_SUCCESS {
                // SAFETY: Envoy owns `headers[..headers_size]` and
                // `body_chunks[..body_chunks_size]` until this hook returns;
                // null means none.
                unsafe {
                    if !headers.is_null() {
                        for h in std::slice::from_raw_parts(headers, headers_size) {
                            let key = EnvoyBuffer {
                                ptr: h.key_ptr,
                                length: h.key_length,
                            }
                            .as_slice();
                            if key == Some(b":status") {
                                answer.status = EnvoyBuffer {
                                    ptr: h.value_ptr,
                                    length: h.value_length,
                                }
                                .as_slice()
                                .and_then(|v| std::str::from_utf8(v).ok()?.trim().parse().ok());
                            }
                        }
                    }
                    if !body_chunks.is_null() {
                        for b in std::slice::from_raw_parts(body_chunks, body_chunks_size) {
                            answer.body.extend_from_slice(b.as_slice().unwrap_or(&[]));
                        }
                    }
                }
            }
            c.callout_done(callout_id, answer);
        },
    )
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_new(
    config_module: ConfigModulePtr,
    filter_envoy: FilterEnvoyPtr,
) -> FilterModulePtr {
    // Never null: Envoy closes a stream whose filter is null. A filter that
    // could not be set up is an inert one.
    let made = guard(
        "http_filter_new",
        None,
        || {},
        || {
            // SAFETY: a live configuration: Envoy holds it while streams use it.
            let c = unsafe { config(config_module) }?;
            Some(Box::new(crate::Filter::new(c, &FilterHandle(filter_envoy))))
        },
    );
    let filter = made.unwrap_or_else(|| Box::new(crate::Filter::inert()));
    Box::into_raw(filter).cast_const().cast()
}

/// Generates a per-stream hook that forwards to a `Filter` method and
/// answers `Continue` unless the method says otherwise.
macro_rules! stream_hook {
    ($hook:ident, $name:literal, $method:ident $(, $arg:ident : $ty:ty)*) => {
        #[no_mangle]
        pub unsafe extern "C" fn $hook(
            filter_envoy: FilterEnvoyPtr,
            filter_module: FilterModulePtr
            $(, $arg: $ty)*
        ) -> u32 {
            let panicked = || {
                // SAFETY: as below; the body's borrow ended with its unwind.
                if let Some(f) = unsafe { filter(filter_module) } {
                    f.panicked(StatsHandle(filter_envoy));
                }
            };
            guard($name, CONTINUE, panicked, || {
                let mut stream = FilterHandle(filter_envoy);
                // SAFETY: `filter_module` is this stream's live filter (see `filter`).
                match unsafe { filter(filter_module) } {
                    Some(f) => f.$method(&mut stream $(, $arg)*),
                    None => CONTINUE,
                }
            })
        }
    };
}

stream_hook!(envoy_dynamic_module_on_http_filter_request_headers, "request_headers", request_headers, end_of_stream: bool);
stream_hook!(envoy_dynamic_module_on_http_filter_request_body, "request_body", request_body, end_of_stream: bool);
stream_hook!(envoy_dynamic_module_on_http_filter_response_headers, "response_headers", response_headers, end_of_stream: bool);
stream_hook!(envoy_dynamic_module_on_http_filter_response_body, "response_body", response_body, end_of_stream: bool);

/// `StopIterationAndBuffer` for a request body hook.
pub const BODY_STOP_AND_BUFFER: u32 = STOP_AND_BUFFER;
/// `Continue` for any hook.
pub const HOOK_CONTINUE: u32 = CONTINUE;

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(
    _filter_envoy: FilterEnvoyPtr,
    _filter_module: FilterModulePtr,
) -> u32 {
    CONTINUE
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_response_trailers(
    _filter_envoy: FilterEnvoyPtr,
    _filter_module: FilterModulePtr,
) -> u32 {
    CONTINUE
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(
    filter_envoy: FilterEnvoyPtr,
    filter_module: FilterModulePtr,
) {
    let panicked = || {
        // SAFETY: as below.
        if let Some(f) = unsafe { filter(filter_module) } {
            f.panicked(StatsHandle(filter_envoy));
        }
    };
    guard("stream_complete", (), panicked, || {
        let mut stream = FilterHandle(filter_envoy);
        // SAFETY: `filter_module` is this stream's live filter.
        if let Some(f) = unsafe { filter(filter_module) } {
            f.stream_complete(&mut stream);
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_local_reply(
    _filter_envoy: FilterEnvoyPtr,
    filter_module: FilterModulePtr,
    response_code: u32,
    details: EnvoyBuffer,
    _reset_imminent: bool,
) -> u32 {
    guard(
        "local_reply",
        CONTINUE,
        || {},
        || {
            // SAFETY: this stream's live filter; `details` is lent for the hook.
            if let Some(f) = unsafe { filter(filter_module) } {
                f.local_reply(response_code, unsafe { details.as_slice() });
            }
            CONTINUE
        },
    )
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_destroy(
    filter_module: FilterModulePtr,
) {
    guard(
        "http_filter_destroy",
        (),
        || {},
        || {
            if !filter_module.is_null() {
                // SAFETY: made by Box::into_raw in filter_new; destroyed once.
                drop(unsafe { Box::from_raw(filter_module.cast::<crate::Filter>().cast_mut()) });
            }
        },
    )
}

// Hooks Envoy requires of every HTTP filter module; tokentap starts no
// per-stream callouts, streams or schedulers, and is never terminal.

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_http_callout_done(
    _filter_envoy: FilterEnvoyPtr,
    _filter_module: FilterModulePtr,
    _callout_id: u64,
    _result: u32,
    _headers: *const EnvoyHeader,
    _headers_size: usize,
    _body_chunks: *const EnvoyBuffer,
    _body_chunks_size: usize,
) {
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_headers(
    _filter_envoy: FilterEnvoyPtr,
    _filter_module: FilterModulePtr,
    _stream_id: u64,
    _headers: *const EnvoyHeader,
    _headers_size: usize,
    _end_stream: bool,
) {
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_data(
    _filter_envoy: FilterEnvoyPtr,
    _filter_module: FilterModulePtr,
    _stream_id: u64,
    _data: *const EnvoyBuffer,
    _data_count: usize,
    _end_stream: bool,
) {
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_trailers(
    _filter_envoy: FilterEnvoyPtr,
    _filter_module: FilterModulePtr,
    _stream_id: u64,
    _trailers: *const EnvoyHeader,
    _trailers_size: usize,
) {
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_complete(
    _filter_envoy: FilterEnvoyPtr,
    _filter_module: FilterModulePtr,
    _stream_id: u64,
) {
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_reset(
    _filter_envoy: FilterEnvoyPtr,
    _filter_module: FilterModulePtr,
    _stream_id: u64,
    _reason: u32,
) {
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_scheduled(
    _filter_envoy: FilterEnvoyPtr,
    _filter_module: FilterModulePtr,
    _event_id: u64,
) {
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(
    _filter_envoy: FilterEnvoyPtr,
    _filter_module: FilterModulePtr,
) {
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(
    _filter_envoy: FilterEnvoyPtr,
    _filter_module: FilterModulePtr,
) {
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_per_route_config_new(
    _name: EnvoyBuffer,
    _config: EnvoyBuffer,
) -> *const c_void {
    // Per-route configuration is not used; null refuses one (Envoy reports
    // the route's configuration as invalid instead of running without it).
    log(Level::Warn, "tokentap: per-route configuration is not supported; configure the filter once per listener and use the route's `disable` to turn it off");
    null()
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_per_route_config_destroy(
    _config: *const c_void,
) {
}

/// The ABI version this library reports to Envoy.
pub fn abi_version() -> &'static str {
    "v0.1.0"
}
