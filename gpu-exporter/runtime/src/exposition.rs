//! The one encoding helper for plain families (gauges and counters), shared
//! by the exporter's GPU collector and the runtime collector, so both write
//! families the same way: nothing for a family without rows, `_total`
//! appended to counters by the encoder.

use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, NoLabelSet};
use prometheus_client::metrics::MetricType;

/// Writes one family of `kind` (gauge or counter; anything else is written
/// as a gauge) with a sample per row; a family without rows is left out.
/// A counter's `name` is given without `_total`.
///
/// ```
/// use prometheus_client::collector::Collector;
/// use prometheus_client::encoding::DescriptorEncoder;
/// use prometheus_client::metrics::MetricType;
/// use prometheus_client::registry::Registry;
/// use tokentap_runtime_metrics::exposition::encode_family;
///
/// #[derive(Debug)]
/// struct Two;
/// impl Collector for Two {
///     fn encode(&self, mut enc: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
///         let rows = [(vec![("pod", "a")], 2.0)];
///         encode_family(&mut enc, "pods_seen", "Pods seen.", MetricType::Counter, &rows)?;
///         let none: [(Vec<(&str, &str)>, f64); 0] = [];
///         encode_family(&mut enc, "absent", "Left out.", MetricType::Gauge, &none)
///     }
/// }
/// let mut registry = Registry::default();
/// registry.register_collector(Box::new(Two));
/// let mut text = String::new();
/// prometheus_client::encoding::text::encode(&mut text, &registry)?;
/// assert!(text.contains("pods_seen_total{pod=\"a\"} 2.0"));
/// assert!(!text.contains("absent"));
/// # Ok::<(), std::fmt::Error>(())
/// ```
pub fn encode_family<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    kind: MetricType,
    rows: &[(L, f64)],
) -> Result<(), std::fmt::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut family = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in rows {
        let mut sample = family.encode_family(labels)?;
        match kind {
            MetricType::Counter => sample.encode_counter::<NoLabelSet, f64, f64>(value, None)?,
            _ => sample.encode_gauge(value)?,
        }
    }
    Ok(())
}
