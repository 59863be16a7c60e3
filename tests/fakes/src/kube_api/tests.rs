//! Pod forms, selectors, query decoding and the watch behaviours the
//! exporter's tests rely on (continuity, 410 on the request, hang).

use super::pods::*;
use super::routes::percent_decode;
use super::store::Selector;
use super::*;
use http::StatusCode;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use std::time::Duration;

#[test]
fn simple_pods_become_pod_objects() {
    let pod = pod_object(
        &json!({"name": "vllm-0", "namespace": "llm", "podIP": "127.0.0.1",
                "labels": {"app.kubernetes.io/part-of": "llm-platform"},
                "annotations": {"prometheus.io/port": "8000"},
                "containers": [{"name": "server", "ports": [{"name": "http", "containerPort": 8000}],
                                "containerID": "containerd://abc"}]}),
        "node-1",
    )
    .unwrap();
    assert_eq!(pod["spec"]["nodeName"], "node-1");
    assert_eq!(pod["status"]["podIP"], "127.0.0.1");
    assert_eq!(pod["status"]["phase"], "Running");
    assert_eq!(pod["status"]["containerStatuses"][0]["ready"], true);
    assert_eq!(
        pod["status"]["containerStatuses"][0]["containerID"],
        "containerd://abc"
    );
    assert_eq!(
        pod["spec"]["containers"][0]["ports"][0]["containerPort"],
        8000
    );
    let uid = pod["metadata"]["uid"].as_str().unwrap();
    assert_eq!(uid, derived_uid("llm", "vllm-0"));
    assert_eq!(uid.len(), 36);
    assert!(pod_object(&json!({"name": "x"}), "n").is_err());
    assert!(pod_object(&json!({"name": "x", "namespace": "y", "bogus": 1}), "n").is_err());
}

#[test]
fn pod_info_shaped_pods_are_accepted() {
    let pod = pod_object(
        &json!({"namespace": "llm", "name": "sim-a", "uid": "uid-sim-a", "ip": "127.0.0.1",
                "phase": "Running", "ready": true, "labels": {"app.kubernetes.io/part-of": "llm-platform"},
                "annotations": {"prometheus.io/port": "8001"},
                "container_ports": [{"container": "server", "name": "http", "port": 8001}],
                "restart_count": 2}),
        "node-1",
    )
    .unwrap();
    assert_eq!(pod["metadata"]["uid"], "uid-sim-a");
    assert_eq!(pod["status"]["podIP"], "127.0.0.1");
    assert_eq!(pod["status"]["containerStatuses"][0]["restartCount"], 2);
    assert_eq!(pod["spec"]["containers"][0]["name"], "server");
    assert_eq!(
        pod["spec"]["containers"][0]["ports"][0]["containerPort"],
        8001
    );
}

#[test]
fn query_values_are_percent_decoded() {
    assert_eq!(
        percent_decode("spec.nodeName%3Dnode-1"),
        "spec.nodeName=node-1"
    );
    assert_eq!(percent_decode("a+b%2"), "a b%2");
    assert_eq!(percent_decode("%zz"), "%zz");
}

#[test]
fn selectors() {
    let pod = pod_object(
        &json!({"name": "a", "namespace": "llm", "node": "n1", "labels": {"team": "x"}}),
        "n0",
    )
    .unwrap();
    let params = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let s = Selector::parse(
        None,
        &params(&[
            ("fieldSelector", "spec.nodeName=n1"),
            ("labelSelector", "team=x"),
        ]),
    )
    .unwrap();
    assert!(s.matches(&pod));
    let s = Selector::parse(None, &params(&[("fieldSelector", "spec.nodeName=n2")])).unwrap();
    assert!(!s.matches(&pod));
    let s = Selector::parse(Some("other".into()), &params(&[])).unwrap();
    assert!(!s.matches(&pod));
    assert!(Selector::parse(None, &params(&[("fieldSelector", "status.phase=Running")])).is_err());
}

fn watch_params(rv: &str) -> BTreeMap<String, String> {
    [
        ("resourceVersion", rv),
        ("allowWatchBookmarks", "false"),
        ("timeoutSeconds", "30"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

async fn next_line(body: &mut Body) -> Option<Value> {
    let frame = tokio::time::timeout(Duration::from_millis(300), body.frame())
        .await
        .ok()??
        .ok()?;
    serde_json::from_slice(&frame.into_data().ok()?).ok()
}

fn api_with_one_pod(initial_rv: u64) -> Arc<FakeApi> {
    let scenario = Scenario {
        pods: vec![json!({"name": "a", "namespace": "llm"})],
    };
    FakeApi::new("n".into(), None, scenario, initial_rv).unwrap()
}

#[tokio::test]
async fn a_restart_with_the_last_version_continues_the_sequence() {
    let api = api_with_one_pod(5000);
    assert_eq!(api.store().rv, 5001);
    let selector = Selector::parse(None, &BTreeMap::new()).unwrap();
    let mut body = api.watch(selector, &watch_params("5001")).into_body();
    let pod = pod_object(&json!({"name": "b", "namespace": "llm"}), "n").unwrap();
    api.store().upsert(pod, &api.live);
    let event = next_line(&mut body).await.unwrap();
    assert_eq!(event["type"], "ADDED");
    assert_eq!(event["object"]["metadata"]["resourceVersion"], "5002");
    // A version from before the restart's first one is too old.
    let selector = Selector::parse(None, &BTreeMap::new()).unwrap();
    let mut old = api.watch(selector, &watch_params("4000")).into_body();
    assert_eq!(next_line(&mut old).await.unwrap()["object"]["code"], 410);
}

#[tokio::test]
async fn gone_answers_the_watch_request_itself_with_410() {
    let api = api_with_one_pod(100);
    api.store().gone_next = 1;
    let selector = || Selector::parse(None, &BTreeMap::new()).unwrap();
    assert_eq!(
        api.watch(selector(), &watch_params("101")).status(),
        StatusCode::GONE
    );
    assert_eq!(
        api.watch(selector(), &watch_params("101")).status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn a_hung_server_sends_nothing_until_resumed_then_ends_the_watch() {
    let api = api_with_one_pod(100);
    let selector = Selector::parse(None, &BTreeMap::new()).unwrap();
    let mut body = api.watch(selector, &watch_params("101")).into_body();
    let b = pod_object(&json!({"name": "b", "namespace": "llm"}), "n").unwrap();
    api.store().upsert(b, &api.live);
    assert_eq!(next_line(&mut body).await.unwrap()["type"], "ADDED");
    api.hung.send_replace(true);
    let c = pod_object(&json!({"name": "c", "namespace": "llm"}), "n").unwrap();
    api.store().upsert(c, &api.live);
    assert!(next_line(&mut body).await.is_none(), "an event while hung");
    api.hung.send_replace(false);
    let end = tokio::time::timeout(Duration::from_secs(2), body.frame()).await;
    assert!(matches!(end, Ok(None)), "the stream ends on resume");
}
