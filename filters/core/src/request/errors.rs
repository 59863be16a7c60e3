//! What Envoy says about how a request ended, decoded into an [`ErrorType`].

use super::ErrorType;

/// Envoy serialises integer attributes as 8 little-endian bytes.
pub fn decode_u64(v: &[u8]) -> Option<u64> {
    match v.len() {
        8 => Some(u64::from_le_bytes([
            v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7],
        ])),
        _ => std::str::from_utf8(v).ok()?.trim().parse().ok(),
    }
}

/// Envoy response flags (`StreamInfo::CoreResponseFlag` bit positions) used
/// to recognise timeouts and client aborts.
pub mod response_flags {
    pub const UPSTREAM_REQUEST_TIMEOUT: u64 = 1 << 2;
    pub const DOWNSTREAM_CONNECTION_TERMINATION: u64 = 1 << 14;
    pub const STREAM_IDLE_TIMEOUT: u64 = 1 << 16;
    pub const UPSTREAM_MAX_STREAM_DURATION_REACHED: u64 = 1 << 19;
    pub const DURATION_TIMEOUT: u64 = 1 << 22;
    pub const DOWNSTREAM_REMOTE_RESET: u64 = 1 << 28;
}

/// Maps what Envoy knows about the end of a request to an [`ErrorType`].
pub fn classify_error(
    status: Option<u16>,
    details: Option<&str>,
    flags: u64,
    stream_error_event: bool,
    stream_cut_mid_event: bool,
) -> Option<ErrorType> {
    use response_flags::*;
    let details = details.unwrap_or("");
    let status = status.unwrap_or(0);
    if flags & (DOWNSTREAM_CONNECTION_TERMINATION | DOWNSTREAM_REMOTE_RESET) != 0
        || details.starts_with("downstream_remote_disconnect")
    {
        return Some(ErrorType::ClientAbort);
    }
    if flags
        & (UPSTREAM_REQUEST_TIMEOUT
            | STREAM_IDLE_TIMEOUT
            | UPSTREAM_MAX_STREAM_DURATION_REACHED
            | DURATION_TIMEOUT)
        != 0
        || details.contains("timeout")
        || details.contains("max_stream_duration")
        || details.contains("duration_reached")
    {
        return Some(ErrorType::Timeout);
    }
    if details.starts_with("upstream_reset_after_response_started") {
        return Some(ErrorType::UpstreamReset);
    }
    let via_upstream = details.is_empty() || details == "via_upstream";
    if via_upstream {
        if status >= 500 {
            return Some(ErrorType::Upstream5xx);
        }
        if (400..500).contains(&status) {
            return Some(ErrorType::Upstream4xx);
        }
        if stream_error_event {
            return Some(ErrorType::StreamError);
        }
        if stream_cut_mid_event {
            return Some(ErrorType::UpstreamReset);
        }
        return None;
    }
    if status >= 400 || details.starts_with("upstream_reset_before_response_started") {
        return Some(ErrorType::GatewayReply);
    }
    if stream_error_event {
        return Some(ErrorType::StreamError);
    }
    None
}
