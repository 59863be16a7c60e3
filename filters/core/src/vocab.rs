//! The closed label vocabularies of the gateway metrics, declared once.
//!
//! Each enum here is the whole set of values one label can take; the metric
//! catalogue, the docs table, span attributes and filter state all read the
//! text from [`Vocabulary::as_str`], so a value cannot be spelled two ways or
//! documented differently from what is emitted.

/// A closed set of label values.
pub trait Vocabulary: Copy + Sized + 'static {
    /// Every value, in id order.
    const ALL: &'static [Self];
    /// The label value as emitted.
    fn as_str(self) -> &'static str;
    /// A small stable id (the position in [`Vocabulary::ALL`]).
    fn id(self) -> u16;
}

/// Declares an enum and its [`Vocabulary`] impl from `Variant => "text"` pairs.
macro_rules! vocabulary {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $text:literal,)* }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name { $($(#[$vmeta])* $variant,)* }

        impl Vocabulary for $name {
            const ALL: &'static [Self] = &[$($name::$variant,)*];
            fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text,)* }
            }
            fn id(self) -> u16 {
                self as u16
            }
        }

        impl $name {
            /// The label value as emitted.
            pub fn as_str(self) -> &'static str {
                Vocabulary::as_str(self)
            }
        }
    };
}

vocabulary! {
    /// Why a request failed (`error_type`, and the span's `error.type`).
    /// Each value is one thing the client can tell apart; `docs/metrics.md`
    /// ("Error types") maps Envoy's response flags and details to them.
    ErrorType {
        /// The runtime answered 5xx.
        Upstream5xx => "upstream_5xx",
        /// The runtime answered 4xx.
        Upstream4xx => "upstream_4xx",
        /// No runtime could be reached: connection refused or timed out, no
        /// healthy upstream, no cluster, DNS failure. Envoy answered 503.
        UpstreamUnavailable => "upstream_unavailable",
        /// The gateway shed load before a runtime saw the request: circuit
        /// breaker overflow, overload manager, drop_overload. 503.
        Overloaded => "overloaded",
        /// Envoy's rate limit refused the request (429 from the gateway).
        RateLimited => "rate_limited",
        /// A request that was being served ran out of time: route, per-try,
        /// stream idle or max duration timeout.
        Timeout => "timeout",
        /// The runtime's connection or stream broke after it was reached,
        /// before the response (Envoy answered 503) or during it.
        UpstreamReset => "upstream_reset",
        /// The client went away before the response finished.
        ClientAbort => "client_abort",
        /// Envoy answered itself for any other reason: no route, fault
        /// injection, denied by an auth filter, invalid request, ...
        GatewayReply => "gateway_reply",
        /// The stream carried an `error` object mid-stream.
        StreamError => "stream_error",
    }
}

vocabulary! {
    /// Kind of token counted (`token_type`).
    TokenType {
        Prompt => "prompt",
        Completion => "completion",
        Cached => "cached",
        /// Completion tokens spent on reasoning (a part of `completion`).
        Reasoning => "reasoning",
        /// Prompt tokens written to a prompt cache (Anthropic
        /// `cache_creation_input_tokens`; a part of `prompt`).
        CacheCreation => "cache_creation",
    }
}

vocabulary! {
    /// Kind of token in the GenAI conventions (`gen_ai_token_type`): input =
    /// prompt, output = completion, cached_input = cached prompt tokens.
    /// `cache_creation_input` is Envoy AI Gateway's value for Anthropic
    /// cache writes.
    GenAiTokenType {
        Input => "input",
        Output => "output",
        CachedInput => "cached_input",
        CacheCreationInput => "cache_creation_input",
        Reasoning => "reasoning",
    }
}

vocabulary! {
    /// Where token counts came from (`source`).
    TokenSource {
        /// `usage` reported by the runtime.
        Usage => "usage",
        /// No usage in the stream: completion tokens = content events.
        Estimated => "estimated",
    }
}

vocabulary! {
    /// How a cache hit was recognised (`cache`).
    CacheHit {
        /// `cached_tokens > 0`: the runtime reused a prompt prefix.
        PromptCache => "prompt",
        /// The configured response header said so (response/semantic cache).
        ResponseCache => "response",
    }
}

vocabulary! {
    /// Malformed input seen and passed through unharmed (`kind`).
    ParseErrorKind {
        RequestJson => "request_json",
        ResponseJson => "response_json",
        SseEvent => "sse_event",
        RagHeader => "rag_header",
    }
}

vocabulary! {
    /// Why a successful response body was not read (`reason`).
    Unparsed {
        /// `content-encoding` other than identity: passed through untouched.
        Compressed => "compressed",
        /// A 2xx response that is neither JSON nor an event stream.
        ContentType => "content_type",
    }
}

vocabulary! {
    /// Outcome of the optional `include_usage` rewrite (`result`).
    InjectionResult {
        /// The body was rewritten.
        Injected => "injected",
        /// The request already asked for usage, or does not stream.
        NotNeeded => "not_needed",
        /// The body exceeded `usage.max_request_buffer_bytes`; passed unmodified.
        TooLarge => "too_large",
        /// The body was not valid JSON; passed unmodified.
        Invalid => "invalid",
    }
}

vocabulary! {
    /// Why spans were dropped (`reason`).
    SpanDropReason {
        /// The VM's bounded queue was full (collector slow or down).
        QueueFull => "queue_full",
        /// One span was larger than the queue's byte budget.
        TooLarge => "too_large",
        /// The collector answered an error or did not answer.
        ExportFailed => "export_failed",
        /// Envoy refused to send the export (unknown cluster, ...).
        DispatchFailed => "dispatch_failed",
        /// The collector accepted the export but rejected these spans.
        Rejected => "rejected",
    }
}

vocabulary! {
    /// Result of one OTLP export call (`result`).
    SpanExportResult {
        Ok => "ok",
        HttpError => "http_error",
        Failed => "failed",
    }
}

vocabulary! {
    /// RAG evaluation result (`result`): the header's value, or `other`.
    RagEvaluation {
        Pass => "pass",
        Fail => "fail",
        Skipped => "skipped",
        Other => "other",
    }
}

vocabulary! {
    /// Why retrieval failed (`reason`): the header's value, or `other`.
    RagError {
        VectorStoreUnreachable => "vector_store_unreachable",
        Timeout => "timeout",
        EmptyResult => "empty_result",
        EmbeddingFailed => "embedding_failed",
        Other => "other",
    }
}

/// The value of `text` in a vocabulary, if it is one.
///
/// ```
/// use tokentap_core::vocab::{lookup, RagEvaluation};
/// assert_eq!(lookup::<RagEvaluation>("pass"), Some(RagEvaluation::Pass));
/// assert_eq!(lookup::<RagEvaluation>("maybe"), None);
/// ```
pub fn lookup<V: Vocabulary>(text: &str) -> Option<V> {
    V::ALL.iter().copied().find(|v| v.as_str() == text)
}

/// Every value of a vocabulary, for documentation.
pub fn values<V: Vocabulary>() -> Vec<&'static str> {
    V::ALL.iter().map(|v| v.as_str()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids_are_positions<V: Vocabulary + PartialEq + std::fmt::Debug>() {
        for (i, v) in V::ALL.iter().enumerate() {
            assert_eq!(usize::from(v.id()), i, "{v:?}");
            assert_eq!(lookup::<V>(v.as_str()), Some(*v));
        }
    }

    #[test]
    fn every_vocabulary_round_trips_and_ids_are_positions() {
        ids_are_positions::<ErrorType>();
        ids_are_positions::<TokenType>();
        ids_are_positions::<GenAiTokenType>();
        ids_are_positions::<TokenSource>();
        ids_are_positions::<CacheHit>();
        ids_are_positions::<ParseErrorKind>();
        ids_are_positions::<Unparsed>();
        ids_are_positions::<InjectionResult>();
        ids_are_positions::<SpanDropReason>();
        ids_are_positions::<SpanExportResult>();
        ids_are_positions::<RagEvaluation>();
        ids_are_positions::<RagError>();
    }

    #[test]
    fn rag_vocabularies_cover_the_header_contract() {
        for v in crate::rag::EVALUATIONS {
            assert!(lookup::<RagEvaluation>(v).is_some(), "{v}");
        }
        for v in crate::rag::ERROR_REASONS {
            assert!(lookup::<RagError>(v).is_some(), "{v}");
        }
    }
}
