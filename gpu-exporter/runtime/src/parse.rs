//! A tolerant, bounded parser for the Prometheus text formats runtimes emit.
//!
//! Runtimes differ: vLLM and SGLang put colons in names, TGI's counters lack
//! `_total`, Python clients add `_created` series, OpenMetrics bodies end in
//! `# EOF` and may carry exemplars. The parser accepts all of that, skips
//! (and counts) lines it cannot read, and refuses bodies that exceed the
//! configured bounds, so one broken runtime cannot hurt the exporter.

use std::collections::HashMap;

/// Bounds applied to one scrape body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParseLimits {
    pub max_body_bytes: usize,
    pub max_series: usize,
    /// Longer label values make the line malformed (skipped).
    pub max_label_value_len: usize,
    /// Lines with more labels are skipped.
    pub max_labels: usize,
}

impl Default for ParseLimits {
    fn default() -> Self {
        Self {
            max_body_bytes: 4 * 1024 * 1024,
            max_series: 20_000,
            max_label_value_len: 1024,
            max_labels: 32,
        }
    }
}

/// Why a whole body was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("body of {size} bytes exceeds the limit of {limit}")]
    BodyTooLarge { size: usize, limit: usize },
    #[error("more than {limit} series")]
    TooManySeries { limit: usize },
    #[error("no runtime hint and no known runtime metric names")]
    UnknownRuntime,
}

/// The `# TYPE` of a family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricType {
    Counter,
    Gauge,
    Histogram,
    Summary,
    Untyped,
}

/// One sample line.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// A parsed body.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Exposition {
    pub samples: Vec<Sample>,
    /// Declared family types, by family name.
    pub types: HashMap<String, MetricType>,
    /// Lines that were neither samples, comments nor blank, or broke a limit.
    pub malformed_lines: u64,
}

fn is_name_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" | "+inf" | "inf" => Some(f64::INFINITY),
        "-Inf" | "-inf" => Some(f64::NEG_INFINITY),
        "NaN" | "nan" => Some(f64::NAN),
        _ => s.parse::<f64>().ok(),
    }
}

/// Parses `name{labels} value [timestamp] [# exemplar]`.
fn parse_sample(line: &str, limits: &ParseLimits) -> Option<Sample> {
    let mut chars = line.char_indices().peekable();
    let (_, first) = chars.next()?;
    if !is_name_start(first) {
        return None;
    }
    let mut name_end = line.len();
    for (i, c) in chars.by_ref() {
        if !is_name_char(c) {
            name_end = i;
            break;
        }
    }
    let name = &line[..name_end];
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if rest.starts_with('{') {
        let (parsed, after) = parse_labels(&rest[1..], limits)?;
        labels = parsed;
        rest = after;
    }
    let rest = rest.trim_start();
    // Exemplars (OpenMetrics) follow " # ".
    let rest = match rest.find(" # ") {
        Some(i) => &rest[..i],
        None => rest,
    };
    let mut fields = rest.split_ascii_whitespace();
    let value = parse_value(fields.next()?)?;
    if let Some(ts) = fields.next() {
        ts.parse::<f64>().ok()?;
    }
    if fields.next().is_some() {
        return None;
    }
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// Parses `k="v",...}`; returns the labels and the text after `}`.
fn parse_labels<'a>(
    mut s: &'a str,
    limits: &ParseLimits,
) -> Option<(Vec<(String, String)>, &'a str)> {
    let mut labels = Vec::new();
    loop {
        s = s.trim_start();
        if let Some(after) = s.strip_prefix('}') {
            return Some((labels, after));
        }
        let key_end = s.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))?;
        if key_end == 0 {
            return None;
        }
        let key = &s[..key_end];
        s = s[key_end..].trim_start();
        s = s.strip_prefix('=')?.trim_start();
        s = s.strip_prefix('"')?;
        let mut value = String::new();
        let mut escaped = false;
        let mut end = None;
        for (i, c) in s.char_indices() {
            if escaped {
                match c {
                    'n' => value.push('\n'),
                    '\\' => value.push('\\'),
                    '"' => value.push('"'),
                    other => {
                        value.push('\\');
                        value.push(other);
                    }
                }
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                end = Some(i);
                break;
            } else {
                value.push(c);
            }
            if value.len() > limits.max_label_value_len {
                return None;
            }
        }
        let end = end?;
        s = &s[end + 1..];
        labels.push((key.to_string(), value));
        if labels.len() > limits.max_labels {
            return None;
        }
        s = s.trim_start();
        if let Some(after) = s.strip_prefix(',') {
            s = after;
        }
    }
}

/// Parses a body; never panics, whatever the input.
pub fn parse(text: &str, limits: &ParseLimits) -> Result<Exposition, ParseError> {
    if text.len() > limits.max_body_bytes {
        return Err(ParseError::BodyTooLarge {
            size: text.len(),
            limit: limits.max_body_bytes,
        });
    }
    let mut out = Exposition::default();
    for raw in text.lines() {
        let line = raw.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let comment = comment.trim_start();
            if comment == "EOF" {
                break;
            }
            if let Some(decl) = comment.strip_prefix("TYPE") {
                let mut parts = decl.split_ascii_whitespace();
                if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                    let kind = match kind {
                        "counter" => MetricType::Counter,
                        "gauge" => MetricType::Gauge,
                        "histogram" | "gaugehistogram" => MetricType::Histogram,
                        "summary" => MetricType::Summary,
                        _ => MetricType::Untyped,
                    };
                    out.types.insert(name.to_string(), kind);
                }
            }
            continue;
        }
        match parse_sample(line, limits) {
            Some(sample) => {
                if out.samples.len() >= limits.max_series {
                    return Err(ParseError::TooManySeries {
                        limit: limits.max_series,
                    });
                }
                out.samples.push(sample);
            }
            None => out.malformed_lines += 1,
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Exposition {
        parse(text, &ParseLimits::default()).unwrap()
    }

    #[test]
    fn reads_colons_escapes_timestamps_and_exemplars() {
        let e = p(concat!(
            "# HELP vllm:x help\n",
            "# TYPE vllm:x counter\n",
            "vllm:x_total{model_name=\"a\\\"b\\\\c\\nd\",engine=\"0\"} 3.0\n",
            "tgi_queue_size 2 1700000000000\n",
            "foo_bucket{le=\"+Inf\"} 5 # {trace_id=\"abc\"} 1.0 1.0\n",
            "up NaN\n",
            "neg -Inf\n",
            "# EOF\n",
            "after_eof 1\n",
        ));
        assert_eq!(e.samples.len(), 5);
        assert_eq!(e.samples[0].name, "vllm:x_total");
        assert_eq!(e.samples[0].label("model_name"), Some("a\"b\\c\nd"));
        assert_eq!(e.samples[0].value, 3.0);
        assert_eq!(e.samples[1].value, 2.0);
        assert_eq!(e.samples[2].value, 5.0);
        assert!(e.samples[3].value.is_nan());
        assert_eq!(e.types.get("vllm:x"), Some(&MetricType::Counter));
        assert_eq!(e.malformed_lines, 0);
    }

    #[test]
    fn malformed_lines_are_skipped_and_counted() {
        let e = p("ok 1\n{bad} 1\nname{a=\"unterminated} 1\nname notanumber\nname 1 2 3\n9bad 1\nok2{} 2\n");
        assert_eq!(e.samples.len(), 2);
        assert_eq!(e.malformed_lines, 5);
    }

    #[test]
    fn limits_are_enforced() {
        let limits = ParseLimits {
            max_body_bytes: 10,
            ..ParseLimits::default()
        };
        assert!(matches!(
            parse("a 1\nb 2\nc 3\n", &limits),
            Err(ParseError::BodyTooLarge { .. })
        ));
        let limits = ParseLimits {
            max_series: 2,
            ..ParseLimits::default()
        };
        assert!(matches!(
            parse("a 1\nb 2\nc 3\n", &limits),
            Err(ParseError::TooManySeries { limit: 2 })
        ));
        let limits = ParseLimits {
            max_label_value_len: 3,
            ..ParseLimits::default()
        };
        let e = parse("a{x=\"long value\"} 1\nb{x=\"ok\"} 1\n", &limits).unwrap();
        assert_eq!(e.samples.len(), 1);
        assert_eq!(e.malformed_lines, 1);
    }
}
