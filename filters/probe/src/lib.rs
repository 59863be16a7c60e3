//! Benchmark probe for `bench/gateway.py` (never deployed).
//!
//! With an empty configuration it is the empty proxy-wasm filter: the SDK's
//! default callbacks and nothing else, which is the floor any proxy-wasm
//! filter pays per request (VM entry per callback, context bookkeeping).
//! Configured as `<call>:<n>` it repeats one host call `n` times in the
//! request-headers callback, so the benchmark can price a host call as
//! (CPU per request with n calls − CPU per request of the empty probe) / n.
//! Configured as `io` it makes the data reads tokentap makes for a chat
//! request, in the same callbacks, and nothing else: the floor of any
//! proxy-wasm filter that has to read what tokentap reads.

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, MapType, MetricType};

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(ProbeRoot { probe: Probe::default(), counter: 0, histogram: 0 }) });
}}

/// The host call a probe repeats.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Call {
    /// Nothing: the empty filter.
    #[default]
    None,
    /// `proxy_increment_metric` on a counter defined at configuration.
    Increment,
    /// `proxy_record_metric` on a histogram defined at configuration.
    Record,
    /// `proxy_define_metric` of an already defined name.
    Define,
    /// `proxy_get_header_map_pairs` of the request headers.
    HeaderMap,
    /// `proxy_get_header_map_value` of `:path`.
    HeaderValue,
    /// `proxy_get_property` of `xds.route_name`.
    Property,
    /// `proxy_set_property` of a filter-state value.
    SetProperty,
    /// `proxy_get_current_time_nanoseconds`.
    Time,
    /// tokentap's reads of a chat request, without its logic (see [`Io`]).
    Io,
}

/// What to do per request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Probe {
    pub call: Call,
    pub repeat: u32,
}

impl Probe {
    /// Parses `<call>:<n>` (e.g. `increment:100`); empty means the empty filter.
    pub fn parse(text: &str) -> Option<Probe> {
        let text = text.trim();
        if text.is_empty() {
            return Some(Probe::default());
        }
        if text == "io" {
            return Some(Probe {
                call: Call::Io,
                repeat: 1,
            });
        }
        let (name, n) = text.split_once(':')?;
        let call = match name {
            "none" => Call::None,
            "increment" => Call::Increment,
            "record" => Call::Record,
            "define" => Call::Define,
            "header_map" => Call::HeaderMap,
            "header_value" => Call::HeaderValue,
            "property" => Call::Property,
            "set_property" => Call::SetProperty,
            "time" => Call::Time,
            _ => return None,
        };
        Some(Probe {
            call,
            repeat: n.parse().ok()?,
        })
    }
}

const COUNTER: &str = "tokentap_probe_counter";
const HISTOGRAM: &str = "tokentap_probe_histogram";

struct ProbeRoot {
    probe: Probe,
    /// Stats the metric probes update, defined once per VM.
    counter: u32,
    histogram: u32,
}

impl Context for ProbeRoot {}

impl RootContext for ProbeRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let config = self.get_plugin_configuration().unwrap_or_default();
        match Probe::parse(&String::from_utf8_lossy(&config)) {
            Some(probe) => {
                self.probe = probe;
                self.counter = hostcalls::define_metric(MetricType::Counter, COUNTER).unwrap_or(0);
                self.histogram =
                    hostcalls::define_metric(MetricType::Histogram, HISTOGRAM).unwrap_or(0);
                true
            }
            None => false,
        }
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        match self.probe.call {
            Call::None => return Some(Box::new(Empty)),
            Call::Io => return Some(Box::new(Io)),
            _ => {}
        }
        // Nothing but the repeated call per request: no per-request setup.
        Some(Box::new(Repeat {
            probe: self.probe,
            counter: self.counter,
            histogram: self.histogram,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// The empty filter: every callback is the SDK's default.
struct Empty;

impl Context for Empty {}
impl HttpContext for Empty {}

struct Repeat {
    probe: Probe,
    counter: u32,
    histogram: u32,
}

impl Context for Repeat {}

impl HttpContext for Repeat {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        for i in 0..self.probe.repeat {
            self.once(i);
        }
        Action::Continue
    }
}

impl Repeat {
    fn once(&self, i: u32) {
        // Results are ignored: the probe prices the call, not its outcome.
        let _ = match self.probe.call {
            Call::None => Ok(()),
            Call::Increment => hostcalls::increment_metric(self.counter, 1),
            Call::Record => hostcalls::record_metric(self.histogram, u64::from(i % 1000)),
            Call::Define => hostcalls::define_metric(MetricType::Counter, COUNTER).map(drop),
            Call::HeaderMap => hostcalls::get_map_bytes(MapType::HttpRequestHeaders).map(drop),
            Call::HeaderValue => {
                hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, ":path").map(drop)
            }
            Call::Property => hostcalls::get_property(vec!["xds", "route_name"]).map(drop),
            Call::SetProperty => {
                hostcalls::set_property(vec!["tokentap_probe"], Some(b"{\"n\":1}")).map(drop)
            }
            Call::Time => hostcalls::get_current_time().map(drop),
            Call::Io => Ok(()),
        };
    }
}

/// What tokentap reads from Envoy for a chat request, call for call, with
/// none of its parsing, labels, metrics or logic: one request-header map,
/// `xds.route_name`, the request body, one response-header map, the
/// response body, `xds.cluster_name`, three clock reads and one filter-state
/// write of a summary's size.
struct Io;

/// A filter-state value of the size tokentap writes for a chat request.
const SUMMARY: &[u8] = br#"{"model":"mistral-7b","tenant":"bench-1","route_class":"interactive","team":"platform-ai","operation":"chat","streamed":false,"cache_hit":false,"ttfb_ms":0.4,"prompt_tokens":16,"completion_tokens":9,"usage_source":"response","route":"chat","backend":"llm_stable"}"#;

impl Context for Io {}

impl HttpContext for Io {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        let _ = hostcalls::get_map_bytes(MapType::HttpRequestHeaders);
        let _ = hostcalls::get_property(vec!["xds", "route_name"]);
        let _ = hostcalls::get_current_time();
        Action::Continue
    }

    fn on_http_request_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        if end_of_stream {
            let _ = hostcalls::get_buffer(BufferType::HttpRequestBody, 0, size);
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _: usize, _: bool) -> Action {
        let _ = hostcalls::get_map_bytes(MapType::HttpResponseHeaders);
        let _ = hostcalls::get_current_time();
        Action::Continue
    }

    fn on_http_response_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        let _ = hostcalls::get_buffer(BufferType::HttpResponseBody, 0, size);
        if end_of_stream {
            let _ = hostcalls::get_property(vec!["xds", "cluster_name"]);
            let _ = hostcalls::get_current_time();
            let _ = hostcalls::set_property(vec!["tokentap"], Some(SUMMARY));
        }
        Action::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_calls_and_refuses_unknown_ones() {
        assert_eq!(Probe::parse(""), Some(Probe::default()));
        assert_eq!(
            Probe::parse("increment:100"),
            Some(Probe {
                call: Call::Increment,
                repeat: 100
            })
        );
        assert_eq!(Probe::parse("io").map(|p| p.call), Some(Call::Io));
        assert_eq!(Probe::parse("bogus:1"), None);
        assert_eq!(Probe::parse("record:x"), None);
    }
}
