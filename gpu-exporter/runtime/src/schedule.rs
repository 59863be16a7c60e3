//! When each runtime target is scraped: every target keeps its own slot in
//! the scrape interval, so targets that come and go never pull the other
//! targets' scrapes forward, and a churning node is scraped at the
//! configured rate (targets / interval).

use std::time::{Duration, Instant};

/// The first slot of a new target: an offset into the interval derived from
/// its key, which spreads targets over the interval instead of bunching
/// them at the moment they appeared.
pub(crate) fn first_slot(key: &str, now: Instant, interval: Duration) -> Instant {
    let hash = key.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let span = u64::try_from(interval.as_nanos())
        .unwrap_or(u64::MAX)
        .max(1);
    now + Duration::from_nanos(hash % span)
}

/// The first slot after `now` in the series `due + k * interval`, so a
/// target keeps its phase even after a late pass.
pub(crate) fn next_slot(due: Instant, now: Instant, interval: Duration) -> Instant {
    let step = interval.as_nanos().max(1);
    let periods = now.saturating_duration_since(due).as_nanos() / step + 1;
    let ahead = u64::try_from(step.saturating_mul(periods)).unwrap_or(u64::MAX);
    due + Duration::from_nanos(ahead)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_slots_fall_inside_one_interval_and_differ_by_key() {
        let now = Instant::now();
        let interval = Duration::from_secs(5);
        let slots: Vec<Instant> = (0..32)
            .map(|i| first_slot(&format!("uid-{i}"), now, interval))
            .collect();
        assert!(slots.iter().all(|s| *s >= now && *s < now + interval));
        let mut distinct = slots.clone();
        distinct.sort();
        distinct.dedup();
        assert!(distinct.len() > 24, "slots bunch: {}", distinct.len());
        assert_eq!(first_slot("uid-3", now, interval), slots[3]);
    }

    #[test]
    fn next_slot_keeps_the_phase_and_skips_missed_slots() {
        let t0 = Instant::now();
        let i = Duration::from_secs(5);
        assert_eq!(next_slot(t0, t0, i), t0 + i);
        assert_eq!(next_slot(t0, t0 + Duration::from_secs(1), i), t0 + i);
        // Late by 2.5 intervals: the next slot is the third, not "now + 5 s".
        assert_eq!(
            next_slot(t0, t0 + Duration::from_millis(12_500), i),
            t0 + Duration::from_secs(15)
        );
    }
}
