//! The HTTP layer: a thin hyper 1 server in front of the engine.
//!
//! One driver task owns the engine's clock: it sleeps until the next token
//! is due, advances the engine and hands each token to the request that
//! owns it. Requests talk to the engine through a mutex, never sleep on
//! engine time themselves, and stream one SSE event per token as soon as the
//! driver delivers it.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use crate::config::{Args, RuntimeConfig};
use crate::engine::{Engine, EngineEvent, FinishReason, Micros, SeqId, SeqRequest, Usage};
use crate::metrics::{Exposition, Histogram};
use crate::openai::{
    error_body, error_type_for, parse_embedding, parse_generation, usage_json, Endpoint,
    GenerationRequest, ResponseMeta,
};
use crate::tokens::{embedding, fnv1a, token_text, SplitMix64};

/// Largest request body accepted.
const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;

/// Error type of streamed response bodies; an error aborts the connection.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("stream reset on purpose (x-sim-reset-after / reset_rate)")]
    InjectedReset,
}

type Body = BoxBody<Bytes, BodyError>;

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("listener failed: {0}")]
    Io(#[from] std::io::Error),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Everything the handlers share.
pub struct AppState {
    args: Args,
    models: Vec<String>,
    runtime: RwLock<RuntimeConfig>,
    engine: Mutex<Engine>,
    epoch: Instant,
    start_unix: f64,
    wake: Notify,
    subscribers: Mutex<HashMap<SeqId, mpsc::UnboundedSender<EngineEvent>>>,
    rng: Mutex<SplitMix64>,
    draining: AtomicBool,
    in_flight: AtomicUsize,
    request_counter: AtomicU64,
    pod_name: Option<String>,
}

impl AppState {
    pub fn new(args: Args) -> Arc<Self> {
        let runtime = args.runtime_config();
        let engine = Engine::new(args.engine_config(), runtime.latency());
        let start_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        Arc::new(Self {
            models: args.served_models(),
            rng: Mutex::new(SplitMix64::new(args.seed)),
            args,
            runtime: RwLock::new(runtime),
            engine: Mutex::new(engine),
            epoch: Instant::now(),
            start_unix,
            wake: Notify::new(),
            subscribers: Mutex::new(HashMap::new()),
            draining: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            request_counter: AtomicU64::new(0),
            pod_name: std::env::var("POD_NAME").ok().filter(|p| !p.is_empty()),
        })
    }

    fn now_us(&self) -> Micros {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    fn runtime(&self) -> RuntimeConfig {
        self.runtime
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn ready(&self) -> bool {
        !self.draining.load(Ordering::SeqCst)
            && self.epoch.elapsed() >= Duration::from_millis(self.args.startup_delay_ms)
    }

    /// Hands engine events to their requests; aborts sequences whose
    /// request has gone away.
    fn dispatch(&self, events: Vec<EngineEvent>) {
        let mut gone = Vec::new();
        {
            let mut subs = lock(&self.subscribers);
            for ev in events {
                let (seq, last) = match &ev {
                    EngineEvent::Token { seq, .. } => (*seq, false),
                    EngineEvent::Finished { seq, .. } => (*seq, true),
                };
                if let Some(tx) = subs.get(&seq) {
                    if tx.send(ev).is_err() && !last {
                        gone.push(seq);
                    }
                }
                if last {
                    subs.remove(&seq);
                }
            }
            for seq in &gone {
                subs.remove(seq);
            }
        }
        if !gone.is_empty() {
            let now = self.now_us();
            let mut engine = lock(&self.engine);
            for seq in gone {
                engine.abort(seq, now);
            }
            drop(engine.drain_events());
        }
    }

    fn next_id(&self, prefix: &str) -> String {
        let n = self.request_counter.fetch_add(1, Ordering::SeqCst);
        let a = fnv1a(&n.to_le_bytes()) ^ self.args.seed.rotate_left(7);
        let b = fnv1a(&a.to_le_bytes()) ^ (self.start_unix.to_bits());
        format!("{prefix}-{a:016x}{b:016x}")
    }
}

/// Keeps the engine's clock: sleeps until the next token is due (or until a
/// request wakes it), advances and dispatches.
async fn drive(state: Arc<AppState>) {
    loop {
        let next = lock(&state.engine).next_wakeup();
        match next {
            Some(t) => {
                let deadline = state.epoch + Duration::from_micros(t);
                tokio::select! {
                    _ = tokio::time::sleep_until(deadline) => {}
                    _ = state.wake.notified() => {}
                }
            }
            None => state.wake.notified().await,
        }
        let now = state.now_us();
        let events = {
            let mut engine = lock(&state.engine);
            engine.advance(now);
            engine.drain_events()
        };
        state.dispatch(events);
    }
}

/// A dup of the connection's socket, so a handler can make the close a TCP
/// reset (SO_LINGER 0) when it aborts a stream on purpose.
#[derive(Default)]
struct ConnReset(Mutex<Option<std::net::TcpStream>>);

impl ConnReset {
    fn arm(&self) {
        if let Some(dup) = lock(&self.0).take() {
            let sock = socket2::SockRef::from(&dup);
            if let Err(e) = sock.set_linger(Some(Duration::ZERO)) {
                tracing::warn!(error = %e, "could not arm connection reset");
            }
        }
    }
}

/// Binds, prints the readiness line and serves until SIGTERM/SIGINT.
pub async fn serve(args: Args) -> Result<(), ServerError> {
    let addr = args.listen;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { addr, source })?;
    let local = listener.local_addr()?;
    let state = AppState::new(args);
    tokio::spawn(drive(state.clone()));
    {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "llm-sim listening on {local}");
        let _ = out.flush();
    }
    tracing::info!(%local, models = ?state.models, "llm-sim ready");

    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let (stream, reset) = match split_reset_handle(stream) {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, %peer, "connection setup failed");
                        continue;
                    }
                };
                let state = state.clone();
                tokio::spawn(async move {
                    let reset = Arc::new(reset);
                    let svc = service_fn(move |req| {
                        let state = state.clone();
                        let reset = reset.clone();
                        async move { Ok::<_, Infallible>(handle(state, reset, req).await) }
                    });
                    if let Err(e) = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await
                    {
                        tracing::debug!(error = %e, %peer, "connection ended with error");
                    }
                });
            }
            _ = &mut shutdown => break,
        }
    }
    drain(&state).await;
    Ok(())
}

fn split_reset_handle(
    stream: tokio::net::TcpStream,
) -> std::io::Result<(tokio::net::TcpStream, ConnReset)> {
    let std_stream = stream.into_std()?;
    let dup = std_stream.try_clone()?;
    let stream = tokio::net::TcpStream::from_std(std_stream)?;
    Ok((stream, ConnReset(Mutex::new(Some(dup)))))
}

pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Stops taking work (`/health` turns 503) and waits for in-flight requests.
async fn drain(state: &AppState) {
    state.draining.store(true, Ordering::SeqCst);
    tracing::info!("draining");
    let deadline = Instant::now() + Duration::from_millis(state.args.drain_timeout_ms);
    while state.in_flight.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(
        Full::new(body.into())
            .map_err(|never: Infallible| match never {})
            .boxed(),
    );
    *resp.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    resp
}

fn json_response(status: StatusCode, body: String) -> Response<Body> {
    full(status, "application/json", body)
}

fn error_response(
    status: u16,
    message: &str,
    kind: Option<&str>,
    param: Option<&str>,
) -> Response<Body> {
    let kind = kind.unwrap_or_else(|| error_type_for(status));
    let status_code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(status_code, error_body(message, kind, param, status))
}

/// The served model a request names (the first one when it names none), or
/// vLLM's 404 for a model this server does not serve.
fn served_model(state: &AppState, requested: &str) -> Result<String, Box<Response<Body>>> {
    let model = if requested.is_empty() {
        state.models.first().cloned().unwrap_or_default()
    } else {
        requested.to_string()
    };
    if state.models.contains(&model) {
        Ok(model)
    } else {
        Err(Box::new(error_response(
            404,
            &format!("The model `{model}` does not exist."),
            Some("NotFoundError"),
            Some("model"),
        )))
    }
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

fn header_num<T: std::str::FromStr>(headers: &HeaderMap, name: &str) -> Option<T> {
    header_str(headers, name).and_then(|v| v.parse().ok())
}

async fn read_body(
    req: Request<Incoming>,
) -> Result<(http::request::Parts, Bytes), Response<Body>> {
    let (parts, body) = req.into_parts();
    match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(c) => Ok((parts, c.to_bytes())),
        Err(e) => Err(error_response(
            400,
            &format!("could not read request body: {e}"),
            None,
            None,
        )),
    }
}

async fn handle(
    state: Arc<AppState>,
    reset: Arc<ConnReset>,
    req: Request<Incoming>,
) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let mut resp = match (&method, path.as_str()) {
        (&Method::GET, "/health") => {
            let status = if state.ready() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            full(status, "application/json", Bytes::new())
        }
        (&Method::GET, "/metrics") => full(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            render_metrics(&state),
        ),
        (&Method::GET, "/v1/models") => models_response(&state),
        (&Method::GET, "/version") => json_response(
            StatusCode::OK,
            json!({"version": env!("CARGO_PKG_VERSION")}).to_string(),
        ),
        (&Method::GET, "/admin/config") => json_response(
            StatusCode::OK,
            serde_json::to_string(&state.runtime()).unwrap_or_default(),
        ),
        (&Method::POST, "/admin/config") => admin_config(&state, req).await,
        (&Method::POST, "/admin/restart") => admin_restart(),
        (&Method::POST, "/v1/chat/completions") => {
            generation(&state, &reset, req, Endpoint::Chat).await
        }
        (&Method::POST, "/v1/completions") => {
            generation(&state, &reset, req, Endpoint::Completion).await
        }
        (&Method::POST, "/v1/embeddings") => embeddings(&state, req).await,
        (
            _,
            "/health"
            | "/metrics"
            | "/v1/models"
            | "/admin/config"
            | "/admin/restart"
            | "/v1/chat/completions"
            | "/v1/completions"
            | "/v1/embeddings",
        ) => error_response(405, "Method Not Allowed", None, None),
        _ => error_response(404, "Not Found", None, None),
    };
    if let Some(pod) = &state.pod_name {
        if let Ok(v) = HeaderValue::from_str(pod) {
            resp.headers_mut().insert("x-inference-pod", v);
        }
    }
    resp
}

fn models_response(state: &AppState) -> Response<Body> {
    let created = state.start_unix as u64;
    let data: Vec<_> = state
        .models
        .iter()
        .map(|m| {
            json!({
                "id": m, "object": "model", "created": created, "owned_by": "vllm",
                "root": m, "parent": null, "max_model_len": state.args.max_model_len,
            })
        })
        .collect();
    json_response(
        StatusCode::OK,
        json!({"object": "list", "data": data}).to_string(),
    )
}

async fn admin_config(state: &AppState, req: Request<Incoming>) -> Response<Body> {
    let (_, body) = match read_body(req).await {
        Ok(x) => x,
        Err(resp) => return resp,
    };
    let current = state.runtime();
    match current.merge_json(&body) {
        Ok(next) => {
            lock(&state.engine).set_latency(next.latency());
            *state.runtime.write().unwrap_or_else(|p| p.into_inner()) = next.clone();
            tracing::info!(config = ?next, "admin config updated");
            state.wake.notify_one();
            json_response(
                StatusCode::OK,
                serde_json::to_string(&next).unwrap_or_default(),
            )
        }
        Err(e) => error_response(400, &e.to_string(), None, None),
    }
}

/// Answers, then exits the process; under `--supervise` the supervisor
/// starts a fresh one (counters from zero).
fn admin_restart() -> Response<Body> {
    tracing::warn!("restart requested through /admin/restart; exiting");
    tokio::spawn(async {
        tokio::time::sleep(Duration::from_millis(20)).await;
        std::process::exit(0);
    });
    json_response(StatusCode::OK, json!({"restarting": true}).to_string())
}

/// RAG headers decided before generation starts.
struct RagOutcome {
    headers: Vec<(&'static str, String)>,
}

/// In-flight accounting that survives early returns.
struct InFlight(Arc<AppState>);

impl InFlight {
    fn new(state: &Arc<AppState>) -> Self {
        state.in_flight.fetch_add(1, Ordering::SeqCst);
        Self(state.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Aborts the engine sequence when its request ends before it finished.
struct SeqGuard {
    state: Arc<AppState>,
    id: SeqId,
    finished: bool,
}

impl Drop for SeqGuard {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        lock(&self.state.subscribers).remove(&self.id);
        let now = self.state.now_us();
        let mut engine = lock(&self.state.engine);
        engine.abort(self.id, now);
        drop(engine.drain_events());
        drop(engine);
        self.state.wake.notify_one();
    }
}

async fn generation(
    state: &Arc<AppState>,
    reset: &Arc<ConnReset>,
    req: Request<Incoming>,
    endpoint: Endpoint,
) -> Response<Body> {
    let in_flight = InFlight::new(state);
    let (parts, body) = match read_body(req).await {
        Ok(x) => x,
        Err(resp) => return resp,
    };
    let headers = &parts.headers;
    if !state.ready() {
        return error_response(
            503,
            "The server is not ready (starting or draining).",
            None,
            None,
        );
    }
    if let Some(status) = header_num::<u16>(headers, "x-sim-fail") {
        let status = if (400..=599).contains(&status) {
            status
        } else {
            500
        };
        return error_response(
            status,
            &format!("Injected failure (x-sim-fail: {status})."),
            None,
            None,
        );
    }
    let parsed = match parse_generation(endpoint, &body) {
        Ok(p) => p,
        Err(e) => return error_response(400, &e.to_string(), None, None),
    };
    let model = match served_model(state, &parsed.model) {
        Ok(m) => m,
        Err(response) => return *response,
    };
    let runtime = state.runtime();
    let (inject_error, inject_reset) = {
        let mut rng = lock(&state.rng);
        let e = if runtime.error_rate > 0.0 {
            let draw = rng.next_f64();
            (draw < runtime.error_rate).then(|| if rng.next_u64() % 2 == 0 { 500 } else { 503 })
        } else {
            None
        };
        let r = if runtime.reset_rate > 0.0 && parsed.stream {
            let draw = rng.next_f64();
            (draw < runtime.reset_rate).then(|| rng.next_u64())
        } else {
            None
        };
        (e, r)
    };
    if let Some(status) = inject_error {
        return error_response(status, "Injected failure (error_rate).", None, None);
    }

    let rag = match rag_outcome(headers, &parsed, &runtime).await {
        Ok(r) => r,
        Err(resp) => return resp,
    };

    let default_out = header_num::<u32>(headers, "x-sim-output-tokens")
        .unwrap_or(state.args.default_output_tokens)
        .max(1);
    let (output_tokens, length_capped) = match parsed.max_tokens {
        Some(max) if max <= default_out => (max.max(1), true),
        _ => (default_out, false),
    };
    let seq_req = SeqRequest {
        prompt_tokens: parsed.prompt_tokens,
        max_output_tokens: output_tokens,
        prefix_key: parsed.prompt_key,
        length_capped,
        ttft_override_ms: header_num(headers, "x-sim-ttft-ms"),
        itl_override_ms: header_num(headers, "x-sim-itl-ms"),
        max_tokens_param: parsed.max_tokens,
    };
    let reset_after = header_num::<u32>(headers, "x-sim-reset-after")
        .or_else(|| inject_reset.map(|r| 1 + (r % u64::from(output_tokens.max(2) - 1)) as u32));
    let no_usage = header_str(headers, "x-sim-no-usage").is_some_and(|v| v == "1" || v == "true");

    let (tx, rx) = mpsc::unbounded_channel();
    let submitted = {
        let now = state.now_us();
        let mut engine = lock(&state.engine);
        match engine.submit(seq_req, now) {
            Ok(id) => {
                lock(&state.subscribers).insert(id, tx);
                Ok((id, engine.drain_events()))
            }
            Err(e) => Err(e),
        }
    };
    let (id, early) = match submitted {
        Ok(x) => x,
        Err(e) => return error_response(400, &e.to_string(), None, None),
    };
    state.dispatch(early);
    state.wake.notify_one();
    let guard = SeqGuard {
        state: state.clone(),
        id,
        finished: false,
    };
    let meta = ResponseMeta {
        id: state.next_id(match endpoint {
            Endpoint::Chat => "chatcmpl",
            Endpoint::Completion => "cmpl",
        }),
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        model,
        endpoint,
    };
    let job = Job {
        state: state.clone(),
        meta,
        parsed,
        output_tokens,
        length_capped,
        no_usage,
        reset_after,
        rx,
        guard,
        _in_flight: in_flight,
    };
    let mut resp = if job.parsed.stream {
        stream_response(job, reset.clone())
    } else {
        job.complete().await
    };
    for (k, v) in rag.headers {
        if let Ok(v) = HeaderValue::from_str(&v) {
            resp.headers_mut().insert(k, v);
        }
    }
    resp
}

async fn rag_outcome(
    headers: &HeaderMap,
    parsed: &GenerationRequest,
    runtime: &RuntimeConfig,
) -> Result<RagOutcome, Response<Body>> {
    let collection = header_str(headers, "x-rag-collection")
        .map(str::to_string)
        .or_else(|| parsed.rag.collection.clone())
        .filter(|c| !c.is_empty());
    let Some(collection) = collection else {
        return Ok(RagOutcome { headers: vec![] });
    };
    if runtime.rag_vector_store_down {
        let mut resp = error_response(
            503,
            "Vector store unreachable: retrieval failed.",
            Some("vector_store_unreachable"),
            None,
        );
        resp.headers_mut().insert(
            "x-rag-error",
            HeaderValue::from_static("vector_store_unreachable"),
        );
        if let Ok(v) = HeaderValue::from_str(&collection) {
            resp.headers_mut().insert("x-rag-collection", v);
        }
        return Err(resp);
    }
    if runtime.rag_retrieval_ms > 0.0 {
        tokio::time::sleep(Duration::from_secs_f64(runtime.rag_retrieval_ms / 1000.0)).await;
    }
    let top_k = header_num::<u32>(headers, "x-rag-top-k")
        .or(parsed.rag.top_k)
        .unwrap_or(4);
    let score = header_num::<f64>(headers, "x-sim-rag-top-score")
        .filter(|s| (0.0..=1.0).contains(s))
        .unwrap_or(runtime.rag_top_score);
    let evaluation = if score < runtime.rag_min_score {
        "fail"
    } else {
        "pass"
    };
    Ok(RagOutcome {
        headers: vec![
            ("x-rag-collection", collection),
            (
                "x-rag-retrieval-ms",
                format!("{}", runtime.rag_retrieval_ms),
            ),
            ("x-rag-top-score", format!("{score}")),
            ("x-rag-sources", top_k.to_string()),
            ("x-rag-evaluation", evaluation.to_string()),
            (
                "x-rag-index-age-seconds",
                format!("{}", runtime.rag_index_age_seconds),
            ),
        ],
    })
}

/// One admitted generation and what its response needs.
struct Job {
    state: Arc<AppState>,
    meta: ResponseMeta,
    parsed: GenerationRequest,
    output_tokens: u32,
    length_capped: bool,
    no_usage: bool,
    reset_after: Option<u32>,
    rx: mpsc::UnboundedReceiver<EngineEvent>,
    guard: SeqGuard,
    _in_flight: InFlight,
}

impl Job {
    fn finish_reason(&self) -> &'static str {
        if self.length_capped {
            FinishReason::Length.as_str()
        } else {
            FinishReason::Stop.as_str()
        }
    }

    fn text(&self, index: u32) -> String {
        token_text(self.state.args.seed, self.parsed.prompt_key, index)
    }

    fn usage(&self, u: &Usage) -> String {
        usage_json(
            u.prompt_tokens,
            u.completion_tokens,
            u.cached_tokens,
            self.state.args.enable_prompt_tokens_details,
        )
    }

    async fn complete(mut self) -> Response<Body> {
        let mut text = String::new();
        while let Some(ev) = self.rx.recv().await {
            match ev {
                EngineEvent::Token { index, .. } => text.push_str(&self.text(index)),
                EngineEvent::Finished { usage, reason, .. } => {
                    self.guard.finished = true;
                    if reason == FinishReason::Abort {
                        break;
                    }
                    let u = self.usage(&usage);
                    let body = self.meta.full_response(
                        &text,
                        self.finish_reason(),
                        (!self.no_usage).then_some(u.as_str()),
                    );
                    return json_response(StatusCode::OK, body);
                }
            }
        }
        error_response(500, "generation aborted", None, None)
    }
}

fn sse(data: &str) -> Frame<Bytes> {
    Frame::data(Bytes::from(format!("data: {data}\n\n")))
}

fn stream_response(job: Job, reset: Arc<ConnReset>) -> Response<Body> {
    let (tx, mut rx) = mpsc::channel::<Result<Frame<Bytes>, BodyError>>(16);
    tokio::spawn(run_stream(job, reset, tx));
    let body = StreamBody::new(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)));
    let mut resp = Response::new(BodyExt::boxed(body));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    resp
}

async fn run_stream(
    mut job: Job,
    reset: Arc<ConnReset>,
    tx: mpsc::Sender<Result<Frame<Bytes>, BodyError>>,
) {
    if job.meta.endpoint == Endpoint::Chat
        && tx.send(Ok(sse(&job.meta.role_chunk()))).await.is_err()
    {
        return;
    }
    let last_index = job.output_tokens.saturating_sub(1);
    let mut sent = 0u32;
    while let Some(ev) = job.rx.recv().await {
        match ev {
            EngineEvent::Token { index, .. } => {
                let finish = (index == last_index).then(|| job.finish_reason());
                let chunk = job.meta.token_chunk(&job.text(index), finish);
                if tx.send(Ok(sse(&chunk))).await.is_err() {
                    return;
                }
                sent += 1;
                if job.reset_after == Some(sent) {
                    tracing::info!(id = %job.meta.id, after = sent, "resetting stream on purpose");
                    // Let hyper flush the events already sent: a reset drops
                    // whatever is still unsent in the socket buffer.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    reset.arm();
                    let _ = tx.send(Err(BodyError::InjectedReset)).await;
                    return;
                }
            }
            EngineEvent::Finished { usage, reason, .. } => {
                job.guard.finished = true;
                if reason == FinishReason::Abort {
                    return;
                }
                if job.parsed.include_usage && !job.no_usage {
                    let u = job.usage(&usage);
                    if tx.send(Ok(sse(&job.meta.usage_chunk(&u)))).await.is_err() {
                        return;
                    }
                }
                let _ = tx.send(Ok(sse("[DONE]"))).await;
                return;
            }
        }
    }
}

async fn embeddings(state: &Arc<AppState>, req: Request<Incoming>) -> Response<Body> {
    let _in_flight = InFlight::new(state);
    let (parts, body) = match read_body(req).await {
        Ok(x) => x,
        Err(resp) => return resp,
    };
    if !state.ready() {
        return error_response(
            503,
            "The server is not ready (starting or draining).",
            None,
            None,
        );
    }
    if let Some(status) = header_num::<u16>(&parts.headers, "x-sim-fail") {
        let status = if (400..=599).contains(&status) {
            status
        } else {
            500
        };
        return error_response(
            status,
            &format!("Injected failure (x-sim-fail: {status})."),
            None,
            None,
        );
    }
    let parsed = match parse_embedding(&body) {
        Ok(p) => p,
        Err(e) => return error_response(400, &e.to_string(), None, None),
    };
    let model = match served_model(state, &parsed.model) {
        Ok(m) => m,
        Err(response) => return *response,
    };
    let tokens: u64 = parsed.inputs.iter().map(|(t, _)| u64::from(*t)).sum();
    let latency = lock(&state.engine).latency();
    let wait_us = latency.prefill_us(tokens, header_num(&parts.headers, "x-sim-ttft-ms"));
    tokio::time::sleep(Duration::from_micros(wait_us)).await;
    let data: Vec<_> = parsed
        .inputs
        .iter()
        .enumerate()
        .map(|(i, (_, key))| {
            json!({"index": i, "object": "embedding",
                   "embedding": embedding(state.args.seed, *key, state.args.embedding_dim)})
        })
        .collect();
    let body = json!({
        "id": state.next_id("embd"),
        "object": "list",
        "created": state.start_unix as u64,
        "model": model,
        "data": data,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0,
                  "prompt_tokens_details": null},
    });
    json_response(StatusCode::OK, body.to_string())
}

/// `/metrics` in vLLM's exposition.
pub fn render_metrics(state: &AppState) -> String {
    let now = state.now_us();
    let (gauges, stats, cfg, total_blocks) = {
        let mut engine = lock(&state.engine);
        engine.advance(now);
        let events = engine.drain_events();
        let snap = (
            engine.gauges(),
            engine.stats().clone(),
            engine.config().clone(),
            engine.total_blocks(),
        );
        drop(engine);
        state.dispatch(events);
        snap
    };
    let model = state.models.first().cloned().unwrap_or_default();
    let labels: &[(&str, &str)] = &[("model_name", model.as_str()), ("engine", "0")];
    let created = state.start_unix;
    let mut e = Exposition::new();
    e.gauge(
        "process_start_time_seconds",
        "Start time of the process since unix epoch in seconds.",
        &[(&[], state.start_unix)],
    );
    e.gauge(
        "vllm:num_requests_running",
        "Number of requests in model execution batches.",
        &[(labels, gauges.running as f64)],
    );
    e.gauge(
        "vllm:num_requests_waiting",
        "Number of requests waiting to be processed.",
        &[(labels, gauges.waiting as f64)],
    );
    e.gauge(
        "vllm:kv_cache_usage_perc",
        "KV-cache usage. 1 means 100 percent usage.",
        &[(labels, gauges.kv_cache_usage)],
    );
    e.counter(
        "vllm:prefix_cache_queries",
        "Prefix cache queries, in terms of number of queried tokens.",
        &[(labels, stats.prefix_cache_queries as f64)],
        created,
    );
    e.counter(
        "vllm:prefix_cache_hits",
        "Prefix cache hits, in terms of number of cached tokens.",
        &[(labels, stats.prefix_cache_hits as f64)],
        created,
    );
    e.counter(
        "vllm:num_preemptions",
        "Cumulative number of preemption from the engine.",
        &[(labels, stats.preemptions as f64)],
        created,
    );
    e.counter(
        "vllm:prompt_tokens",
        "Number of prefill tokens processed.",
        &[(labels, stats.prompt_tokens as f64)],
        created,
    );
    e.counter(
        "vllm:generation_tokens",
        "Number of generation tokens processed.",
        &[(labels, stats.generation_tokens as f64)],
        created,
    );
    let reasons: Vec<[(&str, &str); 3]> = FinishReason::ALL
        .iter()
        .map(|r| {
            [
                ("model_name", model.as_str()),
                ("engine", "0"),
                ("finished_reason", r.as_str()),
            ]
        })
        .collect();
    let success: Vec<(&[(&str, &str)], f64)> = reasons
        .iter()
        .zip(FinishReason::ALL)
        .map(|(l, r)| (&l[..], stats.success(r) as f64))
        .collect();
    e.counter(
        "vllm:request_success",
        "Count of successfully processed requests.",
        &success,
        created,
    );
    let hist = |e: &mut Exposition, name: &str, help: &str, h: &Histogram| {
        e.histogram(name, help, &[(labels, h)], created);
    };
    hist(
        &mut e,
        "vllm:request_prompt_tokens",
        "Number of prefill tokens processed.",
        &stats.request_prompt_tokens,
    );
    hist(
        &mut e,
        "vllm:request_generation_tokens",
        "Number of generation tokens processed.",
        &stats.request_generation_tokens,
    );
    hist(
        &mut e,
        "vllm:iteration_tokens_total",
        "Histogram of number of tokens per engine_step.",
        &stats.iteration_tokens,
    );
    hist(
        &mut e,
        "vllm:request_params_n",
        "Histogram of the n request parameter.",
        &stats.request_params_n,
    );
    hist(
        &mut e,
        "vllm:request_params_max_tokens",
        "Histogram of the max_tokens request parameter.",
        &stats.request_params_max_tokens,
    );
    hist(
        &mut e,
        "vllm:time_to_first_token_seconds",
        "Histogram of time to first token in seconds.",
        &stats.ttft,
    );
    hist(
        &mut e,
        "vllm:inter_token_latency_seconds",
        "Histogram of inter-token latency in seconds.",
        &stats.itl,
    );
    hist(
        &mut e,
        "vllm:request_time_per_output_token_seconds",
        "Histogram of time_per_output_token_seconds per request.",
        &stats.request_tpot,
    );
    hist(
        &mut e,
        "vllm:e2e_request_latency_seconds",
        "Histogram of e2e request latency in seconds.",
        &stats.e2e,
    );
    hist(
        &mut e,
        "vllm:request_queue_time_seconds",
        "Histogram of time spent in WAITING phase for request.",
        &stats.queue,
    );
    hist(
        &mut e,
        "vllm:request_inference_time_seconds",
        "Histogram of time spent in RUNNING phase for request.",
        &stats.inference,
    );
    hist(
        &mut e,
        "vllm:request_prefill_time_seconds",
        "Histogram of time spent in PREFILL phase for request.",
        &stats.prefill,
    );
    hist(
        &mut e,
        "vllm:request_decode_time_seconds",
        "Histogram of time spent in DECODE phase for request.",
        &stats.decode,
    );
    let block_size = cfg.block_size.to_string();
    let num_blocks = total_blocks.to_string();
    let prefix = if cfg.enable_prefix_caching {
        "True"
    } else {
        "False"
    };
    e.gauge(
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
    e.finish()
}
