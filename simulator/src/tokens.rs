//! Deterministic token accounting and text generation.
//!
//! Tests across the project (gateway, exporter, demo) predict usage numbers
//! from the request alone, so the rules here are simple and documented in
//! `docs/simulator.md`:
//!
//! * a text of `b` UTF-8 bytes is `max(1, ceil(b / 4))` tokens;
//! * a chat prompt is `3 + Σ (4 + tokens(content))` over its messages (the 4
//!   stands for the role and the chat-template markers, the 3 for the
//!   assistant header that primes the reply);
//! * a completion prompt is `tokens(prompt)`, or the length of a token-id array.

/// Tokens of one text, by the documented bytes/4 rule.
pub fn text_tokens(text: &str) -> u32 {
    let bytes = text.len() as u64;
    let t = bytes.div_ceil(4).max(1);
    u32::try_from(t).unwrap_or(u32::MAX)
}

/// Per-message overhead of the chat template.
pub const CHAT_MESSAGE_OVERHEAD: u32 = 4;
/// Tokens that prime the assistant reply in a chat prompt.
pub const CHAT_REPLY_PRIMING: u32 = 3;

/// Prompt tokens of a chat request, given each message's text content.
///
/// ```
/// use tokentap_llm_sim::tokens::{chat_prompt_tokens, text_tokens};
///
/// assert_eq!(text_tokens("hello"), 2); // 5 bytes -> ceil(5 / 4)
/// assert_eq!(text_tokens(""), 1);
/// // 3 (reply priming) + 4 (message overhead) + 2 ("hello")
/// assert_eq!(chat_prompt_tokens(["hello"]), 9);
/// ```
pub fn chat_prompt_tokens<'a>(contents: impl IntoIterator<Item = &'a str>) -> u32 {
    contents
        .into_iter()
        .map(|c| CHAT_MESSAGE_OVERHEAD.saturating_add(text_tokens(c)))
        .fold(CHAT_REPLY_PRIMING, u32::saturating_add)
}

/// FNV-1a, used to key the prefix cache and to seed text per prompt.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// SplitMix64: a tiny, seedable generator, so runs are reproducible without
/// pulling a RNG crate into the simulator.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

const ASCII_WORDS: &[&str] = &[
    "the", "model", "token", "stream", "latency", "cache", "batch", "prefill", "decode", "gateway",
    "signal", "queue", "kernel", "tensor", "route", "answer", "vector", "index", "shard", "pod",
];

/// Words with multi-byte UTF-8 (2, 3 and 4 bytes per code point), so that
/// clients see code points split across network reads.
const MULTIBYTE_WORDS: &[&str] = &[
    "café",
    "日本",
    "naïve",
    "🚀",
    "résumé",
    "データ",
    "über",
    "✨",
    "señal",
    "模型",
    "Ω",
    "🤖",
];

/// Text of output token `index` for a prompt keyed by `key`. Every fourth
/// token is a multi-byte word; all but the first token start with a space.
pub fn token_text(seed: u64, key: u64, index: u32) -> String {
    let mut rng =
        SplitMix64::new(seed ^ key.rotate_left(17) ^ u64::from(index).wrapping_mul(0x9E37));
    let r = rng.next_u64() as usize;
    let word = if index % 4 == 3 {
        MULTIBYTE_WORDS[r % MULTIBYTE_WORDS.len()]
    } else if r % 7 == 0 {
        MULTIBYTE_WORDS[(r / 7) % MULTIBYTE_WORDS.len()]
    } else {
        ASCII_WORDS[r % ASCII_WORDS.len()]
    };
    if index == 0 {
        word.to_string()
    } else {
        format!(" {word}")
    }
}

/// A deterministic unit-free embedding vector of `dim` floats for one input.
pub fn embedding(seed: u64, key: u64, dim: usize) -> Vec<f64> {
    let mut rng = SplitMix64::new(seed ^ key);
    let raw: Vec<f64> = (0..dim).map(|_| rng.next_f64() * 2.0 - 1.0).collect();
    let norm = raw.iter().map(|x| x * x).sum::<f64>().sqrt();
    if norm == 0.0 {
        return raw;
    }
    raw.iter()
        .map(|x| ((x / norm) * 1e6).round() / 1e6)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_tokens_is_ceil_bytes_over_four_min_one() {
        assert_eq!(text_tokens(""), 1);
        assert_eq!(text_tokens("abc"), 1);
        assert_eq!(text_tokens("abcd"), 1);
        assert_eq!(text_tokens("abcde"), 2);
        // "é" is two bytes: 3 × 2 = 6 bytes → 2 tokens.
        assert_eq!(text_tokens("ééé"), 2);
    }

    #[test]
    fn chat_prompt_adds_overheads() {
        // 3 + (4 + 1) + (4 + 3)
        assert_eq!(chat_prompt_tokens(["hi", "0123456789"]), 15);
        assert_eq!(chat_prompt_tokens(std::iter::empty()), 3);
    }

    #[test]
    fn generated_text_is_deterministic_and_has_multibyte() {
        let a: String = (0..16).map(|i| token_text(1, 42, i)).collect();
        let b: String = (0..16).map(|i| token_text(1, 42, i)).collect();
        assert_eq!(a, b);
        assert!(a.chars().any(|c| c.len_utf8() >= 3), "{a}");
        let other: String = (0..16).map(|i| token_text(2, 42, i)).collect();
        assert_ne!(a, other);
        assert!(!token_text(1, 42, 0).starts_with(' '));
        assert!(token_text(1, 42, 1).starts_with(' '));
    }

    #[test]
    fn every_fourth_token_is_multibyte() {
        for i in (3..64).step_by(4) {
            let t = token_text(9, 7, i);
            assert!(t.len() > t.chars().count(), "{t:?}");
        }
    }

    #[test]
    fn embeddings_are_unit_length() {
        let e = embedding(1, 5, 16);
        let n: f64 = e.iter().map(|x| x * x).sum();
        assert!((n - 1.0).abs() < 1e-4);
        assert_eq!(e, embedding(1, 5, 16));
    }
}
