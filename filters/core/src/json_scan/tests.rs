use super::*;
use crate::testing::split_at_cuts;
use proptest::prelude::*;

/// Records every scalar as (dotted path, rendered value).
#[derive(Default, Debug, PartialEq)]
struct Collect {
    scalars: Vec<(String, String)>,
    entered: Vec<(String, Container)>,
}

fn render_path(path: &Path<'_>) -> String {
    let mut out = String::new();
    for i in 0..path.len() {
        match path.get(i) {
            Some(Segment::Key(k)) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(&String::from_utf8_lossy(k));
            }
            Some(Segment::Index) => out.push_str("[]"),
            None => {}
        }
    }
    if !path.complete {
        out.push_str("...");
    }
    out
}

impl JsonVisitor for Collect {
    fn scalar(&mut self, path: &Path<'_>, value: Scalar<'_>) {
        let v = match value {
            Scalar::Str { len, .. } => format!("s:{}:{len}", value.as_str().unwrap_or_default()),
            Scalar::Num(n) => format!("n:{n}"),
            Scalar::Bool(b) => format!("b:{b}"),
            Scalar::Null => "null".into(),
        };
        self.scalars.push((render_path(path), v));
    }
    fn enter(&mut self, path: &Path<'_>, kind: Container) {
        self.entered.push((render_path(path), kind));
    }
}

fn scan_chunks(chunks: &[&[u8]]) -> (Collect, ScanStatus) {
    let mut sc = JsonScanner::new();
    let mut c = Collect::default();
    for ch in chunks {
        sc.feed(ch, &mut c);
    }
    let st = sc.finish(&mut c);
    (c, st)
}

#[test]
fn reports_paths_of_an_openai_chunk() {
    let body = br#"{"id":"x","model":"mistral-7b","choices":[{"index":0,"delta":{"role":"assistant","content":"Hi"},"finish_reason":null}],"usage":{"prompt_tokens":12,"completion_tokens":3,"prompt_tokens_details":{"cached_tokens":8}}}"#;
    let (c, st) = scan_chunks(&[body]);
    assert_eq!(st, ScanStatus::Complete);
    let get = |p: &str| {
        c.scalars
            .iter()
            .find(|(k, _)| k == p)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(get("model").as_deref(), Some("s:mistral-7b:10"));
    assert_eq!(get("choices[].delta.content").as_deref(), Some("s:Hi:2"));
    assert_eq!(get("choices[].finish_reason").as_deref(), Some("null"));
    assert_eq!(get("usage.prompt_tokens").as_deref(), Some("n:12"));
    assert_eq!(
        get("usage.prompt_tokens_details.cached_tokens").as_deref(),
        Some("n:8")
    );
    assert!(c
        .entered
        .contains(&("choices".to_string(), Container::Array)));
}

#[test]
fn path_matching_distinguishes_keys_and_indices() {
    struct M(bool);
    impl JsonVisitor for M {
        fn scalar(&mut self, path: &Path<'_>, _v: Scalar<'_>) {
            if path.matches(&["choices", "[]", "text"]) {
                self.0 = true;
            }
        }
    }
    let mut m = M(false);
    let mut sc = JsonScanner::new();
    sc.feed(br#"{"choices":[{"text":"a"}]}"#, &mut m);
    assert!(m.0);
    let mut m = M(false);
    sc.reset();
    sc.feed(br#"{"choices":{"[]":{"text":"a"}}}"#, &mut m);
    assert!(!m.0, "an object key spelled [] is not an array index");
}

#[test]
fn decodes_escapes_and_surrogate_pairs() {
    let (c, st) = scan_chunks(&[br#"{"m":"a\"b\\c\u00e9\ud83d\ude00\n"}"#]);
    assert_eq!(st, ScanStatus::Complete);
    assert_eq!(c.scalars[0].1, "s:a\"b\\cé😀\n:12");
}

#[test]
fn lone_surrogates_become_replacement_characters() {
    let (c, _) = scan_chunks(&[br#"{"m":"\ud83dx\ude00"}"#]);
    assert_eq!(c.scalars[0].1, "s:\u{FFFD}x\u{FFFD}:7");
}

#[test]
fn long_values_report_a_prefix_cut_on_a_char_boundary() {
    let long = "é".repeat(200); // 400 bytes
    let body = format!(r#"{{"v":"{long}"}}"#);
    let (c, _) = scan_chunks(&[body.as_bytes()]);
    let v = &c.scalars[0].1;
    assert!(v.ends_with(":400"), "{v}");
    let prefix = &v[2..v.len() - 4];
    assert_eq!(prefix.len(), MAX_VALUE_PREFIX);
    assert!(prefix.chars().all(|ch| ch == 'é'));
}

#[test]
fn overlong_keys_never_match() {
    let key = "k".repeat(MAX_KEY_LEN + 1);
    let body = format!(r#"{{"{key}":{{"model":"x"}},"model":"y"}}"#);
    let (c, _) = scan_chunks(&[body.as_bytes()]);
    assert!(c.scalars[0].0.ends_with("..."), "{:?}", c.scalars);
    assert_eq!(c.scalars[1], ("model".to_string(), "s:y:1".to_string()));
}

#[test]
fn deep_values_are_marked_incomplete_and_abusive_depth_fails() {
    let depth = MAX_TRACKED_DEPTH + 2;
    let body = format!("{}1{}", "[".repeat(depth), "]".repeat(depth));
    let (c, st) = scan_chunks(&[body.as_bytes()]);
    assert_eq!(st, ScanStatus::Complete);
    assert!(c.scalars[0].0.ends_with("..."));

    let body = "[".repeat(MAX_DEPTH + 1);
    let (_, st) = scan_chunks(&[body.as_bytes()]);
    assert_eq!(st, ScanStatus::Failed(ScanError::TooDeep));
}

#[test]
fn syntax_errors_and_trailing_data_are_reported() {
    for bad in [
        &b"{\"a\" 1}"[..],
        b"{\"a\":tru}",
        b"[1,]x",
        b"{\"a\":1]",
        b"\"\x01\"",
    ] {
        let (_, st) = scan_chunks(&[bad]);
        assert!(
            matches!(st, ScanStatus::Failed(_)),
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
    let (_, st) = scan_chunks(&[b"{} {}"]);
    assert_eq!(st, ScanStatus::Failed(ScanError::TrailingData));
    let (_, st) = scan_chunks(&[b"  "]);
    assert_eq!(st, ScanStatus::Empty);
    let (_, st) = scan_chunks(&[b"{\"a\":"]);
    assert_eq!(st, ScanStatus::Incomplete);
}

#[test]
fn top_level_scalars_and_numbers_at_end_of_input() {
    let (c, st) = scan_chunks(&[b"12", b"34"]);
    assert_eq!(st, ScanStatus::Complete);
    assert_eq!(c.scalars, vec![(String::new(), "n:1234".to_string())]);
    assert_eq!(Scalar::Num("3.0").as_u64(), Some(3));
    assert_eq!(Scalar::Num("-1").as_u64(), None);
    assert_eq!(Scalar::Num("1e3").as_u64(), Some(1000));
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::Bool),
        any::<i64>().prop_map(|n| serde_json::json!(n)),
        "[a-zé日😀\"\\\\/\\n\\t]{0,12}".prop_map(serde_json::Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
            prop::collection::btree_map("[a-z_]{1,6}", inner, 0..4)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Random bytes, or a serialized document with one byte overwritten or
/// its tail cut off: inputs that are mostly, but not quite, JSON.
fn damaged_json() -> impl Strategy<Value = Vec<u8>> {
    let serialized = || json_value().prop_map(|v| serde_json::to_vec(&v).unwrap());
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..512),
        (serialized(), any::<prop::sample::Index>(), any::<u8>()).prop_map(
            |(mut text, at, byte)| {
                let i = at.index(text.len());
                text[i] = byte;
                text
            }
        ),
        (serialized(), any::<prop::sample::Index>()).prop_map(|(mut text, at)| {
            text.truncate(at.index(text.len()));
            text
        }),
    ]
}

#[test]
fn string_run_len_agrees_with_a_bytewise_scan() {
    let naive = |b: &[u8]| {
        b.iter()
            .position(|&c| c == b'"' || c == b'\\' || c < 0x20)
            .unwrap_or(b.len())
    };
    let cases: [&[u8]; 6] = [
        b"",
        b"abcdefgh",
        b"abcdefghij\"x",
        "日本語のテキスト\"".as_bytes(),
        b"\x7f\x80\xff\x1f",
        b"0123456789abcdef0123\\",
    ];
    for c in cases {
        assert_eq!(string_run_len(c), naive(c), "{c:?}");
    }
}

proptest! {
    #[test]
    fn string_run_len_matches_naive(data in prop::collection::vec(any::<u8>(), 0..64)) {
        let naive = data.iter().position(|&c| c == b'"' || c == b'\\' || c < 0x20).unwrap_or(data.len());
        prop_assert_eq!(string_run_len(&data), naive);
    }

    /// Any split of a document into chunks reports exactly what the whole does.
    #[test]
    fn chunking_never_changes_the_result(v in json_value(), cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8)) {
        let text = serde_json::to_vec(&v).unwrap();
        let (whole, st) = scan_chunks(&[&text]);
        prop_assert_eq!(st, ScanStatus::Complete);
        let (split, st2) = scan_chunks(&split_at_cuts(&text, &cuts));
        prop_assert_eq!(st2, ScanStatus::Complete);
        prop_assert_eq!(whole, split);
    }

    /// Strings decode to what serde_json decodes.
    #[test]
    fn strings_match_serde_json(s in "\\PC{0,40}") {
        let doc = serde_json::to_vec(&serde_json::json!({ "k": s })).unwrap();
        let (c, _) = scan_chunks(&[&doc]);
        let expected_len = s.len();
        let got = &c.scalars[0].1;
        prop_assert!(got.ends_with(&format!(":{expected_len}")), "{} vs {}", got, s);
        if s.len() <= MAX_VALUE_PREFIX {
            prop_assert_eq!(got.clone(), format!("s:{}:{}", s, expected_len));
        }
    }

    /// Arbitrary bytes, and JSON with one byte overwritten or its tail
    /// cut, leave the scanner in a defined state: what serde_json accepts
    /// is `Complete`; a syntax error points inside the input and only
    /// at input serde_json refuses too; a failure is final (later input
    /// reports nothing); and chunking changes nothing.
    #[test]
    fn arbitrary_bytes_end_in_a_defined_state(
        data in damaged_json(),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
    ) {
        let (whole, status) = scan_chunks(&[&data]);
        let serde_accepts = serde_json::from_slice::<serde_json::Value>(&data).is_ok();
        if serde_accepts {
            prop_assert_eq!(status, ScanStatus::Complete);
        }
        if let ScanStatus::Failed(error) = status {
            prop_assert!(!serde_accepts, "refused valid JSON: {:?}", error);
            if let ScanError::Syntax { offset } = error {
                prop_assert!(offset < data.len() as u64, "offset {} past the input", offset);
            }
            let (after, status_after) = scan_chunks(&[&data, br#"{"after":"failure"}"#]);
            prop_assert_eq!(status_after, status);
            prop_assert_eq!(&after, &whole);
        }
        let (split, split_status) = scan_chunks(&split_at_cuts(&data, &cuts));
        prop_assert_eq!(split_status, status);
        prop_assert_eq!(split, whole);
    }
}
