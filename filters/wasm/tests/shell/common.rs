//! Loads the built `tokentap_filter.wasm` into the test host and drives
//! requests through it as Envoy would, with a test clock.
//!
//! Every exchange checks the shell's promises to traffic on the way: each
//! response callback answers `Continue`, and the response bytes reach the
//! client exactly as the upstream sent them.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

pub use tokentap_testhost::Headers;
use tokentap_testhost::{
    release_module, Action, Error, HostCall, LogLevel, Metrics, Plugin, Property, Recorded, Status,
    TestHost,
};

pub const CHAT: &str = "/v1/chat/completions";

/// `unwrap` that shows a trap's captured log readably.
pub trait Must<T> {
    fn must(self) -> T;
}

impl<T> Must<T> for Result<T, Error> {
    fn must(self) -> T {
        self.unwrap_or_else(|e| panic!("{e}"))
    }
}

/// The plugin configuration `envoy/tokentap.yaml` ships (what `cargo xtask
/// up` and the e2e suites run), cut out of the template.
pub fn shipped_config() -> String {
    let path = workspace().join("envoy/tokentap.yaml");
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    let mut lines = text
        .lines()
        .skip_while(|l| !l.trim_end().ends_with("value: |"));
    let indent = lines.next().map_or(0, |l| l.len() - l.trim_start().len());
    let json: Vec<&str> = lines
        .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent)
        .collect();
    let json = json.join("\n");
    assert!(
        serde_json::from_str::<serde_json::Value>(&json).is_ok(),
        "no JSON plugin configuration found under `value: |` in {}",
        path.display()
    );
    json
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The compiled module, shared by all tests of this binary.
pub fn plugin() -> &'static Plugin {
    static PLUGIN: OnceLock<Plugin> = OnceLock::new();
    PLUGIN.get_or_init(|| {
        let path = release_module("tokentap-filter").must();
        assert_fresh(&path);
        Plugin::load(&path).must()
    })
}

/// A `.wasm` older than the filter's sources would test old code.
fn assert_fresh(wasm: &Path) {
    let built = modified(wasm);
    let mut dirs = vec![
        workspace().join("filters/core/src"),
        workspace().join("filters/wasm/src"),
    ];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let source = entry.path();
            if source.is_dir() {
                dirs.push(source);
                continue;
            }
            assert!(
                modified(&source) <= built,
                "{} is older than {}: rebuild it with `cargo build -p tokentap-filter --target wasm32-wasip1 --release`",
                wasm.display(),
                source.display()
            );
        }
    }
}

fn modified(p: &Path) -> SystemTime {
    std::fs::metadata(p)
        .and_then(|m| m.modified())
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

/// A request as the client sends it.
#[derive(Clone, Debug)]
pub struct Req {
    pub path: String,
    pub method: &'static str,
    pub headers: Vec<(String, Vec<u8>)>,
    /// Body chunks, in arrival order.
    pub body: Vec<Vec<u8>>,
    /// Envoy route and upstream cluster (`xds.route_name`, `xds.cluster_name`).
    pub route: &'static str,
    pub cluster: &'static str,
}

impl Req {
    /// A JSON POST to `path` on route `chat`, from tenant `acme`.
    pub fn post(path: &str, body: &serde_json::Value) -> Req {
        Req {
            path: path.to_string(),
            method: "POST",
            headers: vec![
                ("content-type".into(), b"application/json".to_vec()),
                ("x-tenant-id".into(), b"acme".to_vec()),
            ],
            body: vec![body.to_string().into_bytes()],
            route: "chat",
            cluster: "llm_stable",
        }
    }

    pub fn header(mut self, name: &str, value: impl AsRef<[u8]>) -> Req {
        self.headers.retain(|(n, _)| n != name);
        self.headers.push((name.into(), value.as_ref().to_vec()));
        self
    }

    pub fn raw_body(mut self, chunks: Vec<Vec<u8>>) -> Req {
        self.body = chunks;
        self
    }

    pub fn body_bytes(&self) -> Vec<u8> {
        self.body.concat()
    }

    fn header_map(&self) -> Headers {
        let mut h = Headers::new([
            (":method", self.method.as_bytes()),
            (":path", self.path.as_bytes()),
            (":authority", b"gateway.local".as_slice()),
            (":scheme", b"http".as_slice()),
            ("x-request-id", b"3f1c2a".as_slice()),
        ]);
        let len = self.body_bytes().len().to_string();
        if !self.body.is_empty() {
            h.add(b"content-length", len.as_bytes());
        }
        for (k, v) in &self.headers {
            h.add(k.as_bytes(), v);
        }
        h
    }
}

/// An upstream response: body bytes in phases, each phase arriving at once
/// after `after` more time has passed, cut into `chunk`-byte pieces.
#[derive(Clone, Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub phases: Vec<(Duration, Vec<u8>)>,
    pub chunk: usize,
}

impl Resp {
    pub fn json(status: u16, body: &serde_json::Value) -> Resp {
        Resp {
            status,
            headers: vec![("content-type", "application/json".into())],
            phases: vec![(ms(400), body.to_string().into_bytes())],
            chunk: usize::MAX,
        }
    }

    pub fn sse(phases: Vec<(Duration, Vec<u8>)>, chunk: usize) -> Resp {
        Resp {
            status: 200,
            headers: vec![("content-type", "text/event-stream".into())],
            phases,
            chunk,
        }
    }

    pub fn raw(status: u16, content_type: &str, body: Vec<u8>) -> Resp {
        Resp {
            status,
            headers: vec![("content-type", content_type.into())],
            phases: vec![(ms(400), body)],
            chunk: usize::MAX,
        }
    }

    pub fn body_bytes(&self) -> Vec<u8> {
        self.phases
            .iter()
            .flat_map(|(_, b)| b.iter().copied())
            .collect()
    }
}

pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// How long the upstream takes to send response headers.
pub const TTFB: Duration = Duration::from_millis(100);

/// What happened to one request.
#[derive(Debug)]
pub struct Outcome {
    pub context_id: u32,
    pub request_actions: Vec<Action>,
    pub response_actions: Vec<Action>,
}

/// One VM of the filter, configured.
pub struct Gateway {
    pub host: TestHost,
}

/// A VM with the root context created and started, not yet configured.
pub fn started_vm() -> TestHost {
    let mut host = TestHost::new(plugin()).must();
    host.set_node_property(
        &["xds", "node", "metadata", "NAME"],
        Property::Str("gw-0".into()),
    );
    host.state_mut().clusters = vec!["llm_stable".into(), "otel_collector".into()];
    assert!(host.start_vm(b"").must());
    host
}

impl Gateway {
    /// A VM configured with `config`; panics if the filter refuses it.
    pub fn with_config(config: &str) -> Gateway {
        let mut host = started_vm();
        let ok = host.configure(config.as_bytes()).must();
        assert!(
            ok,
            "configuration refused:\n{}",
            host.state().captured_log()
        );
        Gateway { host }
    }

    pub fn shipped() -> Gateway {
        Gateway::with_config(&shipped_config())
    }

    /// Runs one request to its end (`on_log`, `on_done`, `on_delete`):
    /// request at the current time, response headers [`TTFB`] later, then
    /// the body phases.
    pub fn exchange(&mut self, req: &Req, resp: &Resp) -> Outcome {
        let id = self.open(req);
        let request_actions = self.send_request(id, req);
        let response_actions = self.send_response(id, resp);
        self.host.finish(id).must();
        Outcome {
            context_id: id,
            request_actions,
            response_actions,
        }
    }

    /// A new stream on the request's route.
    pub fn open(&mut self, req: &Req) -> u32 {
        let h = &mut self.host;
        let id = h.new_stream().must();
        let set = |h: &mut TestHost, path: &[&str], v: &str| {
            h.set_property(id, path, Property::Str(v.into())).must();
        };
        set(h, &["xds", "route_name"], req.route);
        set(h, &["xds", "cluster_name"], req.cluster);
        id
    }

    pub fn send_request(&mut self, id: u32, req: &Req) -> Vec<Action> {
        let h = &mut self.host;
        let eos = req.body.is_empty();
        let mut actions = vec![h.request_headers(id, req.header_map(), eos).must()];
        for (i, chunk) in req.body.iter().enumerate() {
            let last = i + 1 == req.body.len();
            actions.push(h.request_body(id, chunk, last).must());
        }
        actions
    }

    /// Sends the response; asserts every callback continues and the bytes
    /// pass unchanged.
    pub fn send_response(&mut self, id: u32, resp: &Resp) -> Vec<Action> {
        let h = &mut self.host;
        h.advance(TTFB).must();
        h.set_property(
            id,
            &["response", "code"],
            Property::Int(i64::from(resp.status)),
        )
        .must();
        let mut headers = Headers::new([(":status", resp.status.to_string())]);
        for (k, v) in &resp.headers {
            headers.add(k.as_bytes(), v.as_bytes());
        }
        let body = resp.body_bytes();
        let mut actions = vec![h.response_headers(id, headers, body.is_empty()).must()];
        for (p, (after, bytes)) in resp.phases.iter().enumerate() {
            h.advance(*after).must();
            let pieces: Vec<&[u8]> = bytes.chunks(resp.chunk.max(1)).collect();
            for (i, piece) in pieces.iter().enumerate() {
                let last = p + 1 == resp.phases.len() && i + 1 == pieces.len();
                actions.push(h.response_body(id, piece, last).must());
            }
        }
        assert!(
            actions.iter().all(|a| *a == Action::Continue),
            "a response callback did not continue: {actions:?}"
        );
        let stream = h.stream(id).expect("stream");
        assert_eq!(
            stream.forwarded_response_body, body,
            "response bytes changed"
        );
        actions
    }

    /// Lets at least one second pass, so values the filter aggregates in
    /// the VM and publishes on its tick are visible (ticks fire on the
    /// period the filter set, as in Envoy).
    pub fn settle(&mut self) -> &Metrics {
        self.host.advance(Duration::from_millis(1001)).must();
        self.host.metrics()
    }

    /// The request body bytes the filter let through to the upstream.
    pub fn forwarded_request(&self, context_id: u32) -> &[u8] {
        &self
            .host
            .stream(context_id)
            .expect("stream")
            .forwarded_request_body
    }

    /// Host calls made in one context.
    pub fn calls_in(&self, context_id: u32) -> Vec<&Recorded> {
        self.host
            .calls()
            .iter()
            .filter(|r| r.context_id == context_id)
            .collect()
    }

    /// No panic was logged, no unimplemented import was called, and no stat
    /// or state write was refused by the host.
    pub fn assert_healthy(&self) {
        let log = self.host.state().captured_log();
        for line in &self.host.state().logs {
            assert!(
                !line.message.contains("panic") && line.level < LogLevel::Critical,
                "unexpected log line {line:?}\n{log}"
            );
        }
        for r in self.host.calls() {
            let refused = r.call.is_write() && r.status != Status::Ok;
            assert!(
                !refused
                    && !matches!(
                        r.call,
                        HostCall::Unimplemented { .. } | HostCall::Invalid { .. }
                    ),
                "host call failed: {r:?}\n{log}"
            );
        }
    }
}

/// Labels of every LLM-traffic series for the shipped configuration.
pub const WORKLOAD: [(&str, &str); 5] = [
    ("route", "chat"),
    ("model", "mistral-7b"),
    ("route_class", "interactive"),
    ("team", "platform-ai"),
    ("backend", "llm_stable"),
];

pub fn with<'a>(extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut v = WORKLOAD.to_vec();
    v.extend_from_slice(extra);
    v
}

/// An SSE `data:` event.
pub fn event(v: &serde_json::Value) -> Vec<u8> {
    format!("data: {v}\n\n").into_bytes()
}

/// A chat-completion chunk carrying `content`.
pub fn content_chunk(content: &str) -> Vec<u8> {
    event(&serde_json::json!({
        "id": "c1", "object": "chat.completion.chunk", "model": "mistral-7b",
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": null}]
    }))
}

pub const DONE: &[u8] = b"data: [DONE]\n\n";

pub fn chat_body(stream: bool) -> serde_json::Value {
    serde_json::json!({
        "model": "mistral-7b",
        "messages": [{"role": "user", "content": "Say hello"}],
        "max_tokens": 16,
        "stream": stream,
    })
}
