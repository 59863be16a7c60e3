//! Wiring: an NVML thread produces readings on the collection interval; the
//! async side joins each with the kubelet's allocations and the pod watch
//! into a snapshot; the HTTP server encodes the last snapshot per scrape.

use std::future::Future;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use prometheus_client::registry::Registry;
use tokentap_runtime_metrics::{RuntimeCollector, RuntimeCollectorHandle};
use tokentap_workload::WorkloadLabelPolicy;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::cgroup::{ProcCgroupResolver, ProcessResolver};
use crate::config::Cli;
use crate::gpu::nvml::{NvmlConfig, NvmlSource};
use crate::gpu::{GpuReading, GpuSource};
use crate::kube::{KubeClient, KubeConfig, PodChange, PodStore};
use crate::metrics::{ExpositionOptions, GpuCollector, SnapshotCell};
use crate::podresources::{AllocationSource, PodResourcesClient, ResourceFilter};
use crate::server::{serve, AppState};
use crate::snapshot::{PassInput, Snapshot, SnapshotBuilder};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the NVML thread: {0}")]
    Thread(std::io::Error),
    #[error("HTTP server: {0}")]
    Serve(std::io::Error),
}

/// Refresh `GetAllocatableResources` every this many passes.
const ALLOCATABLE_EVERY: u64 = 30;

/// Runs the NVML source on its own thread: NVML calls block (sometimes for
/// long on a sick GPU), so they never run on the async runtime.
fn spawn_gpu_thread(
    mut source: Box<dyn GpuSource>,
    interval: Duration,
    readings: mpsc::Sender<(GpuReading, Duration)>,
    stop: std::sync::mpsc::Receiver<()>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("nvml-poller".into())
        .stack_size(512 * 1024)
        .spawn(move || loop {
            let started = Instant::now();
            let reading = source.collect();
            if readings
                .blocking_send((reading, started.elapsed()))
                .is_err()
            {
                return;
            }
            match stop.recv_timeout(interval.saturating_sub(started.elapsed())) {
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                _ => return,
            }
        })
}

struct Sources<A> {
    podresources: Option<A>,
    pods: Option<Arc<PodStore>>,
    resolver: Option<ProcCgroupResolver>,
}

/// Joins each GPU reading with allocations, pods and processes and stores
/// the snapshot; ends when the GPU thread stops sending.
async fn collection_loop<A: AllocationSource>(
    mut readings: mpsc::Receiver<(GpuReading, Duration)>,
    mut builder: SnapshotBuilder,
    mut sources: Sources<A>,
    filter: ResourceFilter,
    cell: Arc<SnapshotCell>,
) {
    let mut pass: u64 = 0;
    while let Some((reading, gpu_duration)) = readings.recv().await {
        let started = Instant::now();
        let (allocations, allocatable) = match sources.podresources.as_mut() {
            None => (None, None),
            Some(source) => {
                let listed = source.allocations(&filter).await;
                let allocatable = if pass % ALLOCATABLE_EVERY == 0 && listed.is_ok() {
                    Some(source.allocatable(&filter).await)
                } else {
                    None
                };
                (Some(listed), allocatable)
            }
        };
        let allocations_duration = started.elapsed();
        let pods = sources.pods.as_ref().map(|s| (s.snapshot(), s.report()));
        let snapshot = builder.build(PassInput {
            gpu: reading,
            gpu_duration,
            allocations,
            allocations_duration,
            allocatable,
            pods,
            resolver: sources.resolver.as_ref().map(|r| r as &dyn ProcessResolver),
            now: Instant::now(),
            wall: SystemTime::now(),
        });
        tracing::debug!(
            gpus = snapshot.gpus.len(),
            elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
            "collection pass done"
        );
        cell.store(snapshot);
        pass += 1;
    }
}

/// Hands the pod watch's changes to the runtime collector one pod at a
/// time; a re-list (or a backlog past the feed's bound) re-reads every pod.
async fn feed_runtime_targets(
    store: Arc<PodStore>,
    runtime: Arc<RuntimeCollector>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut changes = store.subscribe();
    loop {
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            _ = &mut shutdown => return,
        }
        let taken = store.take_changes();
        if taken.resync {
            runtime.update_pods(&store.snapshot().pod_infos());
            continue;
        }
        for change in taken.changes {
            match change {
                PodChange::Upserted(pod) => runtime.update_pod(&pod.info),
                PodChange::Removed(pod) => runtime.remove_pod(&pod.info),
            }
        }
    }
}

/// Starts the node's pod watch when an API server and a node name are
/// configured; without them GPU series keep kubelet pod names only.
fn start_pod_watch(
    cli: &Cli,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Option<Arc<PodStore>> {
    let node = &cli.node_name;
    let Some(url) = cli.kube.resolved_url() else {
        tracing::info!("no Kubernetes API configured: GPU series get pod names from the kubelet but workload labels stay unknown");
        return None;
    };
    if node.is_empty() {
        tracing::error!("--node-name (NODE_NAME) is required for the pod watch; running without workload labels");
        return None;
    }
    let config = KubeConfig {
        url: url.clone(),
        token_file: cli.kube.token_path().filter(|p| p.exists()),
        ca_file: cli.kube.ca_path(),
        node_name: node.clone(),
        timeout: cli.kube.timeout,
        watch_timeout: cli.kube.watch_timeout,
        progress_timeout: cli.kube.progress_timeout,
    };
    let client = match KubeClient::new(config) {
        Ok(client) => client,
        Err(e) => {
            tracing::error!(error = %e, %url, "cannot set up the Kubernetes API client; running without workload labels");
            return None;
        }
    };
    // The change feed only has a reader when runtime collection is on.
    let store = Arc::new(if cli.runtime.runtime_disable {
        PodStore::default()
    } else {
        PodStore::with_change_feed()
    });
    tracing::info!(%url, node = %node, "watching pods of this node");
    tokio::spawn(client.run(store.clone(), shutdown));
    Some(store)
}

/// The kubelet PodResources client, when a socket is configured.
fn podresources_client(cli: &Cli) -> Option<PodResourcesClient> {
    let socket = cli.kubelet.socket_path()?;
    match PodResourcesClient::new(socket.clone(), cli.kubelet.call_timeout) {
        Ok(client) => {
            tracing::info!(socket = %socket.display(), "GPU-to-pod attribution through the kubelet PodResources API");
            Some(client)
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot set up the PodResources client");
            None
        }
    }
}

/// Runs the exporter until `shutdown` resolves.
pub async fn run(cli: Cli, shutdown: impl Future<Output = ()>) -> Result<(), AppError> {
    let policy = WorkloadLabelPolicy::with_extra_keys(&cli.pod_label_allowlist);
    let filter = ResourceFilter::new(cli.kubelet.extra_resources.clone());
    let node = cli.node_name.clone();
    let cell = Arc::new(SnapshotCell::new(Snapshot::empty(&node, &policy)));

    let (stop_tx, mut stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };

    // --- pod watch
    let pods = start_pod_watch(&cli, stopped(stop_tx.subscribe()));
    // --- inference runtimes: fed each pod change of the node's watch
    let runtime = RuntimeCollector::new(&cli.runtime, policy.clone());
    tokio::spawn(runtime.clone().run(stopped(stop_tx.subscribe())));
    if let (Some(store), false) = (&pods, cli.runtime.runtime_disable) {
        tokio::spawn(feed_runtime_targets(
            store.clone(),
            runtime.clone(),
            stopped(stop_tx.subscribe()),
        ));
    }

    // --- kubelet
    let podresources = podresources_client(&cli);
    let resolver = cli.host_proc_path().map(ProcCgroupResolver::new);

    // --- registry and server
    let mut registry = Registry::default();
    registry.register_collector(Box::new(GpuCollector::new(
        cell.clone(),
        ExpositionOptions {
            dcgm_compat: cli.dcgm_compat,
        },
    )));
    if !cli.runtime.runtime_disable {
        registry.register_collector(Box::new(RuntimeCollectorHandle(runtime)));
    }
    let listener = TcpListener::bind(cli.listen)
        .await
        .map_err(|source| AppError::Listen {
            addr: cli.listen,
            source,
        })?;
    let bound = listener.local_addr().map_err(AppError::Serve)?;
    let state = Arc::new(AppState {
        registry,
        snapshot: cell.clone(),
        stall_after: cli.collect_interval * 3 + Duration::from_secs(30),
        last_size: AtomicUsize::new(0),
    });

    // --- collection
    let source = NvmlSource::new(NvmlConfig {
        lib_path: cli.nvml.lib.clone(),
        retry_interval: cli.nvml.retry_interval,
        xid_events: !cli.nvml.no_xid_events,
    });
    let (readings_tx, readings_rx) = mpsc::channel(1);
    let (thread_stop_tx, thread_stop_rx) = std::sync::mpsc::channel();
    let gpu_thread = spawn_gpu_thread(
        Box::new(source),
        cli.collect_interval,
        readings_tx,
        thread_stop_rx,
    )
    .map_err(AppError::Thread)?;
    let builder = SnapshotBuilder::new(node.clone(), policy, filter.clone(), cli.stale_retention);
    let collection = tokio::spawn(collection_loop(
        readings_rx,
        builder,
        Sources {
            podresources,
            pods,
            resolver,
        },
        filter,
        cell,
    ));

    tracing::info!(listen = %bound, interval = ?cli.collect_interval, "gpu-exporter ready");
    let server = serve(listener, state, async move {
        let _ = stop_rx.wait_for(|stop| *stop).await;
    });
    tokio::pin!(server);
    tokio::pin!(shutdown);
    let result = tokio::select! {
        r = &mut server => r,
        _ = &mut shutdown => {
            tracing::info!("shutting down");
            Ok(())
        }
    };
    let _ = stop_tx.send(true);
    drop(thread_stop_tx);
    collection.abort();
    // The NVML thread finishes its pass and shuts NVML down on its own; a
    // call hung in the driver must not hold the exit forever.
    let joined = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::task::spawn_blocking(move || gpu_thread.join()),
    )
    .await;
    if joined.is_err() {
        tracing::warn!("NVML thread still busy after 5s; exiting without waiting for it");
    }
    result.map_err(AppError::Serve)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::{DeviceIdentity, DeviceReading, NvmlStatus, XidEvent};
    use crate::health::{Collector, ErrorKind};
    use crate::kube::NodePod;
    use crate::podresources::{Allocations, ContainerRef};
    use std::collections::{BTreeMap, HashMap, VecDeque};
    use tokentap_workload::PodInfo;

    const G0: &str = "GPU-00000000-0000-4000-8000-0000000000a0";
    const G1: &str = "GPU-00000000-0000-4000-8000-0000000000a1";

    /// Plays readings in order, then repeats the last one.
    struct ScriptedGpus(VecDeque<GpuReading>);

    impl GpuSource for ScriptedGpus {
        fn collect(&mut self) -> GpuReading {
            if self.0.len() > 1 {
                self.0
                    .pop_front()
                    .unwrap_or_else(|| GpuReading::down(ErrorKind::Unknown, "empty"))
            } else {
                self.0
                    .front()
                    .cloned()
                    .unwrap_or_else(|| GpuReading::down(ErrorKind::Unknown, "empty"))
            }
        }
    }

    struct FixedAllocations(Result<Allocations, ErrorKind>);

    impl AllocationSource for FixedAllocations {
        async fn allocations(&mut self, _: &ResourceFilter) -> Result<Allocations, ErrorKind> {
            self.0.clone()
        }

        async fn allocatable(
            &mut self,
            _: &ResourceFilter,
        ) -> Result<BTreeMap<String, u64>, ErrorKind> {
            Ok(BTreeMap::from([("nvidia.com/gpu".to_string(), 2)]))
        }
    }

    fn device(index: u32, uuid: &str, lost: bool) -> DeviceReading {
        DeviceReading {
            identity: DeviceIdentity {
                index,
                uuid: uuid.into(),
                ..DeviceIdentity::default()
            },
            lost,
            utilization_gpu_percent: (!lost).then_some(40 + index),
            ..DeviceReading::default()
        }
    }

    fn reading(devices: Vec<DeviceReading>, xids: Vec<XidEvent>) -> GpuReading {
        GpuReading {
            nvml: NvmlStatus::Up {
                driver_version: None,
                cuda_driver_version: None,
            },
            devices,
            xid_events: xids,
            xid_watch_healthy: Some(true),
            errors: vec![],
            enumerated: false,
        }
    }

    /// The whole pass pipeline without any process: a scripted GPU source on
    /// the real poller thread, a fixed allocation source, an in-memory pod
    /// store, the real collection loop and snapshot cell.
    #[tokio::test(flavor = "current_thread")]
    async fn passes_join_gpus_allocations_and_pods_into_served_snapshots() {
        let script = VecDeque::from([
            reading(vec![device(0, G0, false), device(1, G1, false)], vec![]),
            reading(
                vec![device(0, G0, false)],
                vec![XidEvent {
                    gpu_uuid: G0.into(),
                    xid: Some(79),
                }],
            ),
            reading(vec![device(0, G0, false), device(1, G1, true)], vec![]),
        ]);
        let (tx, rx) = mpsc::channel(1);
        let (stop_tx, stop_rx) = std::sync::mpsc::channel();
        let thread = spawn_gpu_thread(
            Box::new(ScriptedGpus(script)),
            Duration::from_millis(2),
            tx,
            stop_rx,
        )
        .unwrap();

        let store = Arc::new(PodStore::default());
        let mut labels = BTreeMap::new();
        labels.insert(
            "workload.k8sllm.io/model".to_string(),
            "mistral-7b".to_string(),
        );
        store.replace(vec![NodePod {
            info: PodInfo {
                namespace: "llm".into(),
                name: "vllm-0".into(),
                uid: "u0".into(),
                labels,
                ..PodInfo::default()
            },
            ..NodePod::default()
        }]);
        let allocations = Allocations {
            by_device: HashMap::from([(
                G0.to_string(),
                vec![ContainerRef {
                    namespace: "llm".into(),
                    pod: "vllm-0".into(),
                    container: "server".into(),
                }],
            )]),
            ..Allocations::default()
        };
        let policy = WorkloadLabelPolicy::default();
        let cell = Arc::new(SnapshotCell::new(Snapshot::empty("n", &policy)));
        let builder = SnapshotBuilder::new(
            "n",
            policy,
            ResourceFilter::default(),
            Duration::from_secs(60),
        );
        let sources = Sources {
            podresources: Some(FixedAllocations(Ok(allocations))),
            pods: Some(store),
            resolver: None,
        };
        let collection = tokio::spawn(collection_loop(
            rx,
            builder,
            sources,
            ResourceFilter::default(),
            cell.clone(),
        ));

        let mut snap = cell.load();
        for _ in 0..2000 {
            if snap.collections_total >= 4 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
            snap = cell.load();
        }
        drop(stop_tx);
        collection.abort();
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;

        assert!(
            snap.collections_total >= 4,
            "passes: {}",
            snap.collections_total
        );
        assert_eq!(snap.gpus.len(), 2);
        let g0 = &snap.gpus[0];
        assert!(g0.up);
        assert_eq!(g0.owners[0].pod, "vllm-0");
        assert_eq!(g0.owners[0].workload.get("model"), Some("mistral-7b"));
        assert!(!snap.gpus[1].up, "GPU 1 was lost in the last reading");
        assert_eq!(snap.xid.len(), 1);
        assert_eq!(snap.xid[0].count, 1);
        assert_eq!(snap.xid[0].owner.pod, "vllm-0");
        assert_eq!(snap.devices_allocatable["nvidia.com/gpu"], 2);
        assert!(snap.collectors[&Collector::PodResources].success);
        assert!(snap.collectors[&Collector::KubePods].success);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_failing_allocation_source_keeps_gpu_series() {
        let (tx, rx) = mpsc::channel(1);
        let (stop_tx, stop_rx) = std::sync::mpsc::channel();
        let script = VecDeque::from([reading(vec![device(0, G0, false)], vec![])]);
        let thread = spawn_gpu_thread(
            Box::new(ScriptedGpus(script)),
            Duration::from_millis(2),
            tx,
            stop_rx,
        )
        .unwrap();
        let policy = WorkloadLabelPolicy::default();
        let cell = Arc::new(SnapshotCell::new(Snapshot::empty("n", &policy)));
        let builder = SnapshotBuilder::new(
            "n",
            policy,
            ResourceFilter::default(),
            Duration::from_secs(60),
        );
        let sources = Sources {
            podresources: Some(FixedAllocations(Err(ErrorKind::Connect))),
            pods: None,
            resolver: None,
        };
        let collection = tokio::spawn(collection_loop(
            rx,
            builder,
            sources,
            ResourceFilter::default(),
            cell.clone(),
        ));
        let mut snap = cell.load();
        for _ in 0..2000 {
            if snap.collections_total >= 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
            snap = cell.load();
        }
        drop(stop_tx);
        collection.abort();
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        assert_eq!(snap.gpus.len(), 1);
        assert_eq!(snap.gpus[0].device.utilization_gpu_percent, Some(40));
        assert!(!snap.gpus[0].owners[0].is_attributed());
        assert!(!snap.collectors[&Collector::PodResources].success);
        assert!(snap.errors[&(Collector::PodResources, ErrorKind::Connect)] >= 2);
    }
}
