//! OpenAI request parsing and vLLM-shaped response bodies.
//!
//! Bodies follow vLLM's `protocol.py` serialisation: unset optional fields
//! are left out of stream chunks, `logprobs`/`finish_reason` are explicit
//! nulls, the usage chunk has `"choices": []`.

use serde_json::{json, Value};

use crate::tokens::{chat_prompt_tokens, fnv1a, text_tokens};

/// Which API a request used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completion,
    /// OpenAI Responses API (`/v1/responses`), as vLLM serves it.
    Responses,
    /// Anthropic Messages API (`/v1/messages`), as vLLM serves it.
    Messages,
}

/// RAG parameters from the request body (`rag.collection`, `rag.top_k`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RagBody {
    pub collection: Option<String>,
    pub top_k: Option<u32>,
}

/// The fields of a generation request the simulator acts on.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationRequest {
    pub endpoint: Endpoint,
    pub model: String,
    pub stream: bool,
    pub include_usage: bool,
    pub prompt_tokens: u32,
    /// Hash of the prompt, for the prefix cache and the generated text.
    pub prompt_key: u64,
    pub max_tokens: Option<u32>,
    pub rag: RagBody,
}

/// A request the simulator refuses, as vLLM would (HTTP 400).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("request body is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("field `{0}` is required")]
    Missing(&'static str),
    #[error("field `{0}` has the wrong type")]
    WrongType(&'static str),
}

fn message_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    }
}

/// Prompt tokens and prompt text of a completions `prompt` field.
fn completion_prompt(prompt: &Value) -> Result<(u32, String), RequestError> {
    match prompt {
        Value::String(s) => Ok((text_tokens(s), s.clone())),
        Value::Array(items) if items.iter().all(Value::is_number) => {
            let text = items
                .iter()
                .map(|v| v.to_string())
                .collect::<Vec<_>>()
                .join(",");
            Ok((u32::try_from(items.len()).unwrap_or(u32::MAX).max(1), text))
        }
        Value::Array(items) => {
            let mut tokens = 0u32;
            let mut text = String::new();
            for item in items {
                let (t, s) = completion_prompt(item)?;
                tokens = tokens.saturating_add(t);
                text.push_str(&s);
                text.push('\u{1f}');
            }
            Ok((tokens.max(1), text))
        }
        _ => Err(RequestError::WrongType("prompt")),
    }
}

fn opt_u32(body: &Value, field: &'static str) -> Result<Option<u32>, RequestError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(|n| Some(u32::try_from(n).unwrap_or(u32::MAX)))
            .ok_or(RequestError::WrongType(field)),
    }
}

/// Parses a chat or completions body.
pub fn parse_generation(
    endpoint: Endpoint,
    body: &[u8],
) -> Result<GenerationRequest, RequestError> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| RequestError::InvalidJson(e.to_string()))?;
    if !v.is_object() {
        return Err(RequestError::InvalidJson("expected a JSON object".into()));
    }
    let model = match v.get("model") {
        Some(Value::String(m)) => m.clone(),
        None | Some(Value::Null) => String::new(),
        Some(_) => return Err(RequestError::WrongType("model")),
    };
    let (prompt_tokens, prompt_text) = match endpoint {
        Endpoint::Chat => {
            let messages = v
                .get("messages")
                .ok_or(RequestError::Missing("messages"))?
                .as_array()
                .ok_or(RequestError::WrongType("messages"))?;
            let texts: Vec<String> = messages
                .iter()
                .map(|m| {
                    let role = m.get("role").and_then(Value::as_str).unwrap_or("");
                    let content = m.get("content").map(message_text).unwrap_or_default();
                    (role.to_string(), content)
                })
                .map(|(role, content)| format!("{role}\u{1e}{content}"))
                .collect();
            let tokens = chat_prompt_tokens(
                texts
                    .iter()
                    .map(|t| t.split_once('\u{1e}').map(|(_, c)| c).unwrap_or_default()),
            );
            (tokens, texts.join("\u{1f}"))
        }
        Endpoint::Completion => {
            completion_prompt(v.get("prompt").ok_or(RequestError::Missing("prompt"))?)?
        }
        Endpoint::Responses => {
            // `input`: a string, or a list of messages (`content` a string
            // or parts with `text`); `instructions` is a system message.
            let mut texts: Vec<String> = Vec::new();
            if let Some(i) = v.get("instructions").and_then(Value::as_str) {
                texts.push(i.to_string());
            }
            match v.get("input").ok_or(RequestError::Missing("input"))? {
                Value::String(s) => texts.push(s.clone()),
                Value::Array(items) => texts.extend(
                    items
                        .iter()
                        .map(|m| m.get("content").map(message_text).unwrap_or_default()),
                ),
                _ => return Err(RequestError::WrongType("input")),
            }
            (
                chat_prompt_tokens(texts.iter().map(String::as_str)),
                texts.join("\u{1f}"),
            )
        }
        Endpoint::Messages => {
            if opt_u32(&v, "max_tokens")?.is_none() {
                return Err(RequestError::Missing("max_tokens"));
            }
            let messages = v
                .get("messages")
                .ok_or(RequestError::Missing("messages"))?
                .as_array()
                .ok_or(RequestError::WrongType("messages"))?;
            let mut texts: Vec<String> = Vec::new();
            if let Some(system) = v.get("system") {
                texts.push(message_text(system));
            }
            texts.extend(
                messages
                    .iter()
                    .map(|m| m.get("content").map(message_text).unwrap_or_default()),
            );
            (
                chat_prompt_tokens(texts.iter().map(String::as_str)),
                texts.join("\u{1f}"),
            )
        }
    };
    let stream = match v.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(RequestError::WrongType("stream")),
    };
    let include_usage = v
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let max_tokens = match endpoint {
        Endpoint::Responses => opt_u32(&v, "max_output_tokens")?,
        _ => match opt_u32(&v, "max_completion_tokens")? {
            Some(m) => Some(m),
            None => opt_u32(&v, "max_tokens")?,
        },
    };
    let rag = match v.get("rag") {
        Some(r) => RagBody {
            collection: r
                .get("collection")
                .and_then(Value::as_str)
                .map(str::to_string),
            top_k: r
                .get("top_k")
                .and_then(Value::as_u64)
                .map(|n| u32::try_from(n).unwrap_or(u32::MAX)),
        },
        None => RagBody::default(),
    };
    Ok(GenerationRequest {
        endpoint,
        model,
        stream,
        include_usage,
        prompt_tokens,
        prompt_key: fnv1a(prompt_text.as_bytes()),
        max_tokens,
        rag,
    })
}

/// An embeddings request: model, per-input token counts and keys.
#[derive(Clone, Debug, PartialEq)]
pub struct EmbeddingRequest {
    pub model: String,
    pub inputs: Vec<(u32, u64)>,
}

pub fn parse_embedding(body: &[u8]) -> Result<EmbeddingRequest, RequestError> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| RequestError::InvalidJson(e.to_string()))?;
    let model = v
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let input = v.get("input").ok_or(RequestError::Missing("input"))?;
    let items: Vec<&Value> = match input {
        Value::Array(a) if !a.is_empty() && !a.iter().all(Value::is_number) => a.iter().collect(),
        other => vec![other],
    };
    let mut inputs = Vec::with_capacity(items.len());
    for item in items {
        let (tokens, text) =
            completion_prompt(item).map_err(|_| RequestError::WrongType("input"))?;
        inputs.push((tokens, fnv1a(text.as_bytes())));
    }
    Ok(EmbeddingRequest { model, inputs })
}

/// `{"error": {...}}` as vLLM's OpenAI server answers errors.
pub fn error_body(message: &str, kind: &str, param: Option<&str>, code: u16) -> String {
    json!({
        "error": {
            "message": message,
            "type": kind,
            "param": param,
            "code": code,
        }
    })
    .to_string()
}

/// The OpenAI error `type` vLLM uses for an HTTP status.
pub fn error_type_for(status: u16) -> &'static str {
    match status {
        400 => "BadRequestError",
        401 => "AuthenticationError",
        403 => "PermissionDeniedError",
        404 => "NotFoundError",
        408 => "TimeoutError",
        422 => "UnprocessableEntityError",
        429 => "RateLimitError",
        503 => "ServiceUnavailableError",
        s if s >= 500 => "InternalServerError",
        _ => "BadRequestError",
    }
}

/// Identity shared by every chunk of one response.
#[derive(Clone, Debug)]
pub struct ResponseMeta {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub endpoint: Endpoint,
}

impl ResponseMeta {
    fn object(&self, streaming: bool) -> &'static str {
        match (self.endpoint, streaming) {
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Completion, _) => "text_completion",
            (Endpoint::Responses, _) => "response",
            (Endpoint::Messages, _) => "message",
        }
    }

    /// `"id":..,"object":..,"created":..,"model":..` in vLLM's field order
    /// (serde_json would sort the keys).
    fn head(&self, streaming: bool) -> String {
        format!(
            r#""id":{},"object":"{}","created":{},"model":{}"#,
            json_str(&self.id),
            self.object(streaming),
            self.created,
            json_str(&self.model)
        )
    }

    /// The role-only first chunk of a chat stream.
    pub fn role_chunk(&self) -> String {
        format!(
            r#"{{{},"choices":[{{"index":0,"delta":{{"role":"assistant","content":""}},"logprobs":null,"finish_reason":null}}]}}"#,
            self.head(true)
        )
    }

    /// One token's chunk; the last token carries the finish reason.
    pub fn token_chunk(&self, text: &str, finish: Option<&str>) -> String {
        let choice = match (self.endpoint, finish) {
            (Endpoint::Chat, None) => format!(
                r#"{{"index":0,"delta":{{"content":{}}},"logprobs":null,"finish_reason":null}}"#,
                json_str(text)
            ),
            (Endpoint::Chat, Some(f)) => format!(
                r#"{{"index":0,"delta":{{"content":{}}},"logprobs":null,"finish_reason":{},"stop_reason":null}}"#,
                json_str(text),
                json_str(f)
            ),
            (_, f) => format!(
                r#"{{"index":0,"text":{},"logprobs":null,"finish_reason":{},"stop_reason":null}}"#,
                json_str(text),
                f.map(json_str).unwrap_or_else(|| "null".into())
            ),
        };
        format!(r#"{{{},"choices":[{choice}]}}"#, self.head(true))
    }

    /// The trailing usage chunk (`stream_options.include_usage`).
    pub fn usage_chunk(&self, usage: &str) -> String {
        format!(r#"{{{},"choices":[],"usage":{usage}}}"#, self.head(true))
    }

    /// A complete non-streaming response.
    pub fn full_response(&self, text: &str, finish: &str, usage: Option<&str>) -> String {
        match self.endpoint {
            Endpoint::Responses => return self.response_object("completed", text, usage),
            Endpoint::Messages => {
                return format!(
                    r#"{{"id":{},"type":"message","role":"assistant","content":[{{"type":"text","text":{}}}],"model":{},"stop_reason":{},"stop_sequence":null{}}}"#,
                    json_str(&self.id),
                    json_str(text),
                    json_str(&self.model),
                    json_str(anthropic_stop_reason(finish)),
                    usage
                        .map(|u| format!(r#","usage":{u}"#))
                        .unwrap_or_default()
                )
            }
            _ => {}
        }
        let choice = match self.endpoint {
            Endpoint::Chat => format!(
                r#"{{"index":0,"message":{{"role":"assistant","content":{},"tool_calls":[]}},"logprobs":null,"finish_reason":{},"stop_reason":null}}"#,
                json_str(text),
                json_str(finish)
            ),
            _ => format!(
                r#"{{"index":0,"text":{},"logprobs":null,"finish_reason":{},"stop_reason":null}}"#,
                json_str(text),
                json_str(finish)
            ),
        };
        let usage = usage
            .map(|u| format!(r#","usage":{u}"#))
            .unwrap_or_default();
        format!(r#"{{{},"choices":[{choice}]{usage}}}"#, self.head(false))
    }
}

impl ResponseMeta {
    /// A Responses API `response` object (`usage: null` until it is known).
    pub fn response_object(&self, status: &str, text: &str, usage: Option<&str>) -> String {
        let output = if status == "in_progress" {
            "[]".to_string()
        } else {
            format!(
                r#"[{{"id":"msg_{}","type":"message","status":"completed","role":"assistant","content":[{{"type":"output_text","text":{},"annotations":[]}}]}}]"#,
                self.id,
                json_str(text)
            )
        };
        format!(
            r#"{{"id":{},"object":"response","created_at":{},"status":{},"error":null,"incomplete_details":null,"model":{},"output":{output},"usage":{}}}"#,
            json_str(&self.id),
            self.created,
            json_str(status),
            json_str(&self.model),
            usage.unwrap_or("null")
        )
    }

    /// The events of a Responses stream before the first token.
    pub fn responses_start(&self) -> Vec<(&'static str, String)> {
        let item = format!("msg_{}", self.id);
        vec![
            (
                "response.created",
                format!(
                    r#"{{"type":"response.created","sequence_number":0,"response":{}}}"#,
                    self.response_object("in_progress", "", None)
                ),
            ),
            (
                "response.in_progress",
                format!(
                    r#"{{"type":"response.in_progress","sequence_number":1,"response":{}}}"#,
                    self.response_object("in_progress", "", None)
                ),
            ),
            (
                "response.output_item.added",
                format!(
                    r#"{{"type":"response.output_item.added","sequence_number":2,"output_index":0,"item":{{"id":"{item}","type":"message","status":"in_progress","role":"assistant","content":[]}}}}"#
                ),
            ),
            (
                "response.content_part.added",
                format!(
                    r#"{{"type":"response.content_part.added","sequence_number":3,"item_id":"{item}","output_index":0,"content_index":0,"part":{{"type":"output_text","text":"","annotations":[]}}}}"#
                ),
            ),
        ]
    }

    /// One token of a Responses stream (`sequence_number` after the four
    /// opening events).
    pub fn responses_delta(&self, index: u32, text: &str) -> String {
        format!(
            r#"{{"type":"response.output_text.delta","sequence_number":{},"item_id":"msg_{}","output_index":0,"content_index":0,"delta":{},"logprobs":[]}}"#,
            u64::from(index) + 4,
            self.id,
            json_str(text)
        )
    }

    /// The closing events of a Responses stream, `response.completed` last.
    pub fn responses_end(
        &self,
        sent: u32,
        text: &str,
        usage: Option<&str>,
    ) -> Vec<(&'static str, String)> {
        let seq = u64::from(sent) + 4;
        let item = format!("msg_{}", self.id);
        vec![
            (
                "response.output_text.done",
                format!(
                    r#"{{"type":"response.output_text.done","sequence_number":{seq},"item_id":"{item}","output_index":0,"content_index":0,"text":{},"logprobs":[]}}"#,
                    json_str(text)
                ),
            ),
            (
                "response.content_part.done",
                format!(
                    r#"{{"type":"response.content_part.done","sequence_number":{},"item_id":"{item}","output_index":0,"content_index":0,"part":{{"type":"output_text","text":{},"annotations":[]}}}}"#,
                    seq + 1,
                    json_str(text)
                ),
            ),
            (
                "response.completed",
                format!(
                    r#"{{"type":"response.completed","sequence_number":{},"response":{}}}"#,
                    seq + 2,
                    self.response_object("completed", text, usage)
                ),
            ),
        ]
    }

    /// The events of a Messages stream before the first token (vLLM's
    /// `message_start` reports the prompt and `output_tokens: 0`).
    pub fn messages_start(&self, prompt_tokens: Option<u32>) -> Vec<(&'static str, String)> {
        let usage = match prompt_tokens {
            Some(p) => format!(r#","usage":{{"input_tokens":{p},"output_tokens":0}}"#),
            None => String::new(),
        };
        vec![
            (
                "message_start",
                format!(
                    r#"{{"type":"message_start","message":{{"id":{},"type":"message","role":"assistant","content":[],"model":{},"stop_reason":null,"stop_sequence":null{usage}}}}}"#,
                    json_str(&self.id),
                    json_str(&self.model)
                ),
            ),
            (
                "content_block_start",
                r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#
                    .to_string(),
            ),
        ]
    }

    /// One token of a Messages stream.
    pub fn messages_delta(&self, text: &str) -> String {
        format!(
            r#"{{"type":"content_block_delta","index":0,"delta":{{"type":"text_delta","text":{}}}}}"#,
            json_str(text)
        )
    }

    /// The closing events of a Messages stream.
    pub fn messages_end(&self, finish: &str, usage: Option<&str>) -> Vec<(&'static str, String)> {
        vec![
            (
                "content_block_stop",
                r#"{"type":"content_block_stop","index":0}"#.to_string(),
            ),
            (
                "message_delta",
                format!(
                    r#"{{"type":"message_delta","delta":{{"stop_reason":{},"stop_sequence":null}}{}}}"#,
                    json_str(anthropic_stop_reason(finish)),
                    usage
                        .map(|u| format!(r#","usage":{u}"#))
                        .unwrap_or_default()
                ),
            ),
            ("message_stop", r#"{"type":"message_stop"}"#.to_string()),
        ]
    }
}

/// Anthropic's `stop_reason` for an OpenAI finish reason (vLLM's map).
fn anthropic_stop_reason(finish: &str) -> &'static str {
    match finish {
        "length" => "max_tokens",
        "tool_calls" => "tool_use",
        _ => "end_turn",
    }
}

/// Responses API `usage` (vLLM always sends both details objects).
pub fn responses_usage_json(prompt: u32, completion: u32, cached: u32) -> String {
    format!(
        r#"{{"input_tokens":{prompt},"input_tokens_details":{{"cached_tokens":{cached}}},"output_tokens":{completion},"output_tokens_details":{{"reasoning_tokens":0}},"total_tokens":{}}}"#,
        u64::from(prompt) + u64::from(completion)
    )
}

/// Messages API `usage`: vLLM reports the whole prompt as `input_tokens`.
pub fn messages_usage_json(prompt: u32, completion: u32) -> String {
    format!(r#"{{"input_tokens":{prompt},"output_tokens":{completion}}}"#)
}

/// A JSON string literal.
fn json_str(s: &str) -> String {
    Value::String(s.to_string()).to_string()
}

/// OpenAI `usage`; `prompt_tokens_details` only when enabled.
pub fn usage_json(prompt: u32, completion: u32, cached: u32, details: bool) -> String {
    let details = if details {
        format!(r#"{{"cached_tokens":{cached}}}"#)
    } else {
        "null".into()
    };
    format!(
        r#"{{"prompt_tokens":{prompt},"total_tokens":{},"completion_tokens":{completion},"prompt_tokens_details":{details}}}"#,
        u64::from(prompt) + u64::from(completion)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_prompt_tokens_follow_the_documented_rule() {
        let body = br#"{"model":"m","messages":[{"role":"system","content":"be brief"},{"role":"user","content":[{"type":"text","text":"hello world"}]}],"max_tokens":5,"stream":true,"stream_options":{"include_usage":true}}"#;
        let r = parse_generation(Endpoint::Chat, body).unwrap();
        // 3 + (4 + ceil(8/4)) + (4 + ceil(11/4)) = 3 + 6 + 7
        assert_eq!(r.prompt_tokens, 16);
        assert_eq!(r.max_tokens, Some(5));
        assert!(r.stream && r.include_usage);
    }

    #[test]
    fn completion_prompt_forms() {
        let r = parse_generation(
            Endpoint::Completion,
            br#"{"model":"m","prompt":"abcdefgh"}"#,
        )
        .unwrap();
        assert_eq!(r.prompt_tokens, 2);
        let r =
            parse_generation(Endpoint::Completion, br#"{"model":"m","prompt":[1,2,3]}"#).unwrap();
        assert_eq!(r.prompt_tokens, 3);
        let r = parse_generation(Endpoint::Completion, br#"{"prompt":["abcd","abcde"]}"#).unwrap();
        assert_eq!(r.prompt_tokens, 3);
    }

    #[test]
    fn max_completion_tokens_wins() {
        let r = parse_generation(
            Endpoint::Chat,
            br#"{"messages":[],"max_tokens":9,"max_completion_tokens":4}"#,
        )
        .unwrap();
        assert_eq!(r.max_tokens, Some(4));
    }

    #[test]
    fn bad_bodies_are_errors() {
        assert!(parse_generation(Endpoint::Chat, b"{").is_err());
        assert_eq!(
            parse_generation(Endpoint::Chat, br#"{"model":"m"}"#),
            Err(RequestError::Missing("messages"))
        );
        assert!(parse_generation(Endpoint::Chat, br#"{"messages":[],"max_tokens":-1}"#).is_err());
    }

    #[test]
    fn rag_body_fields() {
        let r = parse_generation(
            Endpoint::Chat,
            br#"{"messages":[],"rag":{"collection":"docs","top_k":7}}"#,
        )
        .unwrap();
        assert_eq!(r.rag.collection.as_deref(), Some("docs"));
        assert_eq!(r.rag.top_k, Some(7));
    }

    #[test]
    fn chunks_have_vllm_shape() {
        let m = ResponseMeta {
            id: "chatcmpl-1".into(),
            created: 1,
            model: "m".into(),
            endpoint: Endpoint::Chat,
        };
        let role: Value = serde_json::from_str(&m.role_chunk()).unwrap();
        assert_eq!(role["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(role["object"], "chat.completion.chunk");
        let last: Value = serde_json::from_str(&m.token_chunk("x", Some("length"))).unwrap();
        assert_eq!(last["choices"][0]["finish_reason"], "length");
        let u: Value = serde_json::from_str(&m.usage_chunk(&usage_json(3, 2, 0, true))).unwrap();
        assert_eq!(u["choices"], json!([]));
        assert_eq!(u["usage"]["total_tokens"], 5);
        assert_eq!(u["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    }

    #[test]
    fn embedding_inputs() {
        let e = parse_embedding(br#"{"model":"m","input":["abcd","abcdefgh"]}"#).unwrap();
        assert_eq!(e.inputs.iter().map(|i| i.0).collect::<Vec<_>>(), vec![1, 2]);
        let e = parse_embedding(br#"{"input":[5,6,7]}"#).unwrap();
        assert_eq!(e.inputs.len(), 1);
        assert_eq!(e.inputs[0].0, 3);
    }
}
