//! `/metrics` in vLLM's exposition: the families, names, help texts and
//! labels vLLM's V1 engine writes, filled from the simulated engine.

use crate::engine::{EngineConfig, EngineStats, FinishReason, Gauges};
use crate::metrics::{Exposition, Histogram};

use super::state::{lock, AppState};

/// One consistent reading of the engine, taken after advancing it to now.
struct EngineSnapshot {
    gauges: Gauges,
    stats: EngineStats,
    config: EngineConfig,
    total_blocks: u64,
}

/// Labels and timestamps every family shares.
struct Common<'a> {
    /// `model_name` (the first served model) and `engine`.
    labels: &'a [(&'a str, &'a str)],
    model: &'a str,
    /// `_created` value of every counter and histogram: process start.
    created: f64,
}

/// `/metrics` in vLLM's exposition.
pub fn render_metrics(state: &AppState) -> String {
    let snap = snapshot(state);
    let model = state.models.first().cloned().unwrap_or_default();
    let labels: &[(&str, &str)] = &[("model_name", model.as_str()), ("engine", "0")];
    let common = Common {
        labels,
        model: &model,
        created: state.start_unix,
    };
    let mut out = Exposition::new();
    out.gauge(
        "process_start_time_seconds",
        "Start time of the process since unix epoch in seconds.",
        &[(&[], state.start_unix)],
    );
    scheduler_gauges(&mut out, &common, &snap.gauges);
    token_counters(&mut out, &common, &snap.stats);
    request_success(&mut out, &common, &snap.stats);
    histograms(&mut out, &common, &snap.stats);
    cache_config_info(&mut out, &snap.config, snap.total_blocks);
    out.finish()
}

/// Advances the engine to now (delivering what that produced) and copies
/// what the exposition reads, so the engine lock is not held while writing.
fn snapshot(state: &AppState) -> EngineSnapshot {
    let now = state.now_us();
    let mut engine = lock(&state.engine);
    engine.advance(now);
    let events = engine.drain_events();
    let snap = EngineSnapshot {
        gauges: engine.gauges(),
        stats: engine.stats().clone(),
        config: engine.config().clone(),
        total_blocks: engine.total_blocks(),
    };
    drop(engine);
    state.dispatch(events);
    snap
}

fn scheduler_gauges(out: &mut Exposition, common: &Common<'_>, gauges: &Gauges) {
    let families = [
        (
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            gauges.running as f64,
        ),
        (
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            gauges.waiting as f64,
        ),
        (
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage.",
            gauges.kv_cache_usage,
        ),
    ];
    for (name, help, value) in families {
        out.gauge(name, help, &[(common.labels, value)]);
    }
}

fn token_counters(out: &mut Exposition, common: &Common<'_>, stats: &EngineStats) {
    let families = [
        (
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
            stats.prefix_cache_queries,
        ),
        (
            "vllm:prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens.",
            stats.prefix_cache_hits,
        ),
        (
            "vllm:num_preemptions",
            "Cumulative number of preemption from the engine.",
            stats.preemptions,
        ),
        (
            "vllm:prompt_tokens",
            "Number of prefill tokens processed.",
            stats.prompt_tokens,
        ),
        (
            "vllm:generation_tokens",
            "Number of generation tokens processed.",
            stats.generation_tokens,
        ),
    ];
    for (name, help, value) in families {
        out.counter(name, help, &[(common.labels, value as f64)], common.created);
    }
}

/// `vllm:request_success` with one series per `finished_reason`.
fn request_success(out: &mut Exposition, common: &Common<'_>, stats: &EngineStats) {
    let labels: Vec<[(&str, &str); 3]> = FinishReason::ALL
        .iter()
        .map(|r| {
            [
                ("model_name", common.model),
                ("engine", "0"),
                ("finished_reason", r.as_str()),
            ]
        })
        .collect();
    let samples: Vec<(&[(&str, &str)], f64)> = labels
        .iter()
        .zip(FinishReason::ALL)
        .map(|(l, r)| (&l[..], stats.success(r) as f64))
        .collect();
    out.counter(
        "vllm:request_success",
        "Count of successfully processed requests.",
        &samples,
        common.created,
    );
}

fn histograms(out: &mut Exposition, common: &Common<'_>, stats: &EngineStats) {
    let families: [(&str, &str, &Histogram); 13] = [
        (
            "vllm:request_prompt_tokens",
            "Number of prefill tokens processed.",
            &stats.request_prompt_tokens,
        ),
        (
            "vllm:request_generation_tokens",
            "Number of generation tokens processed.",
            &stats.request_generation_tokens,
        ),
        (
            "vllm:iteration_tokens_total",
            "Histogram of number of tokens per engine_step.",
            &stats.iteration_tokens,
        ),
        (
            "vllm:request_params_n",
            "Histogram of the n request parameter.",
            &stats.request_params_n,
        ),
        (
            "vllm:request_params_max_tokens",
            "Histogram of the max_tokens request parameter.",
            &stats.request_params_max_tokens,
        ),
        (
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            &stats.ttft,
        ),
        (
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            &stats.itl,
        ),
        (
            "vllm:request_time_per_output_token_seconds",
            "Histogram of time_per_output_token_seconds per request.",
            &stats.request_tpot,
        ),
        (
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            &stats.e2e,
        ),
        (
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            &stats.queue,
        ),
        (
            "vllm:request_inference_time_seconds",
            "Histogram of time spent in RUNNING phase for request.",
            &stats.inference,
        ),
        (
            "vllm:request_prefill_time_seconds",
            "Histogram of time spent in PREFILL phase for request.",
            &stats.prefill,
        ),
        (
            "vllm:request_decode_time_seconds",
            "Histogram of time spent in DECODE phase for request.",
            &stats.decode,
        ),
    ];
    for (name, help, histogram) in families {
        out.histogram(name, help, &[(common.labels, histogram)], common.created);
    }
}

/// vLLM's info-style gauge describing the KV cache.
fn cache_config_info(out: &mut Exposition, config: &EngineConfig, total_blocks: u64) {
    let block_size = config.block_size.to_string();
    let num_blocks = total_blocks.to_string();
    let prefix = if config.enable_prefix_caching {
        "True"
    } else {
        "False"
    };
    out.gauge(
        "vllm:cache_config_info",
        "Information of the LLMEngine CacheConfig",
        &[(
            &[
                ("block_size", block_size.as_str()),
                ("cache_dtype", "auto"),
                ("enable_prefix_caching", prefix),
                ("gpu_memory_utilization", "0.9"),
                ("num_cpu_blocks", "None"),
                ("num_gpu_blocks", num_blocks.as_str()),
                ("engine", "0"),
            ],
            1.0,
        )],
    );
}
