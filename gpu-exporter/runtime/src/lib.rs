//! Normalized inference-runtime metrics for gpu-exporter.
//!
//! The exporter hands this crate the pods on its node. It scrapes every runtime
//! pod (vLLM, SGLang, TGI, trtllm-serve, Triton with TensorRT-LLM) and
//! republishes one schema, `llm_runtime_*`. Every series carries `namespace`,
//! `pod`, `runtime` and the workload labels (`model`, `route_class`, `team`),
//! so one dashboard and one alert work for every runtime, and runtime
//! signals join the gateway's and the GPU's on the same labels. See
//! `docs/runtime-metrics.md`.

mod accumulate;
mod args;
mod collector;
pub mod discovery;
pub mod duration;
mod encoding;
pub mod exposition;
pub mod normalize;
pub mod parse;
mod schedule;

pub use accumulate::Accumulator;
pub use args::RuntimeArgs;
pub use collector::{RuntimeCollector, ScrapeError};
pub use discovery::{LabelSelector, SelectorError, Target, ENGINE_TYPE_LABEL};
pub use duration::{parse_duration, parse_positive_duration};
pub use encoding::RuntimeCollectorHandle;
pub use normalize::{
    normalize, normalize_exposition, normalize_with, CounterKind, GaugeKind, HistogramKind,
    NormHistogram, Normalized, Outcome, Runtime,
};
pub use parse::{ParseError, ParseLimits};
