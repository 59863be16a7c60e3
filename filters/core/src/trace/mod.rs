//! OpenTelemetry trace support: W3C trace context, sampling, span building and
//! OTLP/HTTP protobuf encoding, plus a bounded export batcher.
//!
//! Everything here is host-independent: time and randomness come in as
//! arguments (`now_ms`, a seeded [`IdGenerator`]), so the proxy-wasm shell
//! owns every host call and these pieces are tested with plain `cargo test`.
//!
//! The shell's flow per request:
//! 1. [`SpanContext::from_headers`] on the incoming `traceparent`/`tracestate`
//!    (an error just means "no parent").
//! 2. [`Sampler::start_span`] → [`SpanStart`]; inject
//!    [`SpanStart::traceparent`] (and `tracestate`) upstream, sampled or not.
//! 3. If sampled: fill a [`SpanRecord`] (keys in [`semconv`]), end it, and
//!    [`Batcher::push`] it.
//! 4. On each tick: [`Batcher::poll_flush`] → [`OtlpEncoder::encode`] →
//!    POST [`otlp::OTLP_TRACES_PATH`] → [`Batcher::on_export_result`].

pub mod batcher;
pub mod context;
pub mod ids;
pub mod otlp;
pub mod sampler;
pub mod semconv;
pub mod span;

pub use batcher::{
    Batch, BatchId, Batcher, BatcherConfig, BatcherConfigError, BatcherStats, DropReason,
    ExportResult, PushOutcome,
};
pub use context::{SpanContext, SpanId, TraceFlags, TraceId, TraceparentError};
pub use ids::{IdGenerator, XoshiroIdGenerator};
pub use otlp::OtlpEncoder;
pub use sampler::{InvalidRatio, Sampler, SpanStart};
pub use span::{
    AttrValue, Attribute, Resource, ResourceBuilder, SpanEvent, SpanKind, SpanRecord, SpanStatus,
};
