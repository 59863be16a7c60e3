//! Maps each runtime's metrics onto tokentap's `llm_runtime_*` schema.
//!
//! The mapping is a table per runtime (see `docs/runtime-metrics.md`).
//! Values are summed over runtime-internal labels (`engine`, `tp_rank`,
//! `model_name`, ...); histograms keep the runtime's own buckets, converted to
//! seconds where the runtime reports milliseconds.

use std::collections::BTreeMap;

use crate::parse::{parse, Exposition, ParseError, ParseLimits, Sample};

/// The inference runtimes tokentap understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Runtime {
    Vllm,
    Sglang,
    Tgi,
    TrtllmServe,
    TritonTrtllm,
}

impl Runtime {
    pub const ALL: [Runtime; 5] = [
        Self::Vllm,
        Self::Sglang,
        Self::Tgi,
        Self::TrtllmServe,
        Self::TritonTrtllm,
    ];

    /// The `runtime` label value; also the value of the Gateway API
    /// Inference Extension pod label `inference.networking.k8s.io/engine-type`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Vllm => "vllm",
            Self::Sglang => "sglang",
            Self::Tgi => "tgi",
            Self::TrtllmServe => "trtllm-serve",
            Self::TritonTrtllm => "triton-tensorrt-llm",
        }
    }

    pub fn from_engine_type(value: &str) -> Option<Self> {
        let v = value.trim().to_ascii_lowercase();
        Self::ALL.into_iter().find(|r| r.as_str() == v)
    }

    /// Guesses the runtime from the metric names present.
    pub fn detect(samples: &[Sample]) -> Option<Self> {
        let prefixes = [
            ("vllm:", Self::Vllm),
            ("sglang:", Self::Sglang),
            ("tgi_", Self::Tgi),
            ("trtllm_", Self::TrtllmServe),
            ("nv_trt_llm_", Self::TritonTrtllm),
        ];
        prefixes
            .iter()
            .find(|(p, _)| samples.iter().any(|s| s.name.starts_with(p)))
            .map(|(_, r)| *r)
    }

    /// Default metrics path when the pod does not annotate one.
    pub fn default_path(self) -> &'static str {
        match self {
            Self::TrtllmServe => "/prometheus/metrics",
            _ => "/metrics",
        }
    }

    /// Default metrics port when the pod declares none (Triton serves
    /// metrics on its own port).
    pub fn default_port(self) -> Option<u16> {
        match self {
            Self::TritonTrtllm => Some(8002),
            _ => None,
        }
    }
}

/// Normalized gauges.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum GaugeKind {
    RequestsRunning,
    RequestsWaiting,
    BatchSize,
    KvCacheUsageRatio,
}

impl GaugeKind {
    pub const ALL: [GaugeKind; 4] = [
        Self::RequestsRunning,
        Self::RequestsWaiting,
        Self::BatchSize,
        Self::KvCacheUsageRatio,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::RequestsRunning => "llm_runtime_requests_running",
            Self::RequestsWaiting => "llm_runtime_requests_waiting",
            Self::BatchSize => "llm_runtime_batch_size",
            Self::KvCacheUsageRatio => "llm_runtime_kv_cache_usage_ratio",
        }
    }

    pub fn help(self) -> &'static str {
        match self {
            Self::RequestsRunning => "Requests the runtime is executing (in its running batch).",
            Self::RequestsWaiting => "Requests queued in the runtime, not yet scheduled.",
            Self::BatchSize => "Sequences in the runtime's current batch.",
            Self::KvCacheUsageRatio => "Fraction of the KV cache in use (0-1).",
        }
    }
}

/// Normalized counters (exported with `_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CounterKind {
    PromptTokens,
    GenerationTokens,
    Preemptions,
    PrefixCacheHitTokens,
    PrefixCacheQueryTokens,
}

impl CounterKind {
    pub const ALL: [CounterKind; 5] = [
        Self::PromptTokens,
        Self::GenerationTokens,
        Self::Preemptions,
        Self::PrefixCacheHitTokens,
        Self::PrefixCacheQueryTokens,
    ];

    /// Family name without `_total`.
    pub fn name(self) -> &'static str {
        match self {
            Self::PromptTokens => "llm_runtime_prompt_tokens",
            Self::GenerationTokens => "llm_runtime_generation_tokens",
            Self::Preemptions => "llm_runtime_preemptions",
            Self::PrefixCacheHitTokens => "llm_runtime_prefix_cache_hit_tokens",
            Self::PrefixCacheQueryTokens => "llm_runtime_prefix_cache_query_tokens",
        }
    }

    pub fn help(self) -> &'static str {
        match self {
            Self::PromptTokens => "Prompt (prefill) tokens processed.",
            Self::GenerationTokens => "Output tokens generated.",
            Self::Preemptions => "Sequences preempted by the scheduler (KV-cache pressure).",
            Self::PrefixCacheHitTokens => "Prompt tokens served from the prefix cache.",
            Self::PrefixCacheQueryTokens => "Prompt tokens looked up in the prefix cache.",
        }
    }
}

/// The `outcome` label of `llm_runtime_requests_total`: a small fixed set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Outcome {
    /// Finished at a stop condition (EOS or stop string).
    Stop,
    /// Finished at the `max_tokens` limit.
    Length,
    /// Finished successfully; the runtime does not say why.
    Success,
    /// Cancelled (client went away, aborted).
    Abort,
    /// Failed inside the runtime.
    Error,
}

impl Outcome {
    pub const ALL: [Outcome; 5] = [
        Self::Stop,
        Self::Length,
        Self::Success,
        Self::Abort,
        Self::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::Success => "success",
            Self::Abort => "abort",
            Self::Error => "error",
        }
    }

    /// vLLM / trtllm-serve `finished_reason` values.
    fn from_finished_reason(v: &str) -> Self {
        match v {
            "stop" => Self::Stop,
            "length" => Self::Length,
            "abort" | "cancelled" => Self::Abort,
            "error" => Self::Error,
            _ => Self::Success,
        }
    }
}

/// Normalized histograms (seconds).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HistogramKind {
    TimeToFirstToken,
    InterTokenLatency,
    QueueTime,
    E2eLatency,
}

impl HistogramKind {
    pub const ALL: [HistogramKind; 4] = [
        Self::TimeToFirstToken,
        Self::InterTokenLatency,
        Self::QueueTime,
        Self::E2eLatency,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::TimeToFirstToken => "llm_runtime_time_to_first_token_seconds",
            Self::InterTokenLatency => "llm_runtime_inter_token_latency_seconds",
            Self::QueueTime => "llm_runtime_queue_time_seconds",
            Self::E2eLatency => "llm_runtime_e2e_request_latency_seconds",
        }
    }

    pub fn help(self) -> &'static str {
        match self {
            Self::TimeToFirstToken => {
                "Time to first token measured by the runtime (runtime-native buckets)."
            }
            Self::InterTokenLatency => {
                "Time between output tokens measured by the runtime (runtime-native buckets)."
            }
            Self::QueueTime => {
                "Time requests spent queued in the runtime (runtime-native buckets)."
            }
            Self::E2eLatency => {
                "End-to-end request latency measured by the runtime (runtime-native buckets)."
            }
        }
    }
}

/// A cumulative histogram: `(upper bound, cumulative count)` ascending,
/// ending with `+Inf`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NormHistogram {
    pub buckets: Vec<(f64, f64)>,
    pub sum: f64,
    pub count: f64,
}

/// One runtime's metrics in the normalized schema.
#[derive(Clone, Debug, PartialEq)]
pub struct Normalized {
    pub runtime: Runtime,
    pub gauges: BTreeMap<GaugeKind, f64>,
    pub counters: BTreeMap<CounterKind, f64>,
    pub outcomes: BTreeMap<Outcome, f64>,
    pub histograms: BTreeMap<HistogramKind, NormHistogram>,
    /// `process_start_time_seconds` when the runtime exposes it; a change
    /// means the process restarted.
    pub process_start_time_seconds: Option<f64>,
    pub malformed_lines: u64,
}

/// Parses and normalizes with default limits. `runtime_hint` (from the pod
/// label) wins over detection from metric names.
///
/// ```
/// use tokentap_runtime_metrics::{normalize, CounterKind, GaugeKind, Runtime};
///
/// let vllm = "vllm:num_requests_waiting{model_name=\"m\"} 3\n\
///             vllm:generation_tokens_total{model_name=\"m\"} 1200\n";
/// let n = normalize(vllm, None).unwrap();
/// assert_eq!(n.runtime, Runtime::Vllm);
/// assert_eq!(n.gauges[&GaugeKind::RequestsWaiting], 3.0);
/// assert_eq!(n.counters[&CounterKind::GenerationTokens], 1200.0);
/// ```
pub fn normalize(text: &str, runtime_hint: Option<Runtime>) -> Result<Normalized, ParseError> {
    normalize_with(text, runtime_hint, &ParseLimits::default())
}

/// [`normalize`] with explicit limits.
pub fn normalize_with(
    text: &str,
    runtime_hint: Option<Runtime>,
    limits: &ParseLimits,
) -> Result<Normalized, ParseError> {
    let exp = parse(text, limits)?;
    normalize_exposition(&exp, runtime_hint).ok_or(ParseError::UnknownRuntime)
}

/// Label filter on a source series.
type Filter = Option<(&'static str, &'static str)>;

struct View<'a> {
    samples: &'a [Sample],
    /// Triton: only series of this `model` (the TRT-LLM backend model).
    model_filter: Option<String>,
}

fn base_name(name: &str) -> &str {
    name.strip_suffix("_total").unwrap_or(name)
}

impl View<'_> {
    fn matching<'s>(
        &'s self,
        name: &'s str,
        filter: Filter,
    ) -> impl Iterator<Item = &'s Sample> + 's {
        self.samples.iter().filter(move |s| {
            s.name == name
                && filter.is_none_or(|(k, v)| s.label(k) == Some(v))
                && self
                    .model_filter
                    .as_deref()
                    .is_none_or(|m| s.label("model").is_none_or(|sm| sm == m))
        })
    }

    /// Sum of a gauge (or any non-counter sample) over internal labels.
    fn sum(&self, name: &str, filter: Filter) -> Option<f64> {
        let mut any = false;
        let total = self
            .matching(name, filter)
            .filter(|s| s.value.is_finite())
            .inspect(|_| any = true)
            .map(|s| s.value)
            .sum();
        any.then_some(total)
    }

    /// Mean over internal labels, for ratios (each engine has its own cache).
    fn mean(&self, name: &str, filter: Filter) -> Option<f64> {
        let values: Vec<f64> = self
            .matching(name, filter)
            .map(|s| s.value)
            .filter(|v| v.is_finite())
            .collect();
        (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
    }

    /// Sum of a counter whose name may or may not end in `_total`.
    fn counter(&self, base: &str, filter: Filter) -> Option<f64> {
        let mut any = false;
        let total = self
            .samples
            .iter()
            .filter(|s| !s.name.ends_with("_created") && base_name(&s.name) == base)
            .filter(|s| filter.is_none_or(|(k, v)| s.label(k) == Some(v)))
            .filter(|s| {
                self.model_filter
                    .as_deref()
                    .is_none_or(|m| s.label("model").is_none_or(|sm| sm == m))
            })
            .filter(|s| s.value.is_finite())
            .inspect(|_| any = true)
            .map(|s| s.value)
            .sum();
        any.then_some(total)
    }

    /// A histogram summed over internal labels; `scale` converts to seconds.
    fn histogram(&self, base: &str, scale: f64) -> Option<NormHistogram> {
        let bucket_name = format!("{base}_bucket");
        let mut by_le: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
        for s in self.matching(&bucket_name, None) {
            let Some(le) = s.label("le").and_then(|v| {
                if v == "+Inf" {
                    Some(f64::INFINITY)
                } else {
                    v.parse::<f64>().ok()
                }
            }) else {
                continue;
            };
            if le.is_nan() || !s.value.is_finite() {
                continue;
            }
            let bound = if le.is_infinite() { le } else { le * scale };
            let key = order_key(bound);
            let entry = by_le.entry(key).or_insert((bound, 0.0));
            entry.1 += s.value;
        }
        if by_le.is_empty() {
            return None;
        }
        let mut buckets: Vec<(f64, f64)> = by_le.into_values().collect();
        if buckets.last().is_none_or(|(b, _)| b.is_finite()) {
            let total = self
                .sum(&format!("{base}_count"), None)
                .unwrap_or_else(|| buckets.last().map(|(_, c)| *c).unwrap_or(0.0));
            buckets.push((f64::INFINITY, total));
        }
        let count = self
            .sum(&format!("{base}_count"), None)
            .unwrap_or_else(|| buckets.last().map(|(_, c)| *c).unwrap_or(0.0));
        let sum = self.sum(&format!("{base}_sum"), None).unwrap_or(0.0) * scale;
        Some(NormHistogram {
            buckets,
            sum,
            count,
        })
    }
}

/// A total order key for non-NaN floats (positive bounds sort correctly).
fn order_key(v: f64) -> u64 {
    let bits = v.to_bits();
    if v.is_sign_negative() {
        !bits
    } else {
        bits | (1 << 63)
    }
}

/// Where one normalized value comes from.
enum Rule {
    Gauge(GaugeKind, &'static str, Filter),
    Counter(CounterKind, &'static str, Filter),
    /// A histogram's `_sum` used as a counter (TGI/Triton token counts).
    CounterFromSum(CounterKind, &'static str),
    Histogram(HistogramKind, &'static str, f64),
}

fn rules(runtime: Runtime) -> &'static [Rule] {
    use CounterKind as C;
    use GaugeKind as G;
    use HistogramKind as H;
    match runtime {
        Runtime::Vllm => &[
            Rule::Gauge(G::RequestsRunning, "vllm:num_requests_running", None),
            Rule::Gauge(G::BatchSize, "vllm:num_requests_running", None),
            Rule::Gauge(G::RequestsWaiting, "vllm:num_requests_waiting", None),
            Rule::Gauge(G::KvCacheUsageRatio, "vllm:kv_cache_usage_perc", None),
            Rule::Gauge(G::KvCacheUsageRatio, "vllm:gpu_cache_usage_perc", None),
            Rule::Counter(C::PromptTokens, "vllm:prompt_tokens", None),
            Rule::Counter(C::GenerationTokens, "vllm:generation_tokens", None),
            Rule::Counter(C::Preemptions, "vllm:num_preemptions", None),
            Rule::Counter(C::PrefixCacheHitTokens, "vllm:prefix_cache_hits", None),
            Rule::Counter(C::PrefixCacheQueryTokens, "vllm:prefix_cache_queries", None),
            Rule::Histogram(H::TimeToFirstToken, "vllm:time_to_first_token_seconds", 1.0),
            Rule::Histogram(
                H::InterTokenLatency,
                "vllm:inter_token_latency_seconds",
                1.0,
            ),
            Rule::Histogram(
                H::InterTokenLatency,
                "vllm:time_per_output_token_seconds",
                1.0,
            ),
            Rule::Histogram(H::QueueTime, "vllm:request_queue_time_seconds", 1.0),
            Rule::Histogram(H::E2eLatency, "vllm:e2e_request_latency_seconds", 1.0),
        ],
        Runtime::Sglang => &[
            Rule::Gauge(G::RequestsRunning, "sglang:num_running_reqs", None),
            Rule::Gauge(G::BatchSize, "sglang:num_running_reqs", None),
            Rule::Gauge(G::RequestsWaiting, "sglang:num_queue_reqs", None),
            Rule::Gauge(G::KvCacheUsageRatio, "sglang:token_usage", None),
            Rule::Counter(C::PromptTokens, "sglang:prompt_tokens", None),
            Rule::Counter(C::GenerationTokens, "sglang:generation_tokens", None),
            Rule::Counter(C::PrefixCacheHitTokens, "sglang:cached_tokens", None),
            Rule::Counter(C::PrefixCacheQueryTokens, "sglang:prompt_tokens", None),
            Rule::Histogram(
                H::TimeToFirstToken,
                "sglang:time_to_first_token_seconds",
                1.0,
            ),
            Rule::Histogram(
                H::InterTokenLatency,
                "sglang:inter_token_latency_seconds",
                1.0,
            ),
            Rule::Histogram(H::QueueTime, "sglang:queue_time_seconds", 1.0),
            Rule::Histogram(H::E2eLatency, "sglang:e2e_request_latency_seconds", 1.0),
        ],
        Runtime::Tgi => &[
            Rule::Gauge(G::RequestsRunning, "tgi_batch_current_size", None),
            Rule::Gauge(G::BatchSize, "tgi_batch_current_size", None),
            Rule::Gauge(G::RequestsWaiting, "tgi_queue_size", None),
            Rule::CounterFromSum(C::PromptTokens, "tgi_request_input_length"),
            Rule::CounterFromSum(C::GenerationTokens, "tgi_request_generated_tokens"),
            Rule::Histogram(
                H::InterTokenLatency,
                "tgi_request_mean_time_per_token_duration",
                1.0,
            ),
            Rule::Histogram(H::QueueTime, "tgi_request_queue_duration", 1.0),
            Rule::Histogram(H::E2eLatency, "tgi_request_duration", 1.0),
        ],
        Runtime::TrtllmServe => &[
            Rule::Gauge(G::RequestsRunning, "trtllm_num_requests_running", None),
            Rule::Gauge(G::RequestsWaiting, "trtllm_num_requests_waiting", None),
            Rule::Gauge(G::BatchSize, "trtllm_scheduled_batch_size", None),
            Rule::Gauge(G::BatchSize, "trtllm_num_requests_running", None),
            Rule::Gauge(G::KvCacheUsageRatio, "trtllm_kv_cache_utilization", None),
            Rule::Counter(C::PromptTokens, "trtllm_prompt_tokens", None),
            Rule::Counter(C::GenerationTokens, "trtllm_generation_tokens", None),
            Rule::Histogram(
                H::TimeToFirstToken,
                "trtllm_time_to_first_token_seconds",
                1.0,
            ),
            Rule::Histogram(
                H::InterTokenLatency,
                "trtllm_time_per_output_token_seconds",
                1.0,
            ),
            Rule::Histogram(H::QueueTime, "trtllm_request_queue_time_seconds", 1.0),
            Rule::Histogram(H::E2eLatency, "trtllm_e2e_request_latency_seconds", 1.0),
        ],
        Runtime::TritonTrtllm => &[
            Rule::Gauge(
                G::RequestsRunning,
                "nv_trt_llm_request_metrics",
                Some(("request_type", "active")),
            ),
            Rule::Gauge(
                G::RequestsWaiting,
                "nv_trt_llm_request_metrics",
                Some(("request_type", "waiting")),
            ),
            Rule::Gauge(
                G::BatchSize,
                "nv_trt_llm_request_metrics",
                Some(("request_type", "scheduled")),
            ),
            Rule::Gauge(
                G::KvCacheUsageRatio,
                "nv_trt_llm_kv_cache_block_metrics",
                Some(("kv_cache_block_type", "fraction")),
            ),
            Rule::CounterFromSum(C::PromptTokens, "nv_llm_input_token_len"),
            Rule::CounterFromSum(C::GenerationTokens, "nv_llm_output_token_len"),
            Rule::Histogram(
                H::TimeToFirstToken,
                "nv_inference_first_response_histogram_ms",
                0.001,
            ),
        ],
    }
}

fn outcomes(runtime: Runtime, view: &View<'_>) -> BTreeMap<Outcome, f64> {
    let mut out = BTreeMap::new();
    let mut add = |o: Outcome, v: f64| *out.entry(o).or_insert(0.0) += v;
    match runtime {
        Runtime::Vllm | Runtime::TrtllmServe => {
            let base = if runtime == Runtime::Vllm {
                "vllm:request_success"
            } else {
                "trtllm_request_success"
            };
            for s in view.samples.iter().filter(|s| {
                !s.name.ends_with("_created") && base_name(&s.name) == base && s.value.is_finite()
            }) {
                let reason = s.label("finished_reason").unwrap_or("");
                add(Outcome::from_finished_reason(reason), s.value);
            }
            if runtime == Runtime::TrtllmServe {
                if let Some(e) = view.counter("trtllm_request_error", None) {
                    add(Outcome::Error, e);
                }
            }
        }
        Runtime::Sglang => {
            let total = view.counter("sglang:num_requests", None);
            let aborted = view
                .counter("sglang:num_aborted_requests", None)
                .unwrap_or(0.0);
            if let Some(total) = total {
                add(Outcome::Success, (total - aborted).max(0.0));
                add(Outcome::Abort, aborted);
            }
        }
        Runtime::Tgi => {
            if let Some(v) = view.counter("tgi_request_success", None) {
                add(Outcome::Success, v);
            }
            if let Some(v) = view.counter("tgi_request_failure", None) {
                add(Outcome::Error, v);
            }
        }
        Runtime::TritonTrtllm => {
            if let Some(v) = view.counter("nv_inference_request_success", None) {
                add(Outcome::Success, v);
            }
            if let Some(v) = view.counter("nv_inference_request_failure", None) {
                add(Outcome::Error, v);
            }
        }
    }
    out
}

/// Normalizes an already parsed body.
pub fn normalize_exposition(exp: &Exposition, runtime_hint: Option<Runtime>) -> Option<Normalized> {
    let runtime = runtime_hint.or_else(|| Runtime::detect(&exp.samples))?;
    let model_filter = if runtime == Runtime::TritonTrtllm {
        exp.samples
            .iter()
            .find(|s| s.name == "nv_trt_llm_request_metrics")
            .and_then(|s| s.label("model"))
            .map(str::to_string)
    } else {
        None
    };
    let view = View {
        samples: &exp.samples,
        model_filter,
    };
    let mut n = Normalized {
        runtime,
        gauges: BTreeMap::new(),
        counters: BTreeMap::new(),
        outcomes: outcomes(runtime, &view),
        histograms: BTreeMap::new(),
        process_start_time_seconds: view
            .sum("process_start_time_seconds", None)
            .filter(|v| *v > 0.0),
        malformed_lines: exp.malformed_lines,
    };
    // The first rule that finds data wins for each normalized metric.
    for rule in rules(runtime) {
        match rule {
            Rule::Gauge(kind, name, filter) => {
                if !n.gauges.contains_key(kind) {
                    let value = if *kind == GaugeKind::KvCacheUsageRatio {
                        view.mean(name, *filter)
                    } else {
                        view.sum(name, *filter)
                    };
                    if let Some(v) = value {
                        n.gauges.insert(*kind, v);
                    }
                }
            }
            Rule::Counter(kind, name, filter) => {
                if !n.counters.contains_key(kind) {
                    if let Some(v) = view.counter(name, *filter) {
                        n.counters.insert(*kind, v);
                    }
                }
            }
            Rule::CounterFromSum(kind, name) => {
                if !n.counters.contains_key(kind) {
                    if let Some(v) = view.sum(&format!("{name}_sum"), None) {
                        n.counters.insert(*kind, v);
                    }
                }
            }
            Rule::Histogram(kind, name, scale) => {
                if !n.histograms.contains_key(kind) {
                    if let Some(h) = view.histogram(name, *scale) {
                        n.histograms.insert(*kind, h);
                    }
                }
            }
        }
    }
    if runtime == Runtime::TritonTrtllm && !n.gauges.contains_key(&GaugeKind::KvCacheUsageRatio) {
        let used = view.sum(
            "nv_trt_llm_kv_cache_block_metrics",
            Some(("kv_cache_block_type", "used")),
        );
        let max = view.sum(
            "nv_trt_llm_kv_cache_block_metrics",
            Some(("kv_cache_block_type", "max")),
        );
        if let (Some(used), Some(max)) = (used, max) {
            if max > 0.0 {
                n.gauges.insert(GaugeKind::KvCacheUsageRatio, used / max);
            }
        }
    }
    Some(n)
}
