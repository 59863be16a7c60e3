//! `/v1/chat/completions` and `/v1/completions`: admission (readiness,
//! injected failures, RAG headers), submission to the engine, and the
//! answer as one JSON body or one SSE event per token.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::sync::mpsc;

use super::http_util::{
    error_response, header_num, header_str, insert_header, json_response, read_body, Body,
    BodyError, RequestBody,
};
use super::routes::{refusal, served_model};
use super::state::{lock, AppState, InFlight, SeqGuard};
use super::ConnReset;
use crate::config::RuntimeConfig;
use crate::engine::{EngineEvent, FinishReason, SeqId, SeqRequest, Usage};
use crate::openai::{
    messages_usage_json, parse_generation, responses_usage_json, usage_json, Endpoint,
    GenerationRequest, ResponseMeta,
};
use crate::tokens::token_text;

/// Serves one generation request from body to last token.
pub(crate) async fn generation(
    state: &Arc<AppState>,
    reset: &Arc<ConnReset>,
    req: Request<RequestBody>,
    endpoint: Endpoint,
) -> Response<Body> {
    let in_flight = InFlight::new(state);
    let (parts, body) = match read_body(req).await {
        Ok(x) => x,
        Err(resp) => return resp,
    };
    let headers = &parts.headers;
    if let Some(resp) = refusal(state, headers) {
        return resp;
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
    let injected = draw_injections(state, &runtime, parsed.stream);
    if let Some(status) = injected.error_status {
        return error_response(status, "Injected failure (error_rate).", None, None);
    }
    let rag = match rag_outcome(headers, &parsed, &runtime).await {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let plan = OutputPlan::new(state, headers, &parsed, injected.reset_draw);
    let (id, rx) = match submit(state, plan.seq_request(headers, &parsed)) {
        Ok(x) => x,
        Err(resp) => return *resp,
    };
    let job = Job {
        state: state.clone(),
        meta: response_meta(state, endpoint, model),
        parsed,
        plan,
        rx,
        guard: SeqGuard {
            state: state.clone(),
            id,
            finished: false,
        },
        _in_flight: in_flight,
    };
    let mut resp = if job.parsed.stream {
        stream_response(job, reset.clone())
    } else {
        job.complete().await
    };
    for (name, value) in rag.headers {
        insert_header(&mut resp, name, &value);
    }
    resp
}

/// The random failures the runtime config asks for, drawn per request.
struct Injections {
    /// 500 or 503 when this request fails on purpose (`error_rate`).
    error_status: Option<u16>,
    /// A draw that picks the token after which this stream resets
    /// (`reset_rate`; streams only).
    reset_draw: Option<u64>,
}

fn draw_injections(state: &AppState, runtime: &RuntimeConfig, stream: bool) -> Injections {
    let mut rng = lock(&state.rng);
    let error_status = if runtime.error_rate > 0.0 {
        let draw = rng.next_f64();
        (draw < runtime.error_rate).then(|| if rng.next_u64() % 2 == 0 { 500 } else { 503 })
    } else {
        None
    };
    let reset_draw = if runtime.reset_rate > 0.0 && stream {
        let draw = rng.next_f64();
        (draw < runtime.reset_rate).then(|| rng.next_u64())
    } else {
        None
    };
    Injections {
        error_status,
        reset_draw,
    }
}

/// How long the answer is and how it ends, decided before submission.
struct OutputPlan {
    output_tokens: u32,
    /// The request's `max_tokens` cut the answer (`finish_reason: length`).
    length_capped: bool,
    /// Leave `usage` out of the answer (`x-sim-no-usage`).
    no_usage: bool,
    /// Reset the stream after this many tokens.
    reset_after: Option<u32>,
}

impl OutputPlan {
    fn new(
        state: &AppState,
        headers: &HeaderMap,
        parsed: &GenerationRequest,
        reset_draw: Option<u64>,
    ) -> Self {
        let default_out = header_num::<u32>(headers, "x-sim-output-tokens")
            .unwrap_or(state.args.default_output_tokens)
            .max(1);
        let (output_tokens, length_capped) = match parsed.max_tokens {
            Some(max) if max <= default_out => (max.max(1), true),
            _ => (default_out, false),
        };
        let reset_after = header_num::<u32>(headers, "x-sim-reset-after")
            .or_else(|| reset_draw.map(|r| 1 + (r % u64::from(output_tokens.max(2) - 1)) as u32));
        let no_usage =
            header_str(headers, "x-sim-no-usage").is_some_and(|v| v == "1" || v == "true");
        Self {
            output_tokens,
            length_capped,
            no_usage,
            reset_after,
        }
    }

    fn seq_request(&self, headers: &HeaderMap, parsed: &GenerationRequest) -> SeqRequest {
        SeqRequest {
            prompt_tokens: parsed.prompt_tokens,
            max_output_tokens: self.output_tokens,
            prefix_key: parsed.prompt_key,
            length_capped: self.length_capped,
            ttft_override_ms: header_num(headers, "x-sim-ttft-ms"),
            itl_override_ms: header_num(headers, "x-sim-itl-ms"),
            max_tokens_param: parsed.max_tokens,
        }
    }
}

/// Submits to the engine and subscribes to the sequence's events; an engine
/// refusal (too long for the model) is a 400.
fn submit(
    state: &AppState,
    seq_req: SeqRequest,
) -> Result<(SeqId, mpsc::UnboundedReceiver<EngineEvent>), Box<Response<Body>>> {
    let (tx, rx) = mpsc::unbounded_channel();
    let submitted = {
        let now = state.now_us();
        let mut engine = lock(&state.engine);
        engine.submit(seq_req, now).map(|id| {
            lock(&state.subscribers).insert(id, tx);
            (id, engine.drain_events())
        })
    };
    let (id, early) =
        submitted.map_err(|e| Box::new(error_response(400, &e.to_string(), None, None)))?;
    state.dispatch(early);
    state.wake.notify_one();
    Ok((id, rx))
}

fn response_meta(state: &AppState, endpoint: Endpoint, model: String) -> ResponseMeta {
    ResponseMeta {
        id: state.next_id(match endpoint {
            Endpoint::Chat => "chatcmpl",
            Endpoint::Completion => "cmpl",
            Endpoint::Responses => "resp",
            Endpoint::Messages => "msg",
        }),
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        model,
        endpoint,
    }
}

/// RAG headers decided before generation starts.
struct RagOutcome {
    headers: Vec<(&'static str, String)>,
}

/// The simulated retrieval a request asks for (`x-rag-collection` header or
/// body field): its delay and result headers, or the 503 of a vector store
/// that is down.
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
        return Err(vector_store_down(&collection));
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

fn vector_store_down(collection: &str) -> Response<Body> {
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
    insert_header(&mut resp, "x-rag-collection", collection);
    resp
}

/// One admitted generation and what its response needs.
struct Job {
    state: Arc<AppState>,
    meta: ResponseMeta,
    parsed: GenerationRequest,
    plan: OutputPlan,
    rx: mpsc::UnboundedReceiver<EngineEvent>,
    guard: SeqGuard,
    _in_flight: InFlight,
}

impl Job {
    fn finish_reason(&self) -> &'static str {
        if self.plan.length_capped {
            FinishReason::Length.as_str()
        } else {
            FinishReason::Stop.as_str()
        }
    }

    fn text(&self, index: u32) -> String {
        token_text(self.state.args.seed, self.parsed.prompt_key, index)
    }

    fn usage(&self, u: &Usage) -> String {
        match self.meta.endpoint {
            Endpoint::Responses => {
                responses_usage_json(u.prompt_tokens, u.completion_tokens, u.cached_tokens)
            }
            Endpoint::Messages => messages_usage_json(u.prompt_tokens, u.completion_tokens),
            _ => usage_json(
                u.prompt_tokens,
                u.completion_tokens,
                u.cached_tokens,
                self.state.args.enable_prompt_tokens_details,
            ),
        }
    }

    /// Collects every token, then answers with one JSON body.
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
                    let usage = self.usage(&usage);
                    let body = self.meta.full_response(
                        &text,
                        self.finish_reason(),
                        (!self.plan.no_usage).then_some(usage.as_str()),
                    );
                    return json_response(StatusCode::OK, body);
                }
            }
        }
        error_response(500, "generation aborted", None, None)
    }
}

/// One SSE event.
fn sse(data: &str) -> Frame<Bytes> {
    Frame::data(Bytes::from(format!("data: {data}\n\n")))
}

/// One SSE event with an `event:` name (Responses and Messages APIs).
fn named(name: &str, data: &str) -> Frame<Bytes> {
    Frame::data(Bytes::from(format!("event: {name}\ndata: {data}\n\n")))
}

/// Sends named events in order; false once the client is gone.
async fn send_all(tx: &FrameSender, events: Vec<(&'static str, String)>) -> bool {
    for (name, data) in events {
        if tx.send(Ok(named(name, &data))).await.is_err() {
            return false;
        }
    }
    true
}

type FrameSender = mpsc::Sender<Result<Frame<Bytes>, BodyError>>;

/// An SSE response whose events a spawned task writes as tokens arrive.
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

/// Writes the stream's events until the sequence ends, the client goes
/// away, or an injected reset aborts the connection.
async fn run_stream(mut job: Job, reset: Arc<ConnReset>, tx: FrameSender) {
    let opening = match job.meta.endpoint {
        Endpoint::Chat => tx.send(Ok(sse(&job.meta.role_chunk()))).await.is_ok(),
        Endpoint::Completion => true,
        Endpoint::Responses => send_all(&tx, job.meta.responses_start()).await,
        Endpoint::Messages => {
            let prompt = (!job.plan.no_usage).then_some(job.parsed.prompt_tokens);
            send_all(&tx, job.meta.messages_start(prompt)).await
        }
    };
    if !opening {
        return;
    }
    let mut text = String::new();
    let last_index = job.plan.output_tokens.saturating_sub(1);
    let mut sent = 0u32;
    while let Some(ev) = job.rx.recv().await {
        match ev {
            EngineEvent::Token { index, .. } => {
                let token = job.text(index);
                let frame = match job.meta.endpoint {
                    Endpoint::Responses => {
                        text.push_str(&token);
                        named(
                            "response.output_text.delta",
                            &job.meta.responses_delta(index, &token),
                        )
                    }
                    Endpoint::Messages => {
                        named("content_block_delta", &job.meta.messages_delta(&token))
                    }
                    _ => {
                        let finish = (index == last_index).then(|| job.finish_reason());
                        sse(&job.meta.token_chunk(&token, finish))
                    }
                };
                if tx.send(Ok(frame)).await.is_err() {
                    return;
                }
                sent += 1;
                if job.plan.reset_after == Some(sent) {
                    reset_stream(&job, &reset, &tx, sent).await;
                    return;
                }
            }
            EngineEvent::Finished { usage, reason, .. } => {
                job.guard.finished = true;
                if reason != FinishReason::Abort {
                    finish_stream(&job, &usage, &tx, sent, &text).await;
                }
                return;
            }
        }
    }
}

/// Resets the connection after the events already sent reached the client.
async fn reset_stream(job: &Job, reset: &ConnReset, tx: &FrameSender, sent: u32) {
    tracing::info!(id = %job.meta.id, after = sent, "resetting stream on purpose");
    // Let hyper flush the events already sent: a reset drops whatever is
    // still unsent in the socket buffer.
    tokio::time::sleep(Duration::from_millis(10)).await;
    reset.arm();
    let _ = tx.send(Err(BodyError::InjectedReset)).await;
}

/// The usage chunk (when asked for) and `[DONE]`; for the Responses and
/// Messages APIs their closing events, usage included (always, as vLLM
/// does, unless `x-sim-no-usage`).
async fn finish_stream(job: &Job, usage: &Usage, tx: &FrameSender, sent: u32, text: &str) {
    let usage_json = (!job.plan.no_usage).then(|| job.usage(usage));
    match job.meta.endpoint {
        Endpoint::Responses => {
            send_all(
                tx,
                job.meta.responses_end(sent, text, usage_json.as_deref()),
            )
            .await;
            return;
        }
        Endpoint::Messages => {
            send_all(
                tx,
                job.meta
                    .messages_end(job.finish_reason(), usage_json.as_deref()),
            )
            .await;
            return;
        }
        Endpoint::Chat | Endpoint::Completion => {}
    }
    if job.parsed.include_usage && !job.plan.no_usage {
        let usage = job.usage(usage);
        if tx
            .send(Ok(sse(&job.meta.usage_chunk(&usage))))
            .await
            .is_err()
        {
            return;
        }
    }
    let _ = tx.send(Ok(sse("[DONE]"))).await;
}
