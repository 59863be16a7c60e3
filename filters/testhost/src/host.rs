//! The module's lifecycle, driven in Envoy's order.

use std::path::Path;
use std::time::Duration;

use wasmi::{Engine, Instance, Linker, Module, Store, WasmParams, WasmResults};

use crate::abi::Action;
use crate::calls::Recorded;
use crate::env::Imports;
use crate::headers::Headers;
use crate::metrics::Metrics;
use crate::state::{property_key, HostState, HttpCallResponse, Property, Side, Stream};
use crate::Error;

/// A compiled module; compile once, then start any number of [`TestHost`]s.
pub struct Plugin {
    engine: Engine,
    module: Module,
}

impl Plugin {
    pub fn load(path: &Path) -> Result<Plugin, Error> {
        let bytes = std::fs::read(path).map_err(|source| Error::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Plugin::from_bytes(&bytes)
    }

    pub fn from_bytes(wasm: &[u8]) -> Result<Plugin, Error> {
        let engine = Engine::default();
        let module = Module::new(&engine, wasm).map_err(|e| Error::Load(e.to_string()))?;
        if module.get_export("proxy_abi_version_0_2_1").is_none() {
            return Err(Error::Load("not a proxy-wasm ABI 0.2.1 module".into()));
        }
        Ok(Plugin { engine, module })
    }

    /// The module's imports, as `(module, name)`.
    pub fn imports(&self) -> Vec<(String, String)> {
        self.module
            .imports()
            .map(|i| (i.module().to_string(), i.name().to_string()))
            .collect()
    }
}

/// The imports this host implements, as `(module, name)`; a module's other
/// imports get stubs that refuse.
pub fn implemented() -> Vec<(String, String)> {
    let engine = Engine::default();
    let mut linker = Linker::new(&engine);
    let mut imports = Imports {
        linker: &mut linker,
        defined: Default::default(),
    };
    let defined = crate::env::define(&mut imports).and_then(|()| crate::wasi::define(&mut imports));
    match defined {
        Ok(()) => imports.defined.into_iter().collect(),
        Err(_) => Vec::new(),
    }
}

/// One VM: the instantiated module and everything the host holds for it.
pub struct TestHost {
    store: Store<HostState>,
    instance: Instance,
    next_context: u32,
}

const ROOT_ID: u32 = 1;

impl TestHost {
    /// Instantiates the module and runs its start function (`_initialize`,
    /// else `_start`), as Envoy does before any callback.
    pub fn new(plugin: &Plugin) -> Result<TestHost, Error> {
        let mut linker = Linker::new(&plugin.engine);
        let mut imports = Imports {
            linker: &mut linker,
            defined: Default::default(),
        };
        crate::env::define(&mut imports).map_err(|e| Error::Load(e.to_string()))?;
        crate::wasi::define(&mut imports).map_err(|e| Error::Load(e.to_string()))?;
        crate::fallback::define(&mut imports, &plugin.module)?;
        let mut store = Store::new(&plugin.engine, HostState::default());
        let instance = linker
            .instantiate_and_start(&mut store, &plugin.module)
            .map_err(|e| Error::Load(e.to_string()))?;
        let mut host = TestHost {
            store,
            instance,
            next_context: ROOT_ID + 1,
        };
        for start in ["_initialize", "_start"] {
            if host.instance.get_func(&host.store, start).is_some() {
                host.call::<(), ()>(0, start, ())?;
                break;
            }
        }
        Ok(host)
    }

    pub fn state(&self) -> &HostState {
        self.store.data()
    }

    pub fn state_mut(&mut self) -> &mut HostState {
        self.store.data_mut()
    }

    pub fn calls(&self) -> &[Recorded] {
        &self.state().calls
    }

    pub fn metrics(&self) -> &Metrics {
        &self.state().metrics
    }

    pub fn stream(&self, context_id: u32) -> Option<&Stream> {
        self.state().streams.get(&context_id)
    }

    /// Calls any export with `context_id` as the active context (the
    /// lifecycle methods below use it). A trap is an [`Error::Trap`]
    /// carrying the captured log.
    pub fn call<P: WasmParams, R: WasmResults>(
        &mut self,
        context_id: u32,
        name: &str,
        params: P,
    ) -> Result<R, Error> {
        let func = self
            .instance
            .get_typed_func::<P, R>(&self.store, name)
            .map_err(|e| Error::Load(format!("export `{name}`: {e}")))?;
        let s = self.store.data_mut();
        s.active = context_id;
        s.effective = context_id;
        func.call(&mut self.store, params).map_err(|e| Error::Trap {
            function: name.to_string(),
            message: e.to_string(),
            log: self.store.data().captured_log(),
        })
    }

    // ---- root context -------------------------------------------------

    /// Creates the root context and starts the VM (`proxy_on_vm_start`
    /// with `vm_configuration`); returns what the module answered.
    pub fn start_vm(&mut self, vm_configuration: &[u8]) -> Result<bool, Error> {
        self.state_mut().root_id = ROOT_ID;
        self.call::<(u32, u32), ()>(ROOT_ID, "proxy_on_context_create", (ROOT_ID, 0))?;
        self.state_mut().vm_configuration = Some(vm_configuration.to_vec());
        let size = len32(vm_configuration);
        let ok = self.call::<(u32, u32), u32>(ROOT_ID, "proxy_on_vm_start", (ROOT_ID, size));
        self.state_mut().vm_configuration = None;
        Ok(ok? != 0)
    }

    /// `proxy_on_configure` with the plugin configuration; `false` means
    /// the module refused it (Envoy then rejects the plugin).
    pub fn configure(&mut self, configuration: &[u8]) -> Result<bool, Error> {
        self.state_mut().plugin_configuration = Some(configuration.to_vec());
        let size = len32(configuration);
        let ok = self.call::<(u32, u32), u32>(ROOT_ID, "proxy_on_configure", (ROOT_ID, size));
        self.state_mut().plugin_configuration = None;
        Ok(ok? != 0)
    }

    /// `proxy_on_tick` on the root context.
    pub fn tick(&mut self) -> Result<(), Error> {
        self.call::<u32, ()>(ROOT_ID, "proxy_on_tick", ROOT_ID)
    }

    /// Moves the clock forward by `d`, calling `proxy_on_tick` at every
    /// tick the module's period falls on, with the clock at that tick.
    pub fn advance(&mut self, d: Duration) -> Result<(), Error> {
        let target = self.state().now_ns + d.as_nanos() as u64;
        loop {
            let s = self.state_mut();
            if s.tick_period_ms == 0 || s.next_tick_ns > target {
                break;
            }
            s.now_ns = s.now_ns.max(s.next_tick_ns);
            s.next_tick_ns += u64::from(s.tick_period_ms) * 1_000_000;
            self.tick()?;
        }
        self.state_mut().now_ns = target;
        Ok(())
    }

    /// Answers the pending `proxy_http_call` with `token`
    /// (`proxy_on_http_call_response`). No headers means the call failed.
    pub fn http_call_response(
        &mut self,
        token: u32,
        response: HttpCallResponse,
    ) -> Result<(), Error> {
        let call = self
            .state_mut()
            .http_calls
            .iter_mut()
            .find(|c| c.token == token && !c.answered)
            .ok_or(Error::UnknownToken(token))?;
        call.answered = true;
        let context_id = call.context_id;
        let params = (
            context_id,
            token,
            len32n(response.headers.len()),
            len32(&response.body),
            len32n(response.trailers.len()),
        );
        self.state_mut().http_call_response = Some(response);
        let r = self.call::<(u32, u32, u32, u32, u32), ()>(
            context_id,
            "proxy_on_http_call_response",
            params,
        );
        self.state_mut().http_call_response = None;
        r
    }

    /// `proxy_on_done` then `proxy_on_delete` on the root context.
    pub fn shutdown(&mut self) -> Result<bool, Error> {
        let done = self.call::<u32, u32>(ROOT_ID, "proxy_on_done", ROOT_ID)? != 0;
        self.call::<u32, ()>(ROOT_ID, "proxy_on_delete", ROOT_ID)?;
        Ok(done)
    }

    // ---- HTTP streams ---------------------------------------------------

    /// A new HTTP context under the root; returns its id.
    pub fn new_stream(&mut self) -> Result<u32, Error> {
        let id = self.next_context;
        self.next_context += 1;
        self.state_mut().streams.insert(id, Stream::default());
        self.call::<(u32, u32), ()>(id, "proxy_on_context_create", (id, ROOT_ID))?;
        Ok(id)
    }

    fn stream_mut(&mut self, id: u32) -> Result<&mut Stream, Error> {
        self.state_mut()
            .streams
            .get_mut(&id)
            .ok_or(Error::UnknownContext(id))
    }

    /// Sets an attribute of a stream (`xds.route_name`, `response.code`, ...).
    pub fn set_property(&mut self, id: u32, path: &[&str], value: Property) -> Result<(), Error> {
        let key = property_key(path);
        self.stream_mut(id)?.properties.insert(key, value.encode());
        Ok(())
    }

    /// Sets an attribute every context sees (`xds.node.metadata.NAME`, ...).
    pub fn set_node_property(&mut self, path: &[&str], value: Property) {
        let key = property_key(path);
        self.state_mut().properties.insert(key, value.encode());
    }

    pub fn request_headers(
        &mut self,
        id: u32,
        headers: Headers,
        end_of_stream: bool,
    ) -> Result<Action, Error> {
        self.headers(id, Side::Request, headers, end_of_stream)
    }

    /// One request body chunk. While the module pauses, chunks accumulate
    /// and each callback sees (and is told the size of) all of them, as
    /// with Envoy's buffering; `Continue` passes the buffer upstream.
    pub fn request_body(
        &mut self,
        id: u32,
        chunk: &[u8],
        end_of_stream: bool,
    ) -> Result<Action, Error> {
        self.body(id, Side::Request, chunk, end_of_stream)
    }

    pub fn request_trailers(&mut self, id: u32, trailers: Headers) -> Result<Action, Error> {
        self.trailers(id, Side::Request, trailers)
    }

    pub fn response_headers(
        &mut self,
        id: u32,
        headers: Headers,
        end_of_stream: bool,
    ) -> Result<Action, Error> {
        self.headers(id, Side::Response, headers, end_of_stream)
    }

    /// One response body chunk, buffered like [`TestHost::request_body`].
    pub fn response_body(
        &mut self,
        id: u32,
        chunk: &[u8],
        end_of_stream: bool,
    ) -> Result<Action, Error> {
        self.body(id, Side::Response, chunk, end_of_stream)
    }

    pub fn response_trailers(&mut self, id: u32, trailers: Headers) -> Result<Action, Error> {
        self.trailers(id, Side::Response, trailers)
    }

    fn headers(
        &mut self,
        id: u32,
        side: Side,
        headers: Headers,
        end_of_stream: bool,
    ) -> Result<Action, Error> {
        let n = len32n(headers.len());
        *self.stream_mut(id)?.headers_mut(side) = Some(headers);
        let name = side.pick("proxy_on_request_headers", "proxy_on_response_headers");
        self.callback(id, name, n, end_of_stream)
    }

    fn body(
        &mut self,
        id: u32,
        side: Side,
        chunk: &[u8],
        end_of_stream: bool,
    ) -> Result<Action, Error> {
        let body = self
            .stream_mut(id)?
            .body_mut(side)
            .get_or_insert_with(Vec::new);
        body.extend_from_slice(chunk);
        let size = len32(body);
        let name = side.pick("proxy_on_request_body", "proxy_on_response_body");
        let action = self.callback(id, name, size, end_of_stream)?;
        if action == Action::Continue {
            self.stream_mut(id)?.release(side);
        }
        Ok(action)
    }

    fn trailers(&mut self, id: u32, side: Side, trailers: Headers) -> Result<Action, Error> {
        let n = len32n(trailers.len());
        *self.stream_mut(id)?.trailers_mut(side) = Some(trailers);
        let name = side.pick("proxy_on_request_trailers", "proxy_on_response_trailers");
        let action = self.call::<(u32, u32), u32>(id, name, (id, n))?;
        Ok(Action::from(action))
    }

    fn callback(
        &mut self,
        id: u32,
        name: &str,
        size: u32,
        end_of_stream: bool,
    ) -> Result<Action, Error> {
        let params = (id, size, u32::from(end_of_stream));
        Ok(Action::from(
            self.call::<(u32, u32, u32), u32>(id, name, params)?,
        ))
    }

    /// The end of a stream as Envoy runs it: `proxy_on_log`, `proxy_on_done`,
    /// `proxy_on_delete`.
    pub fn finish(&mut self, id: u32) -> Result<(), Error> {
        self.stream_mut(id)?;
        self.call::<u32, ()>(id, "proxy_on_log", id)?;
        self.call::<u32, u32>(id, "proxy_on_done", id)?;
        self.call::<u32, ()>(id, "proxy_on_delete", id)
    }
}

fn len32(bytes: &[u8]) -> u32 {
    len32n(bytes.len())
}

fn len32n(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}
