//! HTTP helpers the routes share: response builders, header readers and the
//! bounded body reader.

use std::convert::Infallible;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::combinators::{BoxBody, UnsyncBoxBody};
use http_body_util::{BodyExt, Full, Limited};

use crate::openai::{error_body, error_type_for};

/// Largest request body accepted.
const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;

/// Error type of streamed response bodies; an error aborts the connection.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("stream reset on purpose (x-sim-reset-after / reset_rate)")]
    InjectedReset,
}

/// Body of every response: a whole buffer or an SSE stream.
pub(crate) type Body = BoxBody<Bytes, BodyError>;

/// A whole-buffer response with the given status and content type.
pub(crate) fn full(
    status: StatusCode,
    content_type: &str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut resp = Response::new(
        Full::new(body.into())
            .map_err(|never: Infallible| match never {})
            .boxed(),
    );
    *resp.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    resp
}

pub(crate) fn json_response(status: StatusCode, body: String) -> Response<Body> {
    full(status, "application/json", body)
}

/// vLLM's OpenAI-style error body; `kind` defaults to the status's type.
pub(crate) fn error_response(
    status: u16,
    message: &str,
    kind: Option<&str>,
    param: Option<&str>,
) -> Response<Body> {
    let kind = kind.unwrap_or_else(|| error_type_for(status));
    let status_code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(status_code, error_body(message, kind, param, status))
}

/// Sets a response header, skipping values that are not valid header text.
pub(crate) fn insert_header(resp: &mut Response<Body>, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        resp.headers_mut().insert(name, v);
    }
}

pub(crate) fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

pub(crate) fn header_num<T: std::str::FromStr>(headers: &HeaderMap, name: &str) -> Option<T> {
    header_str(headers, name).and_then(|v| v.parse().ok())
}

/// Why a request body could not be read (the transport's error, as text).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct BodyReadError(String);

/// Body of every request as the handlers see it: the connection's body
/// (or a test's buffer) boxed once on the way in.
pub(crate) type RequestBody = UnsyncBoxBody<Bytes, BodyReadError>;

/// Boxes a request's body into the one type the handlers take.
pub(crate) fn boxed_request<B>(req: Request<B>) -> Request<RequestBody>
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: std::fmt::Display,
{
    req.map(|body| {
        body.map_err(|e| BodyReadError(e.to_string()))
            .boxed_unsync()
    })
}

/// Reads the whole request body (at most [`MAX_BODY_BYTES`]), or answers 400.
pub(crate) async fn read_body(
    req: Request<RequestBody>,
) -> Result<(http::request::Parts, Bytes), Response<Body>> {
    let (parts, body) = req.into_parts();
    match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(c) => Ok((parts, c.to_bytes())),
        Err(e) => Err(error_response(
            400,
            &format!("could not read request body: {e}"),
            None,
            None,
        )),
    }
}
