//! Stubs for the module's imports this host does not implement: each call
//! is recorded as [`HostCall::Unimplemented`] and answered with an error
//! status (proxy-wasm `Unimplemented`, WASI `ENOSYS`), so a test sees it
//! instead of a silent trap. An import with no status to return traps
//! with a message naming it.

use wasmi::{ExternType, Module, Val, ValType};

use crate::abi::{errno, Status};
use crate::calls::HostCall;
use crate::env::Imports;
use crate::guest::Ctx;
use crate::Error;

pub(crate) fn define(i: &mut Imports<'_>, module: &Module) -> Result<(), Error> {
    for import in module.imports() {
        let (m, n) = (import.module().to_string(), import.name().to_string());
        if i.defined.contains(&(m.clone(), n.clone())) {
            continue;
        }
        let ExternType::Func(ty) = import.ty() else {
            return Err(Error::Load(format!(
                "unsupported non-function import {m}.{n}"
            )));
        };
        let status = if m == "env" {
            Status::Unimplemented
        } else {
            Status::Errno(errno::NOSYS)
        };
        let returns_status = ty.results() == [ValType::I32];
        let name = (m.clone(), n.clone());
        i.linker
            .func_new(
                &name.0,
                &name.1,
                ty.clone(),
                move |mut c: Ctx<'_>, _params, results| {
                    let call = HostCall::Unimplemented {
                        module: m.clone(),
                        name: n.clone(),
                    };
                    c.data_mut().record(call, status);
                    if !returns_status {
                        return Err(wasmi::Error::new(format!(
                            "unimplemented host function {m}.{n}"
                        )));
                    }
                    results[0] = Val::I32(status.code() as i32);
                    Ok(())
                },
            )
            .map_err(|e| Error::Load(e.to_string()))?;
    }
    Ok(())
}
