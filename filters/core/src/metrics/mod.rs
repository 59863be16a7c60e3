//! The gateway metric catalogue, its labels, and how series reach Envoy.
//!
//! proxy-wasm metrics have no labels, so each label travels inside the stat
//! name, in Istio's encoding: `key=.=value;.;` fields before the metric name,
//!
//! ```text
//! route=.=chat;.;tenant=.=acme;.;model=.=mistral-7b;.;...;.;llm_gateway_requests_total
//! ```
//!
//! Envoy stores it as `wasmcustom.<that>`; one `stats_tags` regex per label,
//! `(key=\.=(.*?);\.;)`, cuts the field out of the name and turns it into a
//! real tag, so `/stats/prometheus` shows `llm_gateway_requests_total{route=
//! "chat",tenant="acme",...}`. Istio's `extraStatTags` generates exactly those
//! regexes; plain Envoy and Envoy Gateway get them from `envoy/`.
//!
//! Requests do not call the host: [`store::MetricStore`] aggregates every
//! update in VM memory and publishes the changes on the VM's tick (counter
//! deltas, gauge values, and histograms as cumulative `_bucket{le}` counters
//! with an exact `_sum` and `_count`), so a request costs no host call for
//! metrics at all and a value is visible within one tick.

mod catalogue;
mod labeler;
mod record;
pub mod store;

pub use catalogue::{markdown_table, Family, FamilyDef, LabelKey, MAX_LABELS};
pub use labeler::{Labeler, Overflowed, RequestLabels};
pub use record::record_request;
pub use store::{LabelValue, MetricStore, Series};

/// Appends the stat name of a series: fields first, then the metric name.
///
/// ```
/// let mut name = String::new();
/// tokentap_core::metrics::encode_stat_name(&mut name, "llm_gateway_requests_total", &[("route", "chat")]);
/// assert_eq!(name, "route=.=chat;.;llm_gateway_requests_total");
/// ```
pub fn encode_stat_name(out: &mut String, name: &str, labels: &[(&str, &str)]) {
    for (k, v) in labels {
        push_label(out, k, v);
    }
    out.push_str(name);
}

/// Splits a stat name made by [`encode_stat_name`] back into the metric name
/// and its label fields, for hosts whose stats take labels as tags (Envoy
/// dynamic modules). `None` when the name is not in that encoding. Label
/// values are sanitised (`[A-Za-z0-9._:/-]`), so the separators cannot occur
/// inside one and the split is unambiguous.
///
/// ```
/// use tokentap_core::metrics::{decode_stat_name, encode_stat_name};
/// let mut name = String::new();
/// encode_stat_name(&mut name, "llm_gateway_requests_total", &[("route", "chat"), ("status", "200")]);
/// let (metric, labels) = decode_stat_name(&name).unwrap();
/// assert_eq!(metric, "llm_gateway_requests_total");
/// assert_eq!(labels, vec![("route", "chat"), ("status", "200")]);
/// ```
pub fn decode_stat_name(encoded: &str) -> Option<(&str, Vec<(&str, &str)>)> {
    let mut labels = Vec::new();
    let mut rest = encoded;
    while let Some(end) = rest.find(";.;") {
        let (key, value) = rest[..end].split_once("=.=")?;
        labels.push((key, value));
        rest = &rest[end + 3..];
    }
    if rest.is_empty() || rest.contains("=.=") {
        return None;
    }
    Some((rest, labels))
}

fn push_label(out: &mut String, key: &str, value: &str) {
    out.push_str(key);
    out.push_str("=.=");
    out.push_str(value);
    out.push_str(";.;");
}

#[cfg(test)]
mod tests;
