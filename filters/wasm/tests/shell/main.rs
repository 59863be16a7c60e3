//! Tests of the built `tokentap_filter.wasm` itself: the module runs in a
//! proxy-wasm test host (`tokentap-testhost`, on wasmi) that records what it
//! asks of Envoy. Build the module first:
//! `cargo build -p tokentap-filter --target wasm32-wasip1 --release`
//! (`cargo xtask test` does). The e2e suites in tests/e2e run the same
//! module in real Envoy.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
mod configure;
mod filter_state;
mod host;
mod malformed;
mod metrics;
mod passthrough;
mod tracing;
