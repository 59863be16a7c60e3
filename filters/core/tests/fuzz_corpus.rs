//! Replays the checked-in fuzz corpus (`filters/core/fuzz/corpus/<target>/`)
//! through the same property checks the fuzz targets run, so every input the
//! fuzzer found interesting stays a regression test on stable Rust, without
//! libFuzzer.

// Test helpers outside `#[test]` functions: failing loudly is the point.
#![allow(clippy::expect_used, clippy::panic)]

#[path = "../fuzz/src/checks.rs"]
mod checks;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

fn corpus_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join("corpus")
}

fn corpus_files(target: &str) -> Vec<PathBuf> {
    let dir = corpus_root().join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus directory {} unreadable: {e}", dir.display()))
        .map(|entry| entry.expect("corpus entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// Runs `check` on every file, collecting failures (a panic included).
fn replay(target: &checks::Target) -> (usize, Vec<String>) {
    let files = corpus_files(target.name);
    let mut failures = Vec::new();
    for file in &files {
        let data = std::fs::read(file).expect("corpus file readable");
        let outcome = catch_unwind(AssertUnwindSafe(|| (target.check)(&data)));
        let problem = match outcome {
            Ok(Ok(())) => continue,
            Ok(Err(failure)) => failure,
            Err(panic) => panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".into()),
        };
        failures.push(format!("{}: {problem}", file.display()));
    }
    (files.len(), failures)
}

fn replay_target(name: &str) {
    let target = checks::TARGETS
        .iter()
        .find(|t| t.name == name)
        .expect("target registered in checks::TARGETS");
    let (count, failures) = replay(target);
    assert!(count > 0, "corpus for {name} is empty");
    assert!(
        failures.is_empty(),
        "{} of {count} {name} corpus inputs fail:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn sse_stream_corpus() {
    replay_target("sse_stream");
}

#[test]
fn json_scan_corpus() {
    replay_target("json_scan");
}

#[test]
fn request_body_corpus() {
    replay_target("request_body");
}

#[test]
fn plugin_config_corpus() {
    replay_target("plugin_config");
}

#[test]
fn trace_context_corpus() {
    replay_target("trace_context");
}

#[test]
fn rag_headers_corpus() {
    replay_target("rag_headers");
}

/// Every registered target has a corpus directory and every corpus
/// directory a target, so a new target cannot ship without its replay.
#[test]
fn every_target_has_a_corpus_and_every_corpus_a_target() {
    let mut dirs: Vec<String> = std::fs::read_dir(corpus_root())
        .expect("corpus root")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    dirs.sort();
    let mut names: Vec<String> = checks::TARGETS.iter().map(|t| t.name.to_string()).collect();
    names.sort();
    assert_eq!(dirs, names);
}

/// The split-point header: count in the low 3 bits, u16 offsets modulo the
/// payload length plus one, sorted.
#[test]
fn split_input_reads_the_header() {
    let (cuts, payload) = checks::split_input(b"\x02\x01\x00\x09\x00abcd");
    assert_eq!(payload, b"abcd");
    assert_eq!(cuts, vec![1, 4]);
    assert_eq!(
        checks::chunks_at(payload, &cuts),
        vec![&b"a"[..], &b"bcd"[..], &b""[..]]
    );
    let (cuts, payload) = checks::split_input(b"");
    assert!(cuts.is_empty() && payload.is_empty());
    // A count larger than the remaining bytes takes what is there.
    let (cuts, payload) = checks::split_input(b"\x07\x05");
    assert!(cuts.is_empty());
    assert_eq!(payload, b"\x05");
}

// Defects the fuzz checks found in tokentap-core (fixed in f3abb18); their
// minimal reproducers stay as regression tests.

/// `stream_options: null` (or any non-object) must be replaced by the
/// `include_usage` rewrite, not duplicated: JSON readers keep the last
/// duplicate, so the upstream would never see `include_usage: true`.
#[test]
fn non_object_stream_options_is_replaced_not_duplicated() {
    use tokentap_core::inject::with_include_usage;
    use tokentap_core::openai::RequestReader;

    for body in [
        &br#"{"stream":true,"stream_options":null}"#[..],
        br#"{"stream":true,"stream_options":[]}"#,
        br#"{"stream_options":1,"stream":true}"#,
    ] {
        let mut reader = RequestReader::new(None, None);
        reader.feed(body);
        let (facts, _) = reader.finish();
        let out = with_include_usage(body, facts.has_stream_options).expect("an object body");
        let text = String::from_utf8_lossy(&out);
        assert_eq!(text.matches("stream_options").count(), 1, "{text}");
        let value: serde_json::Value = serde_json::from_slice(&out).expect("valid JSON");
        assert_eq!(
            value["stream_options"]["include_usage"],
            serde_json::Value::Bool(true),
            "{text}"
        );
    }
}

/// An `llm_paths` entry with `#` could never match (request paths are cut at
/// `#`), so it must be refused at load time like a `?`.
#[test]
fn llm_path_with_fragment_is_refused() {
    use tokentap_core::config::Config;

    let parsed = Config::parse(br#"{"llm_paths":["/v1/chat#x"]}"#);
    assert!(
        parsed.is_err(),
        "accepted: {:?}",
        parsed.map(|c| c.llm_paths)
    );
}

// The SSE fast path disagreed with the full parse (fixed in 7c78c50).

fn fast_and_full(data: &str) -> (StreamFactsPair, StreamFactsPair) {
    use tokentap_core::openai::StreamReader;

    let stream = format!("data: {data}\n\n");
    let mut fast = StreamReader::default();
    fast.feed(stream.as_bytes(), 0);
    let mut full = StreamReader::without_fast_path();
    full.feed(stream.as_bytes(), 0);
    (fast.finish(), full.finish())
}

type StreamFactsPair = (tokentap_core::openai::StreamFacts, bool);

/// The SSE fast path took any `delta.content` for generated content, also
/// one outside `choices[]`, which the full parse (rightly) ignores.
#[test]
fn fast_path_agrees_on_content_outside_choices() {
    for data in [
        r#"{"choices":[{"index":0}],"delta":{"content":"x"}}"#,
        r#"{"delta":{"content":"x"},"choices":[{}]}"#,
        r#"{"choices":[{"x":{"delta":{"content":"x"}}}]}"#,
    ] {
        let (fast, full) = fast_and_full(data);
        assert_eq!(fast, full, "{data}");
    }
}

/// The SSE fast path did not check that the event is JSON: a malformed event
/// that looked like a content chunk was counted as content, where the full
/// parse counts it malformed.
#[test]
fn fast_path_agrees_on_malformed_events() {
    for data in [
        r#"{"choices":[{"delta":{"content":"x"}}]}}"#,
        r#"{"choices":[{"delta":{"content":"x"}}] "#,
        r#"{"choices":[{"delta":{"content":"x}"#,
    ] {
        let (fast, full) = fast_and_full(data);
        assert_eq!(fast, full, "{data}");
    }
}

/// By design (docs/design.md): the fast path validates shape and balance,
/// not every token, so a balanced but invalid chunk counts as content while
/// the full parse counts it malformed. Pinned here so a change is noticed.
#[test]
fn fast_path_trades_token_validation_for_speed() {
    for data in [
        r#"{"choices":[{"delta":{"content":"x"}}],"a":tru}"#,
        r#"{"choices":[{"delta":{"content":"x"}}],"a" 1}"#,
        r#"{"choices":[{"delta":{"content":"x"}}] 1}"#,
    ] {
        let ((fast, _), (full, _)) = fast_and_full(data);
        assert_eq!(
            (fast.content_events, fast.malformed_events),
            (1, 0),
            "{data}"
        );
        assert_eq!(
            (full.content_events, full.malformed_events),
            (0, 1),
            "{data}"
        );
    }
}
