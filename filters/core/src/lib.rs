//! Host-independent logic of the tokentap gateway filter.
//!
//! Nothing in this crate depends on `proxy-wasm`: every host interaction goes
//! through the small traits in [`host`], so the whole request lifecycle is
//! exercised by plain `cargo test` on the build machine.

pub mod config;
pub mod headers;
pub mod host;
pub mod inject;
pub mod json_scan;
pub mod labels;
pub mod lifecycle;
pub mod metrics;
pub mod openai;
pub mod rag;
pub mod request;
pub mod scan_bytes;
pub mod sse;
pub mod state;
#[cfg(test)]
pub(crate) mod testing;
pub mod trace;
pub mod tracer;
pub mod vocab;
