//! What Envoy says about how a request ended, decoded into an [`ErrorType`].
//!
//! The classes follow what the client was told: a local reply for an
//! upstream that could not be reached is `upstream_unavailable` (the body
//! Envoy's `local_reply_config` sends says so too), never `timeout`, even
//! when the connect attempt is what timed out. `docs/metrics.md` ("Error
//! types") is the table of this file; keep the two together.

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

/// Envoy's `response.flags` attribute: bit `1 << n` for each
/// `StreamInfo::CoreResponseFlag` `n` set on the stream (the enum in
/// `envoy/stream_info/stream_info.h`, in declaration order; Envoy's
/// `legacyResponseFlags()`). The access-log short name is in each comment.
pub mod response_flags {
    /// `LH`: the local health check failed.
    pub const FAILED_LOCAL_HEALTH_CHECK: u64 = 1 << 0;
    /// `UH`: no healthy upstream host.
    pub const NO_HEALTHY_UPSTREAM: u64 = 1 << 1;
    /// `UT`: the route (or per-try) timeout fired.
    pub const UPSTREAM_REQUEST_TIMEOUT: u64 = 1 << 2;
    /// `LR`: Envoy reset the upstream stream.
    pub const LOCAL_RESET: u64 = 1 << 3;
    /// `UR`: the upstream reset the stream.
    pub const UPSTREAM_REMOTE_RESET: u64 = 1 << 4;
    /// `UF`: the upstream connection could not be made (refused, timed out).
    pub const UPSTREAM_CONNECTION_FAILURE: u64 = 1 << 5;
    /// `UC`: the upstream connection closed under the stream.
    pub const UPSTREAM_CONNECTION_TERMINATION: u64 = 1 << 6;
    /// `UO`: a circuit breaker (pending requests, connections) overflowed,
    /// or the cluster is in maintenance mode.
    pub const UPSTREAM_OVERFLOW: u64 = 1 << 7;
    /// `NR`: no route matched.
    pub const NO_ROUTE_FOUND: u64 = 1 << 8;
    /// `DI`: fault injection delayed the request.
    pub const DELAY_INJECTED: u64 = 1 << 9;
    /// `FI`: fault injection aborted the request.
    pub const FAULT_INJECTED: u64 = 1 << 10;
    /// `RL`: Envoy's rate limit refused the request.
    pub const RATE_LIMITED: u64 = 1 << 11;
    /// `UAEX`: external authorization denied the request.
    pub const UNAUTHORIZED_EXTERNAL_SERVICE: u64 = 1 << 12;
    /// `RLSE`: the rate limit service could not be called.
    pub const RATE_LIMIT_SERVICE_ERROR: u64 = 1 << 13;
    /// `DC`: the downstream connection closed.
    pub const DOWNSTREAM_CONNECTION_TERMINATION: u64 = 1 << 14;
    /// `URX`: retries (or connect attempts) ran out.
    pub const UPSTREAM_RETRY_LIMIT_EXCEEDED: u64 = 1 << 15;
    /// `SI`: the stream idle timeout fired.
    pub const STREAM_IDLE_TIMEOUT: u64 = 1 << 16;
    /// `IH`: `x-envoy-*` request headers failed strict checks.
    pub const INVALID_ENVOY_REQUEST_HEADERS: u64 = 1 << 17;
    /// `DPE`: the downstream request broke HTTP.
    pub const DOWNSTREAM_PROTOCOL_ERROR: u64 = 1 << 18;
    /// `UMSDR`: the upstream stream reached its max duration.
    pub const UPSTREAM_MAX_STREAM_DURATION_REACHED: u64 = 1 << 19;
    /// `RFCF`: served from Envoy's cache filter.
    pub const RESPONSE_FROM_CACHE_FILTER: u64 = 1 << 20;
    /// `NFCF`: a filter configuration never arrived.
    pub const NO_FILTER_CONFIG_FOUND: u64 = 1 << 21;
    /// `DT`: the request's max duration (downstream) was reached.
    pub const DURATION_TIMEOUT: u64 = 1 << 22;
    /// `UPE`: the upstream response broke HTTP.
    pub const UPSTREAM_PROTOCOL_ERROR: u64 = 1 << 23;
    /// `NC`: the route's cluster does not exist.
    pub const NO_CLUSTER_FOUND: u64 = 1 << 24;
    /// `OM`: Envoy's overload manager shed the stream.
    pub const OVERLOAD_MANAGER: u64 = 1 << 25;
    /// `DF`: DNS resolution of the upstream failed.
    pub const DNS_RESOLUTION_FAILED: u64 = 1 << 26;
    /// `DO`: the cluster's `drop_overload` dropped the request.
    pub const DROP_OVERLOAD: u64 = 1 << 27;
    /// `DR`: the downstream reset the stream.
    pub const DOWNSTREAM_REMOTE_RESET: u64 = 1 << 28;
    /// `UDO`: `drop_overload` at 100% dropped the request.
    pub const UNCONDITIONAL_DROP_OVERLOAD: u64 = 1 << 29;

    /// The client went away.
    pub const CLIENT_ABORT: u64 = DOWNSTREAM_CONNECTION_TERMINATION | DOWNSTREAM_REMOTE_RESET;
    /// No upstream could be reached.
    pub const UNAVAILABLE: u64 = NO_HEALTHY_UPSTREAM
        | UPSTREAM_CONNECTION_FAILURE
        | NO_CLUSTER_FOUND
        | DNS_RESOLUTION_FAILED;
    /// The gateway shed load before a runtime saw the request.
    pub const OVERLOADED: u64 =
        UPSTREAM_OVERFLOW | OVERLOAD_MANAGER | DROP_OVERLOAD | UNCONDITIONAL_DROP_OVERLOAD;
    /// A request that was being served ran out of time.
    pub const TIMEOUT: u64 = UPSTREAM_REQUEST_TIMEOUT
        | STREAM_IDLE_TIMEOUT
        | UPSTREAM_MAX_STREAM_DURATION_REACHED
        | DURATION_TIMEOUT;
    /// The upstream connection or stream broke.
    pub const RESET: u64 = UPSTREAM_REMOTE_RESET
        | UPSTREAM_CONNECTION_TERMINATION
        | LOCAL_RESET
        | UPSTREAM_PROTOCOL_ERROR;
}

/// Maps what Envoy knows about the end of a request to an [`ErrorType`].
///
/// `details` is `response.code_details`: it names the reason of the reply the
/// client actually got, so it decides first. `flags` accumulate over the
/// stream (a retried request carries the flags of every try), so they decide
/// only when the details are absent or not Envoy's core values.
pub fn classify_error(
    status: Option<u16>,
    details: Option<&str>,
    flags: u64,
    stream_error_event: bool,
    stream_cut_mid_event: bool,
) -> Option<ErrorType> {
    let details = details.unwrap_or("");
    let status = status.unwrap_or(0);
    if flags & response_flags::CLIENT_ABORT != 0
        || details.starts_with("downstream_remote_disconnect")
    {
        return Some(ErrorType::ClientAbort);
    }
    if details == "via_upstream" {
        return answered_by_upstream(status, stream_error_event, stream_cut_mid_event);
    }
    if let Some(class) = from_details(details).or_else(|| from_flags(flags)) {
        return Some(class);
    }
    if details.is_empty() {
        // Nothing says Envoy answered: the status is the runtime's.
        return answered_by_upstream(status, stream_error_event, stream_cut_mid_event);
    }
    if status >= 400 {
        return Some(ErrorType::GatewayReply);
    }
    if stream_error_event {
        return Some(ErrorType::StreamError);
    }
    None
}

/// The runtime's own response: its status, or what its stream showed.
fn answered_by_upstream(status: u16, stream_error: bool, cut_mid_event: bool) -> Option<ErrorType> {
    if status >= 500 {
        Some(ErrorType::Upstream5xx)
    } else if status >= 400 {
        Some(ErrorType::Upstream4xx)
    } else if stream_error {
        Some(ErrorType::StreamError)
    } else if cut_mid_event {
        Some(ErrorType::UpstreamReset)
    } else {
        None
    }
}

/// Envoy's core `ResponseCodeDetails` values (and the rate limit filters').
fn from_details(details: &str) -> Option<ErrorType> {
    if let Some(reason) = details.strip_prefix("upstream_reset_before_response_started") {
        return Some(reset_before_response(reason));
    }
    if details.starts_with("upstream_reset_after_response_started") {
        return Some(ErrorType::UpstreamReset);
    }
    let class = match details {
        "no_healthy_upstream" | "cluster_not_found" => ErrorType::UpstreamUnavailable,
        "overload" | "maintenance_mode" | "drop_overload" | "unconditional_drop_overload" => {
            ErrorType::Overloaded
        }
        "response_timeout"
        | "upstream_per_try_timeout"
        | "upstream_per_try_idle_timeout"
        | "upstream_max_stream_duration_reached"
        | "stream_idle_timeout"
        | "max_duration_timeout"
        | "duration_timeout"
        | "request_overall_timeout"
        | "request_header_timeout"
        | "downstream_header_timeout" => ErrorType::Timeout,
        "local_rate_limited" | "request_rate_limited" => ErrorType::RateLimited,
        _ => return None,
    };
    Some(class)
}

/// `upstream_reset_before_response_started{reason}`: the reason is Envoy's
/// `StreamResetReason`, possibly followed by `|transport failure reason`.
/// Connection failures (refused, timed out) mean nothing was reached;
/// overflow is a circuit breaker; anything else is a connection that was
/// made and then broke.
fn reset_before_response(reason: &str) -> ErrorType {
    let reason = reason.trim_start_matches('{');
    let reason = reason.split(['|', '}']).next().unwrap_or("");
    match reason {
        "connection_timeout"
        | "connection_failure"
        | "local_connection_failure"
        | "remote_connection_failure" => ErrorType::UpstreamUnavailable,
        "overflow" | "overload_manager_reset" => ErrorType::Overloaded,
        _ => ErrorType::UpstreamReset,
    }
}

/// The class of the first matching flag group, for details this file does
/// not know (an extension's, or none).
fn from_flags(flags: u64) -> Option<ErrorType> {
    use response_flags::*;
    [
        (TIMEOUT, ErrorType::Timeout),
        (UNAVAILABLE, ErrorType::UpstreamUnavailable),
        (OVERLOADED, ErrorType::Overloaded),
        (RESET, ErrorType::UpstreamReset),
        (RATE_LIMITED, ErrorType::RateLimited),
        // Retries ran out with no more telling flag: nothing answered.
        (
            UPSTREAM_RETRY_LIMIT_EXCEEDED,
            ErrorType::UpstreamUnavailable,
        ),
    ]
    .into_iter()
    .find(|(mask, _)| flags & mask != 0)
    .map(|(_, class)| class)
}
