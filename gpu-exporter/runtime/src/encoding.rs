//! The runtime collector's exposition: per-target health families for every
//! scraped target, then the normalized families for the targets that are up.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;

use crate::collector::PodState;
use crate::exposition::encode_family;
use crate::normalize::{CounterKind, GaugeKind, HistogramKind, NormHistogram, Outcome};
use crate::{RuntimeCollector, ScrapeError};

/// Registered by the exporter into its prometheus-client Registry via
/// `registry.register_collector(Box::new(handle))`.
#[derive(Clone, Debug)]
pub struct RuntimeCollectorHandle(pub std::sync::Arc<RuntimeCollector>);

type Labels = Vec<(String, String)>;
type Labelled<'a> = [(Labels, &'a PodState)];
type Result = std::result::Result<(), std::fmt::Error>;

fn with(labels: &Labels, key: &str, value: &str) -> Labels {
    let mut l = labels.clone();
    l.push((key.to_string(), value.to_string()));
    l
}

/// One row per target from `value`.
fn per_target(targets: &Labelled<'_>, value: impl Fn(&PodState) -> f64) -> Vec<(Labels, f64)> {
    targets.iter().map(|(l, p)| (l.clone(), value(p))).collect()
}

impl Collector for RuntimeCollectorHandle {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result {
        // Disabled means absent: no `llm_runtime_up 0` for pods nobody scrapes.
        if self.0.disabled() {
            return Ok(());
        }
        let pods = self.0.snapshot();
        let targets: [(Labels, f64); 1] = [(Vec::new(), pods.len() as f64)];
        encode_family(
            &mut encoder,
            "llm_runtime_targets",
            "Inference-runtime pods discovered on this node.",
            MetricType::Gauge,
            &targets,
        )?;
        let labelled: Vec<(Labels, &PodState)> = pods
            .iter()
            .filter(|p| p.scraped)
            .map(|p| (p.labels(), p))
            .collect();
        encode_health(&mut encoder, &labelled)?;
        // Everything below is only for runtimes that are up right now.
        let live: Vec<(Labels, &PodState)> = labelled.into_iter().filter(|(_, p)| p.up).collect();
        encode_live_gauges(&mut encoder, &live)?;
        encode_live_counters(&mut encoder, &live)?;
        encode_histograms(&mut encoder, &live)
    }
}

/// Whether each target answered, how long it took and why it failed.
fn encode_health(encoder: &mut DescriptorEncoder<'_>, targets: &Labelled<'_>) -> Result {
    let gauge = MetricType::Gauge;
    let counter = MetricType::Counter;
    let up = per_target(targets, |p| if p.up { 1.0 } else { 0.0 });
    encode_family(
        encoder,
        "llm_runtime_up",
        "1 when the last scrape of the runtime succeeded, else 0.",
        gauge,
        &up,
    )?;
    let took = per_target(targets, |p| p.scrape_duration_seconds);
    encode_family(
        encoder,
        "llm_runtime_scrape_duration_seconds",
        "Duration of the last scrape of the runtime.",
        gauge,
        &took,
    )?;
    let errors: Vec<_> = targets
        .iter()
        .flat_map(|(l, p)| {
            ScrapeError::ALL.iter().map(move |r| {
                (
                    with(l, "reason", r.as_str()),
                    p.errors.get(r).copied().unwrap_or(0) as f64,
                )
            })
        })
        .collect();
    encode_family(
        encoder,
        "llm_runtime_scrape_errors",
        "Failed scrapes of the runtime, by reason.",
        counter,
        &errors,
    )?;
    let malformed = per_target(targets, |p| p.malformed_lines_total as f64);
    encode_family(
        encoder,
        "llm_runtime_scrape_malformed_lines",
        "Exposition lines of the runtime that could not be parsed and were skipped.",
        counter,
        &malformed,
    )?;
    let restarts = per_target(targets, |p| p.accumulator.restarts() as f64);
    encode_family(
        encoder,
        "llm_runtime_restarts",
        "Runtime restarts seen (counters reset or process start time changed).",
        counter,
        &restarts,
    )
}

/// Rows of the targets where `value` has a reading.
fn where_read(
    targets: &Labelled<'_>,
    value: impl Fn(&PodState) -> Option<f64>,
) -> Vec<(Labels, f64)> {
    targets
        .iter()
        .filter_map(|(l, p)| value(p).map(|v| (l.clone(), v)))
        .collect()
}

fn encode_live_gauges(encoder: &mut DescriptorEncoder<'_>, live: &Labelled<'_>) -> Result {
    for kind in GaugeKind::ALL {
        let series = where_read(live, |p| {
            p.latest.as_ref().and_then(|n| n.gauges.get(&kind)).copied()
        });
        encode_family(
            encoder,
            kind.name(),
            kind.help(),
            MetricType::Gauge,
            &series,
        )?;
    }
    let starts = where_read(live, |p| {
        p.latest.as_ref().and_then(|n| n.process_start_time_seconds)
    });
    encode_family(
        encoder,
        "llm_runtime_process_start_time_seconds",
        "Start time of the runtime process (Unix seconds), when the runtime reports it.",
        MetricType::Gauge,
        &starts,
    )
}

fn encode_live_counters(encoder: &mut DescriptorEncoder<'_>, live: &Labelled<'_>) -> Result {
    for kind in CounterKind::ALL {
        let series = where_read(live, |p| p.accumulator.counter(kind));
        encode_family(
            encoder,
            kind.name(),
            kind.help(),
            MetricType::Counter,
            &series,
        )?;
    }
    let outcomes: Vec<_> = live
        .iter()
        .flat_map(|(l, p)| {
            Outcome::ALL.iter().filter_map(move |o| {
                p.accumulator
                    .outcome(*o)
                    .map(|v| (with(l, "outcome", o.as_str()), v))
            })
        })
        .collect();
    encode_family(
        encoder,
        "llm_runtime_requests",
        "Finished requests by outcome (stop, length, success, abort, error).",
        MetricType::Counter,
        &outcomes,
    )
}

fn encode_histograms(encoder: &mut DescriptorEncoder<'_>, live: &Labelled<'_>) -> Result {
    for kind in HistogramKind::ALL {
        let series: Vec<_> = live
            .iter()
            .filter_map(|(l, p)| p.accumulator.histogram(kind).map(|h| (l, h)))
            .collect();
        if series.is_empty() {
            continue;
        }
        let mut m =
            encoder.encode_descriptor(kind.name(), kind.help(), None, MetricType::Histogram)?;
        for (labels, h) in &series {
            m.encode_family(*labels)?.encode_histogram::<NoLabelSet>(
                h.sum,
                h.count.max(0.0).round() as u64,
                &bucket_increments(h),
                None,
            )?;
        }
    }
    Ok(())
}

/// Per-bucket counts from cumulative ones, as the encoder wants them.
fn bucket_increments(h: &NormHistogram) -> Vec<(f64, u64)> {
    let mut prev = 0.0;
    h.buckets
        .iter()
        .map(|(le, c)| {
            let n = (c - prev).max(0.0);
            prev = prev.max(*c);
            (*le, n.round() as u64)
        })
        .collect()
}
