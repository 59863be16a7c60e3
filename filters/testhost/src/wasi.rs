//! The WASI preview1 functions a proxy-wasm module built for
//! `wasm32-wasip1` imports: output captured, environment from the host,
//! time from the test clock, deterministic randomness, no files.

use crate::abi::{errno, Status};
use crate::calls::{HostCall, WasiCall};
use crate::env::Imports;
use crate::guest::{host_call, read, write, write_u32, write_u64, Ctx, Outcome};

const WASI: &str = "wasi_snapshot_preview1";

pub(crate) fn define(i: &mut Imports<'_>) -> Result<(), wasmi::Error> {
    i.wrap(
        WASI,
        "fd_write",
        |mut c: Ctx<'_>, fd: u32, iovs: u32, n: u32, written: u32| {
            host_call(&mut c, "fd_write", |c| fd_write(c, fd, iovs, n, written))
        },
    )?;
    i.wrap(
        WASI,
        "fd_prestat_get",
        |mut c: Ctx<'_>, fd: u32, _ptr: u32| {
            host_call(&mut c, "fd_prestat_get", |_| {
                Ok((
                    wasi(WasiCall::FdPrestatGet { fd }),
                    Status::Errno(errno::BADF),
                ))
            })
        },
    )?;
    i.wrap(WASI, "random_get", |mut c: Ctx<'_>, ptr: u32, len: u32| {
        host_call(&mut c, "random_get", |c| {
            let bytes = c.data_mut().random_bytes(len as usize);
            write(c, ptr, &bytes)?;
            Ok((wasi(WasiCall::RandomGet { len }), Status::Ok))
        })
    })?;
    define_env_and_args(i)?;
    define_clock(i)?;
    i.wrap(WASI, "sched_yield", |mut c: Ctx<'_>| {
        host_call(&mut c, "sched_yield", |_| {
            Ok((wasi(WasiCall::SchedYield), Status::Ok))
        })
    })?;
    i.wrap(
        WASI,
        "proc_exit",
        |mut c: Ctx<'_>, code: u32| -> Result<(), wasmi::Error> {
            c.data_mut()
                .record(wasi(WasiCall::ProcExit { code }), Status::Ok);
            Err(wasmi::Error::i32_exit(code as i32))
        },
    )
}

fn wasi(call: WasiCall) -> HostCall {
    HostCall::Wasi(call)
}

/// Standard output and error are captured; other descriptors do not exist.
fn fd_write(c: &mut Ctx<'_>, fd: u32, iovs: u32, n: u32, written: u32) -> Outcome {
    let mut data = Vec::new();
    for k in 0..n {
        let iov = read(c, iovs + k * 8, 8)?;
        let ptr = u32::from_le_bytes([iov[0], iov[1], iov[2], iov[3]]);
        let len = u32::from_le_bytes([iov[4], iov[5], iov[6], iov[7]]);
        data.extend_from_slice(&read(c, ptr, len)?);
    }
    let s = c.data_mut();
    let sink = match fd {
        1 => &mut s.stdout,
        2 => &mut s.stderr,
        _ => {
            return Ok((
                wasi(WasiCall::FdWrite { fd, data }),
                Status::Errno(errno::BADF),
            ))
        }
    };
    sink.extend_from_slice(&data);
    write_u32(c, written, data.len() as u32)?;
    Ok((wasi(WasiCall::FdWrite { fd, data }), Status::Ok))
}

/// `KEY=VALUE\0` strings of the host's environment.
fn environ(c: &Ctx<'_>) -> Vec<Vec<u8>> {
    c.data()
        .env
        .iter()
        .map(|(k, v)| format!("{k}={v}\0").into_bytes())
        .collect()
}

fn define_env_and_args(i: &mut Imports<'_>) -> Result<(), wasmi::Error> {
    i.wrap(
        WASI,
        "environ_sizes_get",
        |mut c: Ctx<'_>, count: u32, size: u32| {
            host_call(&mut c, "environ_sizes_get", |c| {
                let env = environ(c);
                write_u32(c, count, env.len() as u32)?;
                write_u32(c, size, env.iter().map(Vec::len).sum::<usize>() as u32)?;
                Ok((wasi(WasiCall::EnvironSizesGet), Status::Ok))
            })
        },
    )?;
    i.wrap(
        WASI,
        "environ_get",
        |mut c: Ctx<'_>, ptrs: u32, buf: u32| {
            host_call(&mut c, "environ_get", |c| {
                let mut at = buf;
                for (k, entry) in environ(c).iter().enumerate() {
                    write_u32(c, ptrs + 4 * k as u32, at)?;
                    write(c, at, entry)?;
                    at += entry.len() as u32;
                }
                Ok((wasi(WasiCall::EnvironGet), Status::Ok))
            })
        },
    )?;
    i.wrap(
        WASI,
        "args_sizes_get",
        |mut c: Ctx<'_>, count: u32, size: u32| {
            host_call(&mut c, "args_sizes_get", |c| {
                write_u32(c, count, 0)?;
                write_u32(c, size, 0)?;
                Ok((wasi(WasiCall::ArgsSizesGet), Status::Ok))
            })
        },
    )?;
    i.wrap(WASI, "args_get", |mut c: Ctx<'_>, _ptrs: u32, _buf: u32| {
        host_call(&mut c, "args_get", |_| {
            Ok((wasi(WasiCall::ArgsGet), Status::Ok))
        })
    })
}

fn define_clock(i: &mut Imports<'_>) -> Result<(), wasmi::Error> {
    i.wrap(
        WASI,
        "clock_time_get",
        |mut c: Ctx<'_>, id: u32, _precision: u64, ptr: u32| {
            host_call(&mut c, "clock_time_get", |c| {
                let call = wasi(WasiCall::ClockTimeGet { clock_id: id });
                // realtime, monotonic: the test clock; CPU-time clocks: absent.
                if id > 1 {
                    return Ok((call, Status::Errno(errno::INVAL)));
                }
                let now = c.data().now_ns;
                write_u64(c, ptr, now)?;
                Ok((call, Status::Ok))
            })
        },
    )?;
    i.wrap(
        WASI,
        "clock_res_get",
        |mut c: Ctx<'_>, id: u32, ptr: u32| {
            host_call(&mut c, "clock_res_get", |c| {
                write_u64(c, ptr, 1)?;
                Ok((wasi(WasiCall::ClockResGet { clock_id: id }), Status::Ok))
            })
        },
    )
}
