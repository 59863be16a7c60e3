//! Admin endpoints (JSON) that change the fake at run time; see the
//! module docs of `kube_api` for the list.

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::{json, Value};

use super::pods::{pod_object, Scenario};
use super::routes::{error, full, query};
use super::store::{key_of, strip_rv};
use super::{Body, FakeApi};

fn parse(bytes: &Bytes) -> Result<Value, String> {
    serde_json::from_slice::<Value>(bytes).map_err(|e| e.to_string())
}

fn bad_request(message: &str) -> Response<Body> {
    error(StatusCode::BAD_REQUEST, "BadRequest", message)
}

fn ok(body: Value) -> Response<Body> {
    full(StatusCode::OK, body.to_string())
}

impl FakeApi {
    pub(super) async fn admin(self: &Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let params = query(&req);
        let count = || {
            params
                .get("count")
                .and_then(|c| c.parse().ok())
                .unwrap_or(1)
        };
        let body = match req.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return bad_request(&e.to_string()),
        };
        match (method, path.as_str()) {
            (Method::GET, "/admin/pods") => {
                ok(json!({"pods": self.store().pods.values().collect::<Vec<_>>()}))
            }
            (Method::GET, "/admin/stats") => self.stats(),
            (Method::PUT, "/admin/pods") => self.replace_pods(&body),
            (Method::POST, "/admin/pods") => self.upsert_pod(&body),
            (Method::DELETE, p) if p.starts_with("/admin/pods/") => {
                self.delete_pod(&p["/admin/pods/".len()..])
            }
            (Method::POST, "/admin/expire") => self.expire(),
            (Method::POST, "/admin/gone") => {
                let count = count();
                self.store().gone_next = count;
                ok(json!({"goneNext": count}))
            }
            (Method::POST, "/admin/hang") => {
                self.hung.send_replace(true);
                ok(json!({"hung": true}))
            }
            (Method::POST, "/admin/resume") => {
                self.hung.send_replace(false);
                ok(json!({"hung": false}))
            }
            (Method::POST, "/admin/fail") => {
                let count = count();
                self.store().fail_next = count;
                ok(json!({"failNext": count}))
            }
            _ => error(StatusCode::NOT_FOUND, "NotFound", "unknown admin endpoint"),
        }
    }

    fn stats(&self) -> Response<Body> {
        let store = self.store();
        let s = store.stats;
        ok(
            json!({"lists": s.lists, "watches": s.watches, "unauthorized": s.unauthorized,
                  "resourceVersion": store.rv.to_string()}),
        )
    }

    /// `PUT /admin/pods`: the new set; watchers get the difference.
    fn replace_pods(&self, body: &Bytes) -> Response<Body> {
        let scenario: Scenario =
            match parse(body).and_then(|v| serde_json::from_value(v).map_err(|e| e.to_string())) {
                Ok(s) => s,
                Err(e) => return bad_request(&e),
            };
        let objects: Result<Vec<Value>, String> = scenario
            .pods
            .iter()
            .map(|pod| pod_object(pod, &self.node))
            .collect();
        let objects = match objects {
            Ok(o) => o,
            Err(e) => return bad_request(&e),
        };
        let mut store = self.store();
        let keep: Vec<(String, String)> = objects.iter().map(key_of).collect();
        let gone: Vec<(String, String)> = store
            .pods
            .keys()
            .filter(|k| !keep.contains(k))
            .cloned()
            .collect();
        for key in gone {
            store.delete(&key, &self.live);
        }
        for object in objects {
            if store.pods.get(&key_of(&object)).map(strip_rv) != Some(strip_rv(&object)) {
                store.upsert(object, &self.live);
            }
        }
        ok(json!({"resourceVersion": store.rv.to_string()}))
    }

    /// `POST /admin/pods`: add or replace one pod.
    fn upsert_pod(&self, body: &Bytes) -> Response<Body> {
        let object = match parse(body).and_then(|v| pod_object(&v, &self.node)) {
            Ok(o) => o,
            Err(e) => return bad_request(&e),
        };
        let mut store = self.store();
        store.upsert(object, &self.live);
        ok(json!({"resourceVersion": store.rv.to_string()}))
    }

    /// `DELETE /admin/pods/<ns>/<name>`.
    fn delete_pod(&self, rest: &str) -> Response<Body> {
        let Some((ns, name)) = rest.split_once('/') else {
            return bad_request("use /admin/pods/<namespace>/<name>");
        };
        let mut store = self.store();
        if store.delete(&(ns.to_string(), name.to_string()), &self.live) {
            ok(json!({"resourceVersion": store.rv.to_string()}))
        } else {
            error(StatusCode::NOT_FOUND, "NotFound", "no such pod")
        }
    }

    /// `POST /admin/expire`: forget history; every watch ends with 410.
    fn expire(&self) -> Response<Body> {
        let mut store = self.store();
        store.history.clear();
        store.oldest_rv = store.rv + 1;
        let _ = self.live.send(super::store::Live::Expired);
        ok(json!({"oldestResourceVersion": store.oldest_rv.to_string()}))
    }
}
