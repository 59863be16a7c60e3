//! One warning per VM and kind of bad input or host trouble; the counters
//! keep the totals, the log says once what happened and where to look.

use super::Gateway;
use crate::host::MetricsHost;
use crate::labels::Dimension;
use crate::metrics::RequestLabels;
use crate::request::RequestRecord;

/// Kinds of warnings already written by this VM (a bit set).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct LogOnce(u16);

impl LogOnce {
    pub(super) const REQUEST_JSON: LogOnce = LogOnce(1);
    pub(super) const RESPONSE_JSON: LogOnce = LogOnce(1 << 1);
    pub(super) const SSE: LogOnce = LogOnce(1 << 2);
    pub(super) const UNPARSED: LogOnce = LogOnce(1 << 3);
    pub(super) const HOST_ERRORS: LogOnce = LogOnce(1 << 4);
    pub(super) const RAG: LogOnce = LogOnce(1 << 5);
    pub(super) const EXPORT: LogOnce = LogOnce(1 << 6);
    pub(super) const QUEUE_FULL: LogOnce = LogOnce(1 << 7);

    /// Marks `kind` logged; true the first time.
    pub(super) fn first(&mut self, kind: LogOnce) -> bool {
        let first = self.0 & kind.0 == 0;
        self.0 |= kind.0;
        first
    }
}

impl<M: MetricsHost> Gateway<M> {
    /// Warns once per kind of malformed input the record carries.
    pub(super) fn log_problems(&mut self, rec: &RequestRecord, labels: &RequestLabels) {
        let p = rec.problems;
        if !(p.request_json
            || p.response_json
            || p.sse_events > 0
            || p.rag_headers > 0
            || rec.unparsed.is_some())
        {
            return;
        }
        let route = self
            .labeler
            .text(Dimension::Route, labels.route)
            .to_string();
        if p.request_json {
            self.warn_once(LogOnce::REQUEST_JSON, || {
                format!("tokentap: request body on route `{route}` is not valid JSON; passed through unchanged, counted in llm_gateway_parse_errors_total{{kind=\"request_json\"}} (logged once)")
            });
        }
        if p.response_json {
            self.warn_once(LogOnce::RESPONSE_JSON, || {
                format!("tokentap: JSON response on route `{route}` could not be parsed; passed through unchanged, counted in llm_gateway_parse_errors_total{{kind=\"response_json\"}} (logged once)")
            });
        }
        if p.sse_events > 0 {
            self.warn_once(LogOnce::SSE, || {
                format!("tokentap: {} malformed SSE event(s) on route `{route}`; stream passed through unchanged, counted in llm_gateway_parse_errors_total{{kind=\"sse_event\"}} (logged once)", p.sse_events)
            });
        }
        if rec.unparsed.is_some() {
            self.warn_once(LogOnce::UNPARSED, || {
                format!("tokentap: a response on route `{route}` was compressed or not JSON/SSE; token usage not read, counted in llm_gateway_responses_unparsed_total (logged once)")
            });
        }
        if p.rag_headers > 0 {
            self.warn_once(LogOnce::RAG, || {
                format!("tokentap: unparseable x-rag-* header value(s) on route `{route}`; counted in llm_gateway_parse_errors_total{{kind=\"rag_header\"}} (logged once)")
            });
        }
    }
}
