//! Route tests: requests go through the same router the server uses
//! (`routes::handle`), with the engine driver running on engine time, and
//! every expected number follows from the token accounting in
//! docs/simulator.md rather than from the simulator's own output.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use bytes::Bytes;
use clap::Parser;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};

use super::http_util::boxed_request;
use super::routes::handle;
use super::{drive, AppState, ConnReset};
use crate::config::Args;

/// A simulator state serving `m1` and `m2` with 1 ms latencies, its engine
/// driver running; `flags` add to those.
fn start(flags: &[&str]) -> Arc<AppState> {
    let mut argv = vec![
        "llm-sim",
        "--model",
        "m1,m2",
        "--ttft-ms",
        "1",
        "--itl-ms",
        "1",
    ];
    argv.extend(flags);
    let state = AppState::new(Args::parse_from(argv));
    tokio::spawn(drive(state.clone()));
    state
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The `data:` payloads of an SSE body.
    fn events(&self) -> Vec<String> {
        let text = std::str::from_utf8(&self.body).unwrap();
        text.split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| e.strip_prefix("data: ").expect("data event").to_string())
            .collect()
    }
}

async fn call(
    state: &Arc<AppState>,
    method: Method,
    path: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> Reply {
    let mut req = Request::builder().method(method).uri(path);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let req = req.body(Full::new(Bytes::from(body.to_string()))).unwrap();
    let resp = handle(
        state.clone(),
        Arc::new(ConnReset::default()),
        boxed_request(req),
    )
    .await;
    let (parts, body) = resp.into_parts();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

async fn post(state: &Arc<AppState>, path: &str, body: Value, headers: &[(&str, &str)]) -> Reply {
    call(state, Method::POST, path, &body.to_string(), headers).await
}

async fn get(state: &Arc<AppState>, path: &str) -> Reply {
    call(state, Method::GET, path, "", &[]).await
}

fn chat(model: &str, content: &str, extra: Value) -> Value {
    let mut body = json!({"messages": [{"role": "user", "content": content}]});
    if !model.is_empty() {
        body["model"] = json!(model);
    }
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

/// Chat prompt tokens of one user message: 3 priming + 4 per message +
/// ceil(bytes / 4).
fn chat_tokens(content: &str) -> u64 {
    3 + 4 + (content.len() as u64).div_ceil(4).max(1)
}

const CHAT: &str = "/v1/chat/completions";

#[tokio::test]
async fn health_is_503_until_the_startup_delay_has_passed() {
    let starting = start(&["--startup-delay-ms", "600000"]);
    assert_eq!(
        get(&starting, "/health").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let refused = post(&starting, CHAT, chat("m1", "hi", json!({})), &[]).await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    let ready = start(&[]);
    let health = get(&ready, "/health").await;
    assert_eq!(health.status, StatusCode::OK);
    assert_eq!(health.header("content-type"), Some("application/json"));
}

#[tokio::test]
async fn unknown_paths_are_404_and_other_methods_on_known_paths_405() {
    let state = start(&[]);
    let missing = get(&state, "/nope").await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(missing.json()["error"]["code"], 404);
    for (method, path) in [
        (Method::GET, CHAT),
        (Method::GET, "/v1/embeddings"),
        (Method::POST, "/health"),
        (Method::POST, "/metrics"),
        (Method::DELETE, "/admin/config"),
    ] {
        let reply = call(&state, method.clone(), path, "", &[]).await;
        assert_eq!(
            reply.status,
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path}"
        );
        assert_eq!(reply.json()["error"]["code"], 405);
    }
}

#[tokio::test]
async fn models_and_version_describe_the_server() {
    let state = start(&["--max-model-len", "4096"]);
    let models = get(&state, "/v1/models").await.json();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["m1", "m2"]);
    assert_eq!(models["data"][1]["max_model_len"], 4096);
    assert_eq!(models["data"][0]["owned_by"], "vllm");
    let version = get(&state, "/version").await.json();
    assert_eq!(version["version"], env!("CARGO_PKG_VERSION"));
}

#[tokio::test]
async fn chat_completion_is_cut_at_max_tokens_and_counts_usage() {
    let state = start(&[]);
    let reply = post(
        &state,
        CHAT,
        chat("m2", "hello", json!({"max_tokens": 3})),
        &[],
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    let body = reply.json();
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "m2");
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    let prompt = chat_tokens("hello");
    assert_eq!(body["usage"]["prompt_tokens"], prompt);
    assert_eq!(body["usage"]["completion_tokens"], 3);
    assert_eq!(body["usage"]["total_tokens"], prompt + 3);
}

#[tokio::test]
async fn completion_without_max_tokens_stops_on_its_own_with_the_first_model() {
    let state = start(&["--default-output-tokens", "4"]);
    let reply = post(
        &state,
        "/v1/completions",
        json!({"prompt": "abcdefgh"}),
        &[],
    )
    .await;
    let body = reply.json();
    assert_eq!(body["object"], "text_completion");
    assert_eq!(body["model"], "m1");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(body["usage"]["prompt_tokens"], 2);
    assert_eq!(body["usage"]["completion_tokens"], 4);
    let capped = post(
        &state,
        "/v1/completions",
        json!({"prompt": "abcdefgh"}),
        &[("x-sim-output-tokens", "2"), ("x-sim-no-usage", "1")],
    )
    .await
    .json();
    assert_eq!(capped["choices"][0]["finish_reason"], "stop");
    assert!(capped.get("usage").is_none());
}

#[tokio::test]
async fn streamed_chat_sends_role_tokens_usage_and_done() {
    let state = start(&[]);
    let body = chat(
        "m1",
        "hello",
        json!({"max_tokens": 2, "stream": true, "stream_options": {"include_usage": true}}),
    );
    let reply = post(&state, CHAT, body, &[]).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.header("content-type"),
        Some("text/event-stream; charset=utf-8")
    );
    let events = reply.events();
    assert_eq!(events.len(), 5, "role, 2 tokens, usage, [DONE]: {events:?}");
    assert_eq!(events[4], "[DONE]");
    let chunks: Vec<Value> = events[..4]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    assert!(chunks[1]["choices"][0]["finish_reason"].is_null());
    assert_eq!(chunks[2]["choices"][0]["finish_reason"], "length");
    assert_eq!(chunks[3]["choices"], json!([]));
    assert_eq!(chunks[3]["usage"]["completion_tokens"], 2);
    assert_eq!(chunks[3]["usage"]["prompt_tokens"], chat_tokens("hello"));
    let ids: std::collections::HashSet<&str> =
        chunks.iter().map(|c| c["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 1, "one id for every chunk of a stream");
}

#[tokio::test]
async fn unknown_model_and_injected_failures_are_openai_errors() {
    let state = start(&[]);
    let unknown = post(&state, CHAT, chat("nope", "hi", json!({})), &[]).await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    let err = &unknown.json()["error"];
    assert_eq!(err["type"], "NotFoundError");
    assert_eq!(err["param"], "model");
    assert_eq!(err["message"], "The model `nope` does not exist.");
    let failed = post(
        &state,
        CHAT,
        chat("m1", "hi", json!({})),
        &[("x-sim-fail", "429")],
    )
    .await;
    assert_eq!(failed.status, StatusCode::TOO_MANY_REQUESTS);
    let out_of_range = post(
        &state,
        CHAT,
        chat("m1", "hi", json!({})),
        &[("x-sim-fail", "200")],
    )
    .await;
    assert_eq!(out_of_range.status, StatusCode::INTERNAL_SERVER_ERROR);
    let not_json = call(&state, Method::POST, CHAT, "{not json", &[]).await;
    assert_eq!(not_json.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn admin_config_changes_the_runtime_and_refuses_bad_values() {
    let state = start(&[]);
    let set = post(&state, "/admin/config", json!({"error_rate": 1.0}), &[]).await;
    assert_eq!(set.status, StatusCode::OK);
    assert_eq!(set.json()["error_rate"], 1.0);
    assert_eq!(get(&state, "/admin/config").await.json()["error_rate"], 1.0);
    let failed = post(&state, CHAT, chat("m1", "hi", json!({})), &[]).await;
    assert!(
        [500, 503].contains(&failed.status.as_u16()),
        "{}",
        failed.status
    );
    assert_eq!(
        failed.json()["error"]["message"],
        "Injected failure (error_rate)."
    );
    let bad = post(&state, "/admin/config", json!({"error_rate": 2}), &[]).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert_eq!(get(&state, "/admin/config").await.json()["error_rate"], 1.0);
}

#[tokio::test]
async fn rag_requests_get_retrieval_headers_or_the_vector_store_error() {
    let state = start(&[]);
    post(
        &state,
        "/admin/config",
        json!({"rag_min_score": 0.5, "rag_index_age_seconds": 30}),
        &[],
    )
    .await;
    let headers = [
        ("x-rag-collection", "docs"),
        ("x-sim-rag-top-score", "0.25"),
    ];
    let low = post(
        &state,
        CHAT,
        chat("m1", "q", json!({"max_tokens": 1})),
        &headers,
    )
    .await;
    assert_eq!(low.status, StatusCode::OK);
    assert_eq!(low.header("x-rag-collection"), Some("docs"));
    assert_eq!(low.header("x-rag-top-score"), Some("0.25"));
    assert_eq!(low.header("x-rag-evaluation"), Some("fail"));
    assert_eq!(low.header("x-rag-sources"), Some("4"));
    assert_eq!(low.header("x-rag-index-age-seconds"), Some("30"));
    let plain = post(&state, CHAT, chat("m1", "q", json!({"max_tokens": 1})), &[]).await;
    assert_eq!(plain.header("x-rag-collection"), None);

    post(
        &state,
        "/admin/config",
        json!({"rag_vector_store_down": true}),
        &[],
    )
    .await;
    let down = post(&state, CHAT, chat("m1", "q", json!({})), &headers).await;
    assert_eq!(down.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(down.header("x-rag-error"), Some("vector_store_unreachable"));
    assert_eq!(down.header("x-rag-collection"), Some("docs"));
    assert_eq!(down.json()["error"]["type"], "vector_store_unreachable");
}

#[tokio::test]
async fn embeddings_have_the_configured_dimension_and_count_tokens() {
    let state = start(&["--embedding-dim", "8"]);
    let reply = post(
        &state,
        "/v1/embeddings",
        json!({"model": "m2", "input": ["abcd", "abcdefghi"]}),
        &[],
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    let body = reply.json();
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    assert!(data
        .iter()
        .all(|d| d["embedding"].as_array().unwrap().len() == 8));
    assert_eq!(data[1]["index"], 1);
    assert_eq!(body["usage"]["prompt_tokens"], 1 + 3);
    assert_eq!(body["model"], "m2");
}

/// The exposition, parsed by an independent parser (`prometheus-parse`),
/// after one request cut by `max_tokens` and one that stopped on its own.
/// `prometheus-parse` reads names as `\w+`, so the parse runs on a copy with
/// vLLM's `:` spelled `_`; the names themselves are checked against the
/// exposition format's grammar first.
#[tokio::test]
async fn metrics_exposition_parses_and_counts_what_was_served() {
    let state = start(&["--default-output-tokens", "5", "--block-size", "16"]);
    post(
        &state,
        CHAT,
        chat("m2", "hello", json!({"max_tokens": 3})),
        &[],
    )
    .await;
    post(&state, CHAT, chat("", "a longer question", json!({})), &[]).await;
    let reply = get(&state, "/metrics").await;
    assert_eq!(
        reply.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let text = String::from_utf8(reply.body.to_vec()).unwrap();
    assert_metric_names_are_valid(&text);
    let scrape = prometheus_parse::Scrape::parse(
        text.replace("vllm:", "vllm_")
            .lines()
            .map(|l| Ok(l.to_string())),
    )
    .unwrap();
    let value = |name: &str, label: Option<(&str, &str)>| -> f64 {
        let sample = scrape
            .samples
            .iter()
            .find(|s| s.metric == name && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
            .unwrap_or_else(|| panic!("no sample {name} {label:?}"));
        match sample.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            ref other => panic!("{name}: {other:?}"),
        }
    };
    let prompts = chat_tokens("hello") + chat_tokens("a longer question");
    assert_eq!(value("vllm_prompt_tokens_total", None), prompts as f64);
    assert_eq!(value("vllm_generation_tokens_total", None), 3.0 + 5.0);
    let success = |reason| {
        value(
            "vllm_request_success_total",
            Some(("finished_reason", reason)),
        )
    };
    assert_eq!(success("length"), 1.0);
    assert_eq!(success("stop"), 1.0);
    assert_eq!(success("abort"), 0.0);
    assert_eq!(value("vllm_num_requests_running", None), 0.0);
    assert_eq!(value("vllm_kv_cache_usage_perc", None), 0.0);
    let info = scrape
        .samples
        .iter()
        .find(|s| s.metric == "vllm_cache_config_info")
        .unwrap();
    assert_eq!(info.labels.get("block_size"), Some("16"));
    assert_eq!(info.labels.get("enable_prefix_caching"), Some("True"));

    let e2e = scrape
        .samples
        .iter()
        .find(|s| s.metric == "vllm_e2e_request_latency_seconds")
        .unwrap();
    let prometheus_parse::Value::Histogram(buckets) = &e2e.value else {
        panic!("e2e latency is not a histogram: {:?}", e2e.value);
    };
    assert_eq!(
        buckets.last().map(|b| (b.less_than, b.count)),
        Some((f64::INFINITY, 2.0))
    );
    assert_eq!(value("vllm_e2e_request_latency_seconds_count", None), 2.0);

    for sample in scrape
        .samples
        .iter()
        .filter(|s| s.metric.starts_with("vllm_"))
    {
        if sample.metric != "vllm_cache_config_info" {
            assert_eq!(
                sample.labels.get("model_name"),
                Some("m1"),
                "{}",
                sample.metric
            );
        }
        assert_eq!(sample.labels.get("engine"), Some("0"), "{}", sample.metric);
    }
    for family in [
        "vllm_request_success_total",
        "vllm_time_to_first_token_seconds",
    ] {
        assert!(scrape.docs.contains_key(family), "no HELP for {family}");
    }
}

/// Every sample and HELP/TYPE line names a metric in the exposition
/// format's grammar `[a-zA-Z_:][a-zA-Z0-9_:]*`.
fn assert_metric_names_are_valid(text: &str) {
    let mut count = 0;
    for line in text.lines() {
        let name = match line.strip_prefix("# ") {
            Some(comment) => comment.split(' ').nth(1).unwrap_or_default(),
            None => line.split(['{', ' ']).next().unwrap_or_default(),
        };
        let mut chars = name.chars();
        let first_ok = chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':');
        assert!(
            first_ok && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line:?}"
        );
        count += 1;
    }
    assert!(count > 100, "only {count} lines");
}
