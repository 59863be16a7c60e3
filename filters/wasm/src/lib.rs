//! proxy-wasm shell around `tokentap-core`: it forwards Envoy's callbacks to
//! [`Gateway`] with the host seam implemented over raw host calls
//! ([`envoy`]). Every decision lives in `tokentap-core`; this crate only
//! moves bytes and timestamps across the host boundary.
//!
//! Failure policy: the filter never returns anything but `Continue` for a
//! response, never pauses a response body, and answers every unexpected host
//! result by skipping the measurement, so traffic is never affected.

mod envoy;

use std::cell::RefCell;
use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};

use tokentap_core::config::{Config, TracingConfig};
use tokentap_core::host::Clock;
use tokentap_core::labels::{Dimension, SharedAdmission};
use tokentap_core::lifecycle::{BodyAction, Gateway, Session};
use tokentap_core::trace::ResourceBuilder;
use tokentap_core::tracer::Tracer;

use crate::envoy::{
    Buffer, EnvoyClock, EnvoyExports, EnvoyLog, EnvoySharedData, EnvoyStats, EnvoyStream, Level,
};

/// Version reported in logs and span resources.
pub const PLUGIN_VERSION: &str = env!("CARGO_PKG_VERSION");

proxy_wasm::main! {{
    std::panic::set_hook(Box::new(|info| {
        envoy::log(Level::Critical, &format!("tokentap: panic: {info}"));
    }));
    proxy_wasm::set_root_context(|_context_id| -> Box<dyn RootContext> {
        Box::new(Root { gateway: None })
    });
}}

type SharedGateway = Rc<RefCell<Gateway<EnvoyStats>>>;

struct Root {
    /// `None` until configured (and if configuration was refused).
    gateway: Option<SharedGateway>,
}

/// Seed for span/trace ids: WASI randomness, mixed with the clock.
fn random_seed() -> u64 {
    wasi_random() ^ EnvoyClock.now_nanos().rotate_left(17)
}

#[cfg(target_arch = "wasm32")]
fn wasi_random() -> u64 {
    #[link(wasm_import_module = "wasi_snapshot_preview1")]
    extern "C" {
        fn random_get(buf: *mut u8, len: usize) -> u16;
    }
    let mut buf = [0u8; 8];
    // SAFETY: `buf` is a live 8-byte buffer; WASI fills it or leaves it zero.
    #[allow(unsafe_code)]
    unsafe {
        random_get(buf.as_mut_ptr(), buf.len());
    }
    u64::from_le_bytes(buf)
}

/// Host builds (unit tests, clippy) have no WASI; the clock alone seeds.
#[cfg(not(target_arch = "wasm32"))]
fn wasi_random() -> u64 {
    0
}

/// Resource attributes: Envoy node metadata (`xds.node.metadata`; Istio puts
/// NAME/NAMESPACE there), then `vmConfig.env` variables, then the
/// configuration's own entries.
fn resource_for(cfg: &TracingConfig) -> tokentap_core::trace::Resource {
    let env: Vec<(String, String)> = std::env::vars().collect();
    let keys = [
        "NAME",
        "NAMESPACE",
        "POD_NAME",
        "POD_NAMESPACE",
        "NODE_NAME",
        "CLUSTER_NAME",
    ];
    let node: Vec<(&'static str, String)> = keys
        .into_iter()
        .filter_map(|key| {
            let v = envoy::get_property(&["xds", "node", "metadata", key])?;
            Some((key, String::from_utf8(v).ok()?))
        })
        .collect();
    ResourceBuilder::new()
        .service_name(&cfg.service_name)
        .pairs(node.iter().map(|(k, v)| (*k, v.as_str())))
        .pairs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .pairs(cfg.resource.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .build()
}

/// The gateway for a configuration, or the message refusing it.
fn configure(bytes: &[u8]) -> Result<Gateway<EnvoyStats>, String> {
    let config = Config::parse(bytes).map_err(|e| e.to_string())?;
    let tracer = match &config.tracing {
        None => None,
        Some(t) => Some(Tracer::new(t, random_seed(), resource_for(t)).map_err(|e| e.to_string())?),
    };
    let mut admission = SharedAdmission::new(EnvoySharedData);
    admission.initialise(&Dimension::ALL);
    let gateway = Gateway::new(
        config,
        Box::new(admission),
        EnvoyStats,
        tracer,
        Box::new(EnvoyLog),
    );
    Ok(bench_stage(gateway))
}

/// Benchmark builds only: `TOKENTAP_BENCH_STAGE` (from `vmConfig.env`)
/// stops the lifecycle early, to measure what each part costs.
#[cfg(feature = "bench-stages")]
fn bench_stage(mut gateway: Gateway<EnvoyStats>) -> Gateway<EnvoyStats> {
    let stage = std::env::var("TOKENTAP_BENCH_STAGE").ok();
    if let Some(stage) = stage
        .as_deref()
        .and_then(tokentap_core::lifecycle::Stage::parse)
    {
        gateway.set_stage(stage);
    }
    gateway
}

#[cfg(not(feature = "bench-stages"))]
fn bench_stage(gateway: Gateway<EnvoyStats>) -> Gateway<EnvoyStats> {
    gateway
}

impl Context for Root {
    fn on_http_call_response(&mut self, token: u32, headers: usize, body_size: usize, _: usize) {
        let Some(gateway) = &self.gateway else {
            return;
        };
        let status = (headers > 0)
            .then(|| envoy::http_call_response_header(":status"))
            .flatten()
            .and_then(|v| std::str::from_utf8(&v).ok()?.trim().parse::<u16>().ok());
        let body = || envoy::get_buffer(Buffer::HttpCallResponseBody, 0, body_size);
        gateway.borrow_mut().export_response(token, status, body);
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, plugin_configuration_size: usize) -> bool {
        let bytes = envoy::get_buffer(Buffer::PluginConfiguration, 0, plugin_configuration_size)
            .unwrap_or_default();
        let gateway = match configure(&bytes) {
            Ok(g) => g,
            Err(e) => {
                let message = format!("tokentap: refusing configuration: {e}");
                envoy::log(Level::Critical, &message);
                return false;
            }
        };
        envoy::set_tick_period_ms(gateway.tick_period_ms());
        let config = gateway.config();
        let message = format!(
            "tokentap {PLUGIN_VERSION}: configured ({} LLM paths, tenant source {:?})",
            config.llm_paths.len(),
            config.tenant_source
        );
        envoy::log(Level::Info, &message);
        self.gateway = Some(Rc::new(RefCell::new(gateway)));
        true
    }

    fn on_tick(&mut self) {
        if let Some(gateway) = &self.gateway {
            let now = EnvoyClock.now_nanos();
            gateway.borrow_mut().tick(now, &mut EnvoyExports);
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Request {
            gateway: self.gateway.clone(),
            session: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// One HTTP stream: a session only while it is LLM traffic.
struct Request {
    gateway: Option<SharedGateway>,
    session: Option<Session>,
}

impl Context for Request {}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        if let Some(gateway) = &self.gateway {
            let mut stream = EnvoyStream::default();
            self.session = gateway
                .borrow_mut()
                .request_headers(&mut stream, &EnvoyClock);
        }
        Action::Continue
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let (Some(gateway), Some(s)) = (&self.gateway, self.session.as_mut()) else {
            return Action::Continue;
        };
        let mut stream = EnvoyStream::default();
        match gateway
            .borrow_mut()
            .request_body(s, &mut stream, body_size, end_of_stream)
        {
            BodyAction::Continue => Action::Continue,
            BodyAction::Pause => Action::Pause,
        }
    }

    fn on_http_response_headers(&mut self, _: usize, end_of_stream: bool) -> Action {
        if let (Some(gateway), Some(s)) = (&self.gateway, self.session.as_mut()) {
            let mut stream = EnvoyStream::default();
            gateway
                .borrow_mut()
                .response_headers(s, &mut stream, &EnvoyClock, end_of_stream);
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if let (Some(gateway), Some(s)) = (&self.gateway, self.session.as_mut()) {
            let mut stream = EnvoyStream::default();
            gateway.borrow_mut().response_body(
                s,
                &mut stream,
                body_size,
                end_of_stream,
                &EnvoyClock,
            );
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        if let (Some(gateway), Some(s)) = (&self.gateway, self.session.take()) {
            let mut stream = EnvoyStream::default();
            gateway.borrow_mut().finish(s, &mut stream, &EnvoyClock);
        }
    }
}
