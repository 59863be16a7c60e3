//! Stats, shared data (with CAS) and shared queues.

use crate::abi::{MetricKind, Status};
use crate::calls::HostCall;
use crate::guest::{give, host_call, read, read_str, write_u32, write_u64, Ctx, Outcome};

use super::Imports;

const ENV: &str = "env";

pub(super) fn define(i: &mut Imports<'_>) -> Result<(), wasmi::Error> {
    define_metrics(i)?;
    define_shared_data(i)?;
    define_queues(i)
}

fn define_metrics(i: &mut Imports<'_>) -> Result<(), wasmi::Error> {
    i.wrap(
        ENV,
        "proxy_define_metric",
        |mut c: Ctx<'_>, kind: u32, np: u32, nl: u32, id_ptr: u32| {
            host_call(&mut c, "proxy_define_metric", |c| {
                let (kind, name) = (MetricKind::from_code(kind), read_str(c, np, nl)?);
                let call = HostCall::DefineMetric {
                    kind,
                    name: name.clone(),
                };
                let Some(k) = kind else {
                    return Ok((call, Status::BadArgument));
                };
                let id = c.data_mut().metrics.define(k, &name);
                write_u32(c, id_ptr, id)?;
                Ok((call, Status::Ok))
            })
        },
    )?;
    i.wrap(
        ENV,
        "proxy_increment_metric",
        |mut c: Ctx<'_>, id: u32, offset: i64| {
            host_call(&mut c, "proxy_increment_metric", |c| {
                let status = c.data_mut().metrics.increment(id, offset);
                Ok((HostCall::IncrementMetric { id, offset }, status))
            })
        },
    )?;
    i.wrap(
        ENV,
        "proxy_record_metric",
        |mut c: Ctx<'_>, id: u32, value: u64| {
            host_call(&mut c, "proxy_record_metric", |c| {
                let status = c.data_mut().metrics.record(id, value);
                Ok((HostCall::RecordMetric { id, value }, status))
            })
        },
    )?;
    i.wrap(
        ENV,
        "proxy_get_metric",
        |mut c: Ctx<'_>, id: u32, ptr: u32| {
            host_call(&mut c, "proxy_get_metric", |c| {
                let status = match c.data_mut().metrics.read(id) {
                    Ok(v) => {
                        write_u64(c, ptr, v)?;
                        Status::Ok
                    }
                    Err(s) => s,
                };
                Ok((HostCall::GetMetric { id }, status))
            })
        },
    )
}

fn define_shared_data(i: &mut Imports<'_>) -> Result<(), wasmi::Error> {
    i.wrap(
        ENV,
        "proxy_get_shared_data",
        |mut c: Ctx<'_>, kp: u32, kl: u32, ptr_ptr: u32, size_ptr: u32, cas_ptr: u32| {
            host_call(&mut c, "proxy_get_shared_data", |c| {
                let key = read_str(c, kp, kl)?;
                let found = c.data().shared_data.get(&key).cloned();
                let call = HostCall::GetSharedData { key };
                let Some((value, cas)) = found else {
                    return Ok((call, Status::NotFound));
                };
                give(c, &value, ptr_ptr, size_ptr)?;
                write_u32(c, cas_ptr, cas)?;
                Ok((call, Status::Ok))
            })
        },
    )?;
    i.wrap(
        ENV,
        "proxy_set_shared_data",
        |mut c: Ctx<'_>, kp: u32, kl: u32, vp: u32, vl: u32, cas: u32| {
            host_call(&mut c, "proxy_set_shared_data", |c| {
                set_shared(c, (kp, kl), (vp, vl), cas)
            })
        },
    )
}

/// Envoy: a non-zero `cas` must match the stored one; every write gets a
/// new CAS.
fn set_shared(c: &mut Ctx<'_>, key: (u32, u32), value: (u32, u32), cas: u32) -> Outcome {
    let (key, value) = (read_str(c, key.0, key.1)?, read(c, value.0, value.1)?);
    let s = c.data_mut();
    let current = s.shared_data.get(&key).map(|(_, cas)| *cas);
    let status = match current {
        Some(stored) if cas != 0 && cas != stored => Status::CasMismatch,
        _ => {
            let next = s.bump_cas();
            s.shared_data.insert(key.clone(), (value.clone(), next));
            Status::Ok
        }
    };
    Ok((HostCall::SetSharedData { key, value, cas }, status))
}

fn define_queues(i: &mut Imports<'_>) -> Result<(), wasmi::Error> {
    i.wrap(
        ENV,
        "proxy_register_shared_queue",
        |mut c: Ctx<'_>, np: u32, nl: u32, id_ptr: u32| {
            host_call(&mut c, "proxy_register_shared_queue", |c| {
                let name = read_str(c, np, nl)?;
                let queues = &mut c.data_mut().queues;
                let index = match queues.iter().position(|(n, _)| *n == name) {
                    Some(i) => i,
                    None => {
                        queues.push((name.clone(), Vec::new()));
                        queues.len() - 1
                    }
                };
                write_u32(c, id_ptr, index as u32 + 1)?;
                Ok((HostCall::RegisterSharedQueue { name }, Status::Ok))
            })
        },
    )?;
    i.wrap(
        ENV,
        "proxy_resolve_shared_queue",
        |mut c: Ctx<'_>, vp: u32, vl: u32, np: u32, nl: u32, id_ptr: u32| {
            host_call(&mut c, "proxy_resolve_shared_queue", |c| {
                let (vm_id, name) = (read_str(c, vp, vl)?, read_str(c, np, nl)?);
                let index = c.data().queues.iter().position(|(n, _)| *n == name);
                let status = match index {
                    Some(i) => {
                        write_u32(c, id_ptr, i as u32 + 1)?;
                        Status::Ok
                    }
                    None => Status::NotFound,
                };
                Ok((HostCall::ResolveSharedQueue { vm_id, name }, status))
            })
        },
    )?;
    i.wrap(
        ENV,
        "proxy_enqueue_shared_queue",
        |mut c: Ctx<'_>, id: u32, dp: u32, dl: u32| {
            host_call(&mut c, "proxy_enqueue_shared_queue", |c| {
                let data = read(c, dp, dl)?;
                let queue = c.data_mut().queues.get_mut(id.wrapping_sub(1) as usize);
                let status = match queue {
                    Some((_, items)) => {
                        items.push(data.clone());
                        Status::Ok
                    }
                    None => Status::NotFound,
                };
                Ok((HostCall::EnqueueSharedQueue { queue: id, data }, status))
            })
        },
    )?;
    i.wrap(
        ENV,
        "proxy_dequeue_shared_queue",
        |mut c: Ctx<'_>, id: u32, ptr_ptr: u32, size_ptr: u32| {
            host_call(&mut c, "proxy_dequeue_shared_queue", |c| {
                dequeue(c, id, ptr_ptr, size_ptr)
            })
        },
    )
}

fn dequeue(c: &mut Ctx<'_>, id: u32, ptr_ptr: u32, size_ptr: u32) -> Outcome {
    let call = HostCall::DequeueSharedQueue { queue: id };
    let Some((_, items)) = c.data_mut().queues.get_mut(id.wrapping_sub(1) as usize) else {
        return Ok((call, Status::NotFound));
    };
    if items.is_empty() {
        return Ok((call, Status::Empty));
    }
    let item = items.remove(0);
    give(c, &item, ptr_ptr, size_ptr)?;
    Ok((call, Status::Ok))
}
