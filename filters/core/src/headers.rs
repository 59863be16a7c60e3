//! proxy-wasm's serialized header map, read without copying.
//!
//! One `proxy_get_header_map_pairs` call returns every header; looking up a
//! dozen names in it is much cheaper than a dozen host calls, each of which
//! crosses the VM boundary. The format is: a little-endian `u32` count, then
//! `count` pairs of `u32` (key length, value length), then each key and value
//! followed by a NUL byte. Parsing is bounds-checked: a malformed buffer
//! yields `None`, never a panic.

/// A parsed header map that borrows nothing: it owns the host's buffer and
/// keeps offsets into it.
///
/// ```
/// use tokentap_core::headers::{serialize, HeaderMap};
///
/// let buf = serialize(&[(":path", b"/v1/chat/completions"), ("x-tenant-id", b"acme")]);
/// let headers = HeaderMap::parse(buf).expect("well-formed");
/// assert_eq!(headers.get("x-tenant-id"), Some(&b"acme"[..]));
/// assert_eq!(headers.get("x-missing"), None);
/// // A buffer cut short is refused, not half-read.
/// assert!(HeaderMap::parse(vec![1, 0, 0, 0]).is_none());
/// ```
#[derive(Clone, Debug, Default)]
pub struct HeaderMap {
    buf: Vec<u8>,
    entries: Vec<(usize, usize, usize, usize)>,
}

impl HeaderMap {
    /// Parses the host's serialization; `None` if it is malformed.
    pub fn parse(buf: Vec<u8>) -> Option<HeaderMap> {
        if buf.is_empty() {
            return Some(HeaderMap::default());
        }
        let u32_at = |at: usize| -> Option<usize> {
            let b = buf.get(at..at.checked_add(4)?)?;
            Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        };
        let count = u32_at(0)?;
        let mut data = count.checked_mul(8)?.checked_add(4)?;
        if data > buf.len() {
            return None;
        }
        let mut entries = Vec::with_capacity(count);
        for i in 0..count {
            let key_len = u32_at(4 + i * 8)?;
            let val_len = u32_at(8 + i * 8)?;
            let key = data;
            let val = key.checked_add(key_len)?.checked_add(1)?;
            let end = val.checked_add(val_len)?.checked_add(1)?;
            if end > buf.len() {
                return None;
            }
            entries.push((key, key_len, val, val_len));
            data = end;
        }
        Some(HeaderMap { buf, entries })
    }

    /// The first value of `name` (names are lower-case in Envoy).
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.entries
            .iter()
            .find(|(k, kl, _, _)| &self.buf[*k..*k + *kl] == name.as_bytes())
            .map(|(_, _, v, vl)| &self.buf[*v..*v + *vl])
    }

    /// Whether any header name starts with `prefix`.
    pub fn has_key_prefix(&self, prefix: &[u8]) -> bool {
        self.entries
            .iter()
            .any(|(k, kl, _, _)| self.buf[*k..*k + *kl].starts_with(prefix))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Serializes pairs the way the host does (for tests and fakes).
pub fn serialize(pairs: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (k, v) in pairs {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trips_and_finds_the_first_value() {
        let buf = serialize(&[
            (":path", b"/v1/chat/completions"),
            ("x-tenant-id", b"\xffacme"),
            ("x-tenant-id", b"second"),
            ("empty", b""),
        ]);
        let m = HeaderMap::parse(buf).unwrap();
        assert_eq!(m.len(), 4);
        assert_eq!(m.get(":path"), Some(&b"/v1/chat/completions"[..]));
        assert_eq!(m.get("x-tenant-id"), Some(&b"\xffacme"[..]));
        assert_eq!(m.get("empty"), Some(&b""[..]));
        assert_eq!(m.get("missing"), None);
        assert!(HeaderMap::parse(Vec::new()).unwrap().is_empty());
    }

    #[test]
    fn malformed_buffers_are_refused() {
        let good = serialize(&[("a", b"b")]);
        assert!(HeaderMap::parse(good[..good.len() - 1].to_vec()).is_none());
        assert!(HeaderMap::parse(vec![0xff, 0xff, 0xff, 0xff]).is_none());
        assert!(HeaderMap::parse(vec![1, 0]).is_none());
    }

    proptest! {
        /// Whatever arbitrary bytes parse to fits in them: each pair costs
        /// 8 bytes of lengths and 2 NULs after the 4-byte count.
        #[test]
        fn arbitrary_bytes_parse_to_what_fits_in_them(data in prop::collection::vec(any::<u8>(), 0..256)) {
            let len = data.len();
            if let Some(m) = HeaderMap::parse(data) {
                prop_assert!(len == 0 || 4 + 10 * m.len() <= len, "{} pairs in {} bytes", m.len(), len);
            }
        }

        /// A serialization cut short anywhere is refused, never half-read.
        #[test]
        fn truncated_buffers_are_refused(
            pairs in prop::collection::vec(("[a-z:-]{1,12}", prop::collection::vec(any::<u8>(), 0..20)), 1..6),
            cut in any::<prop::sample::Index>(),
        ) {
            let refs: Vec<(&str, &[u8])> = pairs.iter().map(|(k, v)| (k.as_str(), v.as_slice())).collect();
            let mut buf = serialize(&refs);
            buf.truncate(1 + cut.index(buf.len() - 1));
            prop_assert!(HeaderMap::parse(buf).is_none());
        }

        #[test]
        fn serialized_pairs_parse_back(pairs in prop::collection::vec(("[a-z:-]{1,12}", prop::collection::vec(any::<u8>(), 0..20)), 0..10)) {
            let refs: Vec<(&str, &[u8])> = pairs.iter().map(|(k, v)| (k.as_str(), v.as_slice())).collect();
            let m = HeaderMap::parse(serialize(&refs)).unwrap();
            prop_assert_eq!(m.len(), pairs.len());
            for (k, _) in &pairs {
                let first = pairs.iter().find(|(k2, _)| k2 == k).map(|(_, v)| v.as_slice());
                prop_assert_eq!(m.get(k), first);
            }
        }
    }
}
