//! proxy-wasm shell around `tokentap-core`.
