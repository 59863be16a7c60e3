//! The proxy-wasm ABI 0.2.1 imports (module `env`), with the semantics of
//! Envoy's implementation for the cases the tests reach.

mod control;
mod data;
mod stats;

use std::collections::BTreeSet;

use wasmi::{IntoFunc, Linker};

use crate::state::HostState;

/// The linker, and the names defined in it so far (the rest of the
/// module's imports get stubs that refuse, see [`crate::fallback`]).
pub(crate) struct Imports<'a> {
    pub linker: &'a mut Linker<HostState>,
    pub defined: BTreeSet<(String, String)>,
}

impl Imports<'_> {
    pub fn wrap<Params, Results>(
        &mut self,
        module: &str,
        name: &str,
        func: impl IntoFunc<HostState, Params, Results>,
    ) -> Result<(), wasmi::Error> {
        self.linker.func_wrap(module, name, func)?;
        self.defined.insert((module.to_string(), name.to_string()));
        Ok(())
    }
}

/// Defines every `env` function this host implements.
pub(crate) fn define(imports: &mut Imports<'_>) -> Result<(), wasmi::Error> {
    data::define(imports)?;
    stats::define(imports)?;
    control::define(imports)
}
