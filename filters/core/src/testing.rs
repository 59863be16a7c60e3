//! Test doubles and helpers shared by the crate's test modules: a scripted
//! [`HttpView`], a recording [`MetricsHost`], and the chunk splitter the
//! streaming parsers' "any chunking gives the same result" properties use.

use std::collections::HashMap;

use proptest::sample::Index;

use crate::host::{HostError, HttpView, MetricKind, MetricsHost};

/// One millisecond in the host's nanosecond timestamps.
pub(crate) const MS: u64 = 1_000_000;

/// Cuts `bytes` at the positions `cuts` pick (sorted; repeated or edge
/// positions give empty chunks), so a property can feed a parser the same
/// input in arbitrary chunks.
pub(crate) fn split_at_cuts<'a>(bytes: &'a [u8], cuts: &[Index]) -> Vec<&'a [u8]> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
    points.sort_unstable();
    let mut chunks = Vec::with_capacity(points.len() + 1);
    let mut last = 0;
    for p in points {
        chunks.push(&bytes[last..p]);
        last = p;
    }
    chunks.push(&bytes[last..]);
    chunks
}

/// A scripted request/response: headers by lower-case name, properties by
/// their dotted path (`xds.route_name`).
#[derive(Default)]
pub(crate) struct FakeView {
    pub req: HashMap<String, Vec<u8>>,
    pub resp: HashMap<String, Vec<u8>>,
    pub props: HashMap<String, Vec<u8>>,
}

impl FakeView {
    /// A `POST /v1/chat/completions` request, the usual start of a scenario.
    pub fn chat_request() -> Self {
        Self::default()
            .req(":path", "/v1/chat/completions")
            .req(":method", "POST")
    }
    pub fn req(mut self, k: &str, v: &str) -> Self {
        self.req.insert(k.into(), v.as_bytes().to_vec());
        self
    }
    pub fn resp(mut self, k: &str, v: &str) -> Self {
        self.resp.insert(k.into(), v.as_bytes().to_vec());
        self
    }
    pub fn prop(mut self, k: &str, v: &[u8]) -> Self {
        self.props.insert(k.into(), v.to_vec());
        self
    }
}

impl HttpView for FakeView {
    fn request_header(&self, name: &str) -> Option<Vec<u8>> {
        self.req.get(name).cloned()
    }
    fn response_header(&self, name: &str) -> Option<Vec<u8>> {
        self.resp.get(name).cloned()
    }
    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        self.props.get(&path.join(".")).cloned()
    }
}

/// Envoy's stats as far as the filter can see them, with Envoy's rules: a
/// name defined twice is one stat, counters take positive increments only,
/// `record` sets a gauge. Counts every host call.
#[derive(Default)]
pub(crate) struct FakeStats {
    pub names: Vec<(MetricKind, String)>,
    pub values: HashMap<u32, i64>,
    pub calls: usize,
}

impl MetricsHost for FakeStats {
    fn define(&mut self, kind: MetricKind, name: &str) -> Result<u32, HostError> {
        self.calls += 1;
        if let Some(i) = self.names.iter().position(|(_, n)| n == name) {
            return Ok(i as u32);
        }
        self.names.push((kind, name.to_string()));
        Ok(self.names.len() as u32 - 1)
    }
    fn increment(&mut self, id: u32, delta: i64) -> Result<(), HostError> {
        self.calls += 1;
        let kind = self.names.get(id as usize).map(|(k, _)| *k);
        if kind == Some(MetricKind::Counter) && delta <= 0 {
            return Err(HostError(2));
        }
        *self.values.entry(id).or_default() += delta;
        Ok(())
    }
    fn record(&mut self, id: u32, value: u64) -> Result<(), HostError> {
        self.calls += 1;
        self.values.insert(id, value as i64);
        Ok(())
    }
}

impl FakeStats {
    fn id(&self, name: &str) -> Option<u32> {
        self.names
            .iter()
            .position(|(_, n)| n == name)
            .map(|i| i as u32)
    }
    /// The counter's or gauge's value; 0 when never defined or touched.
    pub fn value(&self, name: &str) -> i64 {
        self.id(name)
            .and_then(|i| self.values.get(&i).copied())
            .unwrap_or(0)
    }
    /// Whether the stat was defined.
    pub fn defined(&self, name: &str) -> bool {
        self.id(name).is_some()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The chunks put back together are the input, one more than the cuts.
        #[test]
        fn split_at_cuts_keeps_every_byte(
            data in prop::collection::vec(any::<u8>(), 0..64),
            cuts in prop::collection::vec(any::<Index>(), 0..8),
        ) {
            let chunks = split_at_cuts(&data, &cuts);
            prop_assert_eq!(chunks.len(), cuts.len() + 1);
            prop_assert_eq!(chunks.concat(), data);
        }
    }

    #[test]
    fn fake_view_answers_what_it_was_given() {
        let view = FakeView::chat_request()
            .resp(":status", "200")
            .prop("xds.route_name", b"chat");
        assert_eq!(view.request_header(":method").unwrap(), b"POST");
        assert_eq!(view.response_header(":status").unwrap(), b"200");
        assert_eq!(view.property(&["xds", "route_name"]).unwrap(), b"chat");
        assert_eq!(view.request_header("x-missing"), None);
    }

    #[test]
    fn fake_stats_follows_envoys_rules() {
        let mut stats = FakeStats::default();
        let c = stats.define(MetricKind::Counter, "c").unwrap();
        let g = stats.define(MetricKind::Gauge, "g").unwrap();
        assert_eq!(stats.define(MetricKind::Counter, "c").unwrap(), c);
        stats.increment(c, 2).unwrap();
        stats.increment(c, 3).unwrap();
        assert!(
            stats.increment(c, 0).is_err(),
            "Envoy refuses a zero increment"
        );
        stats.record(g, 7).unwrap();
        stats.record(g, 1).unwrap();
        assert_eq!(stats.value("c"), 5);
        assert_eq!(stats.value("g"), 1);
        assert_eq!(stats.value("never"), 0);
        assert!(stats.defined("g") && !stats.defined("never"));
        assert_eq!(stats.calls, 8);
    }
}
