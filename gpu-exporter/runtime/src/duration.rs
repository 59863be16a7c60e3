//! The one duration parser for every flag of the gpu-exporter binary (its
//! own flags and the runtime flags flattened into it), so `1h` or `0.5s`
//! mean the same thing on every flag.

use std::time::Duration;

/// Longest duration accepted, in seconds (about 31 years).
const MAX_SECONDS: f64 = 1e9;

/// Parses a number with an optional unit: `ms`, `s`, `m`, `h`, or none for
/// seconds; decimals and spaces around the parts are fine.
///
/// ```
/// use std::time::Duration;
/// use tokentap_runtime_metrics::duration::parse_duration;
///
/// assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
/// assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
/// assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
/// assert!(parse_duration("10 parsecs").is_err());
/// ```
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("invalid duration {text:?}: expected e.g. 500ms, 10s, 2m, 1h"))?;
    let scale = match unit.trim() {
        "" | "s" => 1.0,
        "ms" => 0.001,
        "m" => 60.0,
        "h" => 3600.0,
        other => return Err(format!("invalid duration unit {other:?} in {text:?}")),
    };
    let seconds = value * scale;
    if !seconds.is_finite() || seconds > MAX_SECONDS {
        return Err(format!("duration {text:?} out of range"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// [`parse_duration`] for intervals and timeouts, where zero would spin or
/// fail every call.
pub fn parse_positive_duration(text: &str) -> Result<Duration, String> {
    match parse_duration(text)? {
        d if d.is_zero() => Err(format!("duration {:?} must be more than zero", text.trim())),
        d => Ok(d),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepted_forms() {
        let ok =
            |s: &str, ms: u64| assert_eq!(parse_duration(s), Ok(Duration::from_millis(ms)), "{s}");
        ok("500ms", 500);
        ok("10s", 10_000);
        ok("2m", 120_000);
        ok("1h", 3_600_000);
        ok("1.5", 1_500);
        ok("0.25s", 250);
        ok(" 10 s ", 10_000);
        ok("0s", 0);
        ok("7", 7_000);
    }

    #[test]
    fn refused_forms() {
        for bad in [
            "",
            "s",
            "-1s",
            "10 parsecs",
            "1d",
            "1e3s",
            "..5s",
            "1h30m",
            "inf",
            "NaN",
            "2000000000s",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
        assert!(parse_positive_duration("0s").is_err());
        assert!(parse_positive_duration("0").is_err());
        assert_eq!(parse_positive_duration("1ms"), Ok(Duration::from_millis(1)));
    }

    proptest! {
        #[test]
        fn whole_units_round_trip(n in 0u64..100_000, unit in prop::sample::select(vec![("ms", 1u64), ("s", 1000), ("m", 60_000), ("h", 3_600_000)])) {
            let parsed = parse_duration(&format!("{n}{}", unit.0)).unwrap();
            prop_assert_eq!(parsed.as_millis() as u64, n * unit.1);
        }

        #[test]
        fn text_without_a_digit_is_refused(s in "[^0-9]{0,20}") {
            prop_assert!(parse_duration(&s).is_err());
        }

        #[test]
        fn an_unknown_unit_is_refused(n in 0u32..10_000, unit in "[a-zA-Z]{1,4}") {
            prop_assume!(!["ms", "s", "m", "h"].contains(&unit.as_str()));
            let text = format!("{n}{unit}");
            prop_assert!(parse_duration(&text).is_err());
        }
    }
}
