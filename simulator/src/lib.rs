//! `llm-sim`: an OpenAI-compatible server that behaves like a small vLLM
//! (continuous batching, paged KV cache, prefix caching, vLLM's metrics),
//! so tokentap's gateway filter, exporter and drills can be tested without
//! GPUs. See `docs/simulator.md`.

pub mod config;
pub mod engine;
pub mod metrics;
pub mod openai;
pub mod server;
pub mod supervisor;
pub mod tokens;
