//! Command line, and the part of it the admin API can change at run time.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::engine::{EngineConfig, LatencyModel};

/// `llm-sim` flags. Every flag can also be set through its `LLM_SIM_*`
/// environment variable so Kubernetes manifests need no argument lists.
#[derive(clap::Parser, Clone, Debug)]
#[command(
    name = "llm-sim",
    version,
    about = "OpenAI-compatible, vLLM-like simulated inference server"
)]
pub struct Args {
    /// Address to listen on; port 0 picks a free port (printed when ready).
    #[arg(long, env = "LLM_SIM_LISTEN", default_value = "127.0.0.1:8000")]
    pub listen: SocketAddr,
    /// Served model name(s); repeat or separate with commas. The first is
    /// the `model_name` label of the metrics.
    #[arg(
        long = "model",
        env = "LLM_SIM_MODEL",
        value_delimiter = ',',
        default_value = "mistral-7b"
    )]
    pub models: Vec<String>,
    /// Base prefill time (time to first token with an empty queue).
    #[arg(long, env = "LLM_SIM_TTFT_MS", default_value_t = 50.0)]
    pub ttft_ms: f64,
    /// Extra prefill time per uncached prompt token.
    #[arg(long, env = "LLM_SIM_PREFILL_MS_PER_TOKEN", default_value_t = 0.0)]
    pub prefill_ms_per_token: f64,
    /// Base inter-token latency.
    #[arg(long, env = "LLM_SIM_ITL_MS", default_value_t = 10.0)]
    pub itl_ms: f64,
    /// Extra inter-token latency per other running sequence.
    #[arg(long, env = "LLM_SIM_ITL_MS_PER_SEQ", default_value_t = 0.0)]
    pub itl_ms_per_seq: f64,
    /// Multiplies every latency (drill: slow mode).
    #[arg(long, env = "LLM_SIM_SLOW_FACTOR", default_value_t = 1.0)]
    pub slow_factor: f64,
    /// Largest running batch.
    #[arg(long, env = "LLM_SIM_MAX_NUM_SEQS", default_value_t = 8)]
    pub max_num_seqs: usize,
    /// KV-cache capacity in tokens.
    #[arg(long, env = "LLM_SIM_KV_CACHE_TOKENS", default_value_t = 65_536)]
    pub kv_cache_tokens: u64,
    /// Tokens per KV-cache block.
    #[arg(long, env = "LLM_SIM_BLOCK_SIZE", default_value_t = 16)]
    pub block_size: u64,
    /// Longest prompt + output accepted (also bounds the token histograms).
    #[arg(long, env = "LLM_SIM_MAX_MODEL_LEN", default_value_t = 32_768)]
    pub max_model_len: u32,
    /// Disable prefix caching.
    #[arg(long, env = "LLM_SIM_NO_PREFIX_CACHING")]
    pub no_prefix_caching: bool,
    /// Output tokens when the request sets no `max_tokens`.
    #[arg(long, env = "LLM_SIM_DEFAULT_OUTPUT_TOKENS", default_value_t = 16)]
    pub default_output_tokens: u32,
    /// Always include `usage.prompt_tokens_details`.
    #[arg(long, env = "LLM_SIM_ENABLE_PROMPT_TOKENS_DETAILS", default_value_t = true, action = clap::ArgAction::Set)]
    pub enable_prompt_tokens_details: bool,
    /// Seed of generated text and of error/reset injection.
    #[arg(long, env = "LLM_SIM_SEED", default_value_t = 1)]
    pub seed: u64,
    /// Fraction of requests answered 500/503 with an OpenAI-style error.
    #[arg(long, env = "LLM_SIM_ERROR_RATE", default_value_t = 0.0)]
    pub error_rate: f64,
    /// Fraction of streams reset mid-stream.
    #[arg(long, env = "LLM_SIM_RESET_RATE", default_value_t = 0.0)]
    pub reset_rate: f64,
    /// Dimension of `/v1/embeddings` vectors.
    #[arg(long, env = "LLM_SIM_EMBEDDING_DIM", default_value_t = 16)]
    pub embedding_dim: usize,
    /// `/health` answers 503 for this long after start.
    #[arg(long, env = "LLM_SIM_STARTUP_DELAY_MS", default_value_t = 0)]
    pub startup_delay_ms: u64,
    /// On SIGTERM, how long to let in-flight requests finish.
    #[arg(long, env = "LLM_SIM_DRAIN_TIMEOUT_MS", default_value_t = 2_000)]
    pub drain_timeout_ms: u64,
    /// RAG: retrieval time reported and waited before answering.
    #[arg(long, env = "LLM_SIM_RAG_RETRIEVAL_MS", default_value_t = 12.5)]
    pub rag_retrieval_ms: f64,
    /// RAG: top similarity score reported.
    #[arg(long, env = "LLM_SIM_RAG_TOP_SCORE", default_value_t = 0.87)]
    pub rag_top_score: f64,
    /// RAG: evaluation is `fail` below this score.
    #[arg(long, env = "LLM_SIM_RAG_MIN_SCORE", default_value_t = 0.5)]
    pub rag_min_score: f64,
    /// RAG: reported index age.
    #[arg(long, env = "LLM_SIM_RAG_INDEX_AGE_SECONDS", default_value_t = 3600.0)]
    pub rag_index_age_seconds: f64,
    /// RAG: start with the vector store unreachable.
    #[arg(long, env = "LLM_SIM_RAG_VECTOR_STORE_DOWN")]
    pub rag_vector_store_down: bool,
    /// Run as a supervisor that restarts the server whenever it exits.
    #[arg(long, env = "LLM_SIM_SUPERVISE")]
    pub supervise: bool,
    /// Supervisor: pause before respawning the server.
    #[arg(long, env = "LLM_SIM_RESTART_DELAY_MS", default_value_t = 500)]
    pub restart_delay_ms: u64,
    /// Log as JSON lines instead of text.
    #[arg(long, env = "LLM_SIM_LOG_JSON")]
    pub log_json: bool,
}

impl Args {
    pub fn engine_config(&self) -> EngineConfig {
        EngineConfig {
            max_num_seqs: self.max_num_seqs,
            kv_cache_tokens: self.kv_cache_tokens,
            block_size: self.block_size,
            enable_prefix_caching: !self.no_prefix_caching,
            prefix_cache_entries: 1024,
            max_model_len: self.max_model_len,
        }
    }

    pub fn runtime_config(&self) -> RuntimeConfig {
        RuntimeConfig {
            slow_factor: self.slow_factor,
            error_rate: self.error_rate,
            reset_rate: self.reset_rate,
            ttft_ms: self.ttft_ms,
            prefill_ms_per_token: self.prefill_ms_per_token,
            itl_ms: self.itl_ms,
            itl_ms_per_seq: self.itl_ms_per_seq,
            rag_vector_store_down: self.rag_vector_store_down,
            rag_index_age_seconds: self.rag_index_age_seconds,
            rag_retrieval_ms: self.rag_retrieval_ms,
            rag_top_score: self.rag_top_score,
            rag_min_score: self.rag_min_score,
        }
    }

    /// Model names, split on commas and trimmed, without empties.
    pub fn served_models(&self) -> Vec<String> {
        let v: Vec<String> = self
            .models
            .iter()
            .flat_map(|m| m.split(','))
            .map(|m| m.trim().to_string())
            .filter(|m| !m.is_empty())
            .collect();
        if v.is_empty() {
            vec!["mistral-7b".to_string()]
        } else {
            v
        }
    }
}

/// Settings the drills change while the server runs (`/admin/config`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RuntimeConfig {
    pub slow_factor: f64,
    pub error_rate: f64,
    pub reset_rate: f64,
    pub ttft_ms: f64,
    pub prefill_ms_per_token: f64,
    pub itl_ms: f64,
    pub itl_ms_per_seq: f64,
    pub rag_vector_store_down: bool,
    pub rag_index_age_seconds: f64,
    pub rag_retrieval_ms: f64,
    pub rag_top_score: f64,
    pub rag_min_score: f64,
}

/// Why an admin update was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("body is not a JSON object: {0}")]
    NotJson(String),
    #[error("unknown field `{0}`")]
    UnknownField(String),
    #[error("field `{field}` must be {expected}")]
    BadValue {
        field: String,
        expected: &'static str,
    },
}

impl RuntimeConfig {
    pub fn latency(&self) -> LatencyModel {
        LatencyModel {
            ttft_ms: self.ttft_ms,
            prefill_ms_per_token: self.prefill_ms_per_token,
            itl_ms: self.itl_ms,
            itl_ms_per_seq: self.itl_ms_per_seq,
            slow_factor: self.slow_factor,
        }
    }

    /// Applies a partial update; nothing changes when any field is invalid.
    ///
    /// ```
    /// use clap::Parser;
    /// use tokentap_llm_sim::config::Args;
    ///
    /// let args = Args::parse_from(["llm-sim", "--ttft-ms", "80"]);
    /// let runtime = args.runtime_config();
    /// let slow = runtime.merge_json(br#"{"slow_factor": 3}"#).expect("valid update");
    /// assert_eq!((slow.slow_factor, slow.ttft_ms), (3.0, 80.0));
    ///
    /// let refused = runtime.merge_json(br#"{"error_rate": 2}"#).unwrap_err();
    /// assert_eq!(refused.to_string(), "field `error_rate` must be a number in [0, 1]");
    /// ```
    pub fn merge_json(&self, body: &[u8]) -> Result<RuntimeConfig, ConfigError> {
        let value: serde_json::Value =
            serde_json::from_slice(body).map_err(|e| ConfigError::NotJson(e.to_string()))?;
        let obj = value
            .as_object()
            .ok_or_else(|| ConfigError::NotJson("expected an object".into()))?;
        let mut next = self.clone();
        for (key, v) in obj {
            let num = |expected: &'static str, min: f64, max: f64| -> Result<f64, ConfigError> {
                v.as_f64()
                    .filter(|x| x.is_finite() && *x >= min && *x <= max)
                    .ok_or_else(|| ConfigError::BadValue {
                        field: key.clone(),
                        expected,
                    })
            };
            match key.as_str() {
                "slow_factor" => next.slow_factor = num("a number in [0, 1000]", 0.0, 1000.0)?,
                "error_rate" => next.error_rate = num("a number in [0, 1]", 0.0, 1.0)?,
                "reset_rate" => next.reset_rate = num("a number in [0, 1]", 0.0, 1.0)?,
                "ttft_ms" => next.ttft_ms = num("a number of ms >= 0", 0.0, 3.6e6)?,
                "prefill_ms_per_token" => {
                    next.prefill_ms_per_token = num("a number of ms >= 0", 0.0, 3.6e6)?
                }
                "itl_ms" => next.itl_ms = num("a number of ms >= 0", 0.0, 3.6e6)?,
                "itl_ms_per_seq" => next.itl_ms_per_seq = num("a number of ms >= 0", 0.0, 3.6e6)?,
                "rag_index_age_seconds" => {
                    next.rag_index_age_seconds = num("a number of seconds >= 0", 0.0, 1e12)?
                }
                "rag_retrieval_ms" => {
                    next.rag_retrieval_ms = num("a number of ms >= 0", 0.0, 3.6e6)?
                }
                "rag_top_score" => next.rag_top_score = num("a number in [0, 1]", 0.0, 1.0)?,
                "rag_min_score" => next.rag_min_score = num("a number in [0, 1]", 0.0, 1.0)?,
                "rag_vector_store_down" => {
                    next.rag_vector_store_down =
                        v.as_bool().ok_or_else(|| ConfigError::BadValue {
                            field: key.clone(),
                            expected: "a boolean",
                        })?
                }
                other => return Err(ConfigError::UnknownField(other.to_string())),
            }
        }
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn models_split_on_commas_and_repeats() {
        let a = Args::parse_from(["llm-sim", "--model", "a,b", "--model", "c"]);
        assert_eq!(a.served_models(), ["a", "b", "c"]);
    }

    #[test]
    fn admin_merge_is_partial_and_validated() {
        let base = Args::parse_from(["llm-sim"]).runtime_config();
        let next = base
            .merge_json(br#"{"slow_factor": 3, "rag_vector_store_down": true}"#)
            .unwrap();
        assert_eq!(next.slow_factor, 3.0);
        assert!(next.rag_vector_store_down);
        assert_eq!(next.itl_ms, base.itl_ms);
        assert!(base.merge_json(br#"{"error_rate": 2}"#).is_err());
        assert!(base.merge_json(br#"{"nope": 1}"#).is_err());
        assert!(base.merge_json(b"[1]").is_err());
    }
}
