//! proxy-wasm ABI 0.2.1 values, decoded so recorded calls read as words.

/// Result of a host call, as the module sees it (`WasmResult` in Envoy),
/// or a WASI errno for `wasi_snapshot_preview1` functions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok,
    NotFound,
    BadArgument,
    SerializationFailure,
    ParseFailure,
    InvalidMemoryAccess,
    Empty,
    CasMismatch,
    InternalFailure,
    Unimplemented,
    /// A WASI errno other than success.
    Errno(u16),
}

impl Status {
    /// The integer the module receives.
    pub fn code(self) -> u32 {
        match self {
            Status::Ok => 0,
            Status::NotFound => 1,
            Status::BadArgument => 2,
            Status::SerializationFailure => 3,
            Status::ParseFailure => 4,
            Status::InvalidMemoryAccess => 6,
            Status::Empty => 7,
            Status::CasMismatch => 8,
            Status::InternalFailure => 10,
            Status::Unimplemented => 12,
            Status::Errno(e) => u32::from(e),
        }
    }

    /// What an expected miss looks like (absent header, property, key).
    pub fn is_ok_or_not_found(self) -> bool {
        matches!(self, Status::Ok | Status::NotFound)
    }
}

/// WASI errno values the host answers with.
pub mod errno {
    pub const BADF: u16 = 8;
    pub const INVAL: u16 = 28;
    pub const NOSYS: u16 = 52;
}

/// What a stream callback tells the host to do with the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Continue,
    Pause,
    /// Any other value (Envoy treats it as an error).
    Other(u32),
}

impl From<u32> for Action {
    fn from(v: u32) -> Self {
        match v {
            0 => Action::Continue,
            1 => Action::Pause,
            v => Action::Other(v),
        }
    }
}

/// Log levels of `proxy_log`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
    Critical,
    Other(u32),
}

impl From<u32> for LogLevel {
    fn from(v: u32) -> Self {
        match v {
            0 => LogLevel::Trace,
            1 => LogLevel::Debug,
            2 => LogLevel::Info,
            3 => LogLevel::Warn,
            4 => LogLevel::Error,
            5 => LogLevel::Critical,
            v => LogLevel::Other(v),
        }
    }
}

/// Buffers the module can read (`proxy_get_buffer_bytes`) and write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BufferType {
    HttpRequestBody,
    HttpResponseBody,
    DownstreamData,
    UpstreamData,
    HttpCallResponseBody,
    GrpcReceiveBuffer,
    VmConfiguration,
    PluginConfiguration,
    CallData,
    Other(u32),
}

impl From<u32> for BufferType {
    fn from(v: u32) -> Self {
        match v {
            0 => BufferType::HttpRequestBody,
            1 => BufferType::HttpResponseBody,
            2 => BufferType::DownstreamData,
            3 => BufferType::UpstreamData,
            4 => BufferType::HttpCallResponseBody,
            5 => BufferType::GrpcReceiveBuffer,
            6 => BufferType::VmConfiguration,
            7 => BufferType::PluginConfiguration,
            8 => BufferType::CallData,
            v => BufferType::Other(v),
        }
    }
}

/// Header maps of `proxy_*_header_map_*`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapType {
    RequestHeaders,
    RequestTrailers,
    ResponseHeaders,
    ResponseTrailers,
    GrpcInitialMetadata,
    GrpcTrailingMetadata,
    HttpCallResponseHeaders,
    HttpCallResponseTrailers,
    Other(u32),
}

impl From<u32> for MapType {
    fn from(v: u32) -> Self {
        match v {
            0 => MapType::RequestHeaders,
            1 => MapType::RequestTrailers,
            2 => MapType::ResponseHeaders,
            3 => MapType::ResponseTrailers,
            4 => MapType::GrpcInitialMetadata,
            5 => MapType::GrpcTrailingMetadata,
            6 => MapType::HttpCallResponseHeaders,
            7 => MapType::HttpCallResponseTrailers,
            v => MapType::Other(v),
        }
    }
}

/// Streams of `proxy_continue_stream` / `proxy_close_stream`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamType {
    Request,
    Response,
    Downstream,
    Upstream,
    Other(u32),
}

impl From<u32> for StreamType {
    fn from(v: u32) -> Self {
        match v {
            0 => StreamType::Request,
            1 => StreamType::Response,
            2 => StreamType::Downstream,
            3 => StreamType::Upstream,
            v => StreamType::Other(v),
        }
    }
}

/// Envoy stat kinds of `proxy_define_metric`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

impl MetricKind {
    pub fn from_code(v: u32) -> Option<Self> {
        match v {
            0 => Some(MetricKind::Counter),
            1 => Some(MetricKind::Gauge),
            2 => Some(MetricKind::Histogram),
            _ => None,
        }
    }
}
