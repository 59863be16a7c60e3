//! Envoy stats as the module defines and updates them, with the semantics
//! of Envoy's `proxy_*_metric` implementation, and queries over the
//! Istio-style stat names (`key=.=value;.;...;.;family`).

use crate::abi::{MetricKind, Status};

/// One stat: a counter's or gauge's value, or a histogram's samples.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Metric {
    pub kind: MetricKind,
    pub name: String,
    /// Counter total or gauge value.
    pub value: i64,
    /// Histogram samples, in recording order.
    pub samples: Vec<u64>,
}

impl Metric {
    /// The family (metric name without the label fields).
    pub fn family(&self) -> &str {
        parse_stat_name(&self.name).0
    }

    /// The label fields, in name order.
    pub fn labels(&self) -> Vec<(&str, &str)> {
        parse_stat_name(&self.name).1
    }

    /// Whether every `(key, value)` in `want` is among the labels.
    pub fn has_labels(&self, want: &[(&str, &str)]) -> bool {
        let labels = self.labels();
        want.iter().all(|w| labels.contains(w))
    }
}

/// Splits `route=.=chat;.;status=.=200;.;llm_gateway_requests_total` into the
/// family and its labels. A name without fields is all family.
pub fn parse_stat_name(name: &str) -> (&str, Vec<(&str, &str)>) {
    let mut parts: Vec<&str> = name.split(";.;").collect();
    let family = parts.pop().unwrap_or_default();
    let labels = parts
        .into_iter()
        .map(|p| p.split_once("=.=").unwrap_or((p, "")))
        .collect();
    (family, labels)
}

/// Every stat defined so far. Ids are handed out as Envoy does: the kind in
/// the low two bits, so an id used with the wrong call is refused.
#[derive(Debug, Default)]
pub struct Metrics {
    all: Vec<Metric>,
    ids: Vec<(u32, usize)>,
    next: u32,
}

impl Metrics {
    pub fn all(&self) -> &[Metric] {
        &self.all
    }

    /// The stat with exactly this name.
    pub fn get(&self, name: &str) -> Option<&Metric> {
        self.all.iter().find(|m| m.name == name)
    }

    /// Stats of `family` whose labels include `labels`.
    pub fn series<'a>(
        &'a self,
        family: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Metric> + 'a {
        self.all
            .iter()
            .filter(move |m| m.family() == family && m.has_labels(labels))
    }

    /// Sum of counter/gauge values over the matching series.
    pub fn total(&self, family: &str, labels: &[(&str, &str)]) -> i64 {
        self.series(family, labels).map(|m| m.value).sum()
    }

    /// A histogram the module publishes as cumulative counters
    /// (`<family>_bucket{le}`, `<family>_sum`, `<family>_count`), summed over
    /// the matching series: `(count, sum)`.
    pub fn histogram(&self, family: &str, labels: &[(&str, &str)]) -> (i64, i64) {
        (
            self.total(&format!("{family}_count"), labels),
            self.total(&format!("{family}_sum"), labels),
        )
    }

    /// The cumulative count of bucket `le` (e.g. `"250"`, `"+Inf"`).
    pub fn bucket(&self, family: &str, le: &str, labels: &[(&str, &str)]) -> i64 {
        let mut with_le = labels.to_vec();
        with_le.push(("le", le));
        self.total(&format!("{family}_bucket"), &with_le)
    }

    /// Samples of native Envoy histograms over the matching series.
    pub fn samples(&self, family: &str, labels: &[(&str, &str)]) -> Vec<u64> {
        self.series(family, labels)
            .flat_map(|m| m.samples.iter().copied())
            .collect()
    }

    /// `proxy_define_metric`: a new id for the stat of that kind and name
    /// (Envoy shares the stat between ids of the same name).
    pub(crate) fn define(&mut self, kind: MetricKind, name: &str) -> u32 {
        let index = match self
            .all
            .iter()
            .position(|m| m.kind == kind && m.name == name)
        {
            Some(i) => i,
            None => {
                self.all.push(Metric {
                    kind,
                    name: name.to_string(),
                    value: 0,
                    samples: Vec::new(),
                });
                self.all.len() - 1
            }
        };
        self.next += 1;
        let code = match kind {
            MetricKind::Counter => 1,
            MetricKind::Gauge => 2,
            MetricKind::Histogram => 3,
        };
        let id = (self.next << 2) | code;
        self.ids.push((id, index));
        id
    }

    fn by_id(&mut self, id: u32) -> Option<&mut Metric> {
        let index = self.ids.iter().find(|(i, _)| *i == id)?.1;
        self.all.get_mut(index)
    }

    /// `proxy_increment_metric`: counters take positive offsets only,
    /// gauges any, histograms none.
    pub(crate) fn increment(&mut self, id: u32, offset: i64) -> Status {
        let Some(m) = self.by_id(id) else {
            return Status::NotFound;
        };
        match m.kind {
            MetricKind::Counter if offset > 0 => m.value += offset,
            MetricKind::Gauge => m.value += offset,
            _ => return Status::BadArgument,
        }
        Status::Ok
    }

    /// `proxy_record_metric`: adds to a counter, sets a gauge, records a
    /// histogram sample.
    pub(crate) fn record(&mut self, id: u32, value: u64) -> Status {
        let Some(m) = self.by_id(id) else {
            return Status::NotFound;
        };
        let signed = i64::try_from(value).unwrap_or(i64::MAX);
        match m.kind {
            MetricKind::Counter => m.value += signed,
            MetricKind::Gauge => m.value = signed,
            MetricKind::Histogram => m.samples.push(value),
        }
        Status::Ok
    }

    /// `proxy_get_metric`: counters and gauges only.
    pub(crate) fn read(&mut self, id: u32) -> Result<u64, Status> {
        let m = self.by_id(id).ok_or(Status::NotFound)?;
        match m.kind {
            MetricKind::Histogram => Err(Status::BadArgument),
            _ => Ok(m.value as u64),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_names_split_into_family_and_labels() {
        let (family, labels) = parse_stat_name("route=.=chat;.;status=.=200;.;llm_x_total");
        assert_eq!(family, "llm_x_total");
        assert_eq!(labels, vec![("route", "chat"), ("status", "200")]);
        assert_eq!(parse_stat_name("plain").0, "plain");
    }

    #[test]
    fn envoy_semantics_per_kind() {
        let mut m = Metrics::default();
        let c = m.define(MetricKind::Counter, "a=.=1;.;c");
        let c2 = m.define(MetricKind::Counter, "a=.=1;.;c");
        let h = m.define(MetricKind::Histogram, "h");
        assert_ne!(c, c2);
        assert_eq!(m.increment(c, 2), Status::Ok);
        assert_eq!(m.increment(c2, 3), Status::Ok);
        assert_eq!(m.increment(c, 0), Status::BadArgument);
        assert_eq!(m.increment(h, 1), Status::BadArgument);
        assert_eq!(m.record(h, 7), Status::Ok);
        assert_eq!(m.increment(999, 1), Status::NotFound);
        assert_eq!(m.total("c", &[("a", "1")]), 5);
        assert_eq!(m.samples("h", &[]), vec![7]);
        assert_eq!(m.read(h), Err(Status::BadArgument));
    }
}
