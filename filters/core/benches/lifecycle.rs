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
use tokentap_core::host::{
    HostError, HttpView, Log, LogLevel, MetricKind, MetricsHost, StreamHost,
};
use tokentap_core::labels::LocalAdmission;
use tokentap_core::lifecycle::{Gateway, NoExports};

struct Stream {
    headers: HashMap<&'static str, &'static [u8]>,
    request: &'static [u8],
    chunk: Vec<u8>,
}

impl HttpView for Stream {
    fn request_header(&self, name: &str) -> Option<Vec<u8>> {
        self.headers.get(name).map(|v| v.to_vec())
    }
    fn response_header(&self, name: &str) -> Option<Vec<u8>> {
        self.headers.get(name).map(|v| v.to_vec())
    }
    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        self.headers
            .get(path.join(".").as_str())
            .map(|v| v.to_vec())
    }
}

impl StreamHost for Stream {
    fn request_body(&self, start: usize, len: usize) -> Option<Vec<u8>> {
        self.request.get(start..start + len).map(<[u8]>::to_vec)
    }
    fn response_body(&self, start: usize, len: usize) -> Option<Vec<u8>> {
        self.chunk.get(start..start + len).map(<[u8]>::to_vec)
    }
    fn replace_request_body(&mut self, _: usize, _: &[u8]) {}
    fn set_request_header(&mut self, _: &str, _: &str) {}
    fn remove_request_header(&mut self, _: &str) {}
    fn set_filter_state(&mut self, _: &str, value: &[u8]) {
        black_box(value);
    }
}

struct Quiet;

impl Log for Quiet {
    fn log(&self, _: LogLevel, _: &str) {}
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
    let request = br#"{"model":"mistral-7b","messages":[{"role":"user","content":"Summarise the incident runbook for a saturated vLLM runtime."}],"max_tokens":64,"stream":true}"#;
    let mut stream = Stream {
        headers: HashMap::from([
            (":path", &b"/v1/chat/completions"[..]),
            (":method", b"POST"),
            ("x-tenant-id", b"acme"),
            ("xds.route_name", b"chat"),
            ("xds.cluster_name", b"llm_stable"),
            ("response.code_details", b"via_upstream"),
            (":status", b"200"),
            ("content-type", b"text/event-stream"),
        ]),
        request,
        chunk: Vec::new(),
    };
    let events: Vec<Vec<u8>> = (0..64)
        .map(|i| chunk(if i % 4 == 0 { "日本" } else { " word" }))
        .collect();
    let tail = b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":21,\"completion_tokens\":64}}\n\ndata: [DONE]\n\n".to_vec();
    let one_body: Vec<u8> = events
        .concat()
        .into_iter()
        .chain(tail.iter().copied())
        .collect();

    let mut gateway = Gateway::new(
        config,
        Box::new(LocalAdmission::default()),
        NoopStats(0),
        None,
        Box::new(Quiet),
    );

    // `chunks`: the response body callbacks of one request.
    let mut run = |chunks: &[Vec<u8>], iterations: u32| -> f64 {
        let start = Instant::now();
        for i in 0..iterations {
            let t = u64::from(i) * 1_000_000_000;
            let mut s = gateway
                .request_headers(&mut stream, &t)
                .unwrap_or_else(|| panic!("LLM path"));
            gateway.request_body(&mut s, &mut stream, request.len(), true);
            gateway.response_headers(&mut s, &mut stream, &(t + 1_000_000), false);
            for (k, c) in chunks.iter().enumerate() {
                stream.chunk.clone_from(c);
                let last = k + 1 == chunks.len();
                let now = t + 2_000_000 + k as u64 * 1_000_000;
                gateway.response_body(&mut s, &mut stream, c.len(), last, &now);
            }
            gateway.finish(s, &mut stream, &(t + 100_000_000));
            if i % 64 == 0 {
                gateway.tick(t, &mut NoExports);
            }
        }
        start.elapsed().as_nanos() as f64 / f64::from(iterations)
    };

    let json_response = vec![tail.clone()];
    let per_event: Vec<Vec<u8>> = events.iter().cloned().chain([tail.clone()]).collect();
    let in_one_body = vec![one_body];
    run(&per_event, 2_000); // warm-up
    let no_events = run(&json_response, 20_000);
    let one = run(&in_one_body, 5_000);
    let each = run(&per_event, 5_000);
    println!(
        "request lifecycle without events (headers, body, usage, labels, state, metrics): {:.1} µs",
        no_events / 1000.0
    );
    println!(
        "request lifecycle with 64 SSE events in one body: {:.1} µs ({:.2} µs per event)",
        one / 1000.0,
        (one - no_events) / 64.0 / 1000.0
    );
    println!(
        "request lifecycle with 64 SSE events, one callback each: {:.1} µs ({:.2} µs per event)",
        each / 1000.0,
        (each - no_events) / 64.0 / 1000.0
    );
}
