//! The HTTP side: `/metrics` (Prometheus text 0.0.4 or OpenMetrics 1.0,
//! chosen from `Accept`, always with an explicit `Content-Type`, which
//! Prometheus 3 requires) and `/healthz`.

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::metrics::SnapshotCell;

pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Text,
    OpenMetrics,
}

/// Picks the exposition format from an `Accept` header: OpenMetrics when the
/// client ranks it at least as high as plain text, text otherwise.
pub fn negotiate(accept: Option<&str>) -> Format {
    let Some(accept) = accept else {
        return Format::Text;
    };
    let mut best_openmetrics: f32 = -1.0;
    let mut best_text: f32 = -1.0;
    for range in accept.split(',') {
        let mut parts = range.split(';');
        let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let mut q: f32 = 1.0;
        let mut version: Option<String> = None;
        for param in parts {
            let Some((key, value)) = param.split_once('=') else {
                continue;
            };
            let value = value.trim().trim_matches('"');
            match key.trim().to_ascii_lowercase().as_str() {
                "q" => q = value.parse().unwrap_or(0.0),
                "version" => version = Some(value.to_string()),
                _ => {}
            }
        }
        if q.is_nan() || q <= 0.0 {
            continue;
        }
        match media.as_str() {
            "application/openmetrics-text"
                if matches!(version.as_deref(), None | Some("1.0.0") | Some("0.0.1")) =>
            {
                best_openmetrics = best_openmetrics.max(q)
            }
            "text/plain" | "*/*" | "text/*" => best_text = best_text.max(q),
            _ => {}
        }
    }
    if best_openmetrics >= 0.0 && best_openmetrics >= best_text {
        Format::OpenMetrics
    } else {
        Format::Text
    }
}

/// What the handlers share.
pub struct AppState {
    pub registry: Registry,
    pub snapshot: Arc<SnapshotCell>,
    /// `/healthz` fails when no pass completed for this long.
    pub stall_after: Duration,
    /// Size of the last exposition, to size the next buffer.
    pub last_size: AtomicUsize,
}

impl AppState {
    pub fn render(&self, format: Format) -> Result<String, std::fmt::Error> {
        let mut out = String::with_capacity(self.last_size.load(Ordering::Relaxed) + 1024);
        match format {
            Format::Text => {
                prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)?
            }
            Format::OpenMetrics => {
                prometheus_client::encoding::text::encode(&mut out, &self.registry)?
            }
        }
        self.last_size.store(out.len(), Ordering::Relaxed);
        Ok(out)
    }

    /// Healthy while passes keep completing (a hung NVML call stalls them).
    fn health(&self) -> (StatusCode, String) {
        let snap = self.snapshot.load();
        if snap.collections_total == 0 {
            return (StatusCode::OK, "starting\n".into());
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let age = now - snap.last_collection_unix_seconds;
        if age > self.stall_after.as_secs_f64() {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("collection stalled: last pass {age:.0}s ago\n"),
            )
        } else {
            (StatusCode::OK, "ok\n".into())
        }
    }
}

fn response(
    status: StatusCode,
    content_type: &str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    if let Ok(value) = header::HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(header::CONTENT_TYPE, value);
    }
    resp
}

pub fn handle(state: &AppState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return response(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "GET only\n",
        );
    }
    match req.uri().path() {
        "/metrics" => {
            let accept = req
                .headers()
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok());
            let format = negotiate(accept);
            match state.render(format) {
                Ok(body) => {
                    let content_type = match format {
                        Format::Text => TEXT_CONTENT_TYPE,
                        Format::OpenMetrics => OPENMETRICS_CONTENT_TYPE,
                    };
                    response(StatusCode::OK, content_type, body)
                }
                Err(_) => response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain; charset=utf-8",
                    "encoding failed\n",
                ),
            }
        }
        "/healthz" => {
            let (status, body) = state.health();
            response(status, "text/plain; charset=utf-8", body)
        }
        "/" => response(
            StatusCode::OK,
            "text/plain; charset=utf-8",
            "tokentap gpu-exporter: /metrics, /healthz\n",
        ),
        _ => response(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found\n",
        ),
    }
}

/// Serves until `shutdown` resolves. Each connection is handled on the
/// current runtime; handlers never block (they encode a snapshot).
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let resp = handle(&state, &req);
                async move { Ok::<_, Infallible>(resp) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn negotiation() {
        assert_eq!(negotiate(None), Format::Text);
        assert_eq!(negotiate(Some("text/plain")), Format::Text);
        assert_eq!(
            negotiate(Some(
                "application/openmetrics-text; version=1.0.0; charset=utf-8"
            )),
            Format::OpenMetrics
        );
        // Prometheus 3's default scrape protocols header.
        assert_eq!(
            negotiate(Some("application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=1.0.0;escaping=allow-utf-8;q=0.3,text/plain;version=0.0.4;q=0.2,*/*;q=0.1")),
            Format::OpenMetrics
        );
        // Prometheus configured for text first.
        assert_eq!(
            negotiate(Some(
                "text/plain;version=0.0.4;q=0.9,application/openmetrics-text;version=1.0.0;q=0.5"
            )),
            Format::Text
        );
        assert_eq!(
            negotiate(Some("application/openmetrics-text;q=0")),
            Format::Text
        );
        assert_eq!(
            negotiate(Some("application/openmetrics-text;version=2.0.0")),
            Format::Text
        );
        assert_eq!(negotiate(Some("application/json")), Format::Text);
    }

    proptest! {
        /// Only a client that names OpenMetrics gets it: any header that
        /// does not mention it is answered in text.
        #[test]
        fn a_header_without_openmetrics_gives_text(s in "\\PC{0,120}") {
            prop_assume!(!s.to_ascii_lowercase().contains("openmetrics"));
            prop_assert_eq!(negotiate(Some(&s)), Format::Text);
        }

        /// Asking for OpenMetrics first, whatever follows at a lower q,
        /// gets OpenMetrics.
        #[test]
        fn openmetrics_first_wins_over_any_lower_ranked_rest(s in "[a-z/*;=., ]{0,80}") {
            prop_assume!(!s.contains('q'));
            let header = format!("application/openmetrics-text;version=1.0.0,{s};q=0.5");
            prop_assert_eq!(negotiate(Some(&header)), Format::OpenMetrics);
        }

        #[test]
        fn higher_q_wins(qo in 1u32..=1000, qt in 1u32..=1000) {
            let header = format!(
                "application/openmetrics-text;version=1.0.0;q={},text/plain;version=0.0.4;q={}",
                qo as f32 / 1000.0, qt as f32 / 1000.0
            );
            let expected = if qo >= qt { Format::OpenMetrics } else { Format::Text };
            prop_assert_eq!(negotiate(Some(&header)), expected);
        }
    }
}
