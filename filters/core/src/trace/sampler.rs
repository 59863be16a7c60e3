//! Parent-based sampling and the start of the gateway span.
//!
//! The caller's decision wins when there is one, so a trace is either
//! complete or absent across hops. Root decisions are a pure function of the
//! trace id (OpenTelemetry's `TraceIdRatioBased` arithmetic, as in the Go
//! SDK), so every gateway replica, and any SDK using the same ratio, reaches
//! the same verdict for the same trace without coordination.

use thiserror::Error;

use super::context::{SpanContext, SpanId, TraceFlags, TraceId};
use super::ids::IdGenerator;

/// `ParentBased(TraceIdRatioBased(ratio))`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampler {
    ratio: f64,
    /// Sample a root when `low_u64(trace_id) >> 1 < upper_bound`;
    /// `None` means always.
    upper_bound: Option<u64>,
}

/// A configured ratio outside `0.0..=1.0` (or NaN) is a configuration error,
/// reported rather than silently clamped.
#[derive(Debug, Clone, Copy, PartialEq, Error)]
#[error("sampling ratio must be within 0.0..=1.0, got {0}")]
pub struct InvalidRatio(pub f64);

/// What the gateway span starts with: its own context (to propagate and to
/// record), its parent, and whether it is recorded at all.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpanStart {
    /// This span's context: the trace id (inherited or new), a fresh span id,
    /// the flags carrying the decision, and the inherited `tracestate`.
    pub context: SpanContext,
    /// The remote parent's span id, when the request carried a valid one.
    pub parent_span_id: Option<SpanId>,
    /// Record and export this span. When false, the shell still injects
    /// [`SpanStart::traceparent`] (with sampled=0) so downstream agrees.
    pub sampled: bool,
}

impl Sampler {
    pub fn new(ratio: f64) -> Result<Self, InvalidRatio> {
        if !(0.0..=1.0).contains(&ratio) {
            return Err(InvalidRatio(ratio));
        }
        let upper_bound = if ratio >= 1.0 {
            None
        } else {
            // Same arithmetic as the OTel Go SDK: ratio * 2^63, truncated.
            Some((ratio * (1u64 << 63) as f64) as u64)
        };
        Ok(Sampler { ratio, upper_bound })
    }

    /// Records every trace (the default when tracing is enabled).
    pub fn always() -> Self {
        Sampler {
            ratio: 1.0,
            upper_bound: None,
        }
    }

    pub fn ratio(&self) -> f64 {
        self.ratio
    }

    /// The root decision for a trace id (used when there is no parent).
    pub fn samples_root(&self, trace_id: &TraceId) -> bool {
        match self.upper_bound {
            None => true,
            Some(bound) => (trace_id.low_u64() >> 1) < bound,
        }
    }

    /// Decides and builds the gateway span's context. `parent` is the context
    /// parsed from the request's `traceparent`/`tracestate`, if valid.
    pub fn start_span<G: IdGenerator + ?Sized>(
        &self,
        parent: Option<&SpanContext>,
        ids: &mut G,
    ) -> SpanStart {
        let span_id = ids.span_id();
        match parent {
            Some(parent) => {
                let sampled = parent.is_sampled();
                SpanStart {
                    context: SpanContext {
                        trace_id: parent.trace_id,
                        span_id,
                        // Keep the parent's other known bits (e.g. RANDOM: the
                        // trace id, hence its randomness, is unchanged).
                        flags: parent.flags.known_bits().with_sampled(sampled),
                        trace_state: parent.trace_state.clone(),
                    },
                    parent_span_id: Some(parent.span_id),
                    sampled,
                }
            }
            None => {
                let trace_id = ids.trace_id();
                let sampled = self.samples_root(&trace_id);
                SpanStart {
                    context: SpanContext {
                        trace_id,
                        span_id,
                        flags: TraceFlags::default().with_sampled(sampled),
                        trace_state: String::new(),
                    },
                    parent_span_id: None,
                    sampled,
                }
            }
        }
    }
}

impl Default for Sampler {
    fn default() -> Self {
        Sampler::always()
    }
}

impl SpanStart {
    /// The `traceparent` to send upstream: our span as the parent.
    pub fn traceparent(&self) -> String {
        self.context.traceparent()
    }

    /// The `tracestate` to send upstream, if any (forwarded unchanged).
    pub fn tracestate(&self) -> Option<&str> {
        if self.context.trace_state.is_empty() {
            None
        } else {
            Some(&self.context.trace_state)
        }
    }

    /// Whether the parent came from another process (always true for the
    /// gateway span when it has a parent: the parent is the caller).
    pub fn parent_is_remote(&self) -> bool {
        self.parent_span_id.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::super::context::parse_traceparent;
    use super::super::ids::{trace_id_from_parts, XoshiroIdGenerator};
    use super::*;
    use proptest::prelude::*;

    fn parent(flags: &str, state: Option<&str>) -> SpanContext {
        let header = format!("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-{flags}");
        SpanContext::from_headers(&header, state).unwrap()
    }

    #[test]
    fn sampled_parent_is_followed_even_at_ratio_zero() {
        let sampler = Sampler::new(0.0).unwrap();
        let mut ids = XoshiroIdGenerator::from_seed(1);
        let parent = parent("01", Some("vendor=x"));
        let start = sampler.start_span(Some(&parent), &mut ids);
        assert!(start.sampled);
        assert_eq!(start.context.trace_id, parent.trace_id);
        assert_ne!(start.context.span_id, parent.span_id);
        assert_eq!(start.parent_span_id, Some(parent.span_id));
        assert!(start.parent_is_remote());
        assert_eq!(start.tracestate(), Some("vendor=x"));
        let (t, s, f) = parse_traceparent(&start.traceparent()).unwrap();
        assert_eq!(
            (t, s, f.is_sampled()),
            (parent.trace_id, start.context.span_id, true)
        );
    }

    #[test]
    fn unsampled_parent_is_followed_even_at_ratio_one() {
        let sampler = Sampler::always();
        let mut ids = XoshiroIdGenerator::from_seed(2);
        let parent = parent("00", None);
        let start = sampler.start_span(Some(&parent), &mut ids);
        assert!(!start.sampled);
        // Still propagated: same trace, our span id, sampled=0.
        let header = start.traceparent();
        assert!(header.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        assert!(header.ends_with("-00"));
        assert!(!header.contains("00f067aa0ba902b7"));
        assert_eq!(start.tracestate(), None);
    }

    #[test]
    fn random_flag_of_parent_is_kept_and_unknown_bits_dropped() {
        let start = Sampler::always().start_span(
            Some(&parent("ff", None)),
            &mut XoshiroIdGenerator::from_seed(3),
        );
        assert_eq!(start.context.flags, TraceFlags(0x03));
    }

    #[test]
    fn root_spans_get_new_trace_and_ratio_decision() {
        let mut ids = XoshiroIdGenerator::from_seed(4);
        let always = Sampler::always().start_span(None, &mut ids);
        assert!(always.sampled && always.context.trace_id.is_valid());
        assert_eq!(always.parent_span_id, None);
        assert!(!always.parent_is_remote());
        assert!(always.traceparent().ends_with("-01"));
        let never = Sampler::new(0.0).unwrap().start_span(None, &mut ids);
        assert!(!never.sampled);
        assert!(never.traceparent().ends_with("-00"));
    }

    #[test]
    fn ratio_boundaries_follow_the_low_half_of_the_trace_id() {
        let half = Sampler::new(0.5).unwrap();
        // low >> 1 < 2^62  <=>  low < 2^63
        assert!(half.samples_root(&trace_id_from_parts(9, (1 << 63) - 1)));
        assert!(!half.samples_root(&trace_id_from_parts(9, 1 << 63)));
        // The high half is ignored.
        assert!(half.samples_root(&trace_id_from_parts(u64::MAX, 1)));
        let none = Sampler::new(0.0).unwrap();
        assert!(!none.samples_root(&trace_id_from_parts(0, 1)));
        assert!(Sampler::always().samples_root(&trace_id_from_parts(0, u64::MAX)));
    }

    #[test]
    fn invalid_ratios_are_rejected() {
        for bad in [-0.1, 1.000_001, f64::NAN, f64::INFINITY] {
            assert!(Sampler::new(bad).is_err(), "{bad}");
        }
        assert_eq!(Sampler::new(0.25).unwrap().ratio(), 0.25);
    }

    #[test]
    fn sampled_fraction_tracks_the_ratio() {
        let sampler = Sampler::new(0.1).unwrap();
        let mut ids = XoshiroIdGenerator::from_seed(99);
        let n = 20_000;
        let sampled = (0..n)
            .filter(|_| sampler.start_span(None, &mut ids).sampled)
            .count();
        // Expected 2000, sigma ~42: allow ~5 sigma.
        assert!((1_790..=2_210).contains(&sampled), "sampled {sampled}");
    }

    proptest! {
        #[test]
        fn decision_is_deterministic_and_monotone_in_ratio(
            high in any::<u64>(), low in any::<u64>(), a in 0.0f64..=1.0, b in 0.0f64..=1.0,
        ) {
            let trace_id: TraceId = trace_id_from_parts(high, low);
            let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
            let lo = Sampler::new(lo).unwrap();
            let hi = Sampler::new(hi).unwrap();
            // Replicas with the same ratio agree; a larger ratio keeps every
            // trace a smaller one keeps (so raising the ratio never breaks traces).
            prop_assert_eq!(lo.samples_root(&trace_id), lo.samples_root(&trace_id));
            if lo.samples_root(&trace_id) {
                prop_assert!(hi.samples_root(&trace_id));
            }
        }
    }
}
