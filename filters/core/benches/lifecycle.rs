//! Native cost of the filter's per-request work, without Envoy: the full
//! lifecycle of a non-streamed chat request and of a 64-event stream, with
//! host calls replaced by no-ops. Run with `cargo bench -p tokentap-core`.
//! Compare with `bench/gateway.py`, which measures the filter inside Envoy:
//! the difference is the wasm runtime and Envoy's side of the host calls.

// A benchmark binary: failing loudly on a broken setup is what we want.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::hint::black_box;
use std::time::Instant;

use tokentap_core::config::Config;
use tokentap_core::host::{HostError, HttpView, MetricKind, MetricsHost};
use tokentap_core::labels::LocalAdmission;
use tokentap_core::metrics::{Labeler, MetricsRecorder};
use tokentap_core::request::RequestObserver;
use tokentap_core::state;

struct View(HashMap<&'static str, &'static [u8]>);

impl HttpView for View {
    fn request_header(&self, name: &str) -> Option<Vec<u8>> {
        self.0.get(name).map(|v| v.to_vec())
    }
    fn response_header(&self, name: &str) -> Option<Vec<u8>> {
        self.0.get(name).map(|v| v.to_vec())
    }
    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        self.0.get(path.join(".").as_str()).map(|v| v.to_vec())
    }
}

struct NoopStats(u32);

impl MetricsHost for NoopStats {
    fn define(&mut self, _kind: MetricKind, _name: &str) -> Result<u32, HostError> {
        self.0 += 1;
        Ok(self.0)
    }
    fn increment(&mut self, _id: u32, _delta: i64) -> Result<(), HostError> {
        Ok(())
    }
    fn record(&mut self, _id: u32, _value: u64) -> Result<(), HostError> {
        Ok(())
    }
}

fn chunk(content: &str) -> Vec<u8> {
    format!("data: {{\"id\":\"chatcmpl-abc\",\"object\":\"chat.completion.chunk\",\"created\":1795823225,\"model\":\"mistral-7b\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{content}\"}},\"logprobs\":null,\"finish_reason\":null}}]}}\n\n").into_bytes()
}

fn main() {
    let config = Config::parse(
        br#"{"tenant":{"header":"x-tenant-id"},"models":["mistral-7b"],
             "routes":{"chat":{"route_class":"interactive","team":"platform-ai"}}}"#,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let view = View(HashMap::from([
        (":path", &b"/v1/chat/completions"[..]),
        (":method", b"POST"),
        ("x-tenant-id", b"acme"),
        ("xds.route_name", b"chat"),
        ("xds.cluster_name", b"llm_stable"),
        ("response.code_details", b"via_upstream"),
        (":status", b"200"),
        ("content-type", b"text/event-stream"),
    ]));
    let request = br#"{"model":"mistral-7b","messages":[{"role":"user","content":"Summarise the incident runbook for a saturated vLLM runtime."}],"max_tokens":64,"stream":true}"#;
    let events: Vec<Vec<u8>> = (0..64)
        .map(|i| chunk(if i % 4 == 0 { "日本" } else { " word" }))
        .collect();
    let tail = b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":21,\"completion_tokens\":64}}\n\ndata: [DONE]\n\n";

    let mut labeler = Labeler::new(&config, Box::new(LocalAdmission::default()));
    let mut recorder = MetricsRecorder::new(NoopStats(0), 5000);

    let mut run = |n_events: usize, iterations: u32| -> f64 {
        let start = Instant::now();
        for i in 0..iterations {
            let t = u64::from(i) * 1_000_000_000;
            let mut obs =
                RequestObserver::start(&config, &view, t).unwrap_or_else(|| panic!("LLM path"));
            let mut overflow = Vec::new();
            let start_labels = labeler.start_labels(&config, obs.route_name(), &mut overflow);
            recorder.active(&start_labels, &labeler, 1);
            obs.request_body(request, true);
            obs.response_headers(&config, &view, t + 1_000_000);
            for (k, e) in events.iter().take(n_events).enumerate() {
                obs.response_body(e, t + 2_000_000 + k as u64 * 1_000_000);
            }
            obs.response_body(tail, t + 100_000_000);
            let rec = obs.record(&config, &view, t + 100_000_000, false);
            let labels = labeler.request_labels(&rec, &mut overflow);
            black_box(state::summary_json(&state::filter_state(
                &rec, &labels, &labeler,
            )));
            let rec = obs.record_final(&config, &view, t + 100_000_000);
            let labels = labeler.request_labels(&rec, &mut overflow);
            recorder.record_request(&rec, &labels, &labeler);
            recorder.active(&start_labels, &labeler, -1);
            black_box(&rec);
        }
        start.elapsed().as_nanos() as f64 / f64::from(iterations)
    };

    run(64, 2_000); // warm-up
    let no_events = run(0, 20_000);
    let with_events = run(64, 5_000);
    println!(
        "request lifecycle without events (headers, body, usage, labels, state, metrics): {:.1} µs",
        no_events / 1000.0
    );
    println!(
        "request lifecycle with 64 SSE events: {:.1} µs ({:.2} µs per event)",
        with_events / 1000.0,
        (with_events - no_events) / 64.0 / 1000.0
    );
}
