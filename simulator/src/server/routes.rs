//! The routes: which handler answers each method and path, and the small
//! handlers (health, models, version, admin, embeddings). Generation lives
//! in `generation.rs`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use serde_json::json;

use super::generation::generation;
use super::http_util::{
    error_response, full, header_num, insert_header, json_response, read_body, Body, RequestBody,
};
use super::state::{lock, AppState, InFlight};
use super::vllm_metrics::render_metrics;
use super::ConnReset;
use crate::openai::{parse_embedding, Endpoint};
use crate::tokens::embedding;

/// Every path served; another method on one of them is a 405, not a 404.
const PATHS: [&str; 10] = [
    "/health",
    "/metrics",
    "/v1/models",
    "/admin/config",
    "/admin/restart",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/messages",
];

/// Answers one request; every response names the pod when `POD_NAME` is set.
pub(crate) async fn handle(
    state: Arc<AppState>,
    reset: Arc<ConnReset>,
    req: Request<RequestBody>,
) -> Response<Body> {
    let mut resp = route(&state, &reset, req).await;
    if let Some(pod) = &state.pod_name {
        insert_header(&mut resp, "x-inference-pod", pod);
    }
    resp
}

async fn route(
    state: &Arc<AppState>,
    reset: &Arc<ConnReset>,
    req: Request<RequestBody>,
) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    match (method, path.as_str()) {
        (Method::GET, "/health") => health(state),
        (Method::GET, "/metrics") => full(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            render_metrics(state),
        ),
        (Method::GET, "/v1/models") => models_response(state),
        (Method::GET, "/version") => json_response(
            StatusCode::OK,
            json!({"version": env!("CARGO_PKG_VERSION")}).to_string(),
        ),
        (Method::GET, "/admin/config") => json_response(
            StatusCode::OK,
            serde_json::to_string(&state.runtime()).unwrap_or_default(),
        ),
        (Method::POST, "/admin/config") => admin_config(state, req).await,
        (Method::POST, "/admin/restart") => admin_restart(),
        (Method::POST, "/v1/chat/completions") => {
            generation(state, reset, req, Endpoint::Chat).await
        }
        (Method::POST, "/v1/completions") => {
            generation(state, reset, req, Endpoint::Completion).await
        }
        (Method::POST, "/v1/embeddings") => embeddings(state, req).await,
        (Method::POST, "/v1/responses") => generation(state, reset, req, Endpoint::Responses).await,
        (Method::POST, "/v1/messages") => generation(state, reset, req, Endpoint::Messages).await,
        (_, p) if PATHS.contains(&p) => error_response(405, "Method Not Allowed", None, None),
        _ => error_response(404, "Not Found", None, None),
    }
}

/// 200 when ready, 503 while starting or draining (an empty JSON body,
/// like vLLM's).
fn health(state: &AppState) -> Response<Body> {
    let status = if state.ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    full(status, "application/json", Bytes::new())
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

/// Merges a partial runtime config (JSON) into the current one.
async fn admin_config(state: &AppState, req: Request<RequestBody>) -> Response<Body> {
    let (_, body) = match read_body(req).await {
        Ok(x) => x,
        Err(resp) => return resp,
    };
    match state.runtime().merge_json(&body) {
        Ok(next) => {
            tracing::info!(config = ?next, "admin config updated");
            let answer = serde_json::to_string(&next).unwrap_or_default();
            state.set_runtime(next);
            json_response(StatusCode::OK, answer)
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

/// The answer to a request that must not start work: 503 while starting or
/// draining, or the status an `x-sim-fail` header asks for (500 when it
/// names no 4xx/5xx).
pub(crate) fn refusal(state: &AppState, headers: &HeaderMap) -> Option<Response<Body>> {
    if !state.ready() {
        return Some(error_response(
            503,
            "The server is not ready (starting or draining).",
            None,
            None,
        ));
    }
    let status = header_num::<u16>(headers, "x-sim-fail")?;
    let status = if (400..=599).contains(&status) {
        status
    } else {
        500
    };
    Some(error_response(
        status,
        &format!("Injected failure (x-sim-fail: {status})."),
        None,
        None,
    ))
}

/// The served model a request names (the first one when it names none), or
/// vLLM's 404 for a model this server does not serve.
pub(crate) fn served_model(
    state: &AppState,
    requested: &str,
) -> Result<String, Box<Response<Body>>> {
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

/// Deterministic vectors after the prefill time of the inputs' tokens.
async fn embeddings(state: &Arc<AppState>, req: Request<RequestBody>) -> Response<Body> {
    let _in_flight = InFlight::new(state);
    let (parts, body) = match read_body(req).await {
        Ok(x) => x,
        Err(resp) => return resp,
    };
    if let Some(resp) = refusal(state, &parts.headers) {
        return resp;
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
