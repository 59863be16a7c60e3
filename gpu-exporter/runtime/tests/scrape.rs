//! Real scrapes over loopback: a healthy runtime, a hung one and a closed
//! port, scraped together; the hung one fails by timeout without holding
//! the others back.

// Test helpers outside #[test] fns fail loudly on purpose.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokentap_runtime_metrics::{RuntimeArgs, RuntimeCollector, RuntimeCollectorHandle};
use tokentap_workload::{PodInfo, WorkloadLabelPolicy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

fn pod(name: &str, port: u16) -> PodInfo {
    let labels: BTreeMap<String, String> = [("app.kubernetes.io/part-of", "llm-platform")]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let annotations: BTreeMap<String, String> =
        [("prometheus.io/port".to_string(), port.to_string())].into();
    PodInfo {
        namespace: "llm".into(),
        name: name.into(),
        uid: name.into(),
        ip: Some("127.0.0.1".into()),
        phase: "Running".into(),
        labels,
        annotations,
        ..PodInfo::default()
    }
}

/// Serves `body` to every request; with `hang`, accepts and never answers.
async fn serve(body: &'static str, hang: bool) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        // Bounded: a test makes a handful of connections.
        for _ in 0..16 {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                if hang {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    return;
                }
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\n\r\n{}",
                    body.len(),
                    body
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    port
}

fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_and_closed_runtimes_do_not_hide_the_healthy_one() {
    const BODY: &str = "vllm:num_requests_waiting{model_name=\"m\",engine=\"0\"} 4\nvllm:generation_tokens_total{model_name=\"m\",engine=\"0\"} 9\n";
    let good = serve(BODY, false).await;
    let hung = serve(BODY, true).await;
    let closed = closed_port();
    let args = RuntimeArgs {
        runtime_scrape_timeout: Duration::from_millis(300),
        ..RuntimeArgs::default()
    };
    let c = RuntimeCollector::new(&args, WorkloadLabelPolicy::default());
    c.update_pods(&[pod("good", good), pod("hung", hung), pod("closed", closed)]);
    c.scrape_all().await;

    let mut registry = Registry::default();
    registry.register_collector(Box::new(RuntimeCollectorHandle(c.clone())));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
    let get = |metric: &str, pod: &str, extra: Option<(&str, &str)>| -> f64 {
        let s = scrape
            .samples
            .iter()
            .find(|s| {
                s.metric == metric
                    && s.labels.get("pod") == Some(pod)
                    && extra.is_none_or(|(k, v)| s.labels.get(k) == Some(v))
            })
            .unwrap_or_else(|| panic!("{metric} {pod} missing in\n{text}"));
        match s.value {
            prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        }
    };
    assert_eq!(get("llm_runtime_up", "good", None), 1.0);
    assert_eq!(get("llm_runtime_requests_waiting", "good", None), 4.0);
    assert_eq!(get("llm_runtime_up", "hung", None), 0.0);
    assert_eq!(
        get(
            "llm_runtime_scrape_errors_total",
            "hung",
            Some(("reason", "timeout"))
        ),
        1.0
    );
    assert_eq!(get("llm_runtime_up", "closed", None), 0.0);
    assert_eq!(
        get(
            "llm_runtime_scrape_errors_total",
            "closed",
            Some(("reason", "connect"))
        ),
        1.0
    );
    assert_eq!(c.target_count(), 3);
}

#[tokio::test(flavor = "current_thread")]
async fn each_target_is_scraped_once_per_interval_whatever_joins() {
    let interval = Duration::from_secs(5);
    let args = RuntimeArgs {
        runtime_scrape_interval: interval,
        runtime_scrape_timeout: Duration::from_millis(300),
        ..RuntimeArgs::default()
    };
    let c = RuntimeCollector::new(&args, WorkloadLabelPolicy::default());
    let port = closed_port();
    let start = std::time::Instant::now();
    let pods: Vec<PodInfo> = (0..8).map(|i| pod(&format!("p{i}"), port)).collect();
    c.update_pods(&pods);
    // Four intervals on a simulated clock in 100 ms steps; a ninth target
    // joins after 2 s and others come and go around it.
    let mut scraped = 0;
    for step in 1..=200u32 {
        if step == 20 {
            c.update_pod(&pod("late", port));
        }
        if step % 10 == 0 {
            c.update_pod(&pod("short-lived", port));
            c.remove_pod(&pod("short-lived", port));
        }
        scraped += c
            .scrape_due(start + Duration::from_millis(100) * step)
            .await;
    }
    // 8 targets x 4 intervals + the late one's 4 slots; a scrape-all on
    // every change would have made hundreds.
    assert_eq!(scraped, 36);
}
