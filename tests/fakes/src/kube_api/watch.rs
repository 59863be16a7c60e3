//! WATCH streams: history replayed from the requested resourceVersion,
//! then live events and bookmarks until the timeout, a 410 when history is
//! gone, and silence while the server plays hung.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc};

use super::routes::{error, status_json};
use super::store::{Live, Selector};
use super::{Body, FakeApi};

/// Resolves once the hung flag equals `value` (or its sender is gone).
pub(super) async fn until_hung_is(hung: &mut tokio::sync::watch::Receiver<bool>, value: bool) {
    let _ = hung.wait_for(|h| *h == value).await;
}

fn line(kind: &str, object: &Value) -> Bytes {
    Bytes::from(format!("{}\n", json!({"type": kind, "object": object})))
}

fn gone_line() -> Bytes {
    line(
        "ERROR",
        &status_json(410, "Expired", "too old resource version"),
    )
}

/// Where a watch starts: the lines to send first, and the version live
/// events continue from (`None`: the watch ends after those lines).
struct Start {
    initial: Vec<Bytes>,
    from: Option<u64>,
}

/// Why a watch request is refused with an HTTP error.
enum Refused {
    /// `/admin/gone` asked for a 410 on the request itself.
    Gone,
    BadVersion,
}

/// How a live watch behaves.
struct LiveWatch {
    selector: Selector,
    timeout: Duration,
    bookmarks: bool,
}

impl FakeApi {
    pub(super) fn watch(
        self: &Arc<Self>,
        selector: Selector,
        params: &BTreeMap<String, String>,
    ) -> Response<Body> {
        let timeout = params
            .get("timeoutSeconds")
            .and_then(|t| t.parse().ok())
            .map(Duration::from_secs)
            .unwrap_or(Duration::from_secs(1800));
        let bookmarks = params.get("allowWatchBookmarks").map(String::as_str) == Some("true");
        // Subscribe before reading history so nothing falls in between.
        let live = self.live.subscribe();
        let requested = params
            .get("resourceVersion")
            .map(String::as_str)
            .unwrap_or("");
        let start = match self.start_watch(&selector, requested) {
            Ok(start) => start,
            Err(Refused::Gone) => {
                return error(StatusCode::GONE, "Expired", "too old resource version")
            }
            Err(Refused::BadVersion) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "invalid resourceVersion",
                )
            }
        };
        let (tx, rx) = mpsc::channel::<Bytes>(256);
        let hung = self.hung.subscribe();
        let how = LiveWatch {
            selector,
            timeout,
            bookmarks,
        };
        tokio::spawn(stream(start, how, live, hung, tx));
        let chunks = tokio_stream::wrappers::ReceiverStream::new(rx)
            .map(|chunk| Ok::<_, Infallible>(Frame::data(chunk)));
        let mut resp = Response::new(BodyExt::boxed(StreamBody::new(chunks)));
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        resp
    }

    /// Counts the watch and decides how it starts; an HTTP error when the
    /// request itself is refused.
    fn start_watch(&self, selector: &Selector, requested: &str) -> Result<Start, Refused> {
        let mut store = self.store();
        store.stats.watches += 1;
        if store.gone_next > 0 {
            store.gone_next -= 1;
            return Err(Refused::Gone);
        }
        match requested {
            "" | "0" => Ok(Start {
                initial: store
                    .pods
                    .values()
                    .filter(|p| selector.matches(p))
                    .map(|p| line("ADDED", p))
                    .collect(),
                from: Some(store.rv),
            }),
            rv => match rv.parse::<u64>() {
                Ok(rv) if rv >= store.oldest_rv => Ok(Start {
                    initial: store
                        .history
                        .iter()
                        .filter(|e| e.rv > rv && selector.matches(&e.object))
                        .map(|e| line(e.kind, &e.object))
                        .collect(),
                    from: Some(store.rv),
                }),
                Ok(_) => Ok(Start {
                    initial: vec![gone_line()],
                    from: None,
                }),
                Err(_) => Err(Refused::BadVersion),
            },
        }
    }
}

/// Sends the start lines, then live events and bookmarks until the
/// timeout; sends nothing while hung and ends on resume.
async fn stream(
    start: Start,
    how: LiveWatch,
    mut live: broadcast::Receiver<Live>,
    mut hung: tokio::sync::watch::Receiver<bool>,
    tx: mpsc::Sender<Bytes>,
) {
    let hung_now = *hung.borrow_and_update();
    if hung_now {
        return;
    }
    for chunk in start.initial {
        if tx.send(chunk).await.is_err() {
            return;
        }
    }
    let Some(mut last_rv) = start.from else {
        return;
    };
    let deadline = tokio::time::sleep(how.timeout);
    tokio::pin!(deadline);
    let mut bookmark_tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        let next = tokio::select! {
            biased;
            _ = until_hung_is(&mut hung, true) => {
                until_hung_is(&mut hung, false).await;
                return;
            }
            _ = &mut deadline => return,
            _ = bookmark_tick.tick(), if how.bookmarks => {
                let object = json!({"kind": "Pod", "apiVersion": "v1",
                    "metadata": {"resourceVersion": last_rv.to_string()}});
                Some(line("BOOKMARK", &object))
            }
            received = live.recv() => match received {
                Ok(Live::Event(event)) if event.rv > last_rv => {
                    last_rv = event.rv;
                    how.selector.matches(&event.object).then(|| line(event.kind, &event.object))
                }
                Ok(Live::Event(_)) => None,
                Ok(Live::Expired) | Err(broadcast::error::RecvError::Lagged(_)) => {
                    let _ = tx.send(gone_line()).await;
                    return;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
        };
        if let Some(chunk) = next {
            if tx.send(chunk).await.is_err() {
                return;
            }
        }
    }
}
