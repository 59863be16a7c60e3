//! The HTTP layer: a thin hyper 1 server in front of the engine.
//!
//! One driver task owns the engine's clock: it sleeps until the next token
//! is due, advances the engine and hands each token to the request that
//! owns it. Requests talk to the engine through a mutex, never sleep on
//! engine time themselves, and stream one SSE event per token as soon as the
//! driver delivers it.
//!
//! This module is the plumbing (listener, connections, driver, shutdown);
//! `routes` maps requests to handlers, `generation` serves completions,
//! `vllm_metrics` writes `/metrics`, `state` is what they share.

mod generation;
mod http_util;
mod routes;
mod state;
mod vllm_metrics;

#[cfg(test)]
mod tests;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use crate::config::Args;

pub use self::http_util::BodyError;
use self::state::lock;
pub use self::state::AppState;
pub use self::vllm_metrics::render_metrics;

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("listener failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Keeps the engine's clock: sleeps until the next token is due (or until a
/// request wakes it), advances and dispatches.
async fn drive(state: Arc<AppState>) {
    loop {
        let next = lock(&state.engine).next_wakeup();
        match next {
            Some(t) => {
                let deadline = state.epoch + Duration::from_micros(t);
                tokio::select! {
                    _ = tokio::time::sleep_until(deadline) => {}
                    _ = state.wake.notified() => {}
                }
            }
            None => state.wake.notified().await,
        }
        let now = state.now_us();
        let events = {
            let mut engine = lock(&state.engine);
            engine.advance(now);
            engine.drain_events()
        };
        state.dispatch(events);
    }
}

/// A dup of the connection's socket, so a handler can make the close a TCP
/// reset (SO_LINGER 0) when it aborts a stream on purpose.
#[derive(Default)]
struct ConnReset(Mutex<Option<std::net::TcpStream>>);

impl ConnReset {
    fn arm(&self) {
        if let Some(dup) = lock(&self.0).take() {
            let sock = socket2::SockRef::from(&dup);
            if let Err(e) = sock.set_linger(Some(Duration::ZERO)) {
                tracing::warn!(error = %e, "could not arm connection reset");
            }
        }
    }
}

/// Binds, prints the readiness line and serves until SIGTERM/SIGINT.
pub async fn serve(args: Args) -> Result<(), ServerError> {
    let addr = args.listen;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { addr, source })?;
    let local = listener.local_addr()?;
    let state = AppState::new(args);
    tokio::spawn(drive(state.clone()));
    {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "llm-sim listening on {local}");
        let _ = out.flush();
    }
    tracing::info!(%local, models = ?state.models, "llm-sim ready");

    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => accept(&state, stream, peer),
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            _ = &mut shutdown => break,
        }
    }
    drain(&state).await;
    Ok(())
}

/// Serves one accepted connection (HTTP/1.1) on its own task.
fn accept(state: &Arc<AppState>, stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let (stream, reset) = match split_reset_handle(stream) {
        Ok(x) => x,
        Err(e) => {
            tracing::warn!(error = %e, %peer, "connection setup failed");
            return;
        }
    };
    let state = state.clone();
    tokio::spawn(async move {
        let reset = Arc::new(reset);
        let svc = service_fn(move |req| {
            let state = state.clone();
            let reset = reset.clone();
            async move {
                let req = http_util::boxed_request(req);
                Ok::<_, Infallible>(routes::handle(state, reset, req).await)
            }
        });
        if let Err(e) = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(stream), svc)
            .await
        {
            tracing::debug!(error = %e, %peer, "connection ended with error");
        }
    });
}

fn split_reset_handle(stream: TcpStream) -> std::io::Result<(TcpStream, ConnReset)> {
    let std_stream = stream.into_std()?;
    let dup = std_stream.try_clone()?;
    let stream = TcpStream::from_std(std_stream)?;
    Ok((stream, ConnReset(Mutex::new(Some(dup)))))
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Stops taking work (`/health` turns 503) and waits for in-flight requests.
async fn drain(state: &AppState) {
    state.draining.store(true, Ordering::SeqCst);
    tracing::info!("draining");
    let deadline = Instant::now() + Duration::from_millis(state.args.drain_timeout_ms);
    while state.in_flight.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
