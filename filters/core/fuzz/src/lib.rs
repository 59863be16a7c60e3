//! Fuzz targets for `tokentap-core`; the properties live in [`checks`],
//! shared with `filters/core/tests/fuzz_corpus.rs`.

pub mod checks;

/// Runs a check and turns a violated property into a panic, which is how
/// libFuzzer learns about it.
pub fn run(check: fn(&[u8]) -> checks::CheckResult, data: &[u8]) {
    if let Err(failure) = check(data) {
        panic!("property violated: {failure}");
    }
}
