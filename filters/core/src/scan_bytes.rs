//! Byte search eight bytes at a time (SWAR): the SSE framer looks for line
//! ends in every byte of every event, and `wasm32` has 64-bit integers but
//! no `memchr`.

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGH: u64 = 0x8080_8080_8080_8080;

/// Flags (high bit per byte) the bytes of `x` equal to `b`, exact for the
/// lowest flagged byte (higher flags may be borrow artefacts).
fn eq_mask(x: u64, b: u8) -> u64 {
    let y = x ^ (ONES * u64::from(b));
    y.wrapping_sub(ONES) & !y & HIGH
}

/// Position of the first byte of `bytes` equal to `a` or `b`.
///
/// ```
/// use tokentap_core::scan_bytes::find_either;
/// assert_eq!(find_either(b"data: {\"x\":1}\r\n", b'\n', b'\r'), Some(13));
/// assert_eq!(find_either(b"no line end here", b'\n', b'\r'), None);
/// ```
pub fn find_either(bytes: &[u8], a: u8, b: u8) -> Option<usize> {
    let mut i = 0;
    while i + 8 <= bytes.len() {
        let mut word = [0u8; 8];
        word.copy_from_slice(&bytes[i..i + 8]);
        let x = u64::from_le_bytes(word);
        let hits = eq_mask(x, a) | eq_mask(x, b);
        if hits != 0 {
            let first = (hits.trailing_zeros() / 8) as usize;
            if let Some(p) = bytes[i + first..i + 8]
                .iter()
                .position(|&c| c == a || c == b)
            {
                return Some(i + first + p);
            }
        }
        i += 8;
    }
    bytes[i..]
        .iter()
        .position(|&c| c == a || c == b)
        .map(|p| i + p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Agrees with a plain byte-by-byte search on any input, including
        /// bytes >= 0x80 next to the searched ones (borrow artefacts).
        #[test]
        fn agrees_with_a_plain_search(
            bytes in prop::collection::vec(prop::sample::select(vec![b'\n', b'\r', b'"', 0x80, 0xFF, 0x0B, b'a', 0]), 0..40),
            a in prop::sample::select(vec![b'\n', b'"', 0x80, 0]),
            b in prop::sample::select(vec![b'\r', b'"', 0xFF]),
        ) {
            let plain = bytes.iter().position(|&c| c == a || c == b);
            prop_assert_eq!(find_either(&bytes, a, b), plain);
            prop_assert_eq!(find_either(&bytes, a, a), bytes.iter().position(|&c| c == a));
        }
    }
}
