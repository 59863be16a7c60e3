//! Header maps as Envoy keeps them (ordered, lower-case names, raw bytes)
//! and their proxy-wasm serialization.

/// An ordered header map. Names are stored lower-case, as Envoy does.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Headers(pub Vec<(Vec<u8>, Vec<u8>)>);

impl Headers {
    /// Builds a map from `(name, value)` pairs.
    pub fn new<K: AsRef<[u8]>, V: AsRef<[u8]>>(pairs: impl IntoIterator<Item = (K, V)>) -> Self {
        let mut h = Headers::default();
        for (k, v) in pairs {
            h.add(k.as_ref(), v.as_ref());
        }
        h
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The first value of `name` (case-insensitive).
    pub fn get(&self, name: impl AsRef<[u8]>) -> Option<&[u8]> {
        let name = name.as_ref().to_ascii_lowercase();
        self.0
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_slice())
    }

    pub fn add(&mut self, name: &[u8], value: &[u8]) {
        self.0.push((name.to_ascii_lowercase(), value.to_vec()));
    }

    /// Replaces every value of `name` with one value (Envoy's `setCopy`).
    pub fn replace(&mut self, name: &[u8], value: &[u8]) {
        self.remove(name);
        self.add(name, value);
    }

    pub fn remove(&mut self, name: &[u8]) {
        let name = name.to_ascii_lowercase();
        self.0.retain(|(k, _)| *k != name);
    }

    /// proxy-wasm serialization: `u32` count, `count` pairs of `u32`
    /// (name length, value length), then each name and value NUL-terminated;
    /// all integers little-endian.
    pub fn serialize(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&len32(self.0.len()));
        for (k, v) in &self.0 {
            out.extend_from_slice(&len32(k.len()));
            out.extend_from_slice(&len32(v.len()));
        }
        for (k, v) in &self.0 {
            out.extend_from_slice(k);
            out.push(0);
            out.extend_from_slice(v);
            out.push(0);
        }
        out
    }

    /// Parses the serialization the module sends (`None` if malformed).
    pub fn parse(buf: &[u8]) -> Option<Headers> {
        if buf.is_empty() {
            return Some(Headers::default());
        }
        let count = read_u32(buf, 0)?;
        let mut data = count.checked_mul(8)?.checked_add(4)?;
        let mut pairs = Vec::new();
        for i in 0..count {
            let klen = read_u32(buf, 4 + i * 8)?;
            let vlen = read_u32(buf, 8 + i * 8)?;
            let key = buf.get(data..data.checked_add(klen)?)?.to_vec();
            let vstart = data + klen + 1;
            let value = buf.get(vstart..vstart.checked_add(vlen)?)?.to_vec();
            data = vstart + vlen + 1;
            pairs.push((key, value));
        }
        (data <= buf.len()).then_some(Headers(pairs))
    }
}

fn len32(n: usize) -> [u8; 4] {
    u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes()
}

fn read_u32(buf: &[u8], at: usize) -> Option<usize> {
    let b: [u8; 4] = buf.get(at..at.checked_add(4)?)?.try_into().ok()?;
    Some(u32::from_le_bytes(b) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serialization_round_trips_and_names_are_lower_case() {
        let h = Headers::new([("Content-Type", "a"), (":path", ""), ("x", "\u{e9}")]);
        assert_eq!(h.get("content-type"), Some(&b"a"[..]));
        assert_eq!(Headers::parse(&h.serialize()), Some(h));
    }

    #[test]
    fn truncated_serialization_is_refused() {
        let bytes = Headers::new([("k", "value")]).serialize();
        assert_eq!(Headers::parse(&bytes[..bytes.len() - 3]), None);
        assert_eq!(Headers::parse(&[9, 0, 0, 0]), None);
    }
}
