//! A proxy-wasm host for tests, on the `wasmi` interpreter.
//!
//! It loads a built proxy-wasm module (ABI 0.2.1, `wasm32-wasip1`), drives
//! Envoy's callbacks in Envoy's order, answers every import the way Envoy
//! does for the cases tests reach, and records each host call with its
//! decoded arguments and the status it returned. State the module changes
//! (stats, headers, bodies, filter state, shared data, outgoing calls) is
//! kept for assertions. Returned buffers are allocated through the module's
//! own `proxy_on_memory_allocate`, as Envoy does. Time is a test clock;
//! ticks fire as it advances. Imports the host does not implement are
//! recorded and refused with an error status, never trapped on silently.
//!
//! See docs/design.md (Testing) for what it models and what it does not.

mod abi;
mod calls;
mod env;
mod fallback;
mod guest;
mod headers;
mod host;
mod metrics;
mod state;
mod wasi;

use std::path::PathBuf;

pub use abi::{errno, Action, BufferType, LogLevel, MapType, MetricKind, Status, StreamType};
pub use calls::{HostCall, Recorded, WasiCall};
pub use headers::Headers;
pub use host::{implemented, Plugin, TestHost};
pub use metrics::{parse_stat_name, Metric, Metrics};
pub use state::{
    filter_state_key, property_key, HostState, HttpCall, HttpCallResponse, LocalResponse, LogLine,
    Property, Stream,
};

/// Why the host could not load or run the module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is missing: build it with `{build}` (`cargo xtask test` builds it before the tests)")]
    NotBuilt { path: PathBuf, build: String },
    #[error("cannot load the module: {0}")]
    Load(String),
    #[error("`{function}` trapped: {message}\n--- captured log ---\n{log}")]
    Trap {
        function: String,
        message: String,
        log: String,
    },
    #[error("no HTTP context {0}")]
    UnknownContext(u32),
    #[error("no pending HTTP call with token {0}")]
    UnknownToken(u32),
}

/// Path of the release `.wasm` of workspace package `package`, under
/// `$CARGO_TARGET_DIR` or the workspace's `target/`; an error naming the
/// build command if it has not been built.
pub fn release_module(package: &str) -> Result<PathBuf, Error> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    let file = format!("{}.wasm", package.replace('-', "_"));
    let path = target.join("wasm32-wasip1/release").join(file);
    if path.is_file() {
        return Ok(path);
    }
    Err(Error::NotBuilt {
        path,
        build: format!("cargo build -p {package} --target wasm32-wasip1 --release"),
    })
}
