//! vLLM's Prometheus metrics, kept as plain data inside the engine and
//! rendered the way vLLM's `prometheus_client` renders them (text format
//! 0.0.4), so scrapers and normalizers see the same bytes a real vLLM sends.
//!
//! Names, types, help strings and bucket boundaries follow
//! `vllm/v1/metrics/loggers.py` (PrometheusStatLogger).

use std::fmt::Write as _;

/// Time-to-first-token buckets of `vllm:time_to_first_token_seconds`.
pub const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
/// Buckets of `vllm:inter_token_latency_seconds` and
/// `vllm:request_time_per_output_token_seconds`.
pub const ITL_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
/// `request_latency_buckets` shared by e2e, queue, inference, prefill and decode time.
pub const REQUEST_LATENCY_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];
/// Buckets of `vllm:iteration_tokens_total`.
pub const ITERATION_TOKEN_BUCKETS: &[f64] = &[
    1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0,
];

/// vLLM's `build_1_2_5_buckets(max_model_len)`: 1, 2, 5, 10, 20, 50, ... up to the limit.
pub fn buckets_1_2_5(max_value: u64) -> Vec<f64> {
    let mut out = Vec::new();
    let mut scale: u64 = 1;
    loop {
        for m in [1u64, 2, 5] {
            let v = m.saturating_mul(scale);
            if v > max_value {
                return out;
            }
            out.push(v as f64);
        }
        scale = scale.saturating_mul(10);
    }
}

/// A cumulative Prometheus histogram with fixed upper bounds.
#[derive(Clone, Debug, PartialEq)]
pub struct Histogram {
    bounds: Vec<f64>,
    /// Non-cumulative counts per bound; the last slot is `+Inf`.
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    pub fn new(bounds: &[f64]) -> Self {
        Self {
            bounds: bounds.to_vec(),
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
            count: 0,
        }
    }

    pub fn observe(&mut self, value: f64) {
        let slot = self
            .bounds
            .iter()
            .position(|b| value <= *b)
            .unwrap_or(self.bounds.len());
        if let Some(c) = self.counts.get_mut(slot) {
            *c += 1;
        }
        self.sum += value;
        self.count += 1;
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn sum(&self) -> f64 {
        self.sum
    }

    /// (upper bound, cumulative count) pairs, ending with `+Inf`.
    pub fn cumulative(&self) -> Vec<(f64, u64)> {
        let mut acc = 0;
        let mut out = Vec::with_capacity(self.counts.len());
        for (i, c) in self.counts.iter().enumerate() {
            acc += c;
            out.push((self.bounds.get(i).copied().unwrap_or(f64::INFINITY), acc));
        }
        out
    }
}

/// Formats a float the way `prometheus_client.utils.floatToGoString` does,
/// so the exposition is byte-compatible with vLLM's.
pub fn go_float(v: f64) -> String {
    if v.is_nan() {
        return "NaN".into();
    }
    if v == f64::INFINITY {
        return "+Inf".into();
    }
    if v == f64::NEG_INFINITY {
        return "-Inf".into();
    }
    let s = python_repr(v);
    if v > 0.0 {
        if let Some(dot) = s.find('.') {
            if dot > 6 && !s.contains('e') {
                let (int_part, frac) = s.split_at(dot);
                let frac = frac.trim_start_matches('.');
                let digits = format!("{}{}", &int_part[1..], frac);
                let mantissa = format!("{}.{}", &int_part[..1], digits);
                let mantissa = mantissa.trim_end_matches('0').trim_end_matches('.');
                return format!("{mantissa}e+0{}", dot - 1);
            }
        }
    }
    s
}

/// Python's `repr(float)` for the magnitudes metrics use: shortest
/// round-trip digits, always with a decimal point.
fn python_repr(v: f64) -> String {
    let s = format!("{v}");
    if s.contains('.') || s.contains('e') || s.contains("inf") || s.contains("NaN") {
        s
    } else {
        format!("{s}.0")
    }
}

/// Escapes a label value like `prometheus_client` does.
pub fn escape_label_value(v: &str) -> String {
    v.replace('\\', r"\\")
        .replace('\n', r"\n")
        .replace('"', r#"\""#)
}

fn escape_help(v: &str) -> String {
    v.replace('\\', r"\\").replace('\n', r"\n")
}

/// Builds one family of Prometheus text exposition at a time.
#[derive(Default)]
pub struct Exposition {
    out: String,
}

/// Label pairs in output order.
pub type Labels<'a> = &'a [(&'a str, &'a str)];

fn label_block(labels: Labels<'_>, extra: Option<(&str, &str)>) -> String {
    let mut parts: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape_label_value(v)))
        .collect();
    if let Some((k, v)) = extra {
        parts.push(format!("{k}=\"{}\"", escape_label_value(v)));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", parts.join(","))
    }
}

impl Exposition {
    pub fn new() -> Self {
        Self::default()
    }

    fn header(&mut self, name: &str, help: &str, kind: &str) {
        let _ = writeln!(self.out, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: Labels<'_>, extra: Option<(&str, &str)>, v: f64) {
        let _ = writeln!(
            self.out,
            "{name}{} {}",
            label_block(labels, extra),
            go_float(v)
        );
    }

    /// A gauge family; one sample per label set.
    pub fn gauge(&mut self, name: &str, help: &str, samples: &[(Labels<'_>, f64)]) {
        self.header(name, help, "gauge");
        for (labels, v) in samples {
            self.sample(name, labels, None, *v);
        }
    }

    /// A counter family named `base` (rendered as `base_total`), with the
    /// `base_created` gauge family prometheus_client adds after it.
    pub fn counter(&mut self, base: &str, help: &str, samples: &[(Labels<'_>, f64)], created: f64) {
        let total = format!("{base}_total");
        self.header(&total, help, "counter");
        for (labels, v) in samples {
            self.sample(&total, labels, None, *v);
        }
        let created_name = format!("{base}_created");
        self.header(&created_name, help, "gauge");
        for (labels, _) in samples {
            self.sample(&created_name, labels, None, created);
        }
    }

    /// A histogram family with `_bucket`, `_count`, `_sum` and the
    /// `_created` gauge family.
    pub fn histogram(
        &mut self,
        name: &str,
        help: &str,
        samples: &[(Labels<'_>, &Histogram)],
        created: f64,
    ) {
        self.header(name, help, "histogram");
        let bucket = format!("{name}_bucket");
        let count = format!("{name}_count");
        let sum = format!("{name}_sum");
        for (labels, h) in samples {
            for (le, c) in h.cumulative() {
                self.sample(&bucket, labels, Some(("le", &go_float(le))), c as f64);
            }
            self.sample(&count, labels, None, h.count() as f64);
            self.sample(&sum, labels, None, h.sum());
        }
        let created_name = format!("{name}_created");
        self.header(&created_name, help, "gauge");
        for (labels, _) in samples {
            self.sample(&created_name, labels, None, created);
        }
    }

    pub fn finish(self) -> String {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_render_like_prometheus_client() {
        assert_eq!(go_float(0.0), "0.0");
        assert_eq!(go_float(1.0), "1.0");
        assert_eq!(go_float(0.001), "0.001");
        assert_eq!(go_float(2560.0), "2560.0");
        assert_eq!(go_float(f64::INFINITY), "+Inf");
        assert_eq!(go_float(1_700_000_000.5), "1.7000000005e+09");
        assert_eq!(go_float(1_234_567.0), "1.234567e+06");
        assert_eq!(go_float(123_456.0), "123456.0");
    }

    #[test]
    fn one_two_five_buckets_match_vllm() {
        assert_eq!(
            buckets_1_2_5(100),
            vec![1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0]
        );
        assert_eq!(buckets_1_2_5(4096).last(), Some(&2000.0));
    }

    #[test]
    fn histogram_is_cumulative_with_inf() {
        let mut h = Histogram::new(&[0.1, 1.0]);
        h.observe(0.05);
        h.observe(0.1);
        h.observe(0.5);
        h.observe(7.0);
        assert_eq!(h.cumulative(), vec![(0.1, 2), (1.0, 3), (f64::INFINITY, 4)]);
        assert_eq!(h.count(), 4);
        assert!((h.sum() - 7.65).abs() < 1e-9);
    }

    #[test]
    fn counter_renders_total_and_created() {
        let mut e = Exposition::new();
        e.counter(
            "vllm:prompt_tokens",
            "Number of prefill tokens processed.",
            &[(&[("model_name", "m"), ("engine", "0")], 3.0)],
            10.0,
        );
        let text = e.finish();
        assert!(text.contains("# TYPE vllm:prompt_tokens_total counter\n"));
        assert!(text.contains("vllm:prompt_tokens_total{model_name=\"m\",engine=\"0\"} 3.0\n"));
        assert!(text.contains("vllm:prompt_tokens_created{model_name=\"m\",engine=\"0\"} 10.0\n"));
    }
}
