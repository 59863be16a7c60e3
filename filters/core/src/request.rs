//! The lifecycle of one LLM request, from request headers to the access-log
//! callback, turned into a [`RequestRecord`].
//!
//! The observer is driven by the shell with host timestamps; it reads what it
//! needs through [`HttpView`] and streams bodies through the readers in
//! [`crate::openai`]. It never pauses or buffers a response body. Only the
//! optional `include_usage` rewrite buffers a request body, bounded by
//! configuration.

use crate::config::{Config, Operation, TenantSource};
use crate::host::{millis_between, Clock, HttpView};
use crate::json_scan::ScanStatus;
use crate::labels::sanitize;
use crate::openai::{
    Api, JsonResponseReader, RequestFacts, RequestReader, ResponseFacts, StreamFacts, StreamReader,
    Usage,
};
use crate::rag::RagSignals;

pub use crate::vocab::{CacheHit, ErrorType, Unparsed};
use crate::vocab::{InjectionResult, TokenSource};

/// Where the token counts came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UsageSource {
    /// `usage` reported by the runtime.
    Reported,
    /// No usage in the stream: completion tokens = content events.
    Estimated,
    /// Nothing known (e.g. an error, or an unparsed body).
    None,
}

/// Malformed input that was counted (and passed through unharmed).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ParseProblems {
    pub request_json: bool,
    pub response_json: bool,
    pub sse_events: u64,
    pub rag_headers: u32,
}

/// Outcome of the optional `include_usage` rewrite.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Injection {
    #[default]
    NotAttempted,
    /// The body was rewritten.
    Injected,
    /// The request already asked for usage, or does not stream.
    NotNeeded,
    /// The body exceeded `usage.max_request_buffer_bytes`; passed unmodified.
    TooLarge,
    /// The body was not valid JSON; passed unmodified.
    Invalid,
}

impl Injection {
    /// The `result` label of the rewrite's outcome (none when not attempted).
    pub fn result(self) -> Option<InjectionResult> {
        match self {
            Injection::NotAttempted => None,
            Injection::Injected => Some(InjectionResult::Injected),
            Injection::NotNeeded => Some(InjectionResult::NotNeeded),
            Injection::TooLarge => Some(InjectionResult::TooLarge),
            Injection::Invalid => Some(InjectionResult::Invalid),
        }
    }
}

/// Everything recorded about one request; input to metrics and spans.
#[derive(Clone, Debug, PartialEq)]
pub struct RequestRecord {
    pub operation: Operation,
    pub method: Option<String>,
    pub start_ns: u64,
    pub end_ns: u64,
    pub response_headers_ns: Option<u64>,
    pub first_token_ns: Option<u64>,
    pub last_token_ns: Option<u64>,
    pub status: Option<u16>,
    /// Envoy route name (raw, sanitised later by the label tables).
    pub route_name: Option<Vec<u8>>,
    /// Envoy upstream cluster name.
    pub cluster_name: Option<Vec<u8>>,
    /// Input of the `route` label: the route's configured alias, else its name.
    pub route_label: Option<Vec<u8>>,
    /// Input of the `backend` label: the cluster's configured alias, else its name.
    pub backend_label: Option<Vec<u8>>,
    pub tenant: Option<Vec<u8>>,
    /// Model named by the request, else the configured default.
    pub request_model: Option<String>,
    /// Model named by the request body, as sent (sanitised), if any.
    pub request_model_sent: Option<String>,
    /// The configured LLM path that matched (low cardinality).
    pub matched_path: String,
    /// `:path` without the query string, cut at 256 bytes.
    pub url_path: Option<String>,
    /// Host part of `:authority`.
    pub server_address: Option<String>,
    /// Model named by the response.
    pub response_model: Option<String>,
    pub route_class: Option<String>,
    pub team: Option<String>,
    /// The request asked for a stream.
    pub request_stream: bool,
    /// The response was an event stream.
    pub streamed: bool,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub usage: Usage,
    pub usage_source: UsageSource,
    pub content_events: u64,
    pub finish_reason: Option<String>,
    pub cache_hit: Option<CacheHit>,
    pub error: Option<ErrorType>,
    pub unparsed: Option<Unparsed>,
    pub problems: ParseProblems,
    pub injection: Injection,
    pub rag_collection: Option<String>,
    pub rag_top_k: Option<u64>,
    pub rag: RagSignals,
    /// Envoy `response.code_details`, bounded (for logs and span status).
    pub code_details: Option<String>,
}

impl RequestRecord {
    pub fn duration_ms(&self) -> u64 {
        millis_between(self.start_ns, self.end_ns)
    }

    pub fn ttfb_ms(&self) -> Option<u64> {
        self.response_headers_ns
            .map(|t| millis_between(self.start_ns, t))
    }

    /// Time to first token: from request start to the first event carrying
    /// generated content (streams only).
    pub fn ttft_ms(&self) -> Option<u64> {
        self.first_token_ns
            .map(|t| millis_between(self.start_ns, t))
    }

    /// The `source` label of the token counts, if any were counted.
    pub fn token_source(&self) -> Option<TokenSource> {
        match self.usage_source {
            UsageSource::Reported => Some(TokenSource::Usage),
            UsageSource::Estimated => Some(TokenSource::Estimated),
            UsageSource::None => None,
        }
    }

    /// Completion tokens: reported, else estimated from content events.
    pub fn completion_tokens(&self) -> Option<u64> {
        match self.usage_source {
            UsageSource::Reported => self.usage.completion_tokens,
            UsageSource::Estimated => Some(self.content_events),
            UsageSource::None => None,
        }
    }

    /// Time per output token after the first: (last − first) / (n − 1).
    pub fn tpot_ms(&self) -> Option<u64> {
        let n = self.completion_tokens()?;
        let (first, last) = (self.first_token_ns?, self.last_token_ns?);
        (n >= 2).then(|| last.saturating_sub(first) / (n - 1) / 1_000_000)
    }

    /// Output tokens per second: for streams, from the first token to the end
    /// of the response; otherwise over the whole request.
    pub fn output_tokens_per_second(&self) -> Option<u64> {
        let n = self.completion_tokens()?;
        if n == 0 {
            return None;
        }
        let from = if self.streamed {
            self.first_token_ns?
        } else {
            self.start_ns
        };
        let ns = self.end_ns.saturating_sub(from);
        if self.streamed && n < 2 {
            return None;
        }
        (ns >= 1_000_000).then(|| n.saturating_mul(1_000_000_000) / ns)
    }
}

enum ResponseReader {
    Pending,
    Stream(Box<StreamReader>),
    Json(Box<JsonResponseReader>),
    Skip,
}

/// Observes one request. Create it at request headers with
/// [`RequestObserver::start`] (which returns `None` for non-LLM paths).
pub struct RequestObserver {
    operation: Operation,
    matched_path: String,
    url_path: Option<String>,
    server_address: Option<String>,
    method: Option<String>,
    start_ns: u64,
    route_name: Option<Vec<u8>>,
    cluster_name: Option<Vec<u8>>,
    tenant: Option<Vec<u8>>,
    request: RequestReader,
    request_bytes_seen: u64,
    request_done: bool,
    request_facts: RequestFacts,
    request_status: ScanStatus,
    header_rag_collection: Option<String>,
    header_rag_top_k: Option<u64>,
    status: Option<u16>,
    response_headers_ns: Option<u64>,
    response: ResponseReader,
    response_bytes: u64,
    unparsed: Option<Unparsed>,
    cache_header_hit: bool,
    rag: RagSignals,
    injection: Injection,
    buffering: bool,
    /// The whole response passed through (end of stream seen).
    response_ended: bool,
}

impl RequestObserver {
    /// Starts observing if the request is LLM traffic.
    pub fn start(config: &Config, view: &dyn HttpView, clock: &dyn Clock) -> Option<Self> {
        let path = view.request_header(":path")?;
        let (matched_path, operation) = config.match_path(&path)?;
        let now_ns = clock.now_nanos();
        let url_path = {
            let end = path
                .iter()
                .position(|&b| b == b'?' || b == b'#')
                .unwrap_or(path.len());
            Some(String::from_utf8_lossy(&path[..end.min(256)]).into_owned())
        };
        let server_address = view.request_header(":authority").and_then(|a| {
            let host = match a.iter().rposition(|&b| b == b':') {
                Some(i) if !a.starts_with(b"[") || a[..i].ends_with(b"]") => &a[..i],
                _ => &a[..],
            };
            sanitize(host, 253)
        });
        let method = view
            .request_header(":method")
            .and_then(|m| sanitize(&m, 16));
        let tenant = match &config.tenant_source {
            TenantSource::None => None,
            TenantSource::Header(h) => view.request_header(h),
            TenantSource::Metadata(p) => {
                let parts: Vec<&str> = p.iter().map(String::as_str).collect();
                view.property(&parts)
            }
        };
        let header_rag_collection = config
            .rag_collection_header
            .as_deref()
            .and_then(|h| view.request_header(h))
            .and_then(|v| sanitize(&v, config.max_value_length));
        let header_rag_top_k = config
            .rag_top_k_header
            .as_deref()
            .and_then(|h| view.request_header(h))
            .and_then(|v| std::str::from_utf8(&v).ok()?.trim().parse().ok());
        let buffering = config.inject_include_usage
            && matches!(operation, Operation::Chat | Operation::TextCompletion)
            && method.as_deref() == Some("POST");
        Some(Self {
            operation,
            matched_path: matched_path.to_string(),
            url_path,
            server_address,
            method,
            start_ns: now_ns,
            route_name: view.property(&["xds", "route_name"]),
            // The router picks the cluster after this filter's request
            // headers callback; it is read at the access-log callback.
            cluster_name: None,
            tenant,
            request: RequestReader::new(
                config.rag_collection_field.clone(),
                config.rag_top_k_field.clone(),
            ),
            request_bytes_seen: 0,
            request_done: false,
            request_facts: RequestFacts::default(),
            request_status: ScanStatus::Empty,
            header_rag_collection,
            header_rag_top_k,
            status: None,
            response_headers_ns: None,
            response: ResponseReader::Pending,
            response_bytes: 0,
            unparsed: None,
            cache_header_hit: false,
            rag: RagSignals::default(),
            injection: Injection::NotAttempted,
            buffering,
            response_ended: false,
        })
    }

    /// The response status, once response headers were seen.
    pub fn status(&self) -> Option<u16> {
        self.status
    }

    /// Whether the shell must hold the request body for the usage rewrite
    /// (it then removes `content-length` at request headers and pauses body
    /// callbacks until end of stream).
    pub fn wants_request_buffering(&self) -> bool {
        self.buffering
    }

    /// The Envoy route name, read at request headers.
    pub fn route_name(&self) -> Option<&[u8]> {
        self.route_name.as_deref()
    }

    /// Feeds request body bytes. `total_len` is the host's current body size;
    /// while buffering it is cumulative, so only the unseen tail is scanned.
    /// `body` must hold the bytes from offset `already_seen()` to `total_len`.
    pub fn request_body(&mut self, body_tail: &[u8], end_of_stream: bool) {
        self.request_bytes_seen += body_tail.len() as u64;
        if !self.request_done {
            self.request.feed(body_tail);
        }
        if end_of_stream && !self.request_done {
            self.finish_request_body();
        }
    }

    /// Bytes of request body already passed to [`RequestObserver::request_body`].
    pub fn request_bytes_seen(&self) -> u64 {
        self.request_bytes_seen
    }

    fn finish_request_body(&mut self) {
        self.request_done = true;
        let (facts, status) = self.request.finish();
        self.request_facts = facts;
        self.request_status = status;
    }

    /// The request body outgrew the rewrite buffer: stop buffering.
    pub fn abandon_buffering(&mut self) {
        if self.buffering {
            self.buffering = false;
            self.injection = Injection::TooLarge;
        }
    }

    /// At end of a buffered request body: the rewritten body, if one is needed.
    pub fn rewrite_request(&mut self, body: &[u8]) -> Option<Vec<u8>> {
        if !self.buffering {
            return None;
        }
        self.buffering = false;
        if !self.request_done {
            self.finish_request_body();
        }
        if self.request_status != ScanStatus::Complete {
            self.injection = Injection::Invalid;
            return None;
        }
        let f = &self.request_facts;
        if f.stream != Some(true) || f.include_usage == Some(true) {
            self.injection = Injection::NotNeeded;
            return None;
        }
        match crate::inject::with_include_usage(body, f.has_stream_options) {
            Some(new) => {
                self.injection = Injection::Injected;
                Some(new)
            }
            None => {
                self.injection = Injection::Invalid;
                None
            }
        }
    }

    /// At response headers.
    pub fn response_headers(&mut self, config: &Config, view: &dyn HttpView, now_ns: u64) {
        self.response_headers_ns = Some(now_ns);
        self.status = view
            .response_header(":status")
            .and_then(|s| std::str::from_utf8(&s).ok()?.trim().parse().ok());
        let content_type = view
            .response_header("content-type")
            .map(|v| v.to_ascii_lowercase())
            .unwrap_or_default();
        let encoded = view
            .response_header("content-encoding")
            .map(|v| {
                let v = v.trim_ascii().to_ascii_lowercase();
                !v.is_empty() && v != b"identity"
            })
            .unwrap_or(false);
        let success = self.status.is_some_and(|s| (200..300).contains(&s));
        self.response = if encoded {
            if success {
                self.unparsed = Some(Unparsed::Compressed);
            }
            ResponseReader::Skip
        } else if content_type.starts_with(b"text/event-stream") {
            ResponseReader::Stream(Box::new(match self.operation {
                Operation::Responses | Operation::Messages => {
                    StreamReader::for_api(Api::of(self.operation))
                }
                _ => StreamReader::default(),
            }))
        } else if contains(&content_type, b"json") {
            ResponseReader::Json(Box::new(JsonResponseReader::for_api(Api::of(
                self.operation,
            ))))
        } else {
            if success {
                self.unparsed = Some(Unparsed::ContentType);
            }
            ResponseReader::Skip
        };
        if let Some((name, values)) = &config.cache_hit_header {
            if let Some(v) = view.response_header(name) {
                let v = String::from_utf8_lossy(&v).trim().to_ascii_lowercase();
                self.cache_header_hit = values.is_empty() || values.contains(&v);
            }
        }
        if view.has_response_header_prefix(&config.rag_header_prefix) {
            self.rag = RagSignals::from_response(view, &config.rag_header_prefix);
        }
    }

    /// Whether the shell needs to read response body chunks at all.
    pub fn reads_response_body(&self) -> bool {
        matches!(
            self.response,
            ResponseReader::Stream(_) | ResponseReader::Json(_)
        )
    }

    /// Feeds one response body chunk (never buffered by the shell).
    pub fn response_body(&mut self, chunk: &[u8], now_ns: u64) {
        self.response_bytes += chunk.len() as u64;
        match &mut self.response {
            ResponseReader::Stream(r) => r.feed(chunk, now_ns),
            ResponseReader::Json(r) => r.feed(chunk),
            ResponseReader::Pending | ResponseReader::Skip => {}
        }
    }

    /// The response reached its end of stream.
    pub fn response_end(&mut self) {
        self.response_ended = true;
    }

    /// Counts response bytes the shell chose not to read.
    pub fn response_body_skipped(&mut self, len: usize) {
        self.response_bytes += len as u64;
    }

    /// The request as a record, built once when the request is done (the
    /// response ended, or Envoy logs an aborted stream); the observer's values
    /// move into it. Envoy's attributes are read only when needed: the
    /// upstream cluster (the `backend` label) always, and the response's
    /// details and flags only when something may have gone wrong, since a
    /// response that ended with a success status cannot be a reset, timeout
    /// or abort.
    pub fn record(&mut self, config: &Config, view: &dyn HttpView, now_ns: u64) -> RequestRecord {
        if !self.request_done {
            self.finish_request_body();
        }
        let clean_end = self.response_ended && self.status.is_some_and(|s| s < 400);
        if self.cluster_name.is_none() {
            self.cluster_name = view.property(&["xds", "cluster_name"]);
        }
        let (code_details, flags) = if !clean_end {
            if self.route_name.is_none() {
                self.route_name = view.property(&["xds", "route_name"]);
            }
            if self.status.is_none() {
                self.status = view
                    .property(&["response", "code"])
                    .and_then(|v| decode_u64(&v))
                    .and_then(|v| u16::try_from(v).ok());
            }
            let details = view
                .property(&["response", "code_details"])
                .map(|v| String::from_utf8_lossy(&v[..v.len().min(128)]).into_owned());
            let flags = view
                .property(&["response", "flags"])
                .and_then(|v| decode_u64(&v))
                .unwrap_or(0);
            (details, flags)
        } else {
            (None, 0)
        };
        // Body sizes as the filter saw them pass (every chunk is reported to
        // the filter, read or not), so no host call is needed.
        let request_bytes = self.request_bytes_seen;
        let response_bytes = self.response_bytes;

        let mut problems = ParseProblems {
            request_json: matches!(self.request_status, ScanStatus::Failed(_))
                || (self.request_status == ScanStatus::Incomplete && self.request_bytes_seen > 0),
            rag_headers: self.rag.parse_errors,
            ..ParseProblems::default()
        };

        let mut stream = StreamFacts::default();
        let mut json = ResponseFacts::default();
        let mut streamed = false;
        let mut cut_mid_event = false;
        match &mut self.response {
            ResponseReader::Stream(r) => {
                streamed = true;
                let (facts, partial) = r.snapshot();
                stream = facts;
                cut_mid_event = partial;
                problems.sse_events = stream.malformed_events;
            }
            ResponseReader::Json(r) => {
                let (facts, status) = r.finish();
                json = facts;
                problems.response_json = self.response_bytes > 0 && status != ScanStatus::Complete;
            }
            ResponseReader::Pending | ResponseReader::Skip => {}
        }

        let typed_api = matches!(self.operation, Operation::Responses | Operation::Messages);
        let (mut usage, usage_source, response_model, finish_reason) = if streamed {
            let source = if typed_api
                && stream.usage.completion_tokens.is_none()
                && stream.content_events > 0
            {
                // The Responses/Messages usage that counts the answer comes
                // last (`response.completed`, `message_delta`): without it
                // the answer is estimated, whatever came before.
                UsageSource::Estimated
            } else if !stream.usage.is_empty() {
                UsageSource::Reported
            } else if stream.content_events > 0 {
                UsageSource::Estimated
            } else {
                UsageSource::None
            };
            (stream.usage, source, stream.model, stream.finish_reason)
        } else {
            let source = if json.usage.is_empty() {
                UsageSource::None
            } else {
                UsageSource::Reported
            };
            (json.usage, source, json.model, json.finish_reason)
        };

        if self.operation == Operation::Messages {
            // Anthropic's `input_tokens` leaves out the tokens read from and
            // written to the cache; OpenAI's prompt tokens (and OTel's
            // `gen_ai.usage.input_tokens`) count every input token.
            usage.prompt_tokens = usage.prompt_tokens.map(|p| {
                p.saturating_add(usage.cached_tokens.unwrap_or(0))
                    .saturating_add(usage.cache_creation_tokens.unwrap_or(0))
            });
        }

        let cache_hit = if usage.cached_tokens.is_some_and(|c| c > 0) {
            Some(CacheHit::PromptCache)
        } else if self.cache_header_hit {
            Some(CacheHit::ResponseCache)
        } else {
            None
        };

        let error = classify_error(
            self.status,
            code_details.as_deref(),
            flags,
            stream.error_event,
            streamed && cut_mid_event,
        );

        let route_name = self.route_name.take();
        let cluster_name = self.cluster_name.take();
        let rag = std::mem::take(&mut self.rag);
        let route_str = route_name
            .as_deref()
            .and_then(|r| std::str::from_utf8(r).ok());
        let cluster_str = cluster_name
            .as_deref()
            .and_then(|c| std::str::from_utf8(c).ok());
        let workload = config.workload_ref(route_str, cluster_str);
        let request_model_sent = self.request_facts.model.take();
        let request_model = match &request_model_sent {
            Some(sent) => Some(sent.clone()),
            None => workload.model.map(str::to_owned),
        };

        RequestRecord {
            operation: self.operation,
            method: self.method.take(),
            start_ns: self.start_ns,
            end_ns: now_ns.max(self.start_ns),
            response_headers_ns: self.response_headers_ns,
            first_token_ns: stream.first_content_ns,
            last_token_ns: stream.last_content_ns,
            status: self.status,
            route_label: route_name
                .as_deref()
                .map(|r| config.route_label(r).to_vec()),
            backend_label: cluster_name
                .as_deref()
                .map(|c| config.backend_label(c).to_vec()),
            route_name,
            cluster_name,
            tenant: self.tenant.take(),
            request_model,
            request_model_sent,
            matched_path: std::mem::take(&mut self.matched_path),
            url_path: self.url_path.take(),
            server_address: self.server_address.take(),
            response_model,
            route_class: workload.route_class.map(str::to_owned),
            team: workload.team.map(str::to_owned),
            request_stream: self.request_facts.stream == Some(true),
            streamed,
            request_bytes,
            response_bytes,
            usage,
            usage_source,
            content_events: stream.content_events,
            finish_reason,
            cache_hit,
            error,
            unparsed: self.unparsed,
            problems,
            injection: self.injection,
            rag_collection: self
                .request_facts
                .rag_collection
                .take()
                .or_else(|| self.header_rag_collection.take())
                .or_else(|| rag.collection.clone()),
            rag_top_k: self.request_facts.rag_top_k.or(self.header_rag_top_k),
            rag,
            code_details,
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

mod errors;

pub use errors::{classify_error, decode_u64, response_flags};

#[cfg(test)]
mod tests;
