//! The simulated inference engine: a FIFO waiting queue, a bounded running
//! batch (continuous batching), a paged KV cache with prefix caching and
//! preemption, and the latency model.
//!
//! The engine is pure: it never reads a clock or sleeps. Callers pass the
//! current engine time (microseconds since the engine started) to every
//! call, and ask [`Engine::next_wakeup`] when the next token is due. That
//! makes every schedule reproducible in unit tests, and lets the HTTP layer
//! drive it from a real timer.
//!
//! Timing rules (documented in `docs/simulator.md`):
//! * a request waits in the queue until a batch slot and enough KV blocks for
//!   its prompt are free (strict FIFO: the head blocks the rest);
//! * on admission its prefill takes `(ttft_ms + prefill_ms_per_token ×
//!   uncached tokens) × slow_factor`, then it emits its first token;
//! * each later token follows the previous one after `(itl_ms +
//!   itl_ms_per_seq × (running − 1)) × slow_factor`, with `running` counted
//!   when the token is scheduled;
//! * when a running sequence needs a new KV block and none is free, the most
//!   recently admitted sequence is preempted back to the head of the queue
//!   and recomputes its prompt and output so far when readmitted.

use std::collections::VecDeque;

use crate::metrics::{
    buckets_1_2_5, Histogram, ITERATION_TOKEN_BUCKETS, ITL_BUCKETS, REQUEST_LATENCY_BUCKETS,
    TTFT_BUCKETS,
};

/// Engine time in microseconds since the engine started.
pub type Micros = u64;
/// Identifies one sequence (one request) inside the engine.
pub type SeqId = u64;

/// Static shape of the engine.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub max_num_seqs: usize,
    pub kv_cache_tokens: u64,
    pub block_size: u64,
    pub enable_prefix_caching: bool,
    /// How many distinct prompts the prefix cache remembers (LRU).
    pub prefix_cache_entries: usize,
    pub max_model_len: u32,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_num_seqs: 8,
            kv_cache_tokens: 65_536,
            block_size: 16,
            enable_prefix_caching: true,
            prefix_cache_entries: 1024,
            max_model_len: 32_768,
        }
    }
}

/// The latency model; changeable at run time through the admin API.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LatencyModel {
    pub ttft_ms: f64,
    pub prefill_ms_per_token: f64,
    pub itl_ms: f64,
    pub itl_ms_per_seq: f64,
    pub slow_factor: f64,
}

impl Default for LatencyModel {
    fn default() -> Self {
        Self {
            ttft_ms: 50.0,
            prefill_ms_per_token: 0.0,
            itl_ms: 10.0,
            itl_ms_per_seq: 0.0,
            slow_factor: 1.0,
        }
    }
}

fn ms_to_us(ms: f64) -> Micros {
    if ms.is_finite() && ms > 0.0 {
        (ms * 1000.0).round() as Micros
    } else {
        0
    }
}

impl LatencyModel {
    /// Prefill duration for `uncached` prompt tokens; a per-request override
    /// replaces the whole prefill time (still scaled by `slow_factor`).
    pub fn prefill_us(&self, uncached: u64, override_ms: Option<f64>) -> Micros {
        let ms = override_ms.unwrap_or(self.ttft_ms + self.prefill_ms_per_token * uncached as f64);
        ms_to_us(ms * self.slow_factor)
    }

    /// Gap before the next token with `running` sequences in the batch; a
    /// per-request override replaces the batch-size dependent value.
    pub fn itl_us(&self, running: usize, override_ms: Option<f64>) -> Micros {
        let others = running.saturating_sub(1) as f64;
        let ms = override_ms.unwrap_or(self.itl_ms + self.itl_ms_per_seq * others);
        ms_to_us(ms * self.slow_factor)
    }
}

/// What the HTTP layer asks the engine to generate.
#[derive(Clone, Debug, PartialEq)]
pub struct SeqRequest {
    pub prompt_tokens: u32,
    pub max_output_tokens: u32,
    /// Hash of the prompt text; identical prompts share prefix-cache entries.
    pub prefix_key: u64,
    /// Whether reaching `max_output_tokens` means the `max_tokens` limit was
    /// hit (`length`) rather than a natural end (`stop`).
    pub length_capped: bool,
    pub ttft_override_ms: Option<f64>,
    pub itl_override_ms: Option<f64>,
    /// The request's `max_tokens`, for `vllm:request_params_max_tokens`.
    pub max_tokens_param: Option<u32>,
}

/// vLLM's `FinishReason`, as its `finished_reason` label spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FinishReason {
    Stop,
    Length,
    Abort,
    Error,
}

impl FinishReason {
    pub const ALL: [FinishReason; 4] = [Self::Stop, Self::Length, Self::Abort, Self::Error];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::Abort => "abort",
            Self::Error => "error",
        }
    }

    fn index(self) -> usize {
        match self {
            Self::Stop => 0,
            Self::Length => 1,
            Self::Abort => 2,
            Self::Error => 3,
        }
    }
}

/// Token counts of a finished request, as reported in the OpenAI `usage`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub cached_tokens: u32,
}

/// What happened inside the engine, in time order.
#[derive(Clone, Debug, PartialEq)]
pub enum EngineEvent {
    /// Output token `index` (0-based) of `seq` was produced at `at`.
    Token { seq: SeqId, index: u32, at: Micros },
    /// `seq` finished at `at`; always follows its last token.
    Finished {
        seq: SeqId,
        reason: FinishReason,
        usage: Usage,
        at: Micros,
    },
}

/// Why a request cannot enter the engine.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EngineError {
    #[error("This model's maximum context length is {max_model_len} tokens. However, you requested {requested} tokens ({prompt} in the messages, {output} in the completion).")]
    ContextTooLong {
        max_model_len: u32,
        requested: u64,
        prompt: u32,
        output: u32,
    },
    #[error("request needs {needed} KV-cache blocks but the cache only has {total}")]
    ExceedsKvCapacity { needed: u64, total: u64 },
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Phase {
    /// Prefill of `computed` tokens ends at `next_at`.
    Prefill {
        computed: u64,
    },
    Decode,
}

#[derive(Clone, Debug)]
struct Seq {
    id: SeqId,
    req: SeqRequest,
    arrival: Micros,
    first_scheduled: Option<Micros>,
    first_token_at: Option<Micros>,
    last_token_at: Option<Micros>,
    generated: u32,
    cached_tokens: u32,
    blocks: u64,
    next_at: Micros,
    phase: Phase,
}

impl Seq {
    fn held_tokens(&self) -> u64 {
        u64::from(self.req.prompt_tokens) + u64::from(self.generated)
    }
}

/// Cumulative engine statistics, rendered as vLLM's metrics.
#[derive(Clone, Debug)]
pub struct EngineStats {
    pub prompt_tokens: u64,
    pub generation_tokens: u64,
    pub preemptions: u64,
    pub prefix_cache_queries: u64,
    pub prefix_cache_hits: u64,
    success: [u64; 4],
    pub ttft: Histogram,
    pub itl: Histogram,
    pub request_tpot: Histogram,
    pub e2e: Histogram,
    pub queue: Histogram,
    pub inference: Histogram,
    pub prefill: Histogram,
    pub decode: Histogram,
    pub iteration_tokens: Histogram,
    pub request_prompt_tokens: Histogram,
    pub request_generation_tokens: Histogram,
    pub request_params_max_tokens: Histogram,
    pub request_params_n: Histogram,
}

impl EngineStats {
    fn new(max_model_len: u32) -> Self {
        let token_buckets = buckets_1_2_5(u64::from(max_model_len));
        Self {
            prompt_tokens: 0,
            generation_tokens: 0,
            preemptions: 0,
            prefix_cache_queries: 0,
            prefix_cache_hits: 0,
            success: [0; 4],
            ttft: Histogram::new(TTFT_BUCKETS),
            itl: Histogram::new(ITL_BUCKETS),
            request_tpot: Histogram::new(ITL_BUCKETS),
            e2e: Histogram::new(REQUEST_LATENCY_BUCKETS),
            queue: Histogram::new(REQUEST_LATENCY_BUCKETS),
            inference: Histogram::new(REQUEST_LATENCY_BUCKETS),
            prefill: Histogram::new(REQUEST_LATENCY_BUCKETS),
            decode: Histogram::new(REQUEST_LATENCY_BUCKETS),
            iteration_tokens: Histogram::new(ITERATION_TOKEN_BUCKETS),
            request_prompt_tokens: Histogram::new(&token_buckets),
            request_generation_tokens: Histogram::new(&token_buckets),
            request_params_max_tokens: Histogram::new(&token_buckets),
            request_params_n: Histogram::new(&[1.0, 2.0, 5.0, 10.0, 20.0]),
        }
    }

    /// Finished requests with this reason.
    pub fn success(&self, reason: FinishReason) -> u64 {
        self.success[reason.index()]
    }
}

/// Scheduler state at one instant, for the gauges.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gauges {
    pub running: usize,
    pub waiting: usize,
    pub kv_cache_usage: f64,
}

fn us_to_s(us: Micros) -> f64 {
    us as f64 / 1e6
}

/// The engine. See the module documentation for the model.
///
/// Time is passed in, never read, so a run is exact: with a 50 ms prefill
/// and 10 ms between tokens, three tokens come at 50, 60 and 70 ms.
///
/// ```
/// use tokentap_llm_sim::engine::{
///     Engine, EngineConfig, EngineEvent, FinishReason, LatencyModel, SeqRequest,
/// };
///
/// let mut engine = Engine::new(EngineConfig::default(), LatencyModel::default());
/// let request = SeqRequest {
///     prompt_tokens: 20,
///     max_output_tokens: 3,
///     prefix_key: 7,
///     length_capped: true,
///     ttft_override_ms: None,
///     itl_override_ms: None,
///     max_tokens_param: Some(3),
/// };
/// let seq = engine.submit(request, 0).expect("fits the model");
/// engine.advance(1_000_000);
/// let events = engine.drain_events();
/// let token_times: Vec<u64> = events
///     .iter()
///     .filter_map(|e| match e {
///         EngineEvent::Token { at, .. } => Some(*at),
///         EngineEvent::Finished { .. } => None,
///     })
///     .collect();
/// assert_eq!(token_times, [50_000, 60_000, 70_000]);
/// assert!(matches!(
///     events.last(),
///     Some(EngineEvent::Finished { seq: s, reason: FinishReason::Length, .. }) if *s == seq
/// ));
/// ```
#[derive(Debug)]
pub struct Engine {
    cfg: EngineConfig,
    latency: LatencyModel,
    now: Micros,
    next_id: SeqId,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    total_blocks: u64,
    free_blocks: u64,
    prefix_cache: VecDeque<u64>,
    stats: EngineStats,
    outbox: Vec<EngineEvent>,
}

impl Engine {
    pub fn new(cfg: EngineConfig, latency: LatencyModel) -> Self {
        let block = cfg.block_size.max(1);
        let total_blocks = (cfg.kv_cache_tokens / block).max(1);
        let stats = EngineStats::new(cfg.max_model_len);
        Self {
            cfg: EngineConfig {
                block_size: block,
                max_num_seqs: cfg.max_num_seqs.max(1),
                ..cfg
            },
            latency,
            now: 0,
            next_id: 1,
            waiting: VecDeque::new(),
            running: Vec::new(),
            total_blocks,
            free_blocks: total_blocks,
            prefix_cache: VecDeque::new(),
            stats,
            outbox: Vec::new(),
        }
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    pub fn latency(&self) -> LatencyModel {
        self.latency
    }

    /// Applies to everything scheduled from now on.
    pub fn set_latency(&mut self, latency: LatencyModel) {
        self.latency = latency;
    }

    pub fn total_blocks(&self) -> u64 {
        self.total_blocks
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    pub fn gauges(&self) -> Gauges {
        Gauges {
            running: self.running.len(),
            waiting: self.waiting.len(),
            kv_cache_usage: (self.total_blocks - self.free_blocks) as f64
                / self.total_blocks as f64,
        }
    }

    fn blocks_for(&self, tokens: u64) -> u64 {
        tokens.div_ceil(self.cfg.block_size).max(1)
    }

    /// Queues a request at `now` (after processing everything due by then)
    /// and admits it at once when capacity allows.
    pub fn submit(&mut self, req: SeqRequest, now: Micros) -> Result<SeqId, EngineError> {
        let requested = u64::from(req.prompt_tokens) + u64::from(req.max_output_tokens);
        if requested > u64::from(self.cfg.max_model_len) {
            return Err(EngineError::ContextTooLong {
                max_model_len: self.cfg.max_model_len,
                requested,
                prompt: req.prompt_tokens,
                output: req.max_output_tokens,
            });
        }
        let needed = self.blocks_for(requested);
        if needed > self.total_blocks {
            return Err(EngineError::ExceedsKvCapacity {
                needed,
                total: self.total_blocks,
            });
        }
        self.advance(now);
        let id = self.next_id;
        self.next_id += 1;
        if let Some(max) = req.max_tokens_param {
            self.stats.request_params_max_tokens.observe(f64::from(max));
        }
        self.stats.request_params_n.observe(1.0);
        self.waiting.push_back(Seq {
            id,
            req,
            arrival: now,
            first_scheduled: None,
            first_token_at: None,
            last_token_at: None,
            generated: 0,
            cached_tokens: 0,
            blocks: 0,
            next_at: 0,
            phase: Phase::Decode,
        });
        self.admit(now);
        Ok(id)
    }

    /// When the next token is due, if anything is running.
    pub fn next_wakeup(&self) -> Option<Micros> {
        self.running.iter().map(|s| s.next_at).min()
    }

    /// Removes events produced so far, in time order.
    pub fn drain_events(&mut self) -> Vec<EngineEvent> {
        std::mem::take(&mut self.outbox)
    }

    /// Processes every step due at or before `now`, in time order; steps due
    /// at the same instant form one engine iteration.
    pub fn advance(&mut self, now: Micros) {
        while let Some(t) = self
            .running
            .iter()
            .map(|s| s.next_at)
            .filter(|t| *t <= now)
            .min()
        {
            let due: Vec<SeqId> = self
                .running
                .iter()
                .filter(|s| s.next_at == t)
                .map(|s| s.id)
                .collect();
            let mut iteration_tokens = 0u64;
            for id in due {
                iteration_tokens += self.step(id, t);
            }
            if iteration_tokens > 0 {
                self.stats.iteration_tokens.observe(iteration_tokens as f64);
            }
            self.admit(t);
            self.now = self.now.max(t);
        }
        self.now = self.now.max(now);
    }

    /// Cancels a request (client went away). Counts as `abort`.
    pub fn abort(&mut self, id: SeqId, now: Micros) {
        self.advance(now);
        if let Some(pos) = self.waiting.iter().position(|s| s.id == id) {
            if let Some(seq) = self.waiting.remove(pos) {
                self.record_abort(&seq, now);
            }
        } else if let Some(pos) = self.running.iter().position(|s| s.id == id) {
            let seq = self.running.remove(pos);
            self.free_blocks += seq.blocks;
            self.record_abort(&seq, now);
            self.admit(now);
        }
    }

    fn record_abort(&mut self, seq: &Seq, now: Micros) {
        self.stats.success[FinishReason::Abort.index()] += 1;
        self.stats
            .e2e
            .observe(us_to_s(now.saturating_sub(seq.arrival)));
        self.outbox.push(EngineEvent::Finished {
            seq: seq.id,
            reason: FinishReason::Abort,
            usage: Usage {
                prompt_tokens: seq.req.prompt_tokens,
                completion_tokens: seq.generated,
                cached_tokens: seq.cached_tokens,
            },
            at: now,
        });
    }

    fn admit(&mut self, t: Micros) {
        while self.running.len() < self.cfg.max_num_seqs {
            let Some(head) = self.waiting.front() else {
                break;
            };
            let need = self.blocks_for(head.held_tokens());
            if need > self.free_blocks {
                break;
            }
            let Some(mut seq) = self.waiting.pop_front() else {
                break;
            };
            self.free_blocks -= need;
            seq.blocks = need;
            let prompt = seq.req.prompt_tokens;
            let hit =
                self.cfg.enable_prefix_caching && self.prefix_cache.contains(&seq.req.prefix_key);
            let cached = if hit {
                let b = self.cfg.block_size as u32;
                (prompt.saturating_sub(1) / b) * b
            } else {
                0
            };
            if seq.first_scheduled.is_none() {
                seq.first_scheduled = Some(t);
                seq.cached_tokens = cached;
                self.stats.prefix_cache_queries += u64::from(prompt);
                self.stats.prefix_cache_hits += u64::from(cached);
            }
            let computed = seq.held_tokens() - u64::from(cached);
            let prefill = self.latency.prefill_us(computed, seq.req.ttft_override_ms);
            seq.phase = Phase::Prefill { computed };
            seq.next_at = t + prefill;
            self.running.push(seq);
        }
    }

    /// Preempts the most recently admitted sequence; returns its id.
    fn preempt_last(&mut self) -> Option<SeqId> {
        let mut seq = self.running.pop()?;
        self.free_blocks += seq.blocks;
        seq.blocks = 0;
        self.stats.preemptions += 1;
        let id = seq.id;
        self.waiting.push_front(seq);
        Some(id)
    }

    /// Runs the step of `id` due at `t`; returns the tokens it processed.
    fn step(&mut self, id: SeqId, t: Micros) -> u64 {
        let Some(pos) = self.running.iter().position(|s| s.id == id) else {
            return 0;
        };
        let (held, blocks) = {
            let s = &self.running[pos];
            if s.next_at != t {
                return 0;
            }
            (s.held_tokens(), s.blocks)
        };
        let need = self.blocks_for(held + 1);
        if need > blocks {
            let extra = need - blocks;
            while self.free_blocks < extra {
                match self.preempt_last() {
                    Some(victim) if victim == id => return 0,
                    Some(_) => {}
                    None => return 0,
                }
            }
            self.free_blocks -= extra;
        }
        let Some(pos) = self.running.iter().position(|s| s.id == id) else {
            return 0;
        };
        let running_now = self.running.len();
        let seq = &mut self.running[pos];
        seq.blocks = need;
        let processed = match seq.phase {
            Phase::Prefill { computed } => computed + 1,
            Phase::Decode => 1,
        };
        let index = seq.generated;
        seq.generated += 1;
        self.stats.generation_tokens += 1;
        match seq.last_token_at {
            None => {
                seq.first_token_at = Some(t);
                self.stats
                    .ttft
                    .observe(us_to_s(t.saturating_sub(seq.arrival)));
                self.stats.prompt_tokens += u64::from(seq.req.prompt_tokens);
            }
            Some(last) => self.stats.itl.observe(us_to_s(t.saturating_sub(last))),
        }
        seq.last_token_at = Some(t);
        let key = seq.req.prefix_key;
        let done = seq.generated >= seq.req.max_output_tokens;
        if !done {
            seq.phase = Phase::Decode;
            seq.next_at = t + self.latency.itl_us(running_now, seq.req.itl_override_ms);
        }
        self.outbox.push(EngineEvent::Token {
            seq: id,
            index,
            at: t,
        });
        if index == 0 && self.cfg.enable_prefix_caching {
            self.remember_prefix(key);
        }
        if done {
            self.finish(pos, t);
        }
        processed
    }

    fn remember_prefix(&mut self, key: u64) {
        if let Some(p) = self.prefix_cache.iter().position(|k| *k == key) {
            self.prefix_cache.remove(p);
        }
        self.prefix_cache.push_back(key);
        while self.prefix_cache.len() > self.cfg.prefix_cache_entries {
            self.prefix_cache.pop_front();
        }
    }

    fn finish(&mut self, pos: usize, t: Micros) {
        let seq = self.running.remove(pos);
        self.free_blocks += seq.blocks;
        let reason = if seq.req.length_capped {
            FinishReason::Length
        } else {
            FinishReason::Stop
        };
        let scheduled = seq.first_scheduled.unwrap_or(seq.arrival);
        let first = seq.first_token_at.unwrap_or(t);
        let st = &mut self.stats;
        st.success[reason.index()] += 1;
        st.e2e.observe(us_to_s(t.saturating_sub(seq.arrival)));
        st.queue
            .observe(us_to_s(scheduled.saturating_sub(seq.arrival)));
        st.prefill.observe(us_to_s(first.saturating_sub(scheduled)));
        st.decode.observe(us_to_s(t.saturating_sub(first)));
        st.inference.observe(us_to_s(t.saturating_sub(scheduled)));
        let tpot = if seq.generated > 1 {
            us_to_s(t.saturating_sub(first)) / f64::from(seq.generated - 1)
        } else {
            0.0
        };
        st.request_tpot.observe(tpot);
        st.request_prompt_tokens
            .observe(f64::from(seq.req.prompt_tokens));
        st.request_generation_tokens
            .observe(f64::from(seq.generated));
        self.outbox.push(EngineEvent::Finished {
            seq: seq.id,
            reason,
            usage: Usage {
                prompt_tokens: seq.req.prompt_tokens,
                completion_tokens: seq.generated,
                cached_tokens: seq.cached_tokens,
            },
            at: t,
        });
    }
}

#[cfg(test)]
mod tests;
