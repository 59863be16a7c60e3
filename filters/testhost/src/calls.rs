//! The record of every host call the module made, with decoded arguments.

use crate::abi::{BufferType, LogLevel, MapType, MetricKind, Status, StreamType};
use crate::headers::Headers;

/// One host call, its arguments decoded from guest memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostCall {
    Log {
        level: LogLevel,
        message: String,
    },
    GetLogLevel,
    GetCurrentTime,
    SetTickPeriod {
        millis: u32,
    },
    GetBuffer {
        buffer: BufferType,
        start: u32,
        max_size: u32,
    },
    SetBuffer {
        buffer: BufferType,
        start: u32,
        size: u32,
        data: Vec<u8>,
    },
    GetHeaderMapPairs {
        map: MapType,
    },
    SetHeaderMapPairs {
        map: MapType,
        headers: Headers,
    },
    GetHeader {
        map: MapType,
        name: Vec<u8>,
    },
    AddHeader {
        map: MapType,
        name: Vec<u8>,
        value: Vec<u8>,
    },
    ReplaceHeader {
        map: MapType,
        name: Vec<u8>,
        value: Vec<u8>,
    },
    RemoveHeader {
        map: MapType,
        name: Vec<u8>,
    },
    /// Path segments (the ABI separates them with NUL bytes).
    GetProperty {
        path: Vec<String>,
    },
    SetProperty {
        path: Vec<String>,
        value: Vec<u8>,
    },
    GetSharedData {
        key: String,
    },
    SetSharedData {
        key: String,
        value: Vec<u8>,
        cas: u32,
    },
    RegisterSharedQueue {
        name: String,
    },
    ResolveSharedQueue {
        vm_id: String,
        name: String,
    },
    EnqueueSharedQueue {
        queue: u32,
        data: Vec<u8>,
    },
    DequeueSharedQueue {
        queue: u32,
    },
    DefineMetric {
        kind: Option<MetricKind>,
        name: String,
    },
    IncrementMetric {
        id: u32,
        offset: i64,
    },
    RecordMetric {
        id: u32,
        value: u64,
    },
    GetMetric {
        id: u32,
    },
    HttpCall {
        upstream: String,
        headers: Headers,
        body: Vec<u8>,
        trailers: Headers,
        timeout_ms: u32,
    },
    ContinueStream {
        stream: StreamType,
    },
    CloseStream {
        stream: StreamType,
    },
    SendLocalResponse {
        status: u32,
        details: String,
        body: Vec<u8>,
        headers: Headers,
        grpc_status: i32,
    },
    SetEffectiveContext {
        context_id: u32,
    },
    Done,
    CallForeignFunction {
        name: String,
    },
    /// A call whose pointers did not fit guest memory, or whose serialized
    /// argument did not parse.
    Invalid {
        function: &'static str,
    },
    Wasi(WasiCall),
    /// An import this host does not implement; it returned an error status.
    Unimplemented {
        module: String,
        name: String,
    },
}

/// WASI preview1 calls.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WasiCall {
    FdWrite { fd: u32, data: Vec<u8> },
    FdPrestatGet { fd: u32 },
    RandomGet { len: u32 },
    EnvironSizesGet,
    EnvironGet,
    ArgsSizesGet,
    ArgsGet,
    ClockTimeGet { clock_id: u32 },
    ClockResGet { clock_id: u32 },
    SchedYield,
    ProcExit { code: u32 },
}

/// A host call as it happened: in which context, and what it returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recorded {
    /// The effective context when the call was made (0: none, e.g. `_initialize`).
    pub context_id: u32,
    pub call: HostCall,
    pub status: Status,
}

impl HostCall {
    /// Calls that change what Envoy holds (stats, headers, bodies, filter
    /// state, shared data, responses), as opposed to reads.
    pub fn is_write(&self) -> bool {
        use HostCall as C;
        matches!(
            self,
            C::SetBuffer { .. }
                | C::SetHeaderMapPairs { .. }
                | C::AddHeader { .. }
                | C::ReplaceHeader { .. }
                | C::RemoveHeader { .. }
                | C::SetProperty { .. }
                | C::SetSharedData { .. }
                | C::EnqueueSharedQueue { .. }
                | C::DefineMetric { .. }
                | C::IncrementMetric { .. }
                | C::RecordMetric { .. }
                | C::HttpCall { .. }
                | C::ContinueStream { .. }
                | C::CloseStream { .. }
                | C::SendLocalResponse { .. }
        )
    }
}
