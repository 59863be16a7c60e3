//! The RAG response-header contract.
//!
//! A retrieval-augmented API in front of the model reports its retrieval
//! health in response headers (prefix configurable, default `x-rag-`):
//!
//! | header | meaning |
//! |---|---|
//! | `x-rag-retrieval-ms` | retrieval latency, milliseconds (float) |
//! | `x-rag-top-score` | best similarity score of the retrieved set, 0..1 |
//! | `x-rag-sources` | number of sources passed to the model |
//! | `x-rag-evaluation` | evaluation result: `pass`, `fail`, `skipped` |
//! | `x-rag-index-age-seconds` | seconds since the index was last refreshed |
//! | `x-rag-error` | why retrieval failed: `vector_store_unreachable`, `timeout`, `empty_result`, `embedding_failed` |
//! | `x-rag-collection` | the collection used (when the request did not say) |
//!
//! Values outside these sets collapse to `other`; numbers that do not parse
//! are ignored and counted as parse errors.

use crate::host::HttpView;
use crate::labels::sanitize;

/// Evaluation results that become label values.
pub const EVALUATIONS: [&str; 3] = ["pass", "fail", "skipped"];
/// Retrieval error reasons that become label values.
pub const ERROR_REASONS: [&str; 4] = [
    "vector_store_unreachable",
    "timeout",
    "empty_result",
    "embedding_failed",
];

/// Retrieval health reported by the RAG API for one request.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RagSignals {
    pub retrieval_ms: Option<f64>,
    pub top_score: Option<f64>,
    pub sources: Option<u64>,
    /// One of [`EVALUATIONS`] or `other`.
    pub evaluation: Option<&'static str>,
    pub index_age_seconds: Option<f64>,
    /// One of [`ERROR_REASONS`] or `other`.
    pub error: Option<&'static str>,
    /// Collection named by the response (sanitised, not yet admitted).
    pub collection: Option<String>,
    /// Headers present but not parseable.
    pub parse_errors: u32,
}

impl RagSignals {
    /// Whether the response carried any part of the contract.
    pub fn present(&self) -> bool {
        self.retrieval_ms.is_some()
            || self.top_score.is_some()
            || self.sources.is_some()
            || self.evaluation.is_some()
            || self.index_age_seconds.is_some()
            || self.error.is_some()
    }

    /// Reads the contract from the response headers.
    pub fn from_response(view: &dyn HttpView, prefix: &str) -> RagSignals {
        let mut s = RagSignals::default();
        let header = |suffix: &str| view.response_header(&format!("{prefix}{suffix}"));
        let number = |suffix: &str, s: &mut RagSignals| -> Option<f64> {
            let raw = header(suffix)?;
            match std::str::from_utf8(&raw)
                .ok()
                .and_then(|t| t.trim().parse::<f64>().ok())
                .filter(|v| v.is_finite() && *v >= 0.0)
            {
                Some(v) => Some(v),
                None => {
                    s.parse_errors += 1;
                    None
                }
            }
        };
        s.retrieval_ms = number("retrieval-ms", &mut s);
        s.top_score = number("top-score", &mut s);
        s.sources = number("sources", &mut s).map(|v| v as u64);
        s.index_age_seconds = number("index-age-seconds", &mut s);
        s.evaluation = header("evaluation").map(|v| pick(&v, &EVALUATIONS));
        s.error = header("error").map(|v| pick(&v, &ERROR_REASONS));
        s.collection = header("collection").and_then(|v| sanitize(&v, 64));
        s
    }
}

fn pick(raw: &[u8], set: &[&'static str]) -> &'static str {
    let v = String::from_utf8_lossy(raw).trim().to_ascii_lowercase();
    set.iter().copied().find(|s| *s == v).unwrap_or("other")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::FakeView;

    /// A response carrying `pairs` as headers.
    fn view(pairs: &[(&str, &str)]) -> FakeView {
        pairs
            .iter()
            .fold(FakeView::default(), |view, (k, v)| view.resp(k, v))
    }

    #[test]
    fn reads_the_contract() {
        let s = RagSignals::from_response(
            &view(&[
                ("x-rag-retrieval-ms", "12.5"),
                ("x-rag-top-score", "0.87"),
                ("x-rag-sources", "4"),
                ("x-rag-evaluation", "PASS"),
                ("x-rag-index-age-seconds", "3600"),
            ]),
            "x-rag-",
        );
        assert!(s.present());
        assert_eq!(s.retrieval_ms, Some(12.5));
        assert_eq!(s.top_score, Some(0.87));
        assert_eq!(s.sources, Some(4));
        assert_eq!(s.evaluation, Some("pass"));
        assert_eq!(s.index_age_seconds, Some(3600.0));
        assert_eq!(s.error, None);
    }

    #[test]
    fn unknown_values_collapse_and_bad_numbers_are_counted() {
        let s = RagSignals::from_response(
            &view(&[
                ("x-rag-error", "disk on fire"),
                ("x-rag-evaluation", "meh"),
                ("x-rag-retrieval-ms", "fast"),
                ("x-rag-top-score", "-1"),
            ]),
            "x-rag-",
        );
        assert_eq!(s.error, Some("other"));
        assert_eq!(s.evaluation, Some("other"));
        assert_eq!(s.retrieval_ms, None);
        assert_eq!(s.parse_errors, 2);
    }
}
