//! Byte search eight bytes at a time (SWAR): the SSE framer looks for line
//! ends in every byte of every event, and `wasm32` has 64-bit integers but
//! no `memchr`.

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGH: u64 = 0x8080_8080_8080_8080;

/// Position of the first line end (`\n` or `\r`) in `bytes`.
///
/// ```
/// use tokentap_core::scan_bytes::find_line_end;
/// assert_eq!(find_line_end(b"data: {\"x\":1}\r\n"), Some(13));
/// assert_eq!(find_line_end(b"no line end\there"), None);
/// ```
pub fn find_line_end(bytes: &[u8]) -> Option<usize> {
    let is_eol = |c: u8| c == b'\n' || c == b'\r';
    let mut i = 0;
    while i + 8 <= bytes.len() {
        let mut word = [0u8; 8];
        word.copy_from_slice(&bytes[i..i + 8]);
        let x = u64::from_le_bytes(word);
        // One test for both: they are the only bytes below 0x0E that a data
        // line holds in practice (JSON escapes its control characters), so
        // flag every byte below 0x0E and confirm the few that are not.
        let low = x.wrapping_sub(ONES * 0x0E) & !x & HIGH;
        if low != 0 {
            let first = (low.trailing_zeros() / 8) as usize;
            if let Some(p) = bytes[i + first..i + 8].iter().position(|&c| is_eol(c)) {
                return Some(i + first + p);
            }
        }
        i += 8;
    }
    bytes[i..].iter().position(|&c| is_eol(c)).map(|p| i + p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Agrees with a plain byte-by-byte search on any input, including
        /// other low bytes (tab, NUL, 0x0D's neighbours) and bytes >= 0x80
        /// next to the searched ones (borrow artefacts).
        #[test]
        fn agrees_with_a_plain_search(
            bytes in prop::collection::vec(prop::sample::select(
                vec![b'\n', b'\r', b'\t', b'"', 0x80, 0xFF, 0x0B, 0x0C, 0x0E, b'a', 0]
            ), 0..40),
        ) {
            let plain = bytes.iter().position(|&c| c == b'\n' || c == b'\r');
            prop_assert_eq!(find_line_end(&bytes), plain);
        }
    }
}
