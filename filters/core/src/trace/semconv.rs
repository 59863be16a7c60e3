//! Attribute keys and names of the gateway span, in one place so the shell,
//! the docs (`docs/tracing.md`) and the tests cannot drift apart by a typo.

// --- span identity ---

/// Instrumentation scope name on every exported span.
pub const SCOPE_NAME: &str = "tokentap";
/// `service.name` when neither the configuration nor the environment sets one.
pub const DEFAULT_SERVICE_NAME: &str = "tokentap-gateway";
/// Event recorded when the first token (first streamed chunk) is seen.
pub const EVENT_FIRST_TOKEN: &str = "gen_ai.first_token";
/// `error.type` value for failures with no better class (OTel convention).
pub const ERROR_TYPE_OTHER: &str = "_OTHER";

/// The GenAI span name, `{gen_ai.operation.name} {gen_ai.request.model}`,
/// falling back to the operation alone when the model is unknown.
pub fn span_name(operation: &str, model: Option<&str>) -> String {
    match model {
        Some(model) if !model.is_empty() => format!("{operation} {model}"),
        _ => operation.to_owned(),
    }
}

// --- tokentap LLM attributes ---
pub const LLM_MODEL: &str = "llm.model";
pub const LLM_ROUTE_CLASS: &str = "llm.route_class";
pub const LLM_PROMPT_TOKENS: &str = "llm.prompt_tokens";
pub const LLM_COMPLETION_TOKENS: &str = "llm.completion_tokens";
pub const LLM_CACHE_HIT: &str = "llm.cache_hit";

// --- OpenTelemetry GenAI semantic conventions ---
pub const GEN_AI_OPERATION_NAME: &str = "gen_ai.operation.name";
pub const GEN_AI_PROVIDER_NAME: &str = "gen_ai.provider.name";
pub const GEN_AI_REQUEST_MODEL: &str = "gen_ai.request.model";
pub const GEN_AI_RESPONSE_MODEL: &str = "gen_ai.response.model";
pub const GEN_AI_REQUEST_STREAM: &str = "gen_ai.request.stream";
pub const GEN_AI_USAGE_INPUT_TOKENS: &str = "gen_ai.usage.input_tokens";
pub const GEN_AI_USAGE_OUTPUT_TOKENS: &str = "gen_ai.usage.output_tokens";
pub const GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS: &str = "gen_ai.usage.cache_read.input_tokens";
pub const GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS: &str =
    "gen_ai.usage.cache_creation.input_tokens";
/// Reasoning tokens (a part of the output tokens), as the runtime reported.
pub const TOKENTAP_USAGE_REASONING_TOKENS: &str = "tokentap.usage.reasoning_tokens";
/// Seconds (double) from request start to the first streamed chunk.
pub const GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK: &str = "gen_ai.response.time_to_first_chunk";
/// String array.
pub const GEN_AI_RESPONSE_FINISH_REASONS: &str = "gen_ai.response.finish_reasons";

// --- HTTP / URL / server ---
pub const HTTP_REQUEST_METHOD: &str = "http.request.method";
pub const HTTP_ROUTE: &str = "http.route";
pub const HTTP_RESPONSE_STATUS_CODE: &str = "http.response.status_code";
pub const URL_PATH: &str = "url.path";
pub const SERVER_ADDRESS: &str = "server.address";

// --- tenant / team / backend ---
pub const TOKENTAP_TENANT: &str = "tokentap.tenant";
pub const TOKENTAP_TEAM: &str = "tokentap.team";
pub const TOKENTAP_BACKEND: &str = "tokentap.backend";
pub const TOKENTAP_ROUTE: &str = "tokentap.route";

// --- RAG ---
pub const RAG_COLLECTION: &str = "rag.collection";
pub const RAG_TOP_K: &str = "rag.top_k";
pub const RAG_RETRIEVAL_DURATION_MS: &str = "rag.retrieval.duration_ms";
pub const RAG_TOP_SCORE: &str = "rag.top_score";
pub const RAG_SOURCES: &str = "rag.sources";
pub const RAG_EVALUATION: &str = "rag.evaluation";
pub const RAG_INDEX_AGE_SECONDS: &str = "rag.index_age_seconds";
pub const RAG_ERROR: &str = "rag.error";

// --- errors ---
pub const ERROR_TYPE: &str = "error.type";

// --- resource ---
pub const SERVICE_NAME: &str = "service.name";
pub const SERVICE_VERSION: &str = "service.version";
pub const SERVICE_NAMESPACE: &str = "service.namespace";
pub const SERVICE_INSTANCE_ID: &str = "service.instance.id";
pub const TOKENTAP_PLUGIN_VERSION: &str = "tokentap.plugin.version";
pub const K8S_CLUSTER_NAME: &str = "k8s.cluster.name";
pub const K8S_NODE_NAME: &str = "k8s.node.name";
pub const K8S_NAMESPACE_NAME: &str = "k8s.namespace.name";
pub const K8S_POD_NAME: &str = "k8s.pod.name";
pub const K8S_POD_UID: &str = "k8s.pod.uid";
pub const K8S_CONTAINER_NAME: &str = "k8s.container.name";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn span_name_follows_genai_convention() {
        assert_eq!(span_name("chat", Some("mistral-7b")), "chat mistral-7b");
        assert_eq!(span_name("embeddings", Some("")), "embeddings");
        assert_eq!(span_name("chat", None), "chat");
    }
}
