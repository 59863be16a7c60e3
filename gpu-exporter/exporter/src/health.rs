//! Bounded vocabularies for the exporter's own health metrics, so that
//! `llm_gpu_exporter_errors_total{collector,kind}` can never grow without
//! bound whatever a driver or an API server answers.

use std::fmt;

/// The independent parts of a collection pass. Each one can fail alone; the
/// others keep serving (node_exporter's per-collector pattern).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Collector {
    /// Device enumeration and readings through NVML.
    Nvml,
    /// The XID event thread (NVML event sets).
    XidEvents,
    /// GPU-to-container allocation from the kubelet PodResources API.
    PodResources,
    /// Pods on this node from the Kubernetes API (labels, container ids).
    KubePods,
    /// PID-to-pod attribution through `/proc/<pid>/cgroup`.
    ProcessCgroups,
}

impl Collector {
    pub const ALL: [Collector; 5] = [
        Collector::Nvml,
        Collector::XidEvents,
        Collector::PodResources,
        Collector::KubePods,
        Collector::ProcessCgroups,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Collector::Nvml => "nvml",
            Collector::XidEvents => "xid_events",
            Collector::PodResources => "podresources",
            Collector::KubePods => "kube_pods",
            Collector::ProcessCgroups => "process_cgroups",
        }
    }
}

/// Why a call failed, collapsed to a small fixed set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ErrorKind {
    /// The NVML shared library could not be loaded.
    LibraryNotFound,
    /// The library lacks an entry point (older driver, partial library).
    SymbolMissing,
    DriverNotLoaded,
    NoPermission,
    /// NVML_ERROR_GPU_IS_LOST: the GPU fell off the bus.
    GpuLost,
    Timeout,
    /// A socket or endpoint that is not there.
    NotFound,
    /// Connection refused/reset, TLS failure.
    Connect,
    /// The peer answered with an error status (gRPC status, HTTP 4xx/5xx).
    Status,
    /// The peer's answer could not be decoded.
    Decode,
    /// The watch's resourceVersion expired (HTTP 410 Gone); a re-list follows.
    Expired,
    Io,
    Unknown,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::LibraryNotFound => "library_not_found",
            ErrorKind::SymbolMissing => "symbol_missing",
            ErrorKind::DriverNotLoaded => "driver_not_loaded",
            ErrorKind::NoPermission => "no_permission",
            ErrorKind::GpuLost => "gpu_lost",
            ErrorKind::Timeout => "timeout",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Connect => "connect",
            ErrorKind::Status => "status",
            ErrorKind::Decode => "decode",
            ErrorKind::Expired => "expired",
            ErrorKind::Io => "io",
            ErrorKind::Unknown => "unknown",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for Collector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Outcome of one collector in one pass.
#[derive(Clone, Debug, PartialEq)]
pub struct CollectorStatus {
    pub success: bool,
    pub duration_seconds: f64,
}
