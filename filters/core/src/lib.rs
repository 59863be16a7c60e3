//! Host-independent logic of the tokentap gateway filter.
//!
//! Nothing in this crate depends on `proxy-wasm`: every host interaction goes
//! through the small traits in [`host`], so the whole request lifecycle is
//! exercised by plain `cargo test` on the build machine.

pub mod trace;
