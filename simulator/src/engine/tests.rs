use super::*;

fn req(prompt: u32, out: u32) -> SeqRequest {
    SeqRequest {
        prompt_tokens: prompt,
        max_output_tokens: out,
        prefix_key: u64::from(prompt) * 7919 + u64::from(out),
        length_capped: true,
        ttft_override_ms: None,
        itl_override_ms: None,
        max_tokens_param: Some(out),
    }
}

fn latency(ttft: f64, per_tok: f64, itl: f64, per_seq: f64) -> LatencyModel {
    LatencyModel {
        ttft_ms: ttft,
        prefill_ms_per_token: per_tok,
        itl_ms: itl,
        itl_ms_per_seq: per_seq,
        slow_factor: 1.0,
    }
}

/// Runs the engine to completion, returning every event.
fn run_all(e: &mut Engine) -> Vec<EngineEvent> {
    let mut out = e.drain_events();
    let mut guard = 0;
    while let Some(t) = e.next_wakeup() {
        e.advance(t);
        out.extend(e.drain_events());
        guard += 1;
        assert!(guard < 100_000, "engine did not settle");
    }
    out
}

fn token_times(events: &[EngineEvent], id: SeqId) -> Vec<Micros> {
    events
        .iter()
        .filter_map(|e| match e {
            EngineEvent::Token { seq, at, .. } if *seq == id => Some(*at),
            _ => None,
        })
        .collect()
}

fn finished(events: &[EngineEvent], id: SeqId) -> (FinishReason, Usage) {
    events
        .iter()
        .find_map(|e| match e {
            EngineEvent::Finished {
                seq, reason, usage, ..
            } if *seq == id => Some((*reason, *usage)),
            _ => None,
        })
        .expect("finished")
}

#[test]
fn single_request_follows_ttft_then_itl() {
    let mut e = Engine::new(EngineConfig::default(), latency(50.0, 0.0, 10.0, 0.0));
    let id = e.submit(req(10, 4), 1_000).unwrap();
    let ev = run_all(&mut e);
    assert_eq!(token_times(&ev, id), vec![51_000, 61_000, 71_000, 81_000]);
    let (reason, usage) = finished(&ev, id);
    assert_eq!(reason, FinishReason::Length);
    assert_eq!(usage.completion_tokens, 4);
    assert_eq!(e.stats().success(FinishReason::Length), 1);
    assert_eq!(e.stats().prompt_tokens, 10);
    assert_eq!(e.stats().generation_tokens, 4);
    assert_eq!(e.stats().ttft.count(), 1);
    assert!((e.stats().ttft.sum() - 0.050).abs() < 1e-9);
    assert_eq!(e.stats().itl.count(), 3);
    assert_eq!(e.gauges().running, 0);
}

#[test]
fn ttft_grows_with_prompt_length() {
    let mut e = Engine::new(EngineConfig::default(), latency(20.0, 0.5, 5.0, 0.0));
    let short = e.submit(req(10, 1), 0).unwrap();
    let long = e.submit(req(210, 1), 0).unwrap();
    let ev = run_all(&mut e);
    assert_eq!(token_times(&ev, short), vec![25_000]);
    assert_eq!(token_times(&ev, long), vec![125_000]);
}

#[test]
fn queueing_delays_first_token_by_the_wait() {
    let cfg = EngineConfig {
        max_num_seqs: 2,
        ..EngineConfig::default()
    };
    let mut e = Engine::new(cfg, latency(10.0, 0.0, 10.0, 0.0));
    let ids: Vec<_> = (0..3).map(|_| e.submit(req(8, 3), 0).unwrap()).collect();
    assert_eq!(e.gauges().running, 2);
    assert_eq!(e.gauges().waiting, 1);
    let ev = run_all(&mut e);
    // The first two finish at 10 + 2×10 = 30 ms; the third is admitted then.
    assert_eq!(token_times(&ev, ids[0]), vec![10_000, 20_000, 30_000]);
    assert_eq!(token_times(&ev, ids[2]), vec![40_000, 50_000, 60_000]);
    let q = &e.stats().queue;
    assert_eq!(q.count(), 3);
    assert!((q.sum() - 0.030).abs() < 1e-9);
    // Two tokens at the same instant form one iteration.
    assert_eq!(e.stats().iteration_tokens.count(), 6);
}

#[test]
fn itl_grows_with_batch_size() {
    let mut e = Engine::new(EngineConfig::default(), latency(10.0, 0.0, 10.0, 5.0));
    let alone = e.submit(req(8, 2), 0).unwrap();
    let ev = run_all(&mut e);
    let t = token_times(&ev, alone);
    assert_eq!(t[1] - t[0], 10_000);

    let mut e = Engine::new(EngineConfig::default(), latency(10.0, 0.0, 10.0, 5.0));
    let ids: Vec<_> = (0..4).map(|_| e.submit(req(8, 2), 0).unwrap()).collect();
    let ev = run_all(&mut e);
    for id in ids {
        let t = token_times(&ev, id);
        assert_eq!(t[1] - t[0], 25_000, "10 + 5 × 3 others");
    }
}

#[test]
fn kv_usage_counts_blocks_of_running_sequences() {
    let cfg = EngineConfig {
        kv_cache_tokens: 1600,
        block_size: 16,
        ..EngineConfig::default()
    };
    let mut e = Engine::new(cfg, latency(10.0, 0.0, 10.0, 0.0));
    e.submit(req(40, 10), 0).unwrap(); // 40 tokens → 3 blocks
    e.submit(req(16, 10), 0).unwrap(); // 16 tokens → 1 block
    assert!((e.gauges().kv_cache_usage - 4.0 / 100.0).abs() < 1e-12);
    // After the first token the second sequence holds 17 tokens → 2 blocks.
    e.advance(10_000);
    assert!((e.gauges().kv_cache_usage - 5.0 / 100.0).abs() < 1e-12);
    run_all(&mut e);
    assert_eq!(e.gauges().kv_cache_usage, 0.0);
}

#[test]
fn identical_prompt_hits_prefix_cache_in_whole_blocks() {
    let mut e = Engine::new(EngineConfig::default(), latency(10.0, 1.0, 1.0, 0.0));
    let first = e.submit(req(50, 1), 0).unwrap();
    let ev = run_all(&mut e);
    assert_eq!(finished(&ev, first).1.cached_tokens, 0);
    assert_eq!(token_times(&ev, first), vec![60_000]);

    let second = e.submit(req(50, 1), 100_000).unwrap();
    let ev = run_all(&mut e);
    // 49 / 16 = 3 whole blocks = 48 tokens cached; 2 left to prefill.
    assert_eq!(finished(&ev, second).1.cached_tokens, 48);
    assert_eq!(token_times(&ev, second), vec![112_000]);
    assert_eq!(e.stats().prefix_cache_queries, 100);
    assert_eq!(e.stats().prefix_cache_hits, 48);
}

#[test]
fn kv_pressure_preempts_the_latest_sequence() {
    let cfg = EngineConfig {
        kv_cache_tokens: 64, // 4 blocks of 16
        block_size: 16,
        ..EngineConfig::default()
    };
    let mut e = Engine::new(cfg, latency(1.0, 0.0, 1.0, 0.0));
    let a = e.submit(req(16, 20), 0).unwrap();
    let b = e.submit(req(16, 20), 0).unwrap();
    let ev = run_all(&mut e);
    assert!(e.stats().preemptions >= 1);
    for id in [a, b] {
        let (reason, usage) = finished(&ev, id);
        assert_eq!(reason, FinishReason::Length);
        assert_eq!(usage.completion_tokens, 20);
        assert_eq!(token_times(&ev, id).len(), 20);
    }
    // The older sequence is never the victim, so it finishes first.
    let end = |id| token_times(&ev, id).last().copied().unwrap();
    assert!(end(a) < end(b));
    assert_eq!(e.gauges().kv_cache_usage, 0.0);
}

#[test]
fn abort_frees_the_slot_and_counts_abort() {
    let cfg = EngineConfig {
        max_num_seqs: 1,
        ..EngineConfig::default()
    };
    let mut e = Engine::new(cfg, latency(10.0, 0.0, 10.0, 0.0));
    let a = e.submit(req(8, 100), 0).unwrap();
    let b = e.submit(req(8, 1), 0).unwrap();
    e.abort(a, 15_000);
    let ev = run_all(&mut e);
    assert_eq!(finished(&ev, a).0, FinishReason::Abort);
    assert_eq!(token_times(&ev, b), vec![25_000]);
    assert_eq!(e.stats().success(FinishReason::Abort), 1);
}

#[test]
fn overrides_and_slow_factor_apply() {
    let mut lat = latency(50.0, 0.0, 10.0, 0.0);
    lat.slow_factor = 2.0;
    let mut e = Engine::new(EngineConfig::default(), lat);
    let mut r = req(8, 2);
    r.ttft_override_ms = Some(5.0);
    r.itl_override_ms = Some(3.0);
    let id = e.submit(r, 0).unwrap();
    let ev = run_all(&mut e);
    assert_eq!(token_times(&ev, id), vec![10_000, 16_000]);
}

#[test]
fn rejects_requests_longer_than_the_context() {
    let cfg = EngineConfig {
        max_model_len: 100,
        ..EngineConfig::default()
    };
    let mut e = Engine::new(cfg, LatencyModel::default());
    assert!(matches!(
        e.submit(req(90, 20), 0),
        Err(EngineError::ContextTooLong { .. })
    ));
}

#[test]
fn stop_when_not_length_capped() {
    let mut e = Engine::new(EngineConfig::default(), LatencyModel::default());
    let mut r = req(8, 3);
    r.length_capped = false;
    let id = e.submit(r, 0).unwrap();
    let ev = run_all(&mut e);
    assert_eq!(finished(&ev, id).0, FinishReason::Stop);
}
