//! Logging, time, buffers, header maps and properties.

use crate::abi::{BufferType, LogLevel, MapType, Status};
use crate::calls::HostCall;
use crate::guest::{give, host_call, read, read_str, write_u32, write_u64, Abort, Ctx, Outcome};
use crate::headers::Headers;
use crate::state::{filter_state_key, HostState, LogLine};

use super::Imports;

const ENV: &str = "env";

pub(super) fn define(i: &mut Imports<'_>) -> Result<(), wasmi::Error> {
    i.wrap(
        ENV,
        "proxy_log",
        |mut c: Ctx<'_>, level: u32, ptr: u32, len: u32| {
            host_call(&mut c, "proxy_log", |c| log(c, level, ptr, len))
        },
    )?;
    i.wrap(ENV, "proxy_get_log_level", |mut c: Ctx<'_>, ptr: u32| {
        host_call(&mut c, "proxy_get_log_level", |c| {
            let level = c.data().log_level;
            write_u32(c, ptr, level)?;
            Ok((HostCall::GetLogLevel, Status::Ok))
        })
    })?;
    i.wrap(
        ENV,
        "proxy_get_current_time_nanoseconds",
        |mut c: Ctx<'_>, ptr: u32| {
            host_call(&mut c, "proxy_get_current_time_nanoseconds", |c| {
                let now = c.data().now_ns;
                write_u64(c, ptr, now)?;
                Ok((HostCall::GetCurrentTime, Status::Ok))
            })
        },
    )?;
    i.wrap(
        ENV,
        "proxy_set_tick_period_milliseconds",
        |mut c: Ctx<'_>, ms: u32| {
            host_call(&mut c, "proxy_set_tick_period_milliseconds", |c| {
                let s = c.data_mut();
                s.tick_period_ms = ms;
                s.next_tick_ns = s.now_ns + u64::from(ms) * 1_000_000;
                Ok((HostCall::SetTickPeriod { millis: ms }, Status::Ok))
            })
        },
    )?;
    define_buffers(i)?;
    define_headers(i)?;
    define_properties(i)
}

fn log(c: &mut Ctx<'_>, level: u32, ptr: u32, len: u32) -> Outcome {
    let message = read_str(c, ptr, len)?;
    let level = LogLevel::from(level);
    c.data_mut().logs.push(LogLine {
        level,
        message: message.clone(),
    });
    Ok((HostCall::Log { level, message }, Status::Ok))
}

fn define_buffers(i: &mut Imports<'_>) -> Result<(), wasmi::Error> {
    i.wrap(
        ENV,
        "proxy_get_buffer_bytes",
        |mut c: Ctx<'_>, kind: u32, start: u32, max: u32, ptr_ptr: u32, size_ptr: u32| {
            host_call(&mut c, "proxy_get_buffer_bytes", |c| {
                get_buffer(c, BufferType::from(kind), start, max, (ptr_ptr, size_ptr))
            })
        },
    )?;
    i.wrap(
        ENV,
        "proxy_set_buffer_bytes",
        |mut c: Ctx<'_>, kind: u32, start: u32, size: u32, ptr: u32, len: u32| {
            host_call(&mut c, "proxy_set_buffer_bytes", |c| {
                let data = read(c, ptr, len)?;
                let buffer = BufferType::from(kind);
                let status = set_buffer(c.data_mut(), buffer, start as usize, size as usize, &data);
                let call = HostCall::SetBuffer {
                    buffer,
                    start,
                    size,
                    data,
                };
                Ok((call, status))
            })
        },
    )
}

/// Envoy: bytes `[start, start + max)`, cut at the buffer's end; nothing
/// is returned (and the out-pointers are left alone) when that is empty.
fn get_buffer(
    c: &mut Ctx<'_>,
    buffer: BufferType,
    start: u32,
    max: u32,
    out: (u32, u32),
) -> Outcome {
    let call = HostCall::GetBuffer {
        buffer,
        start,
        max_size: max,
    };
    let Some(bytes) = buffer_of(c.data_mut(), buffer) else {
        return Ok((call, Status::NotFound));
    };
    let from = (start as usize).min(bytes.len());
    let to = from.saturating_add(max as usize).min(bytes.len());
    let slice = bytes[from..to].to_vec();
    if !slice.is_empty() {
        give(c, &slice, out.0, out.1)?;
    }
    Ok((call, Status::Ok))
}

fn buffer_of(s: &mut HostState, buffer: BufferType) -> Option<&Vec<u8>> {
    match buffer {
        BufferType::VmConfiguration => s.vm_configuration.as_ref(),
        BufferType::PluginConfiguration => s.plugin_configuration.as_ref(),
        BufferType::HttpCallResponseBody => s.http_call_response.as_ref().map(|r| &r.body),
        BufferType::HttpRequestBody => s.stream()?.request_body.as_ref(),
        BufferType::HttpResponseBody => s.stream()?.response_body.as_ref(),
        _ => None,
    }
}

/// Envoy's `Buffer::copyFrom`: at 0, drain `size` bytes and prepend; at
/// or past the end, append; anything else is refused.
fn set_buffer(
    s: &mut HostState,
    buffer: BufferType,
    start: usize,
    size: usize,
    data: &[u8],
) -> Status {
    let body = match (buffer, s.stream()) {
        (BufferType::HttpRequestBody, Some(st)) => st.request_body.as_mut(),
        (BufferType::HttpResponseBody, Some(st)) => st.response_body.as_mut(),
        _ => None,
    };
    let Some(body) = body else {
        return Status::NotFound;
    };
    if start == 0 {
        body.drain(..size.min(body.len()));
        body.splice(0..0, data.iter().copied());
    } else if start >= body.len() {
        body.extend_from_slice(data);
    } else {
        return Status::BadArgument;
    }
    Status::Ok
}

fn define_headers(i: &mut Imports<'_>) -> Result<(), wasmi::Error> {
    i.wrap(
        ENV,
        "proxy_get_header_map_pairs",
        |mut c: Ctx<'_>, map: u32, ptr_ptr: u32, size_ptr: u32| {
            host_call(&mut c, "proxy_get_header_map_pairs", |c| {
                let map = MapType::from(map);
                let call = HostCall::GetHeaderMapPairs { map };
                let Some(bytes) = map_of(c.data_mut(), map).map(|h| h.serialize()) else {
                    return Ok((call, Status::BadArgument));
                };
                give(c, &bytes, ptr_ptr, size_ptr)?;
                Ok((call, Status::Ok))
            })
        },
    )?;
    i.wrap(
        ENV,
        "proxy_set_header_map_pairs",
        |mut c: Ctx<'_>, map: u32, ptr: u32, len: u32| {
            host_call(&mut c, "proxy_set_header_map_pairs", |c| {
                let map = MapType::from(map);
                let headers = Headers::parse(&read(c, ptr, len)?)
                    .ok_or(Abort::Invalid(Status::ParseFailure))?;
                let status = edit_map(c.data_mut(), map, |h| *h = headers.clone());
                Ok((HostCall::SetHeaderMapPairs { map, headers }, status))
            })
        },
    )?;
    i.wrap(
        ENV,
        "proxy_get_header_map_value",
        |mut c: Ctx<'_>, map: u32, kp: u32, kl: u32, ptr_ptr: u32, size_ptr: u32| {
            host_call(&mut c, "proxy_get_header_map_value", |c| {
                let map = MapType::from(map);
                let name = read(c, kp, kl)?;
                let value = map_of(c.data_mut(), map).map(|h| h.get(&name).map(<[u8]>::to_vec));
                let call = HostCall::GetHeader { map, name };
                match value {
                    None => Ok((call, Status::BadArgument)),
                    Some(None) => Ok((call, Status::NotFound)),
                    Some(Some(v)) => {
                        give(c, &v, ptr_ptr, size_ptr)?;
                        Ok((call, Status::Ok))
                    }
                }
            })
        },
    )?;
    define_header_writes(i)
}

fn define_header_writes(i: &mut Imports<'_>) -> Result<(), wasmi::Error> {
    i.wrap(
        ENV,
        "proxy_add_header_map_value",
        |mut c: Ctx<'_>, map: u32, kp: u32, kl: u32, vp: u32, vl: u32| {
            host_call(&mut c, "proxy_add_header_map_value", |c| {
                let (map, name, value) = (MapType::from(map), read(c, kp, kl)?, read(c, vp, vl)?);
                let status = edit_map(c.data_mut(), map, |h| h.add(&name, &value));
                Ok((HostCall::AddHeader { map, name, value }, status))
            })
        },
    )?;
    i.wrap(
        ENV,
        "proxy_replace_header_map_value",
        |mut c: Ctx<'_>, map: u32, kp: u32, kl: u32, vp: u32, vl: u32| {
            host_call(&mut c, "proxy_replace_header_map_value", |c| {
                let (map, name, value) = (MapType::from(map), read(c, kp, kl)?, read(c, vp, vl)?);
                let status = edit_map(c.data_mut(), map, |h| h.replace(&name, &value));
                Ok((HostCall::ReplaceHeader { map, name, value }, status))
            })
        },
    )?;
    i.wrap(
        ENV,
        "proxy_remove_header_map_value",
        |mut c: Ctx<'_>, map: u32, kp: u32, kl: u32| {
            host_call(&mut c, "proxy_remove_header_map_value", |c| {
                let (map, name) = (MapType::from(map), read(c, kp, kl)?);
                let status = edit_map(c.data_mut(), map, |h| h.remove(&name));
                Ok((HostCall::RemoveHeader { map, name }, status))
            })
        },
    )
}

fn map_of(s: &mut HostState, map: MapType) -> Option<&Headers> {
    match map {
        MapType::HttpCallResponseHeaders => s.http_call_response.as_ref().map(|r| &r.headers),
        MapType::HttpCallResponseTrailers => s.http_call_response.as_ref().map(|r| &r.trailers),
        _ => stream_map(s, map).map(|h| &*h),
    }
}

fn stream_map(s: &mut HostState, map: MapType) -> Option<&mut Headers> {
    let st = s.stream()?;
    match map {
        MapType::RequestHeaders => st.request_headers.as_mut(),
        MapType::RequestTrailers => st.request_trailers.as_mut(),
        MapType::ResponseHeaders => st.response_headers.as_mut(),
        MapType::ResponseTrailers => st.response_trailers.as_mut(),
        _ => None,
    }
}

/// Applies `edit` to a stream's header map; a map that does not exist (yet)
/// is a bad argument, as in Envoy.
fn edit_map(s: &mut HostState, map: MapType, edit: impl FnOnce(&mut Headers)) -> Status {
    match stream_map(s, map) {
        Some(h) => {
            edit(h);
            Status::Ok
        }
        None => Status::BadArgument,
    }
}

fn define_properties(i: &mut Imports<'_>) -> Result<(), wasmi::Error> {
    i.wrap(
        ENV,
        "proxy_get_property",
        |mut c: Ctx<'_>, pp: u32, pl: u32, ptr_ptr: u32, size_ptr: u32| {
            host_call(&mut c, "proxy_get_property", |c| {
                let key = read(c, pp, pl)?;
                let call = HostCall::GetProperty {
                    path: segments(&key),
                };
                match c.data().property(&key) {
                    Some(v) => {
                        give(c, &v, ptr_ptr, size_ptr)?;
                        Ok((call, Status::Ok))
                    }
                    None => Ok((call, Status::NotFound)),
                }
            })
        },
    )?;
    i.wrap(
        ENV,
        "proxy_set_property",
        |mut c: Ctx<'_>, pp: u32, pl: u32, vp: u32, vl: u32| {
            host_call(&mut c, "proxy_set_property", |c| {
                let (key, value) = (read(c, pp, pl)?, read(c, vp, vl)?);
                let status = match c.data_mut().stream() {
                    Some(st) => {
                        st.filter_state
                            .insert(filter_state_key(&key), value.clone());
                        Status::Ok
                    }
                    None => Status::NotFound,
                };
                Ok((
                    HostCall::SetProperty {
                        path: segments(&key),
                        value,
                    },
                    status,
                ))
            })
        },
    )
}

fn segments(key: &[u8]) -> Vec<String> {
    key.split(|&b| b == 0)
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}
