//! What a finished request records: one small function per part.

use super::catalogue::{Family, MAX_LABELS};
use super::labeler::{Labeler, RequestLabels};
use super::store::{LabelValue, MetricStore, Series};
use crate::config::Naming;
use crate::labels::{Dimension, OVERFLOW, UNKNOWN};
use crate::request::RequestRecord;
use crate::vocab::{
    GenAiTokenType, ParseErrorKind, RagError, RagEvaluation, TokenSource, TokenType, Vocabulary,
};

/// The label values of one request, with their texts looked up once.
struct Values<'a> {
    /// route, tenant, model, route_class, team, backend, collection.
    dims: [LabelValue<'a>; 7],
    /// `gen_ai_response_model` (GenAI naming only).
    response_model: LabelValue<'a>,
}

impl<'a> Values<'a> {
    fn new(labels: &RequestLabels, labeler: &'a Labeler) -> Self {
        let v = |d: Dimension| LabelValue {
            id: labels.get(d),
            text: labeler.text(d, labels.get(d)),
        };
        Self {
            dims: Dimension::ALL.map(v),
            response_model: LabelValue {
                id: labels.response_model,
                text: labeler.text(Dimension::Model, labels.response_model),
            },
        }
    }

    fn dim(&self, d: Dimension) -> LabelValue<'a> {
        self.dims[d as usize]
    }

    /// route, model, route_class, team, backend.
    fn workload(&self) -> [LabelValue<'a>; 5] {
        use Dimension::*;
        [Route, Model, RouteClass, Team, Backend].map(|d| self.dim(d))
    }

    /// route, tenant, model, route_class, team, backend, then `extra`.
    fn with_tenant(&self, extra: &[LabelValue<'a>]) -> LabelSet<'a> {
        use Dimension::*;
        let mut v = LabelSet::default();
        for d in [Route, Tenant, Model, RouteClass, Team, Backend] {
            v.push(self.dim(d));
        }
        extra.iter().for_each(|e| v.push(*e));
        v
    }

    /// The workload labels, the collection, then `extra`.
    fn with_collection(&self, extra: Option<LabelValue<'a>>) -> LabelSet<'a> {
        let mut v = LabelSet::default();
        self.workload().into_iter().for_each(|l| v.push(l));
        v.push(self.dim(Dimension::Collection));
        extra.into_iter().for_each(|e| v.push(e));
        v
    }
}

/// Up to [`MAX_LABELS`] label values, without a heap allocation (a request
/// builds a dozen of these).
#[derive(Clone, Copy)]
struct LabelSet<'a> {
    values: [LabelValue<'a>; MAX_LABELS],
    len: usize,
}

impl Default for LabelSet<'_> {
    fn default() -> Self {
        Self {
            values: [LabelValue { id: 0, text: "" }; MAX_LABELS],
            len: 0,
        }
    }
}

impl<'a> LabelSet<'a> {
    fn push(&mut self, v: LabelValue<'a>) {
        if let Some(slot) = self.values.get_mut(self.len) {
            *slot = v;
            self.len += 1;
        }
    }
}

impl<'a> std::ops::Deref for LabelSet<'a> {
    type Target = [LabelValue<'a>];
    fn deref(&self) -> &Self::Target {
        &self.values[..self.len]
    }
}

fn vocab<V: Vocabulary>(v: V) -> LabelValue<'static> {
    LabelValue {
        id: v.id(),
        text: v.as_str(),
    }
}

/// Emits every metric of a finished request into the store.
pub fn record_request(
    store: &mut MetricStore,
    rec: &RequestRecord,
    labels: &RequestLabels,
    labeler: &Labeler,
    now_ns: u64,
) {
    let values = Values::new(labels, labeler);
    traffic(store, rec, &values);
    tokens(store, rec, &values);
    latency_and_size(store, rec, &values, labeler.naming().llm_gateway());
    if labeler.naming().gen_ai() {
        gen_ai(store, rec, &values, labeler.provider_name());
    }
    problems(store, rec);
    rag(store, rec, &values, now_ns);
}

fn traffic(store: &mut MetricStore, rec: &RequestRecord, values: &Values<'_>) {
    let mut buf = [0u8; 3];
    let status = LabelValue {
        id: rec.status.filter(|s| (100..600).contains(s)).unwrap_or(0),
        text: status_text(rec.status, &mut buf),
    };
    let v = values.with_tenant(&[status]);
    store.add(&Series::new(Family::RequestsTotal, &v), 1);
    if let Some(e) = rec.error {
        let v = values.with_tenant(&[vocab(e)]);
        store.add(&Series::new(Family::ErrorsTotal, &v), 1);
    }
    if let Some(hit) = rec.cache_hit {
        let v = values.with_tenant(&[vocab(hit)]);
        store.add(&Series::new(Family::CacheHitsTotal, &v), 1);
    }
}

fn tokens(store: &mut MetricStore, rec: &RequestRecord, values: &Values<'_>) {
    let Some(source) = rec.token_source() else {
        return;
    };
    let counts = [
        (TokenType::Prompt, rec.usage.prompt_tokens),
        (TokenType::Completion, rec.completion_tokens()),
        (TokenType::Cached, rec.usage.cached_tokens),
        (TokenType::Reasoning, rec.usage.reasoning_tokens),
        (TokenType::CacheCreation, rec.usage.cache_creation_tokens),
    ];
    for (token_type, n) in counts {
        if let Some(n) = n.filter(|n| *n > 0) {
            let v = values.with_tenant(&[vocab(token_type), vocab(source)]);
            store.add(
                &Series::new(Family::TokensTotal, &v),
                i64::try_from(n).unwrap_or(i64::MAX),
            );
        }
    }
}

fn latency_and_size(
    store: &mut MetricStore,
    rec: &RequestRecord,
    values: &Values<'_>,
    llm_gateway: bool,
) {
    let w = values.workload();
    let reported_prompt = rec
        .usage
        .prompt_tokens
        .filter(|_| rec.token_source() == Some(TokenSource::Usage));
    let samples = [
        (Family::RequestDuration, Some(rec.duration_ms())),
        (Family::RequestBytes, Some(rec.request_bytes)),
        (Family::ResponseBytes, Some(rec.response_bytes)),
        (Family::TimeToFirstByte, rec.ttfb_ms()),
        (Family::TimeToFirstToken, rec.ttft_ms()),
        (Family::TimePerOutputToken, rec.tpot_ms()),
        (
            Family::OutputTokensPerSecond,
            rec.output_tokens_per_second(),
        ),
        (Family::PromptTokens, reported_prompt),
        (Family::CompletionTokens, rec.completion_tokens()),
    ];
    for (family, value) in samples {
        if let (Some(value), true) = (value, llm_gateway || family.published(Naming::GenAi)) {
            store.observe(&Series::new(family, &w), value);
        }
    }
}

/// The GenAI naming's histograms: the same measurements as the
/// `llm_gateway_*` ones, durations in microseconds (published in seconds),
/// and only the token counts the runtime reported.
fn gen_ai<'a>(
    store: &mut MetricStore,
    rec: &RequestRecord,
    values: &Values<'a>,
    provider: &'a str,
) {
    let us = |from: u64, to: u64| to.saturating_sub(from) / 1_000;
    fn labels<'a>(
        rec: &RequestRecord,
        values: &Values<'a>,
        provider: &'a str,
        last: LabelValue<'a>,
    ) -> LabelSet<'a> {
        let mut v = LabelSet::default();
        values.workload().into_iter().for_each(|l| v.push(l));
        v.push(LabelValue {
            id: rec.operation as u16,
            text: rec.operation.gen_ai_name(),
        });
        v.push(LabelValue {
            id: 0,
            text: provider,
        });
        v.push(values.dim(Dimension::Model));
        v.push(values.response_model);
        v.push(last);
        v
    }
    let common = |last| labels(rec, values, provider, last);
    // `error_type` is absent (empty) on success, as the conventions have it.
    let error = match rec.error {
        Some(e) => LabelValue {
            id: e.id() + 1,
            text: e.as_str(),
        },
        None => LabelValue { id: 0, text: "" },
    };
    let v = common(error);
    let tpot = rec.completion_tokens().filter(|n| *n >= 2).and_then(|n| {
        let (first, last) = (rec.first_token_ns?, rec.last_token_ns?);
        Some(us(first, last) / (n - 1))
    });
    let samples = [
        (
            Family::GenAiRequestDuration,
            Some(us(rec.start_ns, rec.end_ns)),
        ),
        (
            Family::GenAiTimeToFirstToken,
            rec.first_token_ns.map(|t| us(rec.start_ns, t)),
        ),
        (Family::GenAiTimePerOutputToken, tpot),
    ];
    for (family, value) in samples {
        if let Some(value) = value {
            store.observe(&Series::new(family, &v), value);
        }
    }
    if rec.token_source() != Some(TokenSource::Usage) {
        return;
    }
    let u = &rec.usage;
    let counts = [
        (GenAiTokenType::Input, u.prompt_tokens),
        (GenAiTokenType::Output, u.completion_tokens),
        (GenAiTokenType::CachedInput, u.cached_tokens),
        (GenAiTokenType::Reasoning, u.reasoning_tokens),
        (GenAiTokenType::CacheCreationInput, u.cache_creation_tokens),
    ];
    for (token_type, n) in counts {
        if let Some(n) = n {
            let v = common(vocab(token_type));
            store.observe(&Series::new(Family::GenAiTokenUsage, &v), n);
        }
    }
}

fn problems(store: &mut MetricStore, rec: &RequestRecord) {
    let p = &rec.problems;
    let kinds = [
        (ParseErrorKind::RequestJson, u64::from(p.request_json)),
        (ParseErrorKind::ResponseJson, u64::from(p.response_json)),
        (ParseErrorKind::SseEvent, p.sse_events),
        (ParseErrorKind::RagHeader, u64::from(p.rag_headers)),
    ];
    for (kind, n) in kinds {
        if n > 0 {
            add_one_label(store, Family::ParseErrors, vocab(kind), n);
        }
    }
    if let Some(u) = rec.unparsed {
        add_one_label(store, Family::ResponsesUnparsed, vocab(u), 1);
    }
    if let Some(result) = rec.injection.result() {
        add_one_label(store, Family::UsageInjections, vocab(result), 1);
    }
}

/// Adds to a family whose only label is `value`.
pub(crate) fn add_one_label(
    store: &mut MetricStore,
    family: Family,
    value: LabelValue<'_>,
    n: u64,
) {
    let v = [value];
    store.add(
        &Series::new(family, &v),
        i64::try_from(n).unwrap_or(i64::MAX),
    );
}

fn rag(store: &mut MetricStore, rec: &RequestRecord, values: &Values<'_>, now_ns: u64) {
    let rag = &rec.rag;
    if !rag.present() && rec.rag_collection.is_none() {
        return;
    }
    let wc = values.with_collection(None);
    let samples = [
        (Family::RagRetrievalDuration, rag.retrieval_ms.map(round)),
        (Family::RagTopScore, rag.top_score.map(|s| round(s * 100.0))),
        (Family::RagSources, rag.sources),
    ];
    for (family, value) in samples {
        if let Some(value) = value {
            store.observe(&Series::new(family, &wc), value);
        }
    }
    if let Some(age) = rag.index_age_seconds {
        store.set(&Series::new(Family::RagIndexAge, &wc), round(age));
        let updated = (now_ns / 1_000_000_000).saturating_sub(round(age));
        store.set(&Series::new(Family::RagIndexLastUpdate, &wc), updated);
    }
    if let Some(result) = rag.evaluation {
        let r = crate::vocab::lookup::<RagEvaluation>(result).unwrap_or(RagEvaluation::Other);
        let v = values.with_collection(Some(vocab(r)));
        store.add(&Series::new(Family::RagEvaluations, &v), 1);
    }
    if let Some(reason) = rag.error {
        let r = crate::vocab::lookup::<RagError>(reason).unwrap_or(RagError::Other);
        let v = values.with_collection(Some(vocab(r)));
        store.add(&Series::new(Family::RagErrors, &v), 1);
    }
}

fn round(v: f64) -> u64 {
    // `as` saturates: negative and NaN become 0, huge values u64::MAX.
    v.round() as u64
}

/// The status label: three digits, `unknown` when absent, `other` when out of range.
fn status_text(status: Option<u16>, buf: &mut [u8; 3]) -> &str {
    match status.filter(|s| (100..600).contains(s)) {
        Some(s) => {
            buf[0] = b'0' + (s / 100) as u8;
            buf[1] = b'0' + (s / 10 % 10) as u8;
            buf[2] = b'0' + (s % 10) as u8;
            std::str::from_utf8(buf).unwrap_or(OVERFLOW)
        }
        None if status.is_none() => UNKNOWN,
        None => OVERFLOW,
    }
}
