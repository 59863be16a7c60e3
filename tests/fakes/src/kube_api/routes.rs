//! HTTP: routing of API and admin requests, the LIST answer, Status
//! bodies and query decoding.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::{json, Value};

use super::store::Selector;
use super::watch::until_hung_is;
use super::{Body, FakeApi, Unanswered};

pub(super) fn full(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(Full::new(body.into()).boxed());
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

pub(super) fn status_json(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

pub(super) fn error(status: StatusCode, reason: &str, message: &str) -> Response<Body> {
    full(
        status,
        status_json(status.as_u16(), reason, message).to_string(),
    )
}

pub(super) fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let byte = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match byte {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Query parameters, percent-decoded.
pub(super) fn query(req: &Request<Incoming>) -> BTreeMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

impl FakeApi {
    fn list(&self, selector: &Selector, params: &BTreeMap<String, String>) -> Response<Body> {
        let mut store = self.store();
        store.stats.lists += 1;
        let matching: Vec<&Value> = store
            .pods
            .values()
            .filter(|p| selector.matches(p))
            .collect();
        let offset: usize = params
            .get("continue")
            .and_then(|c| c.strip_prefix("offset-"))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        let limit: usize = params
            .get("limit")
            .and_then(|l| l.parse().ok())
            .filter(|l| *l > 0)
            .unwrap_or(usize::MAX);
        let page: Vec<&Value> = matching.iter().skip(offset).take(limit).copied().collect();
        let mut metadata = json!({"resourceVersion": store.rv.to_string()});
        if offset.saturating_add(page.len()) < matching.len() {
            metadata["continue"] = json!(format!("offset-{}", offset + page.len()));
        }
        let body =
            json!({"apiVersion": "v1", "kind": "PodList", "metadata": metadata, "items": page});
        full(StatusCode::OK, body.to_string())
    }

    /// Serves one request; while hung, API requests wait and are then
    /// dropped unanswered.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, Unanswered> {
        if req.uri().path().starts_with("/admin/") {
            return Ok(self.admin(req).await);
        }
        if *self.hung.borrow() {
            until_hung_is(&mut self.hung.subscribe(), false).await;
            return Err(Unanswered);
        }
        Ok(self.api(req))
    }

    fn api(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_string();
        if !self.authorized(&req) {
            self.store().stats.unauthorized += 1;
            return error(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized");
        }
        {
            let mut store = self.store();
            if store.fail_next > 0 {
                store.fail_next -= 1;
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "InternalError",
                    "injected failure",
                );
            }
        }
        if req.method() != Method::GET {
            return error(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                "GET only",
            );
        }
        let params = query(&req);
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (namespace, name) = match segments.as_slice() {
            ["api", "v1", "pods"] => (None, None),
            ["api", "v1", "namespaces", ns, "pods"] => (Some(ns.to_string()), None),
            ["api", "v1", "namespaces", ns, "pods", name] => {
                (Some(ns.to_string()), Some(name.to_string()))
            }
            _ => {
                return error(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    "the fake serves pods only",
                )
            }
        };
        if let (Some(ns), Some(name)) = (&namespace, &name) {
            let store = self.store();
            return match store.pods.get(&(ns.clone(), name.clone())) {
                Some(pod) => full(StatusCode::OK, pod.to_string()),
                None => error(StatusCode::NOT_FOUND, "NotFound", "pod not found"),
            };
        }
        let selector = match Selector::parse(namespace, &params) {
            Ok(s) => s,
            Err(e) => return error(StatusCode::BAD_REQUEST, "BadRequest", &e),
        };
        let watching = matches!(
            params.get("watch").map(String::as_str),
            Some("1") | Some("true")
        );
        if watching {
            self.watch(selector, &params)
        } else {
            self.list(&selector, &params)
        }
    }
}
