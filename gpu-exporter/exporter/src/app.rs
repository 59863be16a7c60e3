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
use crate::kube::{KubeClient, KubeConfig, PodStore};
use crate::metrics::{ExpositionOptions, GpuCollector, SnapshotCell};
use crate::podresources::{allocatable_counts, Allocations, PodResourcesClient, ResourceFilter};
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

struct Sources {
    podresources: Option<PodResourcesClient>,
    pods: Option<Arc<PodStore>>,
    resolver: Option<ProcCgroupResolver>,
}

async fn collection_loop(
    mut readings: mpsc::Receiver<(GpuReading, Duration)>,
    mut builder: SnapshotBuilder,
    mut sources: Sources,
    filter: ResourceFilter,
    cell: Arc<SnapshotCell>,
) {
    let mut pass: u64 = 0;
    while let Some((reading, gpu_duration)) = readings.recv().await {
        let started = Instant::now();
        let (allocations, allocatable) = match sources.podresources.as_mut() {
            None => (None, None),
            Some(client) => {
                let listed = client
                    .list()
                    .await
                    .map(|r| Allocations::from_list(&r, &filter))
                    .map_err(|e| {
                        tracing::debug!(error = %e, "PodResources List failed");
                        e.kind()
                    });
                let allocatable = if pass % ALLOCATABLE_EVERY == 0 && listed.is_ok() {
                    Some(
                        client
                            .allocatable()
                            .await
                            .map(|r| allocatable_counts(&r, &filter))
                            .map_err(|e| e.kind()),
                    )
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
    let pods = match cli.kube.resolved_url() {
        None => {
            tracing::info!("no Kubernetes API configured: GPU series get pod names from the kubelet but workload labels stay unknown");
            None
        }
        Some(_) if node.is_empty() => {
            tracing::error!("--node-name (NODE_NAME) is required for the pod watch; running without workload labels");
            None
        }
        Some(url) => {
            let config = KubeConfig {
                url: url.clone(),
                token_file: cli.kube.token_path().filter(|p| p.exists()),
                ca_file: cli.kube.ca_path(),
                node_name: node.clone(),
                timeout: cli.kube.timeout,
                watch_timeout: cli.kube.watch_timeout,
            };
            match KubeClient::new(config) {
                Ok(client) => {
                    let store = Arc::new(PodStore::default());
                    tracing::info!(%url, node = %node, "watching pods of this node");
                    tokio::spawn(client.run(store.clone(), stopped(stop_tx.subscribe())));
                    Some(store)
                }
                Err(e) => {
                    tracing::error!(error = %e, %url, "cannot set up the Kubernetes API client; running without workload labels");
                    None
                }
            }
        }
    };
    // --- inference runtimes: fed every pod of the node on each change
    let runtime = RuntimeCollector::new(&cli.runtime, policy.clone());
    tokio::spawn(runtime.clone().run(stopped(stop_tx.subscribe())));
    if let Some(store) = &pods {
        let store = store.clone();
        let runtime = runtime.clone();
        let mut changes = store.subscribe();
        let mut stop = stop_tx.subscribe();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    changed = changes.changed() => if changed.is_err() { return },
                    _ = stop.wait_for(|s| *s) => return,
                }
                runtime.update_pods(&store.snapshot().pod_infos());
            }
        });
    }

    // --- kubelet
    let podresources = match cli.kubelet.socket_path() {
        None => None,
        Some(socket) => match PodResourcesClient::new(socket.clone(), cli.kubelet.call_timeout) {
            Ok(client) => {
                tracing::info!(socket = %socket.display(), "GPU-to-pod attribution through the kubelet PodResources API");
                Some(client)
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot set up the PodResources client");
                None
            }
        },
    };
    let resolver = cli.host_proc_path().map(ProcCgroupResolver::new);

    // --- registry and server
    let mut registry = Registry::default();
    registry.register_collector(Box::new(GpuCollector::new(
        cell.clone(),
        ExpositionOptions {
            dcgm_compat: cli.dcgm_compat,
        },
    )));
    registry.register_collector(Box::new(RuntimeCollectorHandle(runtime)));
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
    // The NVML thread finishes its pass (and shuts NVML down) on its own.
    let _ = tokio::task::spawn_blocking(move || gpu_thread.join()).await;
    result.map_err(AppError::Serve)
}
