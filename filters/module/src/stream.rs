//! The core's host seam ([`StreamHost`], [`Clock`]) over the stream a hook
//! received. Values the core keeps are copied; bodies are lent as Envoy's
//! own slices.

use std::cell::Cell;

use tokentap_core::host::{Clock, HttpView, StreamHost};

use crate::abi::{self, Attribute, BodyKind, FilterHandle, HeaderKind};

/// Which body a hook is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Body {
    None,
    Request,
    Response,
}

/// One hook's view of its stream.
pub struct ModuleStream<'a> {
    handle: &'a mut FilterHandle,
    body: Body,
    /// Response code details from a local reply Envoy sent on this stream.
    local_reply: Option<&'a str>,
}

impl<'a> ModuleStream<'a> {
    pub fn new(handle: &'a mut FilterHandle, body: Body, local_reply: Option<&'a str>) -> Self {
        Self {
            handle,
            body,
            local_reply,
        }
    }

    /// The request body as Envoy holds it in this hook: what was buffered
    /// while the filter paused, then the data just received. When the
    /// received data *is* an earlier filter's buffer, only it.
    fn request_slices(&self) -> Vec<&[u8]> {
        let h = &*self.handle;
        let mut out = Vec::new();
        if !h.received_is_buffered_request() {
            out.extend(h.body_chunks(BodyKind::BufferedRequest));
        }
        out.extend(h.body_chunks(BodyKind::ReceivedRequest));
        out
    }

    /// Bytes of body this hook is about (request: cumulative while buffered).
    pub fn body_size(&self) -> usize {
        let h = &*self.handle;
        match self.body {
            Body::None => 0,
            Body::Request if h.received_is_buffered_request() => {
                h.body_size(BodyKind::ReceivedRequest)
            }
            Body::Request => {
                h.body_size(BodyKind::BufferedRequest) + h.body_size(BodyKind::ReceivedRequest)
            }
            Body::Response => h.body_size(BodyKind::ReceivedResponse),
        }
    }
}

/// Copies `[start, start + len)` out of a sequence of slices.
fn copy_range(slices: &[&[u8]], start: usize, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut skip = start;
    for s in slices {
        if out.len() >= len {
            break;
        }
        if skip >= s.len() {
            skip -= s.len();
            continue;
        }
        let take = (s.len() - skip).min(len - out.len());
        out.extend_from_slice(&s[skip..skip + take]);
        skip = 0;
    }
    out
}

/// Visits the first `len` bytes of a sequence of slices.
fn visit_prefix(slices: &[&[u8]], len: usize, visit: &mut dyn FnMut(&[u8])) {
    let mut left = len;
    for s in slices {
        if left == 0 {
            break;
        }
        let take = s.len().min(left);
        visit(&s[..take]);
        left -= take;
    }
}

impl HttpView for ModuleStream<'_> {
    fn request_header(&self, name: &str) -> Option<Vec<u8>> {
        self.handle
            .header(HeaderKind::Request, name)
            .map(<[u8]>::to_vec)
    }

    fn response_header(&self, name: &str) -> Option<Vec<u8>> {
        self.handle
            .header(HeaderKind::Response, name)
            .map(<[u8]>::to_vec)
    }

    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        let h = &*self.handle;
        match path {
            ["xds", "route_name"] => h
                .attribute_string(Attribute::XdsRouteName)
                .map(<[u8]>::to_vec),
            ["xds", "cluster_name"] => h.cluster_name().map(<[u8]>::to_vec),
            ["response", "code"] => h
                .attribute_int(Attribute::ResponseCode)
                .map(|c| c.to_le_bytes().to_vec()),
            ["response", "code_details"] => h
                .attribute_string(Attribute::ResponseCodeDetails)
                .map(<[u8]>::to_vec)
                .or_else(|| self.local_reply.map(|d| d.as_bytes().to_vec())),
            ["response", "flags"] => h
                .attribute_int(Attribute::ResponseFlags)
                .map(|f| f.to_le_bytes().to_vec()),
            ["metadata", "filter_metadata", namespace, key] => h
                .dynamic_metadata_string(namespace, key)
                .map(<[u8]>::to_vec),
            _ => None,
        }
    }

    fn has_response_header_prefix(&self, prefix: &str) -> bool {
        self.handle
            .headers(HeaderKind::Response)
            .iter()
            .any(|(k, _)| k.starts_with(prefix.as_bytes()))
    }
}

impl StreamHost for ModuleStream<'_> {
    fn request_body(&self, start: usize, len: usize) -> Option<Vec<u8>> {
        (self.body == Body::Request).then(|| copy_range(&self.request_slices(), start, len))
    }

    fn response_body(&self, start: usize, len: usize) -> Option<Vec<u8>> {
        (self.body == Body::Response).then(|| {
            copy_range(
                &self.handle.body_chunks(BodyKind::ReceivedResponse),
                start,
                len,
            )
        })
    }

    fn visit_request_body(&self, len: usize, visit: &mut dyn FnMut(&[u8])) {
        if self.body == Body::Request {
            visit_prefix(&self.request_slices(), len, visit);
        }
    }

    fn visit_response_body(&self, len: usize, visit: &mut dyn FnMut(&[u8])) {
        if self.body == Body::Response {
            visit_prefix(
                &self.handle.body_chunks(BodyKind::ReceivedResponse),
                len,
                visit,
            );
        }
    }

    fn replace_request_body(&mut self, _len: usize, body: &[u8]) {
        // Everything Envoy holds goes; the new body continues in its place.
        let h = &mut *self.handle;
        if !h.received_is_buffered_request() {
            h.drain_body(BodyKind::BufferedRequest, usize::MAX);
        }
        h.drain_body(BodyKind::ReceivedRequest, usize::MAX);
        h.append_body(BodyKind::ReceivedRequest, body);
    }

    fn set_request_header(&mut self, name: &str, value: &str) {
        self.handle.set_request_header(name, Some(value));
    }

    fn remove_request_header(&mut self, name: &str) {
        self.handle.set_request_header(name, None);
    }

    fn set_filter_state(&mut self, key: &str, value: &[u8]) {
        // The Wasm filter's key (`wasm.<key>`), so access-log formats read
        // the same filter state whichever shell runs.
        let mut full = String::with_capacity(key.len() + 5);
        full.push_str("wasm.");
        full.push_str(key);
        self.handle.set_filter_state(&full, value);
    }
}

/// The wall clock, read at most once per hook.
#[derive(Default)]
pub struct HookClock(Cell<Option<u64>>);

impl Clock for HookClock {
    fn now_nanos(&self) -> u64 {
        match self.0.get() {
            Some(t) => t,
            None => {
                let t = abi::now_nanos();
                self.0.set(Some(t));
                t
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    /// Splits `body` at the given cut points, as Envoy's buffer slices.
    fn slices(body: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
        let mut points: Vec<usize> = cuts.iter().map(|c| c % (body.len() + 1)).collect();
        points.sort_unstable();
        let mut out = Vec::new();
        let mut at = 0;
        for p in points.into_iter().chain([body.len()]) {
            out.push(body[at..p].to_vec());
            at = p;
        }
        out
    }

    proptest! {
        /// However Envoy slices a body, a range read is the range of the whole.
        #[test]
        fn copy_range_reads_across_slices(
            body in proptest::collection::vec(any::<u8>(), 0..300),
            cuts in proptest::collection::vec(any::<usize>(), 0..6),
            start in 0usize..320,
            len in 0usize..320,
        ) {
            let owned = slices(&body, &cuts);
            let parts: Vec<&[u8]> = owned.iter().map(Vec::as_slice).collect();
            let end = (start + len).min(body.len());
            let want = if start >= body.len() { &[][..] } else { &body[start..end] };
            prop_assert_eq!(copy_range(&parts, start, len), want.to_vec());
        }

        /// Visiting a prefix hands over exactly its bytes, in order, with no
        /// empty tail beyond it.
        #[test]
        fn visit_prefix_hands_over_the_prefix(
            body in proptest::collection::vec(any::<u8>(), 0..300),
            cuts in proptest::collection::vec(any::<usize>(), 0..6),
            len in 0usize..320,
        ) {
            let owned = slices(&body, &cuts);
            let parts: Vec<&[u8]> = owned.iter().map(Vec::as_slice).collect();
            let mut seen = Vec::new();
            visit_prefix(&parts, len, &mut |chunk| seen.extend_from_slice(chunk));
            prop_assert_eq!(seen, body[..len.min(body.len())].to_vec());
        }
    }
}
