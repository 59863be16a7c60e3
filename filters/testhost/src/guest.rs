//! Guest memory access from host functions, and the wrapper that records
//! each call and turns its outcome into the status the module receives.

use wasmi::{Caller, Extern, Memory};

use crate::abi::Status;
use crate::calls::HostCall;
use crate::state::HostState;

pub(crate) type Ctx<'a> = Caller<'a, HostState>;

/// Why a host call did not complete normally.
pub(crate) enum Abort {
    /// Bad pointer or malformed serialized argument: the module gets
    /// `status`, and the call is recorded as [`HostCall::Invalid`].
    Invalid(Status),
    /// The module trapped inside a nested call (its allocator).
    Trap(wasmi::Error),
}

impl From<wasmi::Error> for Abort {
    fn from(e: wasmi::Error) -> Self {
        Abort::Trap(e)
    }
}

pub(crate) type Outcome = Result<(HostCall, Status), Abort>;

/// Runs a host function body, records what it did, and returns its status.
pub(crate) fn host_call(
    c: &mut Ctx<'_>,
    function: &'static str,
    body: impl FnOnce(&mut Ctx<'_>) -> Outcome,
) -> Result<u32, wasmi::Error> {
    match body(c) {
        Ok((call, status)) => {
            c.data_mut().record(call, status);
            Ok(status.code())
        }
        Err(Abort::Invalid(status)) => {
            c.data_mut().record(HostCall::Invalid { function }, status);
            Ok(status.code())
        }
        Err(Abort::Trap(e)) => Err(e),
    }
}

fn memory(c: &Ctx<'_>) -> Result<Memory, Abort> {
    c.get_export("memory")
        .and_then(Extern::into_memory)
        .ok_or_else(|| Abort::Trap(wasmi::Error::new("the module exports no `memory`")))
}

/// `len` bytes at `ptr`.
pub(crate) fn read(c: &Ctx<'_>, ptr: u32, len: u32) -> Result<Vec<u8>, Abort> {
    let mut buf = vec![0u8; len as usize];
    memory(c)?
        .read(c, ptr as usize, &mut buf)
        .map_err(|_| Abort::Invalid(Status::InvalidMemoryAccess))?;
    Ok(buf)
}

/// `len` bytes at `ptr` as (lossy) UTF-8.
pub(crate) fn read_str(c: &Ctx<'_>, ptr: u32, len: u32) -> Result<String, Abort> {
    Ok(String::from_utf8_lossy(&read(c, ptr, len)?).into_owned())
}

pub(crate) fn write(c: &mut Ctx<'_>, ptr: u32, data: &[u8]) -> Result<(), Abort> {
    memory(c)?
        .write(c, ptr as usize, data)
        .map_err(|_| Abort::Invalid(Status::InvalidMemoryAccess))
}

pub(crate) fn write_u32(c: &mut Ctx<'_>, ptr: u32, v: u32) -> Result<(), Abort> {
    write(c, ptr, &v.to_le_bytes())
}

pub(crate) fn write_u64(c: &mut Ctx<'_>, ptr: u32, v: u64) -> Result<(), Abort> {
    write(c, ptr, &v.to_le_bytes())
}

/// Hands `data` to the module as Envoy does: in memory obtained from the
/// module's `proxy_on_memory_allocate` (the module frees it), pointer and
/// size stored at `ptr_ptr` / `size_ptr`; empty data is a null pointer.
pub(crate) fn give(c: &mut Ctx<'_>, data: &[u8], ptr_ptr: u32, size_ptr: u32) -> Result<(), Abort> {
    let size = u32::try_from(data.len()).map_err(|_| Abort::Invalid(Status::BadArgument))?;
    let mut addr = 0;
    if size > 0 {
        addr = allocate(c, size)?;
        write(c, addr, data)?;
    }
    write_u32(c, ptr_ptr, addr)?;
    write_u32(c, size_ptr, size)
}

fn allocate(c: &mut Ctx<'_>, size: u32) -> Result<u32, Abort> {
    let alloc = c
        .get_export("proxy_on_memory_allocate")
        .and_then(Extern::into_func)
        .ok_or_else(|| wasmi::Error::new("the module exports no `proxy_on_memory_allocate`"))?
        .typed::<u32, u32>(&*c)?;
    let addr = alloc.call(&mut *c, size)?;
    if addr == 0 {
        return Err(Abort::Invalid(Status::InvalidMemoryAccess));
    }
    Ok(addr)
}
