//! Outgoing HTTP calls, stream control, local replies and contexts.

use crate::abi::{Status, StreamType};
use crate::calls::HostCall;
use crate::guest::{host_call, read, read_str, write_u32, Abort, Ctx, Outcome};
use crate::headers::Headers;
use crate::state::{HttpCall, LocalResponse, Side};

use super::Imports;

const ENV: &str = "env";

pub(super) fn define(i: &mut Imports<'_>) -> Result<(), wasmi::Error> {
    i.wrap(
        ENV,
        "proxy_http_call",
        |mut c: Ctx<'_>,
         up: u32,
         ul: u32,
         hp: u32,
         hl: u32,
         bp: u32,
         bl: u32,
         tp: u32,
         tl: u32,
         timeout_ms: u32,
         token_ptr: u32| {
            host_call(&mut c, "proxy_http_call", |c| {
                let request = HttpCall {
                    token: 0,
                    context_id: c.data().effective,
                    upstream: read_str(c, up, ul)?,
                    headers: parse_headers(&read(c, hp, hl)?)?,
                    body: read(c, bp, bl)?,
                    timeout_ms,
                    answered: false,
                };
                let trailers = parse_headers(&read(c, tp, tl)?)?;
                http_call(c, request, trailers, token_ptr)
            })
        },
    )?;
    define_stream_control(i)?;
    define_contexts(i)
}

fn parse_headers(bytes: &[u8]) -> Result<Headers, Abort> {
    Headers::parse(bytes).ok_or(Abort::Invalid(Status::ParseFailure))
}

/// Envoy refuses unknown clusters and calls without `:method`, `:path`
/// and `:authority`; an accepted call gets a token and waits for
/// [`crate::TestHost::http_call_response`].
fn http_call(c: &mut Ctx<'_>, mut request: HttpCall, trailers: Headers, token_ptr: u32) -> Outcome {
    let s = c.data();
    let pseudo = [":method", ":path", ":authority"];
    let accepted = s.clusters.contains(&request.upstream)
        && pseudo.iter().all(|p| request.headers.get(p).is_some());
    request.token = s.http_calls.len() as u32 + 1;
    let call = HostCall::HttpCall {
        upstream: request.upstream.clone(),
        headers: request.headers.clone(),
        body: request.body.clone(),
        trailers,
        timeout_ms: request.timeout_ms,
    };
    if !accepted {
        return Ok((call, Status::BadArgument));
    }
    write_u32(c, token_ptr, request.token)?;
    c.data_mut().http_calls.push(request);
    Ok((call, Status::Ok))
}

fn define_stream_control(i: &mut Imports<'_>) -> Result<(), wasmi::Error> {
    i.wrap(
        ENV,
        "proxy_continue_stream",
        |mut c: Ctx<'_>, stream: u32| {
            host_call(&mut c, "proxy_continue_stream", |c| {
                let stream = StreamType::from(stream);
                let side = match stream {
                    StreamType::Request => Some(Side::Request),
                    StreamType::Response => Some(Side::Response),
                    _ => None,
                };
                let status = match (c.data_mut().stream(), side) {
                    (Some(st), Some(side)) => {
                        st.release(side);
                        Status::Ok
                    }
                    _ => Status::BadArgument,
                };
                Ok((HostCall::ContinueStream { stream }, status))
            })
        },
    )?;
    i.wrap(ENV, "proxy_close_stream", |mut c: Ctx<'_>, stream: u32| {
        host_call(&mut c, "proxy_close_stream", |c| {
            let status = match c.data_mut().stream() {
                Some(_) => Status::Ok,
                None => Status::BadArgument,
            };
            Ok((
                HostCall::CloseStream {
                    stream: StreamType::from(stream),
                },
                status,
            ))
        })
    })?;
    i.wrap(
        ENV,
        "proxy_send_local_response",
        |mut c: Ctx<'_>,
         status: u32,
         dp: u32,
         dl: u32,
         bp: u32,
         bl: u32,
         hp: u32,
         hl: u32,
         grpc: i32| {
            host_call(&mut c, "proxy_send_local_response", |c| {
                let response = LocalResponse {
                    status,
                    details: read_str(c, dp, dl)?,
                    body: read(c, bp, bl)?,
                    headers: parse_headers(&read(c, hp, hl)?)?,
                };
                let call = HostCall::SendLocalResponse {
                    status,
                    details: response.details.clone(),
                    body: response.body.clone(),
                    headers: response.headers.clone(),
                    grpc_status: grpc,
                };
                let result = match c.data_mut().stream() {
                    Some(st) => {
                        st.local_response = Some(response);
                        Status::Ok
                    }
                    None => Status::BadArgument,
                };
                Ok((call, result))
            })
        },
    )
}

fn define_contexts(i: &mut Imports<'_>) -> Result<(), wasmi::Error> {
    i.wrap(
        ENV,
        "proxy_set_effective_context",
        |mut c: Ctx<'_>, id: u32| {
            host_call(&mut c, "proxy_set_effective_context", |c| {
                let s = c.data_mut();
                let known = id == s.root_id || s.streams.contains_key(&id);
                let status = if known {
                    s.effective = id;
                    Status::Ok
                } else {
                    Status::BadArgument
                };
                Ok((HostCall::SetEffectiveContext { context_id: id }, status))
            })
        },
    )?;
    i.wrap(ENV, "proxy_done", |mut c: Ctx<'_>| {
        host_call(&mut c, "proxy_done", |_| Ok((HostCall::Done, Status::Ok)))
    })?;
    i.wrap(
        ENV,
        "proxy_call_foreign_function",
        |mut c: Ctx<'_>, np: u32, nl: u32, _ap: u32, _al: u32, _rp: u32, _rl: u32| {
            host_call(&mut c, "proxy_call_foreign_function", |c| {
                let name = read_str(c, np, nl)?;
                Ok((HostCall::CallForeignFunction { name }, Status::NotFound))
            })
        },
    )
}
